"""What DICOM-SEG and RT-STRUCT share: the labels on the source slices, and each class's codes and colour."""
from __future__ import annotations

import csv
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np


class GridMismatchError(ValueError):
    """The labels file is not on the grid of the DICOM series it should describe."""


def slice_geometry(ds):
    """(row direction, column direction, row spacing, column spacing) of one slice, in LPS mm."""
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)
    return iop[:3], iop[3:6], dr, dc


def labels_on_slices(labels_nifti: Path, datasets: list) -> np.ndarray:
    """The labels file's voxels as (slice, row, column) in ``datasets``' order (a view where possible).

    The NIfTI grid must be the series' own grid up to an axis permutation and flips (dicom2nifti's LAS storage
    is one): each DICOM pixel centre lands on a voxel centre, else GridMismatchError.
    """
    import nibabel as nib

    img = nib.load(str(labels_nifti))
    labels = np.asanyarray(img.dataobj)
    if labels.ndim != 3:
        raise GridMismatchError(f"labels are {labels.ndim}D, not 3D")
    inv = np.linalg.inv(img.affine)
    row_dir, col_dir, dr, dc = slice_geometry(datasets[0])

    def ijk(s, r, c):
        lps = np.array([float(v) for v in datasets[s].ImagePositionPatient]) + c * dc * row_dir + r * dr * col_dir
        return inv[:3, :3] @ (lps * [-1.0, -1.0, 1.0]) + inv[:3, 3]

    origin = ijk(0, 0, 0)
    steps = [ijk(1, 0, 0) - origin, ijk(0, 1, 0) - origin, ijk(0, 0, 1) - origin]
    sizes = (len(datasets), int(datasets[0].Rows), int(datasets[0].Columns))
    axes, flips = [], []
    for step, n in zip(steps, sizes):
        a = int(np.argmax(np.abs(step)))
        unit = np.zeros(3)
        unit[a] = np.sign(step[a])
        if not np.allclose(step, unit, atol=1e-3) or a in axes:
            raise GridMismatchError("the labels' grid is not the series' grid (axes do not map one to one)")
        if labels.shape[a] != n:
            raise GridMismatchError(f"labels shape {labels.shape} does not match the series "
                                    f"({sizes[0]} slices of {sizes[1]}x{sizes[2]})")
        axes.append(a)
        flips.append(step[a] < 0)
    expected = np.array([(labels.shape[a] - 1) if f else 0 for a, f in zip(axes, flips)], float)
    corner = np.zeros(3)
    for a, e in zip(axes, expected):
        corner[a] = e
    if not np.allclose(origin, corner, atol=1e-2):
        raise GridMismatchError("the labels' grid is shifted against the series' first slice")
    last = ijk(len(datasets) - 1, 0, 0)
    if not np.allclose(last, origin + (len(datasets) - 1) * steps[0], atol=1e-2):
        raise GridMismatchError("the series' slice positions do not follow the labels' grid")
    out = labels
    for a, f in zip(axes, flips):
        if f:
            out = np.flip(out, axis=a)
    return np.transpose(out, axes)


@lru_cache(maxsize=1)
def _snomed_rows() -> dict[str, dict[str, str]]:
    """TotalSegmentator's own class -> SNOMED codes and colour table (read as data from its package)."""
    spec = importlib.util.find_spec("totalsegmentator")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "totalsegmentator_snomed_mapping.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {row["Structure"]: row for row in csv.DictReader(f)}


def class_codes(name: str):
    """((scheme, value, meaning) of category, of type, of type modifier or None, RGB or None) for one class."""
    row = _snomed_rows().get(name)
    generic = (("SCT", "123037004", "Anatomical Structure"), ("SCT", "91723000", "Anatomical structure"), None)
    if row is None:
        return (*generic, None)

    def code(prefix):
        vals = tuple(row.get(f"{prefix}.{k}", "").strip() for k in ("CodingSchemeDesignator", "CodeValue",
                                                                     "CodeMeaning"))
        return vals if all(vals) else None

    category = code("SegmentedPropertyCategoryCodeSequence") or generic[0]
    ptype = code("SegmentedPropertyTypeCodeSequence") or generic[1]
    modifier = code("SegmentedPropertyTypeModifierCodeSequence")
    rgb = None
    parts = [p.strip() for p in (row.get("DicomRGBColor") or "").split(",")]
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        rgb = tuple(int(p) for p in parts)
    return category, ptype, modifier, rgb


def fallback_rgb(index: int) -> tuple[int, int, int]:
    """A distinct, stable colour for a class the table lacks (golden-angle hues)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)
