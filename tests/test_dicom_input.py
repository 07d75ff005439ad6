"""DICOM in: series the tests write themselves (pydicom), read back as TotalSegmentator's own conversion reads them.

Every series is a generated phantom (64 x 64 x 40, no ../shared/data). The volume read back is checked two ways:
against the phantom it was written from (world space: voxel values and geometry, so ordering and rescale are
ours to get right) and against TotalSegmentator 2.18's ``dcm_to_nifti`` on the same folder or zip (same voxels,
dtype, affine and header, so its pipeline and ours segment the same array).
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from totalseg_fast.dicom.series import DicomInputError, is_dicom_input, read_dicom_input
from totalseg_fast.dicom.testing import write_ct_series

from dicom_bad_inputs import BAD

SHAPE, SPACING = (64, 64, 40), (6.0, 6.0, 8.0)


@pytest.fixture(scope="module")
def phantom():
    """(HU int16 clipped at -1024 as scanners store it, labels, affine) of a small LPS-stored phantom."""
    from common.data.phantoms import make_phantom

    hu, labels, affine = make_phantom(SHAPE, SPACING, "LPS", seed=3)
    return np.maximum(hu, -1024).astype(np.int16), labels, affine


def _in_phantom_frame(img, affine):
    """``img``'s voxels reoriented onto the phantom's storage order, and the affine that goes with them."""
    ornt = nib.orientations.ornt_transform(nib.io_orientation(img.affine), nib.io_orientation(affine))
    data = nib.orientations.apply_orientation(np.asanyarray(img.dataobj), ornt)
    return data, img.affine @ nib.orientations.inv_ornt_aff(ornt, img.shape)


def _notes():
    seen = []
    return seen, seen.append


@pytest.mark.parametrize("compress", [None, "rle", "jpeg2000", "jpegls", "jpeg_lossless"])
def test_series_reads_back_to_the_phantom_in_position_order(phantom, tmp_path, compress):
    hu, _, affine = phantom
    # random file names and shuffled instance numbers: only ImagePositionPatient orders the slices
    paths = write_ct_series(hu, tmp_path / "series", affine, compress=compress, instance_numbers="shuffled")
    syntax = pydicom.dcmread(paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert syntax.is_compressed == (compress is not None)
    assert sorted(p.name for p in paths) != [p.name for p in paths]
    got = read_dicom_input(tmp_path / "series", tmp_path / "work")
    data, back_affine = _in_phantom_frame(nib.load(got.nifti), affine)
    np.testing.assert_array_equal(data, hu)
    np.testing.assert_allclose(back_affine, affine, atol=1e-4)
    # datasets: the headers sorted along the slice normal, one per slice
    normal = np.cross(*np.reshape(np.array(got.datasets[0].ImageOrientationPatient, float), (2, 3)))
    along = [float(np.dot(normal, np.array(ds.ImagePositionPatient, float))) for ds in got.datasets]
    assert len(got.datasets) == SHAPE[2] and np.all(np.diff(along) > 0)
    assert got.modality == "CT" and got.series_uid == str(got.datasets[0].SeriesInstanceUID)
    # the headers handed back are the files' own (the renumbered copies given to dicom2nifti stay private)
    on_disk = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: pydicom.dcmread(
        p, stop_before_pixels=True).InstanceNumber for p in paths}
    assert [ds.InstanceNumber for ds in got.datasets] == [on_disk[ds.SOPInstanceUID] for ds in got.datasets]
    assert [ds.InstanceNumber for ds in got.datasets] != list(range(1, SHAPE[2] + 1))


def test_rescale_slope_and_intercept_apply(phantom, tmp_path):
    hu, _, affine = phantom
    write_ct_series(hu, tmp_path / "s", affine, slope=0.3, intercept=-1100.0, signed=True)
    data, _ = _in_phantom_frame(nib.load(read_dicom_input(tmp_path / "s", tmp_path / "w").nifti), affine)
    expected = np.round((hu.astype(np.float64) + 1100.0) / 0.3) * 0.3 - 1100.0
    np.testing.assert_allclose(data, expected, atol=1e-3)
    assert np.abs(data - hu).max() <= 0.15 + 1e-6 and np.any(data != np.round(data))


def test_ras_stored_volume_keeps_its_geometry(tmp_path):
    from common.data.phantoms import make_phantom

    hu, _, affine = make_phantom((48, 56, 20), (5.0, 4.0, 6.0), "RAS", seed=5)
    hu = np.maximum(hu, -1024)
    write_ct_series(hu, tmp_path / "s", affine, compress="rle")
    data, back = _in_phantom_frame(nib.load(read_dicom_input(tmp_path / "s", tmp_path / "w").nifti), affine)
    np.testing.assert_array_equal(data, hu)
    np.testing.assert_allclose(back, affine, atol=1e-4)


def test_largest_ct_series_is_taken_with_a_note_and_series_uid_picks_another(phantom, tmp_path):
    hu, _, affine = phantom
    folder = tmp_path / "mixed"
    write_ct_series(hu, folder / "a", affine, series_uid="1.2.3.4.1", seed=1)
    write_ct_series(hu[:, :, :12], folder / "b", affine, series_uid="1.2.3.4.2", compress="jpegls", seed=2)
    write_ct_series(hu[:, :, :20], folder, affine, series_uid="1.2.3.4.3", modality="MR", seed=3)
    (folder / "README.txt").write_text("not DICOM\n")
    (folder / "a" / "DICOMDIR_like.bin").write_bytes(b"\0" * 500)
    notes, note = _notes()
    got = read_dicom_input(folder, tmp_path / "w", note=note)
    assert got.series_uid == "1.2.3.4.1" and nib.load(got.nifti).shape[2] == SHAPE[2]
    assert len(notes) == 1 and "2 CT series" in notes[0] and "1.2.3.4.2" in notes[0]
    notes.clear()
    small = read_dicom_input(folder, tmp_path / "w2", series_uid="1.2.3.4.2", note=note)
    data, _ = _in_phantom_frame(nib.load(small.nifti), affine)
    np.testing.assert_array_equal(data, hu[:, :, :12])
    mr = read_dicom_input(folder, tmp_path / "w3", series_uid="1.2.3.4.3", note=note)
    assert mr.modality == "MR" and any("is MR, not CT" in n for n in notes)
    with pytest.raises(DicomInputError, match=r"series 9\.9 not found; .*1\.2\.3\.4\.1 \(CT, 40 slices\)"):
        read_dicom_input(folder, tmp_path / "w4", series_uid="9.9", note=note)


def test_non_ct_series_alone_gets_a_note_not_an_error(phantom, tmp_path):
    hu, _, affine = phantom
    write_ct_series(hu[:, :, :8], tmp_path / "mr", affine, modality="MR")
    notes, note = _notes()
    got = read_dicom_input(tmp_path / "mr", tmp_path / "w", note=note)
    assert got.modality == "MR" and nib.load(got.nifti).shape == (64, 64, 8)
    assert notes == [f"series {got.series_uid} is MR, not CT; TotalSegmentator's --fast model was trained on CT"]


def _zip_folder(folder: Path, zpath: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, prefix + p.relative_to(folder).as_posix())
    return zpath


def test_identical_to_totalsegmentators_own_conversion_folder_and_zip(phantom, tmp_path):
    """TotalSegmentator's dcm_to_nifti (dicom2nifti) and ours give the same file for a folder and for its zip."""
    from totalsegmentator.dicom_io import dcm_to_nifti

    hu, _, affine = phantom
    folder = tmp_path / "series"
    write_ct_series(hu, folder, affine, compress="jpeg2000")  # shuffled names, instance numbers in order
    zpath = _zip_folder(folder, tmp_path / "series.zip", prefix="export/ct/")
    for name, given in (("folder", folder), ("zip", zpath)):
        ts_tmp = tmp_path / f"ts_{name}"
        ts_tmp.mkdir()
        dcm_to_nifti(given, ts_tmp / "converted_dcm.nii.gz", tmp_dir=ts_tmp)
        theirs = nib.load(ts_tmp / "converted_dcm.nii.gz")
        ours = nib.load(read_dicom_input(given, tmp_path / f"ours_{name}").nifti)
        assert ours.get_data_dtype() == theirs.get_data_dtype()
        np.testing.assert_array_equal(np.asanyarray(ours.dataobj), np.asanyarray(theirs.dataobj))
        np.testing.assert_array_equal(ours.affine, theirs.affine)
        for key in ("dim", "pixdim", "qform_code", "sform_code", "srow_x", "srow_y", "srow_z", "xyzt_units",
                    "scl_slope", "scl_inter", "datatype"):
            np.testing.assert_array_equal(ours.header[key], theirs.header[key], err_msg=key)
        data, _ = _in_phantom_frame(ours, affine)
        np.testing.assert_array_equal(data, hu)


def test_shuffled_instance_numbers_still_read_where_dicom2nifti_alone_sees_4d(phantom, tmp_path):
    import dicom2nifti
    from dicom2nifti.exceptions import ConversionError

    hu, _, affine = phantom
    write_ct_series(hu, tmp_path / "s", affine, instance_numbers="shuffled", seed=4)
    with pytest.raises(ConversionError):
        dicom2nifti.dicom_series_to_nifti(str(tmp_path / "s"), str(tmp_path / "d2n.nii.gz"), reorient_nifti=True)
    data, _ = _in_phantom_frame(nib.load(read_dicom_input(tmp_path / "s", tmp_path / "w").nifti), affine)
    np.testing.assert_array_equal(data, hu)


def test_is_dicom_input(phantom, tmp_path):
    hu, _, affine = phantom
    write_ct_series(hu[:, :, :5], tmp_path / "dcm" / "deep", affine)
    (tmp_path / "empty").mkdir()
    (tmp_path / "niftis").mkdir()
    nib.save(nib.Nifti1Image(hu[:, :, :5], affine), tmp_path / "niftis" / "a.nii.gz")
    _zip_folder(tmp_path / "dcm", tmp_path / "s.zip")
    assert is_dicom_input(tmp_path / "dcm") and is_dicom_input(tmp_path / "s.zip")
    assert is_dicom_input(tmp_path / "empty")  # read_dicom_input then says what is wrong
    assert not is_dicom_input(tmp_path / "niftis")
    assert not is_dicom_input(tmp_path / "niftis" / "a.nii.gz")
    assert not is_dicom_input(tmp_path / "missing")


# ---- bad input: one DicomInputError with a one-line reason (cases in dicom_bad_inputs.py) -----------------------

@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_one_line_reason(phantom, tmp_path, case):
    given, pattern = BAD[case](phantom, tmp_path)
    with pytest.raises(DicomInputError, match=pattern) as info:
        read_dicom_input(given, tmp_path / "work")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "work" / "dicom_ct.nii").exists()
    if case.startswith("zip_"):
        assert not (tmp_path / "escaped.dcm").exists() and not (tmp_path / "work" / "dicom_extracted").exists()
