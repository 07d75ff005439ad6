"""One rule picks the best exact and approximate variants (common/variants/selection.py): SUMMARY.md, 05's
report and 06 (segment mode too) name the same winners from the same 05 results."""
from __future__ import annotations

import numpy as np
import pandas as pd

from common.variants.selection import PARITY_MIN, best_variants, per_variant


def _frame():
    rows = []
    # unmeasured: fastest exact, parity never measured; drifts: fast but below the bound on one case only
    # (mean over cases below, median of cases above: the rule is the mean); kept: the exact winner
    spec = {"unmeasured": ("exact", 1.0, [np.nan, np.nan]), "drifts": ("exact", 1.5, [1.0, 0.9997]),
            "kept": ("exact", 2.0, [0.99999, 0.99992]), "slow_kept": ("exact", 3.0, [1.0, 1.0]),
            "approx_fast": ("approximate", 0.5, [0.5, 0.6]), "approx_slow": ("approximate", 0.8, [0.9, 0.9]),
            # approximate: Dice vs vanilla = the parity column here; approx_kept keeps >= 0.99 on both cases
            "approx_kept": ("approximate", 0.9, [0.995, 0.991]), "approx_slower_kept": ("approximate", 1.2, [1.0, 1.0])}
    for variant, (tier, wall, parities) in spec.items():
        for case_id, parity in zip(("a", "b"), parities):
            for repeat, jitter in enumerate((0.0, 0.01)):
                rows.append({"implementation": "onnx_optimized", "variant": variant, "tier": tier, "case_id": case_id,
                             "repeat": repeat, "status": "ok", "error": "", "wall_s": wall + jitter,
                             "parity_agreement": parity, "parity_dice": parity})
    rows.append({"implementation": "onnx_optimized", "variant": "broken", "tier": "exact", "case_id": "a",
                 "repeat": 0, "status": "error", "error": "RuntimeError: x", "wall_s": np.nan})
    return pd.DataFrame(rows)


def test_one_rule():
    best = best_variants(per_variant(_frame()))
    assert best["exact"].variant == "kept" and best["approximate"].variant == "approx_kept"
    assert PARITY_MIN == 0.9999


def test_reports_and_06_name_the_same_winners(tmp_path, monkeypatch):
    from common.variants.choice import choose_variants
    from common.reports import optimized_report, report
    from common.variants import table

    frame = _frame()
    for name in frame.variant.unique():
        tier = frame[frame.variant == name].tier.iloc[0]
        monkeypatch.setitem(table.VARIANTS, name, table.Variant(name, tier, "onnxruntime", "test"))
    from common.harness.bench import RESULT_COLUMNS

    frame = frame.reindex(columns=RESULT_COLUMNS)
    frame.to_csv(tmp_path / "onnx_optimized_results.csv", index=False)
    choice = choose_variants(tmp_path)
    assert (choice.exact, choice.approximate) == ("kept", "approx_kept")
    summary = report.summarize(frame)
    summary_lines = "\n".join(report.best_variant_lines(summary, frame))
    assert "| exact | kept |" in summary_lines and "| approximate | approx_kept |" in summary_lines
    summary["speedup_vs_baseline"] = summary["non_network_share"] = np.nan
    best = optimized_report.best_lines(summary, frame)
    assert [line.split("`")[1] for line in best] == ["kept", "approx_kept"]
