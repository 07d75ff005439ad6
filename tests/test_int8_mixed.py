"""Issue 23: `approx_ov_int8_mixed`: INT8 with the most sensitive convolutions kept float (common/model/int8_mixed.py).
keep_float restores exactly the float convolution (input before its QuantizeLinear, float weight and bias) for the
named layers and leaves the others quantized; the variant runs end to end on the input's grid."""
from __future__ import annotations

import numpy as np
import pytest

from common.model import int8_mixed

# Approximate-tier floor vs vanilla on the lps_anisotropic phantom (stand-in weights); tests/parity_bounds.py has
# another owner, so it is defined here. Measured 0.81983 (2026-12-06, first and last convolutions float, float
# convolution outputs; approx_ov_int8 measured 0.72281 there).
INT8_MIXED_MIN = 0.78


def _tiny_models(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3, 3)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b0"),
             numpy_helper.from_array(rng.normal(size=(3, 4, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "b1")]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1] * 6),
             helper.make_node("LeakyRelu", ["c0"], ["r0"], name="relu0", alpha=0.01),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["y"], name="conv1", pads=[1] * 6)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8, 8])], inits)
    fp32 = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    fp32.ir_version = 8
    onnx.save(fp32, str(tmp_path / "f.onnx"))
    data = [rng.normal(size=(1, 1, 8, 8, 8)).astype(np.float32) for _ in range(4)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(data)

        def get_next(self):
            item = next(self.items, None)
            return None if item is None else {"x": item}

    quantize_static(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=["Conv"])
    return fp32, onnx.load(str(tmp_path / "q.onnx")), data


def _run(model, x):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_keep_float_restores_exactly_the_named_convolutions(tmp_path):
    fp32, qdq, data = _tiny_models(tmp_path)
    x = data[0]
    assert int8_mixed.conv_names(qdq) == ["conv0", "conv1"]
    np.testing.assert_allclose(_run(int8_mixed.keep_float(qdq, fp32, {"conv0", "conv1"}), x), _run(fp32, x),
                               rtol=1e-5, atol=1e-5)
    none = int8_mixed.keep_float(qdq, fp32, set())  # int8 compute, float outputs: closer than the plain QDQ model
    assert sum(n.op_type == "QuantizeLinear" for n in none.graph.node) < \
        sum(n.op_type == "QuantizeLinear" for n in qdq.graph.node)
    assert np.abs(_run(none, x) - _run(fp32, x)).mean() < np.abs(_run(qdq, x) - _run(fp32, x)).mean()
    one = int8_mixed.keep_float(qdq, fp32, {"conv0"})
    producers = {o: n for n in one.graph.node for o in n.output}
    conv0, conv1 = (next(n for n in one.graph.node if n.name == name) for name in ("conv0", "conv1"))
    assert conv0.input[0] == "x" and conv0.input[1].endswith("__float"), "conv0 reads the float input and weight"
    assert producers[conv1.input[0]].op_type == "DequantizeLinear", "conv1 stays quantized"
    error_one = np.abs(_run(one, x) - _run(fp32, x)).mean()
    error_all = np.abs(_run(none, x) - _run(fp32, x)).mean()
    assert error_one < error_all, (error_one, error_all)


def test_variant_is_data_and_missing_model_is_a_skip(monkeypatch, tmp_path):
    from common.runtime import backends
    from common.variants.table import VARIANTS

    variant = VARIANTS["approx_ov_int8_mixed"]
    assert variant.tier == "approximate" and variant.backend_options == {"precision": "f32", "model": "int8_mixed"}
    assert VARIANTS["approx_ov_int8_f32"].backend_options == {"precision": "f32", "model": "int8"}
    monkeypatch.setattr(int8_mixed, "INT8_MIXED_MODEL", tmp_path / "absent.onnx")
    monkeypatch.setattr(backends, "check_current_model", lambda: None, raising=False)
    import common.model.onnx_meta as meta

    monkeypatch.setattr(meta, "check_current_model", lambda: None)
    with pytest.raises(backends.BackendUnavailable, match="--calibrate"):
        backends.resolve_model("int8_mixed")


@pytest.fixture(scope="module")
def int8_mixed_model(onnx_model, tmp_path_factory):
    """The stand-in's mixed model, first and last convolutions float (no sensitivity pass: minutes), written to a
    temporary folder (never over models/'s) and resolved from there while this module runs."""
    import onnx

    names = [n.name for n in onnx.load(str(onnx_model), load_external_data=False).graph.node if n.op_type == "Conv"]
    target = tmp_path_factory.mktemp("int8_mixed") / "totalseg_fast_int8_mixed.onnx"
    int8_mixed.build_int8_mixed_model(target=target, float_layers=[names[0], names[-1]], log=lambda m: None)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(int8_mixed, "INT8_MIXED_MODEL", target)
        yield target


def test_int8_mixed_variant_grid_affine_dtype_and_floor(int8_mixed_model, generated_volumes, threads, vanilla,
                                                        tmp_path):
    import nibabel as nib

    from common.core.metrics import voxel_agreement
    from common.pipeline.run import StageTimer, segment_file
    from common.runtime.backends import make_backend
    from common.variants.table import VARIANTS

    variant = VARIANTS["approx_ov_int8_mixed"]
    image = generated_volumes["lps_anisotropic"]
    backend = make_backend(variant.backend, threads, **variant.backend_options)
    result = segment_file(image, tmp_path / "ours.nii.gz", backend, variant.config_for(threads), timer=StageTimer())
    written, source = nib.load(tmp_path / "ours.nii.gz"), nib.load(image)
    assert written.shape == source.shape[:3] and written.header.get_zooms() == source.header.get_zooms()
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    assert written.get_data_dtype() == np.uint8 and result.labels.dtype == np.uint8
    reference = np.asarray(nib.load(vanilla(image)).dataobj)
    agreement = voxel_agreement(result.labels, reference)
    assert agreement >= INT8_MIXED_MIN, agreement
