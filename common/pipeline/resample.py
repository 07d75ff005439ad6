"""Change of spacing exactly as TotalSegmentator's `change_spacing` does it (scipy zoom, mode="nearest")."""
from __future__ import annotations

import nibabel as nib
import numpy as np
from scipy import ndimage

TARGET_SPACING_MM = 3.0


def header_spacing(data_shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """Voxel spacing as nibabel stores it for a new image (float32 pixdim from the affine)."""
    header = nib.Nifti1Header()
    header.set_data_shape(data_shape[:3])
    header.set_qform(affine)
    return np.array(header.get_zooms()[:3])


def zoom_factors(spacing: np.ndarray, target_mm: float = TARGET_SPACING_MM) -> np.ndarray | None:
    """old/new spacing per axis, or None where the volume is already on the target grid."""
    target = np.array([target_mm] * 3)
    if np.array_equal(spacing, target):
        return None
    return spacing / target


def resampled_affine(affine: np.ndarray, zoom: np.ndarray) -> np.ndarray:
    new = affine.copy()
    new[:3, :3] = affine[:3, :3] / zoom[None, :]
    return new


def to_target_spacing(data: np.ndarray, zoom: np.ndarray | None, order: int = 1) -> np.ndarray:
    """Resample float64 CT data and truncate to int32 (TotalSegmentator's `dtype=np.int32`)."""
    if zoom is None:
        return data
    return ndimage.zoom(data, zoom, order=order, mode="nearest").astype(np.int32)


def labels_to_shape(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour labels back onto the original grid (`change_spacing(order=0, target_shape=...)`)."""
    if tuple(labels.shape) == tuple(shape):
        return labels
    zoom = np.array(shape) / np.array(labels.shape)
    return ndimage.zoom(labels, zoom, order=0, mode="nearest")


# ---------------------------------------------------------------------------------------------------------
# Faster equivalents (exact tier): the same arrays as the scipy calls above, bit for bit.

def to_target_spacing_from_int(data: np.ndarray, zoom: np.ndarray | None, order: int = 1,
                               threads: int = 1) -> np.ndarray:
    """`to_target_spacing` for integer voxels read without the float64 copy (`pipeline.load_volume_lean`).

    scipy's interpolation reads every input type as double, so zooming the int16 array into a float64
    output gives the very values that zooming its float64 copy does, with a quarter of the memory traffic.
    """
    if zoom is None:
        return data
    return zoom_in_slabs(data, zoom, order, threads).astype(np.int32)


def _exact_shift_offset(start: int, factor: float) -> float | None:
    """An offset o with o / factor == start exactly: scipy then samples output row k of a slab at
    (k + start) * factor, the very coordinate the whole-volume zoom uses for row k + start."""
    offset = start * factor
    for _ in range(8):
        quotient = offset / factor
        if quotient == start:
            return offset
        offset = np.nextafter(offset, np.inf if quotient < start else -np.inf)
    return None


def zoom_in_slabs(data: np.ndarray, zoom: np.ndarray, order: int, threads: int) -> np.ndarray:
    """`ndimage.zoom(data, zoom, order, mode="nearest", output=float64)`, bit for bit, computed as
    `threads` slabs of the output's first axis in parallel (scipy releases the GIL): each slab is an
    `affine_transform` with zoom's own factors and a start offset that scipy maps back exactly."""
    shape = tuple(int(round(n * z)) for n, z in zip(data.shape, zoom))  # scipy's output shape
    if threads <= 1 or order > 1 or shape[0] < 2 * threads or min(shape) < 2:
        return ndimage.zoom(data, zoom, order=order, mode="nearest", output=np.float64)
    factors = (np.array(data.shape, dtype=np.float64) - 1) / (np.array(shape, dtype=np.float64) - 1)
    bounds = np.linspace(0, shape[0], threads + 1).astype(int)
    offsets = [_exact_shift_offset(int(lo), factors[0]) for lo in bounds[:-1]]
    if any(o is None for o in offsets):
        return ndimage.zoom(data, zoom, order=order, mode="nearest", output=np.float64)
    out = np.empty(shape, dtype=np.float64)

    def slab(index: int) -> None:
        lo, hi = bounds[index], bounds[index + 1]
        ndimage.affine_transform(data, factors, offset=[offsets[index], 0.0, 0.0], output=out[lo:hi], order=order,
                                 mode="nearest")

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(slab, range(threads)))
    return out


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output sample of scipy's order-0 zoom from n_in to n_out along one axis.

    Order-0 zoom is separable, so the per-axis index map (found by zooming an index ramp with scipy
    itself, so its rounding is scipy's) fully describes the 3-D result.
    """
    if n_in == n_out:
        return np.arange(n_in)
    ramp = np.arange(n_in, dtype=np.float64)
    picked = ndimage.zoom(ramp, n_out / n_in, order=0, mode="nearest")
    if picked.shape[0] != n_out:
        raise ValueError(f"1-D zoom gave {picked.shape[0]} samples, expected {n_out}")
    return picked.astype(np.intp)


def labels_to_shape_fast(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`labels_to_shape` by per-axis index maps (three gathers instead of scipy's per-voxel loop)."""
    if tuple(labels.shape) == tuple(shape):
        return labels
    out = labels
    for axis, (n_in, n_out) in enumerate(zip(labels.shape, shape)):
        if n_in != n_out:
            out = np.take(out, nearest_indices(n_in, n_out), axis=axis)
    return np.ascontiguousarray(out)
