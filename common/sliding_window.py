"""nnU-Net's sliding-window inference: tile steps, Gaussian importance map, float16 accumulation.

`sliding_window` takes any `predict(patch) -> logits` callable, so every runtime shares this code.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
from scipy.ndimage import gaussian_filter

Predict = Callable[[np.ndarray], np.ndarray]  # (1, 1, *patch) float32 -> (1, C, *patch) float32


def tile_steps(image_size: tuple[int, ...], patch: tuple[int, ...], step: float) -> list[list[int]]:
    """Start offsets per axis: n = ceil((I-P)/(P*step)) + 1, spread evenly and rounded (nnU-Net)."""
    steps = []
    for size, tile in zip(image_size, patch):
        n = int(np.ceil((size - tile) / (tile * step))) + 1
        stride = (size - tile) / (n - 1) if n > 1 else 0
        steps.append([int(np.round(stride * i)) for i in range(n)])
    return steps


def tile_slices(image_size: tuple[int, ...], patch: tuple[int, ...], step: float) -> Iterator[tuple[slice, ...]]:
    zs, ys, xs = tile_steps(image_size, patch, step)
    for z in zs:
        for y in ys:
            for x in xs:
                yield tuple(slice(s, s + p) for s, p in zip((z, y, x), patch))


def count_tiles(image_size: tuple[int, ...], patch: tuple[int, ...], step: float) -> int:
    padded = [max(s, p) for s, p in zip(image_size, patch)]
    return int(np.prod([len(s) for s in tile_steps(padded, patch, step)]))


def gaussian_importance(patch: tuple[int, ...], sigma_scale: float = 1 / 8, max_value: float = 10) -> np.ndarray:
    """float16 Gaussian, max = `max_value`, zeros replaced by the smallest non-zero value."""
    impulse = np.zeros(patch)
    impulse[tuple(p // 2 for p in patch)] = 1
    gauss = gaussian_filter(impulse, [p * sigma_scale for p in patch], 0, mode="constant", cval=0)
    gauss /= gauss.max() / max_value
    gauss = gauss.astype(np.float32).astype(np.float16)  # torch casts double -> half through float
    gauss[gauss == 0] = gauss[gauss != 0].min()
    return gauss


def sliding_window(image: np.ndarray, predict: Predict, patch: tuple[int, ...], step: float, n_classes: int,
                   on_tile: Callable[[], None] | None = None) -> np.ndarray:
    """Logits (C, *image.shape) as float16, accumulated as nnU-Net does on CPU."""
    gauss = gaussian_importance(patch)
    gauss32 = gauss.astype(np.float32)
    logits = np.zeros((n_classes, *image.shape), dtype=np.float16)
    weights = np.zeros(image.shape, dtype=np.float16)
    for sl in tile_slices(image.shape, patch, step):
        tile = np.ascontiguousarray(image[sl])[None, None]
        pred = np.asarray(predict(tile), dtype=np.float32).reshape(n_classes, *patch)
        pred *= gauss32
        # float16 += float32 computes in float32 and rounds once to float16, like torch's in-place add.
        target = logits[(slice(None), *sl)]
        np.add(target, pred, out=target, casting="unsafe")
        weights[sl] += gauss
        if on_tile:
            on_tile()
    np.divide(logits, weights, out=logits)
    return logits


def argmax_labels(logits: np.ndarray) -> np.ndarray:
    """Class index per voxel; ties go to the lowest index, as in torch and numpy."""
    return np.argmax(logits, axis=0).astype(np.uint8)
