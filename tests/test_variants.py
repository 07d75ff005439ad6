"""05's variants: exact ones keep vanilla's labels, approximate ones run end to end, missing runtimes skip.

- non-network exactness: every exact-tier pipeline option gives bit-identical labels to the default
  pipeline (same deterministic fake network), and each fast kernel equals its reference bit for bit;
- torch twin of the exact options: >= 0.99999 vs vanilla (the pipeline is still TotalSegmentator's);
- each exact variant with its real runtime: >= parity_bounds.EXACT_MIN vs vanilla on the shared CTs and on non-RAS,
  anisotropic and already-3 mm generated volumes (the same inputs as test_parity, so vanilla runs are shared).
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest
from scipy import ndimage

from common.core import metrics
from common.harness import bench
from common.pipeline import preprocess, resample, sliding_window
from common.pipeline.run import PipelineConfig, segment_file
from common.runtime.backends import Backend, BackendUnavailable
from common.variants.table import EXACT_STAGES, VARIANTS

from parity_bounds import APPROXIMATE_MIN, BUILT_BY_THEIR_OWN_TEST, EXACT_MIN, TWIN_MIN, assert_written_like  # noqa: E402
EXACT = [n for n, v in VARIANTS.items() if v.tier == "exact" and n != "exact_ort_default"]
APPROXIMATE = [n for n, v in VARIANTS.items() if v.tier == "approximate" and n not in BUILT_BY_THEIR_OWN_TEST]
INPUTS = ["example_ct.nii.gz", "example_ct_sm.nii.gz", "lps_anisotropic", "ras_3mm"]


# --- kernels: bit-exact with the reference implementations -------------------------------------------

def _fake_predict(n_classes, patch, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(n_classes).astype(np.float32) * 3
    b = rng.standard_normal(n_classes).astype(np.float32)

    def predict(tile):
        t = tile.reshape(patch)
        out = w[:, None, None, None] * t[None] + b[:, None, None, None]
        out[2] = out[1]  # exact ties: the lowest index must win
        out[3, :2] = 1e-6  # float16 subnormals
        return out[None].astype(np.float32)
    return predict


@pytest.fixture(params=["native", "torch"])
def kernels(request, monkeypatch):
    """Each fast kernel twice: rust/'s fused float16 kernels (built by `make test`), and the torch path."""
    from common.runtime import native_kernels

    native_kernels._library.cache_clear()
    if request.param == "torch":
        monkeypatch.setenv("TSBENCH_NATIVE_KERNELS", "0")
    elif not native_kernels.available():
        pytest.skip(f"{native_kernels.LIBRARY} not built (bash rust/setup.sh)")
    yield request.param
    native_kernels._library.cache_clear()


@pytest.mark.parametrize("threads", [1, 2])
def test_accumulate_and_chunked_argmax_bit_exact(threads, kernels):
    rng = np.random.default_rng(0)
    patch, classes = (16, 12, 20), 7
    image = rng.standard_normal((37, 12, 29)).astype(np.float32)
    predict = _fake_predict(classes, patch)
    reference = sliding_window.sliding_window(image, predict, patch, 0.8, classes)
    logits, weights = sliding_window.sliding_window_accumulate(image, predict, patch, 0.8, classes,
                                                                threads=threads)
    region = (slice(3, 30), slice(None), slice(1, 28))
    labels = sliding_window.divide_argmax(logits, weights, region, threads=threads, slab=3)
    np.testing.assert_array_equal(labels, sliding_window.argmax_labels(reference[(slice(None), *region)]))
    np.divide(logits, weights, out=logits)
    np.testing.assert_array_equal(logits.view(np.uint16), reference.view(np.uint16))


def test_chunked_argmax_with_nan_and_inf_is_numpys(kernels):
    """Non-finite quotients (the native kernel hands those back) give numpy's labels: NaN wins, as in numpy."""
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((5, 6, 7, 8)).astype(np.float16)
    weights = (rng.random((6, 7, 8)) + 0.5).astype(np.float16)
    logits[3, 2, 3, 4] = np.nan
    logits[1, 4, 0, 0] = np.inf
    labels = sliding_window.divide_argmax(logits, weights, None, threads=2)
    np.testing.assert_array_equal(labels, np.argmax(logits / weights, axis=0).astype(np.uint8))
    assert labels[2, 3, 4] == 3 and labels[4, 0, 0] == 1


def test_resampling_shortcuts_bit_exact():
    rng = np.random.default_rng(1)
    for src, dst in [((37, 41, 29), (130, 140, 81)), ((46, 45, 50), (514, 514, 300)), ((10, 20, 30), (10, 57, 31)),
                     ((9, 9, 9), (4, 30, 9))]:
        labels = rng.integers(0, 118, src).astype(np.uint8)
        np.testing.assert_array_equal(resample.labels_to_shape_fast(labels, dst), resample.labels_to_shape(labels, dst))
    ct = rng.integers(-1024, 3000, (90, 80, 40)).astype(np.int16)
    zoom = np.array([0.8, 0.7, 5.0]) / 3
    np.testing.assert_array_equal(resample.to_target_spacing_from_int(ct, zoom),
                                  resample.to_target_spacing(ct.astype(np.float64), zoom))
    for trial in range(40):  # slab-parallel zoom: scipy's values for every output row, any layout
        shape = tuple(rng.integers(5, 60, 3))
        data = rng.integers(-1024, 2000, shape).astype(np.int16)
        data = np.asfortranarray(data) if trial % 2 else data
        zoom = rng.uniform(0.2, 2.5, 3)
        reference = ndimage.zoom(data, zoom, order=1, mode="nearest", output=np.float64)
        for threads in (2, 3):
            np.testing.assert_array_equal(resample.zoom_in_slabs(data, zoom, 1, threads), reference)


def test_fused_normalize_pad_bit_exact():
    rng = np.random.default_rng(2)
    for shape, patch in [((50, 60, 70), (112, 112, 128)), ((130, 120, 140), (112, 112, 128)), ((7, 9, 5), (8, 8, 8))]:
        data = rng.integers(-2000, 4000, shape).astype(np.int32)
        ref, ref_unpad = preprocess.pad_to_patch(preprocess.normalize_ct(data), patch)
        ours, unpad = preprocess.normalize_pad(data, patch)
        np.testing.assert_array_equal(ours, ref)
        np.testing.assert_array_equal(ours[unpad], ref[ref_unpad])


@pytest.mark.parametrize("name", ["lps_anisotropic", "ras_3mm"])
def test_exact_options_give_identical_labels(name, generated_volumes, tmp_path):
    """All exact-tier options at once vs the default pipeline, same deterministic network: identical labels."""
    from common.model.weights import NUM_CLASSES, PATCH_SIZE

    backend = Backend("fake", _fake_predict(NUM_CLASSES, PATCH_SIZE))
    image = generated_volumes[name]
    default = segment_file(image, tmp_path / "default.nii.gz", backend, PipelineConfig())
    fast = segment_file(image, tmp_path / "fast.nii.gz", backend, EXACT_STAGES)
    assert EXACT_STAGES.exact
    np.testing.assert_array_equal(fast.labels, default.labels)
    assert len(np.unique(default.labels)) > 3


def test_lean_load_matches(generated_volumes, tmp_path):
    import gzip

    import nibabel as nib

    from common.core import io
    from common.pipeline.run import load_volume_lean

    source = generated_volumes["small"]
    big_endian = tmp_path / "big_endian.nii.gz"  # a byte order and a multi-member stream ISA-L must read
    image = nib.load(source)
    header = image.header.copy()
    header.set_data_dtype(np.dtype(">i2"))
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj).astype(">i2"), image.affine, header), big_endian)
    raw = gzip.decompress(big_endian.read_bytes())
    big_endian.write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]))
    for path in (generated_volumes["lps_anisotropic"], source, big_endian):
        lean, full = load_volume_lean(path), io.load_volume(path)
        assert np.issubdtype(lean.data.dtype, np.integer)
        np.testing.assert_array_equal(lean.data.astype(np.float64), full.data)
        np.testing.assert_array_equal(lean.affine, full.affine)
    corrupt = tmp_path / "corrupt.nii.gz"  # header and trailer intact, the deflate stream broken mid-way
    packed = bytearray(gzip.compress(raw))
    packed[len(packed) // 2:len(packed) // 2 + 64] = bytes(64)
    corrupt.write_bytes(bytes(packed))
    with pytest.raises(io.InputError, match="unreadable"):
        load_volume_lean(corrupt)


# --- against vanilla ------------------------------------------------------------------------------------

def _agreement(image, backend, config, vanilla, tmp_path):
    out = tmp_path / "ours.nii.gz"
    result = segment_file(image, out, backend, config)
    assert_written_like(out, image, vanilla(image))  # on disk: uint8, the input's grid, affine and header
    assert result.labels.dtype == np.uint8
    ours, reference = bench.read_labels(out), bench.read_labels(vanilla(image))
    assert len(np.unique(reference)) > 5, "vanilla found almost nothing: the comparison would be empty"
    agreement = metrics.voxel_agreement(ours, reference)
    print(f"{image.name} ({backend.name}): agreement with vanilla {agreement:.7f}")
    return agreement, result


@pytest.fixture(scope="module")
def torch_backend(stand_in, threads):
    from common.runtime.backends import torch_backend

    return torch_backend(threads, stand_in)


@pytest.mark.parametrize("name", ["example_ct.nii.gz", "lps_anisotropic"])
def test_torch_twin_of_exact_options(name, ct_input, torch_backend, vanilla, tmp_path):
    """The exact variants' pipeline options with the network in torch: TotalSegmentator's labels."""
    image = ct_input(name)
    agreement, _ = _agreement(image, torch_backend, EXACT_STAGES, vanilla, tmp_path)
    assert agreement >= TWIN_MIN, f"{name}: exact options changed the pipeline ({agreement:.6f})"


_BACKENDS: dict = {}


def _variant_backend(name, threads):
    from common.runtime.backends import make_backend

    if name not in _BACKENDS:
        _BACKENDS.clear()  # one runtime session alive at a time: memory on a shared 24 GB machine
        v = VARIANTS[name]
        try:
            _BACKENDS[name] = make_backend(v.backend, threads, **v.backend_options)
        except BackendUnavailable as exc:
            _BACKENDS[name] = exc
    if isinstance(_BACKENDS[name], BackendUnavailable):
        pytest.skip(f"{name}: {_BACKENDS[name]}")
    return _BACKENDS[name]


@pytest.mark.parametrize("name", INPUTS)
@pytest.mark.parametrize("variant", EXACT)
def test_exact_variant_matches_vanilla(variant, name, ct_input, onnx_model, threads, vanilla, tmp_path):
    image = ct_input(name)
    backend = _variant_backend(variant, threads)
    agreement, _ = _agreement(image, backend, VARIANTS[variant].config, vanilla, tmp_path)
    assert agreement >= EXACT_MIN, f"{variant} on {name}: agreement {agreement:.6f} < {EXACT_MIN}"


def test_every_exact_onnx_row_runs_the_exact_model():
    """One model for the exact tier (backends.EXACT_MODEL, the precise-norm rewrite); the plain export runs only in
    approximate rows, approx_ort_plain_norm showing its drift."""
    from common.runtime.backends import EXACT_MODEL, PLAIN_MODEL

    models = {n: v.backend_options.get("model") for n, v in VARIANTS.items() if v.tier == "exact"}
    assert "exact_ort_default" in models and set(models.values()) == {EXACT_MODEL}, models
    plain = VARIANTS["approx_ort_plain_norm"]
    assert (plain.tier, plain.backend, plain.backend_options["model"]) == ("approximate", "onnxruntime", PLAIN_MODEL)


@pytest.fixture(scope="module")
def int8_model(onnx_model):
    from common.model.quantize import ensure_int8_model

    return ensure_int8_model(log=lambda m: None)


def test_every_approximate_variant_has_a_floor():
    every = {n for n, v in VARIANTS.items() if v.tier == "approximate"}
    assert set(APPROXIMATE_MIN) == set(APPROXIMATE) == every - BUILT_BY_THEIR_OWN_TEST
    assert BUILT_BY_THEIR_OWN_TEST <= every


@pytest.mark.parametrize("variant", APPROXIMATE)
def test_approximate_variant_runs(variant, generated_volumes, onnx_model, int8_model, threads, vanilla, tmp_path):
    """On the input's grid (shape, affine, zooms), uint8, and agreeing with vanilla at least as much as this
    variant measured (parity_bounds.APPROXIMATE_MIN): an approximate variant changes the math, not the labels'
    meaning."""
    import nibabel as nib

    image = generated_volumes["lps_anisotropic"]
    backend = _variant_backend(variant, threads)
    agreement, result = _agreement(image, backend, VARIANTS[variant].config, vanilla, tmp_path)
    written, source = nib.load(tmp_path / "ours.nii.gz"), nib.load(image)
    assert written.shape == source.shape[:3] and written.header.get_zooms() == source.header.get_zooms()
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    assert written.get_data_dtype() == np.uint8 and result.labels.dtype == np.uint8
    assert agreement >= APPROXIMATE_MIN[variant], f"{variant}: agreement {agreement:.5f} < {APPROXIMATE_MIN[variant]}"


def test_whole_volume_labels_are_the_runtime_argmax(onnx_model, threads):
    """The whole-volume model (any shape, argmax appended) gives the argmax of the patch model's logits, and
    labels of the input's own shape for a shape it was never compiled for."""
    from common.model.weights import PATCH_SIZE
    from common.runtime.backends import make_backend

    pytest.importorskip("openvino")
    _BACKENDS.clear()
    patch = np.random.default_rng(3).standard_normal((1, 1, *PATCH_SIZE)).astype(np.float32)
    expected = np.argmax(make_backend("openvino", threads, precision="f32").predict(patch)[0], axis=0)
    whole = make_backend("openvino", threads, precision="f32", whole_volume=True)
    assert whole.predict is None
    labels = whole.labels_any(patch)
    assert labels.dtype == np.uint8 and labels.shape == (1, 1, *PATCH_SIZE)
    # measured 2026-12-06 (stand-in, 2-core EPYC): identical (1.0), 116 labels in the patch, 115 in the smaller shape
    assert len(np.unique(expected)) > 100, "a constant argmax would agree trivially"
    assert (labels[0, 0] == expected).mean() >= 0.99999
    other = whole.labels_any(np.ascontiguousarray(patch[:, :, :48, :64, :80]))
    assert other.shape == (1, 1, 48, 64, 80) and len(np.unique(other)) > 100


def test_whole_volume_needs_its_backend(threads, tmp_path):
    from dataclasses import replace

    from common.variants.table import Variant

    with pytest.raises(ValueError, match="whole_volume backend"):
        Variant("broken", "approximate", "openvino", "", {"precision": "bf16"}, replace(EXACT_STAGES, whole_volume=True))
    labels_only = Backend("fake", None, labels_any=lambda volume: np.zeros(volume.shape, np.uint8))
    image = tmp_path / "small.nii.gz"
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((40, 40, 30), np.int16), np.diag([3.0, 3.0, 3.0, 1.0])), image)
    with pytest.raises(ValueError, match="whole-volume labels: no tiles"):
        segment_file(image, None, labels_only, EXACT_STAGES)


def test_missing_runtime_is_skipped_not_crashed(monkeypatch, onnx_model, threads):
    """The openvino package hidden (as if not installed): its rows are skipped with the reason, the rest run."""
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)
    script = importlib.import_module("05_optimized_python_benchmark")
    runners, notes = script.make_runners(["approx_ov_f32_onepass_norm", "exact_ort_tuned"], threads, False, False, calibrate=False)
    try:
        assert [r.variant for r in runners] == ["exact_ort_tuned"]
        assert any("approx_ov_f32_onepass_norm" in n and "skipped" in n and "openvino not installed" in n for n in notes)
    finally:
        for runner in runners:
            runner.close()


def test_variants_are_listed():
    script = importlib.import_module("05_optimized_python_benchmark")
    lines = script.list_variants().splitlines()
    assert len(lines) == len(VARIANTS)
    for line, (name, v) in zip(lines, VARIANTS.items()):  # one line a variant: name, tier, runtime, description
        assert line.split(maxsplit=3) == [name, v.tier, v.backend, v.description]
        assert v.tier in ("exact", "approximate")
        if v.tier == "exact":  # an exact variant may not change the pipeline's math (its runtime is checked above)
            assert v.config.exact, name
