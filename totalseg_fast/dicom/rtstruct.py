"""RT-STRUCT out: one ROI per class present, closed planar contours per slice, referencing the input series.

Written with pydicom directly (rt_utils, which TotalSegmentator uses, pulls in opencv). Contours are traced with
``skimage.measure.find_contours`` at level 0.5 on each slice's mask (padded by one pixel so every contour
closes); holes come out as contours of their own, so a reader filling with the even-odd rule gets the mask back.
"""
from __future__ import annotations

import datetime
import struct
from pathlib import Path

import numpy as np

from totalseg_fast.dicom._common import class_codes, fallback_rgb, labels_on_slices, slice_geometry

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
           "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription")


def mask_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours (n, 2) in (row, column) pixel coordinates around the True pixels of one 2D mask.

    Points where the contour goes straight on are dropped (the polygon, hence its raster, is unchanged).
    """
    from skimage.measure import approximate_polygon, find_contours

    padded = np.pad(mask.astype(np.uint8), 1)
    out = []
    for c in find_contours(padded, 0.5, fully_connected="high"):
        c = approximate_polygon(c, tolerance=0) - 1.0
        if len(c) > 1 and np.allclose(c[0], c[-1]):
            c = c[:-1]  # DICOM closes a CLOSED_PLANAR contour itself
        if len(c) >= 3:
            out.append(c)
    return out


# Implicit VR little endian, written here for the ROI contours (pydicom spends ~25 us per DS value; a whole-body
# structure set holds millions). Implicit VR also lifts explicit VR's 64 kB limit on one contour's ContourData.
def _element(tag: int, value: bytes, pad: bytes = b" ") -> bytes:
    if len(value) % 2:
        value += pad
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _sequence(tag: int, items: list[bytes]) -> bytes:
    body = b"".join(struct.pack("<HHI", 0xFFFE, 0xE000, len(item)) + item for item in items)
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(body)) + body


def _ds(values: np.ndarray) -> bytes:
    return "\\".join(map("{:.3f}".format, values.tolist())).encode()


def _roi_contour_item(number: int, rgb, contours: list[tuple[bytes, np.ndarray]]) -> bytes:
    """One ROIContourSequence item: colour, contours [(image reference item bytes, (n, 3) points)], ROI number."""
    items = [_sequence(0x30060016, [ref]) + _element(0x30060042, b"CLOSED_PLANAR")
             + _element(0x30060046, str(len(pts)).encode()) + _element(0x30060050, _ds(pts.ravel()))
             for ref, pts in contours]
    return (_element(0x3006002A, "\\".join(str(int(v)) for v in rgb).encode())
            + _sequence(0x30060040, items) + _element(0x30060084, str(number).encode()))


def _image_ref_item(src) -> bytes:
    return (_element(0x00081150, str(src.SOPClassUID).encode(), b"\0")
            + _element(0x00081155, str(src.SOPInstanceUID).encode(), b"\0"))


def write_rtstruct(labels_nifti: Path, source, class_names: dict[int, str], out_path: Path) -> Path:
    """Write ``out_path``: an RT Structure Set of ``labels_nifti`` (on ``source.nifti``'s grid) over the series."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.uid import ImplicitVRLittleEndian, generate_uid

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
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
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

    from scipy.ndimage import find_objects

    positions = [np.array([float(v) for v in src.ImagePositionPatient]) for src in datasets]
    refs = [_image_ref_item(src) for src in datasets]
    found: dict[int, list] = {idx: [] for idx, _ in chosen}
    for s, plane in enumerate(on_slices):  # one pass over the slices; each class cut to its box on the slice
        plane = np.ascontiguousarray(plane)
        for idx, box in enumerate(find_objects(plane), start=1):
            if box is None or idx not in found:
                continue
            for c in mask_contours(plane[box] == idx):
                rows, cols = c[:, 0] + box[0].start, c[:, 1] + box[1].start
                found[idx].append((refs[s], positions[s] + np.outer(cols * dc, row_dir) + np.outer(rows * dr, col_dir)))
    rois, contour_items, observations = [], [], []
    for number, (idx, name) in enumerate(chosen, start=1):
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID = number, frame_uid
        roi.ROIName, roi.ROIGenerationAlgorithm = name[:64], "AUTOMATIC"
        rois.append(roi)
        contour_items.append(_roi_contour_item(number, class_codes(name)[3] or fallback_rgb(idx), found[idx]))
        obs = Dataset()
        obs.ObservationNumber, obs.ReferencedROINumber = number, number
        obs.ROIObservationLabel = name[:16]  # SH: 16 characters at most
        obs.RTROIInterpretedType, obs.ROIInterpreter = "ORGAN", ""
        observations.append(obs)
    ds.StructureSetROISequence = Sequence(rois)
    tail = Dataset()
    tail.RTROIObservationsSequence = Sequence(observations)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # every element up to (3006,0020) by pydicom, then ROIContourSequence (3006,0039), then (3006,0080)
    head = DicomBytesIO()
    ds.save_as(head, enforce_file_format=True)
    rest = DicomBytesIO()
    rest.is_little_endian, rest.is_implicit_VR = True, True
    write_dataset(rest, tail)
    with open(out_path, "wb") as f:
        f.write(head.getvalue())
        f.write(_sequence(0x30060039, contour_items))
        f.write(rest.getvalue())
    return out_path
