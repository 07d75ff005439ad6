"""05's "Memory per step" section: tools/stage_memory.py's CSV as one table, steps down, runs across (MB)."""
from __future__ import annotations

import csv
from pathlib import Path

CSV_NAME = "stage_memory.csv"
COLUMNS = ("label", "case_id", "threads", "stage", "peak_mb", "after_mb", "run_peak_mb", "wall_s")


def read_rows(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / CSV_NAME
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def section(out_dir: Path) -> list[str]:
    """Markdown lines (none when tools/stage_memory.py has not run for `out_dir`)."""
    rows = read_rows(out_dir)
    if not rows:
        return []
    labels = list(dict.fromkeys(r["label"] for r in rows))
    steps = list(dict.fromkeys(r["stage"] for r in rows if r["label"] != "vanilla"))
    peak = {(r["label"], r["stage"]): r for r in rows}
    runs = {label: next(r for r in rows if r["label"] == label) for label in labels}
    cases = sorted({r["case_id"] for r in rows})
    lines = ["## Memory per step (peak RSS, MB)", "",
             f"`tools/stage_memory.py` on {', '.join(cases)} ({runs[labels[0]]['threads']} threads), each run in its own "
             "worker process. A cell is the step's peak RSS (VmHWM reset at each step boundary), then the RSS it "
             "left for the next step; `@before` rows are the same variant without the lean-memory changes.", "",
             "| Step | " + " | ".join(f"`{label}`" for label in labels if label != "vanilla") + " |",
             "| --- |" + " ---: |" * sum(label != "vanilla" for label in labels)]
    for step in steps:
        cells = []
        for label in labels:
            if label == "vanilla":
                continue
            r = peak.get((label, step))
            cells.append(f"{float(r['peak_mb']):.0f} / {float(r['after_mb']):.0f}" if r else "–")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines.append("| **run peak** | " + " | ".join(f"**{float(runs[label]['run_peak_mb']):.0f}**"
                                                 for label in labels if label != "vanilla") + " |")
    if "vanilla" in runs:
        vanilla = float(runs["vanilla"]["run_peak_mb"])
        lines += ["", f"Vanilla (TotalSegmentator, PSS of its process tree, same case): **{vanilla:.0f} MB**."]
        ratios = [f"`{label}` {float(runs[label]['run_peak_mb']) / vanilla:.2f}" for label in labels
                  if label != "vanilla" and not label.endswith("@before") and label.startswith("exact")]
        if ratios:
            lines.append(f"Exact variants' peak / vanilla's: {', '.join(ratios)} (goal <= 0.33).")
    return lines + [""]
