"""Flags and the run-and-report flow shared by the benchmark scripts 03 to 06."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from common.core import paths
from common.core.env import default_threads


def add_benchmark_args(parser: argparse.ArgumentParser, repeats: int = 1, warmup: int = 0) -> None:
    parser.add_argument("--manifest", type=Path, default=paths.DEFAULT_MANIFEST,
                        help="cases to run (written by 01_download_data.py; default: %(default)s)")
    parser.add_argument("--cases", default="", help="comma-separated case ids (default: all in the manifest)")
    parser.add_argument("--max-cases", type=int, default=0, help="run only the first N cases (0 = all)")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed runs per case (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed runs before timing (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="threads for every runtime (default: CPUs in the affinity mask = %(default)s)")
    parser.add_argument("--out", type=Path, default=paths.BENCHMARKS_DIR,
                        help="report folder; label outputs go to OUT/outputs (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def select_cases(args, pick_default: Callable[[list], list] | None = None) -> list:
    """The manifest's cases named by --cases; otherwise `pick_default(cases)` or the first --max-cases."""
    from common.data.cases import DataError, read_manifest

    if not Path(args.manifest).is_file():
        raise SystemExit(f"error: manifest {args.manifest} not found: run `python 01_download_data.py` first")
    try:
        cases = read_manifest(args.manifest)
    except (DataError, OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"error: cannot read manifest {args.manifest}: {exc}")
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
        known = {c.case_id: c for c in cases}
        unknown = [c for c in wanted if c not in known]
        if unknown:
            raise SystemExit(f"error: unknown case ids {', '.join(unknown)} (manifest has {', '.join(known)})")
        cases = [known[c] for c in wanted]
    elif pick_default is not None:
        cases = pick_default(cases)
    if args.max_cases and pick_default is None:
        cases = cases[:args.max_cases]
    if not cases:
        raise SystemExit("error: no cases selected")
    return cases


def prepare_runners(args, make: Callable[[], tuple[list, list[str]]]) -> tuple[list, list[str]]:
    """Check the cases first (before any model loads), then build the runners; one error line on failure."""
    from common.model.weights import WeightsError

    select_cases(args)
    try:
        runners, notes = make()
    except WeightsError as exc:
        raise SystemExit(f"error: {exc}")
    if not runners:
        raise SystemExit("error: nothing to run")
    return runners, notes


def run_and_report(args, runners: list, title: str, report_name: str,
                   notes: list[str] = (), extra_setup: Callable[[], None] | None = None) -> int:
    """Run the runners on the selected cases, write one CSV per implementation, the report and SUMMARY.md."""
    from common.core.env import apply_threads, environment_record
    from common.harness import bench
    from common.reports import report

    apply_threads(args.threads)
    cases = select_cases(args)
    environment = environment_record(args.threads)
    implementations = sorted({r.implementation for r in runners})

    def save(rows):
        for impl in implementations:
            impl_rows = [r for r in rows if r["implementation"] == impl]
            if impl_rows:
                report.write_results(impl_rows, report.results_path(args.out, impl))

    try:
        rows = bench.run_benchmark(runners, cases, repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                                   environment=environment, out_dir=args.out, on_rows=save,
                                   progress=not args.no_progress)
    finally:
        for runner in runners:
            if runner.close:
                runner.close()
    import pandas as pd

    frame = pd.DataFrame(rows).reindex(columns=bench.RESULT_COLUMNS)
    path = report.write_script_report(args.out / report_name, title, frame, environment, notes)
    summary = report.write_summary(args.out, environment)
    for row in rows:
        if row["status"] != "ok":
            print(f"error: {row['case_id']} ({row['implementation']} {row['variant']}): {row['error']}",
                  file=sys.stderr)
    print(f"Wrote {path} and {summary}")
    return 1 if bench.any_failed(rows) else 0
