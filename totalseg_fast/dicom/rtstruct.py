"""RT-STRUCT out: one ROI per class present, closed planar contours per slice, referencing the input series.

Written with pydicom directly (rt_utils, which TotalSegmentator uses, pulls in opencv). Contours are traced with
``skimage.measure.find_contours`` at level 0.5 on each slice's mask (padded by one pixel so every contour
closes); holes come out as contours of their own, so a reader filling with the even-odd rule gets the mask back.
"""
from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np

from totalseg_fast.dicom._common import class_codes, fallback_rgb, labels_on_slices, slice_geometry

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
           "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription")


def mask_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours (n, 2) in (row, column) pixel coordinates around the True pixels of one 2D mask."""
    from skimage.measure import find_contours

    padded = np.pad(mask.astype(np.uint8), 1)
    out = []
    for c in find_contours(padded, 0.5, fully_connected="high"):
        c = c - 1.0
        if len(c) > 1 and np.allclose(c[0], c[-1]):
            c = c[:-1]  # DICOM closes a CLOSED_PLANAR contour itself
        if len(c) >= 3:
            out.append(c)
    return out


def write_rtstruct(labels_nifti: Path, source, class_names: dict[int, str], out_path: Path) -> Path:
    """Write ``out_path``: an RT Structure Set of ``labels_nifti`` (on ``source.nifti``'s grid) over the series."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from totalseg_fast.dicom.seg import _version

    datasets = source.datasets
    on_slices = labels_on_slices(labels_nifti, datasets)
    present = set(np.unique(on_slices).tolist()) - {0}
    chosen = [(idx, name) for idx, name in sorted(class_names.items()) if idx in present]
    first = datasets[0]
    row_dir, col_dir, dr, dc = slice_geometry(first)
    frame_uid = str(first.get("FrameOfReferenceUID", "")) or generate_uid()
    now = datetime.datetime.now()

    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = RT_STRUCTURE_SET_STORAGE, sop_uid
    for key in _COPIED:
        ds[key] = pydicom.DataElement(key, pydicom.datadict.dictionary_VR(key), first.get(key, ""))
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID, ds.SeriesNumber = generate_uid(), 901
    ds.SeriesDescription = "TotalSegmentator fast"
    ds.Manufacturer, ds.ManufacturerModelName = "totalseg_fast", "TotalSegmentator --fast (3 mm, total)"
    ds.SoftwareVersions = _version()
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = frame_uid
    ds.StructureSetLabel = "TotalSegmentator"
    ds.StructureSetDate = ds.InstanceCreationDate = ds.SeriesDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = ds.InstanceCreationTime = ds.SeriesTime = now.strftime("%H%M%S")

    def image_ref(src):
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = src.SOPClassUID, src.SOPInstanceUID
        return item

    series_ref = Dataset()
    series_ref.SeriesInstanceUID = source.series_uid
    series_ref.ContourImageSequence = Sequence([image_ref(s) for s in datasets])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired, as used)
    study_ref.ReferencedSOPInstanceUID = str(first.get("StudyInstanceUID", ""))
    study_ref.RTReferencedSeriesSequence = Sequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = frame_uid
    frame_ref.RTReferencedStudySequence = Sequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame_ref])

    positions = [np.array([float(v) for v in s.ImagePositionPatient]) for s in datasets]
    rois, contours, observations = [], [], []
    for number, (idx, name) in enumerate(chosen, start=1):
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID = number, frame_uid
        roi.ROIName, roi.ROIGenerationAlgorithm = name[:64], "AUTOMATIC"
        rois.append(roi)
        items = []
        for s in np.flatnonzero((on_slices == idx).any(axis=(1, 2))):
            for c in mask_contours(on_slices[s] == idx):
                pts = positions[s] + np.outer(c[:, 1] * dc, row_dir) + np.outer(c[:, 0] * dr, col_dir)
                item = Dataset()
                item.ContourImageSequence = Sequence([image_ref(datasets[s])])
                item.ContourGeometricType = "CLOSED_PLANAR"
                item.NumberOfContourPoints = len(pts)
                item.ContourData = [f"{v:.3f}" for v in pts.ravel()]
                items.append(item)
        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = list(class_codes(name)[3] or fallback_rgb(idx))
        roi_contour.ReferencedROINumber = number
        roi_contour.ContourSequence = Sequence(items)
        contours.append(roi_contour)
        obs = Dataset()
        obs.ObservationNumber, obs.ReferencedROINumber = number, number
        obs.ROIObservationLabel = name[:16]  # SH: 16 characters at most
        obs.RTROIInterpretedType, obs.ROIInterpreter = "ORGAN", ""
        observations.append(obs)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(contours)
    ds.RTROIObservationsSequence = Sequence(observations)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out_path, enforce_file_format=True)
    return out_path
