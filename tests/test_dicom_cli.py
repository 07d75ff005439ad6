"""DICOM through the command: bad inputs give ``error: <input>: <reason>``, exit 1 and leave nothing in -o; a good
series gives a DICOM-SEG and an RT-STRUCT that describe the multilabel file written beside them.

Runs ``python -m totalseg_fast`` as a user would (repository root as cwd) on the stand-in model (conftest's
``onnx_model``): the weights do not matter here, only what the command does with the inputs and outputs.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from dicom_bad_inputs import BAD
from totalseg_fast.dicom.testing import write_ct_series

ROOT = Path(__file__).resolve().parents[1]


def _phantom(spacing):
    from common.data.phantoms import make_phantom

    hu, labels, affine = make_phantom((64, 64, 40), spacing, "LPS", seed=3)
    return np.maximum(hu, -1024).astype(np.int16), labels, affine


@pytest.fixture(scope="module")
def phantom():
    """The bad inputs' phantom (dicom_bad_inputs.py's reasons name its 8 mm slices)."""
    return _phantom((6.0, 6.0, 8.0))


@pytest.fixture(scope="module")
def phantom_3mm():
    """Already on the 3 mm grid: the model sees one small tile (the stand-in's labels are noise; the plumbing
    is what counts here)."""
    return _phantom((3.0, 3.0, 3.0))


def _run(args: list, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "totalseg_fast", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _error_reasons(stderr: str) -> dict[str, str]:
    found = {}
    for line in stderr.splitlines():
        m = re.match(r"^error: (.+?): (.*)$", line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


def _empty(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


def test_every_bad_dicom_input_is_one_error_line_exit_1_and_nothing_in_o(onnx_model, phantom, tmp_path):
    """All bad inputs in one call (each its own line), then one alone (single-input mode)."""
    inputs = {}
    for case, build in sorted(BAD.items()):
        (tmp_path / case).mkdir()
        given, pattern = build(phantom, tmp_path / case)
        named = given.rename(given.with_name(case + given.suffix))  # distinct output names per input
        inputs[case] = (named, pattern)
    out = tmp_path / "out"
    proc = _run(["-i", *[p for p, _ in inputs.values()], "-o", out])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    reasons = _error_reasons(proc.stderr)
    for case, (given, pattern) in inputs.items():
        assert str(given) in reasons, f"{case}: no error line for {given} in:\n{proc.stderr[-3000:]}"
        assert re.match(pattern, reasons[str(given)]), f"{case}: {reasons[str(given)]!r} !~ {pattern!r}"
    assert _empty(out), sorted(p.name for p in out.rglob("*"))

    alone, pattern = inputs["gap"]
    out1 = tmp_path / "out_single"
    proc = _run(["-i", alone, "-o", out1, "--fast", "--ml"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert re.match(pattern, _error_reasons(proc.stderr)[str(alone)])
    assert _empty(out1)


def test_dicom_folder_to_seg_rtstruct_and_nifti(onnx_model, phantom_3mm, tmp_path):
    """-ot nifti dicom_seg dicom_rtstruct on a shuffled, compressed series: the multilabel NIfTI is on the grid
    TotalSegmentator's conversion gives, the SEG reads back to it slice for slice, the RT-STRUCT names its classes."""
    import highdicom as hd

    from totalseg_fast.dicom._common import labels_on_slices
    from totalseg_fast.dicom.series import read_dicom_input

    hu, _, affine = phantom_3mm
    series = tmp_path / "ct_series"
    write_ct_series(hu, series, affine, compress="jpegls", instance_numbers="shuffled")
    (series / "notes.txt").write_text("not DICOM\n")
    out = tmp_path / "out"
    out.mkdir()  # an existing folder: outputs named total_segmentation* inside it, as TotalSegmentator names them
    proc = _run(["-i", series, "-o", out, "--fast", "-ot", "nifti", "dicom_seg", "dicom_rtstruct"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ml = out / "total_segmentation.nii.gz"
    seg_path, rt_path = out / "total_segmentation_seg.dcm", out / "total_segmentation_rtstruct.dcm"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (ml, seg_path, rt_path))

    source = read_dicom_input(series, tmp_path / "work")
    grid = nib.load(source.nifti)
    labels_img = nib.load(ml)
    assert labels_img.shape == grid.shape
    np.testing.assert_allclose(labels_img.affine, grid.affine, atol=1e-5)
    expected = np.asarray(labels_on_slices(ml, source.datasets))
    present = sorted(set(np.unique(expected).tolist()) - {0})
    assert present, "the model wrote no label at all"

    seg = hd.seg.segread(seg_path)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.series_uid
    numbers = seg.get_segment_numbers()
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in source.datasets], segment_numbers=numbers,
        combine_segments=True, relabel=False)
    to_class = np.zeros(max(numbers) + 1, np.int32)
    to_class[numbers] = present
    np.testing.assert_array_equal(to_class[pixels], expected)

    from totalsegmentator.map_to_binary import class_map

    rt = pydicom.dcmread(rt_path)
    assert [r.ROIName for r in rt.StructureSetROISequence] == [class_map["total"][i] for i in present]
