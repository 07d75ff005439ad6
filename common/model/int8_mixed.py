"""INT8 with the sensitive layers kept in float (`approx_ov_int8_mixed`): per-layer sensitivity, then a QDQ model
in which the convolutions whose quantization costs the most agreement run unquantized.

1. Calibrate once (common/model/quantize.py's recipe: ONNX Runtime static QDQ, per-channel int8 weights, uint8
   activations, on 64^3 patches of phantoms made for calibration only, seeds CALIBRATION_SEEDS; never an
   evaluation case).
2. Every convolution's output stays float (`float_outputs`: ONNX Runtime's QDQ format rounds each one to uint8
   before the float InstanceNorm). Sensitivity: for each resolution block alone kept in float (its input QDQ pair bypassed, its original float weight
   and bias restored), the argmax agreement with the float model on the calibration patches (ONNX Runtime).
3. Greedy: keep in float the blocks (`layer_group`: encoder stage, decoder stage, head) with the largest gain, one
   by one, until the agreement on the calibration patches reaches `target`, `max_float` convolutions are float, or the next
   block gained nothing alone.

The result is shape-agnostic like the INT8 model; its declared shapes are set back to the static patch, and the
layers kept float are written in its metadata (`tsbench_int8_float_layers`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common.core import paths

INT8_MIXED_MODEL = paths.MODELS_DIR / "totalseg_fast_int8_mixed.onnx"
QUANTIZED = ("Conv", "ConvTranspose")


def _producers(graph) -> dict[str, object]:
    return {out: node for node in graph.node for out in node.output}


def float_outputs(model) -> None:
    """Drop the Q/DQ pair ONNX Runtime's QDQ quantizer puts on every convolution's output (in place): the next
    layer (InstanceNorm, or the logits) is float, so that pair only rounds the float sums to uint8."""
    graph = model.graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    drop = set()
    for node in graph.node:
        if node.op_type not in QUANTIZED:
            continue
        q = consumers.get(node.output[0], [])
        if len(q) != 1 or q[0].op_type != "QuantizeLinear":
            continue
        dq = consumers.get(q[0].output[0], [])
        if len(dq) != 1 or dq[0].op_type != "DequantizeLinear":
            continue
        node.output[0] = dq[0].output[0]  # the conv now writes the float tensor its consumers read
        drop.update({id(q[0]), id(dq[0])})
    kept = [n for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(kept)


def keep_float(qdq, fp32, names: set[str]):
    """A copy of the QDQ model `qdq` where the convolutions named in `names` read their float input (the tensor
    before its QuantizeLinear) and their float weight and bias from `fp32`, and every convolution's output is float
    (`float_outputs`); unused Q/DQ nodes are dropped."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    float_outputs(model)
    graph = model.graph
    produced = _producers(graph)
    float_inits = {i.name: i for i in fp32.graph.initializer}
    float_inits.update({n.output[0]: float_inits[n.input[0]] for n in fp32.graph.node  # shared biases: Identity
                        if n.op_type == "Identity" and n.input[0] in float_inits})
    float_nodes = {n.name: n for n in fp32.graph.node}
    have = {i.name for i in graph.initializer}
    for node in graph.node:
        if node.op_type not in QUANTIZED or node.name not in names:
            continue
        dq = produced.get(node.input[0])
        if dq is not None and dq.op_type == "DequantizeLinear":
            q = produced.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[0] = q.input[0]
        source = float_nodes[node.name]
        for i in (1, 2):  # the float weight and bias, under a new name (the QDQ graph may use the old one)
            if i < len(node.input) and i < len(source.input):
                name = source.input[i] + "__float"
                node.input[i] = name
                if name not in have:
                    init = onnx.TensorProto()
                    init.CopyFrom(float_inits[source.input[i]])
                    init.name = name
                    graph.initializer.append(init)
                    have.add(name)
    _drop_unused(graph)
    return model


def _drop_unused(graph) -> None:
    """Remove nodes and initializers no graph output depends on (the bypassed Q/DQ pairs)."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def conv_names(model) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in QUANTIZED]


def _labels(model, patches, threads: int) -> list[np.ndarray]:
    """Argmax labels of `model` on each patch, run by OpenVINO (f32 for the float layers, int8 where QDQ)."""
    import tempfile

    import onnx
    import openvino as ov

    from common.runtime.backends import openvino_config

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        onnx.save(model, str(path))
        request = ov.Core().compile_model(str(path), "CPU", openvino_config(threads, "f32")).create_infer_request()
        out = []
        for p in patches:
            request.infer({0: p})
            out.append(np.argmax(request.get_output_tensor(0).data[0], axis=0))
    return out


def agreement(model, patches, reference: list[np.ndarray], threads: int) -> float:
    labels = _labels(model, patches, threads)
    return float(np.mean([np.mean(a == b) for a, b in zip(labels, reference)]))


def build_int8_mixed_model(source: Path = paths.ONNX_MODEL, target: Path = INT8_MIXED_MODEL, target_agreement: float
                           = 0.998, max_float: int = 12, threads: int = 2, log=print,
                           float_layers: list[str] | None = None) -> Path:
    """`float_layers`: keep exactly these convolutions float, without the sensitivity pass (tests)."""
    import onnx

    from common.model.onnx_meta import require_patch_model
    from common.model.quantize import CALIBRATION_PATCH, _set_spatial_dims, calibration_patches, quantize_on_patches

    patches = calibration_patches()
    fp32 = onnx.load(str(source))
    require_patch_model(fp32, str(source))
    name = fp32.graph.input[0].name
    _set_spatial_dims(fp32, CALIBRATION_PATCH)
    small = target.with_suffix(".calib_fp32.onnx")
    small_q = target.with_suffix(".calib_int8.onnx")
    onnx.save(fp32, str(small))

    quantize_on_patches(small, small_q, name, patches, list(QUANTIZED))
    qdq = onnx.load(str(small_q))
    small.unlink(missing_ok=True)
    small_q.unlink(missing_ok=True)
    patches = patches[::2]  # sensitivity on half of them (2 per calibration phantom): each check is a compile + runs
    reference = _labels(fp32, patches, threads)
    base = agreement(keep_float(qdq, fp32, set()), patches, reference, threads)
    if float_layers is not None:
        return _write(qdq, fp32, list(float_layers), base, agreement(keep_float(qdq, fp32, set(float_layers)), patches,
                                                                    reference, threads), len(patches), target, log)
    log(f"int8 (all convolutions, float outputs): agreement {base:.5f} with float on {len(patches)} calibration patches")
    groups: dict[str, list[str]] = {}
    for conv in conv_names(qdq):
        groups.setdefault(layer_group(conv), []).append(conv)
    gains = {}
    for group, convs in groups.items():
        gains[group] = agreement(keep_float(qdq, fp32, set(convs)), patches, reference, threads) - base
        log(f"  {group} ({len(convs)} conv): float alone {base + gains[group]:.5f} ({gains[group]:+.5f})")
    chosen: list[str] = []
    score = base
    for group in sorted(gains, key=lambda g: -gains[g]):
        if score >= target_agreement or len(chosen) >= max_float or gains[group] <= 0:
            break
        chosen += groups[group]
        score = agreement(keep_float(qdq, fp32, set(chosen)), patches, reference, threads)
        log(f"float: + {group}: {len(chosen)} convolution(s), agreement {score:.5f}")
    return _write(qdq, fp32, chosen, base, score, len(patches), target, log)


def layer_group(conv: str) -> str:
    """The resolution block a convolution belongs to (sensitivity is measured per block: 10 blocks instead of 23
    layers, each an OpenVINO compile): encoder stage k, decoder stage k with the transposed convolution feeding it,
    the segmentation head."""
    parts = conv.strip("/").split("/")
    if parts[0] == "decoder" and parts[1].startswith("transpconvs."):
        return "decoder/stages." + parts[1].split(".")[1]
    return "/".join(parts[:2])


def _write(qdq, fp32, chosen: list[str], base: float, score: float, n_patches: int, target: Path, log) -> Path:
    import onnx

    from common.model.quantize import CALIBRATION_SEEDS, _set_spatial_dims
    from common.model.weights import PATCH_SIZE

    mixed = keep_float(qdq, fp32, set(chosen))
    _set_spatial_dims(mixed, PATCH_SIZE)
    for key, value in (("tsbench_int8_calibration", f"phantom seeds {CALIBRATION_SEEDS}, {n_patches} patches 64^3"),
                       ("tsbench_int8_float_layers", ",".join(chosen)),
                       ("tsbench_int8_agreement", f"all int8 {base:.5f}; mixed {score:.5f} (calibration patches)")):
        entry = mixed.metadata_props.add()
        entry.key, entry.value = key, value
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp.onnx")
    onnx.save(mixed, str(tmp))
    tmp.replace(target)
    log(f"INT8 mixed model ({len(chosen)} float layers, agreement {score:.5f} on the calibration patches) written "
        f"to {target}")
    return target


def ensure_int8_mixed_model(log=print) -> Path:
    """The mixed INT8 model, rebuilt when missing or older than the float model it quantizes."""
    if INT8_MIXED_MODEL.is_file() and INT8_MIXED_MODEL.stat().st_mtime >= paths.ONNX_MODEL.stat().st_mtime:
        return INT8_MIXED_MODEL
    return build_int8_mixed_model(log=log)
