#!/usr/bin/env python3
"""05: optimized variants of the `--fast` pipeline, exact and approximate tiers, with their drift from vanilla.

A variant is a named configuration in common/variants/table.py (runtime + options + pipeline settings).
`--list-variants` prints them; `--variants a,b,c` picks some (default: all but `exact_ort_default`, which is
the `onnx_baseline` row). `--with-vanilla` / `--with-baseline` interleave TotalSegmentator itself and the
default ONNX Runtime pipeline in the same run, so every speedup is a ratio measured in one run. Each
variant runs in a worker process of its own (started before each timed run, stopped after it), so its
peak memory is its own and a case that exhausts memory costs one error row. A variant whose runtime is
missing here is skipped with its reason; one whose worker fails to start (a corrupt model) costs an error
row per run, the others still run, and the exit code is 1.
Writes OUT/onnx_optimized_results.csv, OUT/optimized_report.md, OUT/optimized_pareto.png, OUT/SUMMARY.md.
"""
from __future__ import annotations

import argparse
import sys

from common.harness.cli import add_benchmark_args, prepare_runners, run_and_report

REPORT = "optimized_report.md"


def list_variants() -> str:
    from common.variants.table import VARIANTS

    width = max(map(len, VARIANTS))
    return "\n".join(f"{v.name:<{width}}  {v.tier:<11}  {v.backend:<11}  {v.description}" for v in VARIANTS.values())


def make_runners(names: list[str], threads: int, with_vanilla: bool, with_baseline: bool,
                 calibrate: bool = True) -> tuple[list, list[str]]:
    from common.core.formatting import one_line
    from common.harness.bench import failed_runner
    from common.harness.vanilla import vanilla_runner
    from common.model.onnx_meta import check_current_model
    from common.runtime import backends
    from common.variants.table import get_variant, make_pipeline_runner

    check_current_model()
    runners, notes = [], ["- Each variant runs in its own worker process, started and warmed up (one untimed inference) "
                          "before each timed run and stopped after it: its peak memory is that process tree's alone."]
    if with_vanilla:
        runners.append(vanilla_runner(threads))
    if with_baseline:
        runners.append(make_pipeline_runner("onnx_baseline", get_variant("exact_ort_default"), threads, isolated=True))
    if calibrate and any(get_variant(n).backend_options.get("model") == "int8" for n in names):
        try:
            from common.model.quantize import ensure_int8_model
            ensure_int8_model(log=lambda m: print(m, file=sys.stderr))
        except Exception as exc:  # the int8 rows are then skipped below, with the reason
            notes.append(f"- INT8 calibration failed: {type(exc).__name__}: {exc}")
    if calibrate and any(get_variant(n).backend_options.get("model") == "int8_mixed" for n in names):
        try:
            from common.model.int8_mixed import ensure_int8_mixed_model
            ensure_int8_mixed_model(log=lambda m: print(m, file=sys.stderr))
        except Exception as exc:  # the row is then skipped below, with the reason
            notes.append(f"- INT8 mixed calibration failed: {type(exc).__name__}: {exc}")
    for name in names:
        variant = get_variant(name)
        try:
            runners.append(make_pipeline_runner("onnx_optimized", variant, threads, isolated=True))
        except (backends.BackendUnavailable, ImportError, FileNotFoundError) as exc:  # cannot run here: skipped
            reason = one_line(exc)
            notes.append(f"- Variant `{name}` ({variant.tier}) skipped: {reason}")
            print(f"note: variant {name} skipped: {reason}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - should run but failed to start: error rows, exit code 1
            reason = one_line(exc)
            notes.append(f"- Variant `{name}` ({variant.tier}) failed to start: {reason}")
            print(f"error: variant {name} failed to start: {reason}", file=sys.stderr)
            runners.append(failed_runner("onnx_optimized", name, variant.tier, reason))
    return runners, notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_args(parser)
    parser.add_argument("--list-variants", action="store_true", help="print the variants and exit")
    parser.add_argument("--variants", default="", help="comma-separated variant names (default: all but exact_ort_default)")
    parser.add_argument("--with-vanilla", action="store_true", help="interleave vanilla TotalSegmentator runs")
    parser.add_argument("--with-baseline", action="store_true", help="interleave the default ORT pipeline")
    parser.add_argument("--calibrate", action="store_true", help="(re)build the INT8 models (all convolutions; sensitive ones kept float) and exit")
    parser.add_argument("--no-peak", action="store_true",
                        help="skip the per-precision peak GFLOP/s microbenchmarks (common/runtime/peaks.py)")
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the OpenVINO per-layer profile of one patch (common/reports/profile_section.py)")
    args = parser.parse_args(argv)
    from common.variants.table import RENAMED, VARIANTS, variant_name

    if args.list_variants:
        print(list_variants())
        return 0
    if args.calibrate:
        from common.model.int8_mixed import build_int8_mixed_model
        from common.model.quantize import build_int8_model
        build_int8_model()
        build_int8_mixed_model()
        return 0
    names = [n.strip() for n in args.variants.split(",") if n.strip()] or \
        [n for n in VARIANTS if n != "exact_ort_default"]
    unknown = [n for n in names if n not in VARIANTS and n not in RENAMED]
    names = [variant_name(n) for n in names if n not in unknown]
    if unknown:
        parser.error(f"unknown variants {', '.join(unknown)} (see --list-variants)")
    runners, notes = prepare_runners(
        args, lambda: make_runners(names, args.threads, args.with_vanilla, args.with_baseline))
    from common.reports import optimized_report
    from common.reports.profile_section import measure_profiles
    from common.runtime.peaks import measure_peaks

    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    peaks = None if args.no_peak else measure_peaks(args.threads, log=log)
    profiles = [] if args.no_profile else measure_profiles(args.threads, log=log)
    notes = optimized_report.static_notes(notes, peaks)
    rc = run_and_report(args, runners, "05 Optimized Python pipeline: variants, exact and approximate",
                        REPORT, notes)
    optimized_report.rewrite_report(args.out, REPORT, notes, peaks, args.threads, profiles)
    return rc


if __name__ == "__main__":
    sys.exit(main())
