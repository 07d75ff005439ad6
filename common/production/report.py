"""06: plots, benchmarks/production_report.md and the recommendation paragraph of SUMMARY.md."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from common.core.formatting import number
from common.variants.choice import VariantChoice
from common.production.cold_start import reproduce_command
from common.production.recommend import Recommendation, reproduce_lines
from common.production.sweeps import Settings, latency_table
from common.core.topology import Topology, format_cpu_list


def plot_latency(table: pd.DataFrame, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = table[table.status == "ok"]
    if ok.empty:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, group in ok.groupby("variant", sort=False):
        group = group.sort_values("threads")
        err = np.vstack([group.median_s - group.p25_s, group.p75_s - group.median_s])
        ax.errorbar(group.threads, group.median_s, yerr=err, marker="o", capsize=4,
                    label=f"{variant} ({group.tier.iloc[0]})")
    ax.set_xlabel("threads (one pinned worker)")
    ax.set_ylabel("end-to-end latency per case (s)")
    ax.set_xticks(sorted(ok.threads.unique()))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Latency vs threads (median, 25th-75th percentile)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_throughput(table: pd.DataFrame, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = table[table.status.isin(["ok", "partial"])] if not table.empty else table
    if ok.empty:
        return None
    ok = ok.sort_values(["threads", "workers"])
    labels = [f"{int(w)}x{int(t)}" for w, t in zip(ok.workers, ok.threads)]
    fig, ax = plt.subplots(figsize=(6, 4))
    bars = ax.bar(labels, ok.cases_per_hour, color="tab:blue")
    best = int(np.argmax(ok.cases_per_hour.to_numpy()))
    bars[best].set_color("tab:green")
    for bar, value in zip(bars, ok.cases_per_hour):
        ax.annotate(f"{value:.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=8)
    ax.set_xlabel("workers x threads per worker (pinned, disjoint CPU sets)")
    ax.set_ylabel("cases per hour")
    ax.set_title(f"Throughput vs W x T ({ok.variant.iloc[0]}; best in green)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(path: Path, *, topology: Topology, env: dict, settings: Settings, choice: VariantChoice,
                 latency: pd.DataFrame, throughput: pd.DataFrame, cold: pd.DataFrame,
                 rec: Recommendation | None, plots: dict, elapsed_s: float,
                 extra_sections: list[str] = ()) -> Path:
    from common.model.weights import weights_banner
    from common.reports.environment import environment_lines
    from common.reports.report import write_text_atomic

    cases = ", ".join(f"{c.case_id} ({'x'.join(map(str, c.shape))})" for c in settings.cases)
    variants = ", ".join(f"{v} ({settings.tiers.get(v, '?')})" for v in settings.variants)
    lines = ["# 06 Linux production benchmark", "", weights_banner(), "", *environment_lines(env),
             f"- Cases: {cases}; repeats {settings.repeats}; warm-up runs per process {settings.warmup}",
             f"- Variants: {variants}. "
             f"{choice.note}.",
             f"- Latency = end-to-end wall time from reading the input to the written output, in a warm "
             f"pinned process; spread = 25th–75th percentile. This run took {elapsed_s / 60:.1f} min.", "",
             "## CPU topology (read from sysfs)", "", topology.to_markdown(), ""]
    lines += ["## Recommended configuration", ""]
    if rec is None:
        lines += ["No recommendation: no successful latency and throughput measurement (see the tables).", ""]
    else:
        lines += [*rec.text, "",
                  f"Recommended: variant `{rec.variant}`, {rec.workers} worker(s) x {rec.threads} thread(s), "
                  f"CPU sets {' | '.join(format_cpu_list(c) for c in rec.cpusets)} "
                  f"({rec.cases_per_hour:.0f} cases/hour; source: {rec.source}).", "",
                  "Reproduce (throughput layout: split the inputs into one folder per worker):", "", "```sh",
                  *reproduce_lines(rec), "```", "",
                  "Lowest single-case latency:", "", "```sh",
                  reproduce_command(rec.latency_cpus, rec.variant, rec.latency_threads), "```", ""]
    lines += ["## Latency vs threads (one pinned worker)", ""]
    table = latency_table(latency) if not latency.empty else pd.DataFrame()
    if table.empty:
        lines.append("No latency measurement.")
    else:
        lines += ["| Variant | Tier | Threads | CPUs | Runs | Median (s) | Spread p25–p75 (s) | Min–max (s) | "
                  "Inference (s) | Session build (s) | Peak RSS (MB) | Status |",
                  "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in table.itertuples():
            lines.append(f"| {r.variant} | {r.tier} | {r.threads} | {r.cpus} | {r.runs} | {number(r.median_s)} | "
                         f"{number(r.p25_s)}–{number(r.p75_s)} | {number(r.min_s)}–{number(r.max_s)} | {number(r.inference_s)} | "
                         f"{number(r.build_s)} | {number(r.peak_rss_mb, 0)} | {r.status}{': ' + r.error if r.error else ''} |")
    if plots.get("latency"):
        lines += ["", f"![latency vs threads]({Path(plots['latency']).name})"]
    lines += ["", "## Throughput vs W x T (disjoint pinned CPU sets, L3/NUMA aware)", ""]
    if throughput.empty:
        lines.append("No throughput measurement.")
    else:
        lines += ["| W x T | CPU sets | Cases/hour | Items | Makespan (s) | Per-case latency median (p25–p75) (s) | "
                  "Peak RSS per worker (MB) | Status | Source / message |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        for r in throughput.to_dict("records"):
            lines.append(f"| {r['workers']}x{r['threads']} | {r.get('cpusets', '') or '–'} | "
                         f"{number(r.get('cases_per_hour'), 0)} | {r.get('items', '–') if not pd.isna(r.get('items', np.nan)) else '–'} | "
                         f"{number(r.get('makespan_s'))} | {number(r.get('latency_median_s'))} "
                         f"({number(r.get('latency_p25_s'))}–{number(r.get('latency_p75_s'))}) | "
                         f"{number(r.get('peak_rss_mb_max'), 0)} | {r['status']} | "
                         f"{r.get('source', '')}{'; ' + r['message'] if r.get('message') else ''} |")
        lines += ["", "W = 1 rows come from the latency sweep (same pinning, warm process); W >= 2 rows are a "
                  "queue of cases served by W pinned worker processes, each warmed up once before its timed items. "
                  "Cases/hour = items / (last end - first start)."]
    if plots.get("throughput"):
        lines += ["", f"![throughput vs W x T]({Path(plots['throughput']).name})"]
    lines += ["", "## Cold start (process start to first output written)", ""]
    if cold.empty:
        lines.append("Not measured (--cold-repeats 0).")
    else:
        lines += ["| Variant | Threads | CPUs | Case | To first output (s) | Process exit (s) | "
                  "Start-up + imports (s) | Session build (s) | Segmentation (s) | Status |",
                  "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in cold.to_dict("records"):
            lines.append(f"| {r['variant']} | {r['threads']} | {r['cpus']} | {r['case_id']} | "
                         f"{number(r.get('to_first_output_s'))} | {number(r.get('process_exit_s'))} | "
                         f"{number(r.get('startup_imports_s'))} | {number(r.get('session_s'))} | {number(r.get('segment_s'))} | "
                         f"{r['status']}{': ' + r['error'] if r.get('error') else ''} |")
        lines += ["", f"Command: `{cold.iloc[0]['command']}`"]
    for section in extra_sections:  # e.g. the --engines comparison (engine_bench.engines_markdown)
        lines += ["", section.rstrip()]
    lines += ["", "## Files", "",
              "- `production_results.csv`: the recommended configuration's per-case runs (SUMMARY.md row)",
              "- `production_latency_sweep.csv`, `production_throughput_sweep.csv`, `production_throughput_items.csv`, "
              "`production_cold_start.csv`: every measurement"]
    return write_text_atomic(path, "\n".join(lines) + "\n")


def recommendation_markdown(rec: Recommendation | None, settings: Settings) -> str:
    """The paragraph SUMMARY.md appends (benchmarks/production_recommendation.md)."""
    if rec is None:
        return "## Recommendation (06)\n\nNo recommendation: 06 measured no successful configuration.\n"
    cases = ", ".join(c.case_id for c in settings.cases)
    return "\n".join(["## Recommendation (06, production conditions)", "", " ".join(rec.text), "",
                      f"Measured on case(s) {cases}. Reproduce the throughput layout with:", "", "```sh",
                      *reproduce_lines(rec), "```", "",
                      "Details, plots and sweeps: [production_report.md](production_report.md). "
                      "Use the result with `.venv/bin/totalseg_fast -i IN.nii.gz -o OUT --fast` (in place of TotalSegmentator) "
                      "(README).", ""])
