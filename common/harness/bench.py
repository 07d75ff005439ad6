"""The timing harness: warm-up, repeats, implementations interleaved case by case, scoring, CSV rows.

A runner is `run(input_path, output_path) -> dict` (stage seconds, n_tiles); the harness measures
the wall time around it, the peak memory of the run's own process tree (the runner's worker by its pid, else
this process and the children it starts during the run: never another runner's worker), and scores the written
labels.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from common.core import metrics, paths
from common.core.formatting import one_line
from common.core.memory import PeakMemory
from common.pipeline.run import STAGES

SPLEEN = 1
RESULT_COLUMNS = ["implementation", "variant", "tier", "case_id", "repeat", "status", "error", "wall_s",
                  *STAGES, "network_s", "n_tiles", "peak_rss_mb", "threads", "affinity", "weights_kind", "parity_agreement",
                  "parity_dice", "dice_gt_spleen", "dice_gt_mean", "cpu_model", "timestamp"]


@dataclass
class Runner:
    implementation: str  # e.g. vanilla, onnx_baseline, onnx_optimized, rust_onnx
    variant: str
    tier: str  # exact | approximate
    run: Callable[[Path, Path], dict]
    # The runner's worker process, whose tree alone is its peak memory (None: this process and its children).
    memory_pid: Callable[[], int] | None = None
    close: Callable[[], None] | None = None

    def output_path(self, out_dir: Path, case_id: str) -> Path:
        if self.implementation == "vanilla":
            return vanilla_output(out_dir, case_id)
        return out_dir / "outputs" / self.implementation / self.variant / f"{case_id}.nii.gz"


def failed_runner(implementation: str, variant: str, tier: str, reason: str) -> Runner:
    """A runner that could not be built (its worker failed to start): each of its runs is an error row with
    `reason`, so the other runners still run and the exit code says one failed."""
    def run(input_path: Path, output_path: Path | None) -> dict:
        raise RuntimeError(reason)

    return Runner(implementation, variant, tier, run)


def vanilla_output(out_dir: Path, case_id: str) -> Path:
    return out_dir / "outputs" / "vanilla" / f"{case_id}.nii.gz"


def read_labels(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj).astype(np.uint8)


def score(case, output: Path, out_dir: Path, is_reference: bool) -> dict:
    """Parity vs vanilla's saved output and Dice vs the case's ground truth (where each exists)."""
    labels = read_labels(output)
    row = {}
    reference = vanilla_output(out_dir, case.case_id)
    if is_reference:
        row.update(parity_agreement=1.0, parity_dice=1.0)
    elif reference.is_file():
        vanilla = read_labels(reference)
        row["parity_agreement"] = metrics.voxel_agreement(labels, vanilla)
        row["parity_dice"] = metrics.mean_dice(labels, vanilla)
    if case.label is not None and case.label_map:
        gt = np.asanyarray(nib.load(str(case.label)).dataobj)
        per_class = metrics.ground_truth_dice(labels, gt, case.label_map)
        if per_class:
            row["dice_gt_mean"] = float(np.mean(list(per_class.values())))
            row["dice_gt_spleen"] = per_class.get(SPLEEN)
    return row


def run_benchmark(runners: list[Runner], cases: list, *, repeats: int = 1, warmup: int = 0, threads: int,
                  environment: dict, out_dir: Path = paths.BENCHMARKS_DIR,
                  on_rows: Callable[[list[dict]], None] | None = None, progress: bool = True) -> list[dict]:
    """Run every runner on every case (A B A B per case and repeat) and return one row per run."""
    from tqdm import tqdm

    base = {"threads": threads, "affinity": environment.get("affinity", ""),
            "weights_kind": environment.get("weights_kind", ""), "cpu_model": environment.get("cpu_model", "")}
    rows: list[dict] = []
    if warmup and cases:
        for runner in tqdm(runners * warmup, desc="warm-up", disable=not progress, leave=False):
            try:
                runner.run(cases[0].image, None)
            except Exception:
                pass  # a broken first case shows up as an error row below
    total = len(cases) * repeats * len(runners)
    with tqdm(total=total, desc="benchmark", unit="run", disable=not progress) as bar:
        for case in cases:
            for repeat in range(repeats):
                for runner in runners:
                    bar.set_postfix_str(f"{runner.variant or runner.implementation} {case.case_id}")
                    rows.append(_run_one(runner, case, repeat, out_dir, base))
                    bar.update()
                    if on_rows:
                        on_rows(rows)
    return rows


def _run_one(runner: Runner, case, repeat: int, out_dir: Path, base: dict) -> dict:
    row = {**base, "implementation": runner.implementation, "variant": runner.variant, "tier": runner.tier,
           "case_id": case.case_id, "repeat": repeat, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}
    output = runner.output_path(out_dir, case.case_id)
    try:
        pid = runner.memory_pid() if runner.memory_pid else None
        with PeakMemory(pid=pid) as peak:
            start = time.perf_counter()
            timings = runner.run(case.image, output)
            wall = time.perf_counter() - start
        row.update({k: v for k, v in timings.items() if k in RESULT_COLUMNS})
        row.update(status="ok", error="", wall_s=wall, peak_rss_mb=round(peak.mb, 1))
        row.update(score(case, output, out_dir, is_reference=runner.implementation == "vanilla"))
    except Exception as exc:
        row.update(status="error", error=one_line(exc))
    return row


def any_failed(rows: list[dict]) -> bool:
    return any(r.get("status") != "ok" for r in rows)
