"""`totalseg_fast`: a drop-in for `TotalSegmentator --fast` on CPU (also `06_linux_production_benchmark.py segment`).

    totalseg_fast -i ct.nii.gz -o segs [--ml] [-s] [-rs NAME ...] [-p] [-ot nifti dicom_seg dicom_rtstruct]

Takes TotalSegmentator 2.18's flags for the 3 mm `total` model and writes what it writes: a folder of 117
`<class>.nii.gz` masks, or with `--ml` one multilabel file carrying the label-map extension; `statistics.json`,
`preview_total.png`, DICOM-SEG / RT-STRUCT for DICOM input. Beyond TotalSegmentator: several inputs (files,
folders of NIfTI files) in one call, `--variant`, `--threads`, `--cpus`, `--engine ray` for cohorts, `--resume`.

One input: `-o` means what it means to TotalSegmentator. Several inputs (or a folder of NIfTI files): `-o` is a
folder holding `<input name>/` (masks) or `<input name>.nii.gz` (`--ml`) per input; the same holds for `--ml`
with an `-o` that does not end in .nii/.nii.gz. A bad input costs one `error: <input>: <reason>` line and
leaves nothing in `-o`; the others go on. Exit code 1 if any input failed, 2 for a usage or setup error.

Heavy imports (numpy, onnxruntime) happen only after the CPU affinity and thread variables are set, so their
thread pools start on the CPUs asked for; torch is never imported on the exact path.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common.core.env import THREAD_ENV
from common.core.formatting import case_error
from totalseg_fast.classes import CLASS_IDS, TOTAL_CLASSES
from totalseg_fast.inputs import default_variant, expand_inputs, nifti_stem

_T0 = time.time()  # as close to process start as this module can see
OUTPUT_TYPES = ("nifti", "dicom_seg", "dicom_rtstruct")
RAY_ONLY = ("address", "workers", "worker_memory_mb", "results_csv")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="totalseg_fast",
        description="Segment 117 anatomical structures in CT images: TotalSegmentator's --fast model (3 mm) on CPU, "
                    "the same files as TotalSegmentator writes, faster.",
        epilog="A drop-in for `TotalSegmentator --fast -d cpu`. If you use it please cite TotalSegmentator: "
               "https://pubs.rsna.org/doi/10.1148/ryai.230024")
    parser.add_argument("-i", metavar="filepath", dest="input", nargs="+", action="extend", default=[],
                        help="CT nifti image or folder of dicom slices or zip file of dicom slices. Several inputs, "
                             "or a folder of nifti images, segment each one (see -o).")
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help=argparse.SUPPRESS)
    parser.add_argument("-o", metavar="directory", dest="output", type=Path, required=True,
                        help="Output directory for segmentation masks. Or path of multilabel output nifti file if --ml "
                             "option is used. Or path of output dicom seg file if --output_type is set to 'dicom_seg' "
                             "or 'dicom_rtstruct'. With several inputs: a directory holding one output per input.")
    parser.add_argument("-ot", "--output_type", type=str, nargs="+", default=None,
                        help="Select output type(s). Choices: nifti, dicom_rtstruct, dicom_seg. Multiple are allowed "
                             "e.g. -ot nifti dicom_seg OR -ot nifti,dicom_seg). DICOM outputs need a DICOM input.")
    parser.add_argument("-ml", "--ml", action="store_true", help="Save one multilabel image for all classes")
    parser.add_argument("-nr", "--nr_thr_resamp", type=int, default=None,
                        help="Nr of threads for resampling (default: --threads)")
    parser.add_argument("-ns", "--nr_thr_saving", type=int, default=None,
                        help="Nr of threads for saving segmentations (default: --threads)")
    parser.add_argument("-f", "--fast", action="store_true",
                        help="Run faster lower resolution model (3mm): the only model of this tool, so always on")
    parser.add_argument("-ff", "--fastest", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("-p", "--preview", action="store_true", help="Generate a png preview of segmentation")
    parser.add_argument("-ta", "--task", metavar="task", default="total",
                        help="Select which model to use: only 'total' (the 117 classes) is available")
    parser.add_argument("-rs", "--roi_subset", type=str, nargs="+",
                        help="Define a subset of classes to save (space separated list of class names). The whole "
                             "CT is segmented (TotalSegmentator first crops to these classes with its 6 mm model).")
    parser.add_argument("-s", "--statistics", nargs="?", const=True, default=False, metavar="filepath",
                        help="Calc volume (in mm3) and mean intensity. Results will be in statistics.json in the "
                             "output directory. Optionally specify a custom output path for statistics.json.")
    parser.add_argument("-sii", "--stats_include_incomplete", action="store_true",
                        help="Normally statistics are only calculated for ROIs which are not cut off by the beginning "
                             "or end of image. Use this option to calc anyways.")
    parser.add_argument("-d", "--device", default="cpu", help="Device type: only 'cpu'")
    parser.add_argument("-q", "--quiet", action="store_true", help="Print no intermediate outputs")
    ours = parser.add_argument_group("totalseg_fast's own options")
    ours.add_argument("--series", metavar="UID", default=None,
                      help="DICOM input holding several series: the SeriesInstanceUID to segment (default: the CT "
                           "series with most slices)")
    ours.add_argument("--variant", default=None,
                      help="pipeline variant (default: the fastest exact variant in 05's results, else "
                           "exact_ort_default)")
    ours.add_argument("--threads", type=int, default=None,
                      help="inference threads (default: CPUs in the affinity mask, after --cpus; with --engine ray: "
                           "threads per worker, default 1)")
    ours.add_argument("--cpus", default=None, help="pin this process to these CPUs first, e.g. 0-3 or 0,2")
    ours.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray = parser.add_argument_group("cohorts on Ray (--engine ray writes one multilabel file per input, as --ml)")
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


def _usage_error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _output_types(values: list[str] | None) -> list[str]:
    if not values:
        return ["nifti"]
    types = [t.strip() for value in values for t in value.split(",") if t.strip()]
    unknown = [t for t in types if t not in OUTPUT_TYPES]
    if unknown:
        raise ValueError(f"-ot {' '.join(unknown)}: choose from {', '.join(OUTPUT_TYPES)}")
    return list(dict.fromkeys(types))


def check_roi_subset(names: list[str] | None) -> dict[int, str]:
    """The classes to write: all 117, or those named (ValueError naming the closest names for an unknown one)."""
    if not names:
        return dict(TOTAL_CLASSES)
    for name in names:
        if name not in CLASS_IDS:
            close = difflib.get_close_matches(name, list(CLASS_IDS), n=3, cutoff=0.5)
            raise ValueError(f"--roi_subset: unknown class '{name}'"
                             + (f"; closest: {', '.join(close)}" if close else "; see TotalSegmentator's class names"))
    wanted = set(names)
    return {label: name for label, name in TOTAL_CLASSES.items() if name in wanted}


def _refusals(args) -> str | None:
    device = str(args.device).lower()
    if device != "cpu":
        return (f"-d {args.device}: totalseg_fast runs TotalSegmentator's 3 mm model on CPU only; "
                "use -d cpu (or leave -d out)")
    if args.fastest:
        return "--fastest (the 6 mm model) is not supported: totalseg_fast runs the 3 mm model (--fast) only"
    if args.task != "total":
        return f"--task {args.task} is not supported: totalseg_fast runs the 'total' task (117 classes) only"
    return None


@dataclass
class Job:
    """One input and where its outputs go."""
    source: Path
    kind: str            # "nifti" or "dicom"
    name: str            # the input's name (outputs in cohort mode)
    ml_path: Path | None  # the multilabel file (--ml, or the NIfTI of -ot nifti with DICOM outputs)
    mask_dir: Path | None  # folder mode's folder
    stats_path: Path | None
    preview_path: Path | None
    dicom_paths: dict  # output type -> path


def plan_jobs(args, sources: list[tuple[Path, str]], cohort: bool, types: list[str]) -> list[Job]:
    out: Path = args.output
    dicom_out = [t for t in types if t != "nifti"]
    ml = args.ml or bool(dicom_out)  # DICOM outputs imply the multilabel image (as TotalSegmentator)
    jobs = []
    for source, kind in sources:
        name = nifti_stem(source) if kind == "nifti" else (source.stem if source.suffix.lower() == ".zip"
                                                           else source.name)
        dicom_paths: dict = {}
        ml_path = mask_dir = None
        if dicom_out and not cohort and len(types) == 1:
            dicom_paths[types[0]] = out  # one DICOM output: -o is that file (TotalSegmentator)
            base_dir = out.parent
        elif dicom_out:
            base_dir, base = (out, name if cohort else "total_segmentation") if (cohort or out.is_dir()) \
                else (out.parent, out.name.split(".")[0])
            for t in dicom_out:
                dicom_paths[t] = base_dir / f"{base}_{'seg' if t == 'dicom_seg' else 'rtstruct'}.dcm"
            if "nifti" in types:
                ml_path = base_dir / f"{base}.nii.gz"
        elif ml:
            single_file = not cohort and out.name.endswith((".nii", ".nii.gz"))
            ml_path = out if single_file else out / f"{name}.nii.gz"
            base_dir = ml_path.parent
        else:
            mask_dir = out / name if cohort else out
            base_dir = mask_dir
        prefix = f"{name}_" if cohort and (ml or dicom_out) else ""
        stats_path = preview_path = None
        if args.statistics:
            stats_path = Path(args.statistics) if isinstance(args.statistics, str) and not cohort \
                else base_dir / f"{prefix}statistics.json"
        if args.preview:
            preview_path = base_dir / f"{prefix}preview_total.png"
        jobs.append(Job(source, kind, name, ml_path, mask_dir, stats_path, preview_path, dicom_paths))
    return jobs


def collect_inputs(items: list[str], series_given: bool) -> tuple[list[tuple[Path, str]], list[tuple[str, str]], bool]:
    """(inputs with their kind, errors, cohort): NIfTI files, DICOM folders / zips, and folders of NIfTI files."""
    try:
        from totalseg_fast.dicom.series import is_dicom_input
    except ImportError:  # the DICOM package is optional at import time
        def is_dicom_input(path: Path) -> bool:
            return False
    sources: list[tuple[Path, str]] = []
    errors: list[tuple[str, str]] = []
    cohort = len(items) > 1
    for item in items:
        path = Path(item)
        if (path.is_dir() or path.suffix.lower() == ".zip") and is_dicom_input(path):
            sources.append((path, "dicom"))
        elif path.is_dir():
            files, bad = expand_inputs([item])
            cohort = True
            sources.extend((f, "nifti") for f in files)
            errors.extend(bad)
        else:
            sources.append((path, "nifti"))
    return sources, errors, cohort


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    items = [str(p) for p in args.input] + list(args.inputs)
    if not items:
        parser.error("the following arguments are required: -i")
    args.inputs = items  # the Ray engine reads args.inputs
    refusal = _refusals(args)
    if refusal:
        return _usage_error(refusal)
    try:
        types = _output_types(args.output_type)
        classes = check_roi_subset(args.roi_subset)
    except ValueError as exc:
        return _usage_error(str(exc))
    if args.engine == "ray":
        tool_only = [flag for flag, on in (("-s", args.statistics), ("-p", args.preview), ("-rs", args.roi_subset),
                                           ("-ot", args.output_type), ("--series", args.series)) if on]
        if tool_only:
            return _usage_error(f"{', '.join(tool_only)}: not with --engine ray (it writes one multilabel file "
                                "per input, as --ml); run without --engine ray")
        from totalseg_fast.engines.ray_segment import segment_on_ray

        return segment_on_ray(args)
    ray_only = [f"--{name.replace('_', '-')}" for name in RAY_ONLY if getattr(args, name)] + \
        (["--resume"] if args.resume else [])
    if ray_only:
        return _usage_error(f"{', '.join(ray_only)}: only with --engine ray")

    from common.core.topology import format_cpu_list, parse_cpu_list

    if args.cpus:
        try:
            os.sched_setaffinity(0, parse_cpu_list(args.cpus))
        except (ValueError, OSError) as exc:
            return _usage_error(f"--cpus {args.cpus}: {exc}")
    affinity = sorted(os.sched_getaffinity(0))
    threads = args.threads or len(affinity)
    if threads < 1:
        return _usage_error(f"--threads must be >= 1 (got {threads})")
    for var in THREAD_ENV:
        os.environ[var] = str(threads)

    sources, errors, cohort = collect_inputs(items, args.series is not None)
    for item, reason in errors:
        print(f"error: {item}: {reason}", file=sys.stderr)
    if cohort and isinstance(args.statistics, str):
        return _usage_error("-s PATH names one file: with several inputs use -s alone (one per output)")
    jobs = plan_jobs(args, sources, cohort, types)

    from common.variants.table import get_variant  # heavy imports start here

    note = ""
    name = args.variant
    if name is None:
        name, note = default_variant()
    try:
        variant = get_variant(name)
    except KeyError as exc:
        return _usage_error(exc.args[0])
    imports_done = time.time()
    try:
        # a stale or missing models/ file is refused by the backend itself (runtime.backends.resolve_model)
        from common.runtime.backends import make_backend

        backend = make_backend(variant.backend, threads, **variant.backend_options)
        config = variant.config_for(threads)
    except Exception as exc:  # noqa: BLE001 - a setup failure is one line, not a traceback
        detail = str(exc).splitlines()[0] if str(exc) else ""
        return _usage_error(f"cannot build variant {variant.name}: {type(exc).__name__}: {detail}")
    session_done = time.time()
    quiet = args.quiet
    if not quiet:
        print(f"totalseg_fast: variant {variant.name} ({variant.tier}), {threads} threads on CPUs "
              f"{format_cpu_list(affinity)}" + (f"; {note}" if note else ""), file=sys.stderr)

    if cohort or not (args.ml or args.output.name.endswith((".nii", ".nii.gz", ".dcm"))):
        args.output.mkdir(parents=True, exist_ok=True)
    failed = len(errors)
    seen: dict[Path, Path] = {}
    per_file = []
    from tqdm import tqdm

    bar = tqdm(jobs, desc="totalseg_fast", unit="case", disable=args.no_progress or quiet or len(jobs) < 2,
               file=sys.stderr)
    saving_threads = args.nr_thr_saving or threads
    for job in bar:
        bar.set_postfix_str(job.name)
        try:
            for target in _targets(job):
                if target.resolve() == job.source.resolve():
                    raise ValueError("output would overwrite the input: choose another -o")
                if target in seen:
                    raise ValueError(f"same output name as {seen[target]} ({target.name}): rename one of them")
                seen[target] = job.source
            start = time.time()
            timings = segment_job(job, backend, config, classes, args, saving_threads, quiet, bar)
            per_file.append({"input": str(job.source), "output": str(_targets(job)[0]), "start": start,
                             "end": time.time(), **timings})
            if not quiet:
                bar.write(f"ok: {job.source} -> {_targets(job)[0]} ({time.time() - start:.1f} s)", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - one line per bad input, then the next one
            failed += 1
            bar.write(f"error: {job.source}: {case_error(exc, job.source)}", file=sys.stderr)
    bar.close()
    if args.timings_json:
        args.timings_json.write_text(json.dumps({
            "module_loaded": _T0, "imports_done": imports_done, "session_done": session_done,
            "session_s": session_done - imports_done, "variant": variant.name, "threads": threads,
            "cpus": format_cpu_list(affinity), "files": per_file}))
    total = len(jobs) + len(errors)
    if not quiet or failed:
        print(f"totalseg_fast: {total - failed} of {total} inputs written to {args.output}"
              + (f", {failed} failed" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def _targets(job: Job) -> list[Path]:
    found = [p for p in (job.ml_path, job.mask_dir, *job.dicom_paths.values()) if p is not None]
    return found + [p for p in (job.stats_path, job.preview_path) if p is not None]


def segment_job(job: Job, backend, config, classes: dict[int, str], args, saving_threads: int, quiet: bool,
                bar) -> dict:
    """Read one input, segment it, and write every output it asks for; on failure nothing is left behind."""
    from common.pipeline.run import StageTimer

    timer = StageTimer()
    # the work folder sits where the outputs go, so finished files are renamed into place, never copied
    root = job.mask_dir if job.mask_dir is not None else _targets(job)[0].parent
    created = [p for p in (root, *root.parents) if not p.exists()]
    root.mkdir(parents=True, exist_ok=True)
    try:
        return _segment_job(job, backend, config, classes, args, saving_threads, quiet, bar, timer, root)
    except BaseException:
        for folder in created:  # folders made for this input's outputs go again: nothing left in -o
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _segment_job(job: Job, backend, config, classes: dict[int, str], args, saving_threads: int, quiet: bool,
                 bar, timer, root: Path) -> dict:
    import numpy as np

    from common.pipeline.run import STAGES, load_volume_lean, segment_volume
    from common.core import io
    from totalseg_fast import outputs

    with tempfile.TemporaryDirectory(dir=root, prefix=".totalseg_fast_") as work:
        work = Path(work)
        source = None
        with timer.stage("load_s"):
            path = job.source
            if job.kind == "dicom":
                from totalseg_fast.dicom.series import read_dicom_input

                source = read_dicom_input(path, work, series_uid=args.series,
                                          note=(lambda m: None) if quiet else
                                          (lambda m: bar.write(f"note: {job.source}: {m}", file=sys.stderr)))
                path = source.nifti
            elif job.dicom_paths:
                raise ValueError(f"-ot {' '.join(job.dicom_paths)} needs a DICOM input (a folder or zip of slices), "
                                 "as TotalSegmentator")
            volume = load_volume_lean(path) if config.lean_load else io.load_volume(path)
        keep: dict = {}  # the 3 mm grid's CT and labels (references, no copies)
        result = segment_volume(volume, backend, config, timer, release_input=config.release_input, keep=keep)
        labels = result.labels
        with timer.stage("save_s"):
            if len(classes) < len(TOTAL_CLASSES):
                labels = labels * np.isin(labels, list(classes)).astype(np.uint8)  # TotalSegmentator's roi_subset
            staged: list[tuple[Path, Path]] = []  # (written in work/, final path)
            if job.mask_dir is not None:
                stage = work / "masks"
                # every label of the full-resolution volume is one of the 3 mm labels it was resampled from
                candidates = np.flatnonzero(np.bincount(keep["labels_3mm"].ravel(), minlength=256))
                outputs.write_masks(labels, volume.affine, volume.header, stage, classes, saving_threads, candidates)
                staged += [(stage / f"{name}.nii.gz", job.mask_dir / f"{name}.nii.gz") for name in classes.values()]
            labels_file = None
            if job.ml_path is not None or job.dicom_paths:
                labels_file = work / "labels.nii.gz"
                outputs.write_multilabel(labels, volume.affine, volume.header, labels_file, classes)
                if job.ml_path is not None:
                    staged.append((labels_file, job.ml_path))
            for kind, target in job.dicom_paths.items():
                from totalseg_fast.dicom.rtstruct import write_rtstruct
                from totalseg_fast.dicom.seg import write_dicom_seg

                write = write_dicom_seg if kind == "dicom_seg" else write_rtstruct
                staged.append((write(labels_file, source, classes, work / f"out_{kind}.dcm"), target))
            if job.stats_path or job.preview_path:
                labels_3mm = keep["labels_3mm"]
                if len(classes) < len(TOTAL_CLASSES):
                    labels_3mm = labels_3mm * np.isin(labels_3mm, list(classes)).astype(np.uint8)
                if job.stats_path is not None:
                    zooms = outputs_zooms(keep)
                    stats = outputs.statistics(keep["labels_3mm"], keep["resampled"], zooms, classes,
                                               exclude_masks_at_border=not args.stats_include_incomplete)
                    staged.append((outputs.write_statistics(stats, work / "statistics.json"), job.stats_path))
                if job.preview_path is not None:
                    staged.append((outputs.write_preview(keep["resampled"], labels_3mm, work / "preview.png"),
                                   job.preview_path))
            _publish_all(staged)
    timings = dict(timer.timings)
    timings["wall_s"] = sum(timer.timings[s] for s in STAGES)
    return timings


def outputs_zooms(keep: dict) -> tuple[float, ...]:
    """The zooms nibabel gives the 3 mm image TotalSegmentator computes statistics on (float32 pixdim)."""
    from common.pipeline import resample

    zoom = resample.zoom_factors(keep["spacing"])
    if zoom is None:  # already on the 3 mm grid: TotalSegmentator uses the canonical image as it is
        return tuple(keep["spacing"])
    shape = keep["resampled"].shape
    return tuple(resample.header_spacing(shape, resample.resampled_affine(keep["affine_ras"], zoom)))


def _publish_all(staged: list[tuple[Path, Path]]) -> None:
    """Move the finished files into place (renames within a filesystem, else copies under a temporary name)."""
    for src, dst in staged:
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(src, dst)
        except OSError:
            tmp = dst.parent / f".{dst.name}.tmp"
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)


if __name__ == "__main__":
    sys.exit(main())
