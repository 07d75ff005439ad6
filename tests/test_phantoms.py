"""Synthetic phantoms: grids, orientation, anatomy on the right side, HU values, determinism."""
from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pytest

from common.data import phantoms
from common.data.phantoms import DEFAULT_SET, TS_IDS, make_phantom, write_phantom

# Coarse grid over a full abdominal field of view (416 x 416 x 432 mm), fast to make.
TINY = dict(shape=(64, 64, 48), spacing=(6.5, 6.5, 9.0))


@pytest.fixture(scope="module")
def ras():
    return make_phantom(**TINY, orientation="RAS", seed=7)


@pytest.fixture(scope="module")
def lps():
    return make_phantom(**TINY, orientation="LPS", seed=7)


def world_centroid(lab, affine, name):
    idx = np.argwhere(lab == TS_IDS[name])
    assert len(idx), f"{name} missing"
    return nib.affines.apply_affine(affine, idx.mean(0))


def test_types_shape_and_orientation(ras, lps):
    for (img, lab, affine), code in ((ras, ("R", "A", "S")), (lps, ("L", "P", "S"))):
        assert img.dtype == np.int16 and lab.dtype == np.uint8
        assert img.shape == lab.shape == TINY["shape"]
        assert nib.aff2axcodes(affine) == code
        assert np.allclose(nib.affines.voxel_sizes(affine), TINY["spacing"])


def test_lps_is_the_same_world_volume(ras, lps):
    a = nib.as_closest_canonical(nib.Nifti1Image(ras[0], ras[2]))
    b = nib.as_closest_canonical(nib.Nifti1Image(lps[0], lps[2]))
    assert np.allclose(a.affine, b.affine)
    assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    assert not np.array_equal(ras[0], lps[0]), "the stored arrays must differ (flipped)"


@pytest.mark.parametrize("which", ["ras", "lps"])
def test_anatomy_is_on_the_correct_side(which, request):
    img, lab, affine = request.getfixturevalue(which)
    c = {n: world_centroid(lab, affine, n) for n in
         ("liver", "spleen", "kidney_right", "kidney_left", "lung_lower_lobe_right", "lung_lower_lobe_left",
          "aorta", "inferior_vena_cava", "vertebrae_L3", "stomach", "iliac_artery_right")}
    # RAS world: +x is the patient's right, +y anterior, +z superior.
    assert c["liver"][0] > 20 and c["spleen"][0] < -20
    assert c["kidney_right"][0] > 20 and c["kidney_left"][0] < -20
    assert c["lung_lower_lobe_right"][0] > 0 > c["lung_lower_lobe_left"][0]
    assert c["aorta"][0] < c["inferior_vena_cava"][0], "aorta left of the IVC"
    assert c["stomach"][0] < 0
    assert c["vertebrae_L3"][1] < c["aorta"][1] < c["liver"][1] + 60, "spine posterior"
    assert c["lung_lower_lobe_right"][2] > c["liver"][2] > c["kidney_right"][2] > c["iliac_artery_right"][2]
    assert c["kidney_right"][2] < c["kidney_left"][2], "right kidney sits lower"


def test_hounsfield_units(ras):
    img, lab, _ = ras

    def median(name):
        return float(np.median(img[lab == TS_IDS[name]]))
    assert 80 <= median("liver") <= 130
    assert 90 <= median("spleen") <= 140
    assert median("lung_lower_lobe_left") < -700
    assert median("aorta") > 150
    assert median("vertebrae_L2") > 200
    assert 20 <= median("iliopsoas_left") <= 80
    body = (img > -500) & (lab == 0)
    assert np.sum((img[body] > -150) & (img[body] < -50)) > 0.1 * body.sum(), "fat present"
    corner = img[:3, :3, :]
    assert corner.max() <= -900, "air / outside the scan circle at the corners"
    assert 5 < np.std(img[lab == TS_IDS["liver"]]) < 25, "noise"


def test_all_label_ids_are_totalsegmentator_ids(ras):
    class_map = pytest.importorskip("totalsegmentator.map_to_binary").class_map["total"]
    for name, i in TS_IDS.items():
        assert class_map[i] == name
    present = set(np.unique(ras[1])) - {0}
    assert present <= set(TS_IDS.values())
    expected = {"spleen", "kidney_right", "kidney_left", "liver", "aorta", "lung_lower_lobe_left",
                "lung_lower_lobe_right", "vertebrae_L1", "rib_right_10", "rib_left_10", "inferior_vena_cava"}
    assert {TS_IDS[n] for n in expected} <= present


def test_deterministic_from_seed(ras):
    again = make_phantom(**TINY, orientation="RAS", seed=7)
    other = make_phantom(**TINY, orientation="RAS", seed=8)
    assert np.array_equal(again[0], ras[0]) and np.array_equal(again[1], ras[1])
    assert not np.array_equal(other[0], ras[0])


def test_written_files_are_identical_across_runs(tmp_path):
    spec = phantoms.PhantomSpec("p", (32, 32, 20), (12.0, 12.0, 20.0), "LPS", 3)
    ids = write_phantom(spec, tmp_path / "a.nii.gz", tmp_path / "labels" / "a.nii.gz")
    write_phantom(spec, tmp_path / "b.nii.gz", tmp_path / "labels" / "b.nii.gz")

    def sha(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()
    assert sha(tmp_path / "a.nii.gz") == sha(tmp_path / "b.nii.gz")
    img, lab = nib.load(tmp_path / "a.nii.gz"), nib.load(tmp_path / "labels" / "a.nii.gz")
    assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    assert np.allclose(img.affine, lab.affine)
    assert sorted(ids) == sorted(int(v) for v in np.unique(np.asanyarray(lab.dataobj)) if v)


def test_default_set_is_clinical_and_modest():
    assert len(DEFAULT_SET) >= 6
    assert {s.orientation for s in DEFAULT_SET} == {"RAS", "LPS"}
    assert len({s.spacing[2] for s in DEFAULT_SET}) >= 4, "a mix of slice thicknesses"
    assert len({s.seed for s in DEFAULT_SET}) == len(DEFAULT_SET)
    for s in DEFAULT_SET:
        assert s.shape[:2] == (512, 512)
        assert 0.6 <= s.spacing[0] == s.spacing[1] <= 0.9
        assert 1.5 <= s.spacing[2] <= 5.0 and 90 <= s.shape[2] <= 300
    fov = [np.multiply(s.shape, s.spacing) for s in DEFAULT_SET]
    assert any(f[0] >= 400 and f[1] >= 400 and f[2] >= 440 for f in fov), "one real-size abdominal CT"
    voxels = sum(np.prod(s.shape) for s in DEFAULT_SET)
    assert voxels < 250e6, "keep the set small enough to benchmark on CPU"


def test_default_specs_extends_with_new_seeds():
    specs = phantoms.default_specs(8, seed=5)
    assert len(specs) == 8 and len({s.case_id for s in specs}) == 8
    assert len({s.seed for s in specs}) == 8
    assert specs[0].seed == DEFAULT_SET[0].seed + 5


def test_bad_orientation_is_refused():
    with pytest.raises(ValueError):
        make_phantom((8, 8, 8), (40, 40, 40), orientation="LAS")
