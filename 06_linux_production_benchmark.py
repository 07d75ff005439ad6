#!/usr/bin/env python3
"""06: the best variants under Linux production conditions, and the winner as a tool.

Benchmark mode (default):
    python 06_linux_production_benchmark.py [--max-cases N] [--repeats R] [--max-threads N] ...
  reads the CPU topology (affinity, SMT, L3 domains, NUMA), sweeps the best exact and approximate
  variants of 05 over 1..N pinned threads (latency), W workers x T threads on disjoint L3-aware
  CPU sets (throughput, cases/hour), measures a cold start (new process to first output) and the
  peak RSS per worker, and writes benchmarks/production_report.md (+ PNG plots, sweep CSVs,
  production_results.csv) and SUMMARY.md with a recommendation derived from the numbers.

  Then the tool against TotalSegmentator's CLI (--tool-vs-ts): each a fresh process on the first case, as
  NIfTI and as a DICOM folder, --ml and folder mode, interleaved: wall time, peak memory, identical or not.

Segment mode (the study's result as a tool) is `totalseg_fast` (totalseg_fast/cli.py), the same code:
    python 06_linux_production_benchmark.py segment -i IN.nii.gz -o OUT [--ml] [-s] [-rs NAMES] ...

Heavy imports live inside functions: pinned children (multiprocessing "spawn") re-import this file.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from common.core import paths

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, default=paths.DEFAULT_MANIFEST,
                        help="cases (written by 01_download_data.py; default: %(default)s)")
    parser.add_argument("--cases", default="", help="comma-separated case ids (default: the smallest --max-cases)")
    parser.add_argument("--max-cases", type=int, default=1,
                        help="number of smallest cases (by voxel count) when --cases is not given (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per case and point (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed runs in each pinned process before timing (default: %(default)s)")
    parser.add_argument("--max-threads", type=int, default=0,
                        help="largest thread count / CPUs used (default: all CPUs in the affinity mask)")
    parser.add_argument("--threads-list", default="",
                        help="thread counts to sweep, e.g. 1,2,4,8 (default: 1..N, or powers of two + L3/NUMA "
                             "sizes + N on large machines)")
    parser.add_argument("--combos", default="",
                        help="W x T combinations for the throughput sweep, e.g. 2x1,1x2 (default: W = N // T "
                             "for every swept T)")
    parser.add_argument("--variants", default="",
                        help="variants to sweep, comma-separated (default: best exact and best approximate "
                             "from 05's results, else exact_ort_default); the first one is used for the throughput sweep")
    parser.add_argument("--cold-repeats", type=int, default=1, help="cold starts to measure (default: %(default)s)")
    parser.add_argument("--memory-limit-mb", type=float, default=None,
                        help="memory available to workers (default: what the OS reports available); a W that "
                             "would not fit is refused")
    parser.add_argument("--engines", default="",
                        help="also measure Ray's start-up, memory and prefetch gain on one cohort: ray,ray-noprefetch "
                             "(ray-noprefetch = Ray without the read-ahead; default: off; see the report's Ray section)")
    parser.add_argument("--engine-combo", default="",
                        help="W x T for --engines (default: the largest W of the swept combos with the smallest T)")
    parser.add_argument("--engine-repeats", type=int, default=3, help="repeats for --engines (default: %(default)s)")
    parser.add_argument("--tool-vs-ts", default="ml,folder",
                        help="modes in which the tool is timed against TotalSegmentator's CLI (fresh processes, "
                             "interleaved, on the first case, as NIfTI and as a DICOM folder): ml,folder, or none "
                             "(default: %(default)s)")
    parser.add_argument("--tool-repeats", type=int, default=1,
                        help="repeats of that comparison (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=paths.BENCHMARKS_DIR, help="report folder (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def select_cases(args) -> list:
    from common.harness import cli
    from common.production.sweeps import smallest_cases

    cases = cli.select_cases(args, lambda found: smallest_cases(found, max(1, args.max_cases)))
    missing = [str(c.image) for c in cases if not Path(c.image).is_file()]
    if missing:
        raise SystemExit(f"error: case images missing: {', '.join(missing)}")
    return cases


class UsageError(Exception):
    """A bad option or an unusable models/ folder: one `error:` line and exit code 2."""


def plan_run(args) -> dict:
    """What to sweep: topology, thread counts, W x T combos, engines, variants (UsageError if unusable)."""
    from common.model.onnx_meta import check_current_model
    from common.model.weights import WeightsError
    from common.production import sweeps
    from common.variants.choice import choose_variants
    from common.core.topology import read_topology
    from common.variants.table import get_variant

    if args.repeats < 1 or args.warmup < 0 or args.cold_repeats < 0 or args.max_threads < 0:
        raise UsageError("--repeats must be >= 1, --warmup, --cold-repeats and --max-threads >= 0")
    topology = read_topology()
    n_cpus = min(args.max_threads or len(topology.cpus), len(topology.cpus))
    try:
        thread_counts = sorted({int(t) for t in args.threads_list.split(",") if t.strip()}) if args.threads_list \
            else sweeps.default_thread_counts(topology, n_cpus)
        combos = sweeps.parse_combos(args.combos) if args.combos \
            else sweeps.default_combos(thread_counts, n_cpus)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    bad = [t for t in thread_counts if t < 1 or t > len(topology.cpus)]
    if bad:
        raise UsageError(f"thread counts {bad} outside 1..{len(topology.cpus)} (CPUs in the affinity mask)")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if "local" in engines:
        raise UsageError("--engines: the local process pool is gone (Ray measured within 3 % of it; README, "
                         "'Cohorts on Ray'); use --engines ray,ray-noprefetch")
    if set(engines) - {"ray", "ray-noprefetch"} or args.engine_repeats < 1:
        raise UsageError(f"--engines takes ray, ray-noprefetch (got {args.engines!r}); "
                         "--engine-repeats must be >= 1")
    try:
        engine_combo = sweeps.parse_combos(args.engine_combo)[0] if args.engine_combo \
            else max(combos, key=lambda wt: (-wt[1], wt[0]))
    except (ValueError, IndexError) as exc:
        raise UsageError(f"--engine-combo: {exc}") from None
    if engines and engine_combo[0] * engine_combo[1] > len(topology.cpus):
        raise UsageError(f"--engine-combo {engine_combo[0]}x{engine_combo[1]}: more CPUs than the affinity mask holds")

    choice = choose_variants(args.out)
    if args.variants:
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        choice.note = f"variants chosen with --variants ({choice.note})"
    else:
        names = [choice.exact] + ([choice.approximate] if choice.approximate else [])
    try:
        tiers = {get_variant(name).name: get_variant(name).tier for name in names}
        check_current_model()
    except KeyError as exc:
        raise UsageError(exc.args[0]) from None
    except WeightsError as exc:
        raise UsageError(str(exc)) from None
    return dict(topology=topology, n_cpus=n_cpus, thread_counts=thread_counts, combos=combos, engines=engines,
                engine_combo=engine_combo, choice=choice, names=list(tiers), tiers=tiers)


def measure(args, plan: dict, settings) -> dict:
    """The sweeps, in order, each CSV written as soon as it is measured: latency, throughput, cold start, engines."""
    import pandas as pd
    from tqdm import tqdm

    from common.production import sweeps
    from common.production.cold_start import cold_start
    from common.core.topology import plan_worker_cpusets
    from common.reports import report

    topology, names, cases, engines = plan["topology"], plan["names"], settings.cases, plan["engines"]

    def write_csv(frame, name: str) -> None:
        report.write_text_atomic(args.out / name, frame.to_csv(index=False, float_format="%.6g"))

    total = len(names) * len(plan["thread_counts"]) + len(plan["combos"]) + args.cold_repeats \
        + len(engines) * args.engine_repeats
    with tqdm(total=total, desc="06 production", unit="step", disable=args.no_progress) as bar:
        latency = sweeps.latency_sweep(settings, topology, bar)
        write_csv(latency, "production_latency_sweep.csv")
        throughput, items = sweeps.throughput_sweep(settings, topology, names[0], latency, bar,
                                                    log=lambda m: bar.write(m, file=sys.stderr))
        write_csv(throughput, "production_throughput_sweep.csv")
        write_csv(items, "production_throughput_items.csv")
        table = sweeps.latency_table(latency) if not latency.empty else pd.DataFrame()
        cold_rows = []
        ok_lat = table[(table.status == "ok") & (table.variant == names[0])] if not table.empty else table
        if args.cold_repeats and not ok_lat.empty:
            best = ok_lat.sort_values("median_s").iloc[0]
            cpus = plan_worker_cpusets(topology, 1, int(best.threads))[0]
            for _ in range(args.cold_repeats):
                bar.set_postfix_str(f"cold start {names[0]} T={int(best.threads)}")
                cold_rows.append(cold_start(cases[0], names[0], int(best.threads), cpus, args.out))
                bar.update()
        cold = pd.DataFrame(cold_rows)
        write_csv(cold, "production_cold_start.csv")
        engine_runs = pd.DataFrame()
        if engines:
            from common.production.engine_bench import compare_engines

            def engine_log(message: str) -> None:
                bar.set_postfix_str(message)
                if message.startswith("engines: repeat") and bar.n < bar.total:
                    bar.update()

            engine_runs = compare_engines(engines, cases, names[0], *plan["engine_combo"], args.engine_repeats,
                                          args.warmup, args.out, log=engine_log)
            write_csv(engine_runs, "production_engines.csv")
    tool_rows = []
    modes = [m for m in args.tool_vs_ts.split(",") if m and m != "none"]
    if modes and cases:
        import tempfile

        from common.production.tool_vs_ts import compare

        threads = max(plan["thread_counts"])
        with tempfile.TemporaryDirectory(dir=args.out, prefix=".tool_vs_ts_") as work:
            tool_rows = compare(cases[0].case_id, Path(cases[0].image), threads, Path(work), args.tool_repeats,
                                modes, log=lambda m: print(f"06: {m}", file=sys.stderr))
        write_csv(pd.DataFrame(tool_rows), "production_tool_vs_totalsegmentator.csv")
    return dict(latency=latency, throughput=throughput, items=items, table=table, cold=cold,
                engine_runs=engine_runs, tool_rows=tool_rows)


def failures(measured: dict) -> list[str]:
    """One line per failed point of every sweep (printed as `error:` lines; any makes the exit code 1)."""
    latency, throughput, cold, engine_runs = (measured[k] for k in ("latency", "throughput", "cold", "engine_runs"))
    errors = []
    if not latency.empty:
        errors += [f"latency {r.variant} T={r.threads}: {r.error}" for r in latency.itertuples() if r.status != "ok"]
    if not throughput.empty:
        errors += [f"throughput {r.workers}x{r.threads}: {r.message}" for r in throughput.itertuples()
                   if r.status in ("error", "partial")]
    if not cold.empty:
        errors += [f"cold start: {r.error}" for r in cold.itertuples() if r.status != "ok"]
    if not engine_runs.empty:
        errors += [f"engines {r.engine} repeat {r.repeat + 1}: {r.error}" for r in engine_runs.itertuples()
                   if r.status != "ok"]
    errors += [f"tool vs TotalSegmentator {r['tool']} {r['kind']} {r['mode']}: {r['error']}"
               for r in measured.get("tool_rows", []) if r["returncode"] != 0]
    errors += [f"tool vs TotalSegmentator {r['kind']} {r['mode']}: outputs not identical ({r['detail']})"
               for r in measured.get("tool_rows", []) if r["tool"] == "totalseg_fast" and r["returncode"] == 0
               and not r.get("identical", True)]
    return errors


def benchmark(argv=None) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    try:
        plan = plan_run(args)
    except UsageError as exc:
        return fail(str(exc))

    from common.core.env import environment_record
    from common.production import sweeps
    from common.production.engine_bench import engines_markdown
    from common.production.tool_vs_ts import markdown as tool_markdown
    from common.production.recommend import production_rows, recommend, reproduce_lines
    from common.production.report import plot_latency, plot_throughput, recommendation_markdown, write_report
    from common.reports import report

    topology, names, choice = plan["topology"], plan["names"], plan["choice"]
    cases = select_cases(args)
    env = environment_record(plan["n_cpus"])
    settings = sweeps.Settings(variants=names, tiers=plan["tiers"], cases=cases, thread_counts=plan["thread_counts"],
                               combos=plan["combos"], repeats=args.repeats, warmup=args.warmup,
                               cold_repeats=args.cold_repeats, out_dir=args.out,
                               available_mb=args.memory_limit_mb, progress=not args.no_progress)
    print(f"06: {len(topology.cpus)} CPUs ({topology.model_name}), {len(topology.l3_domains)} L3 domain(s), "
          f"{len(topology.numa_nodes)} NUMA node(s); variants {', '.join(names)}; threads {plan['thread_counts']}; "
          f"W x T {', '.join(f'{w}x{t}' for w, t in plan['combos'])}; cases {', '.join(c.case_id for c in cases)}",
          file=sys.stderr)
    print(f"06: {choice.note}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    measured = measure(args, plan, settings)
    latency, throughput, cold, table = (measured[k] for k in ("latency", "throughput", "cold", "table"))

    rec = recommend(latency, throughput, cold, topology, choice, env)
    rows = production_rows(rec, latency, measured["items"], cases, env, args.out) if rec else []
    report.write_results(rows, report.results_path(args.out, "production"))
    plots = {"latency": plot_latency(table, args.out / "production_latency.png") if not table.empty else None,
             "throughput": plot_throughput(throughput, args.out / "production_throughput.png")}
    path = write_report(args.out / "production_report.md", topology=topology, env=env, settings=settings,
                        choice=choice, latency=latency, throughput=throughput, cold=cold, rec=rec,
                        plots=plots, elapsed_s=time.time() - started,
                        extra_sections=([engines_markdown(measured["engine_runs"])] if plan["engines"] else [])
                        + ([tool_markdown(measured["tool_rows"], env.get("weights_kind", "?"), env.get("cpu_model", "?"))]
                           if measured["tool_rows"] else []))
    report.write_text_atomic(args.out / report.PRODUCTION_RECOMMENDATION, recommendation_markdown(rec, settings))
    summary = report.write_summary(args.out, env)

    errors = failures(measured)
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    if rec:
        print("\n".join(rec.text))
        print("Reproduce:\n  " + "\n  ".join(reproduce_lines(rec)))
    print(f"Wrote {path}, {summary} and production CSVs/plots in {args.out} ({(time.time() - started) / 60:.1f} min)")
    return 1 if errors or rec is None else 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "segment":
        from totalseg_fast.cli import main as segment_main

        return segment_main(argv[1:])
    if argv and argv[0] == "benchmark":
        argv = argv[1:]
    return benchmark(argv)


if __name__ == "__main__":
    sys.exit(main())
