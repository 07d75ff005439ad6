"""The float16 sliding-window kernels of rust/ (src/kernels.rs), loaded with ctypes when built.

One fused pass where the torch/numpy path in `sliding_window` needs four: `acc = half(f32(acc) + pred * g)`
per class, and `argmax_c(half(acc_c / w))` per voxel, with the same IEEE float16 rounding (F16C
round-to-nearest-even), so the labels are bit-identical (tests/test_variants.py compares them).

`rust/setup.sh` (run by `make bench` / `make test`) builds `rust/target/release/libtotalseg_kernels.so`;
without it, or with TSBENCH_NATIVE_KERNELS=0, `available()` is False and `sliding_window` uses torch.
"""
from __future__ import annotations

import ctypes
import os
from functools import lru_cache

import numpy as np

from common.core import paths

LIBRARY = paths.REPO_ROOT / "rust" / "target" / "release" / "libtotalseg_kernels.so"
_SIZE3 = ctypes.c_size_t * 3
NON_FINITE = 3  # divide_argmax's result bits: 1 an inf quotient, 2 a NaN one


@lru_cache(maxsize=1)
def _library():
    if os.environ.get("TSBENCH_NATIVE_KERNELS", "1") == "0" or not LIBRARY.is_file():
        return None
    try:
        lib = ctypes.CDLL(str(LIBRARY))
    except OSError:
        return None
    ptr = ctypes.c_void_p
    lib.tsk_accumulate_tile.argtypes = [ptr, ctypes.c_size_t, _SIZE3, _SIZE3, ptr, ptr, _SIZE3, ctypes.c_size_t]
    lib.tsk_divide_argmax.argtypes = [ptr, ptr, ctypes.c_size_t, _SIZE3, _SIZE3, _SIZE3, ptr, ctypes.c_size_t]
    lib.tsk_accumulate_tile.restype = lib.tsk_divide_argmax.restype = ctypes.c_int
    if hasattr(lib, "tsk_head_accumulate"):  # a library built before the fused head has only the two above
        size = ctypes.c_size_t
        lib.tsk_head_accumulate.argtypes = [ptr, size, _SIZE3, _SIZE3, ptr, size, _SIZE3, size, size, ptr, ptr, ptr, size]
        lib.tsk_head_accumulate.restype = lib.tsk_head_simd.restype = ctypes.c_int
    return lib


def available() -> bool:
    return _library() is not None


def _c_array(a: np.ndarray, dtype) -> bool:
    return a.dtype == dtype and a.flags.c_contiguous


def accumulate_tile(logits: np.ndarray, pred: np.ndarray, gauss32: np.ndarray, start: tuple[int, ...],
                    threads: int) -> bool:
    """logits[:, start:start+patch] = float16(float32(logits[...]) + pred * gauss32) in one pass; False
    (nothing written) where the kernels are not built or the arrays are not C-contiguous as expected."""
    lib = _library()
    if lib is None or not (_c_array(logits, np.float16) and _c_array(pred, np.float32)
                           and _c_array(gauss32, np.float32) and pred.shape[0] == logits.shape[0]):
        return False
    status = lib.tsk_accumulate_tile(logits.ctypes.data, logits.shape[0], _SIZE3(*logits.shape[1:]), _SIZE3(*start),
                                     pred.ctypes.data, gauss32.ctypes.data, _SIZE3(*pred.shape[1:]), threads)
    if status != 0:
        raise ValueError(f"native accumulate_tile refused tile {start} of {pred.shape} in {logits.shape}")
    return True


def divide_argmax(logits: np.ndarray, weights: np.ndarray, region: tuple[slice, ...],
                  threads: int) -> np.ndarray | None:
    """uint8 argmax over classes of float16(logits / weights) inside `region` (first maximum wins); None
    where the kernels are not built, the arrays do not fit, or a quotient was inf/NaN (the caller's
    reference path then decides what those give)."""
    lib = _library()
    if lib is None or not (_c_array(logits, np.float16) and _c_array(weights, np.float16)
                           and logits.shape[1:] == weights.shape and logits.shape[0] <= 256):
        return None
    bounds = [s.indices(n) for s, n in zip(region, weights.shape)]
    if any(step != 1 or stop < start for start, stop, step in bounds):
        return None
    labels = np.empty([stop - start for start, stop, _ in bounds], dtype=np.uint8)
    status = lib.tsk_divide_argmax(logits.ctypes.data, weights.ctypes.data, logits.shape[0], _SIZE3(*weights.shape),
                                   _SIZE3(*(b[0] for b in bounds)), _SIZE3(*(b[1] for b in bounds)),
                                   labels.ctypes.data, threads)
    if status < 0:
        raise ValueError(f"native divide_argmax refused region {bounds} of {logits.shape}")
    return None if status & NON_FINITE else labels


def fused_head_available() -> bool:
    """Whether `head_accumulate` runs here: the kernels built with it and a CPU with AVX-512 (its scalar path,
    kept for the Rust tests, is far too slow for a pipeline)."""
    lib = _library()
    return lib is not None and hasattr(lib, "tsk_head_accumulate") and lib.tsk_head_simd() == 1


def head_accumulate(logits: np.ndarray, start: tuple[int, ...], features: np.ndarray, rows: tuple[int, int],
                    weight: np.ndarray, bias: np.ndarray, gauss32: np.ndarray, threads: int) -> None:
    """The network's last layer (1x1x1 convolution `weight` (C, F) + `bias` (C,)) on patch rows [rows) of
    `features` (F, *patch) float32, times `gauss32`, added in float16 into `logits` (C, *block) at `start`:
    `logits[:, start + p] = float16(float32(logits[...]) + (bias + weight @ features[:, p]) * gauss32[p])`,
    with no (C, *patch) float32 logits in between. The same as `accumulate_tile` after the runtime's head up to
    the dot product's float rounding (fused multiply-adds from the bias, channel by channel)."""
    lib = _library()
    if not fused_head_available():
        raise RuntimeError("the fused head needs rust/'s kernels (bash rust/setup.sh) and a CPU with AVX-512")
    n_in = features.shape[0]
    if not (_c_array(logits, np.float16) and _c_array(features, np.float32) and _c_array(gauss32, np.float32)
            and _c_array(weight, np.float32) and _c_array(bias, np.float32) and weight.shape == (logits.shape[0], n_in)
            and bias.shape == (logits.shape[0],) and gauss32.shape == features.shape[1:]):
        raise ValueError("head_accumulate: arrays of the wrong dtype, layout or shape")
    status = lib.tsk_head_accumulate(logits.ctypes.data, logits.shape[0], _SIZE3(*logits.shape[1:]), _SIZE3(*start),
                                     features.ctypes.data, n_in, _SIZE3(*features.shape[1:]), rows[0], rows[1],
                                     weight.ctypes.data, bias.ctypes.data, gauss32.ctypes.data, threads)
    if status != 0:
        raise ValueError(f"native head_accumulate refused rows {rows} at {start} of {logits.shape} (status {status})")
