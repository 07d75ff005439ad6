"""common/model/precise_norm.py: the rewritten InstanceNormalization is the same math with float64-grade statistics."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from common.model import precise_norm
from common.model.precise_norm import ensure_precise_norm_model, rewrite_instance_norm

CHANNELS, SPATIAL = 4, (96, 96, 128)  # 1.2 M voxels per channel: long enough for one-pass float32 sums to drift


def _model(spatial=SPATIAL, checkpoint: str = "abc"):
    rng = np.random.default_rng(1)
    scale = (rng.random(CHANNELS) + 0.5).astype(np.float32)
    bias = rng.standard_normal(CHANNELS).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("InstanceNormalization", ["x", "scale", "bias"], ["y"], epsilon=1e-5)], "norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, CHANNELS, *spatial])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, CHANNELS, *spatial])],
        [numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"checkpoint_sha256": checkpoint})
    return model, scale, bias


def _reference(x, scale, bias):
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=(2, 3, 4), keepdims=True), x64.var(axis=(2, 3, 4), keepdims=True)
    return (x64 - mean) / np.sqrt(var + 1e-5) * scale.reshape(1, -1, 1, 1, 1) + bias.reshape(1, -1, 1, 1, 1)


def _run(model, x, runtime):
    if runtime == "onnxruntime":
        import onnxruntime as ort

        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ov = pytest.importorskip("openvino")
    core = ov.Core()
    compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled({0: x})[0]


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_rewritten_norm_matches_float64(runtime):
    x = (3 + np.random.default_rng(0).standard_normal((1, CHANNELS, *SPATIAL))).astype(np.float32)
    model, scale, bias = _model()
    rewritten = rewrite_instance_norm(model)
    assert not any(n.op_type == "InstanceNormalization" for n in rewritten.graph.node)
    error = np.abs(_run(rewritten, x, runtime) - _reference(x, scale, bias)).max()
    assert error < 5e-6  # the runtimes' own kernels: 3e-5 (OpenVINO) to 7e-5 (ORT) on this input


def test_dynamic_shapes_are_refused():
    model, _, _ = _model(spatial=(0, 0, 0))
    for dim in [*model.graph.input[0].type.tensor_type.shape.dim[2:]]:
        dim.dim_param = "n"
    with pytest.raises(ValueError, match="static shapes"):
        rewrite_instance_norm(model)


def test_cached_model_follows_the_checkpoint(tmp_path, monkeypatch):
    import onnx

    source, target = tmp_path / "model.onnx", tmp_path / "model_precise.onnx"
    onnx.save(_model(checkpoint="first")[0], source)
    ensure_precise_norm_model(source, target)
    built = target.stat().st_mtime_ns
    assert ensure_precise_norm_model(source, target) == target and target.stat().st_mtime_ns == built
    onnx.save(_model(checkpoint="second")[0], source)
    ensure_precise_norm_model(source, target)
    props = {p.key: p.value for p in onnx.load(str(target)).metadata_props}
    assert props["checkpoint_sha256"] == "second"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    rebuilt = target.stat().st_mtime_ns
    monkeypatch.setattr(precise_norm, "REWRITE_VERSION", "next")  # a cache from an older rewrite is rebuilt
    ensure_precise_norm_model(source, target)
    assert target.stat().st_mtime_ns != rebuilt
    assert {p.key: p.value for p in onnx.load(str(target)).metadata_props}["precise_norm_version"] == "next"


def test_dynamic_axes_export_is_refused_by_every_consumer(stand_in, threads, tmp_path):
    """One shape rule: 02 exports the static patch model. A dynamic-axes file (an older 02) is refused by the
    tile backends, the precise-norm rewrite and the INT8 build, each with one line naming 02."""
    from common.model.export import export_onnx
    from common.model.quantize import build_int8_model
    from common.model.weights import WeightsError
    from common.runtime.backends import make_backend

    dynamic = export_onnx(stand_in, tmp_path / "dynamic.onnx", dynamic_spatial=True)
    with pytest.raises(WeightsError, match="not the static patch model.*02_export_model"):
        make_backend("onnxruntime", threads, model=dynamic, tuned=True, reuse_output=True)
    with pytest.raises(WeightsError, match="not the static patch model"):
        ensure_precise_norm_model(dynamic, tmp_path / "precise.onnx")
    with pytest.raises(WeightsError, match="not the static patch model"):
        build_int8_model(dynamic, tmp_path / "int8.onnx", log=lambda m: None)
    if importlib.util.find_spec("openvino") is not None:
        with pytest.raises(WeightsError, match="not the static patch model"):
            make_backend("openvino", threads, model=dynamic, precision="f32")
