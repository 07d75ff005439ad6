"""Segment mode (06 ... segment, the same code as `totalseg_fast`): TotalSegmentator-compatible output on the input
grid; bad inputs cost one error line each, a non-zero exit, and leave nothing in the output folder. Runs on a
generated phantom (no real CT needed); file-for-file identity with TotalSegmentator's CLI is
tests/test_totalseg_fast_vs_totalsegmentator.py."""
import gzip
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.core import paths
from common.harness import bench
from totalseg_fast.cli import main as segment_main
from totalseg_fast.inputs import expand_inputs, nifti_stem
from parity_bounds import EXACT_MIN, assert_main_labels_present

SCRIPT = paths.REPO_ROOT / "06_linux_production_benchmark.py"


def make_bad_inputs(folder: Path, good: Path) -> dict[str, Path]:
    """Files that must each fail with a one-line reason: garbage, empty, truncated, 4-D, NaN voxels."""
    folder.mkdir(parents=True, exist_ok=True)
    bad = {"garbage": folder / "garbage.nii.gz", "empty": folder / "empty.nii", "truncated": folder / "truncated.nii.gz",
           "four_d": folder / "four_d.nii.gz", "nan": folder / "nan.nii.gz"}
    bad["garbage"].write_bytes(b"this is not a NIfTI file at all")
    bad["empty"].write_bytes(b"")
    raw = gzip.decompress(good.read_bytes())
    bad["truncated"].write_bytes(gzip.compress(raw[: len(raw) // 2]))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.int16), np.eye(4)), bad["four_d"])
    data = np.zeros((16, 16, 16), np.float32)
    data[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), bad["nan"])
    return bad


@pytest.fixture(scope="module")
def good_ct(tmp_path_factory) -> Path:
    """A one-tile phantom stored LPS at 0.7 x 0.7 x 5 mm (resampled and reoriented on the way in and out)."""
    from common.data.phantoms import make_phantom

    hu, _, affine = make_phantom((400, 400, 60), (0.7, 0.7, 5.0), "LPS", seed=7)
    path = tmp_path_factory.mktemp("good") / "phantom_ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), path)
    return path


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def assert_one_error_line_each(stderr: str, failed: list[Path]) -> list[str]:
    """Exactly one `error: <input>: <reason>` line per failed input, each with a reason; returns the lines."""
    errors = error_lines(stderr)
    assert len(errors) == len(failed), stderr
    for path in failed:
        [line] = [e for e in errors if e.startswith(f"error: {path}: ")]
        assert len(line) > len(f"error: {path}: ") + 3
    return errors


def test_expand_inputs_folder_and_names(tmp_path):
    (tmp_path / "b.nii.gz").write_bytes(b"x")
    (tmp_path / "a.nii").write_bytes(b"x")
    (tmp_path / ".hidden.nii.gz").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty_dir").mkdir()
    files, errors = expand_inputs([str(tmp_path), str(tmp_path / "empty_dir"), "missing.nii.gz"])
    assert [f.name for f in files] == ["a.nii", "b.nii.gz", "missing.nii.gz"]
    assert errors == [(str(tmp_path / "empty_dir"), "folder holds no .nii or .nii.gz file")]
    assert nifti_stem(Path("x/ct.nii.gz")) == "ct" and nifti_stem(Path("ct.nii")) == "ct"


def test_segment_good_ct_and_bad_inputs(tmp_path, good_ct, onnx_model, threads, vanilla):
    """One CLI run: a folder holding a good CT and bad files, plus a missing file."""
    good_src = good_ct
    inputs = tmp_path / "in"
    bad = make_bad_inputs(inputs, good_src)
    os.symlink(good_src, inputs / "phantom_ct.nii.gz")
    out = tmp_path / "out"
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    command = [sys.executable, str(SCRIPT), "segment", str(inputs), str(tmp_path / "missing.nii.gz"), "-o", str(out), "--ml",
               "--variant", "exact_ort_default", "--threads", str(threads), "--cpus", ",".join(map(str, cpus)),
               "--no-progress"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=paths.REPO_ROOT, timeout=300)

    assert proc.returncode == 1, proc.stderr
    errors = assert_one_error_line_each(proc.stderr, [*bad.values(), tmp_path / "missing.nii.gz"])
    assert any("no such file" in e for e in errors) and any("truncated" in e for e in errors)
    assert any("NaN" in e for e in errors) and any("3-D" in e for e in errors)
    # Only the good input's output, no temporary or partial files of the others.
    assert sorted(os.listdir(out)) == ["phantom_ct.nii.gz"]

    src, seg = nib.load(good_src), nib.load(out / "phantom_ct.nii.gz")
    assert seg.shape == src.shape
    np.testing.assert_array_equal(seg.affine, src.affine)
    assert seg.get_data_dtype() == np.uint8
    assert seg.header.get_zooms() == src.header.get_zooms()
    assert (seg.header["sform_code"], seg.header["qform_code"]) == (src.header["sform_code"], src.header["qform_code"])
    labels = np.asanyarray(seg.dataobj)
    reference = bench.read_labels(vanilla(good_src))  # TotalSegmentator's labels, same (stand-in) weights
    assert_main_labels_present(labels, reference)
    assert float((labels == reference).mean()) >= EXACT_MIN  # an exact variant: TotalSegmentator's labels
    assert "1 of 7 inputs written" in proc.stderr


def test_segment_only_bad_inputs_leaves_nothing(tmp_path, good_ct, onnx_model, threads, capsys):
    bad = make_bad_inputs(tmp_path / "in", good_ct)
    out = tmp_path / "out"
    rc = segment_main([*(str(p) for p in bad.values()), "-o", str(out), "--ml", "--variant", "exact_ort_default",
                       "--threads", str(threads), "--no-progress"])
    assert rc == 1
    errors = error_lines(capsys.readouterr().err)
    assert [e.split(": ")[1] for e in errors] == [str(p) for p in bad.values()]
    assert os.listdir(out) == []


def test_segment_refuses_to_overwrite_input(tmp_path, good_ct, onnx_model, threads, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    src = folder / "ct.nii.gz"
    src.write_bytes(good_ct.read_bytes())
    before = src.read_bytes()
    rc = segment_main([str(src), "-o", str(folder), "--ml", "--variant", "exact_ort_default", "--threads", str(threads),
                       "--no-progress"])
    assert rc == 1
    [line] = error_lines(capsys.readouterr().err)
    assert line.startswith(f"error: {src}: ") and "overwrite the input" in line
    assert src.read_bytes() == before and sorted(os.listdir(folder)) == ["ct.nii.gz"]


def test_segment_unknown_variant_is_a_usage_error(tmp_path, capsys):
    rc = segment_main(["whatever.nii.gz", "-o", str(tmp_path / "out"), "--variant", "no_such_variant"])
    assert rc == 2
    assert "unknown variant 'no_such_variant'" in capsys.readouterr().err
