"""The machine's peak of each precision it has, measured with OpenVINO's own kernels, and its memory bandwidth.

Peak = best GFLOP/s of a 3x3x3 convolution shaped like the network's deeper stages (compute-bound: ~100 MACs
per byte), timed by OpenVINO's per-layer counters on the convolution alone, compiled as the backends compile
(INFERENCE_PRECISION_HINT f32 / bf16; INT8 through FakeQuantize on input and weights, which OpenVINO lowers to
its int8 convolution). Bandwidth = an elementwise add over 256 MB, the runtime's own streaming kernel.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PRECISIONS = ("f32", "bf16", "int8")
CONV_SHAPES = ((128, 24), (256, 16))  # (channels, edge): 12 and 14 GFLOP per call
BANDWIDTH_FLOATS = 64 << 20


@dataclass
class Peaks:
    threads: int
    gflops: dict[str, float] = field(default_factory=dict)  # precision -> GFLOP/s
    skipped: dict[str, str] = field(default_factory=dict)  # precision -> why not measured
    bandwidth_gbs: float | None = None
    kernels: dict[str, str] = field(default_factory=dict)  # precision -> the convolution kernel OpenVINO chose

    def of(self, precision: str | None) -> float | None:
        return self.gflops.get(precision) if precision else None


def _conv_model(ov, channels: int, edge: int, int8: bool):
    from openvino import opset13 as ops

    x = ops.parameter([1, channels, edge, edge, edge], ov.Type.f32)
    w = ops.constant(np.random.default_rng(0).uniform(-0.1, 0.1, (channels, channels, 3, 3, 3)).astype(np.float32))
    if int8:  # u8 activations, i8 weights: the pattern OpenVINO's low-precision transformations turn into int8 conv
        def fq(node, lo, hi, levels):
            lo, hi = ops.constant(np.float32(lo)), ops.constant(np.float32(hi))
            return ops.fake_quantize(node, lo, hi, lo, hi, levels)
        x_in, w = fq(x, 0.0, 4.0, 256), fq(w, -0.1, 0.1, 255)
    else:
        x_in = x
    y = ops.convolution(x_in, w, [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1])
    return ov.Model([y], [x], f"conv{channels}"), 2 * 27 * channels ** 2 * edge ** 3 / 1e9


def _best_layer_seconds(request, inputs, layer_types: tuple[str, ...], repeats: int) -> tuple[float, str]:
    """Best over repeats of the time in the layers of these types (inf if none ran), and the first one's kernel."""
    best, kernel = np.inf, ""
    for _ in range(repeats):
        request.infer(inputs)
        layers = [p for p in request.profiling_info if p.node_type in layer_types and p.status.name == "EXECUTED"]
        if layers:
            best = min(best, sum(p.real_time.total_seconds() for p in layers))
            kernel = layers[0].exec_type
    return best, kernel


def conv_peak(ov, core, precision: str, threads: int, repeats: int = 4) -> tuple[float, str]:
    """Best GFLOP/s of the convolution layer over CONV_SHAPES for one precision, and OpenVINO's kernel name."""
    from common.runtime.backends import openvino_config

    best, kernel = 0.0, ""
    hint = "f32" if precision == "int8" else precision
    for channels, edge in CONV_SHAPES:
        model, gflop = _conv_model(ov, channels, edge, int8=precision == "int8")
        compiled = core.compile_model(model, "CPU", {**openvino_config(threads, hint), "PERF_COUNT": True})
        x = np.random.default_rng(1).uniform(0, 4, (1, channels, edge, edge, edge)).astype(np.float32)
        seconds, name = _best_layer_seconds(compiled.create_infer_request(), {0: x}, ("Convolution",), repeats)
        if seconds > 0 and gflop / seconds > best:
            best, kernel = gflop / seconds, name
    return best, kernel


def bandwidth(ov, core, threads: int, repeats: int = 6) -> float:
    """GB/s of OpenVINO's elementwise add over BANDWIDTH_FLOATS float32 (one read + one write per element)."""
    from openvino import opset13 as ops

    from common.runtime.backends import openvino_config

    x = ops.parameter([BANDWIDTH_FLOATS], ov.Type.f32)
    model = ov.Model([ops.add(x, ops.constant(np.float32(1)))], [x], "stream")
    compiled = core.compile_model(model, "CPU", {**openvino_config(threads, "f32"), "PERF_COUNT": True})
    request = compiled.create_infer_request()
    # OpenVINO runs a lone Add as a fused "Subgraph" (older releases: "Eltwise")
    seconds, _ = _best_layer_seconds(request, {0: np.ones(BANDWIDTH_FLOATS, np.float32)}, ("Eltwise", "Subgraph"),
                                     repeats)
    return 2 * 4 * BANDWIDTH_FLOATS / seconds / 1e9 if np.isfinite(seconds) and seconds > 0 else float("nan")


def unavailable(core, flags: dict[str, bool]) -> dict[str, str]:
    """Precisions this CPU lacks, with the reason (the kernels would be emulated, not its peak)."""
    caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    out = {}
    if "BF16" not in caps:
        out["bf16"] = "no bf16 in OpenVINO's OPTIMIZATION_CAPABILITIES"
    if "INT8" not in caps or not (flags.get("avx512_vnni") or flags.get("amx_int8")):
        out["int8"] = "no AVX-512 VNNI / AMX int8"
    return out


def measure_peaks(threads: int, log=lambda message: None) -> Peaks:
    """Peaks of every precision this CPU has (a few seconds each), and the memory bandwidth."""
    from common.core.env import key_flags

    peaks = Peaks(threads)
    try:
        import openvino as ov
    except ImportError as exc:
        peaks.skipped = {p: f"openvino not installed: {exc}" for p in PRECISIONS}
        return peaks
    core = ov.Core()
    peaks.skipped = unavailable(core, key_flags())
    for precision in PRECISIONS:
        if precision not in peaks.skipped:
            peaks.gflops[precision], peaks.kernels[precision] = conv_peak(ov, core, precision, threads)
            log(f"peak {precision}: {peaks.gflops[precision]:.0f} GFLOP/s ({peaks.kernels[precision]})")
    peaks.bandwidth_gbs = bandwidth(ov, core, threads)
    log(f"memory bandwidth: {peaks.bandwidth_gbs:.1f} GB/s")
    return peaks
