"""Named pipeline variants: a variant is data (runtime + options + pipeline settings), not a code path.

`05_optimized_python_benchmark.py --list-variants` prints this table; 06 and segment mode pick from it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import sys
from pathlib import Path

from common.pipeline.run import PipelineConfig
from common.runtime.backends import EXACT_MODEL, PLAIN_MODEL


@dataclass(frozen=True)
class Variant:
    name: str
    tier: str  # "exact": same math as vanilla, float rounding only; "approximate": changes the math
    backend: str  # key of common.runtime.backends.BACKENDS
    description: str
    backend_options: dict = field(default_factory=dict)
    config: PipelineConfig = PipelineConfig()

    def config_for(self, threads: int) -> PipelineConfig:
        """The pipeline settings of a run on `threads` threads (--threads): the numpy and native-kernel work
        of its stages (resampling, accumulation, argmax) on that many threads, not the whole affinity mask."""
        from dataclasses import replace

        return replace(self.config, threads=int(threads))

    def __post_init__(self):
        if self.config.whole_volume != bool(self.backend_options.get("whole_volume")):
            raise ValueError(f"variant {self.name}: a whole-volume config needs a whole_volume backend, and back")


# Exact-tier pipeline options: the same labels as the defaults (tests/test_variants.py checks bit-exactness).
EXACT_STAGES = PipelineConfig(lean_load=True, index_map_resample=True, fused_normalize=True, f16_accumulate=True,
                      chunked_argmax=True, stream_accumulate=True, release_input=True)
# Denormals-as-zero stays off (the backend's default, written here so the table says it): ORT sets it on the
# calling thread too, which then changes torch (vanilla, run in the same process) and drifted the reference by
# 0.6% on example_ct_sm with stand-in weights. 05 runs each variant in its own process; 06's in-process runs and
# the tests still share one.
ORT_TUNED = {"tuned": True, "denormals_as_zero": False, "optimized_model_cache": "auto"}
OV_F32, OV_BF16 = {"precision": "f32"}, {"precision": "bf16"}
EXACT = {"model": EXACT_MODEL}  # every exact ONNX row: InstanceNorm statistics summed as torch sums them


def _with(config: PipelineConfig, **changes) -> PipelineConfig:
    from dataclasses import replace

    return replace(config, **changes)


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("exact_ort_default", "exact", "onnxruntime",
            "ONNX Runtime, default session (only threads set), on the model with InstanceNorm statistics summed in "
            "short blocks (common/model/precise_norm.py), as every exact ONNX row", EXACT),
    # exact tier
    Variant("exact_ort_tuned", "exact", "onnxruntime",
            "ORT tuned session (sequential, spinning, arena, optimized graph cached; denormals-as-zero off, see ORT_TUNED); "
            "pipeline as vanilla", {**ORT_TUNED, **EXACT}),
    Variant("exact_ort_tuned_stages", "exact", "onnxruntime",
            "ORT tuned + reused output buffer + EXACT_STAGES (lean load, index-map resampling back, "
            "fused normalize/pad, per-channel float16 accumulation, chunked argmax)",
            {**ORT_TUNED, "reuse_output": True, **EXACT}, EXACT_STAGES),
    Variant("exact_ov_f32", "exact", "openvino",
            "OpenVINO fp32 (INFERENCE_PRECISION_HINT=f32, static shape) + EXACT_STAGES; the last layer on 8-deep "
            "slabs (head_slab: no 760 MB patch logits)", {**OV_F32, **EXACT, "head_slab": 8}, EXACT_STAGES),
    Variant("exact_ov_f32_split_concat", "exact", "openvino",
            "exact_ov_f32 with each skip concatenation + convolution run as two summed convolutions (split_concat: "
            "no 411 MB full-resolution concatenation; float rounding differs from exact_ov_f32)",
            {**OV_F32, **EXACT, "head_slab": 8, "split_concat": True}, EXACT_STAGES),
    Variant("exact_ov_f32_fused_head", "exact", "openvino",
            "exact_ov_f32_split_concat with the last layer (1x1x1, 32 -> 118) run inside the float16 accumulation "
            "(rust/src/head.rs, AVX-512): no float32 logits written or read back; float rounding differs",
            {**OV_F32, **EXACT, "fused_head": True, "split_concat": True}, EXACT_STAGES),
    # approximate tier
    Variant("approx_ort_plain_norm", "approximate", "onnxruntime",
            "ONNX Runtime, default session, on the plain export: its one-pass float32 InstanceNorm sums drift from "
            "vanilla (what the exact rows' model fixes)", {"model": PLAIN_MODEL}),
    Variant("approx_ov_f32_onepass_norm", "approximate", "openvino", "OpenVINO fp32 (INFERENCE_PRECISION_HINT=f32, static shape) "
            "+ EXACT_STAGES; fp32 math, but OpenVINO's one-pass InstanceNorm sums drift past the exact-tier "
            "bound on stand-in weights (agreement 0.978-0.994 measured; exact_ov_f32 fixes that)",
            {**OV_F32, "model": PLAIN_MODEL}, EXACT_STAGES),
    # The bf16 and INT8 rows keep the plain export (and its INT8 copy, quantized from it): their rounding drifts far
    # more than the one-pass norm sums do, and quantizing the rewrite would wrap its statistics in QDQ pairs.
    Variant("approx_ov_bf16", "approximate", "openvino", "OpenVINO bf16 (AMX or AVX512-BF16) + EXACT_STAGES", OV_BF16, EXACT_STAGES),
    Variant("approx_ov_bf16_step1", "approximate", "openvino", "OpenVINO bf16, tile step 1.0 (less overlap)",
            OV_BF16, _with(EXACT_STAGES, step=1.0)),
    Variant("approx_ov_bf16_bodycrop", "approximate", "openvino",
            "OpenVINO bf16, network only inside the body box (> -500 HU)", OV_BF16, _with(EXACT_STAGES, body_crop=True)),
    Variant("approx_ov_bf16_whole", "approximate", "openvino",
            "OpenVINO bf16, body crop, one whole-volume pass (padded to the stride 16; compiled for each new shape, "
            "argmax inside it; its last layer + argmax on 8-deep slabs; skip concatenations as summed convolutions)",
            {**OV_BF16, "whole_volume": True, "head_slab": 8, "split_concat": True},
            _with(EXACT_STAGES, body_crop=True, whole_volume=True)),
    Variant("approx_ort_int8", "approximate", "onnxruntime",
            "ONNX Runtime, static QDQ INT8 model (calibrated on phantoms that are not evaluation cases)",
            {**ORT_TUNED, "reuse_output": True, "model": "int8"}, EXACT_STAGES),
    Variant("approx_ov_int8", "approximate", "openvino",
            "OpenVINO running the QDQ INT8 model (VNNI/AMX int8 kernels) + EXACT_STAGES",
            {**OV_BF16, "model": "int8"}, EXACT_STAGES),
    # Issue 23: approximations that keep vanilla's tile grid (Dice vs vanilla >= 0.99 is the bar, selection.py).
    Variant("approx_ov_f32_air_tiles", "approximate", "openvino",
            "exact_ov_f32_split_concat, but tiles of vanilla's grid whose whole input is air (< -500 HU) are not "
            "run: their blend share goes to background (common/pipeline/air_tiles.py); grid unchanged",
            {**OV_F32, **EXACT, "head_slab": 8, "split_concat": True}, _with(EXACT_STAGES, air_tiles=True)),
    Variant("approx_ov_int8_f32", "approximate", "openvino",
            "OpenVINO running the QDQ INT8 model (VNNI/AMX int8 convolutions), every other layer f32 (runs where "
            "the CPU has no bf16) + EXACT_STAGES", {**OV_F32, "model": "int8"}, EXACT_STAGES),
    Variant("approx_ov_int8_mixed", "approximate", "openvino",
            "OpenVINO, INT8 with the convolutions whose quantization costs the most agreement kept f32 (per-layer "
            "sensitivity on calibration phantoms, common/model/int8_mixed.py) + EXACT_STAGES",
            {**OV_F32, "model": "int8_mixed"}, EXACT_STAGES),
    Variant("approx_ov_int8_whole", "approximate", "openvino",
            "OpenVINO INT8, body crop, one whole-volume pass", {**OV_BF16, "model": "int8", "whole_volume": True},
            _with(EXACT_STAGES, body_crop=True, whole_volume=True)),
]}


# Names before the tier-first naming (2026-12): still accepted on the command line, with a note.
RENAMED = {"ort_default": "exact_ort_default", "ort_tuned": "exact_ort_tuned", "ort_tuned_fast": "exact_ort_tuned_stages",
           "ov_f32_exact": "exact_ov_f32", "ov_f32_fast": "approx_ov_f32_onepass_norm", "ov_bf16_fast": "approx_ov_bf16",
           "ov_bf16_step1": "approx_ov_bf16_step1", "ov_bf16_bodycrop": "approx_ov_bf16_bodycrop",
           "ov_bf16_whole": "approx_ov_bf16_whole", "ort_int8": "approx_ort_int8", "ov_int8_fast": "approx_ov_int8",
           "ov_int8_whole": "approx_ov_int8_whole"}


def variant_name(name: str) -> str:
    """The current name of `name` (an old name is mapped, with a note on stderr); KeyError if unknown."""
    if name in RENAMED:
        print(f"note: variant {name} is now called {RENAMED[name]}", file=sys.stderr)
        name = RENAMED[name]
    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    return name


def get_variant(name: str) -> Variant:
    return VARIANTS[variant_name(name)]


def make_pipeline_runner(implementation: str, variant: Variant, threads: int, isolated: bool = False):
    """A bench.Runner running `variant` through the shared pipeline (backend built once).

    `isolated`: the backend lives in its own worker process (common/harness/variant_worker.py), started (and warmed
    up) before each timed run and stopped after it: the row's peak memory is that process tree's alone, and
    idle variants hold no memory (nine idle 2-4 GB runtimes exhausted a 24 GB machine).
    """
    from common.harness.bench import Runner

    if isolated:
        from common.harness.variant_worker import VariantWorker

        worker = VariantWorker(variant, threads)  # builds once here, so a runtime that cannot run is skipped
        worker.close()

        def run_and_release(input_path: Path, output_path: Path | None) -> dict:
            try:
                return worker.run(input_path, output_path)
            finally:
                worker.close()  # no idle runtimes: the next run (memory_pid) starts and warms a fresh worker

        return Runner(implementation, variant.name, variant.tier, run_and_release, memory_pid=worker.pid,
                      close=worker.close)

    from common.pipeline.run import segment_file
    from common.runtime.backends import make_backend

    backend = make_backend(variant.backend, threads, **variant.backend_options)
    config = variant.config_for(threads)

    def run(input_path: Path, output_path: Path | None) -> dict:
        result = segment_file(input_path, output_path, backend, config)
        return {**result.timings, "n_tiles": result.n_tiles}

    return Runner(implementation, variant.name, variant.tier, run)
