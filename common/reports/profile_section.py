"""05's per-layer profile: where one patch's time goes inside OpenVINO, per precision, and what bounds it.

The fastest of two inferences of the exported patch model, compiled as the backends compile it plus PERF_COUNT,
after an untimed one; the per-layer times, precisions and shapes come from the compiled model's runtime graph. Layers
are grouped as convolutions, InstanceNorm/activation (MVN, with the LeakyReLU fused into it, and any
elementwise layer) and reorders/other (layout conversions, concatenations). Convolutions are judged against
their precision's peak (common/runtime/peaks.py); the other layers, which do little arithmetic per byte,
against the memory bandwidth.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.model.weights import PATCH_SIZE

CONV = "convolutions"
NORM = "InstanceNorm / activation"
OTHER = "reorders / other"
GROUPS = (CONV, NORM, OTHER)
CONV_TYPES = {"Convolution", "Deconvolution", "ConvolutionBackpropData"}
NORM_TYPES = {"MVN", "Eltwise", "Subgraph", "LeakyRelu", "PRelu", "Relu", "Math", "NormalizeL2"}
COMPUTE_BOUND_SHARE = 0.5  # convolutions taking at least half the time: the patch is bound by arithmetic


def group_of(layer_type: str) -> str:
    return CONV if layer_type in CONV_TYPES else NORM if layer_type in NORM_TYPES else OTHER


@dataclass
class Profile:
    precision: str
    shape: tuple[int, ...]
    model: str = ""
    seconds: dict[str, float] = field(default_factory=dict)  # group -> seconds
    by_type: dict[str, list] = field(default_factory=dict)  # layer type -> [count, seconds, kernel]
    conv_gflop: float = 0.0
    other_bytes: float = 0.0  # bytes the non-convolution layers read and write (lower bound)

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())

    def share(self, group: str) -> float:
        return self.seconds.get(group, 0.0) / self.total_s if self.total_s else float("nan")


def conv_gflop(model) -> float:
    """Multiply-adds x 2 of the model's convolutions and transposed convolutions (static shapes, no groups)."""
    total = 0
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind not in CONV_TYPES:
            continue
        weights = list(op.input(1).get_partial_shape().to_shape())
        if kind == "Convolution":  # weights (out, in, k...) applied at each output voxel
            out = list(op.output(0).get_partial_shape().to_shape())
            total += 2 * int(np.prod(out[2:])) * int(np.prod(weights))
        else:  # transposed: weights (in, out, k...) applied at each input voxel
            total += 2 * int(np.prod(list(op.input(0).get_partial_shape().to_shape())[2:])) * int(np.prod(weights))
    return total / 1e9


def _port_bytes(port) -> int:
    return int(np.prod(list(port.get_partial_shape().to_shape()))) * port.get_element_type().size


def profile_patch(model_path: str | Path, precision: str, threads: int,
                  shape: tuple[int, ...] = (1, 1, *PATCH_SIZE), runs: int = 2) -> Profile:
    """Per-layer times of `model_path` on an input of `shape` at `precision` ("f32"/"bf16"): the fastest of
    `runs` inferences after an untimed one (the first allocates; a shared machine slows some runs)."""
    import openvino as ov

    from common.runtime.backends import openvino_config

    core = ov.Core()
    model = core.read_model(str(model_path))
    if list(model.inputs[0].get_partial_shape()) != list(shape):
        model.reshape({model.inputs[0].get_any_name(): ov.PartialShape(list(shape))})
    compiled = core.compile_model(model, "CPU", {**openvino_config(threads, precision), "PERF_COUNT": True})
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    request.infer({0: x}, share_outputs=True)
    gflop, best = conv_gflop(model), None
    for _ in range(runs):
        request.infer({0: x}, share_outputs=True)
        profile = _read_counters(compiled, Profile(precision, tuple(shape), Path(model_path).name, conv_gflop=gflop))
        best = profile if best is None or profile.total_s < best.total_s else best
    return best


def _read_counters(compiled, result: Profile) -> Profile:
    """`result` filled from the compiled model's runtime graph (times of the last inference, shapes, kernels)."""
    seconds, by_type = defaultdict(float), {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        micros = info["execTimeMcs"].astype(str)
        if not micros.isdigit():  # not executed: constants, inputs, layers fused into another
            continue
        kind = info["layerType"].astype(str)
        group = group_of(kind)
        seconds[group] += int(micros) / 1e6
        entry = by_type.setdefault(kind, [0, 0.0, info["primitiveType"].astype(str)])
        entry[0] += 1
        entry[1] += int(micros) / 1e6
        if group != CONV:
            result.other_bytes += sum(_port_bytes(p) for p in (*op.inputs(), *op.outputs()))
    result.seconds = {g: seconds.get(g, 0.0) for g in GROUPS}
    result.by_type = dict(sorted(by_type.items(), key=lambda kv: -kv[1][1]))
    return result


def verdict(profile: Profile, peak_gflops: float | None, bandwidth_gbs: float | None) -> str:
    """What bounds this precision, with the numbers that say so."""
    conv_rate = profile.conv_gflop / profile.seconds[CONV] if profile.seconds[CONV] else float("nan")
    other_s = profile.seconds[NORM] + profile.seconds[OTHER]
    other_rate = profile.other_bytes / other_s / 1e9 if other_s else float("nan")
    compute = (f"convolutions {100 * profile.share(CONV):.0f}% of the time at {conv_rate:.0f} GFLOP/s"
               + (f" = {100 * conv_rate / peak_gflops:.0f}% of the {profile.precision} peak ({peak_gflops:.0f})"
                  if peak_gflops else ""))
    memory = (f"the other layers {100 * (1 - profile.share(CONV)):.0f}% at {other_rate:.1f} GB/s "
              f"({profile.other_bytes / 1e9:.1f} GB read and written)"
              + (f" = {100 * other_rate / bandwidth_gbs:.0f}% of the measured bandwidth ({bandwidth_gbs:.1f} GB/s)"
                 if bandwidth_gbs and np.isfinite(bandwidth_gbs) else ""))
    if profile.share(CONV) >= COMPUTE_BOUND_SHARE:
        return f"**{profile.precision}: compute-bound**: {compute}; {memory}."
    return f"**{profile.precision}: memory-bound**: {memory}; {compute}."


def section_lines(profiles: list[Profile], peaks=None) -> list[str]:
    """`## Per-layer profile (OpenVINO, one patch)`: shares per group and per layer type, and the verdicts."""
    lines = ["## Per-layer profile (OpenVINO, one patch)", ""]
    if not profiles:
        return lines + ["Not measured in this run (--no-profile, or OpenVINO or the model missing).", ""]
    shape = "x".join(map(str, profiles[0].shape))
    lines += [f"The fastest of two inferences of models/{profiles[0].model} on a {shape} input after an untimed one, compiled as "
              "the backends compile it plus PERF_COUNT (common/reports/profile_section.py); layer times from "
              "OpenVINO's per-layer counters. The LeakyReLU runs fused into the MVN (InstanceNorm) layer.", "",
              "| Precision | Total (s) | " + " | ".join(GROUPS) + " | Conv GFLOP/s |",
              "| --- | ---: |" + " ---: |" * (len(GROUPS) + 1)]
    for p in profiles:
        conv_rate = p.conv_gflop / p.seconds[CONV] if p.seconds[CONV] else float("nan")
        lines.append(f"| {p.precision} | {p.total_s:.2f} | " +
                     " | ".join(f"{100 * p.share(g):.1f}% ({p.seconds[g]:.2f} s)" for g in GROUPS) +
                     f" | {conv_rate:.0f} |")
    lines += [""]
    bandwidth = peaks.bandwidth_gbs if peaks else None
    lines += [f"- {verdict(p, peaks.of(p.precision) if peaks else None, bandwidth)}" for p in profiles]
    lines += ["", "| Precision | Layer type | Group | Layers | Seconds | Share | Kernel |",
              "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    for p in profiles:
        for kind, (count, seconds, kernel) in p.by_type.items():
            lines.append(f"| {p.precision} | {kind} | {group_of(kind)} | {count} | {seconds:.3f} | "
                         f"{100 * seconds / p.total_s:.1f}% | {kernel} |")
    return lines + [""]


def measure_profiles(threads: int, model_path: str | Path | None = None, log=lambda message: None) -> list[Profile]:
    """f32 and (where the CPU has it) bf16 profiles of the exported patch model; [] without OpenVINO or model."""
    try:
        import openvino as ov

        from common.runtime.backends import resolve_model
        path = Path(model_path) if model_path else resolve_model(None)
    except Exception as exc:  # noqa: BLE001 - no runtime or no current model: the section says not measured
        log(f"per-layer profile skipped: {type(exc).__name__}: {exc}")
        return []
    precisions = ["f32"] + (["bf16"] if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else [])
    profiles = []
    for precision in precisions:
        profiles.append(profile_patch(path, precision, threads))
        log(f"profile {precision}: convolutions {100 * profiles[-1].share(CONV):.0f}% of {profiles[-1].total_s:.2f} s")
    return profiles
