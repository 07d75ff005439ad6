"""SUMMARY.md compares rows only on the same cases (issue 13: no latency column mixing case sets)."""
from __future__ import annotations

import pandas as pd

from common.reports import report


def _row(impl, variant, case, wall, status="ok"):
    return {"implementation": impl, "variant": variant, "tier": "exact", "case_id": case, "wall_s": wall,
            "status": status, "threads": 2}


def test_each_table_holds_one_case_set_with_vanilla_restricted_to_it(tmp_path):
    rows = [_row("vanilla", "totalsegmentator", "a", 100), _row("vanilla", "totalsegmentator", "b", 60),
            _row("onnx_baseline", "exact_ort_default", "a", 50), _row("onnx_baseline", "exact_ort_default", "b", 30),
            _row("onnx_optimized", "exact_ov_f32", "a", 25),
            _row("production", "exact_ov_f32 W1xT2", "c", 5)]
    frame = pd.DataFrame(rows).reindex(columns=report.RESULT_COLUMNS)
    groups = {tuple(cases): sub for cases, sub in report.case_set_frames(frame)}
    assert set(groups) == {("a", "b"), ("a",), ("c",)}
    only_a = groups[("a",)]
    assert set(only_a.case_id) == {"a"} and set(only_a.implementation) == {"vanilla", "onnx_optimized"}
    assert set(groups[("c",)].implementation) == {"production"}  # vanilla never ran c: no reference row
    summary = report.summarize(only_a)
    speedup = summary.set_index("variant").speedup
    assert speedup["exact_ov_f32"] == 4.0  # 100 / 25 on case a alone, not vanilla's median over a and b

    frame.to_csv(tmp_path / "x_results.csv", index=False)
    text = report.write_summary(tmp_path).read_text()
    assert text.count("### Cases:") == 3 and "### Cases: a, b" in text and "### Cases: c" in text


def test_approximate_verdicts_follow_dice_vs_vanilla_and_never_judge_random_weights(monkeypatch):
    from common.reports import optimized_report

    summary = pd.DataFrame([
        {"variant": "whole", "tier": "approximate", "median_s": 4.0, "speedup": 33.8, "parity_agreement": 0.985,
         "parity_dice": 0.67},
        {"variant": "tiles_bf16", "tier": "approximate", "median_s": 15.0, "speedup": 8.6, "parity_agreement": 0.9996,
         "parity_dice": 0.991},
        {"variant": "exact", "tier": "exact", "median_s": 29.0, "speedup": 4.6, "parity_agreement": 1.0,
         "parity_dice": 1.0}])
    monkeypatch.setattr(optimized_report, "_stand_in", lambda: False)
    text = "\n".join(optimized_report.verdict_lines(summary))
    assert "| whole | 33.80x | 0.98500 | 0.6700 | drifts" in text and "| tiles_bf16 | 8.60x" in text
    assert "kept (Dice >= 0.99)" in text and "**not met**" in text and "| exact |" not in text
    summary.loc[0, "parity_dice"] = 0.995
    assert "**met** by whole" in "\n".join(optimized_report.verdict_lines(summary))
    monkeypatch.setattr(optimized_report, "_stand_in", lambda: True)
    assert "Not judged" in "\n".join(optimized_report.verdict_lines(summary))


def test_rows_of_another_run_are_left_out_with_a_line(tmp_path):
    """A CSV left by an older run (other weights kind or CPU) is never compared with this run's vanilla (fails if
    `same_run_rows` keeps every row: the stale baseline's 95 s would get a speed-up and a table row)."""
    def run(row, weights, cpu):
        return {**row, "weights_kind": weights, "cpu_model": cpu, "timestamp": "2026-12-01T23:00:00"}

    rows = [run(_row("vanilla", "totalsegmentator", "a", 100), "proxy", "AMD EPYC"),
            run(_row("onnx_optimized", "exact_ov_f32", "a", 25), "proxy", "AMD EPYC"),
            run(_row("onnx_baseline", "exact_ort_default", "a", 95), "stand-in", "Intel(R) Xeon(R) Processor")]
    frame = pd.DataFrame(rows).reindex(columns=report.RESULT_COLUMNS)
    kept, left = report.same_run_rows(frame)
    assert set(kept.implementation) == {"vanilla", "onnx_optimized"}
    assert len(left) == 1 and "onnx_baseline" in left[0] and "stand-in" in left[0] and "AMD EPYC" in left[0]
    frame.to_csv(tmp_path / "x_results.csv", index=False)
    text = report.write_summary(tmp_path).read_text()
    assert "exact_ort_default" not in text.split("- Left out")[0].split("## Key Results")[1]
    assert "- Left out: onnx_baseline" in text and "| exact_ov_f32 |" in text.replace("`", "")
