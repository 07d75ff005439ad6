"""A variant in its own worker process (common/harness/variant_worker.py), on a small generated CT:

- the same labels as the in-process runner, with stage timings and n_tiles, and the row's peak memory
  is the worker's (the benchmark process does not hold the session);
- a worker killed between runs or mid-run is one error row ("died"), then a fresh worker serves;
- a bad input is a one-line error and the same worker serves the next case;
- the runner stops its worker after each run: idle variants hold no memory;
- a backend the worker cannot build reaches the parent at start-up as the same exception.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from types import SimpleNamespace

import numpy as np
import psutil
import pytest

from common.harness import bench
from common.harness.variant_worker import VariantWorker
from common.pipeline.run import STAGES
from common.runtime.backends import BackendUnavailable
from common.variants.table import VARIANTS, Variant, make_pipeline_runner

VARIANT = VARIANTS["exact_ort_tuned_stages"]


@pytest.fixture(scope="module")
def isolated(onnx_model, threads):
    runner = make_pipeline_runner("onnx_optimized", VARIANT, threads, isolated=True)
    yield runner
    runner.close()


@pytest.fixture
def small(generated_volumes):
    return generated_volumes["small"]


def _case(image, case_id="small"):
    return SimpleNamespace(case_id=case_id, image=image, label=None, label_map=None)


def _wait_dead(pid: int) -> None:
    """Until the killed worker is a zombie (not reaped here: its multiprocessing parent reaps it)."""
    deadline = time.monotonic() + 10
    while psutil.Process(pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.05)


def _kill_when_busy(pid: int) -> threading.Thread:
    """SIGKILL the worker once it has spent 0.3 s of CPU on the run that follows (mid-run on any machine)."""
    worker = psutil.Process(pid)
    start = sum(worker.cpu_times()[:2])

    def watch():
        while sum(worker.cpu_times()[:2]) - start < 0.3:
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_isolated_runner_matches_in_process(isolated, small, threads, tmp_path):
    me = psutil.Process()
    before_mb = me.memory_info().rss / 2**20
    row = bench._run_one(isolated, _case(small), 0, tmp_path, {})
    grown_mb = me.memory_info().rss / 2**20 - before_mb
    assert row["status"] == "ok", row["error"]
    assert row["n_tiles"] == 1 and all(row[s] >= 0 for s in STAGES) and row["wall_s"] > 0
    worker = psutil.Process(isolated.memory_pid())
    assert worker.pid != os.getpid() and any("onnxruntime" in m.path for m in worker.memory_maps())
    assert row["peak_rss_mb"] > 100, "the worker's tree, which holds the session and the logits"
    assert grown_mb < 100, f"the benchmark process grew {grown_mb:.0f} MB: it should not hold the session"

    in_process = make_pipeline_runner("onnx_optimized", VARIANT, threads)
    timings = in_process.run(small, tmp_path / "in_process.nii.gz")
    assert timings["n_tiles"] == row["n_tiles"]
    np.testing.assert_array_equal(bench.read_labels(isolated.output_path(tmp_path, "small")),
                                  bench.read_labels(tmp_path / "in_process.nii.gz"))


def test_killed_worker_is_one_error_then_a_fresh_worker(isolated, small, tmp_path):
    first = isolated.memory_pid()
    os.kill(first, signal.SIGKILL)
    _wait_dead(first)
    with pytest.raises(RuntimeError, match=r"exact_ort_tuned_stages died \(exit code -9: killed, out of memory\?\)"):
        isolated.run(small, tmp_path / "between.nii.gz")

    second = isolated.memory_pid()  # a fresh worker, killed mid-run this time (as by the OOM killer)
    assert second != first
    killer = _kill_when_busy(second)
    row = bench._run_one(isolated, _case(small), 0, tmp_path, {})
    killer.join(timeout=10)
    assert row["status"] == "error" and "died (exit code -9" in row["error"] and "\n" not in row["error"]

    timings = isolated.run(small, None)
    assert timings["n_tiles"] == 1 and isolated.memory_pid() not in (first, second)
    assert not list(tmp_path.rglob("*.nii.gz"))  # nothing written by the killed runs


def test_bad_input_is_one_line_and_the_worker_goes_on(small, threads, tmp_path):
    bad = tmp_path / "x.nii.gz"
    bad.write_text("not an image")
    worker = VariantWorker(VARIANT, threads)
    try:
        pid = worker.pid()
        with pytest.raises(RuntimeError) as info:
            worker.run(bad, tmp_path / "out.nii.gz")
        message = str(info.value)
        assert "\n" not in message and message.startswith("InputError:") and "not a readable NIfTI" in message
        assert worker.run(small, None)["n_tiles"] == 1
        assert worker.pid() == pid
    finally:
        worker.close()


def test_runner_holds_no_idle_worker(isolated, small):
    pid = isolated.memory_pid()
    assert isolated.run(small, None)["n_tiles"] == 1
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_backend_build_failure_reaches_the_parent(threads):
    with pytest.raises(BackendUnavailable, match="unknown backend 'no_such_runtime'"):
        VariantWorker(Variant("broken", "exact", "no_such_runtime", "test"), threads)


def test_building_a_runner_leaves_no_worker_running(onnx_model, threads):
    def workers() -> set[int]:
        return {c.pid for c in psutil.Process().children(recursive=True)
                if c.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(c.cmdline())}

    before = workers()
    runner = make_pipeline_runner("onnx_optimized", VARIANT, threads, isolated=True)
    try:
        assert workers() - before == set()
    finally:
        runner.close()
