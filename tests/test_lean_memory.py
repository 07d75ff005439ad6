"""Lean memory on the exact tier: the same labels with less alive at once, and the per-step measurement.

- streaming accumulation (`sliding_window_labels`, blocks freed once no later tile touches them) gives the
  labels of the whole-volume accumulator bit for bit, with whole-patch and slab-wise logits;
- EXACT_STAGES end to end on the 8-tile generated volume: identical labels to the default pipeline;
- OpenVINO's head on slabs (`head_slab`) gives the patch model's logits bit for bit, and exact_ov_f32's path
  gives today's labels on a shared CT; its trunk's activations are released once it has run, and requests hand
  back their output tensor, never a copy;
- `split_concat` (decoder convolutions over a skip concatenation as two summed convolutions) is the same math to
  float rounding, and the whole-volume pass compiles each new shape without mixing shapes up;
- the per-step peak is the step's own (VmHWM reset), and workers do not import torch.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from common.pipeline import preprocess, sliding_window
from common.pipeline.run import PipelineConfig, segment_file
from common.runtime.backends import Backend
from common.variants.table import EXACT_STAGES


def _fake_predict(n_classes, patch, seed=0):
    """A deterministic position-dependent 'network' with exact ties and float16 subnormals."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_classes, 1, 1, 1)).astype(np.float32) * 3
    b = rng.standard_normal((n_classes, *patch)).astype(np.float32)

    def predict(tile):
        out = w * tile.reshape(patch)[None] + b
        out[2] = out[1]  # exact ties: the lowest index must win
        out[3, :2] = 1e-6
        return out[None]
    return predict


def _slabs_of(predict, depth):
    def predict_slabs(tile):
        logits = predict(tile)[0]
        for z in range(0, logits.shape[1], depth):
            yield z, np.ascontiguousarray(logits[:, z:z + depth])
    return predict_slabs


@pytest.mark.parametrize("shape", [(40, 23, 30), (29, 17, 9), (16, 16, 16)])
@pytest.mark.parametrize("slab_depth", [0, 3, 16])
def test_streaming_labels_bit_exact(shape, slab_depth):
    # Fails if finish() frees a block the current tile still touches (`finish(z0 + patch[0])`) or if a slab straddling two
    # blocks is added to one of them only.
    patch, n_classes = (16, 10, 12), 7
    image = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    padded, _ = preprocess.pad_to_patch(image, patch)
    predict = _fake_predict(n_classes, patch)
    reference = sliding_window.divide_argmax(*sliding_window.sliding_window_accumulate(
        padded, predict, patch, 0.8, n_classes))
    np.testing.assert_array_equal(reference, sliding_window.argmax_labels(
        sliding_window.sliding_window(padded, predict, patch, 0.8, n_classes)))
    slabs = _slabs_of(predict, slab_depth) if slab_depth else None
    streamed = sliding_window.sliding_window_labels(padded, predict, patch, 0.8, n_classes, threads=2,
                                                    predict_slabs=slabs)
    np.testing.assert_array_equal(streamed, reference)
    assert sliding_window.count_tiles(shape, patch, 0.8) > 1 or shape == (16, 16, 16)


def test_depth_blocks_cover_the_volume_and_split_at_every_tile_edge():
    blocks = sliding_window._depth_blocks(150, 112, 0.8)
    assert blocks == [(0, 38), (38, 112), (112, 150)]  # the 8-tile grid: 112 of 150 slices alive at most


@pytest.fixture(scope="module")
def eight_tiles_default(generated_volumes):
    """The default pipeline's labels on the 8-tile volume with the fake network (computed once for both slab depths)."""
    from common.model.weights import NUM_CLASSES, PATCH_SIZE

    default = segment_file(generated_volumes["eight_tiles"], None, Backend("fake", _fake_predict(NUM_CLASSES, PATCH_SIZE)),
                           PipelineConfig())
    assert len(np.unique(default.labels)) > 3
    return default.labels


@pytest.mark.parametrize("slab_depth", [0, 16])
def test_exact_stages_streamed_on_eight_tiles(slab_depth, generated_volumes, eight_tiles_default, tmp_path):
    """EXACT_STAGES (streaming, input released) vs the default pipeline on the 8-tile volume: same labels.
    Fails with `stream_accumulate` blocks finished one tile early, or a label grid from the released input."""
    from common.model.weights import NUM_CLASSES, PATCH_SIZE

    predict = _fake_predict(NUM_CLASSES, PATCH_SIZE)
    slabs = _slabs_of(predict, slab_depth) if slab_depth else None
    backend = Backend("fake", predict, predict_slabs=slabs)
    assert EXACT_STAGES.stream_accumulate and EXACT_STAGES.release_input
    lean = segment_file(generated_volumes["eight_tiles"], tmp_path / "lean.nii.gz", backend, EXACT_STAGES)
    assert lean.n_tiles == 8
    np.testing.assert_array_equal(lean.labels, eight_tiles_default)


@pytest.fixture(scope="module")
def models(onnx_model):
    """The current models/ (exported from the stand-in when missing or stale; the precise-norm copy is built on first
    use): a missing model is built, never a reason to skip."""
    pytest.importorskip("openvino", reason="openvino not installed")
    return onnx_model


def _openvino(threads, **options):
    """OpenVINO fp32 on the precise-norm patch model; on the plain export for a whole-volume pass (the precise-norm
    statistics are built for the patch shape). Only a missing openvino package skips (the `models` fixture); any
    other failure (a stale model, a compile error, a broken rewrite) fails the test."""
    from common.runtime.backends import make_backend

    model = "plain" if options.get("whole_volume") else "precise_norm"
    return make_backend("openvino", threads, precision="f32", model=model, **options)


def test_openvino_head_slabs_bit_exact(threads, models):
    """Trunk + head on 8-deep slabs = the patch model's logits, bit for bit (fails with a head that drops the
    bias, or slabs written at the wrong depth)."""
    from common.model.weights import PATCH_SIZE

    full = _openvino(threads)
    sliced = _openvino(threads, head_slab=8)
    assert sliced.predict_slabs is not None
    rng = np.random.default_rng(5)
    for patch in (rng.standard_normal((1, 1, *PATCH_SIZE)).astype(np.float32),
                  np.clip(rng.normal(0, 0.5, (1, 1, *PATCH_SIZE)), -1, 3).astype(np.float32)):
        expected = full.predict(patch).copy()
        got = np.empty_like(expected)
        depths = []
        for z, slab in sliced.predict_slabs(patch):
            got[0, :, z:z + slab.shape[1]] = slab
            depths.append(z)
        assert depths == list(range(0, PATCH_SIZE[0], 8))
        np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_openvino_head_slabs_release_the_trunks_activations(threads, models):
    """Once the trunk has run, its ~600 MB of activations are back with the OS while the head and the accumulator
    run: the tile's peak is far above the RSS at the first slab (fails without `release_memory`, whose buffers
    stay resident), and the tile leaves little behind (fails with copied outputs)."""
    from common.core.stage_memory import reset_peak, status_mb
    from common.model.weights import PATCH_SIZE

    sliced = _openvino(threads, head_slab=8)
    patch = np.random.default_rng(6).standard_normal((1, 1, *PATCH_SIZE)).astype(np.float32)
    for _ in sliced.predict_slabs(patch):  # warm-up: the features buffer is resident from here on
        pass
    if not reset_peak():
        pytest.skip("/proc/self/clear_refs not writable here")
    before = status_mb("VmRSS")
    slabs = sliced.predict_slabs(patch)
    next(slabs)
    assert status_mb("VmHWM") - status_mb("VmRSS") > 300
    assert status_mb("VmRSS") - before < 150
    for _ in slabs:
        pass
    assert status_mb("VmRSS") - before < 150


def test_openvino_infer_hands_back_the_output_itself(threads):
    """`_infer` returns the request's output tensor: no copy of it (OpenVINO's `infer` copies every output by
    default, a transient as large as the output at the moment memory peaks). Fails with a copying `_infer`."""
    from common.core.stage_memory import reset_peak, status_mb
    from common.runtime.backends import _infer, openvino_config

    ov = pytest.importorskip("openvino")
    from openvino import opset13 as ops

    x = ops.parameter([1, 1, 64, 256, 256], ov.Type.f32)
    model = ov.Model([ops.tile(ops.multiply(x, ops.constant(np.float32(2))), [1, 16, 1, 1, 1])], [x])
    request = ov.Core().compile_model(model, "CPU", openvino_config(threads)).create_infer_request()
    image = np.ones((1, 1, 64, 256, 256), np.float32)
    _infer(request, image)
    if not reset_peak():
        pytest.skip("/proc/self/clear_refs not writable here")
    start = status_mb("VmRSS")
    out = _infer(request, image)
    assert np.shares_memory(out, request.get_output_tensor(0).data)
    assert out.shape == (1, 16, 64, 256, 256) and float(out[0, 15, 63, 255, 255]) == 2.0
    assert status_mb("VmHWM") - start < 128  # the 256 MB output is written in place, not copied


def test_openvino_whole_volume_head_slabs_same_labels(threads, models):
    """The whole-volume pass with its head + argmax on slabs = the one-model pass (fails with a slab written at
    the wrong depth, or a last slab left unwritten when the depth is not a multiple of the slab)."""
    one = _openvino(threads, whole_volume=True)
    sliced = _openvino(threads, whole_volume=True, head_slab=5)  # 48 % 5: a shorter last slab
    volume = np.clip(np.random.default_rng(6).normal(0, 0.5, (1, 1, 48, 64, 80)), -1, 3).astype(np.float32)
    labels = one.labels_any(volume)
    np.testing.assert_array_equal(sliced.labels_any(volume), labels)
    assert len(np.unique(labels)) > 100  # measured 114 (stand-in): constant labels would pass the equality


def _concat_conv_model(ov, channels=(3, 5), out_channels=4, seed=0):
    from openvino import opset13 as ops

    rng = np.random.default_rng(seed)
    inputs = [ops.parameter([1, c, 6, 7, 8], ov.Type.f32, name=f"in{i}") for i, c in enumerate(channels)]
    weight = rng.standard_normal((out_channels, sum(channels), 3, 3, 3)).astype(np.float32)
    conv = ops.convolution(ops.concat(inputs, 1), ops.constant(weight), [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1])
    return ov.Model([ops.relu(conv)], inputs, "concat_conv")


def test_split_concat_convs_same_math_without_the_concat():
    """Convolution(Concat(a, b)) -> Convolution(a, W_a) + Convolution(b, W_b): no Concat left, the same values to float
    rounding (fails with the weight halves swapped or an input's channels taken from the other's offset)."""
    ov = pytest.importorskip("openvino")
    from common.runtime.openvino_graph import split_concat_convs

    rng = np.random.default_rng(1)
    feeds = [rng.standard_normal((1, c, 6, 7, 8)).astype(np.float32) for c in (3, 5)]
    core = ov.Core()
    expected = core.compile_model(_concat_conv_model(ov), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(feeds)[0]
    model = _concat_conv_model(ov)
    assert split_concat_convs(model) == 1
    assert "Concat" not in {op.get_type_name() for op in model.get_ordered_ops()}
    got = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(feeds)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert (expected > 0).mean() > 0.3


def test_exact_ov_f32_split_concat_on_the_exported_model(threads, models):
    """The exact variant with split_concat: all four decoder concatenations rewritten, the patch's logits within
    float rounding of exact_ov_f32's (measured max 2e-5, stand-in and proxy) and the same argmax on >= 99.998 % of
    voxels (fails with the split weights rounded to float16)."""
    from common.model.weights import PATCH_SIZE

    full = _openvino(threads, head_slab=8)
    split = _openvino(threads, head_slab=8, split_concat=True)
    assert split.details["split_concat"] == 4
    patch = np.clip(np.random.default_rng(7).normal(0, 0.5, (1, 1, *PATCH_SIZE)), -1, 3).astype(np.float32)
    expected = full.predict(patch)[0]
    got = split.predict(patch)[0]
    # measured 2026-12-06 (stand-in weights, 2-core EPYC): max |diff| 2.1e-5, argmax agreement 0.9999925 (12 voxels)
    assert np.abs(got - expected).max() < 1e-4
    assert (got.argmax(0) == expected.argmax(0)).mean() >= 0.99998
    assert len(np.unique(expected.argmax(0))) > 100  # measured 115 labels: a constant argmax would agree trivially


def test_whole_volume_compiles_each_new_shape(threads, models):
    """The whole-volume pass compiled per input shape: shape A, B, then A again gives A's labels again and each
    output has its input's shape (fails if a request compiled for one shape is reused for another)."""
    whole = _openvino(threads, whole_volume=True, head_slab=8)
    rng = np.random.default_rng(8)
    a = np.clip(rng.normal(0, 0.5, (1, 1, 32, 48, 64)), -1, 3).astype(np.float32)
    b = np.clip(rng.normal(0, 0.5, (1, 1, 48, 32, 32)), -1, 3).astype(np.float32)
    first = whole.labels_any(a).copy()
    assert whole.labels_any(b).shape == (1, 1, 48, 32, 32)
    np.testing.assert_array_equal(whole.labels_any(a), first)
    assert first.shape == (1, 1, 32, 48, 64) and len(np.unique(first)) > 100  # measured 111 (stand-in)


def test_exact_ov_f32_lean_path_keeps_todays_labels(threads, generated_volumes, tmp_path, models):
    """exact_ov_f32 as it runs now (head on slabs, streaming, input released) vs as it ran before (whole patch
    logits, whole-volume accumulator): identical labels on a generated CT (any CT will do; one tile, so the test stays
    short: test_exact_stages_streamed_on_eight_tiles streams across tile edges)."""
    from dataclasses import replace

    before = replace(EXACT_STAGES, stream_accumulate=False, release_input=False)
    image = generated_volumes["ras_3mm"]
    today = segment_file(image, None, _openvino(threads), before)
    lean = segment_file(image, None, _openvino(threads, head_slab=8), EXACT_STAGES)
    assert lean.n_tiles == today.n_tiles
    np.testing.assert_array_equal(lean.labels, today.labels)
    assert len(np.unique(today.labels)) > 50


def test_stage_peak_is_the_steps_own():
    """Fails without the VmHWM reset (`reset_peak` returning True without writing): the step after a big one
    would report the big one's peak."""
    from common.core.stage_memory import StageMemory

    memory = StageMemory(reset=True)
    if not memory.available:
        pytest.skip("/proc/self/clear_refs not writable here")
    big = np.ones(300 * 2**20 // 8)  # 300 MB, touched, freed before the step ends
    del big
    memory.checkpoint("big")
    small = np.ones(40 * 2**20 // 8)  # above glibc's largest mmap threshold (32 MB): fresh pages after any earlier frees
    memory.checkpoint("small")
    del small
    big_row, small_row = memory.rows
    assert big_row.peak_mb - big_row.after_mb > 250  # the peak outlives the array
    assert small_row.peak_mb < big_row.peak_mb - 200
    assert small_row.after_mb >= big_row.after_mb + 15
    assert memory.as_dicts()[0]["stage"] == "big"


def test_apply_threads_does_not_import_torch():
    """A worker of ONNX Runtime / OpenVINO must not load torch (550 MB) to set thread counts."""
    code = ("import sys; from common.core.env import apply_threads; apply_threads(1); "
            "from common.harness import variant_worker; from common.pipeline import run; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_stage_memory_section_reads_the_csv(tmp_path):
    """05's section: one column per run, the vanilla ratio from the exact runs only (fails if `@before` rows or
    approximate rows enter the ratio line, or the table is written without tools/stage_memory.py's CSV)."""
    import csv

    from common.reports import stage_memory_report as smr

    assert smr.section(tmp_path) == []
    rows = [{"label": label, "case_id": "c", "threads": 2, "stage": stage, "peak_mb": peak, "after_mb": peak - 10,
             "run_peak_mb": run_peak, "wall_s": 1.0}
            for label, run_peak in (("exact_a@before", 3000), ("exact_a", 1500), ("approx_b", 900))
            for stage, peak in (("load", run_peak - 100), ("network_accumulate", run_peak))]
    rows.append({"label": "vanilla", "case_id": "c", "threads": 2, "stage": "whole run", "peak_mb": 6000,
                 "after_mb": "", "run_peak_mb": 6000, "wall_s": 9.0})
    with open(tmp_path / smr.CSV_NAME, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=smr.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    text = "\n".join(smr.section(tmp_path))
    assert "| network_accumulate | 3000 / 2990 | 1500 / 1490 | 900 / 890 |" in text
    assert "**6000 MB**" in text and "`exact_a` 0.25 (goal <= 0.33)" in text
