"""Write a CT series from a volume with pydicom, as a scanner would store it: for tests and demos.

``write_ct_series(volume, folder, affine=...)`` writes one slice per k of a (i, j, k) volume on a NIfTI (RAS)
affine: column index = i, row index = j, so the series has the volume's geometry in DICOM's LPS patient space.
Compressed transfer syntaxes are encoded with imagecodecs (JPEG 2000, JPEG-LS, JPEG lossless process 14) or
pydicom (RLE) and decode with pydicom's plugins (python-gdcm).
"""
from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_SYNTAX = {
    None: "1.2.840.10008.1.2.1",              # explicit VR little endian
    "jpeg2000": "1.2.840.10008.1.2.4.90",     # JPEG 2000 lossless
    "jpegls": "1.2.840.10008.1.2.4.80",       # JPEG-LS lossless
    "jpeg_lossless": "1.2.840.10008.1.2.4.57",  # JPEG lossless process 14 (imagecodecs' predictor 6)
    "rle": "1.2.840.10008.1.2.5",             # RLE lossless
}


def _encode(frame: np.ndarray, compress: str) -> bytes:
    import imagecodecs

    if compress == "jpeg2000":
        return imagecodecs.jpeg2k_encode(frame, level=0, codecformat="J2K", reversible=True)
    if compress == "jpegls":
        return imagecodecs.jpegls_encode(frame, level=0)
    if compress == "jpeg_lossless":
        return imagecodecs.ljpeg_encode(frame)
    raise ValueError(compress)


def write_ct_series(volume, folder: Path, affine=None, *, compress: str | None = None, shuffle_names: bool = True,
                    series_uid: str | None = None, study_uid: str | None = None, frame_uid: str | None = None,
                    slope: float = 1.0, intercept: float = -1024.0, signed: bool = False, modality: str = "CT",
                    instance_numbers: str = "position", series_number: int = 1, seed: int = 0,
                    patient_id: str = "PHANTOM") -> list[Path]:
    """Write ``volume`` (a NIfTI path, or an array with ``affine``) as one series of DICOM slices in ``folder``.

    Stored values are ``round((hu - intercept) / slope)`` (uint16 unless ``signed``; clipped to the type's range).
    ``shuffle_names``: random file names (no ``.dcm`` on some) so the name order says nothing about position;
    ``instance_numbers``: "position" (1..n along k), "reversed" or "shuffled". Returns the slice paths in k order.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID, generate_uid

    if compress not in _SYNTAX:
        raise ValueError(f"compress must be one of {sorted(k for k in _SYNTAX if k)} or None, not {compress!r}")
    if isinstance(volume, (str, Path)):
        import nibabel as nib

        img = nib.load(str(volume))
        hu, affine = np.asanyarray(img.dataobj), img.affine
    else:
        hu = np.asarray(volume)
    if affine is None:
        raise ValueError("an array volume needs its affine")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, float)
    dx, dy = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    row_dir, col_dir = lps[:3, 0] / dx, lps[:3, 1] / dy
    dz = float(np.linalg.norm(lps[:3, 2]))
    dtype = np.int16 if signed else np.uint16
    info = np.iinfo(dtype)
    stored = np.clip(np.round((hu.astype(np.float64) - intercept) / slope), info.min, info.max).astype(dtype)

    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = frame_uid or generate_uid()
    nz = hu.shape[2]
    numbers = np.arange(1, nz + 1)
    if instance_numbers == "reversed":
        numbers = numbers[::-1]
    elif instance_numbers == "shuffled":
        numbers = rng.permutation(numbers)
    now = datetime.datetime(2026, 1, 2, 3, 4, 5)
    syntax = UID(_SYNTAX[compress])
    paths = []
    for k in range(nz):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = syntax
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality = modality
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", patient_id, "", "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.Manufacturer = "tsbench"
        ds.SeriesNumber, ds.InstanceNumber = series_number, int(numbers[k])
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [float(round(v, 6)) for v in lps @ np.array([0.0, 0.0, k, 1.0])][:3]
        ds.ImageOrientationPatient = [float(round(v, 8)) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [float(round(dy, 6)), float(round(dx, 6))]
        ds.SliceThickness = float(round(dz, 6))
        ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[0])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, int(signed)
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "HU"
        frame = np.ascontiguousarray(stored[:, :, k].T)  # (rows = j, columns = i)
        if compress is None:
            ds.PixelData = frame.tobytes()
        elif compress == "rle":
            ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
            ds.PixelData = frame.tobytes()
            ds.compress(syntax, encoding_plugin="pydicom")
        else:
            ds.PixelData = encapsulate([_encode(frame, compress)])
            ds["PixelData"].VR = "OB"
        name = (f"{rng.integers(1 << 40):x}" + ("" if k % 3 == 0 else ".dcm")) if shuffle_names \
            else f"slice_{k:04d}.dcm"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
