"""The one rule for "the best exact and the best approximate variant", and the parity bound it uses.

SUMMARY.md (reports/report.py), 05's report (reports/optimized_report.py), 06 and segment mode
(production/choice.py) all pick through `best_variants`, so they name the same winners:

- per variant: latency = median over cases of each case's median wall time; parity = mean over cases of
  each case's mean voxel agreement with vanilla (successful runs only);
- exact tier: only variants whose parity was measured and is >= PARITY_MIN (a variant whose parity was never
  measured has not shown that it keeps vanilla's labels);
- approximate tier: only variants whose mean per-class Dice vs vanilla (the `parity_dice` column) was measured on
  every case of the run and is >= APPROX_DICE_MIN on each (`dice_min`, the worst case's mean over its repeats): a
  drifting row is listed with its verdict, never called best or recommended; and faster than the exact pick,
  where there is one (an approximation that is no faster than the exact labels buys nothing: on the proxy the
  one-pass-norm row keeps Dice 0.998 yet ran slower than the exact pick, and was named the approximate pick);
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
# What every report and the tool say when no approximate row passes the rule.
NO_APPROXIMATE_PICK = (f"no approximate row kept Dice vs vanilla >= {APPROX_DICE_MIN} on every case and ran faster "
                       "than the exact pick")
NOT_FASTER = "no faster than the exact pick: not picked"


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


def verdict(tier: str, parity, dice_min, not_faster: bool = False) -> str:
    """One row's verdict under the rule above: 'kept' (eligible to be picked) or why not; `not_faster`: an
    approximate row no faster than the exact pick (`slower_than_exact`)."""
    if tier == "exact":
        return "kept (agreement >= %s)" % PARITY_MIN if keeps_parity(parity) else "fails the exact bound"
    if dice_min is None or pd.isna(dice_min):
        return "not judged (Dice vs vanilla not measured on every case)"
    if not keeps_labels(dice_min):
        return f"drifts (Dice < {APPROX_DICE_MIN}) on a case: never picked"
    return f"kept (Dice >= {APPROX_DICE_MIN}) on every case" + (f", but {NOT_FASTER}" if not_faster else "")


def slower_than_exact(table: pd.DataFrame) -> set[str]:
    """Approximate variants of a `per_variant` table that are no faster than its exact pick (none without one)."""
    exact = _best_of(table, "exact")
    if exact is None:
        return set()
    approximate = table[table.tier == "approximate"]
    return set(approximate.variant[approximate.wall_s >= exact.wall_s])


def _best_of(rows: pd.DataFrame, tier: str) -> pd.Series | None:
    candidates = rows[rows.tier == tier]
    passes = candidates.parity.map(keeps_parity) if tier == "exact" else candidates.dice_min.map(keeps_labels)
    candidates = candidates[passes.astype(bool)]
    return None if candidates.empty else candidates.sort_values(["wall_s", "variant"]).iloc[0]


def best_variants(table: pd.DataFrame, known=None) -> dict[str, pd.Series | None]:
    """{"exact": row or None, "approximate": row or None} of a `per_variant` table; `known`: only these names."""
    rows = table if known is None else table[table.variant.isin(list(known))]
    exact = _best_of(rows, "exact")
    faster = rows if exact is None else rows[(rows.tier != "approximate") | (rows.wall_s < exact.wall_s)]
    return {"exact": exact, "approximate": _best_of(faster, "approximate")}


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
