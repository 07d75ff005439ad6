"""Issue 22 item 3: `totalseg_fast` writes the files `TotalSegmentator --fast -d cpu` writes, on the same weights.

Both commands run as fresh processes on the proxy weights, exported once for this module into its own models
folder (TSBENCH_MODELS_DIR, TOTALSEG_HOME_DIR), so the project's models/ (the test suite's stand-in) is untouched
and no real CT is needed: the input is a generated one-tile phantom (LPS storage, 1 x 1 x 5 mm), as NIfTI, as
a DICOM folder and as a DICOM zip. Compared file by file: the same file names, voxels, affine, dtype and header
bytes of every mask; the multilabel file's label-map extension; statistics.json to float rounding.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.core import paths

TOTALSEGMENTATOR = Path(sys.executable).parent / "TotalSegmentator"
pytestmark = pytest.mark.skipif(not TOTALSEGMENTATOR.is_file(), reason="TotalSegmentator's CLI is not installed")


@pytest.fixture(scope="module")
def proxy_env(tmp_path_factory) -> dict:
    """The environment both commands run in: the proxy exported into this module's own models folder."""
    root = tmp_path_factory.mktemp("proxy_models")
    env = {**os.environ, "TSBENCH_MODELS_DIR": str(root / "models"),
           "TOTALSEG_HOME_DIR": str(root / "models" / "totalseg_home"),
           "TSBENCH_SHARED_DATA": str(root / "no_shared_data")}  # the export check uses a generated volume
    proc = subprocess.run([sys.executable, "02_export_model.py", "--weights", "proxy", "--skip-shape-study",
                           "--report", str(root / "export_report.md")],
                          cwd=paths.REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((root / "models" / "model_info.json").read_text())["weights_kind"] == "proxy"
    return env


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from common.data.phantoms import make_phantom

    # 85 x 85 x 67 at 3 mm: one tile; small, so that the 117 masks both commands write at this grid stay cheap
    hu, _, affine = make_phantom((256, 256, 40), (1.0, 1.0, 5.0), "LPS", seed=7)
    path = tmp_path_factory.mktemp("phantom") / "ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), path)
    return path


@pytest.fixture(scope="module")
def dicom_folder(tmp_path_factory, phantom) -> Path:
    write_ct_series = pytest.importorskip("totalseg_fast.dicom.testing").write_ct_series
    folder = tmp_path_factory.mktemp("dicom") / "series"
    write_ct_series(phantom, folder)
    return folder


def run(command: list, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=paths.REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{command[:3]}: {proc.stderr[-3000:]}"
    return proc


def totalsegmentator(args: list, env: dict) -> subprocess.CompletedProcess:
    return run([str(TOTALSEGMENTATOR), *args, "--fast", "-d", "cpu"], env)


def totalseg_fast(args: list, env: dict) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "totalseg_fast", *args, "--fast", "-d", "cpu", "--no-progress"], env)


def assert_same_nifti(theirs: Path, ours: Path) -> np.ndarray:
    a, b = nib.load(theirs), nib.load(ours)
    data_a, data_b = np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)
    assert data_a.dtype == data_b.dtype == np.uint8, ours.name
    assert a.get_data_dtype() == b.get_data_dtype() == np.uint8, ours.name
    np.testing.assert_array_equal(data_b, data_a, err_msg=ours.name)
    np.testing.assert_array_equal(b.affine, a.affine, err_msg=ours.name)
    assert b.header.binaryblock == a.header.binaryblock, ours.name  # every header field, vox_offset included
    assert [(e.get_code(), e.get_content()) for e in b.header.extensions] == \
           [(e.get_code(), e.get_content()) for e in a.header.extensions], ours.name
    return data_a


def assert_same_statistics(theirs: Path, ours: Path) -> None:
    a, b = json.loads(theirs.read_text()), json.loads(ours.read_text())
    assert list(b) == list(a) and len(a) == 117
    for name in a:
        assert list(b[name]) == list(a[name]), name
        for key, value in a[name].items():
            assert b[name][key] == pytest.approx(value, rel=1e-9, abs=1e-9), (name, key)
    assert any(entry["volume"] > 0 for entry in a.values())  # not a comparison of two empty tables


def assert_same_mask_folders(theirs: Path, ours: Path) -> None:
    names = sorted(p.name for p in theirs.glob("*.nii.gz"))
    assert len(names) == 117
    assert sorted(p.name for p in ours.glob("*.nii.gz")) == names
    present = 0
    for name in names:
        present += int(assert_same_nifti(theirs / name, ours / name).any())
    assert present >= 10, f"only {present} non-empty masks: the comparison would prove little"
    assert not [p for p in ours.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_nifti_folder_mode_and_statistics(tmp_path, proxy_env, phantom):
    totalsegmentator(["-i", str(phantom), "-o", str(tmp_path / "ts"), "-s"], proxy_env)
    totalseg_fast(["-i", str(phantom), "-o", str(tmp_path / "ours"), "-s"], proxy_env)
    assert_same_mask_folders(tmp_path / "ts", tmp_path / "ours")
    assert_same_statistics(tmp_path / "ts" / "statistics.json", tmp_path / "ours" / "statistics.json")


def test_nifti_multilabel(tmp_path, proxy_env, phantom):
    """Run with the fused head (the exact variant the study measured fastest) where it can run; the other cases
    run the tool's default (05's pick of this checkout's results)."""
    from common.runtime import native_kernels

    fused = ["--variant", "exact_ov_f32_fused_head"] if native_kernels.fused_head_available() else []
    totalsegmentator(["-i", str(phantom), "-o", str(tmp_path / "ts" / "seg.nii.gz"), "--ml"], proxy_env)
    totalseg_fast(["-i", str(phantom), "-o", str(tmp_path / "ours" / "seg.nii.gz"), "--ml", *fused], proxy_env)
    labels = assert_same_nifti(tmp_path / "ts" / "seg.nii.gz", tmp_path / "ours" / "seg.nii.gz")
    assert len(np.unique(labels)) > 10
    assert len(nib.load(tmp_path / "ours" / "seg.nii.gz").header.extensions) == 1
    assert sorted(os.listdir(tmp_path / "ours")) == ["seg.nii.gz"]


def test_dicom_folder_multilabel_and_statistics(tmp_path, proxy_env, dicom_folder):
    totalsegmentator(["-i", str(dicom_folder), "-o", str(tmp_path / "ts" / "seg.nii.gz"), "--ml", "-s"], proxy_env)
    totalseg_fast(["-i", str(dicom_folder), "-o", str(tmp_path / "ours" / "seg.nii.gz"), "--ml", "-s"], proxy_env)
    labels = assert_same_nifti(tmp_path / "ts" / "seg.nii.gz", tmp_path / "ours" / "seg.nii.gz")
    assert len(np.unique(labels)) > 10
    assert_same_statistics(tmp_path / "ts" / "statistics.json", tmp_path / "ours" / "statistics.json")


def test_dicom_zip_multilabel(tmp_path, proxy_env, dicom_folder):
    """The zip is about reading the input (folder mode is checked on NIfTI above), so one multilabel file each."""
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(dicom_folder.iterdir()):
            zf.write(path, f"study/{path.name}")
    totalsegmentator(["-i", str(archive), "-o", str(tmp_path / "ts" / "seg.nii.gz"), "--ml"], proxy_env)
    totalseg_fast(["-i", str(archive), "-o", str(tmp_path / "ours" / "seg.nii.gz"), "--ml"], proxy_env)
    labels = assert_same_nifti(tmp_path / "ts" / "seg.nii.gz", tmp_path / "ours" / "seg.nii.gz")
    assert len(np.unique(labels)) > 10
