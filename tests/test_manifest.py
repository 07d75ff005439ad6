"""Manifest format, case selection, label maps, --from-dir scanning and the offline CLI."""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.core.paths import shared_data_dir
from common.data import phantoms
from common.data.cases import (ABDOMENCTCT, COLUMNS, Case, DataError, label_map_from_json, labelled_pairs, make_case,
                               read_manifest, scan_dir, select_evenly, write_manifest)

REPO = Path(__file__).resolve().parents[1]

SHARED = shared_data_dir()
needs_shared = pytest.mark.skipif(not (SHARED / "example_ct.nii.gz").is_file(),
                                  reason=f"real CT case: real CTs not found in {SHARED}")
SHARED_SHA256 = {
    "example_ct": "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1",
    "example_ct_sm": "e50c00b2914e2cac0aaee8e7f3b5f57d44d9f21bfd5c0577271c54c0cb49e9fb",
}
TINY_SET = (phantoms.PhantomSpec("phantom_00", (40, 40, 24), (10.0, 10.0, 18.0), "RAS", 1),
            phantoms.PhantomSpec("phantom_01", (36, 40, 30), (11.0, 10.0, 15.0), "LPS", 2))


def _cli():
    spec = importlib.util.spec_from_file_location("download_cli_m", REPO / "01_download_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _save(path: Path, data: np.ndarray, affine=np.diag([0.8, 0.8, 2.5, 1])):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


# --------------------------------------------------------------------------- manifest

def test_manifest_round_trip(tmp_path):
    img = _save(tmp_path / "imgs" / "a.nii.gz", np.zeros((4, 5, 6), np.int16))
    lab = _save(tmp_path / "imgs" / "labels" / "a.nii.gz", np.zeros((4, 5, 6), np.uint8))
    cases = [make_case("a", img, lab, {6: 5, 1: 1}, "abdomenctct"),
             make_case("b", img, None, {}, "from_dir")]
    path = write_manifest(cases, tmp_path / "out" / "manifest.csv", info={"dataset": "x"})

    with open(path, newline="") as f:
        raw = list(csv.reader(f))
    assert tuple(raw[0]) == COLUMNS
    assert raw[1] == ["a", "../imgs/a.nii.gz", "../imgs/labels/a.nii.gz", "1:1;6:5", "abdomenctct",
                      "4x5x6", "0.8x0.8x2.5", "RAS", hashlib.sha256(img.read_bytes()).hexdigest()]
    assert raw[2][2] == "" and raw[2][3] == ""
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == {"dataset": "x"}
    assert not list((tmp_path / "out").glob(".*tmp")), "temporary file renamed away"

    rows = read_manifest(path)
    a, b = rows
    assert isinstance(a, Case) and a["case_id"] == a.case_id == "a"
    assert a.image == img.absolute() and a.label == lab.absolute() and b.label is None
    assert a.label_map == {1: 1, 6: 5} and b.label_map == {}
    assert a.shape == (4, 5, 6) and a.spacing == (0.8, 0.8, 2.5) and a.orientation == "RAS"


def test_manifest_refuses_duplicate_ids(tmp_path):
    img = _save(tmp_path / "a.nii.gz", np.zeros((2, 2, 2), np.int16))
    c = make_case("a", img, None, {}, "from_dir")
    with pytest.raises(DataError, match="duplicate"):
        write_manifest([c, c], tmp_path / "manifest.csv")


def test_read_manifest_reports_missing_columns(tmp_path):
    (tmp_path / "m.csv").write_text("case_id,image\nx,y\n")
    with pytest.raises(DataError, match="missing columns"):
        read_manifest(tmp_path / "m.csv")


# --------------------------------------------------------------------------- selection and labels

def test_select_evenly_is_the_documented_rule():
    items = list(range(41))
    assert select_evenly(items, 10) == [0, 4, 9, 13, 18, 22, 27, 31, 36, 40]
    assert select_evenly(items, 1) == [0]
    assert select_evenly(items, 2) == [0, 40]
    assert select_evenly(items[:5], 10) == items[:5]
    assert select_evenly(items, 0) == []


def test_labelled_pairs_sorted_by_number_and_skip_macos(tmp_path):
    for n in (10, 2, 33, 1):
        (tmp_path / "T/imagesTr").mkdir(parents=True, exist_ok=True)
        (tmp_path / "T/labelsTr").mkdir(parents=True, exist_ok=True)
        (tmp_path / f"T/imagesTr/spleen_{n}.nii.gz").write_bytes(b"x")
        if n != 33:  # unlabelled: not a candidate
            (tmp_path / f"T/labelsTr/spleen_{n}.nii.gz").write_bytes(b"x")
    (tmp_path / "T/imagesTr/._spleen_2.nii.gz").write_bytes(b"junk")
    (tmp_path / "T/labelsTr/._spleen_2.nii.gz").write_bytes(b"junk")
    names = [img.name for img, _ in labelled_pairs(tmp_path)]
    assert names == ["spleen_1.nii.gz", "spleen_2.nii.gz", "spleen_10.nii.gz"]


def test_abdomenctct_label_map_matches_totalsegmentator():
    """The dataset's labels 1..13 (BTCV order, as its own dataset.json names them) land on the TotalSegmentator
    classes of the same names, read from TotalSegmentator's class map, not from a copy of ours."""
    map_to_binary = pytest.importorskip("totalsegmentator.map_to_binary",
                                        reason="totalsegmentator not installed: its class map is the reference")
    class_map = map_to_binary.class_map["total"]
    btcv_names = ["spleen", "kidney_right", "kidney_left", "gallbladder", "esophagus", "liver", "stomach",
                  "aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein", "pancreas",
                  "adrenal_gland_right", "adrenal_gland_left"]
    m = ABDOMENCTCT.label_map
    assert sorted(m) == list(range(1, 14))
    assert [class_map.get(m[i]) for i in range(1, 14)] == btcv_names


def test_label_map_from_json(tmp_path):
    names = ["spleen", "right kidney", "left kidney", "gall bladder", "esophagus", "liver", "stomach",
             "aorta", "inferior vena cava", "portal and splenic vein", "pancreas",
             "right adrenal gland", "left adrenal gland"]
    js = tmp_path / "d.json"
    js.write_text(json.dumps({"labels": {str(i + 1): n for i, n in enumerate(names)} | {"0": "background"}}))
    assert label_map_from_json(js) == ABDOMENCTCT.label_map
    swapped = names[:]
    swapped[0], swapped[5] = swapped[5], swapped[0]
    js.write_text(json.dumps({"labels": {str(i + 1): n for i, n in enumerate(swapped)}}))
    assert label_map_from_json(js)[1] == 5 and label_map_from_json(js)[6] == 1
    js.write_text(json.dumps({"labels": {"1": "unknown organ"}}))
    assert label_map_from_json(js) is None
    js.write_text("not json")
    assert label_map_from_json(js) is None


# --------------------------------------------------------------------------- --from-dir

@needs_shared
def test_scan_shared_data_skips_segmentations():
    cases = scan_dir(SHARED)
    assert [c.case_id for c in cases] == ["example_ct", "example_ct_sm"]
    for c in cases:
        assert c.sha256 == SHARED_SHA256[c.case_id]
        assert c.label is None and c.label_map == {} and c.source == "from_dir"
        assert c.spacing == (3.0, 3.0, 3.0) and c.orientation == "RAS"
    assert cases[1].shape == (122, 101, 30)
    everything = scan_dir(SHARED, exclude=())
    assert len(everything) == 5, "with no filter the segmentations are cases too"


def test_scan_dir_reads_labels_folder(tmp_path):
    _save(tmp_path / "ct1.nii.gz", np.zeros((4, 4, 4), np.int16))
    _save(tmp_path / "ct2.nii", np.zeros((4, 4, 4), np.int16), np.diag([-1, -1, 1, 1.0]))
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[0, 0, 0], lab[1, 1, 1] = 5, 52
    _save(tmp_path / "labels" / "ct1.nii.gz", lab)
    _save(tmp_path / "ct1_seg.nii.gz", lab)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "broken.nii.gz").write_bytes(b"not nifti")
    cases = {c.case_id: c for c in scan_dir(tmp_path, log=lambda m: None)}
    assert set(cases) == {"ct1", "ct2"}
    assert cases["ct1"].label == tmp_path / "labels" / "ct1.nii.gz"
    assert cases["ct1"].label_map == {5: 5, 52: 52}
    assert cases["ct2"].label is None and cases["ct2"].orientation == "LPS"


def test_scan_dir_without_cts_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no CT images"):
        scan_dir(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        scan_dir(tmp_path / "nope")


# --------------------------------------------------------------------------- offline CLI

@pytest.fixture
def tiny_set(monkeypatch):
    monkeypatch.setattr(phantoms, "DEFAULT_SET", TINY_SET)


def test_cli_offline_with_from_dir(tmp_path, tiny_set, capsys):
    cli = _cli()
    extra = tmp_path / "mine"
    _save(extra / "scan.nii.gz", np.zeros((4, 4, 4), np.int16))
    _save(extra / "scan_seg.nii.gz", np.zeros((4, 4, 4), np.uint8))
    out = tmp_path / "ct_data"
    assert cli.main(["--dataset", "offline", "--out", str(out), "--from-dir", str(extra), "--no-progress"]) == 0
    rows = read_manifest(out / "manifest.csv")
    assert [r.case_id for r in rows] == ["phantom_00", "phantom_01", "scan"]
    p0, p1, scan = rows
    assert p0.source == p1.source == "offline_phantom" and scan.source == "from_dir"
    assert p0.orientation == "RAS" and p1.orientation == "LPS"
    assert p1.shape == (36, 40, 30) and p1.spacing == (11.0, 10.0, 15.0)
    assert p0.label.is_file() and p0.label_map[5] == 5 and p0.label_map[1] == 1
    lab = np.asanyarray(nib.load(p0.label).dataobj)
    assert set(p0.label_map) == {int(v) for v in np.unique(lab) if v}
    assert json.loads((out / "manifest.json").read_text())["dataset"] == "offline"

    mtime = p0.image.stat().st_mtime_ns
    assert cli.main(["--dataset", "offline", "--out", str(out), "--no-progress"]) == 0
    assert p0.image.stat().st_mtime_ns == mtime, "an up-to-date phantom is not regenerated"
    assert "up to date" in capsys.readouterr().out
    assert len(read_manifest(out / "manifest.csv")) == 2

    p0.image.write_bytes(b"damaged")
    assert cli.main(["--dataset", "offline", "--out", str(out), "--no-progress"]) == 0
    assert read_manifest(out / "manifest.csv")[0].sha256 == rows[0].sha256, "damaged file regenerated"


@needs_shared
def test_cli_from_shared_dir_only(tmp_path, capsys):
    out = tmp_path / "ct_data"
    assert _cli().main(["--dataset", "none", "--from-dir", str(SHARED), "--out", str(out)]) == 0
    rows = read_manifest(out / "manifest.csv")
    assert [r.case_id for r in rows] == ["example_ct", "example_ct_sm"]
    assert all(r.image.is_file() for r in rows)


def test_cli_no_cases_is_one_error_line(tmp_path, capsys):
    assert _cli().main(["--dataset", "none", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no cases") and err.count("\n") == 1
