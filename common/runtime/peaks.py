"""The machine's peak of each precision it has, measured with OpenVINO's own kernels, and its memory bandwidth.

Peak = best GFLOP/s of one 3x3x3 convolution shaped like the network's middle stages (compute-bound: hundreds of
MACs per byte), timed by OpenVINO's per-layer counters on that layer alone, compiled as the backends compile
(INFERENCE_PRECISION_HINT f32 / bf16; INT8 through FakeQuantize on input and weights, which OpenVINO lowers to
its int8 convolution). Bandwidth = an elementwise add over 256 MB, the runtime's own streaming kernel.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PRECISIONS = ("f32", "bf16", "int8")
CONV_SHAPES = ((64, 48), (128, 32))  # (channels, edge): 24 and 29 GFLOP per timed convolution
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


def _conv_chain(ov, channels: int, edge: int, int8: bool, n: int = 2):
    """A 1-channel input, a conv to `channels`, then `n` convs channels -> channels named peak0.. (the timed
    ones): as in the network, they receive the layout and precision the runtime chose for a conv's output."""
    from openvino import opset13 as ops

    rng = np.random.default_rng(0)

    def conv(node, c_in, name=None):
        weights = ops.constant(rng.uniform(-0.1, 0.1, (channels, c_in, 3, 3, 3)).astype(np.float32))
        if int8:  # u8 activations, i8 weights: the pattern OpenVINO's low-precision transformations lower to int8
            node, weights = _fake_quantize(node, 0.0, 4.0, 256), _fake_quantize(weights, -0.1, 0.1, 255)
        out = ops.convolution(node, weights, [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1])
        if name:
            out.set_friendly_name(name)
        return out

    x = ops.parameter([1, 1, edge, edge, edge], ov.Type.f32)
    y = conv(x, 1)
    for i in range(n):
        y = conv(y, channels, f"peak{i}")
    return ov.Model([y], [x], f"conv{channels}"), 2 * 27 * channels ** 2 * edge ** 3 / 1e9


def _fake_quantize(node, lo: float, hi: float, levels: int):
    from openvino import opset13 as ops

    lo, hi = ops.constant(np.float32(lo)), ops.constant(np.float32(hi))
    return ops.fake_quantize(node, lo, hi, lo, hi, levels)


def _best_layer_seconds(request, inputs, is_timed, repeats: int) -> tuple[float, str]:
    """The fastest single timed layer over repeats (inf if none ran), and its kernel."""
    best, kernel = np.inf, ""
    for _ in range(repeats):
        request.infer(inputs)
        for layer in request.profiling_info:
            seconds = layer.real_time.total_seconds()
            if is_timed(layer) and layer.status.name == "EXECUTED" and 0 < seconds < best:
                best, kernel = seconds, layer.exec_type
    return best, kernel


def _is_timed_conv(layer) -> bool:
    return layer.node_type == "Convolution" and layer.node_name.startswith("peak")  # not their output reorder


def conv_peak(ov, core, precision: str, threads: int, repeats: int = 3) -> tuple[float, str]:
    """Best GFLOP/s of one convolution layer over CONV_SHAPES for one precision, and OpenVINO's kernel name."""
    from common.runtime.backends import openvino_config

    best, kernel = 0.0, ""
    hint = "f32" if precision == "int8" else precision
    for channels, edge in CONV_SHAPES:
        model, gflop = _conv_chain(ov, channels, edge, int8=precision == "int8")
        compiled = core.compile_model(model, "CPU", {**openvino_config(threads, hint), "PERF_COUNT": True})
        x = np.random.default_rng(1).uniform(0, 4, (1, 1, edge, edge, edge)).astype(np.float32)
        seconds, name = _best_layer_seconds(compiled.create_infer_request(), {0: x}, _is_timed_conv, repeats)
        if gflop / seconds > best:
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
    seconds, _ = _best_layer_seconds(request, {0: np.ones(BANDWIDTH_FLOATS, np.float32)},
                                     lambda layer: layer.node_type in ("Eltwise", "Subgraph"), repeats)
    return 2 * 4 * BANDWIDTH_FLOATS / seconds / 1e9 if np.isfinite(seconds) and seconds > 0 else float("nan")


def unavailable(core, flags: dict[str, bool]) -> dict[str, str]:
    """Precisions this CPU lacks, with the reason (the kernels would be emulated, not its peak)."""
    caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    out = {}
    if "BF16" not in caps or not (flags.get("avx512_bf16") or flags.get("amx_bf16")):
        out["bf16"] = "no AVX-512 bf16 / AMX bf16 (or no BF16 in OpenVINO's OPTIMIZATION_CAPABILITIES)"
    if "INT8" not in caps or not (flags.get("avx512_vnni") or flags.get("amx_int8")):
        out["int8"] = "no AVX-512 VNNI / AMX int8"
    return out


def measure_peaks(threads: int, log=lambda message: None) -> Peaks:
    """Peaks of every precision this CPU has (a few seconds each), and the memory bandwidth."""
    from common.core.env import key_flags
    from common.core.formatting import one_line

    peaks = Peaks(threads)
    try:
        import openvino as ov
    except ImportError as exc:
        peaks.skipped = {p: f"openvino not installed: {exc}" for p in PRECISIONS}
        return peaks
    core = ov.Core()
    peaks.skipped = unavailable(core, key_flags())
    for precision in PRECISIONS:
        if precision in peaks.skipped:
            continue
        try:
            peaks.gflops[precision], peaks.kernels[precision] = conv_peak(ov, core, precision, threads)
        except Exception as exc:  # noqa: BLE001 - a runtime that cannot compile it: that peak reads n/a
            peaks.skipped[precision] = one_line(exc)
            continue
        log(f"peak {precision}: {peaks.gflops[precision]:.0f} GFLOP/s ({peaks.kernels[precision]})")
    try:
        peaks.bandwidth_gbs = bandwidth(ov, core, threads)
    except Exception as exc:  # noqa: BLE001
        log(f"memory bandwidth not measured: {one_line(exc)}")
        return peaks
    log(f"memory bandwidth: {peaks.bandwidth_gbs:.1f} GB/s")
    return peaks
