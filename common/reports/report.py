"""Results CSVs, per-script Markdown reports and benchmarks/SUMMARY.md."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from common.core import paths
from common.core.formatting import number
from common.harness.bench import RESULT_COLUMNS
from common.pipeline.run import STAGES

IMPLEMENTATION_ORDER = ["vanilla", "onnx_baseline", "rust_onnx", "onnx_optimized", "production"]
LABELS = {"vanilla": "Vanilla PyTorch (TotalSegmentator)", "onnx_baseline": "Python-ONNX (baseline)",
          "rust_onnx": "Rust-ONNX", "onnx_optimized": "Python-ONNX (optimized)", "production": "Production"}


def write_text_atomic(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def results_path(out_dir: Path, implementation: str) -> Path:
    return Path(out_dir) / f"{implementation}_results.csv"


def write_results(rows: list[dict], path: Path) -> Path:
    frame = pd.DataFrame(rows).reindex(columns=RESULT_COLUMNS)
    return write_text_atomic(path, frame.to_csv(index=False, float_format="%.6g"))


def read_all_results(out_dir: Path = paths.BENCHMARKS_DIR) -> pd.DataFrame:
    frames = [pd.read_csv(p) for p in sorted(Path(out_dir).glob("*_results.csv")) if p.stat().st_size]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def per_case_speedup(frame: pd.DataFrame, reference: str = "vanilla") -> pd.Series:
    """Median over cases of (reference median wall / row median wall), per implementation+variant."""
    ok = frame[frame.status == "ok"]
    case_wall = ok.groupby(["implementation", "variant", "case_id"]).wall_s.median()
    if reference not in ok.implementation.values:
        return pd.Series(dtype=float)
    ref = ok[ok.implementation == reference].groupby("case_id").wall_s.median()
    ratios = {}
    for (impl, variant), walls in case_wall.groupby(level=[0, 1]):
        walls = walls.droplevel([0, 1])
        common = walls.index.intersection(ref.index)
        if len(common):
            ratios[(impl, variant)] = float(np.median(ref[common] / walls[common]))
    return pd.Series(ratios, dtype=float)


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """One line per implementation+variant: latency median/spread, stages, parity, Dice, memory."""
    frame = frame.copy()
    frame["variant"] = frame["variant"].fillna("")
    speedups = per_case_speedup(frame)
    lines = []
    for (impl, variant), group in frame.groupby(["implementation", "variant"], sort=False):
        ok = group[group.status == "ok"]
        wall = ok.wall_s
        lines.append({
            "implementation": impl, "variant": variant, "tier": group.tier.iloc[0],
            "cases": ok.case_id.nunique(), "runs": len(ok), "errors": int((group.status != "ok").sum()),
            "median_s": wall.median() if len(ok) else np.nan,
            "p25_s": wall.quantile(0.25) if len(ok) else np.nan,
            "p75_s": wall.quantile(0.75) if len(ok) else np.nan,
            **{stage: ok[stage].median() for stage in STAGES},
            "network_s": ok["network_s"].median() if "network_s" in ok and ok["network_s"].notna().any() else np.nan,
            "speedup": speedups.get((impl, variant), np.nan),
            "parity_agreement": ok.parity_agreement.mean(), "parity_agreement_min": ok.parity_agreement.min(),
            "parity_dice": ok.parity_dice.mean(),
            "parity_dice_min": ok.groupby("case_id").parity_dice.mean().min(skipna=False) if len(ok) else np.nan,
            "dice_gt_mean": ok.dice_gt_mean.mean(),
            "dice_gt_spleen": ok.dice_gt_spleen.mean(), "peak_rss_mb": ok.peak_rss_mb.median(),
            "threads": int(group.threads.iloc[0]) if group.threads.notna().any() else None,
            "weights_kind": _kind(group),
        })
    table = pd.DataFrame(lines)
    if not table.empty:
        rank = {name: i for i, name in enumerate(IMPLEMENTATION_ORDER)}
        table = table.sort_values(["implementation", "median_s"],
                                  key=lambda col: col.map(rank).fillna(99) if col.name == "implementation" else col)
    return table


def _kind(group: pd.DataFrame):
    """The weights kind of a group's rows (the last one recorded), or None."""
    if "weights_kind" not in group:
        return None
    kinds = group.weights_kind.dropna().astype(str)
    kinds = kinds[kinds != ""]
    return kinds.iloc[-1] if len(kinds) else None


def _gt(value, kind=None) -> str:
    """Dice vs ground truth, or `n/a (stand-in)`: on random weights it is a meaningless number. `kind`: the row's
    own run's weights kind where known (its `weights_kind`), else the exported model's."""
    from common.model.weights import random_weights

    stand_in = kind == "stand-in" if isinstance(kind, str) and kind else random_weights()
    return "n/a (stand-in)" if stand_in else number(value, 4)


def header_lines(title: str, frame: pd.DataFrame, environment: dict | None = None) -> list[str]:
    """Title plus the facts a reader needs before any number: weights, then the environment block, threads, data."""
    from common.model.weights import read_model_info, weights_banner
    from common.reports.environment import environment_lines

    threads = sorted({int(t) for t in frame.threads.dropna()}) if "threads" in frame else []
    cases = frame.case_id.nunique() if "case_id" in frame else 0
    return [f"# {title}", "", weights_banner(read_model_info()), "",
            *environment_lines(environment, threads[-1] if threads else None),
            f"- Threads per run: {', '.join(map(str, threads)) or '?'}",
            f"- Cases: {cases}; latency = end-to-end wall time from reading the input to the written output "
            "(median over cases and repeats; spread = 25th–75th percentile)", ""]


def key_results_table(summary: pd.DataFrame) -> list[str]:
    lines = ["| Implementation | Variant | Tier | Typical latency (s) | Spread (s) | Speedup vs vanilla | "
             "Parity vs vanilla (voxels / Dice) | Dice vs GT (mean) | Peak RSS (MB) | Cases |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for _, r in summary.iterrows():
        lines.append(
            f"| {LABELS.get(r.implementation, r.implementation)} | {r.variant or '–'} | {r.tier} | "
            f"{number(r.median_s)} | {number(r.p25_s)}–{number(r.p75_s)} | {number(r.speedup, 2, 'x')} | "
            f"{number(r.parity_agreement, 5)} / {number(r.parity_dice, 4)} | {_gt(r.dice_gt_mean, r.get('weights_kind'))} | "
            f"{number(r.peak_rss_mb, 0)} | {r.cases}{' (' + str(r.errors) + ' errors)' if r.errors else ''} |")
    return lines


def stage_table(summary: pd.DataFrame) -> list[str]:
    lines = ["| Implementation | Variant | " + " | ".join(s.replace("_s", " (s)") for s in STAGES) + " |",
             "| --- | --- |" + " ---: |" * len(STAGES)]
    for _, r in summary.iterrows():
        lines.append(f"| {r.implementation} | {r.variant or '–'} | " +
                     " | ".join(number(r[s]) for s in STAGES) + " |")
    return lines


def per_case_table(frame: pd.DataFrame) -> list[str]:
    lines = ["| Case | Implementation | Variant | Status | Wall (s) | Tiles | Peak RSS (MB) | Parity | Dice GT |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for _, r in frame.sort_values(["case_id", "implementation"]).iterrows():
        status = r.status if r.status == "ok" else f"error: {r.error}"
        lines.append(f"| {r.case_id} | {r.implementation} | {r.variant if isinstance(r.variant, str) else '–'} | "
                     f"{status} | {number(r.wall_s)} | {number(r.n_tiles, 0)} | {number(r.peak_rss_mb, 0)} | "
                     f"{number(r.parity_agreement, 5)} | {_gt(r.dice_gt_mean, r.get('weights_kind'))} |")
    return lines


def write_script_report(path: Path, title: str, frame: pd.DataFrame, environment: dict,
                        notes: list[str] = ()) -> Path:
    summary = summarize(frame)
    text = header_lines(title, frame, environment) + ["## Results", ""] + key_results_table(summary) + \
        ["", "## Stage breakdown (median seconds)", ""] + stage_table(summary) + \
        ["", "## Per case", ""] + per_case_table(frame) + ["", *notes]
    return write_text_atomic(path, "\n".join(text) + "\n")


def best_variant_lines(summary: pd.DataFrame, frame: pd.DataFrame) -> list[str]:
    """SUMMARY's best optimized variant per tier, picked by common/variants/selection.py's rule."""
    from common.variants.selection import PARITY_MIN, best_summary_rows

    picks = best_summary_rows(frame, summary)
    if not picks:
        return []
    lines = ["", "## Best optimized variants (05)", "",
             "| Tier | Variant | Typical latency (s) | Speedup vs vanilla | Parity vs vanilla (voxels / Dice) | "
             "Peak RSS (MB) |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for tier, r in picks:
        lines.append(f"| {tier} | {r.variant} | {number(r.median_s)} | {number(r.speedup, 2, 'x')} | "
                     f"{number(r.parity_agreement, 5)} / {number(r.parity_dice, 4)} | {number(r.peak_rss_mb, 0)} |")
    from common.reports.caveats import approximate_pick_line, run_weights_kind

    if not any(tier == "approximate" for tier, _ in picks):
        from common.variants.selection import NO_APPROXIMATE_PICK

        lines.append(f"| approximate | none: {NO_APPROXIMATE_PICK} | – | – | – | – |")
    lines += ["", f"Exact-tier pick: the fastest exact variant with a measured agreement >= {PARITY_MIN}. "
              + approximate_pick_line(run_weights_kind(frame)) + " Verdicts: optimized_report.md."]
    return lines


PRODUCTION_RECOMMENDATION = "production_recommendation.md"


def dataset_line(frame: pd.DataFrame) -> str:
    """`- Dataset: ...` from the case ids present in the results (and their manifest source)."""
    if frame.empty or "case_id" not in frame:
        return ""
    ids = sorted(frame.case_id.dropna().astype(str).unique())
    sources = {}
    try:
        from common.data.cases import read_manifest

        sources = {c.case_id: c.source for c in read_manifest(paths.DEFAULT_MANIFEST)}
    except Exception:  # noqa: BLE001 - no manifest: case ids alone
        pass
    by_source: dict[str, list[str]] = {}
    for case_id in ids:
        by_source.setdefault(sources.get(case_id, "unknown source"), []).append(case_id)
    parts = [f"{src}: {', '.join(v)}" for src, v in sorted(by_source.items())]
    return f"- Dataset: {len(ids)} case(s) ({'; '.join(parts)})"


def study_table(summary: pd.DataFrame, frame: pd.DataFrame) -> list[str]:
    """The original study's table shape: implementation, typical latency, mean Dice, speedup, environment."""
    lines = ["| Implementation | Typical latency (s) | Mean Dice (vs vanilla / vs ground truth) | Speedup | Environment |",
             "| --- | ---: | ---: | ---: | --- |"]
    for _, r in summary.iterrows():
        group = frame[(frame.implementation == r.implementation) & (frame.variant.fillna("") == r.variant)]
        affinity = group.affinity.dropna().astype(str).unique() if "affinity" in group else []
        cpu = group.cpu_model.dropna().astype(str).unique() if "cpu_model" in group else []
        env = f"{'Linux' if os.name == 'posix' else os.name}, {int(r.threads) if pd.notna(r.threads) else '?'} thread(s)"
        if len(affinity):
            env += f", CPUs {'; '.join(affinity[:4])}"
        if len(cpu):
            env += f", {cpu[0]}"
        name = LABELS.get(r.implementation, r.implementation) + (f" `{r.variant}`" if r.variant else "")
        lines.append(f"| {name} ({r.tier}) | {number(r.median_s)} | {number(r.parity_dice, 4)} / {_gt(r.dice_gt_mean, r.get('weights_kind'))} | "
                     f"{number(r.speedup, 2, 'x')} | {env} |")
    return lines


def case_set_frames(frame: pd.DataFrame) -> list[tuple[list[str], pd.DataFrame]]:
    """Rows grouped by the set of cases they ran successfully, each with vanilla's rows on exactly those cases
    (where vanilla ran them all), largest group first: a table never mixes case sets."""
    frame = frame.copy()
    frame["variant"] = frame["variant"].fillna("")
    ok = frame[frame.status == "ok"]
    keys = {key: frozenset(group.case_id.astype(str)) for key, group in ok.groupby(["implementation", "variant"])}
    for key, group in frame.groupby(["implementation", "variant"]):  # rows with errors only: their own set
        keys.setdefault(key, frozenset(group.case_id.astype(str)))
    by_set: dict[frozenset, list] = {}
    for key, cases in keys.items():
        by_set.setdefault(cases, []).append(key)
    vanilla_cases = frozenset(ok[ok.implementation == "vanilla"].case_id.astype(str))
    out = []
    for cases, members in sorted(by_set.items(), key=lambda kv: (-len(kv[1]), sorted(kv[0]))):
        wanted = set(members)
        if cases <= vanilla_cases:
            wanted |= {k for k in keys if k[0] == "vanilla"}
        pick = frame[[(i, v) in wanted for i, v in zip(frame.implementation, frame.variant)]]
        pick = pick[pick.case_id.astype(str).isin(cases)]
        if not pick.empty:
            out.append((sorted(cases), pick))
    return out


RUN_KEYS = ("weights_kind", "cpu_model")  # rows that differ in these come from another run


def same_run_rows(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The rows measured on vanilla's weights kind and CPU (on the newest row's where vanilla is absent), and one
    line per implementation left out: a CSV another run left in the folder is never compared with this run's."""
    keys = [k for k in RUN_KEYS if k in frame.columns]
    if frame.empty or not keys:
        return frame, []
    values = frame[keys].astype(object).fillna("").astype(str)
    vanilla = frame.implementation == "vanilla"
    if vanilla.any():
        reference = values[vanilla].iloc[-1]
    else:
        stamps = frame.timestamp.astype(str) if "timestamp" in frame.columns else None
        reference = values.loc[stamps.idxmax() if stamps is not None else frame.index[-1]]
    same = (values == reference).all(axis=1)
    left = [f"- Left out: {impl} ({', '.join(sorted(set(sub.variant.astype(str))))}), measured on "
            f"{' / '.join(str(v) for v in sub[keys].iloc[0])} by another run (this run: "
            f"{' / '.join(str(v) for v in reference)}); rerun its script to compare it."
            for impl, sub in frame[~same].groupby("implementation", sort=False)]
    return frame[same], left


def write_summary(out_dir: Path = paths.BENCHMARKS_DIR, environment: dict | None = None) -> Path:
    """benchmarks/SUMMARY.md from every *_results.csv present (and 06's recommendation, where written)."""
    frame, left_out = same_run_rows(read_all_results(out_dir))
    if not frame.empty:
        frame["variant"] = frame["variant"].fillna("")
    summary = summarize(frame) if not frame.empty else pd.DataFrame()
    text = header_lines("TotalSegmentator --fast on CPU: Key Results", frame, environment)
    dataset = dataset_line(frame)
    if dataset:
        text.insert(next(i + 1 for i, line in enumerate(text) if line.startswith("- Cases:")), dataset)
    if summary.empty:
        text.append("No results yet: run the numbered scripts (README).")
    else:
        text += ["## Key Results", "",
                 "Rows are compared only on the same cases: one table per case set (the cases each row ran "
                 "successfully), vanilla's row restricted to those cases. Speedup = median over cases of "
                 "(vanilla wall / this wall), measured in the same run setup. Parity = fraction of voxels with "
                 "vanilla's label, and mean per-class Dice vs vanilla. Exact tier = same math as vanilla (float "
                 "rounding only); approximate tier changes the math.", "", *left_out, *([""] if left_out else [])]
        for cases, sub in case_set_frames(frame):
            part = summarize(sub)
            text += [f"### Cases: {', '.join(cases)}", "", *key_results_table(part), "",
                     "Stage breakdown (median seconds):", "", *stage_table(part), "",
                     "The original study's table shape:", "", *study_table(part, sub), ""]
        text += best_variant_lines(summary, frame)
        text += ["", "Every row was measured by this checkout's scripts and read from benchmarks/*_results.csv. "
                 "Mean Dice vs vanilla = per-class Dice against vanilla's labels on the same case."]
    recommendation = Path(out_dir) / PRODUCTION_RECOMMENDATION
    if recommendation.is_file():
        text += ["", recommendation.read_text().rstrip()]
    return write_text_atomic(Path(out_dir) / "SUMMARY.md", "\n".join(text) + "\n")
