"""Thread settings applied the same way to every runtime, and the environment record of a result."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata

from common.core import paths

# The one list of thread-count variables: apply_threads here, pinned children (production/pinning.py) and
# the reproduce command lines set each of them.
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "nnUNet_def_n_proc", "nnUNet_n_proc_DA")
PACKAGES = ("numpy", "scipy", "nibabel", "torch", "onnxruntime", "openvino", "nnunetv2", "totalsegmentator")


def affinity_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def default_threads() -> int:
    """CPUs this process may run on (its affinity mask), not the machine's CPU count."""
    return len(affinity_cpus())


def apply_threads(threads: int) -> None:
    """Set OpenMP/BLAS/nnU-Net caps in the environment (children inherit them) and torch's pool."""
    for var in THREAD_ENV:
        os.environ[var] = str(threads)
    torch = sys.modules.get("torch")  # not imported here: a torch imported later reads OMP_NUM_THREADS (set above),
    if torch is not None:             # and the ONNX Runtime / OpenVINO workers never load its 550 MB
        torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(threads)
    except ImportError:
        pass


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(paths.REPO_ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(paths.REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def environment_record(threads: int) -> dict:
    from common.model.weights import read_model_info
    from common.production.topology import read_topology

    info = read_model_info()
    topo = read_topology()
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": " ".join(topo.flags),
        "affinity": topo.summary().get("cpus", ""),
        "threads": threads,
        "thread_env": {var: os.environ.get(var, "") for var in THREAD_ENV},
        "python": platform.python_version(),
        "packages": package_versions(),
        "weights_kind": info.get("weights_kind", "unknown"),
        "checkpoint_sha256": info.get("checkpoint_sha256", ""),
        "git_commit": git_commit(),
    }
