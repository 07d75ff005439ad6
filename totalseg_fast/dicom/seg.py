"""DICOM-SEG out: one binary segment per class present in the labels, referencing the input series (highdicom)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from totalseg_fast.dicom._common import class_codes, fallback_rgb, labels_on_slices, slice_geometry


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tsbench")  # the project's distribution (pyproject), which holds totalseg_fast
    except PackageNotFoundError:
        return "0"


# Type 2 attributes highdicom copies from the source images; anonymised series often lack them
_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber",
          "ReferringPhysicianName", "StudyDate", "StudyTime")


def _with_type2(datasets: list) -> list:
    """The source headers, where any lacks a type 2 attribute (or SliceThickness, which highdicom reads): copies
    with it present, empty (SliceThickness: the spacing between the slices)."""
    import copy

    if all(key in ds for ds in datasets for key in (*_TYPE2, "SliceThickness")):
        return datasets
    row_dir, col_dir, _, _ = slice_geometry(datasets[0])
    gap = np.subtract(*[np.array([float(v) for v in ds.ImagePositionPatient]) for ds in datasets[1::-1]])
    spacing = abs(float(np.dot(gap, np.cross(row_dir, col_dir))))
    out = []
    for ds in datasets:
        ds = copy.deepcopy(ds)
        for key in _TYPE2:
            if key not in ds:
                setattr(ds, key, "")
        if "SliceThickness" not in ds:
            ds.SliceThickness = round(spacing, 6)
        out.append(ds)
    return out


def write_dicom_seg(labels_nifti: Path, source, class_names: dict[int, str], out_path: Path) -> Path:
    """Write ``out_path``: a DICOM-SEG of ``labels_nifti`` (on ``source.nifti``'s grid) over ``source``'s series.

    Segments are numbered 1..n in class order, labelled with the class name and coded as TotalSegmentator codes
    them; classes absent from the labels get no segment. Frames without any segment are omitted.
    """
    import highdicom as hd
    from highdicom.sr.coding import CodedConcept
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    on_slices = labels_on_slices(labels_nifti, source.datasets)
    present = set(np.unique(on_slices).tolist()) - {0}
    chosen = [(idx, name) for idx, name in sorted(class_names.items()) if idx in present]
    if not chosen:
        raise ValueError("no class of class_names is present in the labels: a DICOM-SEG needs one segment")
    lut = np.zeros(max(int(on_slices.max()), max(i for i, _ in chosen)) + 1, np.uint8 if len(chosen) < 256
                   else np.uint16)
    descriptions = []
    algorithm = hd.AlgorithmIdentificationSequence(name="totalseg_fast (TotalSegmentator --fast)",
                                                   version=_version(), family=codes.DCM.ArtificialIntelligence)
    for number, (idx, name) in enumerate(chosen, start=1):
        lut[idx] = number
        category, ptype, modifier, rgb = class_codes(name)
        desc = hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64],
            segmented_property_category=CodedConcept(category[1], category[0], category[2]),
            segmented_property_type=CodedConcept(ptype[1], ptype[0], ptype[2]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*(rgb or fallback_rgb(idx))))
        if modifier is not None:
            from pydicom import Dataset
            from pydicom.sequence import Sequence

            item = Dataset()
            item.CodingSchemeDesignator, item.CodeValue, item.CodeMeaning = modifier
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = Sequence([item])
        descriptions.append(desc)
    pixel = lut[on_slices]
    seg = hd.seg.Segmentation(
        source_images=_with_type2(source.datasets), pixel_array=pixel, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=900,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="totalseg_fast",
        manufacturer_model_name="TotalSegmentator --fast (3 mm, total)", software_versions=_version(),
        device_serial_number="0", series_description="TotalSegmentator fast"[:64])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out_path)
    return out_path
