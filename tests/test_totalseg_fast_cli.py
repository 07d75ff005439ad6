"""The `totalseg_fast` command (issue 22 items 1 and 5): TotalSegmentator's flags, its refusals, -rs / -s / -p,
the class names, no torch on the exact path, and bad NIfTI inputs (one line each, exit 1, nothing in -o).

Run as users run it, `python -m totalseg_fast` from the repository root, on generated phantoms and the suite's
stand-in model (conftest's onnx_model). File-for-file identity with TotalSegmentator itself is
tests/test_totalseg_fast_vs_totalsegmentator.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.core import paths
from totalseg_fast.classes import TOTAL_CLASSES

VARIANT = ["--variant", "exact_ort_default"]  # an exact variant that every machine with onnxruntime has


def tool(*args, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "totalseg_fast", *map(str, args)], cwd=paths.REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory) -> Path:
    """Already on the 3 mm grid and one tile: the cheapest real run."""
    from common.data.phantoms import make_phantom

    hu, _, affine = make_phantom((118, 108, 108), (3.0, 3.0, 3.0), "RAS", seed=7)
    path = tmp_path_factory.mktemp("small") / "small_ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), path)
    return path


def test_class_names_are_totalsegmentators():
    class_map = pytest.importorskip("totalsegmentator.map_to_binary").class_map
    assert TOTAL_CLASSES == class_map["total"]
    assert len(TOTAL_CLASSES) == 117 and list(TOTAL_CLASSES) == list(range(1, 118))


def test_help_reads_like_totalsegmentator():
    proc = tool("--help")
    assert proc.returncode == 0
    for flag in ("-i filepath", "-o directory", "--ml", "-ot", "--output_type", "-rs", "--roi_subset", "-s",
                 "--statistics", "-sii", "-p", "--preview", "-q", "-nr", "-ns", "-d", "--fast", "--engine",
                 "--variant", "--threads", "--cpus", "--resume"):
        assert flag in proc.stdout, flag
    assert "dicom" in proc.stdout and "multilabel" in proc.stdout


@pytest.mark.parametrize("args, says", [
    (["-d", "gpu"], "-d cpu"),
    (["-d", "gpu:0"], "-d cpu"),
    (["--fastest"], "3 mm"),
    (["--task", "lung_vessels"], "'total'"),
    (["-rs", "livr"], "liver"),
    (["-ot", "dicom_sg"], "dicom_seg"),
])
def test_unsupported_options_are_one_usage_line(tmp_path, small_ct, args, says):
    out = tmp_path / "out"
    proc = tool("-i", small_ct, "-o", out, *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], proc.stderr
    assert not out.exists()


def test_no_input_is_a_usage_error(tmp_path):
    proc = tool("-o", tmp_path / "out")
    assert proc.returncode == 2 and "-i" in proc.stderr


def test_roi_subset_statistics_and_preview_without_torch(tmp_path, small_ct, onnx_model):
    """One run of the default exact path: exactly the named masks, statistics for them only, a PNG preview; and
    neither torch nor TotalSegmentator imported (the Rust float16 kernels do the accumulation)."""
    from common.runtime import native_kernels

    if not native_kernels.available():
        pytest.skip("rust/'s float16 kernels are not built (needs cargo; `make` builds them): the exact path "
                    "falls back to torch for the accumulation")
    wanted = ["liver", "spleen", "vertebrae_L1", "aorta"]
    out = tmp_path / "out"
    probe = ("import sys, runpy; sys.argv = sys.argv[1:]; "
             "import totalseg_fast.cli as c; rc = c.main(sys.argv[1:]); "
             "print('IMPORTED', sorted(m for m in ('torch', 'totalsegmentator') if m in sys.modules)); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", probe, "totalseg_fast", "-i", str(small_ct), "-o", str(out),
                           "-rs", *wanted, "-s", "-p", "--no-progress", "--threads", "2", *VARIANT],
                          cwd=paths.REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "IMPORTED []" in proc.stdout, proc.stdout
    assert sorted(os.listdir(out)) == sorted([f"{n}.nii.gz" for n in wanted] + ["preview_total.png",
                                                                                "statistics.json"])
    stats = json.loads((out / "statistics.json").read_text())
    assert list(stats) == [n for n in TOTAL_CLASSES.values() if n in wanted]
    assert (out / "preview_total.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    src = nib.load(small_ct)
    for name in wanted:
        mask = nib.load(out / f"{name}.nii.gz")
        assert mask.get_data_dtype() == np.uint8 and mask.shape == src.shape
        np.testing.assert_array_equal(mask.affine, src.affine)
        assert set(np.unique(np.asanyarray(mask.dataobj))) <= {0, 1}

    # the same run with --ml: the subset's labels are the full multilabel's labels of those classes
    full, subset = tmp_path / "full.nii.gz", tmp_path / "subset.nii.gz"
    for target, extra in ((full, []), (subset, ["-rs", *wanted])):
        proc = tool("-i", small_ct, "-o", target, "--ml", "-q", *extra, *VARIANT)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    labels_full, labels_subset = (np.asanyarray(nib.load(p).dataobj) for p in (full, subset))
    ids = [k for k, v in TOTAL_CLASSES.items() if v in wanted]
    np.testing.assert_array_equal(labels_subset, np.where(np.isin(labels_full, ids), labels_full, 0))
    assert len(np.unique(labels_full)) > len(np.unique(labels_subset)) > 1
    for name in wanted:  # the folder-mode masks are the multilabel's classes
        label = {v: k for k, v in TOTAL_CLASSES.items()}[name]
        np.testing.assert_array_equal(np.asanyarray(nib.load(out / f"{name}.nii.gz").dataobj),
                                      (labels_full == label).astype(np.uint8))


def test_bad_nifti_inputs_one_line_each_nothing_in_output(tmp_path, small_ct, onnx_model):
    """Folder mode over a folder of bad files plus a missing one: a line each, exit 1, no per-input folder."""
    from test_segment import assert_one_error_line_each, make_bad_inputs

    bad = make_bad_inputs(tmp_path / "in", small_ct)
    out = tmp_path / "out"
    proc = tool("-i", tmp_path / "in", tmp_path / "missing.nii.gz", "-o", out, "--no-progress", *VARIANT)
    assert proc.returncode == 1, proc.stderr
    assert_one_error_line_each(proc.stderr, [*bad.values(), tmp_path / "missing.nii.gz"])
    assert "Traceback" not in proc.stderr
    assert os.listdir(out) == []


def test_outputs_match_totalsegmentators_own_functions(tmp_path):
    """Without any model: our writers against TotalSegmentator's own code on the same labels (an LPS grid with a
    non-trivial header): masks as its save_segmentation_nifti writes them, the label-map extension of
    add_label_map_to_nifti, and get_basic_statistics (border rule included) to float rounding."""
    nnunet = pytest.importorskip("totalsegmentator.nifti_ext_header")
    ts_stats = pytest.importorskip("totalsegmentator.statistics")
    from totalseg_fast import outputs

    rng = np.random.default_rng(3)
    labels = np.zeros((40, 36, 30), np.uint8)
    for label in (1, 5, 7, 51, 117):  # boxes; 117 touches the border
        lo = rng.integers(4, 20, 3)
        labels[lo[0]:lo[0] + 9, lo[1]:lo[1] + 8, lo[2]:lo[2] + 6] = label
    labels[:3, :3, :3] = 117
    ct = rng.integers(-1000, 1500, labels.shape).astype(np.int32)
    affine = np.array([[-0.8, 0, 0, 90.3], [0, -0.8, 0, 120.1], [0, 0, 2.5, -300.7], [0, 0, 0, 1]])
    header = nib.Nifti1Image(ct.astype(np.int16), affine).header
    header["descrip"] = b"scanner header"

    classes = dict(TOTAL_CLASSES)
    outputs.write_masks(labels, affine, header, tmp_path / "ours", classes, threads=2, candidates=[0, 1, 5, 7, 51, 117])
    new_header = header.copy()
    new_header.set_data_dtype(np.uint8)
    for label, name in [(1, "spleen"), (5, "liver"), (117, "costal_cartilages"), (2, "kidney_right")]:
        theirs = tmp_path / f"ts_{name}.nii.gz"
        nib.save(nib.Nifti1Image((labels == label).astype(np.uint8), affine, new_header), theirs)
        a, b = nib.load(theirs), nib.load(tmp_path / "ours" / f"{name}.nii.gz")
        assert b.header.binaryblock == a.header.binaryblock, name
        np.testing.assert_array_equal(np.asanyarray(b.dataobj), np.asanyarray(a.dataobj))
    assert len(list((tmp_path / "ours").glob("*.nii.gz"))) == 117

    ours_ml = outputs.write_multilabel(labels, affine, header, tmp_path / "ml.nii.gz", classes)
    ts_img = nnunet.add_label_map_to_nifti(nib.Nifti1Image(labels, affine, new_header), classes)
    nib.save(ts_img, tmp_path / "ts_ml.nii.gz")
    a, b = nib.load(tmp_path / "ts_ml.nii.gz"), nib.load(ours_ml)
    assert b.header.binaryblock == a.header.binaryblock
    assert [e.get_content() for e in b.header.extensions] == [e.get_content() for e in a.header.extensions]

    ct_img = nib.Nifti1Image(ct, affine)
    for exclude in (True, False):
        expected = ts_stats.get_basic_statistics(labels, ct_img, None, quiet=True, exclude_masks_at_border=exclude)
        got = outputs.statistics(labels, ct, ct_img.header.get_zooms(), classes, exclude_masks_at_border=exclude)
        assert list(got) == list(expected)
        for name, entry in expected.items():
            assert got[name]["volume"] == pytest.approx(float(entry["volume"]), rel=1e-12), name
            assert got[name]["intensity"] == pytest.approx(float(entry["intensity"]), abs=1e-5), name
        assert (got["costal_cartilages"]["volume"] == 0) == exclude  # the border rule
        assert got["liver"]["volume"] > 0


def test_default_variant_without_05_results_is_the_measured_exact_one(tmp_path, monkeypatch):
    from common.runtime import native_kernels
    from common.variants.table import get_variant
    from totalseg_fast.inputs import MEASURED_EXACT, MEASURED_EXACT_PORTABLE, default_variant

    pytest.importorskip("openvino")
    name, note = default_variant(tmp_path)  # a folder without onnx_optimized_results.csv
    expected = MEASURED_EXACT if native_kernels.fused_head_available() else MEASURED_EXACT_PORTABLE
    assert name == expected and "no 05 results" in note
    monkeypatch.setattr(native_kernels, "fused_head_available", lambda: False)  # no kernels or no AVX-512
    name_portable, note = default_variant(tmp_path)
    assert name_portable == MEASURED_EXACT_PORTABLE and "AVX-512" in note
    assert get_variant(name).tier == get_variant(name_portable).tier == "exact"


def test_tool_vs_totalsegmentator_table_and_identity_check(tmp_path):
    """06's comparison: one changed voxel (or a changed header) is 'not identical'; the table's ratios."""
    from common.production.tool_vs_ts import markdown, same_outputs

    data = np.zeros((6, 5, 4), np.uint8)
    data[2, 2, 2] = 1
    for name in ("theirs", "ours"):
        (tmp_path / name).mkdir()
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / name / "liver.nii.gz")
    assert same_outputs(tmp_path / "theirs", tmp_path / "ours") == (True, "1 files identical")
    changed = data.copy()
    changed[0, 0, 0] = 1
    nib.save(nib.Nifti1Image(changed, np.eye(4)), tmp_path / "ours" / "liver.nii.gz")
    assert same_outputs(tmp_path / "theirs", tmp_path / "ours")[0] is False
    nib.save(nib.Nifti1Image(data, np.diag([2, 1, 1, 1])), tmp_path / "ours" / "liver.nii.gz")
    assert same_outputs(tmp_path / "theirs", tmp_path / "ours")[0] is False

    rows = [dict(case_id="c", kind="nifti", mode="ml", repeat=0, tool=tool, threads=2, wall_s=wall, peak_mb=mb,
                 returncode=0, error="", identical=True, detail="1 files identical")
            for tool, wall, mb in (("totalsegmentator", 60.0, 5400.0), ("totalseg_fast", 20.0, 1800.0))]
    table = markdown(rows, "proxy", "a CPU")
    assert "| c | nifti | --ml | 2 | 60.0 | 20.0 | 3.00x | 5400 | 1800 | 0.33 | yes | 1 |" in table
