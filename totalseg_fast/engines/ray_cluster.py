"""Ray for segment mode: the embedded local instance, attaching to a cluster, and how many workers fit.

- :func:`connect` starts an embedded Ray (no dashboard, a small object store, usage statistics off,
  token authentication left on) or attaches to ``--address`` / ``RAY_ADDRESS``. An address where
  nothing answers is one :class:`ClusterError` within seconds (a TCP probe first, then a watchdog
  around ``ray.init``, which otherwise retries for minutes).
- :func:`worker_memory_mb` is the memory an actor declares: the peak RSS per worker that 06 measured
  for the variant (+15 %), or a fallback when 06 has not run.
- :func:`plan_workers` checks every node's CPUs and memory: a cluster where no node can hold one
  worker is a :class:`ClusterError`, not an OOM kill; fewer workers than asked is a note.

Nothing here imports ray at module level: segment mode with ``--engine local`` never loads it.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CONNECT_TIMEOUT_S = 20.0  # the whole attach, probe included: the issue asks for an answer within 30 s
FALLBACK_WORKER_MB = 3000.0  # a 1-tile-at-a-time exact variant measured 2.9 GB peak RSS per worker here
RSS_MARGIN = 1.15  # as sweeps.RSS_MARGIN
LOOPBACK = "127.0.0.1"  # the embedded instance's node IP: every Ray port on it listens on loopback only


class ClusterError(RuntimeError):
    """One line for the user: the cluster cannot be reached or cannot hold a worker (exit code 2)."""


@dataclass
class Connection:
    mode: str  # "embedded" or "attached"
    address: str
    startup_s: float  # ray.init wall time
    notes: list[str] = field(default_factory=list)


def object_store_bytes(total_bytes: int | None = None) -> int:
    """A small object store sized to the machine: 2 % of RAM within 96 MB .. 1 GB (only paths travel)."""
    if total_bytes is None:
        import psutil

        total_bytes = psutil.virtual_memory().total
    return int(min(max(total_bytes * 0.02, 96 * 2**20), 2**30))


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClusterError(f"--address {address!r}: expected HOST:PORT (the head's GCS port, 6379 by default)")
    return host.strip("[]"), int(port)


def probe(address: str, timeout_s: float = 5.0) -> None:
    """ClusterError unless something accepts a TCP connection at HOST:PORT."""
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ClusterError(f"no Ray cluster at {address}: {reason} (start one with `ray start --head`, "
                           "or omit --address for an embedded local instance)") from None


def protect_token() -> str | None:
    """Ray writes its token world-readable (0644) under ~/.ray: make it the owner's alone. Returns the path."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        if path.is_file() and path.stat().st_mode & 0o077:
            path.chmod(0o600)
        return str(path) if path.is_file() else None
    except OSError:
        return None


def _watchdog(seconds: float, address: str) -> threading.Timer:
    def expire() -> None:  # ray.init cannot be interrupted from another thread: leave with one line
        print(f"error: no Ray cluster at {address} answered within {seconds:.0f} s (not a Ray head's GCS port, "
              "or its token differs from this machine's ~/.ray/auth_token / RAY_AUTH_TOKEN)", file=sys.stderr, flush=True)
        os._exit(2)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    return timer


def _code_path_env() -> dict:
    """Workers on a cluster's nodes import ``common`` from the same path as here (the README's layout: the
    code at the same path on every node); the driver's PYTHONPATH travels with it."""
    from common.core import paths

    entries = [str(paths.REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(entries))}}


@contextlib.contextmanager
def _loopback_node_ip():
    """Let ray.init keep ``_node_ip_address="127.0.0.1"``, so that every Ray port listens on loopback only.

    Ray 2.60 binds the GCS, the raylet (node and object manager) and every core worker (driver, actors)
    to 127.0.0.1 when the node's IP is 127.0.0.1, and to all interfaces otherwise; its agents (runtime
    env; with ray[default] also the dashboard agent and the metrics exporter) bind to the node's IP. On
    Linux ray.init swaps a loopback node IP for the machine's address unless clusters are disabled
    (macOS/Windows's default, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), a flag ray reads when it is
    imported: too late for the variable here, so the flag itself is off during the start.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def connect(address: str | None, num_cpus: int | None = None) -> Connection:
    """Start an embedded Ray instance (address None) or attach to one; ClusterError when that fails."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    notes = []
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        notes.append(f"RAY_AUTH_MODE={mode}: token authentication is OFF (anyone reaching the ports can run code)")
    if address:  # read by Ray when it is imported: set first
        if mode is None and (os.environ.get("RAY_AUTH_TOKEN") or protect_token()):
            os.environ["RAY_AUTH_MODE"] = "token"  # ray.init(address=...) sends no token unless told to
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")  # not one retry line per second on stderr
    import ray

    if ray.is_initialized():
        return Connection("attached", "already initialised", 0.0, notes)
    start = time.perf_counter()
    if address:
        if address != "auto":
            probe(address)
        timer = _watchdog(CONNECT_TIMEOUT_S - (time.perf_counter() - start), address)
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False, runtime_env=_code_path_env())
        except Exception as exc:  # noqa: BLE001 - auth, version mismatch, ...: one line
            raise ClusterError(f"cannot attach to Ray at {address}: {type(exc).__name__}: "
                               f"{(str(exc).strip().splitlines() or [''])[0][:300]}") from None
        finally:
            timer.cancel()
        return Connection("attached", address, time.perf_counter() - start, notes)
    # Embedded means a new instance: not RAY_ADDRESS's cluster, nor (without address="local") the latest
    # cluster that `ray start` recorded on this machine in /tmp/ray/ray_current_cluster.
    saved = os.environ.pop("RAY_ADDRESS", None)
    try:
        with _loopback_node_ip():
            ray.init(address="local", num_cpus=num_cpus or len(os.sched_getaffinity(0)), include_dashboard=False,
                     object_store_memory=object_store_bytes(), logging_level="ERROR", log_to_driver=False,
                     _node_ip_address=LOOPBACK)
    except Exception as exc:  # noqa: BLE001
        raise ClusterError(f"cannot start an embedded Ray instance: {type(exc).__name__}: "
                           f"{(str(exc).strip().splitlines() or [''])[0][:300]}") from None
    finally:
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved
    elapsed = time.perf_counter() - start
    if ray.util.get_node_ip_address() != LOOPBACK:
        notes.append(f"Ray took node IP {ray.util.get_node_ip_address()}, not {LOOPBACK}: its ports listen beyond "
                     "localhost (token authentication still applies)")
    token = protect_token()
    if token:
        notes.append(f"token authentication on (token {token}, mode 0600)")
    return Connection("embedded", ray.get_runtime_context().gcs_address, elapsed, notes)


def shutdown(connection: Connection | None) -> None:
    import ray

    if connection is not None and ray.is_initialized():
        ray.shutdown()


def ray_system_rss_mb() -> float:
    """RSS of this machine's Ray processes (GCS, raylet, agents, idle workers), not counting actors'
    pipelines: 'ray::SegmentWorker' processes are excluded."""
    import psutil

    total = 0
    for proc in psutil.process_iter(["cmdline", "memory_info", "name"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if "SegmentWorker" in cmd or "SegmentWorker" in (proc.info["name"] or ""):
                continue
            if ("/ray/" in cmd or cmd.startswith("ray::")) and proc.pid != os.getpid():
                total += proc.info["memory_info"].rss
        except (psutil.Error, TypeError, AttributeError):
            continue
    return total / 2**20


def worker_memory_mb(variant: str, bench_dir: Path | None = None) -> tuple[float, str]:
    """(MB an actor declares, where it comes from): 06's measured peak RSS per worker for ``variant`` + 15 %."""
    import pandas as pd

    from common.core import paths

    folder = Path(bench_dir or paths.BENCHMARKS_DIR)
    peaks = []
    for name in ("production_throughput_items.csv", "production_latency_sweep.csv"):
        try:
            frame = pd.read_csv(folder / name)
            peaks += list(frame[(frame.variant == variant)].peak_rss_mb.dropna())
        except (OSError, ValueError, AttributeError, KeyError):
            continue
    if peaks:
        return max(peaks) * RSS_MARGIN, f"06's peak RSS per worker for {variant} ({max(peaks):.0f} MB) + 15 %"
    return FALLBACK_WORKER_MB, f"no 06 measurement for {variant}: assumed {FALLBACK_WORKER_MB:.0f} MB"


def plan_workers(workers: int, threads: int, memory_mb: float) -> tuple[int, list[str]]:
    """How many of ``workers`` actors (``threads`` CPUs, ``memory_mb`` each) the live nodes can hold.

    ClusterError if none can hold one. On this machine the memory also counts what is free right now
    (Ray's own processes included), not only Ray's memory resource, which is a fraction of the total.
    """
    import ray

    notes, fit, biggest = [], 0, 0.0
    here = ray.util.get_node_ip_address()
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        mem_mb = res.get("memory", 0) / 2**20
        if node.get("NodeManagerAddress") == here:
            import psutil

            mem_mb = min(mem_mb, psutil.virtual_memory().available / 2**20)
        biggest = max(biggest, mem_mb)
        fit += min(int(res.get("CPU", 0) // threads), int(mem_mb // memory_mb))
    if fit == 0:
        raise ClusterError(f"no node can hold one worker: a worker needs {threads} CPU(s) and {memory_mb:.0f} MB, "
                           f"the largest node offers {biggest:.0f} MB (use a lighter --variant, fewer --threads, "
                           "or --worker-memory-mb if the measurement does not apply)")
    if fit < workers:
        notes.append(f"only {fit} of {workers} workers fit in the cluster's CPUs and memory ({memory_mb:.0f} MB each)")
    return min(fit, workers), notes
