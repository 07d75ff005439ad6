"""06: which variants to measure: the fastest exact one (within the parity bound) and the fastest approximate
one of 05's results, else the fallback variant."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from common.core import paths
from common.variants.selection import FALLBACK_VARIANT, PARITY_MIN, best_variants, per_variant


@dataclass
class VariantChoice:
    exact: str
    approximate: str | None
    note: str
    table: pd.DataFrame = field(default_factory=pd.DataFrame)  # 05's per-variant medians, if any


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
    best_approx = None if best["approximate"] is None else best["approximate"].variant
    if best_approx:
        notes.append(f"best approximate variant: {best_approx} ({best['approximate'].wall_s:.2f} s median)")
    return VariantChoice(best_exact, best_approx, "; ".join(notes), table)
