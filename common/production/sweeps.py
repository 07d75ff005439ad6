"""06: the latency and throughput sweeps (pinning, thread counts, workers).

Everything scales from the machine: thread counts and worker layouts come from the topology of the
process's affinity mask (L3 domains, NUMA nodes), never from constants. The latency sweep runs one pinned
child process per point (``common.production.pinning.run_pinned``); the throughput sweep runs W
self-pinning Ray actors (``common.production.ray_cohort``). Backends are built inside the children.
"""
from __future__ import annotations

import os
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.core import paths
from common.core.formatting import one_line
from common.production.pinning import memory_fits, run_pinned
from common.core.topology import Topology, format_cpu_list, plan_worker_cpusets

RSS_MARGIN = 1.15  # headroom on the measured peak RSS when deciding whether W workers fit
SOURCE_RAY = "measured (Ray actors)"


# ----------------------------------------------------------------------------- what to sweep

def default_thread_counts(topology: Topology, max_threads: int | None = None) -> list[int]:
    """1..N on small machines; on large ones powers of two, the L3 domain and NUMA node sizes, and N."""
    n = min(max_threads or len(topology.cpus), len(topology.cpus))
    if n <= 8:
        return list(range(1, n + 1))
    counts = {1, n}
    counts.update(2 ** k for k in range(1, n.bit_length()) if 2 ** k <= n)
    counts.update(len(d) for d in topology.l3_domains if len(d) <= n)
    counts.update(len(c) for c in topology.numa_nodes.values() if len(c) <= n)
    physical = len(topology.physical_cores)
    if physical < n:
        counts.add(physical)  # one thread per physical core, SMT siblings unused
    return sorted(counts)


def default_combos(thread_counts: list[int], n_cpus: int) -> list[tuple[int, int]]:
    """(workers, threads): W = N // T for each swept T (so W x T <= N), plus W = 1 (the latency sweep's points)."""
    combos = {(n_cpus // t, t) for t in thread_counts if 1 <= t <= n_cpus}
    combos |= {(1, t) for t in thread_counts if 1 <= t <= n_cpus}  # free: read from the latency sweep
    return sorted(combos, key=lambda wt: (wt[1], wt[0]))


def parse_combos(text: str) -> list[tuple[int, int]]:
    """``"2x1,1x2"`` -> [(2, 1), (1, 2)]."""
    combos = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            w, t = (int(x) for x in part.split("x"))
        except ValueError:
            raise ValueError(f"bad W x T combination {part!r}: expected e.g. 2x1") from None
        if w < 1 or t < 1:
            raise ValueError(f"bad W x T combination {part!r}: both must be >= 1")
        combos.append((w, t))
    return combos


def smallest_cases(cases: list, n: int) -> list:
    """The n cases with the fewest voxels (ties by case id): cheap defaults for a 2-core machine."""
    return sorted(cases, key=lambda c: (int(np.prod(c.shape)), c.case_id))[:n]


# ----------------------------------------------------------------------------- work done in pinned children

def _peak_rss_mb() -> float:
    from common.harness.workers import peak_rss_mb

    return peak_rss_mb()


def latency_point(variant_name: str, threads: int, cases: list[tuple[str, str, str]], repeats: int,
                  warmup: int) -> dict:
    """In a pinned child: build the variant, warm up, then time every (case_id, input, output) ``repeats`` times."""
    t0 = time.perf_counter()
    from common.variants.table import get_variant, make_pipeline_runner

    runner = make_pipeline_runner("production", get_variant(variant_name), threads)
    build_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(warmup):
        runner.run(Path(cases[0][1]), None)
    warmup_s = time.perf_counter() - t1
    runs = []
    for repeat in range(repeats):
        for case_id, image, output in cases:
            start = time.perf_counter()
            timings = runner.run(Path(image), Path(output))
            runs.append({"case_id": case_id, "repeat": repeat, "output": output,
                         "wall_s": time.perf_counter() - start, **timings})
    return {"build_s": build_s, "warmup_s": warmup_s, "runs": runs, "peak_rss_mb": _peak_rss_mb(),
            "affinity": sorted(os.sched_getaffinity(0))}


# ----------------------------------------------------------------------------- the sweeps

@dataclass
class Settings:
    variants: list[str]
    tiers: dict[str, str]
    cases: list  # common.data.cases.Case
    thread_counts: list[int]
    combos: list[tuple[int, int]]
    repeats: int = 1
    warmup: int = 1
    cold_repeats: int = 1
    out_dir: Path = paths.BENCHMARKS_DIR
    available_mb: float | None = None  # None: psutil's available memory
    progress: bool = True


def _outputs(out_dir: Path, variant: str, config: str) -> Path:
    folder = Path(out_dir) / "outputs" / "production" / variant / config
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _spread(values) -> tuple[float, float, float]:
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return (np.nan, np.nan, np.nan)
    return float(np.median(arr)), float(np.percentile(arr, 25)), float(np.percentile(arr, 75))


def latency_sweep(settings: Settings, topology: Topology, bar=None) -> pd.DataFrame:
    """One pinned child per (variant, T): one row per timed run."""
    from common.production.pinning import PinnedChildError

    rows = []
    for variant in settings.variants:
        for threads in settings.thread_counts:
            cpus = plan_worker_cpusets(topology, 1, threads)[0]
            folder = _outputs(settings.out_dir, variant, f"w1t{threads}")
            cases = [(c.case_id, str(c.image), str(folder / f"{c.case_id}.nii.gz")) for c in settings.cases]
            if bar is not None:
                bar.set_postfix_str(f"latency {variant} T={threads} CPUs {format_cpu_list(cpus)}")
            base = {"variant": variant, "tier": settings.tiers.get(variant, ""), "threads": threads,
                    "cpus": format_cpu_list(cpus)}
            try:
                result = run_pinned(cpus, latency_point, variant, threads, cases, settings.repeats, settings.warmup)
            except PinnedChildError as exc:
                rows.append({**base, "status": "error", "error": one_line(exc)})
            else:
                for run in result["runs"]:
                    rows.append({**base, "status": "ok", "error": "", **run, "build_s": result["build_s"],
                                 "warmup_s": result["warmup_s"], "peak_rss_mb": result["peak_rss_mb"],
                                 "child_affinity": format_cpu_list(result["affinity"])})
            if bar is not None:
                bar.update()
    return pd.DataFrame(rows)


def latency_table(sweep: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, T): median and 25th-75th percentile of the per-run wall time."""
    lines = []
    for (variant, threads), group in sweep.groupby(["variant", "threads"], sort=False):
        ok = group[group.status == "ok"]
        median, p25, p75 = _spread(ok.wall_s) if len(ok) else (np.nan,) * 3
        lines.append({"variant": variant, "tier": group.tier.iloc[0], "threads": int(threads),
                      "cpus": group.cpus.iloc[0], "runs": len(ok), "median_s": median, "p25_s": p25, "p75_s": p75,
                      "min_s": ok.wall_s.min() if len(ok) else np.nan, "max_s": ok.wall_s.max() if len(ok) else np.nan,
                      "inference_s": ok.inference_s.median() if len(ok) else np.nan,
                      "build_s": ok.build_s.median() if len(ok) else np.nan,
                      "peak_rss_mb": ok.peak_rss_mb.max() if len(ok) else np.nan,
                      "status": "ok" if len(ok) else "error",
                      "error": "" if len(ok) else group.error.iloc[0]})
    return pd.DataFrame(lines)


def throughput_items(settings: Settings, variant: str, workers: int, threads: int) -> list[tuple[str, str, str]]:
    """(case_id, input, output): every case ``repeats`` times, cycled so that each worker gets at least one."""
    folder = _outputs(settings.out_dir, variant, f"w{workers}t{threads}")
    base = [c for _ in range(settings.repeats) for c in settings.cases]
    n = max(len(base), workers)
    items = []
    for i in range(n):
        case = base[i % len(base)]
        name = case.case_id if n == len(settings.cases) else f"{case.case_id}__{i}"
        items.append((case.case_id, str(case.image), str(folder / f"{name}.nii.gz")))
    return items


def throughput_sweep(settings: Settings, topology: Topology, variant: str, latency: pd.DataFrame,
                     bar=None, log=print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Measure every W >= 2 combination on Ray actors (W = 1 is the latency sweep); returns (combos, per-item rows).

    One embedded Ray instance serves the whole sweep; it starts only if some combination is measured.
    """
    lat = latency[latency.variant == variant]
    measured_rss = lat.peak_rss_mb.max() if "peak_rss_mb" in lat and lat.peak_rss_mb.notna().any() else None
    with ExitStack() as stack:
        connection = []

        def measure(items, workers: int, threads: int):
            from totalseg_fast.engines import ray_cluster
            from common.production.ray_cohort import embedded_ray, run_measured

            if not connection:
                log(f"throughput: starting an embedded Ray instance ({len(topology.cpus)} CPUs, loopback only)")
                connection.append(stack.enter_context(embedded_ray(len(topology.cpus))))
            memory_mb = measured_rss * RSS_MARGIN if measured_rss is not None \
                else ray_cluster.worker_memory_mb(variant, settings.out_dir)[0]
            return run_measured(items, variant, workers, threads, memory_mb, settings.warmup > 0)

        return _throughput_combos(settings, topology, variant, lat, measured_rss, measure, bar, log)


def _throughput_combos(settings, topology, variant, lat, measured_rss, measure, bar, log):
    combos, items_rows = [], []
    for workers, threads in settings.combos:
        base = {"variant": variant, "tier": settings.tiers.get(variant, ""), "workers": workers, "threads": threads}
        if workers * threads > len(topology.cpus):
            combos.append({**base, "status": "refused", "source": "",
                           "message": f"{workers} x {threads} = {workers * threads} CPUs > {len(topology.cpus)} "
                                      "in the affinity mask"})
            log(f"refused: W={workers} x T={threads}: {combos[-1]['message']}")
            if bar is not None:
                bar.update()
            continue
        cpusets = plan_worker_cpusets(topology, workers, threads)
        base["cpusets"] = " ".join(format_cpu_list(c) for c in cpusets)
        if workers == 1:
            point = lat[(lat.threads == threads) & (lat.status == "ok")]
            if point.empty:
                combos.append({**base, "status": "error", "source": "latency sweep",
                               "message": f"no latency-sweep run at T={threads}"})
            else:
                walls = point.wall_s.to_numpy()
                median, p25, p75 = _spread(walls)
                combos.append({**base, "status": "ok", "source": "latency sweep (1 pinned worker)",
                               "items": len(walls), "makespan_s": float(walls.sum()),
                               "cases_per_hour": 3600.0 * len(walls) / float(walls.sum()),
                               "latency_median_s": median, "latency_p25_s": p25, "latency_p75_s": p75,
                               "peak_rss_mb_max": float(point.peak_rss_mb.max()), "message": ""})
            if bar is not None:
                bar.update()
            continue
        if measured_rss is not None:
            fits, message = memory_fits(workers, measured_rss * RSS_MARGIN, settings.available_mb)
            if not fits:
                combos.append({**base, "status": "refused", "source": "", "message": message})
                log(f"refused: W={workers} x T={threads}: {message} "
                    f"(peak RSS {measured_rss:.0f} MB per worker measured in the latency sweep, +{RSS_MARGIN - 1:.0%})")
                if bar is not None:
                    bar.update()
                continue
        if bar is not None:
            bar.set_postfix_str(f"throughput {variant} {workers}x{threads}")
        items = throughput_items(settings, variant, workers, threads)
        try:
            run = measure(items, workers, threads)
        except Exception as exc:  # noqa: BLE001 - Ray could not start or place W workers: this combo only
            combos.append({**base, "status": "error", "source": SOURCE_RAY, "message": one_line(exc)})
            log(f"error: W={workers} x T={threads}: {one_line(exc)}")
            if bar is not None:
                bar.update()
            continue
        claimed = {format_cpu_list(r["cpus"]) for r in run.rows if r.get("cpus")}
        if claimed:  # the CPU sets the actors pinned themselves to (ray_worker.claim_cpus), not the plan
            base["cpusets"] = " ".join(sorted(claimed, key=lambda text: int(text.split(",")[0].split("-")[0])))
        for r in run.rows:
            timings = {k: v for k, v in r.items() if k.endswith("_s") and k not in ("wall_s", "case_s")}
            items_rows.append({**base, "case_id": r.get("case_id"), "output": r.get("output"),
                               "worker": r.get("worker"), "worker_cpus": format_cpu_list(r.get("cpus") or []),
                               "status": r.get("status"), "error": r.get("error") or "",
                               "start": r.get("start"), "end": r.get("end"),
                               "wall_s": (r["end"] - r["start"]) if r.get("status") == "ok" else np.nan,
                               **timings, "peak_rss_mb": r.get("peak_rss_mb"), "node": r.get("node"),
                               "pid": r.get("pid"), "prefetched": r.get("prefetched"),
                               "child_affinity": format_cpu_list(r.get("affinity") or [])})
        ok = run.ok
        if ok:
            span = run.steady_s
            walls = [r["end"] - r["start"] for r in ok]
            median, p25, p75 = _spread(walls)
            rss = [r["peak_rss_mb"] for r in ok if r.get("peak_rss_mb")]
            combos.append({**base, "status": "ok" if len(ok) == len(run.rows) else "partial",
                           "source": SOURCE_RAY, "items": len(ok), "makespan_s": span,
                           "cases_per_hour": 3600.0 * len(ok) / span if span > 0 else np.nan,
                           "latency_median_s": median, "latency_p25_s": p25, "latency_p75_s": p75,
                           "peak_rss_mb_max": max(rss) if rss else np.nan,
                           "message": "; ".join(sorted({r.get("error") for r in run.rows if r.get("error")}))})
        else:
            combos.append({**base, "status": "error", "source": SOURCE_RAY,
                           "message": "; ".join(sorted({r.get("error") or "?" for r in run.rows}))})
        if bar is not None:
            bar.update()
    return pd.DataFrame(combos), pd.DataFrame(items_rows)
