#!/usr/bin/env python3
"""04: our re-implementation of the `--fast` pipeline, network run by ONNX Runtime (default session).

In process, no temporary files, no worker processes; every step of DESIGN.md section 2.
`--impl torch` runs the same pipeline with the network in torch (the exactness twin of vanilla),
`--impl rust` the Rust binary, `--impl all` all of them interleaved case by case.
Writes OUT/<implementation>_results.csv, OUT/onnx_report.md and OUT/SUMMARY.md.
"""
from __future__ import annotations

import argparse
import sys

from common.harness.cli import add_benchmark_args, run_and_report

IMPLEMENTATIONS = ("onnx", "torch", "rust")


def make_runners(impls: list[str], threads: int) -> tuple[list, list[str]]:
    from common.variants.table import Variant, get_variant, make_pipeline_runner

    runners, notes = [], []
    baseline = get_variant("exact_ort_default")
    if "onnx" in impls:  # both ONNX rows load their model through backends.resolve_model (stale-model check)
        runners.append(make_pipeline_runner("onnx_baseline", baseline, threads))
    if "torch" in impls:
        twin = Variant("torch_network", "exact", "torch", "the same pipeline, network run by torch")
        runners.append(make_pipeline_runner("torch_twin", twin, threads))
    if "rust" in impls:
        try:
            from common.harness import rust_runner
            reason = rust_runner.skip_reason()
        except ImportError as exc:
            reason = f"Rust runner unavailable: {exc}"
        if reason:
            notes.append(f"Rust-ONNX skipped: {reason}")
            print(f"note: Rust-ONNX skipped: {reason}", file=sys.stderr)
        else:
            runners.append(rust_runner.benchmark_runner(threads, baseline.backend_options["model"]))
    return runners, notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_args(parser)
    parser.add_argument("--impl", default="onnx", help="onnx, torch, rust or all (comma-separated; default: onnx)")
    parser.add_argument("--with-vanilla", action="store_true",
                        help="also run TotalSegmentator, interleaved case by case, so ratios come from one run")
    args = parser.parse_args(argv)
    impls = list(IMPLEMENTATIONS) if args.impl == "all" else [i.strip() for i in args.impl.split(",")]
    unknown = set(impls) - set(IMPLEMENTATIONS)
    if unknown:
        parser.error(f"unknown --impl {', '.join(sorted(unknown))}")
    from common.harness.cli import prepare_runners
    runners, notes = prepare_runners(args, lambda: make_runners(impls, args.threads))
    if args.with_vanilla:
        from common.harness.vanilla import vanilla_runner
        runners.insert(0, vanilla_runner(args.threads))
    return run_and_report(args, runners, "04 Python-ONNX baseline benchmark", "onnx_report.md", notes)


if __name__ == "__main__":
    sys.exit(main())
