"""06 and the tool: which variants to run: the fastest exact one (agreement >= PARITY_MIN) and the fastest
approximate one whose Dice vs vanilla is >= APPROX_DICE_MIN on every case of 05's results and that runs faster
than the exact one (selection.py's rule),
else the fallback variant (exact) and no approximate one.

`VariantChoice.exact` is what runs by default; `VariantChoice.approximate` is None unless an approximation keeps
the labels, so advice built from it (`--variant NAME` for a faster run) never names a drifting row;
`approximate_note` is the one line to show for it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from common.core import paths
from common.variants.selection import (APPROX_DICE_MIN, FALLBACK_VARIANT, NO_APPROXIMATE_PICK, PARITY_MIN,
                                      best_variants, per_variant)


@dataclass
class VariantChoice:
    exact: str
    approximate: str | None
    note: str
    table: pd.DataFrame = field(default_factory=pd.DataFrame)  # 05's per-variant medians, if any
    approximate_note: str = NO_APPROXIMATE_PICK

    def row(self, name: str | None) -> pd.Series | None:
        """05's per-variant row of `name` (wall_s, parity, dice_min, cases), or None."""
        if not name or self.table.empty or name not in set(self.table.variant):
            return None
        return self.table[self.table.variant == name].iloc[0]


def choose_variants(out_dir: Path | None = None) -> VariantChoice:
    """The best exact and approximate variants of 05's CSV (common/variants/selection.py's rule), else the fallback."""
    from common.variants.table import VARIANTS

    csv = Path(out_dir or paths.BENCHMARKS_DIR) / "onnx_optimized_results.csv"
    if not csv.is_file() or csv.stat().st_size == 0:
        return VariantChoice(FALLBACK_VARIANT, None,
                             f"no 05 results ({csv.name} missing): using the fallback variant {FALLBACK_VARIANT}")
    frame = pd.read_csv(csv)
    if frame.empty or not (frame.status == "ok").any():
        return VariantChoice(FALLBACK_VARIANT, None,
                             f"{csv.name} has no successful run: using the fallback variant {FALLBACK_VARIANT}")
    table = per_variant(frame)
    table = table[table.variant.isin(VARIANTS)]  # 05 may know variants this checkout does not
    best = best_variants(table)
    notes = []
    if best["exact"] is None:
        best_exact = FALLBACK_VARIANT
        notes.append(f"no exact variant in {csv.name} has a measured parity >= {PARITY_MIN}: using {FALLBACK_VARIANT}")
    else:
        row = best["exact"]
        best_exact = row.variant
        notes.append(f"best exact variant from {csv.name}: {best_exact} ({row.wall_s:.2f} s median, "
                     f"parity {row.parity:.5f})")
    choice = VariantChoice(best_exact, None, "", table)
    row = best["approximate"]
    if row is not None:
        choice.approximate = row.variant
        choice.approximate_note = (f"fastest approximate variant keeping Dice vs vanilla >= {APPROX_DICE_MIN} on "
                                   f"every case: {row.variant} ({row.wall_s:.2f} s median, lowest case Dice "
                                   f"{row.dice_min:.4f}; --variant {row.variant})")
    else:
        choice.approximate_note += f" in {csv.name}: none recommended"
    choice.note = "; ".join(notes + [choice.approximate_note])
    return choice
