"""05's report: per-variant table with both speedups, stage breakdown with network efficiency, Pareto plot."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from common.core.formatting import number
from common.harness.bench import RESULT_COLUMNS
from common.model.weights import NUM_CLASSES, PATCH_SIZE
from common.pipeline.run import STAGES
from common.reports import efficiency_section, profile_section, report, stage_memory_report
from common.reports.caveats import run_weights_kind, weights_caveat
from common.variants.selection import APPROX_DICE_MIN, NO_APPROXIMATE_PICK, PARITY_MIN, keeps_labels

FEATURES = (32, 64, 128, 256, 320)
PLOT = "optimized_pareto.png"


def gflop_per_patch(patch: tuple[int, ...] = PATCH_SIZE, features=FEATURES, classes: int = NUM_CLASSES) -> float:
    """Multiply-adds x 2 of one forward pass of the Dataset297 PlainConvUNet (3x3x3 convs, 2 per stage,
    stride-2 transposed convs, 1x1x1 head); InstanceNorm/LeakyReLU are negligible. About 736 GFLOP."""
    voxels = [int(np.prod([p // 2 ** s for p in patch])) for s in range(len(features))]
    macs, c_in = 0, 1
    for s, c in enumerate(features):  # encoder
        macs += voxels[s] * 27 * (c_in * c + c * c)
        c_in = c
    for s in range(len(features) - 2, -1, -1):  # decoder
        c, c_up = features[s], features[s + 1]
        macs += voxels[s + 1] * 8 * c_up * c  # transposed conv, kernel 2, stride 2
        macs += voxels[s] * 27 * (2 * c * c + c * c)
    macs += voxels[0] * features[0] * classes
    return 2 * macs / 1e9


def static_notes(notes: list[str], peaks, kind: str | None = None) -> list[str]:
    """05's notes; `kind`: the run's weights kind (its caveat line only), default the exported model's."""
    kind = kind or run_weights_kind()
    lines = ["## Notes", "",
             "- Tiers: **exact** = same math as vanilla (differences from float rounding only; the non-network "
             "changes are bit-exact, tests/test_variants.py); **approximate** = changes the math (bf16, int8, "
             "fewer or larger tiles, whole-volume pass, body crop). Every approximate row shows its agreement "
             "with vanilla beside its speed.",
             f"- {weights_caveat(kind)}",
             "- Every exact row runs the ONNX model with each InstanceNormalization rewritten as the same math with "
             "short-block sums (common/model/precise_norm.py): OpenVINO's (and ORT's) one-pass float32 statistics over a "
             "1.6 M-voxel channel are off by ~1e-4 relative, torch's are not, and that was most of the drift of "
             "the ONNX rows from vanilla. `approx_ort_plain_norm` and `approx_ov_f32_onepass_norm` are the same "
             "runtimes on the unmodified model.",
             "- INT8 models are calibrated on phantoms generated for calibration only (seeds 1001, 1002), never "
             "on evaluation cases.",
             "- Whole-volume rows: `n_tiles` is the padded volume in patch equivalents; the OpenVINO model with the "
             "argmax inside it is compiled for each new input shape inside the timed run (~0.2 s; a static shape "
             "lets OpenVINO plan its buffers: 1.3 instead of 2.0 GB at 144x144x160), the last shape's released first.",
             "- EXACT_STAGES (the exact-tier pipeline stages): float16 tile accumulation and divide + argmax run in rust/'s kernels "
             "(libtotalseg_kernels.so, bit-identical labels) where built, in torch otherwise.",
             f"- Network efficiency = n_tiles x {gflop_per_patch():.0f} GFLOP per 112x112x128 patch / "
             "network seconds (time inside the runtime's calls) / the peak of the row's own precision.",
             efficiency_section.note_line(peaks),
             ""]
    return lines + list(notes)


def _load(out_dir: Path) -> pd.DataFrame:
    frames = []
    for impl in ("vanilla", "onnx_baseline", "onnx_optimized"):
        path = report.results_path(out_dir, impl)
        if path.is_file() and path.stat().st_size:
            frames.append(pd.read_csv(path))
    if not frames:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    frame = pd.concat(frames, ignore_index=True)
    frame, _ = report.same_run_rows(frame)  # a CSV another run left (other CPU or weights) is not this run's
    frame["variant"] = frame["variant"].fillna("")
    optimized_cases = frame.loc[frame.implementation == "onnx_optimized", "case_id"].unique()
    if len(optimized_cases):  # every row over the same cases, or medians compare different volumes
        frame = frame[frame.case_id.isin(optimized_cases)]
    return frame


def variant_table(frame: pd.DataFrame, peaks) -> pd.DataFrame:
    summary = report.summarize(frame)
    vs_base = report.per_case_speedup(frame, reference="onnx_baseline")
    summary["speedup_vs_baseline"] = [vs_base.get((r.implementation, r.variant), np.nan)
                                      for r in summary.itertuples()]
    ok = frame[frame.status == "ok"]
    tiles = ok.groupby(["implementation", "variant"]).n_tiles.median()
    summary["n_tiles"] = [tiles.get((r.implementation, r.variant), np.nan) for r in summary.itertuples()]
    # network_s = time inside the runtime's calls; rows without it (vanilla) fall back to their inference stage
    network = summary.network_s.fillna(summary.inference_s)
    summary["network_gflops"] = summary.n_tiles * gflop_per_patch() / network
    summary["efficiency"] = efficiency_section.row_efficiency(summary, peaks)
    summary["non_network_share"] = 1 - network / summary.median_s
    return summary


def table_lines(summary: pd.DataFrame) -> list[str]:
    lines = ["| Implementation | Variant | Tier | Median latency (s) | Spread (s) | Speedup vs vanilla | "
             "Speedup vs onnx_baseline | Parity agreement | Parity Dice | Dice vs GT | Peak RSS (MB) | Runs |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in summary.itertuples():
        lines.append(f"| {r.implementation} | {r.variant or '–'} | {r.tier} | {number(r.median_s)} | "
                     f"{number(r.p25_s)}–{number(r.p75_s)} | {number(r.speedup, 2, 'x')} | {number(r.speedup_vs_baseline, 2, 'x')} | "
                     f"{number(r.parity_agreement, 5)} | {number(r.parity_dice, 4)} | {report._gt(r.dice_gt_mean, getattr(r, 'weights_kind', None))} | "
                     f"{number(r.peak_rss_mb, 0)} | {r.runs}{' (' + str(r.errors) + ' errors)' if r.errors else ''} |")
    return lines


def stage_lines(summary: pd.DataFrame) -> list[str]:
    lines = ["| Implementation | Variant | " + " | ".join(s.replace("_s", " (s)") for s in STAGES) +
             " | of which network (s) | Non-network share | Tiles | Network GFLOP/s | Efficiency vs own-precision peak |",
             "| --- | --- |" + " ---: |" * (len(STAGES) + 5)]
    for r in summary.itertuples():
        lines.append(f"| {r.implementation} | {r.variant or '–'} | " +
                     " | ".join(number(getattr(r, s)) for s in STAGES) + f" | {number(r.network_s)}" +
                     f" | {number(100 * r.non_network_share, 0, '%')} | {number(r.n_tiles, 1)} | {number(r.network_gflops, 0)} | "
                     f"{number(100 * r.efficiency, 0, '%')} |")
    return lines + ["", "Vanilla's stages are TotalSegmentator's internal phases as `common/harness/vanilla.py` records them; "
                        "its network figures include nnU-Net's own overheads. "
                        "\"of which network\" is the time inside the runtime's calls alone (the inference stage also "
                        "holds tile extraction and the float16 accumulation); the non-network share is everything else "
                        "over the wall time."]


def best_lines(summary: pd.DataFrame, frame: pd.DataFrame) -> list[str]:
    """The best variant per tier, picked by common/variants/selection.py's rule (as SUMMARY.md and 06 pick)."""
    from common.variants.selection import best_summary_rows

    lines = []
    picks = best_summary_rows(frame, summary)
    for tier, r in picks:
        lines.append(f"- Best {tier}: `{r.variant}` {number(r.median_s)} s, {number(r.speedup, 2, 'x')} vs vanilla, "
                     f"{number(r.speedup_vs_baseline, 2, 'x')} vs onnx_baseline, agreement {number(r.parity_agreement, 5)}, "
                     f"parity Dice {number(r.parity_dice, 4)}, non-network {number(100 * r.non_network_share, 0, '%')} of "
                     f"its wall, peak RSS {number(r.peak_rss_mb, 0)} MB.")
    if picks and not any(tier == "approximate" for tier, _ in picks):
        lines.append(f"- Best approximate: none: {NO_APPROXIMATE_PICK} (verdicts below).")
    return lines


APPROX_SPEEDUP_GOAL = 25.0


def verdict_lines(summary: pd.DataFrame, frame: pd.DataFrame | None = None) -> list[str]:
    """Each approximate row's verdict under selection.py's rule (Dice vs vanilla >= APPROX_DICE_MIN on every case of
    this run: the summary's `parity_dice_min`, the lowest case's mean), never judged on random weights."""
    from common.variants.selection import per_variant, slower_than_exact, verdict

    rows = summary[(summary.tier == "approximate") & summary.median_s.notna()]
    not_faster = set() if frame is None or "implementation" not in frame else \
        slower_than_exact(per_variant(frame[frame.implementation == "onnx_optimized"]))
    if rows.empty:
        return []
    if _stand_in() if frame is None else _stand_in(frame):
        return ["## Approximate rows: verdicts", "",
                "Not judged: with stand-in weights every voxel sits near a tie, so drift says nothing about a "
                "trained network (run on the proxy or the real weights); no approximate variant is picked.", ""]
    lines = ["## Approximate rows: verdicts", "",
             f"An approximation is kept where its mean per-class Dice vs vanilla is >= {APPROX_DICE_MIN} on every case "
             "of this run (common/variants/selection.py: the lowest case's Dice is shown); only a kept row that is "
             "also faster than the exact pick can be the approximate pick. The study's goal is one that also runs >= "
             f"{APPROX_SPEEDUP_GOAL:.0f}x vanilla.", "",
             "| Variant | Speedup vs vanilla | Agreement | Dice vs vanilla (lowest case) | Verdict |",
             "| --- | ---: | ---: | ---: | --- |"]
    goal = []
    for r in rows.sort_values("median_s").itertuples():
        dice_min = getattr(r, "parity_dice_min", r.parity_dice)
        keep = keeps_labels(dice_min)
        if keep and pd.notna(r.speedup) and r.speedup >= APPROX_SPEEDUP_GOAL:
            goal.append(r.variant)
        lines.append(f"| {r.variant} | {number(r.speedup, 2, 'x')} | {number(r.parity_agreement, 5)} | "
                     f"{number(dice_min, 4)} | {verdict('approximate', None, dice_min, r.variant in not_faster)} |")
    lines += ["", f"Goal (>= {APPROX_SPEEDUP_GOAL:.0f}x with Dice vs vanilla >= {APPROX_DICE_MIN}): "
              + (f"**met** by {', '.join(goal)}." if goal else "**not met** in this run."), ""]
    return lines


def pareto_plot(summary: pd.DataFrame, path: Path, stand_in: bool = False) -> Path | None:
    """Latency (log x) vs parity agreement; the Pareto front (faster and closer) is drawn as a line."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = summary[summary.median_s.notna()].copy()
    if rows.empty:
        return None
    rows["parity_agreement"] = rows.parity_agreement.fillna(1.0)
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    colors = {"exact": "tab:blue", "approximate": "tab:orange"}
    for r in rows.itertuples():
        color = "black" if r.implementation == "vanilla" else colors.get(r.tier, "gray")
        marker = "s" if r.implementation != "onnx_optimized" else "o"
        ax.scatter(r.median_s, 1 - r.parity_agreement + 1e-6, color=color, marker=marker, s=50, zorder=3)
        label = r.variant if r.implementation == "onnx_optimized" else r.implementation
        ax.annotate(label, (r.median_s, 1 - r.parity_agreement + 1e-6), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    front, best = [], np.inf
    for r in rows.sort_values(["median_s", "parity_agreement"], ascending=[True, False]).itertuples():
        disagreement = 1 - r.parity_agreement
        if disagreement < best:
            front.append((r.median_s, disagreement + 1e-6))
            best = disagreement
    if len(front) > 1:
        ax.step(*zip(*front), where="post", color="tab:green", lw=1.5, label="Pareto front", zorder=2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axhline(1 - PARITY_MIN, color="tab:red", ls="--", lw=1, label=f"exact-tier bound (agreement {PARITY_MIN})")
    ax.set_xlabel("median end-to-end latency (s, log scale)")
    ax.set_ylabel("1 - voxel agreement with vanilla (log scale; lower is better)")
    ax.set_title("Latency vs parity (stand-in weights: drift only)" if stand_in else "Latency vs parity")
    ax.scatter([], [], color="tab:blue", label="exact tier")
    ax.scatter([], [], color="tab:orange", label="approximate tier")
    ax.scatter([], [], color="black", marker="s", label="vanilla")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _stand_in(frame: pd.DataFrame | None = None) -> bool:
    return run_weights_kind(frame) == "stand-in"


def rewrite_report(out_dir: Path, report_name: str, notes: list[str], peaks, threads: int, profiles=()) -> Path:
    """Replace the harness's generic report with 05's: both speedups, efficiency, Pareto plot."""
    from common.core.env import environment_record

    out_dir = Path(out_dir)
    frame = _load(out_dir)
    summary = variant_table(frame, peaks)
    environment = environment_record(threads)
    plot = pareto_plot(summary, out_dir / PLOT, _stand_in(frame))
    text = report.header_lines("05 Optimized Python pipeline: variants, exact and approximate", frame, environment)
    text += ["## Best variants", ""] + (best_lines(summary, frame) or ["No optimized variant finished."]) + \
        ["", "## Results", ""] + table_lines(summary) + [""] + verdict_lines(summary, frame)
    if plot:
        text += ["", f"![latency vs parity]({plot.name})", ""]
    text += ["", "## Stage breakdown (median seconds) and network efficiency", ""] + stage_lines(summary) + \
        [""] + efficiency_section.section_lines(summary, peaks) + \
        profile_section.section_lines(list(profiles), peaks) + \
        [""] + stage_memory_report.section(out_dir) + \
        ["", "## Per case", ""] + report.per_case_table(frame) + ["", *notes]
    return report.write_text_atomic(out_dir / report_name, "\n".join(text) + "\n")
