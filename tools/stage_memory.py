#!/usr/bin/env python3
"""Where a variant's memory goes: the peak RSS of each step (imports, runtime, warm-up, load, resample, ...,
save) of one case in the variant's own worker process (common/core/stage_memory.py), written to
benchmarks/stage_memory.csv; 05's report renders it (common/reports/stage_memory_report.py).

    python tools/stage_memory.py --case phantom_00_large --before --with-vanilla

`--before` also runs each variant as it was before the lean-memory options (`BEFORE`), interleaved in the same
run; `--with-vanilla` adds TotalSegmentator's whole-run peak (PSS of its process tree) on the same case.
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.core import paths  # noqa: E402
from common.reports.stage_memory_report import COLUMNS, CSV_NAME  # noqa: E402
from common.variants.table import Variant, get_variant  # noqa: E402

DEFAULT_VARIANTS = ("exact_ov_f32", "exact_ov_f32_split_concat", "exact_ort_tuned_stages", "approx_ov_bf16_whole")
# What each lean-memory change replaced: a variant "@before" runs with these pipeline settings, without these
# backend options, and with these modules imported at start-up.
BEFORE_CONFIG = {"stream_accumulate": False, "release_input": False}
BEFORE_DROPPED_OPTIONS = ("head_slab", "split_concat")
BEFORE_PRELOAD = ("torch",)  # env.apply_threads imported torch in every worker before this branch


def before(variant: Variant) -> Variant:
    config = replace(variant.config, **{k: v for k, v in BEFORE_CONFIG.items() if hasattr(variant.config, k)})
    options = {k: v for k, v in variant.backend_options.items() if k not in BEFORE_DROPPED_OPTIONS}
    return replace(variant, name=f"{variant.name}@before", config=config, backend_options=options)


def measure_variant(variant: Variant, image: Path, out_dir: Path, threads: int, preload: tuple[str, ...] = ()) -> list[dict]:
    from common.harness.variant_worker import VariantWorker

    worker = VariantWorker(variant, threads, stage_memory=True, preload=preload)
    try:
        start = time.perf_counter()
        value = worker.run(image, out_dir / f"{variant.name}.nii.gz")
        wall = time.perf_counter() - start
    finally:
        worker.close()
    steps = value["stage_memory"]
    total = max(s["peak_mb"] for s in steps)
    return [{"label": variant.name, **s, "run_peak_mb": total, "wall_s": round(wall, 1)} for s in steps]


def measure_vanilla(image: Path, out_dir: Path, threads: int) -> list[dict]:
    """TotalSegmentator in a fresh process: its tree's peak (no per-step split: the steps are its own)."""
    from common.core.memory import PeakMemory

    code = ("import sys; from pathlib import Path; from common.core.env import apply_threads; apply_threads(int(sys.argv[3]));"
            "from common.harness.vanilla import run_vanilla; run_vanilla(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))")
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code, str(image), str(out_dir / "vanilla.nii.gz"), str(threads)],
                               cwd=ROOT)
    with PeakMemory(pid=process.pid) as peak:
        code_ = process.wait()
    if code_:
        raise RuntimeError(f"vanilla exited with {code_}")
    wall = round(time.perf_counter() - start, 1)
    return [{"label": "vanilla", "stage": "whole run", "peak_mb": round(peak.mb, 1), "after_mb": "",
             "run_peak_mb": round(peak.mb, 1), "wall_s": wall}]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="phantom_00_large", help="a manifest case id, or a NIfTI path")
    parser.add_argument("--manifest", default=None)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--before", action="store_true", help="also run each variant as before the lean options")
    parser.add_argument("--with-vanilla", action="store_true")
    parser.add_argument("--out", type=Path, default=paths.BENCHMARKS_DIR)
    args = parser.parse_args(argv)

    if Path(args.case).is_file():
        image, case_id = Path(args.case), Path(args.case).name.split(".")[0]
    else:
        from common.data.cases import read_manifest

        case = next((c for c in read_manifest(args.manifest) if c.case_id == args.case), None)
        if case is None:
            parser.error(f"no case {args.case!r} in the manifest")
        image, case_id = case.image, case.case_id
    outputs = args.out / "outputs" / "stage_memory"
    outputs.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.variants.split(","):
        variant = get_variant(name)
        runs = [(before(variant), BEFORE_PRELOAD), (variant, ())] if args.before else [(variant, ())]
        for v, preload in runs:
            print(f"{v.name} on {case_id} ...", flush=True)
            rows += measure_variant(v, image, outputs, args.threads, preload)
    if args.with_vanilla:
        print(f"vanilla on {case_id} ...", flush=True)
        rows += measure_vanilla(image, outputs, args.threads)
    path = args.out / CSV_NAME
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({"case_id": case_id, "threads": args.threads, **row})
    from common.reports.stage_memory_report import section

    markdown = path.with_suffix(".md")
    from common.model.weights import read_model_info, weights_banner
    from common.reports.environment import environment_lines

    markdown.write_text("\n".join(["# Memory per step", "", weights_banner(read_model_info()), "",
                                   *environment_lines(threads=args.threads), *section(args.out)[1:]]) + "\n")
    print(f"wrote {path} and {markdown.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
