"""Pinned child processes: affinity and thread env really applied, errors surfaced."""
import os
import sys
import time
import types

import pytest

from common.production.pinning import (
    THREAD_ENV_VARS,
    PinnedChildError,
    memory_fits,
    run_pinned,
    taskset_command,
)

AFFINITY = sorted(os.sched_getaffinity(0))


# Functions run in children must be module-level (pickled by reference).
def report_affinity(tag=None, *, log=None):
    """The child's view: its affinity mask and thread variables; appends 'tag pid' to log if given."""
    if tag == "fail":
        raise ValueError("boom on purpose\nsecond line")
    if log is not None:
        with open(log, "a") as f:
            f.write(f"{tag} {os.getpid()}\n")
        time.sleep(0.05)  # lets both workers overlap
    return sorted(os.sched_getaffinity(0)), {k: os.environ.get(k) for k in THREAD_ENV_VARS}, tag


def add(a, b=0):
    return a + b


def die(code):
    os._exit(code)


@pytest.mark.parametrize("cpus", [AFFINITY[:1], AFFINITY[-1:]], ids=["first", "last"])
def test_run_pinned_child_runs_on_requested_cpus(cpus):
    env_before = {k: os.environ.get(k) for k in THREAD_ENV_VARS}
    affinity, env, _ = run_pinned(cpus, report_affinity)
    assert affinity == cpus
    assert env == {k: str(len(cpus)) for k in THREAD_ENV_VARS}
    # The parent is untouched.
    assert sorted(os.sched_getaffinity(0)) == AFFINITY
    assert {k: os.environ.get(k) for k in THREAD_ENV_VARS} == env_before


def test_run_pinned_to_all_cpus_is_pinned_not_inherited(monkeypatch):
    """"All" (the parent's whole mask) must be set in the child, not merely inherited: the child is started
    here from a parent narrowed to the first CPU, and must still report every requested CPU."""
    if len(AFFINITY) < 2:
        pytest.skip(f"needs 2 CPUs in the affinity mask, this process has {len(AFFINITY)}")
    from common.production import pinning

    monkeypatch.setattr(pinning, "_validate_cpus", lambda cpus: sorted(set(cpus)))  # the narrowed parent allows all
    os.sched_setaffinity(0, AFFINITY[:1])
    try:
        affinity, env, _ = run_pinned(AFFINITY, report_affinity)
    finally:
        os.sched_setaffinity(0, AFFINITY)
    assert affinity == AFFINITY
    assert env == {k: str(len(AFFINITY)) for k in THREAD_ENV_VARS}


def test_run_pinned_passes_args_and_kwargs():
    assert run_pinned(AFFINITY[:1], add, 2, b=3) == 5


def test_child_exception_surfaces():
    with pytest.raises(PinnedChildError, match="ValueError: boom on purpose") as info:
        run_pinned(AFFINITY[:1], report_affinity, "fail")
    assert info.value.exc_type == "ValueError"
    assert "Traceback" in info.value.child_traceback and "report_affinity" in info.value.child_traceback


def test_child_death_surfaces():
    with pytest.raises(PinnedChildError, match="died .exit code 5"):
        run_pinned(AFFINITY[:1], die, 5)


def test_run_pinned_rejects_bad_requests():
    with pytest.raises(ValueError, match="outside this process's affinity"):
        run_pinned([max(AFFINITY) + 1000], add, 1)
    with pytest.raises(ValueError, match="empty"):
        run_pinned([], add, 1)
    with pytest.raises(TypeError, match="module-level function"):
        run_pinned(AFFINITY[:1], lambda: 1)


def test_function_not_importable_in_child(monkeypatch):
    # A function the parent can pickle but the child cannot import (its module exists only here).
    ghost = types.ModuleType("ghost_module_for_pinning_test")
    exec("def fn(x=0):\n    return x", ghost.__dict__)
    monkeypatch.setitem(sys.modules, ghost.__name__, ghost)
    with pytest.raises(PinnedChildError, match="ModuleNotFoundError"):
        run_pinned(AFFINITY[:1], ghost.fn)


def test_taskset_command():
    assert taskset_command([0, 1, 2, 5], ["python", "-m", "bench"]) == ["taskset", "-c", "0-2,5", "python", "-m", "bench"]
    assert taskset_command([3, 2], ["x"], with_thread_env=True) == [
        "env", "OMP_NUM_THREADS=2", "OPENBLAS_NUM_THREADS=2", "MKL_NUM_THREADS=2", "nnUNet_def_n_proc=2",
        "nnUNet_n_proc_DA=2", "taskset", "-c", "2-3", "x"]


def test_memory_fits():
    fits, message = memory_fits(4, 10**12)
    assert not fits and "does NOT fit" in message
    assert memory_fits(2, 40, available_mb=100)[0]
    fits, message = memory_fits(3, 40, available_mb=100)
    assert not fits and "120 MB" in message and "100 MB" in message
