"""Reports stage: result CSVs, Markdown reports and SUMMARY.md of the benchmark scripts."""
