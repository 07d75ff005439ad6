"""Every report starts (after its weights lines) with the one environment block, whose flags are this machine's
(issue 13). Fails if a writer drops the block (e.g. header_lines without `*environment_lines(...)`) or if
key_flags reads the wrong line of /proc/cpuinfo (e.g. `"flags"` -> `"bugs"` in env.cpu_flags)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from common.core import paths
from common.reports.environment import HEADING


def _real_flags() -> dict[str, bool]:
    text = Path("/proc/cpuinfo").read_text()
    flags = next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split()
    return {f: f in flags for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni")}


def check_block(text: str) -> None:
    lines = text.splitlines()
    weights = next(i for i, line in enumerate(lines) if "**Weights:" in line)
    heading = lines.index(HEADING)
    first_section = next(i for i, line in enumerate(lines) if line.startswith("## "))
    assert weights < heading == first_section, "the environment block must be the first section, after the weights"
    assert text.count(HEADING) == 1
    flag_line = next(line for line in lines[heading:] if line.startswith("- CPU flags:"))
    for flag, present in _real_flags().items():
        assert f"{flag} {'present' if present else 'absent'}" in flag_line
    block = "\n".join(lines[heading:heading + 8])
    for needle in ("- Run: 20", "CPUs online", "in the affinity mask", "L3 ", "RAM ", "python ", "torch ",
                   "onnxruntime ", "openvino ", "numpy "):
        assert needle in block, needle


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="needs Linux /proc/cpuinfo")
def test_summary_and_script_reports_carry_the_block(tmp_path):
    from common.core.env import environment_record
    from common.reports import report

    check_block(report.write_summary(tmp_path).read_text())  # no results yet: the block is still there
    frame = pd.DataFrame([{"implementation": "onnx_baseline", "variant": "exact_ort_default", "tier": "exact",
                           "case_id": "a", "wall_s": 3.0, "status": "ok", "threads": 2}]
                         ).reindex(columns=report.RESULT_COLUMNS)
    path = report.write_script_report(tmp_path / "onnx_report.md", "04", frame, environment_record(2))
    check_block(path.read_text())


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="needs Linux /proc/cpuinfo")
def test_production_and_proxy_reports_carry_the_block(tmp_path):
    from common.core.env import environment_record
    from common.variants.choice import VariantChoice
    from common.production.report import write_report
    from common.production.sweeps import Settings
    from common.core.topology import read_topology
    from tools import proxy_report

    settings = Settings(variants=["exact_ov_f32"], tiers={"exact_ov_f32": "exact"}, cases=[], thread_counts=[1],
                        combos=[])
    path = write_report(tmp_path / "production_report.md", topology=read_topology(), env=environment_record(1),
                        settings=settings, choice=VariantChoice("exact_ov_f32", None, "fallback"),
                        latency=pd.DataFrame(), throughput=pd.DataFrame(), cold=pd.DataFrame(), rec=None, plots={},
                        elapsed_s=1.0)
    check_block(path.read_text())
    out = tmp_path / "proxy_report.md"
    proxy_report.write_report(out, "models/proxy", None, [], [], {}, 1.0, environment_record(1))
    check_block(out.read_text())


def test_no_writer_formats_the_environment_itself():
    """The heading lives in one module; the old `key: value` dumps of the record are gone."""
    sources = [p for folder in ("common", "tools") for p in (paths.REPO_ROOT / folder).rglob("*.py")]
    sources += list(paths.REPO_ROOT.glob("0*.py"))
    owners = [p.name for p in sources if '"## Environment"' in p.read_text()]
    assert owners == ["environment.py"]
    dumps = [p.name for p in sources if "environment.items()" in p.read_text() or "env.items()" in p.read_text()]
    assert dumps == []


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="needs Linux /proc/cpuinfo")
def test_export_report_carries_the_block(tmp_path):
    import importlib
    from types import SimpleNamespace

    script = importlib.import_module("02_export_model")
    info = SimpleNamespace(weights_kind="stand-in", checkpoint_sha256="0" * 64, onnx_path="models/x.onnx",
                           onnx_sha256="1" * 64, architecture={"opset": 17, "network": "PlainConvUNet",
                                                               "features": [32], "patch_zyx": [112, 112, 128],
                                                               "classes": 118, "parameters": 1e6, "threads": 1})
    check = SimpleNamespace(source="test", max_abs_diff=0.0, argmax_agreement=1.0, top2_margin_of_flips=None)
    script.write_report(tmp_path / "export_report.md", info, check, None)
    check_block((tmp_path / "export_report.md").read_text())
