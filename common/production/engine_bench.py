"""06 ``--engines ray,ray-noprefetch``: Ray's start-up, its own memory, the prefetch gain and the N-node projection.

Each repeat runs the same cohort and W x T on a fresh embedded Ray instance (``ray_cohort.run_measured``),
the engines alternating order from repeat to repeat. Reported per run: cases/hour over the whole cohort
(actors' start, pipeline build and warm-up included; ``ray.init`` not) and in steady state (first case start
to last case end), Ray's start-up time and the RSS of Ray's own processes. ``ray-noprefetch`` is Ray without
the actor's read-ahead of its next case: the prefetch's gain. The projection for N nodes uses Ray's measured
per-worker throughput and the bytes each case reads and writes on shared storage.

The local process pool this section once compared Ray with is deleted: on this machine Ray came within 3 %
of it (README, "Cohorts on Ray"), so one engine is enough.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

NODE_COUNTS = (1, 2, 5, 10)
NOISY_SPREAD = 1.5  # an engine's fastest repeat over its slowest, beyond which no verdict is drawn


def cohort(cases: list, workers: int, out_dir: Path, engine: str, repeat: int) -> list[tuple[str, str, str]]:
    """(case_id, input, output): every case, cycled to at least 2 per worker, one output folder per run."""
    folder = Path(out_dir) / "outputs" / "production" / "engines" / f"{engine}_r{repeat}"
    folder.mkdir(parents=True, exist_ok=True)
    n = max(len(cases), 2 * workers)
    return [(cases[i % len(cases)].case_id, str(cases[i % len(cases)].image),
             str(folder / f"{cases[i % len(cases)].case_id}__{i}.nii.gz")) for i in range(n)]


def _ray(items, variant, workers, threads, warmup, out_dir, prefetch: bool = True) -> dict:
    from totalseg_fast.engines import ray_cluster
    from common.production.ray_cohort import embedded_ray, run_measured

    with embedded_ray() as connection:
        ray_rss = ray_cluster.ray_system_rss_mb()
        memory_mb, _ = ray_cluster.worker_memory_mb(variant, out_dir)
        run = run_measured(items, variant, workers, threads, memory_mb, bool(warmup), prefetch)
    ok = run.ok
    return {"ok": len(ok), "wall_s": run.wall_s, "steady_s": run.steady_s, "startup_s": connection.startup_s,
            "ray_rss_mb": ray_rss, "worker_peak_rss_mb": max((r.get("peak_rss_mb") or 0 for r in ok), default=np.nan),
            "input_mb": np.mean([r["input_bytes"] for r in ok]) / 2**20 if ok else np.nan,
            "output_mb": np.mean([r["output_bytes"] for r in ok]) / 2**20 if ok else np.nan,
            "prefetched": sum(bool(r.get("prefetched")) for r in ok),
            "load_s": float(np.median([r.get("load_s") or 0 for r in ok])) if ok else np.nan,
            "error": "; ".join(sorted({r["error"] for r in run.rows if r["status"] != "ok"}))}


def compare_engines(engines: list[str], cases: list, variant: str, workers: int, threads: int, repeats: int,
                    warmup: int, out_dir: Path, log=print) -> pd.DataFrame:
    """One row per (repeat, engine): cases/hour over the cohort and in steady state, and Ray's costs."""
    rows = []
    for repeat in range(repeats):
        order = engines if repeat % 2 == 0 else engines[::-1]
        for engine in order:
            items = cohort(cases, workers, out_dir, engine, repeat)
            base = {"engine": engine, "repeat": repeat, "variant": variant, "workers": workers, "threads": threads,
                    "items": len(items)}
            log(f"engines: repeat {repeat + 1}/{repeats}, {engine}, {workers}x{threads}, {len(items)} cases")
            try:
                result = _ray(items, variant, workers, threads, warmup, out_dir, engine != "ray-noprefetch")
            except Exception as exc:  # noqa: BLE001 - one engine failing leaves the other's numbers
                rows.append({**base, "status": "error", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"})
                continue
            status = "ok" if result["ok"] == len(items) else ("partial" if result["ok"] else "error")
            rows.append({**base, **result, "status": status,
                         "cases_per_hour": 3600 * result["ok"] / result["wall_s"] if result["ok"] else np.nan,
                         "steady_cases_per_hour": 3600 * result["ok"] / result["steady_s"] if result["ok"] else np.nan})
    return pd.DataFrame(rows)


def _f(value, digits: int = 1) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def engines_markdown(frame: pd.DataFrame) -> str:
    """The report section: per-run table, Ray's costs, the prefetch gain and the N-node projection."""
    lines = ["## Ray: start-up, memory, prefetch and scaling (same cohort, same W x T, interleaved)", ""]
    if frame.empty:
        return "\n".join(lines + ["Not measured (run with `--engines ray,ray-noprefetch`).", ""])
    lines += ["| Repeat | Engine | W x T | Cases | Cohort wall (s) | Cases/hour (cohort) | Cases/hour (steady) | "
              "ray.init (s) | Ray processes RSS (MB) | Status |",
              "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in frame.to_dict("records"):
        lines.append(f"| {r['repeat'] + 1} | {r['engine']} | {r['workers']}x{r['threads']} | {r.get('ok', 0):.0f}/"
                     f"{r['items']} | {_f(r.get('wall_s'))} | {_f(r.get('cases_per_hour'), 0)} | "
                     f"{_f(r.get('steady_cases_per_hour'), 0)} | {_f(r.get('startup_s'))} | "
                     f"{_f(r.get('ray_rss_mb'), 0)} | "
                     f"{r['status']}{': ' + r['error'] if isinstance(r.get('error'), str) and r['error'] else ''} |")
    ok = frame[frame.status == "ok"]
    med = ok.groupby("engine")[["cases_per_hour", "steady_cases_per_hour"]].median() if not ok.empty else None
    lines += ["", "Cohort wall = the engine's call, actors' start, pipeline build and warm-up included (`ray.init` "
              "excluded: it is the ray.init column); steady = first case start to last case end. The local process "
              "pool is not a row: it was deleted once Ray measured within 3 % of it on this machine "
              "([engines_local_vs_ray.md](engines_local_vs_ray.md), kept as measured)."]
    if med is not None and {"ray", "ray-noprefetch"} <= set(med.index):
        spread = ok.groupby("engine").steady_cases_per_hour.agg(lambda v: v.max() / v.min() if len(v) > 1 else 1.0)
        gain = 100 * (med.loc["ray", "steady_cases_per_hour"] / med.loc["ray-noprefetch", "steady_cases_per_hour"] - 1)
        load = ok[ok.engine == "ray-noprefetch"].load_s.median()
        lines.append(f"- Prefetch of the next case (read + decode while the network runs): {gain:+.1f} % steady "
                     f"cases/hour vs Ray without it (reading took {load:.2f} s per case here).")
        if spread.max() > NOISY_SPREAD:
            lines.append(f"- **Not conclusive:** one engine's repeats differ by {spread.max():.1f}x (more than "
                         f"{NOISY_SPREAD}x): the machine was not quiet. Rerun on an otherwise idle machine.")
    ray_ok = ok[ok.engine == "ray"]
    if not ray_ok.empty:
        lines += [f"- Ray start-up (`ray.init`, embedded): median {ray_ok.startup_s.median():.1f} s; Ray's own "
                  f"processes {ray_ok.ray_rss_mb.median():.0f} MB RSS (GCS, raylet, agents; actors not counted), "
                  f"workers' peak RSS {ray_ok.worker_peak_rss_mb.max():.0f} MB each.", ""]
        lines += projection_markdown(ray_ok)
    return "\n".join(lines + [""])


def projection_markdown(ray_ok: pd.DataFrame) -> list[str]:
    workers = int(ray_ok.workers.iloc[0])
    per_worker = float(ray_ok.steady_cases_per_hour.median()) / workers
    per_case_mb = float(ray_ok.input_mb.median() + ray_ok.output_mb.median())
    lines = ["### Scaling projection (N nodes like this one, shared storage)", "",
             f"From Ray's measured steady throughput: {per_worker:.0f} cases/hour per worker, {workers} worker(s) "
             f"per node; each case reads {ray_ok.input_mb.median():.1f} MB and writes {ray_ok.output_mb.median():.2f} MB "
             "on the shared path. Assumes the cohort's cases are like the measured one and the storage keeps up.", "",
             "| Nodes | Workers | Cases/hour | 5,000 CTs take (h) | Shared-storage traffic (MB/s) |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for n in NODE_COUNTS:
        rate = per_worker * workers * n
        lines.append(f"| {n} | {n * workers} | {rate:.0f} | {5000 / rate:.1f} | {rate * per_case_mb / 3600:.2f} |")
    return lines + ["", "Real cohorts' CTs are larger than the measured case (a 512x512x300 int16 CT is ~150 MB "
                    "uncompressed, 40-80 MB gzipped): scale the traffic column by the cohort's mean file size."]
