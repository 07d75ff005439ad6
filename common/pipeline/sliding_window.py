"""nnU-Net's sliding-window inference: tile steps, Gaussian importance map, float16 accumulation.

`sliding_window` takes any `predict(patch) -> logits` callable, so every runtime shares this code.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from typing import Callable, Iterator

import numpy as np
from scipy.ndimage import gaussian_filter

Predict = Callable[[np.ndarray], np.ndarray]  # (1, 1, *patch) float32 -> (1, C, *patch) float32
# (1, 1, *patch) float32 -> (z0, (C, dz, *patch[1:]) float32) slabs covering the patch's depth
PredictSlabs = Callable[[np.ndarray], Iterator[tuple[int, np.ndarray]]]
# (predict_features: (1, 1, *patch) -> (F, *patch) float32, weight (C, F), bias (C,)): the last layer run here
FusedHead = tuple[Callable[[np.ndarray], np.ndarray], np.ndarray, np.ndarray]


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


@lru_cache(maxsize=4)  # 0.2-0.35 s per case otherwise; read-only, shared by all callers
def gaussian_importance(patch: tuple[int, ...], sigma_scale: float = 1 / 8, max_value: float = 10) -> np.ndarray:
    """float16 Gaussian, max = `max_value`, zeros replaced by the smallest non-zero value."""
    impulse = np.zeros(patch)
    impulse[tuple(p // 2 for p in patch)] = 1
    gauss = gaussian_filter(impulse, [p * sigma_scale for p in patch], 0, mode="constant", cval=0)
    gauss /= gauss.max() / max_value
    gauss = gauss.astype(np.float32).astype(np.float16)  # torch casts double -> half through float
    gauss[gauss == 0] = gauss[gauss != 0].min()
    gauss.setflags(write=False)
    return gauss


def _add_like_torch(logits: np.ndarray, pred: np.ndarray, gauss32: np.ndarray, sl: tuple[slice, ...]) -> None:
    pred *= gauss32
    # float16 += float32 computes in float32 and rounds once to float16, like torch's in-place add.
    target = logits[(slice(None), *sl)]
    np.add(target, pred, out=target, casting="unsafe")


def _accumulate(image: np.ndarray, predict: Predict, patch: tuple[int, ...], step: float, n_classes: int,
                add_tile: Callable, on_tile: Callable[[], None] | None) -> tuple[np.ndarray, np.ndarray]:
    """Undivided float16 logits and float16 Gaussian weights over all tiles; `add_tile` adds one prediction."""
    gauss = gaussian_importance(patch)
    gauss32 = gauss.astype(np.float32)
    logits = np.zeros((n_classes, *image.shape), dtype=np.float16)
    weights = np.zeros(image.shape, dtype=np.float16)
    for sl in tile_slices(image.shape, patch, step):
        tile = np.ascontiguousarray(image[sl])[None, None]
        pred = np.asarray(predict(tile), dtype=np.float32).reshape(n_classes, *patch)
        add_tile(logits, pred, gauss32, sl)
        weights[sl] += gauss
        if on_tile:
            on_tile()
    return logits, weights


def sliding_window(image: np.ndarray, predict: Predict, patch: tuple[int, ...], step: float, n_classes: int,
                   on_tile: Callable[[], None] | None = None) -> np.ndarray:
    """Logits (C, *image.shape) as float16, accumulated as nnU-Net does on CPU."""
    logits, weights = _accumulate(image, predict, patch, step, n_classes, _add_like_torch, on_tile)
    np.divide(logits, weights, out=logits)
    return logits


def argmax_labels(logits: np.ndarray) -> np.ndarray:
    """Class index per voxel; ties go to the lowest index, as in torch and numpy."""
    return np.argmax(logits, axis=0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# Faster equivalents (exact tier): the same float16 values, fewer passes over memory, both cores busy.

_POOLS: dict[int, "object"] = {}


def _pool(threads: int):
    from concurrent.futures import ThreadPoolExecutor

    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="accumulate")
    return _POOLS[threads]


def parallel_ranges(n: int, threads: int, fn: Callable[[int, int], None]) -> None:
    """fn(lo, hi) over `threads` contiguous ranges of range(n), in threads (numpy releases the GIL)."""
    threads = max(1, min(threads, n))
    bounds = np.linspace(0, n, threads + 1).astype(int)
    if threads == 1:
        fn(0, n)
        return
    for future in [_pool(threads).submit(fn, int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]:
        future.result()


def _torch():
    """torch as a CPU array library (vectorized float16 conversions, 7-20x numpy's); None if absent."""
    try:
        import torch
    except ImportError:
        return None
    return torch


@contextmanager
def _torch_single_thread(torch):
    """Our own threads split the work; torch's intra-op pool (which spins badly on a loaded 2-core
    machine: 10x slower per small op here) is set to one thread meanwhile."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def accumulate_tile(logits: np.ndarray, pred: np.ndarray, gauss32: np.ndarray, sl: tuple[slice, ...],
                    threads: int = 1, block: int = 8) -> None:
    """logits[:, sl] = float16(float32(logits[:, sl]) + pred * gauss32), bit-exact with `sliding_window`.

    One fused pass per class in rust/'s kernels where they are built (common/runtime/native_kernels.py); otherwise
    channel by channel, so temporaries are one channel, never the 118-channel volume, and `pred` (C, *patch)
    float32 is overwritten (it is the backend's reused output buffer), with torch's vectorized float16
    conversions where torch is installed (same IEEE round-to-nearest-even), numpy otherwise.
    """
    from common.runtime import native_kernels

    if native_kernels.accumulate_tile(logits, pred, gauss32, tuple(s.start for s in sl), threads):
        return
    n_classes, depth = pred.shape[0], pred.shape[1]
    torch = _torch()
    if torch is not None:
        pred_t, logits_t, gauss_t = torch.from_numpy(pred), torch.from_numpy(logits), torch.from_numpy(gauss32)

        def work_t(lo: int, hi: int) -> None:
            tmp = torch.empty(pred.shape[1:], dtype=torch.float32)
            for c in range(lo, hi):
                p = pred_t[c]
                p.mul_(gauss_t)
                target = logits_t[c][sl]
                tmp.copy_(target)  # float16 -> float32 is exact
                p.add_(tmp)
                target.copy_(p)  # one rounding to float16 (round to nearest even, as numpy)

        with _torch_single_thread(torch):
            parallel_ranges(n_classes, threads, work_t)
        return

    def work(lo: int, hi: int) -> None:
        tmp = np.empty((block, *pred.shape[2:]), dtype=np.float32)
        for c in range(lo, hi):
            target_c = logits[c][sl]
            for z in range(0, depth, block):
                n = min(block, depth - z)
                t = tmp[:n]
                np.multiply(pred[c, z:z + n], gauss32[z:z + n], out=t)
                target = target_c[z:z + n]
                np.add(t, target, out=t)  # float16 -> float32 is exact; the sum rounds once below
                target[...] = t

    parallel_ranges(n_classes, threads, work)


def sliding_window_accumulate(image: np.ndarray, predict: Predict, patch: tuple[int, ...], step: float,
                              n_classes: int, on_tile: Callable[[], None] | None = None,
                              threads: int = 1, predict_slabs: PredictSlabs | None = None
                              ) -> tuple[np.ndarray, np.ndarray]:
    """Undivided float16 logits and float16 weights: `sliding_window` without its final division.

    Feed the pair to `divide_argmax` (chunked): together they give exactly `argmax_labels(sliding_window(...))`
    without a float32 copy of the 118-channel volume and without numpy's whole-volume argmax transpose.
    `predict_slabs` (instead of `predict`): each tile's logits arrive as depth slabs and are added slab by slab;
    the accumulation is elementwise, so the sums are the same.
    """
    if predict_slabs is None:
        def add_tile(logits, pred, gauss32, sl):
            accumulate_tile(logits, pred, gauss32, sl, threads)

        return _accumulate(image, predict, patch, step, n_classes, add_tile, on_tile)

    gauss = gaussian_importance(patch)
    gauss32 = gauss.astype(np.float32)
    logits = np.zeros((n_classes, *image.shape), dtype=np.float16)
    weights = np.zeros(image.shape, dtype=np.float16)
    for sl in tile_slices(image.shape, patch, step):
        for z, slab in predict_slabs(np.ascontiguousarray(image[sl])[None, None]):
            depth = slab.shape[1]
            slab_sl = (slice(sl[0].start + z, sl[0].start + z + depth), *sl[1:])
            accumulate_tile(logits, slab, gauss32[z:z + depth], slab_sl, threads)
        weights[sl] += gauss
        if on_tile:
            on_tile()
    return logits, weights


def divide_argmax(logits: np.ndarray, weights: np.ndarray | None, region: tuple[slice, ...] | None = None,
                  threads: int = 1, slab: int = 4) -> np.ndarray:
    """uint8 argmax over channels of logits / weights (float16 division, as `sliding_window` does) inside
    `region`, slab by slab along the first spatial axis: the same labels as dividing everything and then
    `argmax_labels`, with only a slab-sized temporary. `weights=None`: argmax of `logits` as they are.
    Ties go to the lowest index (torch and numpy agree)."""
    from common.runtime import native_kernels

    if region is None:
        region = tuple(slice(None) for _ in logits.shape[1:])
    if weights is not None:
        labels = native_kernels.divide_argmax(logits, weights, region, threads)  # None: not built, or inf/NaN
        if labels is not None:
            return labels
    view = logits[(slice(None), *region)]
    w_view = weights[region] if weights is not None else None
    depth = view.shape[1]
    labels = np.empty(view.shape[1:], dtype=np.uint8)
    torch = _torch()
    if torch is not None:
        view_t = torch.from_numpy(view if view.flags.writeable else view.copy())
        w_t = torch.from_numpy(w_view if w_view is None or w_view.flags.writeable else w_view.copy()) \
            if w_view is not None else None
        labels_t = torch.from_numpy(labels)

        def work_t(lo: int, hi: int) -> None:
            tmp = torch.empty((view.shape[0], slab, *view.shape[2:]), dtype=view_t.dtype)
            tmp32 = torch.empty(tmp.shape, dtype=torch.float32)
            best = torch.empty(tmp.shape[1:], dtype=torch.float32)
            mask = torch.empty(tmp.shape[1:], dtype=torch.bool)
            for z in range(lo, hi, slab):
                n = min(slab, hi - z)
                t, t32, b, m = tmp[:, :n], tmp32[:, :n], best[:n], mask[:n]
                if w_t is not None:
                    torch.div(view_t[:, z:z + n], w_t[z:z + n], out=t)  # float16 result, as np.divide
                else:
                    t.copy_(view_t[:, z:z + n])
                t32.copy_(t)  # exact widening: the order of values is unchanged
                if bool(torch.isnan(t32).any()):
                    labels_t[z:z + n] = torch.from_numpy(np.argmax(t.numpy(), axis=0).astype(np.uint8))
                    continue
                out = labels_t[z:z + n]
                out.zero_()
                b.copy_(t32[0])
                for c in range(1, t32.shape[0]):  # running max; strict > keeps the lowest index on ties
                    torch.gt(t32[c], b, out=m)
                    out.masked_fill_(m, c)
                    torch.maximum(b, t32[c], out=b)

        with _torch_single_thread(torch):
            parallel_ranges(depth, threads, work_t)
        return labels

    def work(lo: int, hi: int) -> None:
        tmp = np.empty((view.shape[0], slab, *view.shape[2:]), dtype=view.dtype)
        for z in range(lo, hi, slab):
            n = min(slab, hi - z)
            t = tmp[:, :n]
            if w_view is not None:
                np.divide(view[:, z:z + n], w_view[z:z + n], out=t)
            else:
                t[...] = view[:, z:z + n]
            labels[z:z + n] = np.argmax(t, axis=0)

    parallel_ranges(depth, threads, work)
    return labels


# ---------------------------------------------------------------------------------------------------------
# Streaming (exact tier): the accumulator lives only for the depth the remaining tiles still touch.

def _depth_blocks(image_depth: int, patch_depth: int, step: float) -> list[tuple[int, int]]:
    """[lo, hi) depth ranges between consecutive tile starts and ends: every tile covers whole blocks."""
    starts = tile_steps((image_depth,), (patch_depth,), step)[0]
    edges = sorted({0, image_depth, *starts, *(s + patch_depth for s in starts)})
    return list(zip(edges[:-1], edges[1:]))


def sliding_window_labels(image: np.ndarray, predict: Predict | None, patch: tuple[int, ...], step: float,
                          n_classes: int, on_tile: Callable[[], None] | None = None, threads: int = 1,
                          predict_slabs: PredictSlabs | None = None,
                          skip_tile: Callable[[np.ndarray], float | None] | None = None,
                          fused_head: FusedHead | None = None) -> np.ndarray:
    """uint8 labels of the whole `image`: `divide_argmax(*sliding_window_accumulate(...))`, bit for bit, with the
    float16 accumulator held only for the depth blocks the current tile touches.

    Tiles run in `tile_slices`' order (depth outermost), so once a tile starts at depth z no later tile touches
    anything above z: those blocks are divided, argmaxed and freed. Each voxel still receives its tiles' sums
    in the same order, so every float16 value is the one the whole-volume accumulator holds.

    `skip_tile(tile) -> logit or None` (approximate tier, common/pipeline/air_tiles.py): a tile for which it
    returns a number is not run; its blend share goes to the background class alone (that logit x the Gaussian,
    every other class 0), its Gaussian weight is added as usual: the grid and every other tile are unchanged.

    `fused_head` (predict_features, weight, bias), instead of `predict`/`predict_slabs`: the runtime gives the last
    features and the last layer runs inside the accumulation (`native_kernels.head_accumulate`): no float32 logits.
    """
    if predict_slabs is None:
        def predict_slabs(patch_input):
            yield 0, np.asarray(predict(patch_input), dtype=np.float32).reshape(n_classes, *patch)

    gauss = gaussian_importance(patch)
    gauss32 = gauss.astype(np.float32)
    labels = np.empty(image.shape, dtype=np.uint8)
    blocks: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}  # (lo, hi) -> (logits, weights)
    edges = _depth_blocks(image.shape[0], patch[0], step)

    def finish(before: int) -> None:
        for lo, hi in [b for b in blocks if b[1] <= before]:
            logits, weights = blocks.pop((lo, hi))
            labels[lo:hi] = divide_argmax(logits, weights, None, threads)

    for sl in tile_slices(image.shape, patch, step):
        z0 = sl[0].start
        finish(z0)
        mine = [b for b in edges if z0 <= b[0] and b[1] <= z0 + patch[0]]
        for b in mine:
            if b not in blocks:
                shape = (b[1] - b[0], *image.shape[1:])
                blocks[b] = np.zeros((n_classes, *shape), dtype=np.float16), np.zeros(shape, dtype=np.float16)
        tile = np.ascontiguousarray(image[sl])[None, None]
        background = skip_tile(tile) if skip_tile is not None else None
        if background is not None:
            for b in mine:
                target = blocks[b][0][(0, slice(0, b[1] - b[0]), *sl[1:])]
                np.add(target, gauss32[b[0] - z0:b[1] - z0] * np.float32(background), out=target, casting="unsafe")
        elif fused_head is not None:
            from common.runtime import native_kernels

            predict_features, weight, bias = fused_head
            features = predict_features(tile)
            for b in mine:
                native_kernels.head_accumulate(blocks[b][0], (0, sl[1].start, sl[2].start), features,
                                               (b[0] - z0, b[1] - z0), weight, bias, gauss32, threads)
        else:
            for z, slab in predict_slabs(tile):
                lo, hi = z0 + z, z0 + z + slab.shape[1]
                for b in mine:
                    a, e = max(lo, b[0]), min(hi, b[1])
                    if a >= e:
                        continue
                    part = slab if (a, e) == (lo, hi) else np.ascontiguousarray(slab[:, a - lo:e - lo])
                    start = (slice(a - b[0], e - b[0]), *sl[1:])
                    accumulate_tile(blocks[b][0], part, gauss32[a - z0:e - z0], start, threads)
        for b in mine:
            blocks[b][1][(slice(0, b[1] - b[0]), *sl[1:])] += gauss[b[0] - z0:b[1] - z0]
        if on_tile:
            on_tile()
    finish(image.shape[0])
    return labels
