"""nnU-Net's preprocessing for Dataset297: crop to the non-zero box, CT normalization, padding to the patch."""
from __future__ import annotations

import numpy as np

from common.weights import CT_CLIP, CT_MEAN, CT_STD


def nonzero_bbox(data: np.ndarray) -> list[tuple[int, int]]:
    """Half-open bounding box of `data != 0` (nnU-Net fills holes first, which cannot change the box)."""
    mask = data != 0
    if not mask.any():
        return [(0, 0)] * data.ndim
    box = []
    for axis in range(data.ndim):
        other = tuple(a for a in range(data.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return box


def bbox_slices(box: list[tuple[int, int]]) -> tuple[slice, ...]:
    return tuple(slice(lo, hi) for lo, hi in box)


def normalize_ct(data: np.ndarray) -> np.ndarray:
    """`CTNormalization`: float32 clip, subtract the mean, divide by the std (in place on a float32 copy)."""
    image = data.astype(np.float32)
    np.clip(image, CT_CLIP[0], CT_CLIP[1], out=image)
    image -= CT_MEAN
    image /= max(CT_STD, 1e-8)
    return image


def pad_to_patch(image: np.ndarray, patch: tuple[int, ...]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Zero-pad axes smaller than the patch, `below = diff // 2`; returns the slicer that undoes it."""
    diff = [max(p - s, 0) for s, p in zip(image.shape, patch)]
    if not any(diff):
        return image, tuple(slice(None) for _ in image.shape)
    pads = [(d // 2, d - d // 2) for d in diff]
    padded = np.pad(image, pads, mode="constant", constant_values=0)
    return padded, tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, image.shape))
