"""The fused head (exact_ov_f32_fused_head): the network's last layer run inside the float16 accumulation.

- the kernel (rust/src/head.rs through native_kernels.head_accumulate) against numpy on random numbers: every
  float16 sum within one unit in the last place of the float64 reference's, nearly all equal, and nothing written
  outside the rows and tile it was given;
- on integer-valued features and weights (every product and sum exact in float32, so the rounding order cannot
  matter) the streaming pipeline with the fused head gives the labels of the same head run as `predict` + the
  usual accumulation, bit for bit, on a volume of 2 x 2 x 2 tiles and 3 depth blocks;
- the OpenVINO backend's features + head parameters give the head-slab backend's logits (float rounding only).
The variant against vanilla on generated volumes is in tests/test_variants.py (every exact variant >= EXACT_MIN).
"""
from __future__ import annotations

import numpy as np
import pytest

from common.pipeline import sliding_window
from common.runtime import native_kernels


@pytest.fixture(autouse=True)
def fused_kernel():
    native_kernels._library.cache_clear()
    if not native_kernels.available():
        pytest.skip(f"{native_kernels.LIBRARY} not built (bash rust/setup.sh)")
    if not native_kernels.fused_head_available():
        pytest.skip("this CPU has no AVX-512: the fused head does not run here")


def _half_ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in float16 steps between two float16 arrays of the same sign pattern."""
    ia, ib = a.view(np.int16).astype(np.int32), b.view(np.int16).astype(np.int32)
    ia = np.where(ia < 0, -32768 - ia, ia)
    ib = np.where(ib < 0, -32768 - ib, ib)
    return np.abs(ia - ib)


def test_kernel_against_numpy_and_only_inside_its_rows():
    rng = np.random.default_rng(3)
    n_classes, n_in, patch = 13, 7, (6, 5, 37)  # a partial block of classes, rows not a multiple of 16
    feat = rng.standard_normal((n_in, *patch), dtype=np.float32)
    weight = rng.standard_normal((n_classes, n_in), dtype=np.float32)
    bias = rng.standard_normal(n_classes, dtype=np.float32)
    gauss = rng.uniform(0.01, 10, patch).astype(np.float16).astype(np.float32)
    acc = (rng.standard_normal((n_classes, 4, 9, 41)) * 20).astype(np.float16)
    before = acc.copy()
    rows, start = (2, 5), (1, 3, 4)  # patch rows 2..4 land at block rows 1..3, columns 3.. and 4..
    native_kernels.head_accumulate(acc, start, feat, rows, weight, bias, gauss, threads=2)

    logits = np.einsum("kc,czyx->kzyx", weight.astype(np.float64), feat[:, rows[0]:rows[1]].astype(np.float64))
    logits = (logits + bias[:, None, None, None]).astype(np.float32)
    region = (slice(None), slice(1, 4), slice(3, 8), slice(4, 41))
    expected = (before[region].astype(np.float32) + logits * gauss[rows[0]:rows[1]]).astype(np.float16)
    ulps = _half_ulps(acc[region], expected)
    assert ulps.max() <= 1 and (ulps == 0).mean() > 0.99, (ulps.max(), (ulps == 0).mean())
    outside = np.ones(acc.shape, bool)
    outside[region] = False
    np.testing.assert_array_equal(acc[outside], before[outside])
    assert (acc[region] != before[region]).mean() > 0.9  # the tile was added, not skipped


def test_kernel_refuses_a_tile_outside_the_block():
    feat = np.zeros((2, 4, 4, 4), np.float32)
    acc = np.zeros((3, 4, 4, 4), np.float16)
    with pytest.raises(ValueError, match="refused rows"):
        native_kernels.head_accumulate(acc, (1, 0, 0), feat, (0, 4), np.zeros((3, 2), np.float32),
                                       np.zeros(3, np.float32), np.ones((4, 4, 4), np.float32), threads=1)


def _integer_head(n_classes: int, n_in: int, patch: tuple[int, ...]):
    """A fake trunk + head whose every product and sum is an exact float32 integer: features are rounded
    multiples of the tile's HU-like values, weights and biases small integers, and ties in plenty."""
    rng = np.random.default_rng(5)
    weight = rng.integers(-3, 4, (n_classes, n_in)).astype(np.float32)
    bias = rng.integers(-4, 5, n_classes).astype(np.float32)
    scales = rng.integers(1, 5, n_in).astype(np.float32)

    def features(tile: np.ndarray) -> np.ndarray:
        t = tile.reshape(patch)
        return np.ascontiguousarray(np.clip(np.round(t[None] * scales[:, None, None, None]), -16, 16), dtype=np.float32)

    def predict(tile: np.ndarray) -> np.ndarray:
        logits = np.tensordot(weight, features(tile), axes=(1, 0)) + bias[:, None, None, None]
        return logits[None].astype(np.float32)

    return features, weight, bias, predict


def test_streaming_pipeline_with_the_fused_head_same_labels():
    patch, n_classes, n_in = (16, 12, 20), 9, 6
    image = np.random.default_rng(1).standard_normal((22, 18, 30)).astype(np.float32) * 2
    assert sliding_window.count_tiles(image.shape, patch, 0.5) == 8 and len(sliding_window._depth_blocks(22, 16, 0.5)) == 3
    features, weight, bias, predict = _integer_head(n_classes, n_in, patch)
    fused = sliding_window.sliding_window_labels(image, predict, patch, 0.5, n_classes, threads=2,
                                                 fused_head=(features, weight, bias))
    usual = sliding_window.sliding_window_labels(image, predict, patch, 0.5, n_classes, threads=2)
    np.testing.assert_array_equal(fused, usual)
    assert len(np.unique(usual)) >= 4


def test_openvino_features_and_head_give_the_head_slab_logits(onnx_model, threads):
    pytest.importorskip("openvino")
    from common.model.weights import PATCH_SIZE
    from common.runtime.backends import EXACT_MODEL, openvino_backend

    fused = openvino_backend(threads, model=EXACT_MODEL, fused_head=True, split_concat=True)
    slabs = openvino_backend(threads, model=EXACT_MODEL, head_slab=8, split_concat=True)
    tile = np.random.default_rng(0).uniform(-1.5, 1.5, (1, 1, *PATCH_SIZE)).astype(np.float32)
    reference = slabs.predict(tile)[0]
    features = fused.predict_features(tile)
    weight, bias = fused.head
    assert features.shape == (weight.shape[1], *PATCH_SIZE) and weight.shape[0] == reference.shape[0]
    logits = np.tensordot(weight, features, axes=(1, 0)) + bias[:, None, None, None]
    scale = np.abs(reference).max()
    assert np.abs(logits - reference).max() <= 1e-5 * scale, np.abs(logits - reference).max() / scale
    np.testing.assert_allclose(fused.predict(tile)[0], logits, rtol=0, atol=1e-6 * scale)
