"""The Ray actor of segment mode: one long-lived worker holding one warmed-up pipeline (variant + threads).

The actor pins itself (Ray does not): it plans this node's worker CPU sets with
``common.core.topology.plan_worker_cpusets`` (L3/NUMA-aware, as the local pool) and claims
the first set whose CPUs no other actor on the node holds. A claim is an ``flock`` on one small file
per CPU (``$TMPDIR/tsbench-ray-<uid>-cpu<N>.lock``), released by the kernel when the actor's process
dies, so a replacement actor can take the set over and concurrent cohorts never share a CPU.

While the network runs on case k, a thread reads case k+1 (the driver names it: ``next_input``),
so reading and decoding the input leave the critical path.

Test hook: a pipeline factory other than the real one is named as ``"module:function"``
(``TSBENCH_RAY_PIPELINE`` in segment mode). ``function(variant_name, threads)`` returns an object with
``load(path) -> volume`` and ``run(volume, output_path | None) -> stage timings``; the tests use it
to stand in for the network where a real one would be too slow.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib
import os
import socket
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from common.core.env import THREAD_ENV
from common.core.formatting import case_error
from common.harness.workers import peak_rss_mb

REAL_PIPELINE = "totalseg_fast.engines.ray_worker:real_pipeline"


class RealPipeline:
    """The variant's pipeline split where a prefetch can take over: load | everything else + save."""

    def __init__(self, variant_name: str, threads: int):
        from common.runtime.backends import make_backend
        from common.variants.table import get_variant

        variant = get_variant(variant_name)
        self.variant = variant
        self.backend = make_backend(variant.backend, threads, **variant.backend_options)

    def load(self, path: str):
        from common.core import io
        from common.pipeline.run import load_volume_lean

        return load_volume_lean(Path(path)) if self.variant.config.lean_load else io.load_volume(path)

    def run(self, volume, output: str | None) -> dict:
        from common.core import io
        from common.pipeline.run import STAGES, StageTimer, segment_volume

        timer = StageTimer()
        result = segment_volume(volume, self.backend, self.variant.config, timer)
        if output is not None:
            with timer.stage("save_s"):
                io.save_atomic(io.label_image(result.labels, volume), output)
        timings = dict(timer.timings)
        timings["wall_s"] = sum(timings[s] for s in STAGES if s != "load_s")
        return {**timings, "n_tiles": result.n_tiles}


def real_pipeline(variant_name: str, threads: int) -> RealPipeline:
    return RealPipeline(variant_name, threads)


def load_factory(spec: str | None):
    module, _, name = (spec or REAL_PIPELINE).partition(":")
    return getattr(importlib.import_module(module), name)


def file_sha256(path: str | os.PathLike) -> tuple[str, int]:
    """(hex digest, size in bytes) of a file's content."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _lock_path(cpu: int) -> Path:
    return Path(tempfile.gettempdir()) / f"tsbench-ray-{os.getuid()}-cpu{cpu}.lock"


def claim_cpus(threads: int) -> tuple[list[int], list[int]]:
    """(CPU set, lock fds): the first of this node's planned worker sets with every CPU unclaimed."""
    from common.core.topology import format_cpu_list, plan_worker_cpusets, read_topology

    topology = read_topology()
    slots = len(topology.cpus) // threads
    if slots < 1:
        raise RuntimeError(f"{threads} threads per worker, but this node's mask has {len(topology.cpus)} CPUs")
    for cpus in plan_worker_cpusets(topology, slots, threads):
        fds = []
        for cpu in cpus:
            fd = os.open(_lock_path(cpu), os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                break
            fds.append(fd)
        if len(fds) == len(cpus):
            return cpus, fds
        for fd in fds:
            os.close(fd)
    raise RuntimeError(f"every worker CPU set of this node ({format_cpu_list(topology.cpus)}) is claimed "
                       "by other actors")


class SegmentWorker:
    """Wrapped by ``ray.remote`` in the driver (this module imports no ray)."""

    def __init__(self, variant: str, threads: int, factory: str | None = None, warmup_input: str | None = None):
        t0 = time.perf_counter()
        self.cpus, self._locks = claim_cpus(threads)
        os.sched_setaffinity(0, self.cpus)  # before the runtime starts its thread pool
        for name in THREAD_ENV:
            os.environ[name] = str(threads)
        self.threads = threads
        self.pipeline = load_factory(factory)(variant, threads)
        self.build_s = time.perf_counter() - t0
        self.warmup_s = 0.0
        if warmup_input:
            t1 = time.perf_counter()
            self.pipeline.run(self.pipeline.load(warmup_input), None)
            self.warmup_s = time.perf_counter() - t1
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._next: tuple[str, Future] | None = None
        self.node = socket.gethostname()

    def info(self) -> dict:
        import ray

        return {"pid": os.getpid(), "node": self.node, "node_ip": ray.util.get_node_ip_address(),
                "cpus": list(self.cpus), "affinity": sorted(os.sched_getaffinity(0)), "build_s": self.build_s,
                "warmup_s": self.warmup_s}

    def _load(self, path: str) -> tuple:
        start = time.perf_counter()
        volume = self.pipeline.load(path)  # first: a missing or bad file gets io's one-line reason
        sha, size = file_sha256(path)
        return volume, time.perf_counter() - start, sha, size

    def process(self, input_path: str, output_path: str, next_input: str | None = None) -> dict:
        """One case: its stage timings, CPU set and input hash; a bad input is status "error", not an exception."""
        start = time.time()
        row = {"pid": os.getpid(), "node": self.node, "cpus": list(self.cpus),
               "affinity": sorted(os.sched_getaffinity(0)), "start": start, "prefetched": False}
        pending, self._next = self._next, None
        try:
            if pending is not None and pending[0] == input_path:
                t = time.perf_counter()
                volume, load_s, sha, size = pending[1].result()
                row.update(prefetched=True, prefetch_wait_s=time.perf_counter() - t)
            else:
                volume, load_s, sha, size = self._load(input_path)
            row.update(input_sha256=sha, input_bytes=size, load_s=load_s)
        except Exception as exc:  # noqa: BLE001 - one line per bad input
            volume = None
            row.update(status="error", error=case_error(exc, input_path))
        if next_input:
            self._next = (next_input, self._pool.submit(self._load, next_input))
        if volume is not None:
            try:
                timings = self.pipeline.run(volume, output_path)
                row.update(status="ok", error="", **{k: v for k, v in timings.items() if k != "load_s"})
                row["output_bytes"] = os.path.getsize(output_path)
            except Exception as exc:  # noqa: BLE001
                row.update(status="error", error=case_error(exc, input_path))
        row["end"] = time.time()
        row["peak_rss_mb"] = peak_rss_mb()
        return row

    def close(self) -> None:
        for fd in self._locks:
            os.close(fd)
        self._locks = []
