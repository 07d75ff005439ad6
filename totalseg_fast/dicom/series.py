"""DICOM in: a folder of CT slices, or a zip of one, read as hospitals store it.

``read_dicom_input`` finds the image slices (any file name, any depth; non-DICOM files and non-image DICOM objects
are skipped), groups them by series, takes one (``series_uid``, else the CT series with most slices), checks it
(enough slices, one size, one orientation, no gap, every slice decodable) and writes it as NIfTI with
TotalSegmentator 2.18's own conversion (``dicom2nifti``'s ``dicom_series_to_nifti(..., reorient_nifti=True)``,
called here on the chosen slices), so the grid, affine, dtype and voxels are the ones TotalSegmentator segments.

Compressed pixel data (JPEG 2000, JPEG-LS, JPEG lossless, RLE) is decoded by pydicom's plugins (python-gdcm,
pinned; RLE natively). No torch here.
"""
from __future__ import annotations

import copy
import os
import shutil
import warnings
import zipfile
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from common.core.io import InputError

CT_MIN_SLICES = 4  # dicom2nifti refuses 3 slices or fewer (a localizer, it says)
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


class DicomInputError(InputError):
    """A DICOM input that cannot be segmented; ``str(error)`` is a one-line reason (an InputError, so a ValueError,
    printed by the command as ``error: <input>: <reason>`` without a type name)."""


@dataclass
class DicomInput:
    nifti: Path  # the CT as TotalSegmentator converts it (dicom2nifti, LAS storage), in work_dir
    series_uid: str
    datasets: list = field(repr=False)  # the series' headers (pydicom Datasets), sorted by position along the normal
    modality: str = ""
    files: list[Path] = field(default_factory=list, repr=False)  # the slices' files, in the order of ``datasets``


def _has_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _walk_files(folder: Path):
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            yield Path(root) / name


def is_dicom_input(path: Path) -> bool:
    """True for a zip file, and for a folder that holds a DICOM file (at any depth) or no NIfTI file at its top.

    So an empty folder, or one with neither DICOM nor NIfTI, goes to ``read_dicom_input``, which says what is
    wrong; a folder of NIfTI files (without DICOM) is a batch of NIfTI inputs.
    """
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == ".zip" or (not path.name.lower().endswith(_NIFTI_SUFFIXES)
                                                 and zipfile.is_zipfile(path))
    if not path.is_dir():
        return False
    if any(_has_preamble(p) for p in _walk_files(path)):
        return True
    return not any(p.is_file() and p.name.lower().endswith(_NIFTI_SUFFIXES) for p in path.iterdir())


def _extract_zip(path: Path, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
            for m in members:
                name = m.filename.replace("\\", "/")
                parts = PurePosixPath(name).parts
                if name.startswith("/") or (parts and (parts[0].endswith(":") or ".." in parts)):
                    raise DicomInputError(f"zip holds an unsafe path {m.filename!r} (absolute or with '..'); "
                                          "nothing extracted")
            dest.mkdir(parents=True, exist_ok=True)
            for m in members:
                if m.is_dir():
                    continue
                target = dest / PurePosixPath(m.filename.replace("\\", "/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:  # damaged, or an unknown method
        shutil.rmtree(dest, ignore_errors=True)  # no half-extracted series left behind
        raise DicomInputError(f"not a readable zip file ({type(e).__name__}: {e})") from None
    return dest


def _normal(ds) -> np.ndarray:
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    return np.cross(iop[:3], iop[3:])


def _is_image_slice(ds) -> bool:
    return all(k in ds for k in ("SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient",
                                 "Rows", "Columns", "PixelData")) \
        and len(ds.ImageOrientationPatient) >= 6 and len(ds.ImagePositionPatient) >= 3 \
        and "LOCALIZER" not in [str(v).upper() for v in ds.get("ImageType", [])]


def _scan(folder: Path, label: str):
    """Read every DICOM file's header (pixel data deferred): (series uid -> [(path, ds)]), counts."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    n_files = n_dicom = n_multiframe = 0
    series: dict[str, list] = defaultdict(list)
    for path in _walk_files(folder):
        n_files += 1
        if not _has_preamble(path):
            continue
        n_dicom += 1
        try:
            with warnings.catch_warnings():  # odd values in a header are not the user's concern here
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, defer_size="1 KB")
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError) as e:
            raise DicomInputError(f"unreadable DICOM file {path.relative_to(folder)} ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
        if len(ds) == 0:
            raise DicomInputError(f"unreadable DICOM file {path.relative_to(folder)} (no data elements read: truncated or corrupt?)")
        if "PixelData" not in ds and all(k in ds for k in ("Rows", "Columns", "ImagePositionPatient")):
            raise DicomInputError(f"unreadable slice {path.relative_to(folder)} (no pixel data: truncated?)")
        if _is_image_slice(ds):
            series[str(ds.SeriesInstanceUID)].append((path, ds))
        elif int(ds.get("NumberOfFrames") or 1) > 1 and "PixelData" in ds:
            n_multiframe += 1
    if n_files == 0:
        raise DicomInputError(f"empty {label}: no files")
    if n_dicom == 0:
        raise DicomInputError(f"no DICOM files in this {label} ({n_files} file{'s' * (n_files != 1)}, none DICOM)")
    if not series and n_multiframe:
        raise DicomInputError(f"multi-frame (enhanced) DICOM images are not supported ({n_multiframe} file"
                              f"{'s' * (n_multiframe != 1)}): export the series as one file per slice")
    if not series:
        raise DicomInputError(f"no DICOM image series in this {label} ({n_dicom} DICOM file"
                              f"{'s' * (n_dicom != 1)}, none an image slice)")
    return series


def _choose(series: dict, series_uid: str | None, note) -> str:
    def modality(uid):
        return str(series[uid][0][1].get("Modality", "")).upper()

    if series_uid is not None:
        if series_uid not in series:
            listed = ", ".join(f"{u} ({modality(u) or '?'}, {len(s)} slices)" for u, s in series.items())
            raise DicomInputError(f"series {series_uid} not found; this input holds {listed}")
        return series_uid
    ct = [u for u in series if modality(u) == "CT"]
    pool = ct or list(series)
    chosen = max(pool, key=lambda u: len(series[u]))
    if len(ct) > 1:
        others = ", ".join(f"{u} ({len(series[u])} slices)" for u in ct if u != chosen)
        note(f"{len(ct)} CT series here; taking the largest, {chosen} ({len(series[chosen])} slices); "
             f"--series UID picks another: {others}")
    return chosen


def _check_geometry(items: list, label: str) -> list:
    """Sort (path, ds) by position along the slice normal and refuse what would be a wrong volume."""
    sizes = defaultdict(list)
    for p, ds in items:
        sizes[(int(ds.Rows), int(ds.Columns))].append(p)
    if len(sizes) > 1:
        desc = ", ".join(f"{len(v)} of {r}x{c}" for (r, c), v in sorted(sizes.items(), key=lambda kv: -len(kv[1])))
        odd = min(sizes.values(), key=len)[0]
        raise DicomInputError(f"slices of unequal size in one series ({desc}; e.g. {odd.name})")
    n0 = _normal(items[0][1])
    for p, ds in items[1:]:
        if not np.allclose(_normal(ds), n0, atol=1e-3):
            raise DicomInputError(f"slices with different orientations in one series (e.g. {p.name})")
    pos = np.array([float(np.dot(n0, [float(v) for v in ds.ImagePositionPatient])) for _, ds in items])
    order = np.argsort(pos, kind="stable")
    items = [items[i] for i in order]
    pos = pos[order]
    if len(items) < CT_MIN_SLICES:
        what = "a single slice" if len(items) == 1 else f"only {len(items)} slices"
        raise DicomInputError(f"{label} holds {what}; a CT volume needs at least {CT_MIN_SLICES}")
    steps = np.diff(pos)
    same = np.flatnonzero(steps < 1e-4)
    if same.size:
        i = int(same[0])
        raise DicomInputError(f"{same.size + 1} slices share a position ({items[i][0].name}, {items[i + 1][0].name}):"
                              " several acquisitions in one series")
    step = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - step) > max(0.1, 0.05 * step))  # dicom2nifti's own tolerance
    if bad.size:
        i = int(bad[0])
        raise DicomInputError(f"gap in slice positions: {steps[i]:.3g} mm between {items[i][0].name} and "
                              f"{items[i + 1][0].name}, {step:.3g} mm elsewhere (missing slices?)")
    return items


def _find_undecodable(items: list, folder: Path) -> str | None:
    for p, ds in items:
        try:
            copy.deepcopy(ds).pixel_array  # noqa: B018 - decoding is the check
        except Exception as e:  # noqa: BLE001 - any decoder failure names the file
            return f"unreadable slice {p.relative_to(folder)} ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    return None


def _dicom2nifti(datasets: list, out: Path) -> None:
    """dicom2nifti's ``dicom_array_to_nifti(datasets, out, reorient_nifti=True)``, as TotalSegmentator calls it
    (through ``dicom_series_to_nifti``), minus its first write of the not yet reoriented volume for the generic
    (CT) converter: same steps, same result, one write instead of two."""
    import dicom2nifti.convert_dicom as d2n_convert
    import dicom2nifti.convert_generic as d2n_generic
    import dicom2nifti.image_reorientation as d2n_reorient
    import dicom2nifti.settings as d2n_settings
    from dicom2nifti.exceptions import ConversionValidationError

    if (d2n_settings.resample or not d2n_convert.are_imaging_dicoms(datasets)
            or d2n_convert._get_vendor(datasets) != d2n_convert.Vendor.GENERIC):
        d2n_convert.dicom_array_to_nifti(datasets, str(out), reorient_nifti=True)
        return
    result = d2n_generic.dicom_to_nifti(datasets, None)
    if result.get("NII") is None:
        raise ConversionValidationError("NO_IMAGE")
    d2n_reorient.reorient_image(result["NII"], str(out))


def read_dicom_input(path: Path, work_dir: Path, series_uid: str | None = None, note=print) -> DicomInput:
    """Convert one DICOM series (folder or zip) to ``work_dir/dicom_ct.nii`` as TotalSegmentator does.

    ``note`` gets each note as one line without a prefix (several CT series; a series that is not CT).
    """
    from dicom2nifti.exceptions import ConversionError, ConversionValidationError

    path, work_dir = Path(path), Path(work_dir)
    if not path.exists():
        raise DicomInputError("no such file or folder")
    work_dir.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise DicomInputError("not a zip file or a folder of DICOM slices")
        folder, label = _extract_zip(path, work_dir / "dicom_extracted"), "zip"
    else:
        folder, label = path, "folder"

    series = _scan(folder, label)
    uid = _choose(series, series_uid, note)
    items = _check_geometry(series[uid], f"series {uid}")
    modality = str(items[0][1].get("Modality", "")).upper()
    if modality != "CT":
        note(f"series {uid} is {modality or 'of no stated modality'}, not CT; TotalSegmentator's "
             "--fast model was trained on CT")

    datasets = [ds for _, ds in items]
    # dicom2nifti groups slices by InstanceNumber before sorting by position: give it copies numbered in
    # position order where the numbers are missing or out of order (it would see a 4D series otherwise)
    numbers = [ds.get("InstanceNumber") for ds in datasets]
    ordered = all(n is not None for n in numbers) and (
        all(int(a) < int(b) for a, b in zip(numbers, numbers[1:]))
        or all(int(a) > int(b) for a, b in zip(numbers, numbers[1:])))
    to_convert = datasets if ordered else [copy.deepcopy(ds) for ds in datasets]  # copy.copy shares elements
    if not ordered:
        for i, ds in enumerate(to_convert):
            ds.InstanceNumber = i + 1

    out = work_dir / "dicom_ct.nii"
    try:
        _dicom2nifti(to_convert, out)
    except (ConversionError, ConversionValidationError) as e:
        code = str(e.args[0] if e.args else e)
        if "GANTRY_TILT" in code:
            raise DicomInputError(f"series {uid} is tilted (gantry tilt: slice positions not along the slice normal)"
                                  "; TotalSegmentator's conversion (dicom2nifti) refuses it too") from None
        raise DicomInputError(f"cannot convert series {uid}: dicom2nifti says {code}") from None
    except Exception as e:  # noqa: BLE001 - a decoder or a truncated file: name the slice
        reason = _find_undecodable(items, folder)
        if reason is None:
            raise
        raise DicomInputError(reason) from e
    return DicomInput(nifti=out, series_uid=uid, datasets=datasets, modality=modality,
                      files=[p for p, _ in items])
