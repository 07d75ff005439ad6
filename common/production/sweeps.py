"""06: the best variants under Linux production conditions (pinning, thread sweep, workers, cold start).

Everything scales from the machine: thread counts and worker layouts come from the topology of the
process's affinity mask (L3 domains, NUMA nodes), never from constants. Work runs in pinned child
processes (``common.production.pinning``); backends are built inside the children.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from common.core import paths
from common.production.pinning import memory_fits, run_pinned, run_queue, shell_command, taskset_command
from common.production.topology import Topology, format_cpu_list, plan_worker_cpusets

FALLBACK_VARIANT = "ort_default"
PARITY_MIN = 0.997
SCRIPT = paths.REPO_ROOT / "06_linux_production_benchmark.py"
RSS_MARGIN = 1.15  # headroom on the measured peak RSS when deciding whether W workers fit


# ----------------------------------------------------------------------------- which variants

@dataclass
class VariantChoice:
    exact: str
    approximate: str | None
    note: str
    table: pd.DataFrame = field(default_factory=pd.DataFrame)  # 05's per-variant medians, if any


def _variant_medians(frame: pd.DataFrame) -> pd.DataFrame:
    ok = frame[frame.status == "ok"].copy()
    ok["variant"] = ok["variant"].fillna("")
    per_case = ok.groupby(["variant", "tier", "case_id"]).agg(wall_s=("wall_s", "median"),
                                                               parity=("parity_agreement", "median"))
    table = per_case.groupby(level=[0, 1]).agg(wall_s=("wall_s", "median"), parity=("parity", "median"),
                                               cases=("wall_s", "size"))
    return table.reset_index().sort_values("wall_s")


def choose_variants(out_dir: Path | None = None) -> VariantChoice:
    """Fastest exact variant with median parity >= 0.997 and fastest approximate one, from 05's CSV."""
    from common.variants.table import VARIANTS

    csv = Path(out_dir or paths.BENCHMARKS_DIR) / "onnx_optimized_results.csv"
    if not csv.is_file() or csv.stat().st_size == 0:
        return VariantChoice(FALLBACK_VARIANT, None,
                             f"no 05 results ({csv.name} missing): using the fallback variant {FALLBACK_VARIANT}")
    frame = pd.read_csv(csv)
    if frame.empty or not (frame.status == "ok").any():
        return VariantChoice(FALLBACK_VARIANT, None,
                             f"{csv.name} has no successful run: using the fallback variant {FALLBACK_VARIANT}")
    table = _variant_medians(frame)
    table = table[table.variant.isin(VARIANTS)]  # 05 may know variants this checkout does not
    exact = table[(table.tier == "exact") & ((table.parity >= PARITY_MIN) | table.parity.isna())]
    approx = table[table.tier == "approximate"]
    notes = []
    if exact.empty:
        best_exact = FALLBACK_VARIANT
        notes.append(f"no exact variant in {csv.name} passed parity >= {PARITY_MIN}: using {FALLBACK_VARIANT}")
    else:
        row = exact.iloc[0]
        best_exact = row.variant
        parity = "parity not measured (no vanilla output)" if pd.isna(row.parity) else f"parity {row.parity:.5f}"
        notes.append(f"best exact variant from {csv.name}: {best_exact} ({row.wall_s:.2f} s median, {parity})")
    best_approx = None if approx.empty else approx.iloc[0].variant
    if best_approx:
        notes.append(f"best approximate variant: {best_approx} ({approx.iloc[0].wall_s:.2f} s median)")
    return VariantChoice(best_exact, best_approx, "; ".join(notes), table)


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
    from common.production.pinning import _peak_rss_mb as peak

    return peak()


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


_WORKER_RUNNERS: dict = {}


def throughput_item(item: tuple) -> dict:
    """Queue item of the throughput sweep; a worker builds (and warms) its runner on its first item."""
    variant_name, threads, warmup, case_id, image, output = item
    key = (variant_name, threads)
    info = {}
    if key not in _WORKER_RUNNERS:
        from common.variants.table import get_variant, make_pipeline_runner

        t0 = time.perf_counter()
        runner = make_pipeline_runner("production", get_variant(variant_name), threads)
        info["build_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(warmup):
            runner.run(Path(image), None)
        info["warmup_s"] = time.perf_counter() - t1
        _WORKER_RUNNERS[key] = runner
    start = time.time()
    timings = _WORKER_RUNNERS[key].run(Path(image), Path(output))
    end = time.time()
    return {"case_id": case_id, "output": output, "start": start, "end": end, "timings": timings,
            "affinity": sorted(os.sched_getaffinity(0)), **info}


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
                rows.append({**base, "status": "error", "error": str(exc).splitlines()[0]})
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


def throughput_items(settings: Settings, variant: str, workers: int, threads: int) -> list[tuple]:
    """The queue: every case ``repeats`` times, cycled so that each worker gets at least one item."""
    folder = _outputs(settings.out_dir, variant, f"w{workers}t{threads}")
    base = [c for _ in range(settings.repeats) for c in settings.cases]
    n = max(len(base), workers)
    items = []
    for i in range(n):
        case = base[i % len(base)]
        name = case.case_id if n == len(settings.cases) else f"{case.case_id}__{i}"
        items.append((variant, threads, settings.warmup, case.case_id, str(case.image), str(folder / f"{name}.nii.gz")))
    return items


def throughput_sweep(settings: Settings, topology: Topology, variant: str, latency: pd.DataFrame,
                     bar=None, log=print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Measure every W >= 2 combination (W = 1 is the latency sweep); returns (combos, per-item rows)."""
    lat = latency[latency.variant == variant]
    measured_rss = lat.peak_rss_mb.max() if "peak_rss_mb" in lat and lat.peak_rss_mb.notna().any() else None
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
        results = run_queue(cpusets, throughput_item, items)
        ok = [r for r in results if r.status == "ok"]
        for r in results:
            value = r.value or {}
            items_rows.append({**base, "case_id": items[r.index][3], "output": items[r.index][5],
                               "worker": r.worker, "worker_cpus": format_cpu_list(r.cpus or []),
                               "status": r.status, "error": r.error or "",
                               "start": value.get("start"), "end": value.get("end"),
                               "wall_s": (value["end"] - value["start"]) if value else np.nan,
                               **{k: v for k, v in (value.get("timings") or {}).items() if k != "wall_s"},
                               "build_s": value.get("build_s"), "peak_rss_mb": r.peak_rss_mb,
                               "child_affinity": format_cpu_list(value.get("affinity", []))})
        if ok:
            span = max(r.value["end"] for r in ok) - min(r.value["start"] for r in ok)
            walls = [r.value["end"] - r.value["start"] for r in ok]
            median, p25, p75 = _spread(walls)
            rss = [r.peak_rss_mb for r in ok if r.peak_rss_mb]
            combos.append({**base, "status": "ok" if len(ok) == len(results) else "partial",
                           "source": "measured (run_queue)", "items": len(ok), "makespan_s": span,
                           "cases_per_hour": 3600.0 * len(ok) / span if span > 0 else np.nan,
                           "latency_median_s": median, "latency_p25_s": p25, "latency_p75_s": p75,
                           "peak_rss_mb_max": max(rss) if rss else np.nan,
                           "message": "; ".join(sorted({r.error for r in results if r.error}))})
        else:
            combos.append({**base, "status": "error", "source": "measured (run_queue)",
                           "message": "; ".join(sorted({r.error or "?" for r in results}))})
        if bar is not None:
            bar.update()
    return pd.DataFrame(combos), pd.DataFrame(items_rows)


# ----------------------------------------------------------------------------- cold start

def segment_argv(inputs: list[str], out_dir: str, variant: str, threads: int, extra: list[str] = ()) -> list[str]:
    return [sys.executable, str(SCRIPT), "segment", *inputs, "-o", out_dir, "--variant", variant,
            "--threads", str(threads), *extra]


def reproduce_command(cpus: list[int], variant: str, threads: int, inputs: str = "IN.nii.gz",
                      out: str = "OUT_DIR") -> str:
    """The exact command line that reproduces a pinned setting (python as `python`)."""
    argv = ["python", SCRIPT.name, "segment", inputs, "-o", out, "--variant", variant, "--threads", str(threads)]
    return shell_command(taskset_command(cpus, argv, with_thread_env=True))


def cold_start(case, variant: str, threads: int, cpus: list[int], tmp_root: Path) -> dict:
    """Time from spawning a fresh `segment` process (taskset-pinned) to its output file appearing."""
    from common.production.pinning import thread_env

    with tempfile.TemporaryDirectory(dir=tmp_root, prefix=".cold_") as tmp:
        timings_json = Path(tmp) / "timings.json"
        argv = segment_argv([str(case.image)], str(Path(tmp) / "out"), variant, threads,
                            ["--no-progress", "--timings-json", str(timings_json)])
        env = {**os.environ, **thread_env(threads)}
        if shutil.which("taskset"):
            command = taskset_command(cpus, argv)
        else:
            command = argv[:3] + ["--cpus", format_cpu_list(cpus)] + argv[3:]
        output = Path(tmp) / "out" / f"{_stem(case.image)}.nii.gz"
        t0 = time.time()
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   cwd=paths.REPO_ROOT)
        first_output = None
        while process.poll() is None:
            if first_output is None and output.exists():
                first_output = time.time()
            time.sleep(0.02)
        exit_s = time.time() - t0
        if first_output is None and output.exists():
            first_output = time.time()
        _, stderr = process.communicate()
        row = {"variant": variant, "threads": threads, "cpus": format_cpu_list(cpus), "case_id": case.case_id,
               "command": shell_command(command), "returncode": process.returncode, "process_exit_s": exit_s,
               "to_first_output_s": (first_output - t0) if first_output else np.nan}
        if process.returncode != 0 or first_output is None:
            lines = [line for line in stderr.splitlines() if line.startswith("error")] or stderr.splitlines()[-1:]
            row.update(status="error", error=(lines[0] if lines else f"exit code {process.returncode}")[:300])
            return row
        row["status"] = "ok"
        row["error"] = ""
        try:
            info = json.loads(timings_json.read_text())
            row["startup_imports_s"] = info["imports_done"] - t0
            row["session_s"] = info["session_s"]
            row["segment_s"] = info["files"][0]["wall_s"] if info["files"] else np.nan
        except (OSError, ValueError, KeyError, IndexError):
            pass
        return row


def _stem(path) -> str:
    from common.production.segment_cli import nifti_stem

    return nifti_stem(Path(path))


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
            parity = choice.table.set_index("variant").parity.get(choice.approximate, np.nan) \
                if not choice.table.empty else np.nan
            text.append(f"The approximate variant `{choice.approximate}` ran at {ap.median_s:.2f} s "
                        f"({ratio:.2f}x the exact `{choice.exact}`), with voxel parity "
                        f"{'not measured' if pd.isna(parity) else f'{parity:.4f}'} vs vanilla in 05: "
                        + ("use it only where that drift is acceptable." if ratio > 1.0 else
                           "it is not faster here, keep the exact variant."))
    cold_ok = cold[cold.status == "ok"] if not cold.empty else cold
    if not cold_ok.empty:
        c = cold_ok.iloc[0]
        warm = ok_lat[(ok_lat.variant == c.variant) & (ok_lat.threads == c.threads)]
        warm_s = f" against {warm.iloc[0].median_s:.2f} s warm" if not warm.empty else ""
        text.append(f"A cold start (new process to first output written, imports and session build included) took "
                    f"{c.to_first_output_s:.2f} s{warm_s}: keep long-lived pinned workers rather than one process "
                    "per case" + ("." if c.to_first_output_s > 1.2 * (warm.iloc[0].median_s if not warm.empty else 0)
                                  else " (here the difference is small)."))
    if env.get("weights_kind") == "stand-in":
        text.append("These are speed numbers with stand-in weights: the layout advice holds, the labels are not "
                    "clinically meaningful.")
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
            for key in ("wall_s", "load_s", "preprocess_s", "inference_s", "postprocess_s", "save_s", "n_tiles",
                        "peak_rss_mb"):
                if key in run and not pd.isna(run[key]):
                    row[key] = run[key]
            try:
                row.update(score(by_id[run["case_id"]], Path(run["output"]), out_dir, is_reference=False))
            except Exception as exc:  # noqa: BLE001 - a scoring problem must not hide the timing
                row["error"] = f"scoring failed: {type(exc).__name__}: {exc}"[:300]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- plots and report

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


def _f(value, digits=2) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def write_report(path: Path, *, topology: Topology, env: dict, settings: Settings, choice: VariantChoice,
                 latency: pd.DataFrame, throughput: pd.DataFrame, cold: pd.DataFrame,
                 rec: Recommendation | None, plots: dict, elapsed_s: float) -> Path:
    from common.reports.report import write_text_atomic
    from common.model.weights import weights_banner

    cases = ", ".join(f"{c.case_id} ({'x'.join(map(str, c.shape))})" for c in settings.cases)
    variants = ", ".join(f"{v} ({settings.tiers.get(v, '?')})" for v in settings.variants)
    lines = ["# 06 Linux production benchmark", "", weights_banner(), "",
             f"- CPU: {topology.model_name}; affinity {format_cpu_list(topology.cpus)} ({len(topology.cpus)} CPUs)",
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
            lines.append(f"| {r.variant} | {r.tier} | {r.threads} | {r.cpus} | {r.runs} | {_f(r.median_s)} | "
                         f"{_f(r.p25_s)}–{_f(r.p75_s)} | {_f(r.min_s)}–{_f(r.max_s)} | {_f(r.inference_s)} | "
                         f"{_f(r.build_s)} | {_f(r.peak_rss_mb, 0)} | {r.status}{': ' + r.error if r.error else ''} |")
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
                         f"{_f(r.get('cases_per_hour'), 0)} | {r.get('items', '–') if not pd.isna(r.get('items', np.nan)) else '–'} | "
                         f"{_f(r.get('makespan_s'))} | {_f(r.get('latency_median_s'))} "
                         f"({_f(r.get('latency_p25_s'))}–{_f(r.get('latency_p75_s'))}) | "
                         f"{_f(r.get('peak_rss_mb_max'), 0)} | {r['status']} | "
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
                         f"{_f(r.get('to_first_output_s'))} | {_f(r.get('process_exit_s'))} | "
                         f"{_f(r.get('startup_imports_s'))} | {_f(r.get('session_s'))} | {_f(r.get('segment_s'))} | "
                         f"{r['status']}{': ' + r['error'] if r.get('error') else ''} |")
        lines += ["", f"Command: `{cold.iloc[0]['command']}`"]
    lines += ["", "## Files", "",
              "- `production_results.csv`: the recommended configuration's per-case runs (SUMMARY.md row)",
              "- `production_latency_sweep.csv`, `production_throughput_sweep.csv`, `production_throughput_items.csv`, "
              "`production_cold_start.csv`: every measurement", "",
              "## Environment", "", "```", *[f"{k}: {v}" for k, v in env.items()],
              f"topology: {json.dumps(topology.summary())}", "```"]
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
                      "Use the result with `python 06_linux_production_benchmark.py segment IN.nii.gz -o OUT_DIR` "
                      "(README).", ""])
