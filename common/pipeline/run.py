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

from common.core import io, memory
from common.core.stage_memory import StageMemory
from common.model.weights import NUM_CLASSES, PATCH_SIZE
from common.pipeline import preprocess, resample, sliding_window
from common.runtime.backends import Backend

STAGES = ("load_s", "preprocess_s", "inference_s", "postprocess_s", "save_s")


@dataclass(frozen=True)
class PipelineConfig:
    """What a variant changes. The defaults are TotalSegmentator's `--fast` settings."""
    step: float = 0.8
    patch: tuple[int, int, int] = PATCH_SIZE
    resample_order: int = 1
    # Exact tier: the same labels as the defaults, computed with less memory traffic.
    lean_load: bool = False        # keep integer voxels as stored (no float64 copy); zoom reads them as double
    index_map_resample: bool = False    # labels back to the input grid by per-axis index maps (scipy's own rounding)
    fused_normalize: bool = False  # crop + clip + normalize + pad into one float32 buffer
    f16_accumulate: bool = False  # per-channel, cache-blocked, threaded float16 accumulation (no f32 copies)
    chunked_argmax: bool = False   # divide by the weights and argmax slab by slab
    stream_accumulate: bool = False  # float16 accumulator only for the depth later tiles still touch (tiles only)
    release_input: bool = False    # segment_file drops the loaded voxels once resampled (only the header is kept)
    # Approximate tier: changes the math.
    body_crop: bool = False        # run the network only inside the box of voxels > -500 HU
    whole_volume: bool = False     # one pass over the whole (stride-padded) volume instead of tiles
    air_tiles: bool = False        # tiles whose whole input is air (< -500 HU) not run, blended as background
    #                                (common/pipeline/air_tiles.py; streaming tiles only)
    threads: int = 0               # numpy/native work split over this many threads (0 = the affinity mask);
    #                                a variant's runner sets it from --threads (Variant.config_for)

    @property
    def exact(self) -> bool:
        return not (self.body_crop or self.whole_volume or self.air_tiles or self.step != 0.8
                    or self.resample_order != 1)


@dataclass
class SegmentationResult:
    labels: np.ndarray  # uint8 on the input grid and orientation
    timings: dict[str, float] = field(default_factory=dict)
    n_tiles: float = 0  # tiles run; a whole-volume pass: the padded volume in patch equivalents (e.g. 1.43)


class StageTimer:
    """Seconds per stage; with a `StageMemory`, also the peak memory of each finer step (`checkpoint`)."""

    def __init__(self, memory: StageMemory | None = None):
        self.timings = {name: 0.0 for name in STAGES}
        self.timings["network_s"] = 0.0  # inside inference_s: the runtime's own calls, without tiling/accumulation
        self.memory = memory

    def checkpoint(self, step: str) -> None:
        """The end of one memory step (load, resample, ..., save); nothing without a StageMemory."""
        if self.memory is not None:
            self.memory.checkpoint(step)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] += time.perf_counter() - start


def timed_backend(backend: Backend, timer: StageTimer) -> Backend:
    """`backend` whose predict calls add their seconds to the timer's network_s."""
    from dataclasses import replace

    def timed(call):
        if call is None:
            return None

        def run(array: np.ndarray) -> np.ndarray:
            start = time.perf_counter()
            try:
                return call(array)
            finally:
                timer.timings["network_s"] += time.perf_counter() - start
        return run

    def timed_slabs(call):
        if call is None:
            return None

        def run(array: np.ndarray):
            slabs = call(array)
            while True:
                start = time.perf_counter()
                try:
                    slab = next(slabs)
                except StopIteration:
                    return
                finally:
                    timer.timings["network_s"] += time.perf_counter() - start
                yield slab
        return run

    return replace(backend, predict=timed(backend.predict), labels_any=timed(backend.labels_any),
                   predict_slabs=timed_slabs(backend.predict_slabs), predict_features=timed(backend.predict_features))


NETWORK_STRIDE = 16  # 4 stride-2 stages: whole-volume inputs are padded to a multiple of this


def _numpy_threads(config: PipelineConfig) -> int:
    if config.threads:
        return config.threads
    import os

    return len(os.sched_getaffinity(0))


def predict_canonical(data_ras: np.ndarray, spacing: np.ndarray, backend: Backend, config: PipelineConfig,
                      timer: StageTimer, on_tile: Callable[[], None] | None = None) -> tuple[np.ndarray, float]:
    """Labels for a canonical (RAS, x-y-z) volume, on that same grid. With the default config every
    step is TotalSegmentator's; the exact-tier options give the same labels faster."""
    resampled = resample_canonical(data_ras, spacing, config, timer)
    return predict_resampled(resampled, data_ras.shape, backend, config, timer, on_tile)


def resample_canonical(data_ras: np.ndarray, spacing: np.ndarray, config: PipelineConfig,
                       timer: StageTimer) -> np.ndarray:
    """The canonical volume on the 3 mm grid (int32, x-y-z), as TotalSegmentator's `change_spacing` gives it."""
    with timer.stage("preprocess_s"):
        zoom = resample.zoom_factors(spacing)
        if np.issubdtype(data_ras.dtype, np.integer):
            resampled = resample.to_target_spacing_from_int(data_ras, zoom, config.resample_order,
                                                            _numpy_threads(config))
        else:
            resampled = resample.to_target_spacing(data_ras, zoom, order=config.resample_order)
    timer.checkpoint("resample")
    return resampled


def predict_resampled(resampled: np.ndarray, shape_ras: tuple[int, ...], backend: Backend, config: PipelineConfig,
                      timer: StageTimer, on_tile: Callable[[], None] | None = None,
                      keep: dict | None = None) -> tuple[np.ndarray, float]:
    """`predict_canonical` from its resampled volume: labels on the canonical grid of shape `shape_ras`.
    `keep`: a dict that receives "labels_3mm", the labels on the resampled grid (x-y-z, before going back)."""
    threads = _numpy_threads(config)
    with timer.stage("preprocess_s"):
        image = resampled.transpose(2, 1, 0)
        box = preprocess.nonzero_bbox(image)
        if config.body_crop:
            body = preprocess.intersect_boxes(box, preprocess.body_bbox(image))
            sizes = [max(p, -(-(hi - lo) // NETWORK_STRIDE) * NETWORK_STRIDE) if config.whole_volume else p
                     for (lo, hi), p in zip(body, config.patch)]
            grown = preprocess.grow_box(body, sizes, image.shape)  # real context, not zero padding
            box = preprocess.intersect_boxes(box, grown) if not config.whole_volume else grown
        cropped = image[preprocess.bbox_slices(box)]
        multiple = NETWORK_STRIDE if config.whole_volume else 1
        if config.fused_normalize or config.whole_volume:
            padded, unpad = preprocess.normalize_pad(cropped, config.patch, multiple)
        else:
            padded, unpad = preprocess.pad_to_patch(preprocess.normalize_ct(cropped), config.patch)
        if config.whole_volume:  # patch equivalents, so GFLOP and efficiency figures stay comparable
            n_tiles = round(float(np.prod(padded.shape) / np.prod(config.patch)), 2)
        else:
            n_tiles = sliding_window.count_tiles(cropped.shape, config.patch, config.step)
            if config.air_tiles:  # the tiles actually run
                from common.pipeline.air_tiles import count_air_tiles

                n_tiles -= count_air_tiles(padded, config.patch, config.step)[0]
        timer.checkpoint("normalize_pad")
    with timer.stage("inference_s"):
        backend = timed_backend(backend, timer)
        logits = weights = labels_cropped = None
        if config.whole_volume:
            if backend.labels_any is None:
                raise ValueError(f"backend {backend.name} runs only its fixed patch shape: no whole-volume pass")
            labels_cropped = backend.labels_any(np.ascontiguousarray(padded)[None, None])[0, 0][unpad]
            if on_tile:
                on_tile()
        elif backend.predict is None:
            raise ValueError(f"backend {backend.name} was built for whole-volume labels: no tiles")
        elif config.stream_accumulate:
            from common.pipeline.air_tiles import skip_air

            labels_cropped = sliding_window.sliding_window_labels(
                padded, backend.predict, config.patch, config.step, NUM_CLASSES, on_tile, threads,
                backend.predict_slabs, skip_air if config.air_tiles else None,
                (backend.predict_features, *backend.head) if backend.predict_features else None)[unpad]
        elif config.air_tiles:
            raise ValueError("air_tiles needs stream_accumulate (the streaming tile loop)")
        elif config.f16_accumulate:
            logits, weights = sliding_window.sliding_window_accumulate(
                padded, backend.predict, config.patch, config.step, NUM_CLASSES, on_tile, threads,
                backend.predict_slabs)
        else:
            logits = sliding_window.sliding_window(padded, backend.predict, config.patch, config.step,
                                                   NUM_CLASSES, on_tile)
        timer.checkpoint("network_accumulate")
    with timer.stage("postprocess_s"):
        if labels_cropped is None and (config.chunked_argmax or weights is not None):
            labels_cropped = sliding_window.divide_argmax(logits, weights, unpad, threads)
        elif labels_cropped is None:
            labels_cropped = sliding_window.argmax_labels(logits[(slice(None), *unpad)])
        del logits, weights
        timer.checkpoint("argmax")
        labels = np.zeros(image.shape, dtype=np.uint8)
        labels[preprocess.bbox_slices(box)] = labels_cropped
        if keep is not None:
            keep["labels_3mm"] = labels.transpose(2, 1, 0)
        if config.index_map_resample:  # gathered on the (z, y, x) array: (x, y, z) in Fortran order, as NIfTI stores it
            labels = resample.labels_to_shape_fast(labels, shape_ras[::-1]).transpose(2, 1, 0)
        else:
            labels = resample.labels_to_shape(labels.transpose(2, 1, 0), shape_ras)
        timer.checkpoint("labels_back")
    return labels, n_tiles


def load_volume_lean(path: Path) -> io.Volume:
    """`io.load_volume` without the float64 copy where that copy changes nothing downstream: integer
    voxels stored with identity scaling are kept as stored (scipy's zoom reads them as double, and the
    normalization casts them to float32 exactly); .nii.gz streams are inflated by ISA-L. Other files go
    through `io.load_volume`."""
    img = io.validate_nifti(path)
    proxy = img.dataobj
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    identity = (slope is None or np.isnan(slope) or slope == 1) and (inter is None or np.isnan(inter) or inter == 0)
    if not (np.issubdtype(img.get_data_dtype(), np.integer) and identity and hasattr(proxy, "get_unscaled")):
        return io.load_volume(path)
    shape = img.header.get_data_shape()[:3]
    if str(path).endswith(".gz"):
        raw = io.read_gzip(Path(path))
        offset, dtype = int(proxy.offset), img.get_data_dtype()  # the header field can be 0
        data = np.frombuffer(raw, dtype, count=int(np.prod(shape)), offset=offset).reshape(shape, order="F")
    else:
        try:
            data = np.asarray(proxy.get_unscaled())
        except Exception:
            return io.load_volume(path)  # its one-line InputError for unreadable data
        data = data.reshape(shape) if data.ndim > 3 else data
    return io.Volume(data, img.affine.copy(), img.header.copy(), Path(path))


def segment_volume(volume: io.Volume, backend: Backend, config: PipelineConfig, timer: StageTimer,
                   on_tile: Callable[[], None] | None = None, release_input: bool = False,
                   keep: dict | None = None) -> SegmentationResult:
    """`release_input`: set `volume.data` to None once resampled (the caller keeps only its header and affine),
    so the loaded voxels are not alive during inference, and hand the freed heap back to the OS.
    `keep`: a dict that receives the 3 mm grid's CT ("resampled", x-y-z), its labels ("labels_3mm") and the
    canonical affine ("affine_ras") and spacing ("spacing"), for TotalSegmentator's statistics and preview."""
    with timer.stage("preprocess_s"):
        data_ras, affine_ras, _ = io.to_canonical(volume.data, volume.affine)
        spacing = resample.header_spacing(data_ras.shape, affine_ras)
    resampled = resample_canonical(data_ras, spacing, config, timer)
    shape_ras = data_ras.shape
    if release_input:
        volume.data = data_ras = None
        memory.return_freed_heap()
    if keep is not None:
        keep.update(resampled=resampled, affine_ras=affine_ras, spacing=spacing)
    labels_ras, n_tiles = predict_resampled(resampled, shape_ras, backend, config, timer, on_tile, keep)
    with timer.stage("postprocess_s"):
        labels = io.from_canonical(labels_ras, affine_ras, volume.affine)
        timer.checkpoint("orientation")
    return SegmentationResult(labels, timer.timings, n_tiles)


def segment_file(input_path: Path, output_path: Path | None, backend: Backend, config: PipelineConfig,
                 on_tile: Callable[[], None] | None = None, timer: StageTimer | None = None) -> SegmentationResult:
    """Read, segment, write (atomically). Timings cover reading the input to the written output."""
    timer = timer or StageTimer()
    with timer.stage("load_s"):
        volume = load_volume_lean(input_path) if config.lean_load else io.load_volume(input_path)
    timer.checkpoint("load")
    result = segment_volume(volume, backend, config, timer, on_tile, release_input=config.release_input)
    if output_path is not None:
        with timer.stage("save_s"):
            io.save_atomic(io.label_image(result.labels, volume), output_path)
        timer.checkpoint("save")
    result.timings = dict(timer.timings)
    result.timings["wall_s"] = sum(timer.timings[s] for s in STAGES)
    return result
