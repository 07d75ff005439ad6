"""Runtimes behind one small interface: `backend.predict(patch) -> logits` (float32 numpy in and out), or
`backend.labels_any(volume) -> labels` for a whole-volume pass.

Adding a runtime = one factory function registered in BACKENDS.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from common.core import memory, paths
from common.model.weights import NUM_CLASSES, PATCH_SIZE
from common.runtime.openvino_graph import head_parameters, split_concat_convs, split_head, with_argmax


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
    # Optional: the patch's logits as (z0, (C, dz, H, W)) slabs along the first spatial axis, each valid until
    # the next; the same values as `predict`, without the 118-channel patch ever existing at once.
    predict_slabs: Callable[[np.ndarray], Iterator[tuple[int, np.ndarray]]] | None = None
    # Optional (the fused head): the patch's last features (F, *patch) float32, valid until the next call, and the
    # last layer's (weight (C, F), bias (C,)): the pipeline runs that layer inside its float16 accumulation.
    predict_features: Callable[[np.ndarray], np.ndarray] | None = None
    head: tuple[np.ndarray, np.ndarray] | None = None


def import_runtime(module: str):
    """The runtime's Python package, or BackendUnavailable (the benchmark reports the row as skipped)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailable(f"{module} not installed: {exc}") from None


# The model every exact-tier ONNX row runs (the exact variants, 04's baseline, the Rust binary): the plain
# export's one-pass InstanceNorm sums drift 0.3-0.6% of labels from vanilla on stand-in weights.
EXACT_MODEL = "precise_norm"
PLAIN_MODEL = "plain"


def resolve_model(model: str | Path | None) -> Path:
    """The one rule for which ONNX file a backend loads.

    `None`/"plain" (or "fp32") = the exported model; "precise_norm" (EXACT_MODEL) = the same with short-block
    InstanceNorm sums (common/model/precise_norm.py); "int8" = its calibrated QDQ copy
    (common/model/quantize.py); "int8_mixed" = the same with its most sensitive convolutions kept float
    (common/model/int8_mixed.py): each checked against the checkpoint model_info.json names (stale models/ are
    refused). A path = that file as it is (tests, one-off runs). Every one must be the static patch model
    (common/model/onnx_meta.py).
    """
    from common.model.onnx_meta import check_current_model

    if model in (None, PLAIN_MODEL, "fp32"):
        return check_current_model()
    if model == EXACT_MODEL:
        from common.model.precise_norm import ensure_precise_norm_model

        check_current_model()
        return ensure_precise_norm_model()
    if model == "int8_mixed":
        from common.model.int8_mixed import INT8_MIXED_MODEL

        check_current_model()
        if not INT8_MIXED_MODEL.is_file():
            raise BackendUnavailable(f"INT8 mixed model {INT8_MIXED_MODEL.name} missing: run "
                                     "`python 05_optimized_python_benchmark.py --calibrate` first")
        return INT8_MIXED_MODEL
    if model == "int8":
        from common.model.quantize import INT8_MODEL

        check_current_model()
        if not INT8_MODEL.is_file():
            raise BackendUnavailable(f"INT8 model {INT8_MODEL.name} missing: run "
                                     "`python 05_optimized_python_benchmark.py --calibrate` first")
        return INT8_MODEL
    if not Path(model).is_file():
        raise FileNotFoundError(f"ONNX model {model} not found")
    return Path(model)


def onnxruntime_backend(threads: int, model: str | Path | None = None, tuned: bool = False,
                        optimized_model_cache: Path | str | None = None,
                        reuse_output: bool = False, denormals_as_zero: bool = False) -> Backend:
    """ONNX Runtime CPU. Default session = only the thread count set (the `onnx_baseline` row).

    `reuse_output`: bind one preallocated output buffer (IOBinding) instead of a fresh 760 MB array
    per tile (page faults are expensive here); `predict` then returns that buffer, valid until the next call.
    """
    ort = import_runtime("onnxruntime")
    model_path = resolve_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if tuned:
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        if denormals_as_zero:  # off by default, as in every variant: it flushes tiny activations (drift), see ORT_TUNED
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

    _require_patch_session(session, model_path)  # the bound output buffer is the patch's logits
    output = session.get_outputs()[0]
    out_shape = [1, NUM_CLASSES, *PATCH_SIZE]
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


def _require_patch_session(session, model_path: Path) -> None:
    """The one shape rule (common/model/onnx_meta.py), read from the session: a static patch model only."""
    inputs, outputs = session.get_inputs()[0].shape, session.get_outputs()[0].shape
    if list(inputs) != [1, 1, *PATCH_SIZE] or list(outputs) != [1, NUM_CLASSES, *PATCH_SIZE]:
        from common.model.onnx_meta import require_patch_model

        require_patch_model(model_path)


def _infer(request, array: np.ndarray) -> np.ndarray:
    """Run an OpenVINO request on one float32 input; its output tensor, not a copy. (`infer` copies every output
    by default: a transient as large as the output, 205 MB per f32 trunk tile, at the moment memory peaks.)"""
    request.infer({0: np.ascontiguousarray(array, dtype=np.float32)}, share_inputs=True, share_outputs=True)
    return request.get_output_tensor(0).data


def openvino_config(threads: int, precision: str = "f32") -> dict:
    """Compile settings of every OpenVINO model here: the backends, the peak kernels, the per-layer profile."""
    return {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}


def openvino_backend(threads: int, model: str | Path | None = None, precision: str = "f32",
                     cache_dir: Path | None = paths.MODELS_DIR / "openvino_cache",
                     whole_volume: bool = False, head_slab: int = 0, split_concat: bool = False,
                     fused_head: bool = False) -> Backend:
    """OpenVINO CPU, one infer request whose output buffer is reused.

    `precision`: INFERENCE_PRECISION_HINT, "f32" (exact tier) or "bf16" (AMX/AVX-512 bf16, approximate).
    Default: the static patch model, `predict` gives logits. `whole_volume`: instead, the model with the argmax
    appended, compiled for each new input shape (`labels_any`): no 118-channel float32 volume (1.5 GB at
    144x144x160) leaves the runtime.
    `head_slab` > 0 (patch model): the last layer (1x1x1 convolution, 32 -> 118 channels) runs as its own model
    on `head_slab`-deep slabs of the features (`predict_slabs`): the runtime never holds the 760 MB float32
    patch logits; the same values bit for bit (tests/test_lean_memory.py).
    `split_concat`: each decoder convolution over a skip concatenation runs as two summed convolutions
    (`openvino_graph.split_concat_convs`): the full-resolution concatenation is never allocated; float rounding
    differs from the unsplit model.
    `fused_head` (patch model): OpenVINO runs every layer but the last (`predict_features`); the last (1x1x1, 32 ->
    118) runs inside the float16 accumulation (`native_kernels.head_accumulate`), so its 760 MB float32 tile is
    never written or read back; logits differ from OpenVINO's head by float rounding only.
    """
    ov = import_runtime("openvino")
    model_path = resolve_model(model)
    core = ov.Core()
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        core.set_property({"CACHE_DIR": str(cache_dir)})
    if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise BackendUnavailable("this CPU has no bf16 support (OpenVINO OPTIMIZATION_CAPABILITIES)")
    config = openvino_config(threads, precision)
    net = core.read_model(str(model_path))
    details = {"openvino": ov.__version__, "threads": threads, "precision": precision, "model": Path(model_path).name}
    if split_concat:
        details["split_concat"] = split_concat_convs(net)

    if whole_volume:
        if model == EXACT_MODEL:
            raise ValueError("the precise-norm model's statistics are built for the patch shape: a whole-volume "
                             "pass runs the plain or the int8 model")
        return _openvino_whole_volume(ov, net, config, details, head_slab)

    shape = net.inputs[0].get_partial_shape()
    if shape.is_dynamic or list(shape.to_shape()) != [1, 1, *PATCH_SIZE]:
        from common.model.onnx_meta import require_patch_model

        require_patch_model(model_path)  # raises, with the shapes it found
    if fused_head:
        return _openvino_fused_head(ov, core, net, config, details)
    if head_slab:
        return _openvino_head_slabs(ov, core, net, config, details, head_slab)
    request = core.compile_model(net, "CPU", config).create_infer_request()

    def predict(patch: np.ndarray) -> np.ndarray:
        return _infer(request, patch)

    return Backend("openvino", predict, details, reuses_output=True)


def _openvino_whole_volume(ov, net, config: dict, details: dict, head_slab: int) -> Backend:
    """Whole-volume labels, the model compiled for each new input shape, the last shape's compilation released
    first. A static shape lets OpenVINO plan its activations: 1.3 GB instead of 2.0 GB for the trunk at
    144x144x160 (bf16), for ~0.2 s of compiling. No disk cache: it would keep one blob per shape.
    `head_slab` > 0: the trunk, then its last layer + argmax (one dynamic model) on `head_slab`-deep slabs, so the
    118-channel logits of the whole volume never exist inside the runtime, only one slab's."""
    core = ov.Core()  # without CACHE_DIR
    head = None
    if head_slab:
        _, head_model = split_head(ov, net)
        head = core.compile_model(with_argmax(ov, head_model), "CPU", config).create_infer_request()
    compiled: dict = {}  # the one live compilation: input shape -> infer request

    def request_for(shape: tuple[int, ...]):
        if shape not in compiled:
            compiled.clear()  # frees the last shape's activations before the next are planned
            net.reshape({net.inputs[0].get_any_name(): ov.PartialShape(list(shape))})
            model = split_head(ov, net)[0] if head_slab else with_argmax(ov, net)
            compiled[shape] = core.compile_model(model, "CPU", config).create_infer_request()
        return compiled[shape]

    def labels_any(image: np.ndarray) -> np.ndarray:
        output = _infer(request_for(image.shape), image)
        if head is None:
            return output
        labels = np.empty((1, 1, *output.shape[2:]), dtype=np.uint8)
        for z in range(0, output.shape[2], head_slab):
            labels[:, :, z:z + head_slab] = _infer(head, output[:, :, z:z + head_slab])
        return labels

    details = {**details, "whole_volume": True, **({"head_slab": head_slab} if head_slab else {})}
    return Backend("openvino", None, details, labels_any=labels_any, reuses_output=not head_slab)


def _openvino_fused_head(ov, core, net, config: dict, details: dict) -> Backend:
    """The trunk in OpenVINO, the head as numbers for the pipeline's fused accumulation (`fused_head=True`).

    As with head slabs, the trunk's activations go back to the OS once it has run (the features are its output
    tensor, owned apart)."""
    from common.runtime import native_kernels

    if not native_kernels.fused_head_available():
        raise BackendUnavailable("the fused head needs rust/'s kernels (bash rust/setup.sh) and a CPU with AVX-512")
    trunk_model, _ = split_head(ov, net)
    _, weight, bias = head_parameters(net)
    weight = np.ascontiguousarray(weight.reshape(weight.shape[:2]), dtype=np.float32)
    bias = np.ascontiguousarray(bias, dtype=np.float32)
    trunk_compiled = core.compile_model(trunk_model, "CPU", config)
    trunk = trunk_compiled.create_infer_request()

    def predict_features(patch: np.ndarray) -> np.ndarray:
        memory.return_freed_heap()
        features = _infer(trunk, patch)[0]
        trunk_compiled.release_memory()
        return features

    def predict(patch: np.ndarray) -> np.ndarray:  # whole-patch logits for callers that want them (numpy's head)
        features = predict_features(patch)
        logits = np.tensordot(weight, features, axes=(1, 0)) + bias[:, None, None, None]
        return logits[None].astype(np.float32, copy=False)

    return Backend("openvino", predict, {**details, "fused_head": True}, predict_features=predict_features,
                   head=(weight, bias))


def _openvino_head_slabs(ov, core, net, config: dict, details: dict, depth: int) -> Backend:
    """The patch model as trunk + head on slabs (`openvino_backend(head_slab=depth)`).

    Between the steps of a tile the idle model's activations go back to the OS (`release_memory`, re-planned at
    its next run in ~0.05 s): the trunk's ~600 MB (f32 112x112x128 tile) while the head and the accumulator run,
    the head's while the next trunk runs. Output tensors are owned apart and stay valid; the head's is renewed
    each tile, so none of it is resident while the trunk's activations peak."""
    trunk_model, head_model = split_head(ov, net)
    if PATCH_SIZE[0] % depth:
        raise ValueError(f"head_slab {depth} does not divide the patch depth {PATCH_SIZE[0]}")
    trunk_compiled = core.compile_model(trunk_model, "CPU", config)
    trunk = trunk_compiled.create_infer_request()
    head_model.reshape({0: ov.PartialShape([1, head_model.inputs[0].get_partial_shape()[1], depth, *PATCH_SIZE[1:]])})
    head_compiled = core.compile_model(head_model, "CPU", config)
    head = head_compiled.create_infer_request()
    head_output: list[np.ndarray] = []  # the buffer the head writes into, owned here (the request only points to it)

    def fresh_head_output() -> None:
        """A new buffer for this tile's head logits (54 MB for 8-deep slabs): the last tile's is freed before the
        trunk runs, and the new one's pages are not resident until the head writes them."""
        buffer = np.empty(tuple(head_compiled.output(0).get_shape()), dtype=np.float32)
        head.set_output_tensor(0, ov.Tensor(buffer, shared_memory=True))
        head_output[:] = [buffer]

    def predict_slabs(patch: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        fresh_head_output()
        memory.return_freed_heap()  # the last tile's temporaries (~150 MB of free heap) before the trunk peaks
        features = _infer(trunk, patch)
        trunk_compiled.release_memory()
        for z in range(0, features.shape[2], depth):
            yield z, _infer(head, features[:, :, z:z + depth])[0]
        head_compiled.release_memory()

    def predict(patch: np.ndarray) -> np.ndarray:  # the whole patch's logits, for callers that want them at once
        out = np.empty((1, NUM_CLASSES, *PATCH_SIZE), dtype=np.float32)
        for z, slab in predict_slabs(patch):
            out[0, :, z:z + slab.shape[1]] = slab
        return out

    return Backend("openvino", predict, {**details, "head_slab": depth}, predict_slabs=predict_slabs)


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
    backend = BACKENDS[name](threads, **options)
    memory.return_freed_heap()  # the parsed model file and graph rewrites, freed once compiled (~60 MB heap)
    return backend
