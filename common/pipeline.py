"""The `--fast` pipeline of DESIGN.md section 2, in process, timed per stage.

load -> canonical -> 3 mm -> crop -> normalize -> pad -> sliding window -> argmax ->
uncrop -> back to the input grid -> input orientation -> save.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from common import io, preprocess, resample, sliding_window
from common.backends import Backend
from common.weights import NUM_CLASSES, PATCH_SIZE

STAGES = ("load_s", "preprocess_s", "inference_s", "postprocess_s", "save_s")


@dataclass(frozen=True)
class PipelineConfig:
    """What a variant changes. The defaults are TotalSegmentator's `--fast` settings."""
    step: float = 0.8
    patch: tuple[int, int, int] = PATCH_SIZE
    resample_order: int = 1


@dataclass
class SegmentationResult:
    labels: np.ndarray  # uint8 on the input grid and orientation
    timings: dict[str, float] = field(default_factory=dict)
    n_tiles: int = 0


class StageTimer:
    def __init__(self):
        self.timings = {name: 0.0 for name in STAGES}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] += time.perf_counter() - start


def predict_canonical(data_ras: np.ndarray, spacing: np.ndarray, backend: Backend, config: PipelineConfig,
                      timer: StageTimer, on_tile: Callable[[], None] | None = None) -> tuple[np.ndarray, int]:
    """Labels for a canonical (RAS, x-y-z) float64 volume, on that same grid."""
    with timer.stage("preprocess_s"):
        zoom = resample.zoom_factors(spacing)
        resampled = resample.to_target_spacing(data_ras, zoom, order=config.resample_order)
        image = resampled.transpose(2, 1, 0)  # nnU-Net's (z, y, x) view of the RAS array
        box = preprocess.nonzero_bbox(image)
        cropped = preprocess.normalize_ct(image[preprocess.bbox_slices(box)])
        padded, unpad = preprocess.pad_to_patch(cropped, config.patch)
        n_tiles = sliding_window.count_tiles(cropped.shape, config.patch, config.step)
    with timer.stage("inference_s"):
        logits = sliding_window.sliding_window(padded, backend.predict, config.patch, config.step,
                                               NUM_CLASSES, on_tile)
    with timer.stage("postprocess_s"):
        labels_cropped = sliding_window.argmax_labels(logits[(slice(None), *unpad)])
        del logits
        labels = np.zeros(image.shape, dtype=np.uint8)
        labels[preprocess.bbox_slices(box)] = labels_cropped
        labels = resample.labels_to_shape(labels.transpose(2, 1, 0), data_ras.shape)
    return labels, n_tiles


def segment_volume(volume: io.Volume, backend: Backend, config: PipelineConfig, timer: StageTimer,
                   on_tile: Callable[[], None] | None = None) -> SegmentationResult:
    with timer.stage("preprocess_s"):
        data_ras, affine_ras, _ = io.to_canonical(volume.data, volume.affine)
        spacing = resample.header_spacing(data_ras.shape, affine_ras)
    labels_ras, n_tiles = predict_canonical(data_ras, spacing, backend, config, timer, on_tile)
    with timer.stage("postprocess_s"):
        labels = io.from_canonical(labels_ras, affine_ras, volume.affine)
    return SegmentationResult(labels, timer.timings, n_tiles)


def segment_file(input_path: Path, output_path: Path | None, backend: Backend, config: PipelineConfig,
                 on_tile: Callable[[], None] | None = None) -> SegmentationResult:
    """Read, segment, write (atomically). Timings cover reading the input to the written output."""
    timer = StageTimer()
    with timer.stage("load_s"):
        volume = io.load_volume(input_path)
    result = segment_volume(volume, backend, config, timer, on_tile)
    if output_path is not None:
        with timer.stage("save_s"):
            io.save_atomic(io.label_image(result.labels, volume), output_path)
    result.timings = dict(timer.timings)
    result.timings["wall_s"] = sum(timer.timings[s] for s in STAGES)
    return result
