"""The one spawn-and-pipe worker protocol: a child process set up once, then serving jobs one at a time.

Used by 05's variant workers (harness/variant_worker.py) and 06's pinned children (production/pinning.py:
`run_pinned`). Every message is a named dataclass below, never a tuple read by position:

    parent -> child   Job(index, payload)            one unit of work; Stop() (or the pipe closing): exit
    child -> parent   Ready()                        set up, serving
                      SetupFailed(kind, reason, tb)  could not set up; the child exits
                      Done(index, value, ...)        the job's result
                      Failed(index, reason, ...)     the job raised; the child goes on

`serve(conn, setup)` is the child's loop: `setup()` returns the job handler (or raises: SetupFailed), then
each Job's `handler(payload)` answers Done or Failed. The child exits on Stop, on EOF (the parent is gone),
or when orphaned (its parent process changed: a forked grandchild may still hold the pipe open).
Children use the "spawn" context (a forked child would inherit the parent's torch/OpenMP threads in a
broken state); this module imports nothing heavy, as the child imports it before its thread settings.
"""
from __future__ import annotations

import multiprocessing
import os
import resource
import signal
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from common.core.formatting import one_line

SPAWN = multiprocessing.get_context("spawn")
POLL_S = 1.0


@dataclass(frozen=True)
class Job:
    index: int
    payload: Any


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Ready:
    pass


@dataclass(frozen=True)
class SetupFailed:
    kind: str  # the exception's type name
    reason: str  # one line (or the full message where `kind` is one the parent re-raises as is)
    traceback: str = ""


@dataclass(frozen=True)
class Done:
    index: int
    value: Any
    start: float | None = None  # time.time() around the handler
    end: float | None = None
    peak_rss_mb: float | None = None  # the child's peak RSS so far (its earlier jobs too)


@dataclass(frozen=True)
class Failed:
    index: int | None
    reason: str  # one line
    kind: str = ""
    traceback: str = ""
    start: float | None = None
    end: float | None = None
    peak_rss_mb: float | None = None


def peak_rss_mb() -> float:
    """Peak RSS of this process in MB: VmHWM of the current image (ru_maxrss can include pre-exec memory)."""
    from common.core.stage_memory import status_mb

    try:
        return status_mb("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def describe_exit(exitcode: int | None) -> str:
    """A child's exit code in words: "exit code 3", "exit code -9: killed, out of memory?", "exit code -15: SIGTERM"."""
    reason = ""
    if exitcode == -signal.SIGKILL:
        reason = ": killed, out of memory?"
    elif exitcode is not None and exitcode < 0:
        try:
            reason = f": {signal.Signals(-exitcode).name}"
        except ValueError:
            pass
    return f"exit code {exitcode}{reason}"


def _classify(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, one_line(exc)


def serve(conn, setup: Callable[[], Callable[[Any], Any]],
          classify: Callable[[BaseException], tuple[str, str]] = _classify, ignore_interrupt: bool = False) -> None:
    """The child's side: set up, say Ready (or SetupFailed with `classify(exc)` = (kind, reason), and return),
    then answer each Job until Stop. A handler with a `close()` is closed on the way out."""
    if ignore_interrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the child
    try:
        handler = setup()
    except BaseException as exc:  # noqa: BLE001 - everything must reach the parent
        conn.send(SetupFailed(*classify(exc), traceback.format_exc()))
        return
    conn.send(Ready())
    try:
        _answer_jobs(conn, handler)
    finally:
        close = getattr(handler, "close", None)
        if close is not None:
            close()


def _answer_jobs(conn, handler: Callable[[Any], Any]) -> None:
    parent = os.getppid()
    while True:
        while not conn.poll(POLL_S):
            if os.getppid() != parent:  # orphaned
                return
        try:
            job = conn.recv()
        except EOFError:  # the parent is gone
            return
        except Exception as exc:  # a job this child cannot unpickle (its module is missing here)
            conn.send(Failed(None, f"job not readable here: {one_line(exc)}", type(exc).__name__,
                             traceback.format_exc()))
            continue
        if not isinstance(job, Job):  # Stop
            return
        start = time.time()
        try:
            value = handler(job.payload)
        except Exception as exc:
            conn.send(Failed(job.index, one_line(exc), type(exc).__name__, traceback.format_exc(), start,
                             time.time(), peak_rss_mb()))
            continue
        end = time.time()
        try:
            conn.send(Done(job.index, value, start, end, peak_rss_mb()))
        except Exception as exc:  # the value could not be pickled
            conn.send(Failed(job.index, f"result not picklable: {one_line(exc)}", type(exc).__name__,
                             traceback.format_exc(), start, end, peak_rss_mb()))


def start(target: Callable, args: tuple, name: str | None = None, daemon: bool = True):
    """(process, parent's end of a duplex pipe): `target(child_end, *args)` in a spawned child."""
    parent_end, child_end = SPAWN.Pipe(duplex=True)
    process = SPAWN.Process(target=target, args=(child_end, *args), name=name, daemon=daemon)
    process.start()
    child_end.close()  # so that a dead child reads as EOF here
    return process, parent_end


def stop(process, conn, timeout: float = 30) -> None:
    """Ask the child to stop, kill it after `timeout` s, close the pipe."""
    if process is None:
        return
    if process.is_alive():
        try:
            conn.send(Stop())
        except OSError:
            pass
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
    conn.close()
