"""Runtimes behind one small interface: `backend.predict(patch) -> logits` (float32 numpy in and out).

Adding a runtime = one factory function registered in BACKENDS.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from common import paths


class BackendUnavailable(RuntimeError):
    """The runtime is not installed or cannot run here; the benchmark reports the row as skipped."""


@dataclass
class Backend:
    name: str
    predict: Callable[[np.ndarray], np.ndarray]
    details: dict = field(default_factory=dict)
    close: Callable[[], None] = lambda: None


def onnx_checkpoint_sha(model_path: Path) -> str:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}.get("checkpoint_sha256", "")


def check_onnx_matches(model_path: Path, checkpoint_sha256: str | None) -> None:
    """An ONNX file exported from another checkpoint is refused (stale models/ after new weights)."""
    from common.weights import WeightsError

    if not Path(model_path).is_file():
        raise WeightsError(f"{model_path} is missing: run `python 02_export_model.py` first")
    if checkpoint_sha256:
        found = onnx_checkpoint_sha(model_path)
        if found != checkpoint_sha256:
            raise WeightsError(f"{model_path} was exported from checkpoint {found[:16] or '?'}, "
                               f"not the current one {checkpoint_sha256[:16]}: rerun 02_export_model.py")


def onnxruntime_backend(threads: int, model_path: Path = paths.ONNX_MODEL, tuned: bool = False,
                        optimized_model_cache: Path | None = None) -> Backend:
    """ONNX Runtime CPU. Default session = only the thread count set (the `onnx_baseline` row)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailable(f"onnxruntime not installed: {exc}") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if tuned:
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
        options.enable_cpu_mem_arena = True
        if optimized_model_cache:
            options.optimized_model_filepath = str(optimized_model_cache)
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def predict(patch: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: patch})[0]

    return Backend("onnxruntime", predict, {"onnxruntime": ort.__version__, "threads": threads, "tuned": tuned})


def torch_backend(threads: int, weights=None) -> Backend:
    """The checkpoint in nnU-Net's own network, run by torch (the pipeline-exactness twin of vanilla)."""
    import torch

    from common.weights import ensure_weights, load_network

    torch.set_num_threads(threads)
    network = load_network(weights or ensure_weights("auto"))

    def predict(patch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return network(torch.from_numpy(patch)).numpy()

    return Backend("torch", predict, {"torch": torch.__version__, "threads": threads})


BACKENDS: dict[str, Callable[..., Backend]] = {
    "onnxruntime": onnxruntime_backend,
    "torch": torch_backend,
}


def make_backend(name: str, threads: int, **options) -> Backend:
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    return BACKENDS[name](threads, **options)
