"""06: the recommended configuration, derived from the measured sweeps, and its SUMMARY.md result rows."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.pipeline.run import STAGES
from common.variants.choice import VariantChoice
from common.reports.caveats import weights_caveat
from common.production.cold_start import reproduce_command
from common.production.sweeps import latency_table
from common.core.topology import Topology, format_cpu_list, plan_worker_cpusets

# ----------------------------------------------------------------------------- recommendation

@dataclass
class Recommendation:
    variant: str
    tier: str
    workers: int
    threads: int
    cpusets: list[list[int]]
    cases_per_hour: float
    latency_threads: int  # best single-worker thread count
    latency_cpus: list[int]
    latency_s: float
    source: str
    text: list[str]

    @property
    def config(self) -> str:
        return f"W{self.workers}xT{self.threads}"


def recommend(latency: pd.DataFrame, throughput: pd.DataFrame, cold: pd.DataFrame, topology: Topology,
              choice: VariantChoice, env: dict) -> Recommendation | None:
    """Best W x T by measured cases/hour, best T by measured latency, and a paragraph from the numbers."""
    ok_tp = throughput[throughput.status.isin(["ok", "partial"])] if not throughput.empty else throughput
    table = latency_table(latency) if not latency.empty else pd.DataFrame()
    ok_lat = table[table.status == "ok"] if not table.empty else table
    if ok_tp.empty or ok_lat.empty:
        return None
    # Only what selection.py's rule allows is recommended: an exact-tier variant or choice.approximate (Dice vs
    # vanilla >= APPROX_DICE_MIN on every case of 05's run); a drifting row measured with --variants never is.
    allowed = (ok_tp.tier == "exact") | (ok_tp.variant == choice.approximate) if "tier" in ok_tp else None
    refused = sorted(set(ok_tp.variant[~allowed])) if allowed is not None else []
    if allowed is not None and allowed.any():
        ok_tp = ok_tp[allowed]
    else:
        refused = []
    best = ok_tp.sort_values("cases_per_hour", ascending=False).iloc[0]
    variant = best.variant
    lat_v = ok_lat[ok_lat.variant == variant].sort_values("median_s")
    fastest = lat_v.iloc[0]
    one = lat_v[lat_v.threads == 1]
    cpusets = plan_worker_cpusets(topology, int(best.workers), int(best.threads))
    lat_cpus = plan_worker_cpusets(topology, 1, int(fastest.threads))[0]
    text = []
    n = len(topology.cpus)
    head = (f"On this machine ({topology.model_name}, {n} CPUs in the affinity mask, "
            f"{len(topology.l3_domains)} L3 domain(s), {len(topology.numa_nodes)} NUMA node(s); "
            f"weights: {env.get('weights_kind', '?')}), ")
    single = ok_tp[ok_tp.workers == 1].sort_values("cases_per_hour", ascending=False)
    gain = ""
    if not single.empty and single.iloc[0].cases_per_hour > 0 and int(best.workers) > 1:
        gain = f", {best.cases_per_hour / single.iloc[0].cases_per_hour:.2f}x the best single worker " \
               f"({single.iloc[0].cases_per_hour:.0f} cases/hour at T={int(single.iloc[0].threads)})"
    text.append(head + f"the highest measured throughput of variant `{variant}` ({best.tier}) was "
                f"**{int(best.workers)} worker(s) x {int(best.threads)} thread(s)**: {best.cases_per_hour:.0f} cases/hour"
                f"{gain}, with a median per-case latency of {best.latency_median_s:.2f} s inside that layout.")
    scale = ""
    if not one.empty and int(fastest.threads) != 1:
        scale = f" ({one.iloc[0].median_s / fastest.median_s:.2f}x faster than 1 thread at {one.iloc[0].median_s:.2f} s)"
    used = int(best.workers) * int(best.threads)
    if used < n:
        text.append(f"That layout leaves {n - used} of {n} CPUs idle, yet measured best: the machine was probably "
                    "shared or memory-bound during the run; confirm with more --repeats before relying on it.")
    text.append(f"For the lowest latency of a single case, one worker with **{int(fastest.threads)} thread(s)** "
                f"pinned to CPUs {format_cpu_list(lat_cpus)} took {fastest.median_s:.2f} s median "
                f"(spread {fastest.p25_s:.2f}–{fastest.p75_s:.2f} s){scale}.")
    if choice.approximate and choice.approximate in set(ok_lat.variant):
        ap = ok_lat[ok_lat.variant == choice.approximate].sort_values("median_s").iloc[0]
        ex = ok_lat[ok_lat.variant == choice.exact].sort_values("median_s")
        if not ex.empty:
            ratio = ex.iloc[0].median_s / ap.median_s
            row = choice.row(choice.approximate)
            dice = np.nan if row is None else row.dice_min
            text.append(f"The approximate variant `{choice.approximate}` ran at {ap.median_s:.2f} s "
                        f"({ratio:.2f}x the exact `{choice.exact}`), its mean per-class Dice vs vanilla in 05 "
                        f"{'not measured' if pd.isna(dice) else f'>= {dice:.4f} on every case'}: "
                        + ("use it where labels within that Dice of TotalSegmentator's are enough." if ratio > 1.0 else
                           "it is not faster here, keep the exact variant."))
    if refused:
        text.append(f"Not recommended whatever their speed: {', '.join(f'`{v}`' for v in refused)} (approximate, "
                    f"not 05's approximate pick: {choice.approximate_note}).")
    cold_ok = cold[cold.status == "ok"] if not cold.empty else cold
    if not cold_ok.empty:
        c = cold_ok.iloc[0]
        warm = ok_lat[(ok_lat.variant == c.variant) & (ok_lat.threads == c.threads)]
        warm_s = f" against {warm.iloc[0].median_s:.2f} s warm" if not warm.empty else ""
        text.append(f"A cold start (new process to first output written, imports and session build included) took "
                    f"{c.to_first_output_s:.2f} s{warm_s}: keep long-lived pinned workers rather than one process "
                    "per case" + ("." if c.to_first_output_s > 1.2 * (warm.iloc[0].median_s if not warm.empty else 0)
                                  else " (here the difference is small)."))
    text.append(weights_caveat(env.get("weights_kind")))
    return Recommendation(variant, best.tier, int(best.workers), int(best.threads), cpusets,
                          float(best.cases_per_hour), int(fastest.threads), lat_cpus, float(fastest.median_s),
                          best.source, text)


def reproduce_lines(rec: Recommendation) -> list[str]:
    lines = []
    if rec.workers == 1:
        lines.append(reproduce_command(rec.cpusets[0], rec.variant, rec.threads))
    else:
        for i, cpus in enumerate(rec.cpusets):
            lines.append(reproduce_command(cpus, rec.variant, rec.threads, f"IN_PART{i}/", "OUT_DIR") + " &")
        lines.append("wait")
    return lines


# ----------------------------------------------------------------------------- production rows (SUMMARY)

def production_rows(rec: Recommendation, latency: pd.DataFrame, items: pd.DataFrame, cases: list,
                    env: dict, out_dir: Path) -> list[dict]:
    """RESULT_COLUMNS rows for the recommended configuration's per-case runs, scored like every other row."""
    from common.harness.bench import score

    by_id = {c.case_id: c for c in cases}
    if rec.workers == 1:
        runs = latency[(latency.variant == rec.variant) & (latency.threads == rec.threads)]
        affinity = runs.cpus.iloc[0] if len(runs) else ""
    else:
        runs = items[(items.variant == rec.variant) & (items.workers == rec.workers) & (items.threads == rec.threads)]
        affinity = None
    rows = []
    for i, run in enumerate(runs.to_dict("records")):
        row = {"implementation": "production", "variant": f"{rec.variant} {rec.config}", "tier": rec.tier,
               "case_id": run["case_id"], "repeat": run.get("repeat", i), "status": run["status"],
               "error": run.get("error", ""), "threads": rec.threads,
               "affinity": affinity if affinity is not None else run.get("worker_cpus", ""),
               "weights_kind": env.get("weights_kind", ""), "cpu_model": env.get("cpu_model", ""),
               "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if run["status"] == "ok":
            for key in ("wall_s", *STAGES, "n_tiles", "peak_rss_mb"):
                if key in run and not pd.isna(run[key]):
                    row[key] = run[key]
            try:
                row.update(score(by_id[run["case_id"]], Path(run["output"]), out_dir, is_reference=False))
            except Exception as exc:  # noqa: BLE001 - a scoring problem must not hide the timing
                row["error"] = f"scoring failed: {type(exc).__name__}: {exc}"[:300]
        rows.append(row)
    return rows
