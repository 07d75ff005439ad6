"""06: the tool against TotalSegmentator's CLI, as a user times them: each command a fresh process, wall time from
spawn to exit, peak memory of its process tree (RSS, PSS summed once it has children: common/core/memory), and
whether every output file is identical (voxels, affine, dtype, header, label map; statistics.json to rounding).

Per mode (`--ml`, folder of masks) and input kind (NIfTI, and a DICOM folder written from the same CT when the
DICOM package is present), TotalSegmentator and ours run interleaved (TS, ours, TS, ours, ...), one at a time,
with the same threads (TotalSegmentator's torch takes the thread variables; `-nr`/`-ns` as ours).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common.core import paths

MODES = ("ml", "folder")


def _command(tool: str, source: Path, out: Path, mode: str, threads: int) -> list[str]:
    target = out / "seg.nii.gz" if mode == "ml" else out / "segs"
    flags = ["-i", str(source), "-o", str(target), "--fast", "-d", "cpu", "-nr", str(threads), "-ns", str(threads)]
    flags += ["--ml"] if mode == "ml" else []
    if tool == "totalsegmentator":
        return [str(Path(sys.executable).parent / "TotalSegmentator"), *flags]
    return [sys.executable, "-m", "totalseg_fast", *flags, "--threads", str(threads), "-q"]


def timed_run(command: list[str], env: dict) -> dict:
    """Wall seconds spawn -> exit and the tree's peak memory (MB) of one fresh process."""
    from common.core.memory import PeakMemory

    t0 = time.perf_counter()
    proc = subprocess.Popen(command, cwd=paths.REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    with PeakMemory(interval=0.05, pid=proc.pid) as peak:
        _, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    error = "" if proc.returncode == 0 else ([ln for ln in stderr.splitlines() if ln.strip()] or ["?"])[-1][:200]
    return {"wall_s": wall, "peak_mb": peak.mb, "returncode": proc.returncode, "error": error}


def same_outputs(theirs: Path, ours: Path) -> tuple[bool, str]:
    """(identical, why not): every NIfTI file's voxels, affine, dtype, header bytes and extensions."""
    import nibabel as nib

    a = sorted(p.relative_to(theirs) for p in theirs.rglob("*.nii.gz"))
    b = sorted(p.relative_to(ours) for p in ours.rglob("*.nii.gz"))
    if a != b or not a:
        return False, f"files differ ({len(a)} vs {len(b)})"
    for rel in a:
        x, y = nib.load(theirs / rel), nib.load(ours / rel)
        if not (x.get_data_dtype() == y.get_data_dtype() and np.array_equal(x.affine, y.affine)
                and x.header.binaryblock == y.header.binaryblock
                and [e.get_content() for e in x.header.extensions] == [e.get_content() for e in y.header.extensions]
                and np.array_equal(np.asanyarray(x.dataobj), np.asanyarray(y.dataobj))):
            return False, f"{rel} differs"
    return True, f"{len(a)} files identical"


def dicom_copy(nifti: Path, folder: Path) -> Path | None:
    try:
        from totalseg_fast.dicom.testing import write_ct_series
    except ImportError:
        return None
    write_ct_series(nifti, folder)
    return folder


def compare(case_id: str, image: Path, threads: int, work: Path, repeats: int = 1, modes=MODES,
            kinds=("nifti", "dicom"), log=print, rows_path: Path | None = None) -> list[dict]:
    """Rows: case, kind, mode, repeat, tool, wall_s, peak_mb, identical. `rows_path`: each pair is appended there
    (JSON lines) as soon as it is measured, so a long run that is stopped keeps what it measured."""
    from common.core.env import THREAD_ENV
    from common.model.weights import configure_totalseg_home

    # TotalSegmentator's CLI must find the suite's weights (TOTALSEG_HOME_DIR), not try to download its own
    env = {**os.environ, **{var: str(threads) for var in THREAD_ENV}, "TOTALSEG_HOME_DIR": str(configure_totalseg_home())}
    sources = {"nifti": image} if "nifti" in kinds else {}
    if "dicom" in kinds:
        folder = dicom_copy(image, work / "dicom_input")
        if folder is not None:
            sources["dicom"] = folder
    rows = []
    for kind, source in sources.items():
        for mode in modes:
            for repeat in range(repeats):
                outs = {}
                for tool in ("totalsegmentator", "totalseg_fast"):  # interleaved, one at a time
                    out = work / f"{kind}_{mode}_{repeat}_{tool}"
                    shutil.rmtree(out, ignore_errors=True)
                    out.mkdir(parents=True)
                    log(f"tool vs TotalSegmentator: {case_id} {kind} {mode} {tool} (repeat {repeat + 1})")
                    row = {"case_id": case_id, "kind": kind, "mode": mode, "repeat": repeat, "tool": tool,
                           "threads": threads, **timed_run(_command(tool, source, out, mode, threads), env)}
                    rows.append(row)
                    outs[tool] = out
                identical, why = same_outputs(outs["totalsegmentator"], outs["totalseg_fast"])
                for row in rows[-2:]:
                    row.update(identical=identical, detail=why)
                    if rows_path is not None:
                        with open(rows_path, "a") as f:
                            f.write(json.dumps(row, default=str) + "\n")
                for out in outs.values():
                    shutil.rmtree(out, ignore_errors=True)
    return rows


def markdown(rows: list[dict], weights: str, cpu: str) -> str:
    """The report's table: medians per case, kind and mode; ratios TotalSegmentator / ours."""
    import pandas as pd

    if not rows:
        return ""
    df = pd.DataFrame(rows)
    lines = ["## The tool against TotalSegmentator's CLI", "",
             f"Each command a fresh process (`TotalSegmentator ... --fast -d cpu` against `totalseg_fast` with the "
             f"same flags), wall time from spawn to exit and peak memory of its process tree, run interleaved, "
             f"one at a time; {weights} weights, {cpu}. *Identical*: every output file's voxels, affine, dtype, "
             "header and label map equal.", "",
             "| case | input | mode | threads | TotalSegmentator s | ours s | speed-up | TotalSegmentator MB | "
             "ours MB | memory ratio | identical | runs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (case, kind, mode), group in df.groupby(["case_id", "kind", "mode"], sort=False):
        ok = group[group.returncode == 0]
        ts, ours = ok[ok.tool == "totalsegmentator"], ok[ok.tool == "totalseg_fast"]
        if ts.empty or ours.empty:
            errors = "; ".join(sorted(set(group.error) - {""}))[:200]
            lines.append(f"| {case} | {kind} | {'--ml' if mode == 'ml' else 'folder'} | {group.threads.iloc[0]} | "
                         f"error: {errors} | | | | | | | {len(group) // 2} |")
            continue
        t_ts, t_us = ts.wall_s.median(), ours.wall_s.median()
        m_ts, m_us = ts.peak_mb.median(), ours.peak_mb.median()
        identical = "yes" if group.identical.all() else f"no ({group.detail.iloc[0]})"
        lines.append(f"| {case} | {kind} | {'--ml' if mode == 'ml' else 'folder'} | {group.threads.iloc[0]} | "
                     f"{t_ts:.1f} | {t_us:.1f} | {t_ts / t_us:.2f}x | {m_ts:.0f} | {m_us:.0f} | "
                     f"{m_us / m_ts:.2f} | {identical} | {len(ts)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """`python -m common.production.tool_vs_ts IMAGE [--repeats N] [--threads T] [--out FILE]`: the table alone."""
    import argparse
    import tempfile

    from common.core.env import environment_record
    from common.model.weights import read_model_info

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("image", type=Path)
    parser.add_argument("--case-id", default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--kinds", default="nifti,dicom")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (and a .json of the rows beside it)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=paths.BENCHMARKS_DIR if paths.BENCHMARKS_DIR.is_dir() else None,
                                     prefix=".tool_vs_ts_") as work:
        rows = compare(args.case_id or args.image.name.split(".")[0], args.image, args.threads, Path(work),
                       args.repeats, args.modes.split(","), args.kinds.split(","),
                       log=lambda m: print(m, file=sys.stderr),
                       rows_path=args.out.with_suffix(".jsonl") if args.out else None)
    env = environment_record(args.threads)
    text = markdown(rows, read_model_info().get("weights_kind", "?"), env.get("cpu_model", "?"))
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
    return 0 if rows and all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
