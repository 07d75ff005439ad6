"""05's network efficiency: each row's GFLOP/s against the measured peak of its own precision
(common/runtime/peaks.py), never a bf16 or int8 row against the float32 peak."""
from __future__ import annotations

import numpy as np
import pandas as pd

from common.core.formatting import number


def row_precision(implementation: str, variant: str) -> str | None:
    """The arithmetic of a result row's network: vanilla is torch float32; a variant says it in its options
    (`model: int8` wins over the OpenVINO hint: its convolutions run in int8). None for an unknown variant."""
    if implementation == "vanilla":
        return "f32"
    from common.variants.table import RENAMED, VARIANTS

    name = str(variant).split(" ")[0]  # 06's rows append the layout: "exact_ov_f32 W1xT2"
    found = VARIANTS.get(RENAMED.get(name, name))
    if found is None:
        return None
    options = found.backend_options
    if options.get("model") == "int8":
        return "int8"
    return "bf16" if options.get("precision") == "bf16" else "f32"


def row_efficiency(summary: pd.DataFrame, peaks) -> pd.Series:
    """network_gflops / the peak of the row's precision (NaN where that peak was not measured)."""
    if peaks is None:
        return pd.Series(np.nan, index=summary.index)
    peak = [peaks.of(row_precision(r.implementation, r.variant)) or np.nan for r in summary.itertuples()]
    return summary.network_gflops / np.asarray(peak, dtype=float)


def note_line(peaks) -> str:
    """05's note on how efficiency is computed, with the peaks themselves."""
    if peaks is None:
        return "  Peaks not measured (--no-peak): efficiency reads n/a."
    measured = ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in peaks.gflops.items()) or "none"
    return (f"  Efficiency = network GFLOP/s / the peak of the row's own precision ({measured}; "
            f"{peaks.threads} threads, OpenVINO's own convolution kernels: see \"Network efficiency per precision\").")


def section_lines(summary: pd.DataFrame, peaks) -> list[str]:
    """`## Network efficiency per precision`: the peaks, then which peak each row is compared with."""
    lines = ["## Network efficiency per precision", ""]
    if peaks is None:
        return lines + ["Peaks not measured in this run (--no-peak).", ""]
    from common.runtime.peaks import CONV_SHAPES

    shapes = ", ".join(f"{c} channels at {e}³" for c, e in CONV_SHAPES)
    lines += [f"Peak of each precision on this CPU ({peaks.threads} threads): the best GFLOP/s of one 3x3x3 "
              f"convolution ({shapes}) timed by OpenVINO's per-layer counters, compiled as the backends compile "
              "(common/runtime/peaks.py).", "",
              "| Precision | Peak GFLOP/s | Kernel |", "| --- | ---: | --- |"]
    lines += [f"| {p} | {v:.0f} | {peaks.kernels.get(p, '')} |" for p, v in peaks.gflops.items()]
    lines += [f"| {p} | not measured | {why} |" for p, why in peaks.skipped.items()]
    if peaks.bandwidth_gbs and np.isfinite(peaks.bandwidth_gbs):
        lines += ["", f"Memory bandwidth (OpenVINO elementwise add over 256 MB, one read + one write): "
                      f"{peaks.bandwidth_gbs:.1f} GB/s."]
    lines += ["", "| Implementation | Variant | Precision | Network GFLOP/s | Peak used (GFLOP/s) | Efficiency |",
              "| --- | --- | --- | ---: | ---: | ---: |"]
    for r in summary.itertuples():
        precision = row_precision(r.implementation, r.variant)
        peak = peaks.of(precision)
        lines.append(f"| {r.implementation} | {r.variant or '–'} | {precision or '?'} | {number(r.network_gflops, 0)} | "
                     f"{number(peak, 0) if peak else 'n/a'} | "
                     f"{number(100 * r.network_gflops / peak, 0, '%') if peak else 'n/a'} |")
    return lines + ["", "Network GFLOP/s counts the whole network's work over the time inside the runtime's calls, "
                        "so it includes the non-convolution layers; the per-layer profile below splits that time.", ""]
