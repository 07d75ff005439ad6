"""The one rule for "the best exact and the best approximate variant", and the parity bound it uses.

SUMMARY.md (reports/report.py), 05's report (reports/optimized_report.py), 06 and segment mode
(production/choice.py) all pick through `best_variants`, so they name the same winners:

- per variant: latency = median over cases of each case's median wall time; parity = mean over cases of
  each case's mean voxel agreement with vanilla (successful runs only);
- exact tier: only variants whose parity was measured and is >= PARITY_MIN (a variant whose parity was never
  measured has not shown that it keeps vanilla's labels);
- approximate tier: only variants whose mean per-class Dice vs vanilla (the `parity_dice` column) was measured on
  every case of the run and is >= APPROX_DICE_MIN on each (`dice_min`, the worst case's mean over its repeats): a
  drifting row is listed with its verdict, never called best or recommended;
- the fastest of each tier wins (ties: the variant name), or none.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

# The exact tier's bound, here and in the tests (tests/parity_bounds.py): voxel agreement with vanilla. Every exact
# row runs the precise-norm model (backends.EXACT_MODEL) and measured 0.99998-1.0 (stand-in and proxy weights, real
# and generated CTs); the plain export's 0.994-0.997 stays below it.
PARITY_MIN = 0.9999
FALLBACK_VARIANT = "exact_ort_default"  # what 06 and segment mode run when no variant passes (ONNX Runtime, default session)
TIERS = ("exact", "approximate")
# The approximate tier's bound (issue 23): mean per-class Dice vs vanilla on EVERY case of the run.
APPROX_DICE_MIN = 0.99


def per_variant(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per variant and tier of `frame`'s successful runs: variant, tier, wall_s, parity, dice_min, cases
    (dice_min: the lowest per-case mean Dice vs vanilla; NaN where any case's Dice was not measured)."""
    columns = ["variant", "tier", "wall_s", "parity", "dice_min", "cases"]
    ok = frame[frame.status == "ok"].copy() if "status" in frame else frame.iloc[0:0]
    if ok.empty:
        return pd.DataFrame(columns=columns)
    ok["variant"] = ok["variant"].fillna("")
    if "parity_agreement" not in ok:
        ok["parity_agreement"] = np.nan
    if "parity_dice" not in ok:
        ok["parity_dice"] = np.nan
    per_case = ok.groupby(["variant", "tier", "case_id"]).agg(wall_s=("wall_s", "median"),
                                                               parity=("parity_agreement", "mean"),
                                                               dice=("parity_dice", "mean"))
    table = per_case.groupby(level=[0, 1]).agg(wall_s=("wall_s", "median"), parity=("parity", "mean"),
                                               dice_min=("dice", lambda d: d.min(skipna=False)),
                                               cases=("wall_s", "size"))
    return table.reset_index().sort_values(["wall_s", "variant"])[columns]


def keeps_parity(parity) -> bool:
    """The exact-tier bound: measured, and at least PARITY_MIN."""
    return parity is not None and not pd.isna(parity) and float(parity) >= PARITY_MIN


def keeps_labels(dice_min) -> bool:
    """The approximate-tier bound: Dice vs vanilla measured on every case, and at least APPROX_DICE_MIN on each."""
    return dice_min is not None and not pd.isna(dice_min) and float(dice_min) >= APPROX_DICE_MIN


def verdict(tier: str, parity, dice_min) -> str:
    """One row's verdict under the rule above: 'kept' (eligible to be picked) or why not."""
    if tier == "exact":
        return "kept (agreement >= %s)" % PARITY_MIN if keeps_parity(parity) else "fails the exact bound"
    if dice_min is None or pd.isna(dice_min):
        return "not judged (Dice vs vanilla not measured on every case)"
    return f"kept (Dice >= {APPROX_DICE_MIN}) on every case" if keeps_labels(dice_min) else \
        f"drifts (Dice < {APPROX_DICE_MIN}) on a case: never picked"


def best_variants(table: pd.DataFrame, known=None) -> dict[str, pd.Series | None]:
    """{"exact": row or None, "approximate": row or None} of a `per_variant` table; `known`: only these names."""
    rows = table if known is None else table[table.variant.isin(list(known))]
    best: dict[str, pd.Series | None] = {}
    for tier in TIERS:
        candidates = rows[rows.tier == tier]
        if tier == "exact":
            candidates = candidates[candidates.parity.map(keeps_parity).astype(bool)]
        else:
            candidates = candidates[candidates.dice_min.map(keeps_labels).astype(bool)]
        best[tier] = None if candidates.empty else candidates.sort_values(["wall_s", "variant"]).iloc[0]
    return best


def best_summary_rows(frame: pd.DataFrame, summary: pd.DataFrame,
                      implementation: str = "onnx_optimized") -> list[tuple[str, pd.Series]]:
    """[(tier, summary row)] of `implementation`'s best variants in `frame` (the reports' display rows)."""
    if frame.empty or "implementation" not in frame or summary.empty:
        return []
    best = best_variants(per_variant(frame[frame.implementation == implementation]))
    picks = []
    for tier, row in best.items():
        match = summary[(summary.implementation == implementation) & (summary.variant == row.variant)] \
            if row is not None else summary.iloc[0:0]
        if not match.empty:
            picks.append((tier, match.iloc[0]))
    return picks
