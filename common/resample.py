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
