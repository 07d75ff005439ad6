"""ONNX export of the Dataset297 network and its verification against torch on a real CT patch."""
from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.core import paths
from common.model.weights import (PATCH_SIZE, PROXY_MARKER, ModelInfo, Weights, WeightsError, load_network,
                                  sha256_file)
from common.pipeline import preprocess

ARGMAX_AGREEMENT_MIN = 0.999
ONNX_OPSET = 17


@dataclass
class ExportCheck:
    source: str
    max_abs_diff: float
    argmax_agreement: float
    top2_margin_of_flips: float | None


def export_onnx(weights: Weights, out_path: Path = paths.ONNX_MODEL, dynamic_spatial: bool = False) -> Path:
    """fp32 ONNX with the checkpoint's sha256 in its metadata; written to a temporary name, then renamed."""
    import onnx
    import torch

    network = load_network(weights)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        axes = {"input": {2: "z", 3: "y", 4: "x"}, "logits": {2: "z", 3: "y", 4: "x"}} if dynamic_spatial else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            torch.onnx.export(network, (torch.zeros(1, 1, *PATCH_SIZE),), tmp, input_names=["input"],
                              output_names=["logits"], opset_version=ONNX_OPSET, dynamo=False,
                              dynamic_axes=axes)
        model = onnx.load(tmp)
        for key, value in {"checkpoint_sha256": weights.sha256, "weights_kind": weights.kind,
                           "patch_zyx": ",".join(map(str, PATCH_SIZE))}.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(model, tmp)
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path


def real_ct_patch(ct_path: Path | None = None, seed: int = 0) -> tuple[np.ndarray, str]:
    """A normalized (1, 1, *PATCH) patch of a real CT (already at 3 mm), or of a generated volume."""
    from common.core import io

    ct_path = ct_path or paths.shared_data_dir() / "example_ct.nii.gz"
    if ct_path.is_file():
        volume = io.load_volume(ct_path)
        data, _, _ = io.to_canonical(volume.data, volume.affine)
        image = data.astype(np.int32).transpose(2, 1, 0)
        source = str(ct_path)
    else:
        rng = np.random.default_rng(seed)
        image = rng.normal(0, 300, size=(120, 120, 130)).astype(np.int32)
        source = "generated noise volume (no shared CT found)"
    cropped = preprocess.normalize_ct(image[preprocess.bbox_slices(preprocess.nonzero_bbox(image))])
    padded, _ = preprocess.pad_to_patch(cropped, PATCH_SIZE)
    z, y, x = ((s - p) // 2 for s, p in zip(padded.shape, PATCH_SIZE))
    patch = padded[z:z + PATCH_SIZE[0], y:y + PATCH_SIZE[1], x:x + PATCH_SIZE[2]]
    return np.ascontiguousarray(patch)[None, None], source


def verify_export(weights: Weights, onnx_path: Path, threads: int, ct_path: Path | None = None) -> ExportCheck:
    """Compare ONNX Runtime with torch on one real-CT patch; raise WeightsError below the tolerance."""
    import torch

    from common.runtime.backends import onnxruntime_backend

    patch, source = real_ct_patch(ct_path)
    torch.set_num_threads(threads)
    with torch.inference_mode():
        reference = load_network(weights)(torch.from_numpy(patch)).numpy()[0]
    exported = onnxruntime_backend(threads, onnx_path).predict(patch)[0]
    agree = reference.argmax(0) == exported.argmax(0)
    flips = None
    if not agree.all():
        top2 = np.sort(reference, axis=0)[-2:]
        flips = float(np.max((top2[1] - top2[0])[~agree]))
    check = ExportCheck(source, float(np.abs(reference - exported).max()), float(agree.mean()), flips)
    if check.argmax_agreement < ARGMAX_AGREEMENT_MIN:
        raise WeightsError(f"ONNX export disagrees with torch: argmax agreement {check.argmax_agreement:.5f} "
                           f"< {ARGMAX_AGREEMENT_MIN}, max |logit diff| {check.max_abs_diff:.3g}")
    return check


def time_patch(onnx_path: Path, threads: int, shape: tuple[int, ...] = PATCH_SIZE, repeats: int = 2) -> float:
    """Median seconds per patch for ONNX Runtime with a default session (first run excluded)."""
    from common.runtime.backends import onnxruntime_backend

    backend = onnxruntime_backend(threads, onnx_path)
    patch = np.random.default_rng(0).normal(size=(1, 1, *shape)).astype(np.float32)
    backend.predict(patch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        backend.predict(patch)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def weights_note(weights: Weights) -> str:
    """What a report adds after the kind: the stand-in's caveat, or what the proxy was trained on."""
    if weights.is_stand_in:
        return "stand-in weights: not clinically meaningful"
    if weights.kind == "proxy":
        try:
            return json.loads((weights.model_dir / PROXY_MARKER).read_text()).get("trained_on", "")
        except (OSError, ValueError):
            return ""
    return ""


def save_model_info(weights: Weights, onnx_path: Path, parameters: int, threads: int) -> ModelInfo:
    """models/model_info.json: what every report states in its first lines."""
    from common.core.env import package_versions

    info = ModelInfo(
        weights_kind=weights.kind, checkpoint_sha256=weights.sha256, model_dir=str(weights.model_dir),
        onnx_path=str(onnx_path), onnx_sha256=sha256_file(onnx_path),
        architecture={"network": "PlainConvUNet", "features": [32, 64, 128, 256, 320], "patch_zyx": list(PATCH_SIZE),
                      "classes": 118, "opset": ONNX_OPSET, "parameters": parameters, "threads": threads},
        versions=package_versions(),
        warning=weights_note(weights))
    info.save()
    return info
