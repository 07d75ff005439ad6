#!/usr/bin/env python3
"""Each exact ONNX row on two models, in one run: speed and agreement with vanilla.

Rows: the exact ONNX Runtime variants (04's baseline `exact_ort_default` among them) and the Rust binary, each
once per model (default: the plain export and the precise-norm model, common/runtime/backends.resolve_model),
interleaved run by run on one case. TotalSegmentator runs once first as the reference (kept in OUT and reused).
Variants run in their own worker process each time, as 05 runs them; the Rust row in one long-lived process.

    python tools/compare_models.py [--image CT.nii.gz] [--repeats 3] [--threads 2] [--rows a,b,rust] [--out DIR]

Prints one Markdown line per row and model: wall seconds (median, each run), median network seconds, agreement
with vanilla.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.core import paths  # noqa: E402

ROWS = ("exact_ort_default", "exact_ort_tuned", "exact_ort_tuned_stages", "rust")
MODELS = ("plain", "precise_norm")


def _case(image: Path):
    from common.data.cases import Case

    return Case(case_id=image.name.split(".")[0], image=image, label=None, label_map={}, source="compare_models",
                shape=(), spacing=(), orientation="", sha256="")


def make_runner(row: str, model: str, threads: int):
    """A bench.Runner for `row` (a variant name or "rust") on `model`, named `<row>@<model>`."""
    if row == "rust":
        from common.harness import rust_runner

        reason = rust_runner.skip_reason()
        if reason:
            raise SystemExit(f"error: {reason}")
        runner = rust_runner.benchmark_runner(threads, model)
        return replace(runner, variant=f"rust@{model}")
    from common.variants.table import get_variant, make_pipeline_runner

    variant = get_variant(row)
    variant = replace(variant, name=f"{row}@{model}", backend_options={**variant.backend_options, "model": model})
    return make_pipeline_runner("compare", variant, threads, isolated=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, default=paths.shared_data_dir() / "example_ct_sm.nii.gz")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default=",".join(ROWS), help="variant names and/or rust (default: %(default)s)")
    parser.add_argument("--models", default=",".join(MODELS), help="model names (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/compare_models"),
                        help="outputs and the vanilla reference (reused when present: a new OUT after new weights; "
                             "default: %(default)s)")
    args = parser.parse_args(argv)

    from common.core.env import apply_threads, environment_record
    from common.harness import bench
    from common.harness.vanilla import vanilla_runner

    apply_threads(args.threads)
    case = _case(args.image.resolve())
    environment = environment_record(args.threads)
    if not bench.vanilla_output(args.out, case.case_id).is_file():
        bench.run_benchmark([vanilla_runner(args.threads)], [case], threads=args.threads, environment=environment,
                            out_dir=args.out, progress=False)
    runners = [make_runner(row.strip(), model.strip(), args.threads)
               for row in args.rows.split(",") for model in args.models.split(",")]
    try:
        rows = bench.run_benchmark(runners, [case], repeats=args.repeats, threads=args.threads,
                                   environment=environment, out_dir=args.out, progress=False)
    finally:
        for runner in runners:
            if runner.close:
                runner.close()

    import pandas as pd

    frame = pd.DataFrame(rows)
    print(f"{case.case_id}, {args.threads} threads, {args.repeats} repeats, {environment.get('cpu_model', '?')}, "
          f"weights {environment.get('weights_kind', '?')}")
    print("| row @ model | median wall s | each run's wall s | median network s | agreement with vanilla | errors |")
    print("| --- | --- | --- | --- | --- | --- |")
    for variant, group in frame.groupby("variant", sort=False):
        ok = group[group.status == "ok"]
        errors = "; ".join(sorted(set(group.loc[group.status != "ok", "error"].astype(str))))
        walls = " ".join(f"{w:.2f}" for w in ok.wall_s)
        network = ok.network_s.median() if "network_s" in ok else float("nan")
        print(f"| {variant} | {ok.wall_s.median():.2f} | {walls} | {network:.2f} | "
              f"{ok.parity_agreement.mean():.6f} | {errors} |")
    return 1 if bench.any_failed(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
