"""InstanceNormalization rewritten with short-block sums, so a runtime's statistics match torch's.

OpenVINO's MVN kernel (what an ONNX InstanceNormalization becomes) sums the ~1.6 M voxels of a channel
in float32 in one run: on a full-resolution 112x112x128 tile its mean and variance are off by ~1e-4
relative (ONNX Runtime's by ~5e-5), while torch's match float64 to ~1e-7. Thirty-six such layers with
random stand-in weights turn that into ~1e-3 logit drift and 0.5% flipped labels against vanilla.

The rewrite is the same math, float rounding only: mean = mean over W (<= 128 values, Reduce), then over
H by a MatMul with a 1/H column (a second Reduce would be merged back into one long sum by OpenVINO),
then over D; the same for the centred squares. Result on one example_ct tile, OpenVINO fp32 vs torch:
mean |logit diff| 1.0e-3 -> 4.4e-6, argmax agreement 0.99779 -> 0.999993, with no measurable slowdown.
Needs static shapes: the static patch model 02 exports (common/model/onnx_meta.py). The rewritten model
is cached next to the source, keyed by the checkpoint hash the export wrote into its metadata and by the
rewrite's version.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from common.core import paths

PRECISE_NORM_MODEL = paths.MODELS_DIR / "totalseg_fast_precise_norm.onnx"
REWRITE_VERSION = "2"  # bump when the rewrite changes: a cached model of an older rewrite is rebuilt


def _metadata(model_path: Path) -> dict[str, str]:
    from common.model.onnx_meta import model_facts

    props = model_facts(model_path)["metadata"]
    return {key: props.get(key, "") for key in ("checkpoint_sha256", "precise_norm_version")}


def _spatial_shapes(model) -> dict[str, list[int]]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input]:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if len(dims) == 5:
            shapes[value.name] = dims[2:]
    return shapes


def rewrite_instance_norm(model):
    """Return `model` (an onnx ModelProto, changed in place) with every InstanceNormalization decomposed."""
    from onnx import helper, numpy_helper

    shapes = _spatial_shapes(model)
    graph = model.graph
    constants: set[str] = set()

    def constant(name: str, value: np.ndarray) -> str:
        if name not in constants:
            graph.initializer.append(numpy_helper.from_array(value, name))
            constants.add(name)
        return name

    def block_mean(x: str, out: str, height: int) -> list:
        column = constant(f"precise_norm_column_{height}", np.full((height, 1), 1.0 / height, np.float32))
        return [helper.make_node("ReduceMean", [x], [out + "_w"], axes=[4], keepdims=0),
                helper.make_node("MatMul", [out + "_w", column], [out + "_hw"]),
                helper.make_node("ReduceMean", [out + "_hw"], [out + "_dhw"], axes=[2, 3], keepdims=1),
                helper.make_node("Reshape", [out + "_dhw", channel_shape], [out])]

    channel_shape = constant("precise_norm_channel_shape", np.array([1, -1, 1, 1, 1], np.int64))
    nodes = []
    for index, node in enumerate(graph.node):
        if node.op_type != "InstanceNormalization":
            nodes.append(node)
            continue
        x, scale, bias = node.input
        if x not in shapes or not all(shapes[x]):
            raise ValueError(f"precise_norm needs static shapes; {node.name or x} has none")
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        p = f"precise_norm_{index}_"
        eps = constant(p + "epsilon", np.array(epsilon, np.float32))
        height = shapes[x][1]
        nodes += [helper.make_node("Reshape", [scale, channel_shape], [p + "scale"]),
                  helper.make_node("Reshape", [bias, channel_shape], [p + "bias"])]
        nodes += block_mean(x, p + "mean", height)
        nodes += [helper.make_node("Sub", [x, p + "mean"], [p + "centred"]),
                  helper.make_node("Mul", [p + "centred", p + "centred"], [p + "squared"])]
        nodes += block_mean(p + "squared", p + "variance", height)
        # y = x * alpha + beta with per-channel alpha = scale / std, beta = bias - mean * alpha: torch's own
        # form (one full-size pass instead of subtract, divide, scale, shift)
        nodes += [helper.make_node("Add", [p + "variance", eps], [p + "variance_eps"]),
                  helper.make_node("Sqrt", [p + "variance_eps"], [p + "std"]),
                  helper.make_node("Div", [p + "scale", p + "std"], [p + "alpha"]),
                  helper.make_node("Mul", [p + "mean", p + "alpha"], [p + "mean_alpha"]),
                  helper.make_node("Sub", [p + "bias", p + "mean_alpha"], [p + "beta"]),
                  helper.make_node("Mul", [x, p + "alpha"], [p + "scaled"]),
                  helper.make_node("Add", [p + "scaled", p + "beta"], list(node.output))]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def ensure_precise_norm_model(source: Path = paths.ONNX_MODEL, target: Path = PRECISE_NORM_MODEL) -> Path:
    """The rewritten model, built (atomically) when missing or exported from another checkpoint."""
    from common.model.onnx_meta import onnx_checkpoint_sha, require_patch_model

    source_sha = onnx_checkpoint_sha(source)
    if target.is_file() and source_sha and _metadata(target) == {"checkpoint_sha256": source_sha,
                                                                 "precise_norm_version": REWRITE_VERSION}:
        return target
    import onnx

    model = onnx.load(str(source))
    require_patch_model(model, str(source), static_only=True)  # the one shape rule: no open axes
    model = rewrite_instance_norm(model)
    props = {p.key: p.value for p in model.metadata_props}
    onnx.helper.set_model_props(model, {**props, "precise_norm_version": REWRITE_VERSION})
    onnx.checker.check_model(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
