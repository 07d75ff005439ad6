"""DICOM out: DICOM-SEG and RT-STRUCT written over a series the test writes itself, read back to the labels.

The labels are a phantom's own label map put on the grid ``read_dicom_input`` gives (TotalSegmentator's
conversion), so they stand where the tool's labels would; SEG must give them back exactly, slice for slice in the
series' position order, and RT-STRUCT's contours must rasterise back to them.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest

from totalseg_fast.dicom._common import GridMismatchError, labels_on_slices
from totalseg_fast.dicom.rtstruct import write_rtstruct
from totalseg_fast.dicom.seg import write_dicom_seg
from totalseg_fast.dicom.series import read_dicom_input
from totalseg_fast.dicom.testing import write_ct_series


@pytest.fixture(scope="module")
def class_names() -> dict[int, str]:
    from totalsegmentator.map_to_binary import class_map

    return dict(class_map["total"])


@pytest.fixture(scope="module", params=["LPS", "RAS"])
def case(request, tmp_path_factory):
    """(DicomInput, labels NIfTI on its grid, the expected (slice, row, column) labels in the series' order)."""
    from common.data.phantoms import make_phantom

    orientation = request.param
    root = tmp_path_factory.mktemp(f"dicom_out_{orientation}")
    hu, labels, affine = make_phantom((64, 56, 36), (6.0, 6.5, 8.0), orientation, seed=11)
    write_ct_series(np.maximum(hu, -1024), root / "series", affine, compress="rle", instance_numbers="reversed")
    source = read_dicom_input(root / "series", root / "work")
    grid = nib.load(source.nifti)
    ornt = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.io_orientation(grid.affine))
    on_grid = nib.orientations.apply_orientation(labels, ornt).astype(np.uint8)
    assert on_grid.shape == grid.shape
    path = root / "labels.nii.gz"
    nib.save(nib.Nifti1Image(on_grid, grid.affine), path)
    # expected, independent of the code under test: slice z of the written series is labels[:, :, k].T where
    # (LPS affine @ (0, 0, k))'s z is its ImagePositionPatient z
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    k_of_z = {round(float((lps @ [0, 0, k, 1])[2]), 3): k for k in range(labels.shape[2])}
    expected = np.stack([labels[:, :, k_of_z[round(float(ds.ImagePositionPatient[2]), 3)]].T
                         for ds in source.datasets])
    assert len(np.unique(expected)) > 20
    return source, path, expected


def test_labels_on_slices_follow_the_series_order(case):
    source, path, expected = case
    np.testing.assert_array_equal(labels_on_slices(path, source.datasets), expected)


def test_labels_on_another_grid_are_refused(case, tmp_path):
    source, path, _ = case
    img = nib.load(path)
    shifted = img.affine.copy()
    shifted[:3, 3] += img.affine[:3, 2]  # one slice along k
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), shifted), tmp_path / "shifted.nii.gz")
    with pytest.raises(GridMismatchError, match="shifted"):
        labels_on_slices(tmp_path / "shifted.nii.gz", source.datasets)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[:, :, :-1], img.affine), tmp_path / "short.nii.gz")
    with pytest.raises(GridMismatchError, match="does not match the series"):
        labels_on_slices(tmp_path / "short.nii.gz", source.datasets)


def test_dicom_seg_reads_back_to_the_labels(case, class_names, tmp_path):
    import highdicom as hd

    source, path, expected = case
    out = write_dicom_seg(path, source, class_names, tmp_path / "seg.dcm")
    seg = hd.seg.segread(out)
    assert seg.Modality == "SEG" and seg.SeriesInstanceUID != source.series_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.series_uid
    assert seg.FrameOfReferenceUID == source.datasets[0].FrameOfReferenceUID
    numbers = seg.get_segment_numbers()
    names = [seg.get_segment_description(n).SegmentLabel for n in numbers]
    present = sorted(set(np.unique(expected).tolist()) - {0})
    assert names == [class_names[i] for i in present]  # one segment per class present, in class order
    liver = seg.get_segment_description(numbers[names.index("liver")])
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Liver"
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in source.datasets], segment_numbers=numbers,
        combine_segments=True, relabel=False)
    to_class = np.zeros(max(numbers) + 1, np.uint8)
    to_class[numbers] = present
    np.testing.assert_array_equal(to_class[pixels], expected)


def test_dicom_seg_with_a_subset_of_classes(case, class_names, tmp_path):
    import highdicom as hd

    source, path, expected = case
    subset = {i: class_names[i] for i in (5, 2)}  # liver, kidney_right (roi_subset style)
    seg = hd.seg.segread(write_dicom_seg(path, source, subset, tmp_path / "seg.dcm"))
    assert [seg.get_segment_description(n).SegmentLabel for n in seg.get_segment_numbers()] == \
        ["kidney_right", "liver"]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in source.datasets], segment_numbers=[1, 2],
        combine_segments=True, relabel=False)
    np.testing.assert_array_equal(pixels == 1, expected == 2)
    np.testing.assert_array_equal(pixels == 2, expected == 5)
    with pytest.raises(ValueError, match="no class"):
        write_dicom_seg(path, source, {200: "not_there"}, tmp_path / "none.dcm")


def _rasterise(rt, source, shape):
    """ROI name -> (slice, row, column) mask, each contour filled and XOR-ed (even-odd rule: holes)."""
    from skimage.draw import polygon2mask

    slice_of = {ds.SOPInstanceUID: s for s, ds in enumerate(source.datasets)}
    name_of = {roi.ROINumber: roi.ROIName for roi in rt.StructureSetROISequence}
    iop = np.array(source.datasets[0].ImageOrientationPatient, float)
    dr, dc = (float(v) for v in source.datasets[0].PixelSpacing)
    masks = {}
    for roi in rt.ROIContourSequence:
        mask = np.zeros(shape, bool)
        for contour in roi.ContourSequence:
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            s = slice_of[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            pts = np.array(contour.ContourData, float).reshape(-1, 3)
            assert len(pts) == contour.NumberOfContourPoints
            rel = pts - np.array(source.datasets[s].ImagePositionPatient, float)
            assert np.abs(rel @ np.cross(iop[:3], iop[3:])).max() < 1e-3  # on the slice's plane
            mask[s] ^= polygon2mask(shape[1:], np.stack([rel @ iop[3:] / dr, rel @ iop[:3] / dc], axis=1))
        masks[name_of[roi.ReferencedROINumber]] = mask
    return masks


def test_rtstruct_contours_rasterise_to_the_labels(case, class_names, tmp_path):
    source, path, expected = case
    rt = pydicom.dcmread(write_rtstruct(path, source, class_names, tmp_path / "rt.dcm"))
    assert rt.Modality == "RTSTRUCT" and rt.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3"
    ref = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == source.series_uid and len(ref.ContourImageSequence) == len(source.datasets)
    present = sorted(set(np.unique(expected).tolist()) - {0})
    masks = _rasterise(rt, source, expected.shape)
    assert list(masks) == [class_names[i] for i in present]
    dice = {}
    for idx in present:
        got, want = masks[class_names[idx]], expected == idx
        dice[idx] = 2 * (got & want).sum() / (got.sum() + want.sum())
    # measured: every class rasterises back exactly (contours through the midpoints between pixel centres)
    assert min(dice.values()) >= 0.999, {class_names[i]: round(d, 4) for i, d in dice.items() if d < 0.999}


def test_anonymised_series_without_type2_attributes_still_gets_seg_and_rtstruct(class_names, tmp_path):
    """Patient/study type 2 attributes and SliceThickness stripped (as anonymisers do): both outputs are written
    and the SEG still reads back to the labels; the source headers handed in stay untouched."""
    import highdicom as hd

    from common.data.phantoms import make_phantom

    hu, labels, affine = make_phantom((48, 48, 12), (8.0, 8.0, 8.0), "LPS", seed=3)
    stripped = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber",
                "ReferringPhysicianName", "StudyDate", "StudyTime", "SliceThickness")
    for path in write_ct_series(np.maximum(hu, -1024), tmp_path / "s", affine):
        ds = pydicom.dcmread(path)
        for key in stripped:
            delattr(ds, key)
        ds.save_as(path)
    source = read_dicom_input(tmp_path / "s", tmp_path / "w")
    grid = nib.load(source.nifti)
    ornt = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.io_orientation(grid.affine))
    nib.save(nib.Nifti1Image(nib.orientations.apply_orientation(labels, ornt).astype(np.uint8), grid.affine),
             tmp_path / "labels.nii.gz")
    expected = np.asarray(labels_on_slices(tmp_path / "labels.nii.gz", source.datasets))
    seg = hd.seg.segread(write_dicom_seg(tmp_path / "labels.nii.gz", source, class_names, tmp_path / "seg.dcm"))
    numbers = seg.get_segment_numbers()
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in source.datasets], segment_numbers=numbers,
        combine_segments=True, relabel=False)
    to_class = np.zeros(max(numbers) + 1, np.uint8)
    to_class[numbers] = sorted(set(np.unique(expected).tolist()) - {0})
    np.testing.assert_array_equal(to_class[pixels], expected)
    assert float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness) == 8.0
    rt = pydicom.dcmread(write_rtstruct(tmp_path / "labels.nii.gz", source, class_names, tmp_path / "rt.dcm"))
    assert len(rt.ROIContourSequence) == len(numbers)
    assert all(key not in ds for ds in source.datasets for key in stripped)
