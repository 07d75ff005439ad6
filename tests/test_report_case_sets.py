"""SUMMARY.md compares rows only on the same cases (issue 13: no latency column mixing case sets)."""
from __future__ import annotations

import pandas as pd

from common.reports import report


def _row(impl, variant, case, wall, status="ok"):
    return {"implementation": impl, "variant": variant, "tier": "exact", "case_id": case, "wall_s": wall,
            "status": status, "threads": 2}


def test_each_table_holds_one_case_set_with_vanilla_restricted_to_it(tmp_path):
    rows = [_row("vanilla", "totalsegmentator", "a", 100), _row("vanilla", "totalsegmentator", "b", 60),
            _row("onnx_baseline", "ort_default", "a", 50), _row("onnx_baseline", "ort_default", "b", 30),
            _row("onnx_optimized", "ov_f32_exact", "a", 25),
            _row("production", "ov_f32_exact W1xT2", "c", 5)]
    frame = pd.DataFrame(rows).reindex(columns=report.RESULT_COLUMNS)
    groups = {tuple(cases): sub for cases, sub in report.case_set_frames(frame)}
    assert set(groups) == {("a", "b"), ("a",), ("c",)}
    only_a = groups[("a",)]
    assert set(only_a.case_id) == {"a"} and set(only_a.implementation) == {"vanilla", "onnx_optimized"}
    assert set(groups[("c",)].implementation) == {"production"}  # vanilla never ran c: no reference row
    summary = report.summarize(only_a)
    speedup = summary.set_index("variant").speedup
    assert speedup["ov_f32_exact"] == 4.0  # 100 / 25 on case a alone, not vanilla's median over a and b

    frame.to_csv(tmp_path / "x_results.csv", index=False)
    text = report.write_summary(tmp_path).read_text()
    assert text.count("### Cases:") == 3 and "### Cases: a, b" in text and "### Cases: c" in text
