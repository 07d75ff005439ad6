"""Runtimes behind one small interface: `backend.predict(patch) -> logits` (float32 numpy in and out), or
`backend.labels_any(volume) -> labels` for a whole-volume pass.

Adding a runtime = one factory function registered in BACKENDS.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from common.core import paths
from common.model.weights import NUM_CLASSES, PATCH_SIZE


class BackendUnavailable(RuntimeError):
    """The runtime is not installed or cannot run here; the benchmark reports the row as skipped."""


@dataclass
class Backend:
    name: str
    predict: Callable[[np.ndarray], np.ndarray] | None  # patch logits; None for a whole-volume-only backend
    details: dict = field(default_factory=dict)
    close: Callable[[], None] = lambda: None
    # Optional: uint8 labels (1, 1, D, H, W), the argmax over classes taken inside the runtime (ties to the
    # lowest class), for an input (1, 1, D, H, W) of any shape: the whole-volume pass.
    labels_any: Callable[[np.ndarray], np.ndarray] | None = None
    # True where `predict` returns a buffer the backend reuses: valid only until the next call.
    reuses_output: bool = False


def onnx_checkpoint_sha(model_path: Path) -> str:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}.get("checkpoint_sha256", "")


def check_onnx_matches(model_path: Path, checkpoint_sha256: str | None) -> None:
    """An ONNX file exported from another checkpoint is refused (stale models/ after new weights)."""
    from common.model.weights import WeightsError

    if not Path(model_path).is_file():
        raise WeightsError(f"{model_path} is missing: run `python 02_export_model.py` first")
    if checkpoint_sha256:
        found = onnx_checkpoint_sha(model_path)
        if found != checkpoint_sha256:
            raise WeightsError(f"{model_path} was exported from checkpoint {found[:16] or '?'}, "
                               f"not the current one {checkpoint_sha256[:16]}: rerun 02_export_model.py")


def import_runtime(module: str):
    """The runtime's Python package, or BackendUnavailable (the benchmark reports the row as skipped)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailable(f"{module} not installed: {exc}") from None


def _patch_shape(dims, channels: int) -> list[int]:
    """The tile's (1, channels, *PATCH_SIZE) where a model (exported with dynamic axes) leaves a dimension open."""
    return [d if isinstance(d, int) and d > 0 else fixed for d, fixed in zip(dims, (1, channels, *PATCH_SIZE))]


def resolve_model(model: str | Path | None) -> Path:
    """`None`/"fp32" = the exported model; "precise_norm" = the same with short-block InstanceNorm sums
    (common/model/precise_norm.py); "int8" = its calibrated QDQ copy (common/model/quantize.py)."""
    if model in (None, "fp32"):
        return paths.ONNX_MODEL
    if model == "precise_norm":
        from common.model.precise_norm import ensure_precise_norm_model

        return ensure_precise_norm_model()
    if model == "int8":
        from common.model.quantize import INT8_MODEL

        if not INT8_MODEL.is_file():
            raise BackendUnavailable(f"INT8 model {INT8_MODEL.name} missing: run "
                                     "`python 05_optimized_python_benchmark.py --calibrate` first")
        return INT8_MODEL
    return Path(model)


def onnxruntime_backend(threads: int, model_path: Path = paths.ONNX_MODEL, tuned: bool = False,
                        optimized_model_cache: Path | str | None = None, model: str | None = None,
                        reuse_output: bool = False, denormals_as_zero: bool | None = None) -> Backend:
    """ONNX Runtime CPU. Default session = only the thread count set (the `onnx_baseline` row).

    `reuse_output`: bind one preallocated output buffer (IOBinding) instead of a fresh 760 MB array
    per tile (page faults are expensive here); `predict` then returns that buffer, valid until the next call.
    """
    ort = import_runtime("onnxruntime")
    model_path = resolve_model(model) if model is not None else model_path
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if tuned:
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        if denormals_as_zero is not False:  # default: on with `tuned`; flushes tiny activations (drift)
            options.add_session_config_entry("session.set_denormal_as_zero", "1")
        options.enable_cpu_mem_arena = True
        if optimized_model_cache == "auto":  # keyed by the source model's size and mtime: never stale
            stat = Path(model_path).stat()
            optimized_model_cache = Path(model_path).with_name(
                f"{Path(model_path).stem}.{stat.st_size}.{int(stat.st_mtime)}.ort_optimized.onnx")
        if optimized_model_cache and Path(optimized_model_cache).is_file():
            model_path = Path(optimized_model_cache)  # the graph optimized once, loaded as is
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        elif optimized_model_cache:
            options.optimized_model_filepath = str(optimized_model_cache)
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    details = {"onnxruntime": ort.__version__, "threads": threads, "tuned": tuned, "model": Path(model_path).name}

    if not reuse_output:
        def predict(patch: np.ndarray) -> np.ndarray:
            return session.run(None, {input_name: patch})[0]

        return Backend("onnxruntime", predict, details)

    output = session.get_outputs()[0]
    out_shape = _patch_shape(output.shape, NUM_CLASSES)
    buffer = np.empty(out_shape, dtype=np.float32)
    binding = session.io_binding()
    binding.bind_output(output.name, "cpu", 0, np.float32, out_shape, buffer.ctypes.data)
    run_options = ort.RunOptions()
    if tuned:  # give the arena's activation memory back after each tile: several sessions share a process
        run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def predict_bound(patch: np.ndarray) -> np.ndarray:
        binding.bind_cpu_input(input_name, np.ascontiguousarray(patch, dtype=np.float32))
        session.run_with_iobinding(binding, run_options)
        return buffer

    return Backend("onnxruntime", predict_bound, details, reuses_output=True)


def _with_argmax(ov, model):
    """`model` whose output is the uint8 class index per voxel (TopK k=1, stable: ties to the lowest class)."""
    from openvino import opset13 as ops

    logits = model.get_results()[0].input_value(0)
    top = ops.topk(logits, ops.constant(np.int64(1)), axis=1, mode="max", sort="value",
                   index_element_type=ov.Type.i32, stable=True)
    return ov.Model([ops.convert(top.output(1), ov.Type.u8).output(0)], model.get_parameters(), "labels")


def openvino_backend(threads: int, model_path: Path = paths.ONNX_MODEL, precision: str = "f32",
                     model: str | None = None, cache_dir: Path | None = paths.MODELS_DIR / "openvino_cache",
                     whole_volume: bool = False) -> Backend:
    """OpenVINO CPU, one infer request whose output buffer is reused.

    `precision`: INFERENCE_PRECISION_HINT, "f32" (exact tier) or "bf16" (AMX/AVX-512 bf16, approximate).
    Default: the static patch shape, `predict` gives logits. `whole_volume`: instead, one model compiled for
    any input shape with the argmax appended (`labels_any`): no per-case compilation, and no 118-channel
    float32 volume (1.5 GB at 144x144x160) leaves the runtime.
    """
    ov = import_runtime("openvino")
    model_path = resolve_model(model) if model is not None else model_path
    core = ov.Core()
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        core.set_property({"CACHE_DIR": str(cache_dir)})
    if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise BackendUnavailable("this CPU has no bf16 support (OpenVINO OPTIMIZATION_CAPABILITIES)")
    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads,
              "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    net = core.read_model(str(model_path))
    details = {"openvino": ov.__version__, "threads": threads, "precision": precision, "model": Path(model_path).name}

    if whole_volume:
        net.reshape({net.inputs[0].get_any_name(): ov.PartialShape([1, 1, -1, -1, -1])})
        labels_request = core.compile_model(_with_argmax(ov, net), "CPU", config).create_infer_request()

        def labels_any(image: np.ndarray) -> np.ndarray:
            labels_request.infer({0: np.ascontiguousarray(image, dtype=np.float32)}, share_inputs=True)
            return labels_request.get_output_tensor(0).data

        return Backend("openvino", None, {**details, "whole_volume": True}, labels_any=labels_any,
                       reuses_output=True)

    if net.inputs[0].get_partial_shape().is_dynamic:  # a dynamic-axes export: compile for the tile shape
        net.reshape({net.inputs[0].get_any_name(): ov.PartialShape([1, 1, *PATCH_SIZE])})
    request = core.compile_model(net, "CPU", config).create_infer_request()

    def predict(patch: np.ndarray) -> np.ndarray:
        request.infer({0: np.ascontiguousarray(patch, dtype=np.float32)}, share_inputs=True)
        return request.get_output_tensor(0).data

    return Backend("openvino", predict, details, reuses_output=True)


def torch_backend(threads: int, weights=None) -> Backend:
    """The checkpoint in nnU-Net's own network, run by torch (the pipeline-exactness twin of vanilla)."""
    import torch

    from common.model.weights import ensure_weights, load_network

    torch.set_num_threads(threads)
    network = load_network(weights or ensure_weights("auto"))

    def predict(patch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return network(torch.from_numpy(patch)).numpy()

    return Backend("torch", predict, {"torch": torch.__version__, "threads": threads})


BACKENDS: dict[str, Callable[..., Backend]] = {
    "onnxruntime": onnxruntime_backend,
    "torch": torch_backend,
    "openvino": openvino_backend,
}


def make_backend(name: str, threads: int, **options) -> Backend:
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    return BACKENDS[name](threads, **options)
