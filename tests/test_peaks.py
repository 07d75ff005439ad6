"""05's efficiency compares each row with its own precision's peak (issue 13: bf16 rows read 193-231% against
the float32 peak). Fails if row_precision lets the OpenVINO hint win over `model: int8` (swap its two ifs), if
row_efficiency divides by peaks.of("f32"), or if measure_peaks skips a precision this CPU has."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from common.reports.efficiency_section import row_efficiency, row_precision, section_lines
from common.runtime.peaks import Peaks


def test_each_row_gets_its_variants_precision():
    assert row_precision("vanilla", "totalsegmentator") == "f32"
    assert row_precision("onnx_baseline", "exact_ort_default") == "f32"
    assert row_precision("onnx_optimized", "exact_ov_f32") == "f32"
    assert row_precision("onnx_optimized", "approx_ov_bf16_whole") == "bf16"
    assert row_precision("onnx_optimized", "approx_ov_int8") == "int8"  # bf16 hint, int8 model: int8 convolutions
    assert row_precision("onnx_optimized", "approx_ort_int8") == "int8"
    assert row_precision("production", "approx_ov_bf16 W1xT2") == "bf16"
    assert row_precision("onnx_optimized", "ov_bf16_fast") == "bf16"  # old name
    assert row_precision("onnx_optimized", "no_such_variant") is None


def test_efficiency_uses_the_rows_own_peak():
    peaks = Peaks(threads=2, gflops={"f32": 150.0, "bf16": 400.0})
    summary = pd.DataFrame([
        {"implementation": "onnx_optimized", "variant": "exact_ov_f32", "network_gflops": 120.0},
        {"implementation": "onnx_optimized", "variant": "approx_ov_bf16", "network_gflops": 300.0},
        {"implementation": "onnx_optimized", "variant": "approx_ov_int8", "network_gflops": 300.0},
    ])
    eff = row_efficiency(summary, peaks)
    assert eff[0] == pytest.approx(0.8) and eff[1] == pytest.approx(0.75)
    assert math.isnan(eff[2])  # no int8 peak measured: no ratio against another precision's peak
    text = "\n".join(section_lines(summary, peaks))
    assert "| bf16 | 400 |" in text and "| onnx_optimized | approx_ov_bf16 | bf16 | 300 | 400 | 75% |" in text
    assert row_efficiency(summary, None).isna().all()


def test_peaks_measured_for_every_precision_this_cpu_has():
    pytest.importorskip("openvino")
    from common.core.env import key_flags
    from common.runtime.peaks import measure_peaks

    flags = key_flags()
    peaks = measure_peaks(threads=1)
    assert peaks.gflops["f32"] > 1
    if flags["avx512_bf16"] or flags["amx_bf16"]:
        assert "bf16" in peaks.gflops and "bf16" not in peaks.skipped
        assert peaks.gflops["bf16"] > 1.2 * peaks.gflops["f32"]  # bf16 dot products: twice the f32 FMA rate or more
    if flags["avx512_vnni"] or flags["amx_int8"]:
        assert "int8" in peaks.gflops and "I8" in peaks.kernels["int8"].upper()  # a real int8 kernel ran
    assert set(peaks.gflops) | set(peaks.skipped) == {"f32", "bf16", "int8"}
    assert peaks.bandwidth_gbs > 0.1


def test_precisions_the_cpu_lacks_are_skipped_with_their_reason():
    """An AVX2-only CPU gets no bf16/int8 peak (emulated kernels are not its peak); an AMX one gets both."""
    from common.runtime.peaks import unavailable

    class Core:
        def __init__(self, caps):
            self.caps = caps

        def get_property(self, device, name):
            return self.caps

    none = dict.fromkeys(("avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni"), False)
    assert set(unavailable(Core(["FP32", "BF16", "INT8"]), none)) == {"bf16", "int8"}
    amx = {**none, "avx512f": True, "amx_bf16": True, "amx_int8": True}
    assert unavailable(Core(["FP32", "BF16", "INT8"]), amx) == {}
    assert set(unavailable(Core(["FP32", "INT8"]), amx)) == {"bf16"}
