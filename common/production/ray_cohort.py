"""One measured cohort on Ray: what 06's throughput sweep and its engines section run.

The home-made process pool is gone: on this machine Ray's actors came within 3 % of its throughput (README,
"Cohorts on Ray"), so 06 measures W x T on the engine users run cohorts with. Each worker is a long-lived,
self-pinning actor (``ray_worker.SegmentWorker``); its row carries its CPU set, affinity and peak RSS.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@contextmanager
def embedded_ray(num_cpus: int | None = None) -> Iterator:
    """An embedded local Ray instance (loopback only) for the duration of the block; yields its Connection."""
    from totalseg_fast.engines import ray_cluster

    connection = ray_cluster.connect(None, num_cpus=num_cpus)
    try:
        yield connection
    finally:
        ray_cluster.shutdown(connection)


@dataclass
class CohortRun:
    rows: list[dict]  # ray_engine's result rows, plus "case_id"
    wall_s: float  # the whole call: actors' start, pipeline build and warm-up included

    @property
    def ok(self) -> list[dict]:
        return [r for r in self.rows if r.get("status") == "ok"]

    @property
    def steady_s(self) -> float:
        """First case start to last case end, over the cases that finished."""
        ok = self.ok
        return (max(r["end"] for r in ok) - min(r["start"] for r in ok)) if ok else float("nan")


def run_measured(items: list[tuple[str, str, str]], variant: str, workers: int, threads: int, memory_mb: float,
                 warmup: bool = True, prefetch: bool = True) -> CohortRun:
    """Run (case_id, input, output) items on ``workers`` actors of the connected Ray instance.

    ray_cluster.ClusterError if fewer than ``workers`` actors fit (a measurement of W must run W workers).
    """
    from totalseg_fast.engines import ray_cluster
    from totalseg_fast.engines.ray_engine import EngineSettings, Job, run_cohort

    fit, notes = ray_cluster.plan_workers(workers, threads, memory_mb)
    if fit < workers:
        raise ray_cluster.ClusterError("; ".join(notes))
    settings = EngineSettings(variant=variant, workers=workers, threads=threads, memory_mb=memory_mb,
                              warmup_input=items[0][1] if warmup else None, prefetch=prefetch)
    case_of = {output: case_id for case_id, _, output in items}
    start = time.time()
    rows = run_cohort([Job(image, output) for _, image, output in items], settings, Path(items[0][2]).parent,
                      lambda row: None, log=lambda message: None)
    wall = time.time() - start
    return CohortRun([{**row, "case_id": case_of.get(row["output"])} for row in rows], wall)
