"""``06 ... segment --engine ray``: the command-line side of totalseg_fast.engines.ray_engine.

Exit codes as the local engine: 0 all written (or kept by --resume), 1 some input failed, 2 a usage
or setup error (no cluster at --address, no node that can hold one worker, an unknown variant, the
cluster lost mid-cohort), 130 interrupted (rerun with --resume to keep what was finished).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

PIPELINE_HOOK = "TSBENCH_RAY_PIPELINE"  # test hook: "module:function" pipeline factory (see ray_worker)


def _err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def plan_jobs(files: list[Path], out_dir: Path) -> tuple[list, list[tuple[str, str]]]:
    """(jobs, (input, reason) errors): the local engine's checks, before anything runs."""
    from totalseg_fast.engines.ray_engine import Job
    from totalseg_fast.inputs import output_for

    jobs, errors, seen = [], [], {}
    for path in files:
        output = output_for(path, out_dir)
        if output.resolve() == path.resolve():
            errors.append((str(path), "output would overwrite the input: choose another -o folder"))
        elif output in seen:
            errors.append((str(path), f"same output name as {seen[output]} ({output.name}): rename one of them"))
        else:
            seen[output] = path
            jobs.append(Job(str(path), str(output)))
    return jobs, errors


def segment_on_ray(args) -> int:
    from totalseg_fast.engines import ray_cluster
    from totalseg_fast.engines.ray_cluster import ClusterError
    from totalseg_fast.engines.ray_engine import (RESULTS, EngineSettings, WorkerStartError, finished, read_manifest,
                                              write_results)
    from totalseg_fast.inputs import default_variant, expand_inputs

    address = args.address or os.environ.get("RAY_ADDRESS") or None
    threads = args.threads or 1
    if threads < 1 or (args.workers is not None and args.workers < 1):
        _err("--threads and --workers must be >= 1")
        return 2
    if args.cpus:
        _err("--cpus is for --engine local: Ray workers pin themselves to CPU sets of each node")
        return 2
    files, errors = expand_inputs(args.inputs)
    for item, reason in errors:
        _err(f"{item}: {reason}")
    from common.variants.table import get_variant

    note = ""
    name = args.variant
    if name is None:
        name, note = default_variant()
    try:
        get_variant(name)
    except KeyError as exc:
        _err(exc.args[0])
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    jobs, bad = plan_jobs(files, args.output)
    for item, reason in bad:
        _err(f"{item}: {reason}")
    failed = len(errors) + len(bad)
    kept = []
    if args.resume:
        entries = read_manifest(args.output)
        kept = [job for job in jobs if finished(job, entries)]
        jobs = [job for job in jobs if job not in kept]
        print(f"segment: --resume keeps {len(kept)} finished output(s) (input content hash unchanged), "
              f"{len(jobs)} to do", file=sys.stderr)
    memory_mb, memory_note = (args.worker_memory_mb, "--worker-memory-mb") if args.worker_memory_mb \
        else ray_cluster.worker_memory_mb(name)

    rows = [{"input": j.input, "output": j.output, "status": "kept", "error": "", "attempts": 0} for j in kept]
    connection = None
    started = time.time()
    try:
        if jobs:
            try:
                connection = ray_cluster.connect(address)
                import ray

                cpus = int(ray.cluster_resources().get("CPU", 0))
                workers = args.workers or max(1, cpus // threads)
                workers, notes = ray_cluster.plan_workers(min(workers, len(jobs)), threads, memory_mb)
            except ClusterError as exc:
                _err(str(exc))
                return 2
            print(f"segment: Ray {connection.mode} at {connection.address} (ray.init {connection.startup_s:.1f} s); "
                  f"{workers} worker(s) x {threads} thread(s), variant {name}, {memory_mb:.0f} MB per worker "
                  f"({memory_note})" + (f"; {note}" if note else ""), file=sys.stderr)
            for line in connection.notes + notes:
                print(f"segment: {line}", file=sys.stderr)
            settings = EngineSettings(variant=name, workers=workers, threads=threads, memory_mb=memory_mb,
                                      factory=os.environ.get(PIPELINE_HOOK) or None, prefetch=not args.no_prefetch)
            try:
                _run_with_bar(jobs, settings, args, rows)
            except (WorkerStartError, ClusterError) as exc:
                _err(str(exc))
                return 2
    except KeyboardInterrupt:
        _err("interrupted: finished outputs are kept; rerun with --resume to do the rest")
        return 130
    finally:
        ray_cluster.shutdown(connection)
        if rows:
            write_results(rows, args.results_csv or args.output / RESULTS)
    failed += sum(1 for r in rows if r["status"] == "error")
    total = len(files) + len(errors)
    written = sum(1 for r in rows if r["status"] in ("ok", "kept"))
    print(f"segment: {written} of {total} inputs written to {args.output}"
          + (f" ({len(kept)} kept from an earlier run)" if kept else "") + (f", {failed} failed" if failed else "")
          + f" in {time.time() - started:.1f} s", file=sys.stderr)
    return 1 if failed else 0


def _run_with_bar(jobs: list, settings, args, rows: list[dict]) -> None:
    """Runs the cohort; each finished row is appended to ``rows`` at once, so an interrupted run keeps them."""
    from tqdm import tqdm

    from totalseg_fast.engines.ray_engine import run_cohort

    counts = {"done": 0, "failed": 0}
    bar = tqdm(total=len(jobs), desc="segment (ray)", unit="case", disable=args.no_progress, file=sys.stderr)

    def on_row(row: dict) -> None:
        rows.append(row)
        if row["status"] == "ok":
            counts["done"] += 1
            bar.write(f"ok: {row['input']} -> {row['output']} ({row.get('end', 0) - row.get('start', 0):.1f} s, "
                      f"{row.get('node')} CPUs {','.join(map(str, row.get('cpus') or []))})", file=sys.stderr)
        else:
            counts["failed"] += 1
            bar.write(f"error: {row['input']}: {row['error']}", file=sys.stderr)
        bar.set_postfix(counts)
        bar.update()

    try:
        run_cohort(jobs, settings, args.output, on_row, log=lambda m: bar.write(f"segment: {m}", file=sys.stderr))
    finally:
        bar.close()
