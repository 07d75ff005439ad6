"""Surgery on OpenVINO models before compiling: where a backend changes what the runtime holds in memory.

- `split_head`: the last 1x1x1 convolution as its own model, run on slabs (no 118-channel patch logits);
- `with_argmax`: the class index computed inside the runtime (whole-volume pass);
- `split_concat_convs`: each decoder convolution over Concat(upsampled, skip) as two convolutions summed, so the
  runtime never holds the concatenation (its channels-last layout cannot be written in place).
"""
from __future__ import annotations

import numpy as np


def with_argmax(ov, model):
    """`model` whose output is the uint8 class index per voxel (TopK k=1, stable: ties to the lowest class)."""
    from openvino import opset13 as ops

    logits = model.get_results()[0].input_value(0)
    top = ops.topk(logits, ops.constant(np.int64(1)), axis=1, mode="max", sort="value",
                   index_element_type=ov.Type.i32, stable=True)
    return ov.Model([ops.convert(top.output(1), ov.Type.u8).output(0)], model.get_parameters(), "labels")


def head_parameters(model):
    """(features, weight (C, F, 1, 1, 1), bias (C,)) of `model`'s last layer, the 1x1x1 segmentation convolution + bias:
    `features` is the output that layer reads."""
    add = model.get_results()[0].input_value(0).get_node()
    conv = add.input_value(0).get_node()
    if add.get_type_name() != "Add" or conv.get_type_name() != "Convolution":
        raise ValueError(f"model does not end in Convolution + Add (found {conv.get_type_name()} + {add.get_type_name()})")
    weight = conv.input_value(1).get_node().get_data()
    if weight.shape[2:] != (1, 1, 1):
        raise ValueError(f"last convolution is {weight.shape[2:]}, not 1x1x1")
    bias = add.input_value(1).get_node()
    if bias.get_type_name() == "Reshape":  # the ONNX import's (C,) -> (1, C, 1, 1, 1)
        bias = bias.input_value(0).get_node()
    return conv.input_value(0), weight, bias.get_data().reshape(-1)


def split_head(ov, model):
    """(trunk, head): `model` cut before its last layer, the 1x1x1 segmentation convolution + bias.

    trunk: input -> the last decoder features (1, F, *patch); head: (1, F, D, H, W) of any shape -> logits.
    """
    from openvino import opset13 as ops

    features, weight, bias = head_parameters(model)
    trunk = ov.Model([features], model.get_parameters(), "trunk")
    slab = ops.parameter([1, weight.shape[1], -1, -1, -1], ov.Type.f32, name="features")
    logits = ops.convolution(slab, ops.constant(weight), [1, 1, 1], [0, 0, 0], [0, 0, 0], [1, 1, 1])
    return trunk, ov.Model([ops.add(logits, ops.constant(bias.reshape(1, -1, 1, 1, 1)))], [slab], "head")


def split_concat_convs(model) -> int:
    """Rewrite, in place, every Convolution(Concat(a, b, axis=1), W) with a constant W as
    Convolution(a, W[:, :Ca]) + Convolution(b, W[:, Ca:]); returns how many were rewritten.

    The same math, summed in another order: features differ by float rounding only (max 1.3e-5 on a full-resolution
    tile), so the exact tier keeps it as its own variant. OpenVINO fuses the Add into the second convolution, and
    the 64-channel full-resolution concatenation (411 MB per 112x112x128 tile in float32) is never allocated.
    """
    from openvino import opset13 as ops

    rewritten = 0
    for conv in list(model.get_ordered_ops()):
        if conv.get_type_name() != "Convolution":
            continue
        concat, weight = conv.input_value(0).get_node(), conv.input_value(1).get_node()
        if concat.get_type_name() != "Concat" or concat.get_axis() != 1 or weight.get_type_name() != "Constant":
            continue
        channels = [concat.input_value(i).get_partial_shape()[1] for i in range(concat.get_input_size())]
        if any(c.is_dynamic for c in channels):
            continue
        data, attrs = weight.get_data(), conv.get_attributes()
        parts, start = [], 0
        for i, c in enumerate(channels):
            part = np.ascontiguousarray(data[:, start:start + c.get_length()])
            start += c.get_length()
            parts.append(ops.convolution(concat.input_value(i), ops.constant(part), attrs["strides"],
                                         attrs["pads_begin"], attrs["pads_end"], attrs["dilations"],
                                         attrs["auto_pad"]))
        total = parts[0]
        for part in parts[1:]:
            total = ops.add(total, part)
        conv.output(0).replace(total.output(0))
        rewritten += 1
    return rewritten
