"""One pipeline variant in its own worker process.

A variant's runtime (an ONNX Runtime session, an OpenVINO compiled model: 1-3 GB) lives in its
worker, so the peak memory measured for a variant is that worker's process tree alone, and a case
that exhausts memory kills one worker, not the benchmark.

- `VariantWorker(variant, threads)`: starts the worker and waits until it has built the backend; a
  runtime that cannot run here raises what the in-process build raises (BackendUnavailable,
  ImportError, FileNotFoundError), so 05 reports the row as skipped.
- `worker.run(input_path, output_path)`: one case, the stage timings and n_tiles back. A failed case
  raises RuntimeError with one line and the worker goes on; a dead worker raises RuntimeError once and
  the next run starts a fresh one.

The worker speaks common/harness/workers.py's protocol (Ready / SetupFailed, Job -> Done / Failed, Stop),
spawned, not forked. This module imports nothing heavy at the top: the child imports it before its thread
settings are applied.
"""
from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

from common.core.formatting import one_line
from common.harness import workers

RUNTIME_MODULES = ("onnxruntime", "openvino", "torch")  # backends named after their Python package
SKIP_KINDS = ("BackendUnavailable", "ImportError", "FileNotFoundError")  # 05 reports these rows as skipped


def check_runtime(backend: str) -> None:
    """BackendUnavailable when the backend's Python package is missing here.

    Checked in the parent before spawning: a missing runtime costs no process start, and a runtime
    hidden from this process (tests) is seen as missing, as it would be by an in-process build.
    """
    from common.runtime.backends import BackendUnavailable

    if backend not in RUNTIME_MODULES:
        return
    try:
        found = importlib.util.find_spec(backend) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise BackendUnavailable(f"{backend} not installed (no module named {backend!r})")


def _startup_error(kind: str, message: str, name: str) -> Exception:
    """The parent's exception for a backend the worker could not build: the child's type where 05
    treats it as a skip, RuntimeError otherwise."""
    from common.runtime.backends import BackendUnavailable

    known = dict(zip(SKIP_KINDS, (BackendUnavailable, ImportError, FileNotFoundError)))
    if kind in known:
        return known[kind](message)
    return RuntimeError(f"variant worker for {name} failed to start: {message}")


def _classify(exc: BaseException) -> tuple[str, str]:
    """(kind, reason) of a set-up failure: a skip kind with its whole message, else RuntimeError, one line."""
    from common.runtime.backends import BackendUnavailable

    for kind in (BackendUnavailable, FileNotFoundError, ImportError):
        if isinstance(exc, kind):
            return kind.__name__, str(exc)
    return "RuntimeError", one_line(exc)


def _warm_up(backend) -> None:
    """One untimed inference at start-up: a worker lives for one run, and a runtime's first call pays for
    its memory arena and lazy kernel set-up, which a long-running service pays once."""
    import numpy as np

    from common.model.weights import PATCH_SIZE

    patch = np.zeros((1, 1, *PATCH_SIZE), dtype=np.float32)
    if backend.predict_slabs is not None:
        for _ in backend.predict_slabs(patch):
            pass
    elif backend.predict is not None:
        backend.predict(patch)
    else:
        backend.labels_any(patch)


class _Segmenter:
    """The worker's job handler: (input path, output path or None) -> stage timings and n_tiles, and with
    `stage_memory` the peak RSS of each step (common/core/stage_memory.py) under "stage_memory": the set-up's
    steps (imports, runtime, warm_up) then the case's. `preload`: modules imported at set-up (a measurement of
    what an import costs: tools/stage_memory.py's "before" rows import torch as the worker once did)."""

    def __init__(self, variant_payload: bytes, threads: int, stage_memory: bool = False, preload: tuple = ()):
        from common.core.env import apply_threads
        from common.core.stage_memory import StageMemory

        self.memory = StageMemory() if stage_memory else None
        apply_threads(threads)  # before numpy and the runtimes load
        from common.pipeline import run  # noqa: F401  (counted under "imports")
        from common.runtime.backends import import_runtime, make_backend

        for module in preload:
            import_runtime(module)

        variant = pickle.loads(variant_payload)
        if variant.backend in RUNTIME_MODULES and variant.backend != "torch":  # counted under "imports"
            import_runtime(variant.backend)
        self._checkpoint("imports")
        self.backend = make_backend(variant.backend, threads, **variant.backend_options)
        self.config = variant.config_for(threads)
        self._checkpoint("runtime")
        _warm_up(self.backend)
        self._checkpoint("warm_up")

    def _checkpoint(self, step: str) -> None:
        if self.memory is not None:
            self.memory.checkpoint(step)

    def __call__(self, job: tuple[str, str | None]) -> dict:
        from common.pipeline.run import StageTimer, segment_file

        input_path, output_path = job
        first = len(self.memory.rows) if self.memory else 0
        result = segment_file(Path(input_path), None if output_path is None else Path(output_path),
                              self.backend, self.config, timer=StageTimer(self.memory))
        value = {**result.timings, "n_tiles": result.n_tiles}
        if self.memory is not None:
            value["stage_memory"] = self.memory.as_dicts()[:3] + self.memory.as_dicts()[max(first, 3):]
        return value

    def close(self) -> None:
        self.backend.close()


def _serve(conn, variant_payload: bytes, threads: int, stage_memory: bool = False, preload: tuple = ()) -> None:
    """The worker process: common/harness/workers.py's loop around a _Segmenter."""
    workers.serve(conn, lambda: _Segmenter(variant_payload, threads, stage_memory, preload), classify=_classify,
                  ignore_interrupt=True)


class VariantWorker:
    """One spawned process holding `variant`'s backend, serving cases one at a time.

    Daemonic: multiprocessing terminates it when the parent exits, and it exits by itself when the
    parent is killed (its pipe reads EOF).
    """

    def __init__(self, variant, threads: int, stage_memory: bool = False, preload: tuple[str, ...] = ()):
        check_runtime(variant.backend)
        self.variant, self.threads = variant, int(threads)
        self._options = (bool(stage_memory), tuple(preload))  # see _Segmenter
        self._payload = pickle.dumps(variant)
        self._process = None
        self._conn = None
        self._start()

    def _start(self) -> None:
        self._process, self._conn = workers.start(_serve, (self._payload, self.threads, *self._options),
                                                  name=f"variant-{self.variant.name}")
        try:
            message = self._receive(" while starting")
        except BaseException:
            self._stop(timeout=0)
            raise
        if isinstance(message, workers.SetupFailed):
            self._stop()
            raise _startup_error(message.kind, message.reason, self.variant.name)

    def _receive(self, when: str):
        """The worker's next message; RuntimeError (the worker forgotten) when it died instead."""
        while not self._conn.poll(workers.POLL_S):
            if not self._process.is_alive() and not self._conn.poll(0):
                raise self._died(when)
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            raise self._died(when) from None

    def _died(self, when: str) -> RuntimeError:
        process = self._process
        process.join(timeout=10)
        self._stop(timeout=0)
        return RuntimeError(f"variant worker for {self.variant.name} died{when} "
                            f"({workers.describe_exit(process.exitcode)})")

    def _stop(self, timeout: float = 30) -> None:
        """Ask the worker to stop, kill it after `timeout` s, and forget it: the next run starts a fresh one."""
        process, conn = self._process, self._conn
        self._process = self._conn = None
        workers.stop(process, conn, timeout)

    def pid(self) -> int:
        """The worker's process id, starting a fresh worker when the last one died or was closed.

        The harness calls this before a timed run: a restart (building the backend) is then neither
        timed nor in the run's peak memory sample."""
        if self._process is None:
            self._start()
        return self._process.pid

    def run(self, input_path: Path, output_path: Path | None) -> dict:
        """Segment one case in the worker (no output written for None): stage timings and n_tiles."""
        self.pid()
        try:
            self._conn.send(workers.Job(0, (str(input_path), None if output_path is None else str(output_path))))
        except OSError:
            raise self._died("") from None
        try:
            message = self._receive("")
        except BaseException:  # interrupted mid-case: its answer would come out of step
            self._stop(timeout=0)
            raise
        if not isinstance(message, workers.Done):
            raise RuntimeError(message.reason)
        return message.value

    def close(self) -> None:
        self._stop()
