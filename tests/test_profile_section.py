"""05's per-layer profile: group shares sum to ~100% and the section names the convolutions' share and what bounds
each precision. Fails if a layer type falls out of the groups (drop OTHER from GROUPS), if convolutions are not
counted as such (CONV_TYPES without "Convolution"), or if conv_gflop miscounts (drop the `2 *`)."""
from __future__ import annotations

import re

import numpy as np
import pytest

ov = pytest.importorskip("openvino")

from common.reports.profile_section import CONV, GROUPS, conv_gflop, profile_patch, section_lines  # noqa: E402

SMALL = (1, 1, 32, 32, 32)


def _tiny_model(path):
    """conv 1->8, InstanceNorm (MVN), LeakyReLU, conv 8->8: the network's block on a small input."""
    from openvino import opset13 as ops

    rng = np.random.default_rng(0)
    x = ops.parameter(list(SMALL), ov.Type.f32)
    y = ops.convolution(x, ops.constant(rng.uniform(-1, 1, (8, 1, 3, 3, 3)).astype(np.float32)), *[[1] * 3] * 4)
    y = ops.mvn(y, ops.constant(np.array([2, 3, 4], np.int64)), True, 1e-5, "inside_sqrt")
    y = ops.prelu(y, ops.constant(np.float32(0.01)))
    y = ops.convolution(y, ops.constant(rng.uniform(-1, 1, (8, 8, 3, 3, 3)).astype(np.float32)), *[[1] * 3] * 4)
    model = ov.Model([y], [x], "tiny")
    ov.save_model(model, str(path))
    return model


def _group_shares(lines: list[str], precision: str) -> list[float]:
    row = next(line for line in lines if line.startswith(f"| {precision} | ") and "(" in line)
    return [float(v) for v in re.findall(r"([\d.]+)% \(", row)]


def test_shares_of_a_small_block_sum_to_100_and_name_the_convolutions(tmp_path, threads):
    model = _tiny_model(tmp_path / "tiny.xml")
    assert conv_gflop(model) == pytest.approx(2 * 32 ** 3 * (8 * 27 + 8 * 8 * 27) / 1e9)
    profile = profile_patch(tmp_path / "tiny.xml", "f32", threads, SMALL)
    assert set(profile.seconds) == set(GROUPS) and profile.seconds[CONV] > 0
    assert sum(profile.share(g) for g in GROUPS) == pytest.approx(1.0)
    lines = section_lines([profile])
    shares = _group_shares(lines, "f32")
    assert len(shares) == 3 and sum(shares) == pytest.approx(100, abs=0.2)
    text = "\n".join(lines)
    assert re.search(r"convolutions \d+% of the time at \d+ GFLOP/s", text)
    assert "| f32 | Convolution | convolutions | 2 |" in text and "| f32 | MVN | InstanceNorm / activation |" in text


def test_exported_model_profile_per_precision(onnx_model, threads):
    """The real network (stand-in weights) on a small input: f32, and bf16 where the CPU has it."""
    from common.runtime.peaks import Peaks

    precisions = ["f32"] + (["bf16"] if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else [])
    profiles = [profile_patch(onnx_model, p, threads, SMALL) for p in precisions]
    peaks = Peaks(threads, gflops={"f32": 100.0, "bf16": 200.0}, bandwidth_gbs=10.0)
    lines = section_lines(profiles, peaks)
    for p in profiles:
        assert sum(_group_shares(lines, p.precision)) == pytest.approx(100, abs=0.2)
        assert p.by_type.get("Convolution", [0])[0] >= 18  # the network's 3x3x3 convolutions all ran
        verdict = next(line for line in lines if line.startswith(f"- **{p.precision}: "))
        assert "-bound**" in verdict and f"% of the {p.precision} peak" in verdict and "GB/s" in verdict
