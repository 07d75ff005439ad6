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

Workers use the multiprocessing "spawn" context: the parent may already run torch/OpenMP threads,
which a forked child would inherit in a broken state. This module imports nothing heavy at the top:
the child imports it before its thread settings are applied.
"""
from __future__ import annotations

import importlib.util
import multiprocessing
import os
import pickle
import signal
from pathlib import Path

_SPAWN = multiprocessing.get_context("spawn")
RUNTIME_MODULES = ("onnxruntime", "openvino", "torch")  # backends named after their Python package
POLL_S = 1.0


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

    known = {"BackendUnavailable": BackendUnavailable, "ImportError": ImportError,
             "FileNotFoundError": FileNotFoundError}
    if kind in known:
        return known[kind](message)
    return RuntimeError(f"variant worker for {name} failed to start: {message}")


def _error_kind(exc: BaseException) -> str:
    from common.runtime.backends import BackendUnavailable

    for kind in (BackendUnavailable, FileNotFoundError, ImportError):
        if isinstance(exc, kind):
            return kind.__name__
    return "RuntimeError"


def _exit_reason(code: int | None) -> str:
    if code == -signal.SIGKILL:
        return ": killed, out of memory?"
    if code is not None and code < 0:
        try:
            return f": {signal.Signals(-code).name}"
        except ValueError:
            pass
    return ""


def _warm_up(backend) -> None:
    """One untimed inference at start-up: a worker lives for one run, and a runtime's first call pays for
    its memory arena and lazy kernel set-up, which a long-running service pays once."""
    import numpy as np

    from common.model.weights import PATCH_SIZE

    patch = np.zeros((1, 1, *PATCH_SIZE), dtype=np.float32)
    if backend.predict is not None:
        backend.predict(patch)
    else:
        backend.labels_any(patch)


def _serve(conn, variant_payload: bytes, threads: int) -> None:
    """The worker: thread settings first (before numpy and the runtimes load), the backend, then cases."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the worker
    try:
        from common.core.env import apply_threads

        apply_threads(threads)
        from common.runtime.backends import make_backend

        variant = pickle.loads(variant_payload)
        backend = make_backend(variant.backend, threads, **variant.backend_options)
        config = variant.config_for(threads)
    except Exception as exc:
        from common.core.formatting import one_line

        kind = _error_kind(exc)
        conn.send(("failed", kind, str(exc) if kind != "RuntimeError" else one_line(exc)))
        return
    from common.core.formatting import one_line
    from common.pipeline.run import segment_file

    _warm_up(backend)
    conn.send(("ready", None))
    parent = os.getppid()
    try:
        while True:
            while not conn.poll(POLL_S):
                if os.getppid() != parent:  # orphaned (a forked grandchild may still hold the pipe open)
                    return
            try:
                job = conn.recv()
            except EOFError:  # the parent is gone
                return
            if job is None:
                return
            input_path, output_path = job
            try:
                result = segment_file(Path(input_path), None if output_path is None else Path(output_path),
                                      backend, config)
                reply = ("ok", {**result.timings, "n_tiles": result.n_tiles})
            except Exception as exc:
                reply = ("error", one_line(exc))
            conn.send(reply)
    finally:
        backend.close()


class VariantWorker:
    """One spawned process holding `variant`'s backend, serving cases one at a time.

    Daemonic: multiprocessing terminates it when the parent exits, and it exits by itself when the
    parent is killed (its pipe reads EOF).
    """

    def __init__(self, variant, threads: int):
        check_runtime(variant.backend)
        self.variant, self.threads = variant, int(threads)
        self._payload = pickle.dumps(variant)
        self._process = None
        self._conn = None
        self._start()

    def _start(self) -> None:
        parent_end, child_end = _SPAWN.Pipe(duplex=True)
        process = _SPAWN.Process(target=_serve, args=(child_end, self._payload, self.threads),
                                 name=f"variant-{self.variant.name}", daemon=True)
        process.start()
        child_end.close()  # so that a dead worker reads as EOF here
        self._process, self._conn = process, parent_end
        try:
            message = self._receive(" while starting")
        except BaseException:
            self._stop(timeout=0)
            raise
        if message[0] == "failed":
            self._stop()
            raise _startup_error(message[1], message[2], self.variant.name)

    def _receive(self, when: str):
        """The worker's next message; RuntimeError (the worker forgotten) when it died instead."""
        while not self._conn.poll(POLL_S):
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
        code = process.exitcode
        return RuntimeError(f"variant worker for {self.variant.name} died{when} "
                            f"(exit code {code}{_exit_reason(code)})")

    def _stop(self, timeout: float = 30) -> None:
        """Ask the worker to stop, kill it after `timeout` s, and forget it: the next run starts a fresh one."""
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if process is None:
            return
        if process.is_alive():
            try:
                conn.send(None)
            except OSError:
                pass
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join()
        conn.close()

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
            self._conn.send((str(input_path), None if output_path is None else str(output_path)))
        except OSError:
            raise self._died("") from None
        try:
            status, value = self._receive("")
        except BaseException:  # interrupted mid-case: its answer would come out of step
            self._stop(timeout=0)
            raise
        if status != "ok":
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        self._stop()
