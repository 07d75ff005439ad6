"""nnU-Net's preprocessing for Dataset297: crop to the non-zero box, CT normalization, padding to the patch."""
from __future__ import annotations

import numpy as np

from common.model.weights import CT_CLIP, CT_MEAN, CT_STD


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


def normalize_pad(data: np.ndarray, patch: tuple[int, ...], multiple: int = 1
                  ) -> tuple[np.ndarray, tuple[slice, ...]]:
    """`pad_to_patch(normalize_ct(data), patch)` in one float32 buffer (no intermediate copy); same values.

    `multiple` > 1 also pads every axis up to a multiple of it (whole-volume inference needs the
    network's total stride); padding is placed as `pad_to_patch` places it (below = diff // 2).
    """
    target = [max(s, p) for s, p in zip(data.shape, patch)]
    if multiple > 1:
        target = [-(-t // multiple) * multiple for t in target]
    lows = [(t - s) // 2 for s, t in zip(data.shape, target)]
    inner = tuple(slice(lo, lo + s) for lo, s in zip(lows, data.shape))
    out = np.zeros(target, dtype=np.float32) if target != list(data.shape) else np.empty(target, np.float32)
    view = out[inner]
    view[...] = data  # the float32 cast of `normalize_ct`
    np.clip(view, CT_CLIP[0], CT_CLIP[1], out=view)
    view -= CT_MEAN
    view /= max(CT_STD, 1e-8)
    return out, inner


BODY_HU = -500.0  # air is about -1000 HU, the body's outer tissue (fat) about -100


def body_bbox(data: np.ndarray, threshold: float = BODY_HU, margin: int = 2) -> list[tuple[int, int]]:
    """Half-open box around voxels above `threshold` HU (the patient, table included), grown by `margin`.

    Approximate tier: voxels outside the box are labelled background without running the network.
    """
    box = nonzero_bbox(data > threshold)
    if all(lo == hi for lo, hi in box):
        return [(0, s) for s in data.shape]
    return [(max(lo - margin, 0), min(hi + margin, s)) for (lo, hi), s in zip(box, data.shape)]


def intersect_boxes(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = [(max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b)]
    return [(lo, max(lo, hi)) for lo, hi in out]


def grow_box(box: list[tuple[int, int]], sizes: list[int], shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """Grow each axis of `box` (about its centre, inside `shape`) to at least `sizes`, so a crop takes real
    image context (air) where padding would otherwise insert zeros (= -50 HU in normalized units)."""
    out = []
    for (lo, hi), want, n in zip(box, sizes, shape):
        want = min(want, n)
        if hi - lo < want:
            lo = max(0, min(lo - (want - (hi - lo)) // 2, n - want))
            hi = lo + want
        out.append((lo, hi))
    return out
