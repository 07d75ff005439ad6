"""Run work in child processes pinned to CPU sets, with thread-count env vars matching the set.

Children use the multiprocessing "spawn" context. The pinned function and its arguments travel as
pickled bytes and are unpickled only after the child has set its affinity, so the imports they
trigger (numpy, onnxruntime, torch ...) initialise their thread pools on the pinned CPUs.
Caveat of "spawn": the parent's ``__main__`` script is re-imported in the child before that; keep
heavy imports of benchmark scripts inside functions or under ``if __name__ == "__main__"``.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import shlex
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

from common.core.env import THREAD_ENV
from common.core.formatting import one_line
from common.harness import workers
from common.core.topology import format_cpu_list

THREAD_ENV_VARS = THREAD_ENV  # the one list (common/core/env.py); the name stays for callers

_SPAWN = workers.SPAWN
_ENV_LOCK = threading.Lock()


class PinnedChildError(RuntimeError):
    """A function run by :func:`run_pinned` raised, or its child process died."""

    def __init__(self, message: str, exc_type: str | None = None, child_traceback: str | None = None):
        super().__init__(message)
        self.exc_type = exc_type
        self.child_traceback = child_traceback


def thread_env(n_threads: int) -> dict[str, str]:
    """The thread-count variables a pinned child gets: each of THREAD_ENV_VARS set to ``n_threads``."""
    return {name: str(n_threads) for name in THREAD_ENV_VARS}


def taskset_command(cpus: Sequence[int], argv: Sequence[str], with_thread_env: bool = False) -> list[str]:
    """Command line reproducing a pinned run: ``taskset -c LIST argv...``.

    With ``with_thread_env`` it is prefixed by ``env OMP_NUM_THREADS=N ...`` as run_pinned sets them.
    """
    command = ["taskset", "-c", format_cpu_list(cpus), *argv]
    if with_thread_env:
        command = ["env", *(f"{k}={v}" for k, v in thread_env(len(set(cpus))).items()), *command]
    return command


def shell_command(command: Sequence[str]) -> str:
    """A command list as one shell-quoted string, for reports."""
    return shlex.join(command)


def memory_fits(workers: int, peak_rss_mb_per_worker: float, available_mb: float | None = None) -> tuple[bool, str]:
    """Whether ``workers`` processes of ``peak_rss_mb_per_worker`` MB each fit in available memory.

    ``available_mb`` defaults to psutil's ``virtual_memory().available``.
    """
    if available_mb is None:
        import psutil

        available_mb = psutil.virtual_memory().available / 2**20
    needed = workers * peak_rss_mb_per_worker
    fits = needed <= available_mb
    verdict = "fits" if fits else "does NOT fit"
    return fits, (f"{workers} workers x {peak_rss_mb_per_worker:.0f} MB peak RSS = {needed:.0f} MB "
                  f"{verdict} in {available_mb:.0f} MB available memory")


def _validate_cpus(cpus: Sequence[int]) -> list[int]:
    wanted = sorted(set(int(c) for c in cpus))
    if not wanted:
        raise ValueError("empty CPU set")
    allowed = os.sched_getaffinity(0)
    if not set(wanted) <= allowed:
        outside = [c for c in wanted if c not in allowed]
        raise ValueError(f"CPUs {format_cpu_list(outside)} are outside this process's affinity mask "
                         f"({format_cpu_list(allowed)})")
    return wanted


@contextmanager
def _child_env(n_threads: int) -> Iterator[None]:
    """Temporarily set the thread variables so a child spawned meanwhile inherits them from birth.

    The child's interpreter may load OpenMP/OpenBLAS (via the re-imported ``__main__``) before any
    code of ours runs in it, so setting them inside the child would be too late.
    """
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in THREAD_ENV_VARS}
        os.environ.update(thread_env(n_threads))
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _start_pinned(target: Callable, args: tuple, cpus: list[int]) -> multiprocessing.process.BaseProcess:
    # Not daemonic: pinned work (e.g. nnU-Net's resampling/export pools) may start processes of its own.
    process = _SPAWN.Process(target=target, args=args, daemon=False)
    with _child_env(len(cpus)):
        process.start()
    try:  # narrows the unpinned window of interpreter start-up; the child pins itself again anyway
        os.sched_setaffinity(process.pid, cpus)
    except OSError:
        pass
    return process


def _pin_self(cpus: list[int]) -> None:
    os.sched_setaffinity(0, cpus)
    actual = sorted(os.sched_getaffinity(0))
    if actual != cpus:
        raise OSError(f"affinity is {format_cpu_list(actual)} after asking for {format_cpu_list(cpus)}")


def _pinned_setup(cpus: list[int], payload: bytes) -> Callable[[], Callable[[Any], Any]]:
    """The child's set-up: pin itself first, then unpickle the function (its imports start on those CPUs)."""
    def setup():
        _pin_self(cpus)
        (fn,) = pickle.loads(payload)
        return fn
    return setup


def _pinned_worker(conn, cpus: list[int], fn_payload: bytes) -> None:
    """A pinned child of run_pinned: common/harness/workers.py's protocol, each Job's payload one
    item for fn."""
    workers.serve(conn, _pinned_setup(cpus, fn_payload))


def _apply(fn: Callable, args: tuple, kwargs: dict, _payload: Any = None) -> Any:
    return fn(*args, **kwargs)


def _start_pinned_worker(cpus: list[int], fn_payload: bytes):
    """(process, parent's end of the pipe) of a pinned child serving `fn` (pickled)."""
    parent_end, child_end = _SPAWN.Pipe(duplex=True)
    process = _start_pinned(_pinned_worker, (child_end, cpus, fn_payload), cpus)
    child_end.close()  # so that a dead child reads as EOF here
    return process, parent_end


def _pickle_call(fn: Callable, *parts: Any) -> bytes:
    try:
        return pickle.dumps((fn, *parts))
    except Exception as exc:
        name = getattr(fn, "__qualname__", repr(fn))
        raise TypeError(f"cannot send {name} and its arguments to a child process ({one_line(exc)}); "
                        "use a module-level function and picklable arguments") from exc


def run_pinned(cpus: Sequence[int], fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` in a spawned child pinned to ``cpus`` and return its result.

    The child has each of THREAD_ENV_VARS = len(cpus). An exception in the child (or its death)
    raises :class:`PinnedChildError` here, with the child's traceback attached.
    """
    wanted = _validate_cpus(cpus)
    _pickle_call(fn, args, kwargs)  # a clear TypeError here for what cannot travel
    payload = pickle.dumps((partial(_apply, fn, args, kwargs),))  # unpickled in the child after pinning
    name = getattr(fn, "__qualname__", repr(fn))
    where = f"CPUs {format_cpu_list(wanted)}"
    process, conn = _start_pinned_worker(wanted, payload)
    try:
        message = conn.recv()
        if isinstance(message, workers.Ready):
            conn.send(workers.Job(0, None))
            message = conn.recv()
    except EOFError:
        process.join()
        raise PinnedChildError(f"{name} on {where}: child process died "
                               f"({workers.describe_exit(process.exitcode)}) without a result") from None
    finally:
        workers.stop(process, conn, timeout=5)
    if isinstance(message, workers.Done):
        return message.value
    raise PinnedChildError(f"{name} failed in pinned child on {where}: {message.reason}\n"
                           f"Child traceback:\n{message.traceback}", exc_type=message.kind,
                           child_traceback=message.traceback)
