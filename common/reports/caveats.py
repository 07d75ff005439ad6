"""The caveat lines that depend on a run's weights kind (stand-in, proxy, real): each report says only its own.

The kind is the run's: the `weights_kind` column of its result rows (the newest row's), else models/model_info.json.
"""
from __future__ import annotations

import pandas as pd


def run_weights_kind(frame: pd.DataFrame | None = None) -> str:
    """The weights kind of the run whose rows `frame` holds (its newest row), else the exported model's."""
    if frame is not None and not frame.empty and "weights_kind" in frame:
        kinds = frame.sort_values("timestamp") if "timestamp" in frame else frame
        kinds = kinds.weights_kind.dropna().astype(str)
        kinds = kinds[kinds != ""]
        if len(kinds):
            return kinds.iloc[-1]
    from common.model.weights import read_model_info

    return str(read_model_info().get("weights_kind", "unknown"))


def weights_caveat(kind: str | None) -> str:
    """One line: what this run's labels and Dice figures mean, for its weights kind only."""
    if kind == "stand-in":
        return ("These are speed numbers with stand-in weights (random: every voxel near a tie); approximate rows show drift "
                "from vanilla only and no approximate variant is judged or picked; Dice vs GT reads n/a.")
    if kind == "proxy":
        return ("Proxy weights (the real architecture trained offline here): speed and drift vs vanilla are "
                "meaningful; accuracy (Dice vs GT) is the proxy's own, not TotalSegmentator's.")
    if kind == "real":
        return "Real Dataset297 weights: speed, drift vs vanilla and accuracy are TotalSegmentator's own."
    return f"Weights kind {kind or 'unknown'}: judge the labels accordingly."


def approximate_pick_line(kind: str | None) -> str:
    """How the approximate pick is made, with this run's caveat."""
    from common.variants.selection import APPROX_DICE_MIN

    return (f"Approximate-tier pick: the fastest approximate variant whose mean per-class Dice vs vanilla is >= "
            f"{APPROX_DICE_MIN} on every case of the run and that runs faster than the exact pick; a drifting row is "
            "listed with its verdict, never picked. "
            + weights_caveat(kind))
