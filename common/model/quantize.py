"""Static INT8 (QDQ) copy of the exported model, calibrated on phantom CTs that are never evaluation cases.

Calibration runs on a reduced-shape copy of the network (64^3 patches: the activation ranges of a
fully convolutional network do not depend on the patch size, and the full 112x112x128 patch would make
ORT's calibrator hold every intermediate tensor, gigabytes). The quantized graph is shape-agnostic; its
declared input/output shapes are set back to the static patch. Conv and ConvTranspose are quantized
(weights int8 per channel, activations uint8); InstanceNorm and LeakyReLU stay float.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from common.core import paths

INT8_MODEL = paths.MODELS_DIR / "totalseg_fast_int8.onnx"
CALIBRATION_SEEDS = (1001, 1002)  # not the manifest's phantom seeds (0..), not the tests' (7)
CALIBRATION_PATCH = (64, 64, 64)


def calibration_patches(n_per_volume: int = 4, seed_list=CALIBRATION_SEEDS) -> list[np.ndarray]:
    """Normalized 64^3 patches from phantoms made for calibration only, run through our preprocessing."""
    from common.data.phantoms import make_phantom
    from common.pipeline import preprocess, resample

    patches = []
    for seed in seed_list:
        hu, _, affine = make_phantom((256, 256, 120), (1.5, 1.5, 2.5), "RAS", seed=seed)
        zoom = resample.zoom_factors(np.array([1.5, 1.5, 2.5], dtype=np.float32))
        image = resample.to_target_spacing(np.asarray(hu, dtype=np.float64), zoom).transpose(2, 1, 0)
        box = preprocess.nonzero_bbox(image)
        data, _ = preprocess.normalize_pad(image[preprocess.bbox_slices(box)], CALIBRATION_PATCH)
        rng = np.random.default_rng(seed)
        for _ in range(n_per_volume):
            lo = [int(rng.integers(0, s - p + 1)) for s, p in zip(data.shape, CALIBRATION_PATCH)]
            sl = tuple(slice(a, a + p) for a, p in zip(lo, CALIBRATION_PATCH))
            patches.append(np.ascontiguousarray(data[sl])[None, None].astype(np.float32))
    return patches


def _set_spatial_dims(model, dims) -> None:
    for value in (*model.graph.input, *model.graph.output):
        shape = value.type.tensor_type.shape.dim
        for i, d in enumerate(dims):
            shape[2 + i].ClearField("dim_param")
            shape[2 + i].dim_value = int(d)
    del model.graph.value_info[:]


def quantize_on_patches(small: Path, small_q: Path, input_name: str, patches: list[np.ndarray],
                        op_types: list[str]) -> None:
    """ONNX Runtime's static QDQ quantization of the calibration-size model `small` into `small_q` (uint8
    activations, per-channel int8 weights, min-max ranges over `patches`): the INT8 and mixed models' one recipe."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(patches)

        def get_next(self):
            item = next(self.items, None)
            return None if item is None else {input_name: item}

    quantize_static(str(small), str(small_q), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=list(op_types), calibrate_method=CalibrationMethod.MinMax)


def build_int8_model(source: Path = paths.ONNX_MODEL, target: Path = INT8_MODEL, log=print) -> Path:
    import onnx

    start = time.perf_counter()
    patches = calibration_patches()
    from common.model.onnx_meta import require_patch_model
    from common.model.weights import PATCH_SIZE

    model = onnx.load(str(source))
    require_patch_model(model, str(source))  # the one shape rule: the static patch model, nothing else
    _set_spatial_dims(model, CALIBRATION_PATCH)
    target.parent.mkdir(parents=True, exist_ok=True)
    small = target.with_suffix(".calib_fp32.onnx")
    small_q = target.with_suffix(".calib_int8.onnx")
    onnx.save(model, str(small))
    quantize_on_patches(small, small_q, model.graph.input[0].name, patches, ["Conv", "ConvTranspose"])
    quantized = onnx.load(str(small_q))
    _set_spatial_dims(quantized, PATCH_SIZE)
    entry = quantized.metadata_props.add()
    entry.key, entry.value = "tsbench_int8_calibration", f"phantom seeds {CALIBRATION_SEEDS}, {len(patches)} patches 64^3"
    tmp = target.with_suffix(".tmp.onnx")
    onnx.save(quantized, str(tmp))
    tmp.replace(target)
    small.unlink(missing_ok=True)
    small_q.unlink(missing_ok=True)
    log(f"INT8 model written to {target} in {time.perf_counter() - start:.0f} s")
    return target


def ensure_int8_model(log=print) -> Path:
    """The INT8 model, rebuilt when missing, older than the fp32 model it quantizes, or not the static patch
    model (one quantized from an older dynamic-axes export)."""
    from common.model.onnx_meta import require_patch_model
    from common.model.weights import WeightsError

    if INT8_MODEL.is_file() and INT8_MODEL.stat().st_mtime >= paths.ONNX_MODEL.stat().st_mtime:
        try:
            require_patch_model(INT8_MODEL)
            return INT8_MODEL
        except WeightsError as exc:
            log(f"rebuilding the INT8 model: {exc}")
    return build_int8_model(log=log)
