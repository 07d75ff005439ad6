"""Segment mode on Ray (``--engine ray``): the cohort over long-lived, self-pinning actors.

- One actor (``totalseg_fast.engines.ray_worker.SegmentWorker``) per worker, ``num_cpus=T`` and
  ``memory=`` the measured peak per worker, so Ray never packs more workers on a node than fit.
- The driver keeps one case running on every actor and names the actor's next case, which the actor
  prefetches. When an actor dies mid-case (OOM kill, SIGKILL, ``ray.kill``, a lost node) its case goes
  back to the queue and runs on another actor (a replacement actor is started); its temporary output
  file is removed, so no partial output remains. A case that kills :data:`MAX_ATTEMPTS` actors fails.
- ``--resume``: ``OUT/segment_manifest.jsonl`` records, per finished output, the SHA-256 of the input
  it was computed from; an output whose input still hashes the same is kept, anything else is redone.
- One ``error: <file>: <reason>`` line per bad input; ``OUT/segment_results.csv`` holds one row per case
  (node, pid, CPU set, attempts, stage seconds, prefetch).
"""
from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.core.topology import format_cpu_list

MAX_ATTEMPTS = 3  # actors that may die on one case before it is reported as failed
START_TIMEOUT_S = 600.0  # no case running and no actor ready for this long: the cluster cannot place one
DEATH_GRACE_S, DEATH_GRACE_STEP_S = 5.0, 0.5  # after an actor death: probe the GCS this long, this often
PROBE_EVERY_S = 5.0  # after an actor death, or this long without news: does the cluster's GCS still answer?
MANIFEST = "segment_manifest.jsonl"
RESULTS = "segment_results.csv"
RESULT_COLUMNS = ("input", "output", "status", "error", "attempts", "node", "node_ip", "pid", "worker", "cpus",
                  "load_s", "preprocess_s", "inference_s", "network_s", "postprocess_s", "save_s", "wall_s",
                  "case_s", "prefetched", "prefetch_wait_s", "n_tiles", "start", "end", "peak_rss_mb",
                  "input_bytes", "output_bytes", "input_sha256")


class WorkerStartError(RuntimeError):
    """No actor could build its pipeline (a setup error, exit code 2): one line."""


@dataclass
class Job:
    input: str
    output: str
    attempts: int = 0
    deaths: list[str] = field(default_factory=list)


@dataclass
class EngineSettings:
    variant: str
    workers: int
    threads: int
    memory_mb: float
    factory: str | None = None  # test hook, see ray_worker
    warmup_input: str | None = None
    prefetch: bool = True


# ----------------------------------------------------------------------------- resume: the manifest

def read_manifest(out_dir: Path) -> dict[str, dict]:
    """Latest manifest entry per output path; a torn last line (interrupted write) is ignored."""
    entries: dict[str, dict] = {}
    try:
        lines = (Path(out_dir) / MANIFEST).read_text().splitlines()
    except OSError:
        return entries
    for line in lines:
        try:
            entry = json.loads(line)
            entries[entry["output"]] = entry
        except (ValueError, KeyError, TypeError):
            continue
    return entries


def append_manifest(out_dir: Path, entry: dict) -> None:
    with open(Path(out_dir) / MANIFEST, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def finished(job: Job, entries: dict[str, dict]) -> bool:
    """True when ``job.output`` exists, has the size recorded, and was made from an input with today's hash."""
    from totalseg_fast.engines.ray_worker import file_sha256

    entry = entries.get(job.output)
    if entry is None:
        return False
    try:
        if os.path.getsize(job.output) != entry.get("output_bytes"):
            return False
        if os.path.getsize(job.input) != entry.get("input_bytes"):
            return False
        return file_sha256(job.input)[0] == entry.get("input_sha256")
    except OSError:
        return False


def remove_partial(output: str) -> None:
    """Temporary files that an actor killed while writing ``output`` left (io.save_atomic's names)."""
    path = Path(output)
    for tmp in path.parent.glob(f".{path.name}.*.tmp*"):
        tmp.unlink(missing_ok=True)


def remove_stale_partials(jobs: list[Job]) -> int:
    """Before a run: temporary outputs of these jobs left by a killed driver or node (one listing per folder)."""
    by_dir: dict[Path, set[str]] = {}
    for job in jobs:
        by_dir.setdefault(Path(job.output).parent, set()).add(Path(job.output).name)
    removed = 0
    for folder, names in by_dir.items():
        try:
            entries = os.listdir(folder)
        except OSError:
            continue
        for entry in entries:
            if entry.startswith(".") and ".tmp" in entry and entry[1:].split(".tmp")[0].rsplit(".", 1)[0] in names:
                (folder / entry).unlink(missing_ok=True)
                removed += 1
    return removed


# ----------------------------------------------------------------------------- the cohort

class _Pool:
    """Actors, their readiness, and what each is running or will run next."""

    def __init__(self, settings: EngineSettings, log: Callable[[str], None]):
        import ray

        from totalseg_fast.engines.ray_worker import SegmentWorker

        self.ray, self.settings, self.log = ray, settings, log
        self.cls = ray.remote(SegmentWorker).options(
            num_cpus=settings.threads, memory=int(settings.memory_mb * 2**20), max_restarts=0,
            max_concurrency=1)
        self.starting: dict = {}  # info ref -> worker index
        self.actors: dict[int, object] = {}
        self.info: dict[int, dict] = {}
        self.idle: deque[int] = deque()
        self.startup_errors: list[str] = []
        self.started = 0

    def start(self) -> None:
        w = self.started
        self.started += 1
        actor = self.cls.remote(self.settings.variant, self.settings.threads, self.settings.factory,
                                self.settings.warmup_input)
        self.actors[w] = actor
        self.starting[actor.info.remote()] = w

    def on_ready(self, ref) -> None:
        w = self.starting.pop(ref)
        try:
            self.info[w] = self.ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - the actor could not build its pipeline
            text = (str(exc).strip().splitlines() or [type(exc).__name__])
            reason = next((line for line in reversed(text) if line.strip()), text[0]).strip()
            self.startup_errors.append(reason[:300])
            self.actors.pop(w, None)
            return
        info = self.info[w]
        self.log(f"worker {w}: pid {info['pid']} on {info['node']} ({info['node_ip']}), CPUs "
                 f"{format_cpu_list(info['cpus'])}, pipeline built in {info['build_s']:.1f} s"
                 + (f", warm-up {info['warmup_s']:.1f} s" if info["warmup_s"] else ""))
        self.idle.append(w)

    def kill_all(self, wait_s: float = 5.0) -> None:
        """Kill every actor and wait (up to `wait_s`) until those on this machine are gone: a partial output
        is removed only after its writer can no longer recreate it."""
        import psutil

        for actor in self.actors.values():
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        local = []
        for w in self.actors:
            try:
                proc = psutil.Process(self.info.get(w, {}).get("pid") or -1)
                if "SegmentWorker" in " ".join(proc.cmdline()):
                    local.append(proc)
            except (psutil.Error, ValueError):
                pass  # another node's actor, or already gone
        psutil.wait_procs(local, timeout=wait_s)
        self.actors.clear()


def run_cohort(jobs: list[Job], settings: EngineSettings, out_dir: Path, on_row: Callable[[dict], None],
               log: Callable[[str], None] = print) -> list[dict]:
    """Run ``jobs`` on ``settings.workers`` actors; one result row per job (status "ok" or "error").

    ClusterError when the cluster's GCS stops answering (head stopped or lost): Ray's own wait for it ends
    the process after 60 s without a word, so the driver checks first and leaves with one line.
    """
    from ray.exceptions import GetTimeoutError, RayActorError

    from totalseg_fast.engines.ray_cluster import ClusterError, probe

    rows: list[dict] = []
    if not jobs:
        return rows
    pool = _Pool(settings, log)
    pending: deque[int] = deque(range(len(jobs)))
    reserved: dict[int, int] = {}  # worker -> job it will run next (and prefetches)
    running: dict = {}  # result ref -> (worker, job index)
    replacements = settings.workers * MAX_ATTEMPTS
    if removed := remove_stale_partials(jobs):
        log(f"removed {removed} temporary output(s) left by an interrupted run")
    for _ in range(min(settings.workers, len(jobs))):
        pool.start()
    progress_at = probed_at = time.monotonic()
    gcs = pool.ray.get_runtime_context().gcs_address

    def check_cluster(grace_s: float = 0.0) -> None:
        """ClusterError if the GCS does not answer, now or (with ``grace_s``) at any probe within that time."""
        nonlocal probed_at
        until = time.monotonic() + grace_s
        while True:
            probed_at = time.monotonic()
            try:
                probe(gcs, timeout_s=2.0)
            except ClusterError:
                raise ClusterError(f"lost the Ray cluster at {gcs} mid-cohort (its GCS does not answer): finished "
                                   "outputs are kept; rerun with --resume once the cluster is back") from None
            if probed_at >= until:
                return
            time.sleep(DEATH_GRACE_STEP_S)

    def finish(index: int, row: dict) -> None:
        job = jobs[index]
        row = {**row, "input": job.input, "output": job.output, "attempts": job.attempts}
        if row.get("status") == "ok":
            append_manifest(out_dir, {k: row.get(k) for k in ("input", "output", "input_sha256", "input_bytes",
                                                               "output_bytes", "end")})
        rows.append(row)
        on_row(row)

    def next_for(w: int) -> int | None:
        if w in reserved:
            return reserved.pop(w)
        if pending:
            return pending.popleft()
        for other in list(reserved):  # the tail: take a case another busy actor had queued
            return reserved.pop(other)
        return None

    def dispatch(w: int) -> None:
        index = next_for(w)
        if index is None:
            pool.idle.append(w)
            return
        following = pending.popleft() if settings.prefetch and pending else None
        if following is not None:
            reserved[w] = following
        jobs[index].attempts += 1
        ref = pool.actors[w].process.remote(jobs[index].input, jobs[index].output,
                                            jobs[following].input if following is not None else None)
        running[ref] = (w, index)

    def on_death(w: int, index: int, exc: BaseException) -> None:
        nonlocal replacements
        job = jobs[index]
        remove_partial(job.output)
        # A stopping head kills its raylet (and so the actors) a moment before its GCS: probe for a while before
        # starting a replacement, a call that would hang 60 s and then end the process if the GCS is gone.
        check_cluster(grace_s=DEATH_GRACE_S)
        info = pool.info.get(w, {})
        job.deaths.append(f"worker {w} (pid {info.get('pid')}, {info.get('node')}) died")
        pool.actors.pop(w, None)
        if w in reserved:
            pending.appendleft(reserved.pop(w))
        if job.attempts < MAX_ATTEMPTS:
            log(f"retry: {job.input}: {job.deaths[-1]} mid-case ({type(exc).__name__}); attempt "
                f"{job.attempts + 1} on another worker")
            pending.appendleft(index)
        else:
            finish(index, {"status": "error", "error": f"{len(job.deaths)} workers died on this input "
                                                       f"(out of memory?): {'; '.join(job.deaths)}"})
        if replacements > 0:
            replacements -= 1
            pool.start()

    try:
        while pending or reserved or running:
            while pool.idle and (pending or reserved):
                dispatch(pool.idle.popleft())
            waiting = list(running) + list(pool.starting)
            if not waiting:
                reason = "; ".join(dict.fromkeys(pool.startup_errors)) or "no worker left"
                if not pool.info and pool.startup_errors:
                    raise WorkerStartError(f"no worker could start: {reason}")
                for index in [*pending, *reserved.values()]:
                    finish(index, {"status": "error", "error": f"not processed: {reason}"})
                pending.clear()
                reserved.clear()
                break
            done, _ = pool.ray.wait(waiting, num_returns=1, timeout=1.0)
            if not done and time.monotonic() - probed_at > PROBE_EVERY_S:
                check_cluster()
            if done or running:
                progress_at = time.monotonic()
            elif time.monotonic() - progress_at > START_TIMEOUT_S:
                reason = f"no worker became ready within {START_TIMEOUT_S:.0f} s (cluster busy, or a node lost?)"
                for index in [*pending, *reserved.values()]:
                    finish(index, {"status": "error", "error": f"not processed: {reason}"})
                pending.clear()
                reserved.clear()
                break
            for ref in done:
                if ref in pool.starting:
                    pool.on_ready(ref)
                    continue
                w, index = running.pop(ref)
                try:
                    row = pool.ray.get(ref)
                except RayActorError as exc:
                    on_death(w, index, exc)
                    continue
                except GetTimeoutError:
                    running[ref] = (w, index)
                    continue
                except Exception as exc:  # noqa: BLE001 - a task error outside the per-case handling
                    row = {"status": "error", "error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"}
                row["worker"] = w
                row.setdefault("node_ip", pool.info.get(w, {}).get("node_ip"))
                finish(index, row)
                pool.idle.append(w)
    finally:
        pool.kill_all()  # first: an actor still writing would recreate the file removed below
        for ref, (_, index) in running.items():
            remove_partial(jobs[index].output)
    return rows


def write_results(rows: list[dict], path: Path) -> Path:
    import pandas as pd

    from common.reports.report import write_text_atomic

    frame = pd.DataFrame(rows)
    for column in RESULT_COLUMNS:
        if column not in frame:
            frame[column] = None
    if len(frame):
        frame["cpus"] = [format_cpu_list(c) if isinstance(c, list) else (c or "") for c in frame.cpus]
        frame["case_s"] = pd.to_numeric(frame.end, errors="coerce") - pd.to_numeric(frame.start, errors="coerce")
    extra = [c for c in frame.columns if c not in RESULT_COLUMNS]
    write_text_atomic(path, frame[list(RESULT_COLUMNS) + extra].to_csv(index=False, float_format="%.6g"))
    return path
