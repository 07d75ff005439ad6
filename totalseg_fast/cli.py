"""Segment mode: the study's winner as a tool.

    python 06_linux_production_benchmark.py segment IN.nii.gz [IN2 ... | FOLDER ...] -o OUT_DIR
        [--variant NAME] [--threads N] [--cpus LIST] [--engine ray [--address HOST:PORT] [--workers W] [--resume]]

``--engine ray`` hands the cohort to totalseg_fast.engines.ray_segment (Ray actors; README "Cohorts on Ray").
Writes one TotalSegmentator-compatible multilabel NIfTI per input (uint8, the input's grid, affine
and header) as ``OUT_DIR/<input name>.nii.gz``, written under a temporary name and renamed when
complete. A bad input costs one ``error: <file>: <reason>`` line; the others go on; the exit code
is 1 if any input failed, 2 for a usage or setup error, 0 otherwise.

Heavy imports (numpy, onnxruntime) happen only after the CPU affinity and thread variables are
set, so their thread pools start on the CPUs asked for.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common.core.env import THREAD_ENV
from common.core.formatting import case_error
from totalseg_fast.inputs import default_variant, expand_inputs, output_for

_T0 = time.time()  # as close to process start as this module can see


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="totalseg_fast",
        description="Segment CT volumes with the study's recommended variant (TotalSegmentator --fast, "
                    "multilabel output: uint8 on the input grid, input affine and header).")
    parser.add_argument("inputs", nargs="+", help="NIfTI files (.nii/.nii.gz) or folders of them")
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder (created if missing)")
    parser.add_argument("--variant", default=None,
                        help="pipeline variant (default: the best exact variant in benchmarks/onnx_optimized_"
                             "results.csv, else exact_ort_default)")
    parser.add_argument("--threads", type=int, default=None,
                        help="inference threads (default: CPUs in the affinity mask, after --cpus; with --engine ray: "
                             "threads per worker, default 1)")
    parser.add_argument("--cpus", default=None, help="pin this process to these CPUs first, e.g. 0-3 or 0,2")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray = parser.add_argument_group("cohorts on Ray (--engine ray; see the README's 'Cohorts on Ray')")
    ray.add_argument("--engine", choices=("local", "ray"), default="local",
                     help="local: this process, one case after another (default); ray: long-lived pinned "
                          "workers on an embedded Ray instance or the cluster at --address")
    ray.add_argument("--address", default=None,
                     help="HOST:PORT of a running Ray cluster's head (default: $RAY_ADDRESS, else an embedded "
                          "local instance)")
    ray.add_argument("--workers", type=int, default=None,
                     help="Ray workers (actors), each --threads CPUs (default: the cluster's CPUs // threads)")
    ray.add_argument("--resume", action="store_true",
                     help="keep outputs finished by an earlier run whose input still has the same content "
                          "(SHA-256 in OUT/segment_manifest.jsonl); redo the rest")
    ray.add_argument("--worker-memory-mb", type=float, default=None,
                     help="memory each worker declares to Ray (default: 06's measured peak RSS per worker + 15%%)")
    ray.add_argument("--no-prefetch", action="store_true", help="do not read the next case during the network")
    ray.add_argument("--results-csv", type=Path, default=None,
                     help="per-case results (default: OUT/segment_results.csv)")
    parser.add_argument("--timings-json", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.engine == "ray":
        from totalseg_fast.engines.ray_segment import segment_on_ray

        return segment_on_ray(args)
    ray_only = [flag for flag, value in (("--address", args.address), ("--workers", args.workers),
                                         ("--resume", args.resume), ("--worker-memory-mb", args.worker_memory_mb),
                                         ("--results-csv", args.results_csv)) if value]
    if ray_only:
        print(f"error: {', '.join(ray_only)} need --engine ray", file=sys.stderr)
        return 2

    from common.core.topology import format_cpu_list, parse_cpu_list

    if args.cpus:
        try:
            cpus = parse_cpu_list(args.cpus)
            os.sched_setaffinity(0, cpus)
        except (ValueError, OSError) as exc:
            print(f"error: --cpus {args.cpus}: {exc}", file=sys.stderr)
            return 2
    affinity = sorted(os.sched_getaffinity(0))
    threads = args.threads or len(affinity)
    if threads < 1:
        print(f"error: --threads must be >= 1 (got {threads})", file=sys.stderr)
        return 2
    for var in THREAD_ENV:
        os.environ[var] = str(threads)

    files, errors = expand_inputs(args.inputs)
    for item, reason in errors:
        print(f"error: {item}: {reason}", file=sys.stderr)

    from common.variants.table import get_variant, make_pipeline_runner  # heavy imports start here

    note = ""
    name = args.variant
    if name is None:
        name, note = default_variant()
    try:
        variant = get_variant(name)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    imports_done = time.time()
    try:
        # a stale or missing models/ file is refused by the backend itself (runtime.backends.resolve_model)
        runner = make_pipeline_runner("production", variant, threads)
    except Exception as exc:  # noqa: BLE001 - a setup failure is one line, not a traceback
        print(f"error: cannot build variant {variant.name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
              file=sys.stderr)
        return 2
    session_done = time.time()
    print(f"segment: variant {variant.name} ({variant.tier}), {threads} threads on CPUs {format_cpu_list(affinity)}"
          + (f"; {note}" if note else ""), file=sys.stderr)

    args.output.mkdir(parents=True, exist_ok=True)
    failed = len(errors)
    seen: dict[Path, Path] = {}
    per_file = []
    from tqdm import tqdm

    bar = tqdm(files, desc="segment", unit="case", disable=args.no_progress, file=sys.stderr)
    for path in bar:
        bar.set_postfix_str(path.name)
        output = output_for(path, args.output)
        try:
            if output.resolve() == path.resolve():
                raise ValueError("output would overwrite the input: choose another -o folder")
            if output in seen:
                raise ValueError(f"same output name as {seen[output]} ({output.name}): rename one of them")
            seen[output] = path
            start = time.time()
            timings = runner.run(path, output)
            per_file.append({"input": str(path), "output": str(output), "start": start, "end": time.time(),
                             **timings})
            bar.write(f"ok: {path} -> {output} ({timings.get('wall_s', time.time() - start):.1f} s)",
                      file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - one line per bad input, then the next one
            failed += 1
            bar.write(f"error: {path}: {case_error(exc, path)}", file=sys.stderr)
    bar.close()
    if args.timings_json:
        args.timings_json.write_text(json.dumps({
            "module_loaded": _T0, "imports_done": imports_done, "session_done": session_done,
            "session_s": session_done - imports_done, "variant": variant.name, "threads": threads,
            "cpus": format_cpu_list(affinity), "files": per_file}))
    total = len(files) + len(errors)
    print(f"segment: {total - failed} of {total} inputs written to {args.output}"
          + (f", {failed} failed" if failed else ""), file=sys.stderr)
    return 1 if failed else 0
