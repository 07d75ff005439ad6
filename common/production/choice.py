"""06: which variants to measure: the fastest exact one (within the parity bound) and the fastest approximate
one of 05's results, else the fallback variant."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from common.core import paths

FALLBACK_VARIANT = "ort_default"
PARITY_MIN = 0.997


@dataclass
class VariantChoice:
    exact: str
    approximate: str | None
    note: str
    table: pd.DataFrame = field(default_factory=pd.DataFrame)  # 05's per-variant medians, if any


def _variant_medians(frame: pd.DataFrame) -> pd.DataFrame:
    ok = frame[frame.status == "ok"].copy()
    ok["variant"] = ok["variant"].fillna("")
    per_case = ok.groupby(["variant", "tier", "case_id"]).agg(wall_s=("wall_s", "median"),
                                                               parity=("parity_agreement", "median"))
    table = per_case.groupby(level=[0, 1]).agg(wall_s=("wall_s", "median"), parity=("parity", "median"),
                                               cases=("wall_s", "size"))
    return table.reset_index().sort_values("wall_s")


def choose_variants(out_dir: Path | None = None) -> VariantChoice:
    """Fastest exact variant with median parity >= 0.997 and fastest approximate one, from 05's CSV."""
    from common.variants.table import VARIANTS

    csv = Path(out_dir or paths.BENCHMARKS_DIR) / "onnx_optimized_results.csv"
    if not csv.is_file() or csv.stat().st_size == 0:
        return VariantChoice(FALLBACK_VARIANT, None,
                             f"no 05 results ({csv.name} missing): using the fallback variant {FALLBACK_VARIANT}")
    frame = pd.read_csv(csv)
    if frame.empty or not (frame.status == "ok").any():
        return VariantChoice(FALLBACK_VARIANT, None,
                             f"{csv.name} has no successful run: using the fallback variant {FALLBACK_VARIANT}")
    table = _variant_medians(frame)
    table = table[table.variant.isin(VARIANTS)]  # 05 may know variants this checkout does not
    exact = table[(table.tier == "exact") & ((table.parity >= PARITY_MIN) | table.parity.isna())]
    approx = table[table.tier == "approximate"]
    notes = []
    if exact.empty:
        best_exact = FALLBACK_VARIANT
        notes.append(f"no exact variant in {csv.name} passed parity >= {PARITY_MIN}: using {FALLBACK_VARIANT}")
    else:
        row = exact.iloc[0]
        best_exact = row.variant
        parity = "parity not measured (no vanilla output)" if pd.isna(row.parity) else f"parity {row.parity:.5f}"
        notes.append(f"best exact variant from {csv.name}: {best_exact} ({row.wall_s:.2f} s median, {parity})")
    best_approx = None if approx.empty else approx.iloc[0].variant
    if best_approx:
        notes.append(f"best approximate variant: {best_approx} ({approx.iloc[0].wall_s:.2f} s median)")
    return VariantChoice(best_exact, best_approx, "; ".join(notes), table)
