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
import resource
import shlex
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from common.core.env import THREAD_ENV
from common.core.formatting import one_line
from common.production.topology import format_cpu_list

THREAD_ENV_VARS = THREAD_ENV  # the one list (common/core/env.py); the name stays for callers

_SPAWN = multiprocessing.get_context("spawn")
_ENV_LOCK = threading.Lock()


class PinnedChildError(RuntimeError):
    """A function run by :func:`run_pinned` raised, or its child process died."""

    def __init__(self, message: str, exc_type: str | None = None, child_traceback: str | None = None):
        super().__init__(message)
        self.exc_type = exc_type
        self.child_traceback = child_traceback


@dataclass
class ItemResult:
    """Outcome of one item of :func:`run_queue`."""

    index: int
    status: str  # "ok" or "error"
    value: Any = None
    error: str | None = None  # one-line reason when status == "error"
    worker: int | None = None
    cpus: list[int] | None = None
    start: float | None = None  # time.time() when fn(item) started
    end: float | None = None
    peak_rss_mb: float | None = None  # peak RSS of the worker process so far (covers its earlier items too)

    @property
    def wall_s(self) -> float | None:
        """Wall-clock seconds of fn(item), if it ran."""
        return None if self.start is None or self.end is None else self.end - self.start


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


def _peak_rss_mb() -> float:
    """Peak RSS of this process in MB: VmHWM of the current image (ru_maxrss can include pre-exec memory)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def _run_pinned_child(cpus: list[int], payload: bytes, conn: multiprocessing.connection.Connection) -> None:
    try:
        _pin_self(cpus)
        fn, args, kwargs = pickle.loads(payload)
        result = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - everything must reach the parent
        conn.send(("error", type(exc).__name__, one_line(exc), traceback.format_exc()))
        return
    try:
        conn.send(("ok", result))
    except Exception as exc:  # the result could not be pickled
        conn.send(("error", type(exc).__name__, f"result not picklable: {one_line(exc)}", traceback.format_exc()))


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
    payload = _pickle_call(fn, args, kwargs)
    name = getattr(fn, "__qualname__", repr(fn))
    receiver, sender = _SPAWN.Pipe(duplex=False)
    process = _start_pinned(_run_pinned_child, (wanted, payload, sender), wanted)
    sender.close()  # so that recv() sees EOF if the child dies without answering
    try:
        message = receiver.recv()
        process.join()
    except EOFError:
        process.join()
        raise PinnedChildError(f"{name} on CPUs {format_cpu_list(wanted)}: child process died "
                               f"({_describe_exit(process.exitcode)}) without a result") from None
    finally:
        receiver.close()
        if process.is_alive():  # interrupted while waiting: do not leave the child running
            process.terminate()
            process.join()
    if message[0] == "ok":
        return message[1]
    _, exc_type, reason, child_tb = message
    raise PinnedChildError(f"{name} failed in pinned child on CPUs {format_cpu_list(wanted)}: {reason}\n"
                           f"Child traceback:\n{child_tb}", exc_type=exc_type, child_traceback=child_tb)


def _queue_worker(cpus: list[int], fn_payload: bytes, conn: multiprocessing.connection.Connection) -> None:
    """Worker loop of run_queue: receives pickled (index, item), answers ("result", ...) per item."""
    try:
        _pin_self(cpus)
        (fn,) = pickle.loads(fn_payload)
    except BaseException as exc:  # noqa: BLE001
        conn.send(("fatal", one_line(exc)))
        return
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:  # parent went away
            return
        if not data:  # empty message = no more items
            return
        index, start = None, None
        try:
            index, item = pickle.loads(data)
            start = time.time()
            value = fn(item)
            end = time.time()
        except Exception as exc:
            conn.send(("result", index, "error", None, one_line(exc), start, time.time(), _peak_rss_mb()))
            continue
        try:
            conn.send(("result", index, "ok", value, None, start, end, _peak_rss_mb()))
        except Exception as exc:  # the value could not be pickled
            conn.send(("result", index, "error", None, f"result not picklable: {one_line(exc)}",
                       start, end, _peak_rss_mb()))


def run_queue(worker_cpusets: Sequence[Sequence[int]], fn: Callable, items: Sequence[Any]) -> list[ItemResult]:
    """Process ``items`` with one pinned worker process per CPU set; return one ItemResult per item, in order.

    Workers pull the next item as soon as they are free (the parent dispatches a shared queue).
    ``fn`` must be a picklable module-level function of one argument. An item whose ``fn`` raises,
    or whose worker dies, becomes a status "error" result; the other items go on.
    """
    cpusets = [_validate_cpus(c) for c in worker_cpusets]
    if not cpusets:
        raise ValueError("run_queue needs at least one worker CPU set")
    items = list(items)
    if not items:
        return []
    fn_payload = _pickle_call(fn)
    results: list[ItemResult | None] = [None] * len(items)
    pending = list(range(len(items)))[::-1]  # stack: pop() yields items in order
    in_flight: dict[int, int | None] = {}
    conns, processes = [], []
    death_reasons: list[str] = []

    def dispatch(w: int) -> None:
        while pending:
            index = pending.pop()
            try:
                data = pickle.dumps((index, items[index]))
            except Exception as exc:
                results[index] = ItemResult(index, "error", error=f"item not picklable: {one_line(exc)}")
                continue
            try:
                conns[w].send_bytes(data)
            except OSError:  # worker already gone; its EOF is handled by the receive loop
                pending.append(index)
                in_flight[w] = None
                return
            in_flight[w] = index
            return
        in_flight[w] = None
        try:
            conns[w].send_bytes(b"")
        except OSError:
            pass

    try:
        for cpus in cpusets:
            parent_end, child_end = _SPAWN.Pipe(duplex=True)
            processes.append(_start_pinned(_queue_worker, (cpus, fn_payload, child_end), cpus))
            child_end.close()
            conns.append(parent_end)
        for w in range(len(cpusets)):
            dispatch(w)
        alive = set(range(len(cpusets)))
        while alive:
            ready = multiprocessing.connection.wait([conns[w] for w in alive])
            for conn in ready:
                w = conns.index(conn)
                try:
                    message = conn.recv()
                except EOFError:  # worker gone: finish its item as an error
                    processes[w].join()
                    alive.discard(w)
                    reason = f"worker {w} (CPUs {format_cpu_list(cpusets[w])}) died ({_describe_exit(processes[w].exitcode)})"
                    index = in_flight.pop(w, None)
                    if index is not None:
                        results[index] = ItemResult(index, "error", error=f"{reason} while processing this item",
                                                    worker=w, cpus=cpusets[w])
                    if processes[w].exitcode != 0:
                        death_reasons.append(reason)
                    continue
                if message[0] == "fatal":
                    # The worker failed to start: its item was not attempted, give it back to the queue.
                    index = in_flight.pop(w, None)
                    if index is not None:
                        pending.append(index)
                    death_reasons.append(f"worker {w} (CPUs {format_cpu_list(cpusets[w])}) failed to start: {message[1]}")
                    processes[w].join()
                    alive.discard(w)
                    continue
                _, index, status, value, error, start, end, rss = message
                results[index] = ItemResult(index, status, value=value, error=error, worker=w,
                                            cpus=cpusets[w], start=start, end=end, peak_rss_mb=rss)
                dispatch(w)
    finally:
        for process in processes:
            if process.is_alive():
                process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join()
        for conn in conns:
            conn.close()

    reason = "; ".join(death_reasons) or "no worker left"
    return [r if r is not None else ItemResult(i, "error", error=f"not processed: {reason}")
            for i, r in enumerate(results)]
