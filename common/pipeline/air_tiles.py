"""Approximate tier: tiles of vanilla's grid whose whole input is air are not run (`PipelineConfig.air_tiles`).

A tile is air when every voxel of its normalized input lies below the body threshold (preprocess.BODY_HU, -500 HU):
no patient, no table. Its share of the Gaussian blend is given to the background class (AIR_BACKGROUND_LOGIT x the
Gaussian, every other class 0; sliding_window.sliding_window_labels). The grid does not move and every other tile
runs as in vanilla, so only voxels inside skipped tiles can change, and those are air.
"""
from __future__ import annotations

import numpy as np

from common.model.weights import CT_CLIP, CT_MEAN, CT_STD
from common.pipeline.preprocess import BODY_HU

# The background logit a skipped tile contributes: a clear background vote (the trained net's own background
# margin in air is of this order); any positive value gives background where only skipped tiles reach.
AIR_BACKGROUND_LOGIT = 10.0


def air_threshold() -> float:
    """BODY_HU in the network's normalized units (`preprocess.normalize_ct`)."""
    return float((np.clip(BODY_HU, *CT_CLIP) - CT_MEAN) / max(CT_STD, 1e-8))


def skip_air(tile: np.ndarray) -> float | None:
    """The background logit for an all-air tile (skip it), None to run it. Zero padding (the CT mean, about
    -50 HU) is not air, so a tile holding padding always runs."""
    return AIR_BACKGROUND_LOGIT if float(tile.max()) < air_threshold() else None


def count_air_tiles(image: np.ndarray, patch: tuple[int, ...], step: float) -> tuple[int, int]:
    """(air tiles, tiles) of a normalized, padded image on vanilla's grid."""
    from common.pipeline.sliding_window import tile_slices

    tiles = list(tile_slices(image.shape, patch, step))
    return sum(skip_air(image[sl]) is not None for sl in tiles), len(tiles)
