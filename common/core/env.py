"""Thread settings applied the same way to every runtime, and the environment record of a result."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from common.core import paths

# The one list of thread-count variables: apply_threads here, pinned children (production/pinning.py) and
# the reproduce command lines set each of them.
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "nnUNet_def_n_proc", "nnUNet_n_proc_DA")
PACKAGES = ("numpy", "scipy", "nibabel", "torch", "onnxruntime", "openvino", "nnunetv2", "totalsegmentator")
# The ISA flags that decide which kernels the runtimes pick (fp32 AVX-512, bf16, int8 VNNI, AMX tiles).
KEY_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni")


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


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The first CPU's flags as the kernel reports them (empty where /proc/cpuinfo is unreadable)."""
    try:
        for line in open(cpuinfo):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def key_flags(flags: set[str] | None = None) -> dict[str, bool]:
    flags = cpu_flags() if flags is None else flags
    return {flag: flag in flags for flag in KEY_FLAGS}


def online_cpus() -> int:
    return os.sysconf("SC_NPROCESSORS_ONLN")


def l3_bytes(cpus: list[int] | None = None, sysfs: Path = Path("/sys/devices/system/cpu")) -> int | None:
    """Total L3 over the distinct L3 caches the given CPUs (default: the affinity mask) share; None if unknown."""
    caches = {}
    for cpu in affinity_cpus() if cpus is None else cpus:
        for index in (sysfs / f"cpu{cpu}" / "cache").glob("index*"):
            try:
                if (index / "level").read_text().strip() != "3":
                    continue
                size = (index / "size").read_text().strip()
                shared = (index / "shared_cpu_list").read_text().strip()
            except OSError:
                continue
            unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
            caches[shared] = int(size.rstrip("KMG")) * unit
    return sum(caches.values()) or None


def ram_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    try:
        for line in open(meminfo):
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


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
    from common.core.topology import read_topology

    info = read_model_info()
    topo = read_topology()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "load_average": " / ".join(f"{v:.2f}" for v in os.getloadavg()),
        "cpu_model": cpu_model(),
        "key_flags": key_flags(),
        "cpus_online": online_cpus(),
        "cpus_affinity": len(topo.cpus),
        "l3_bytes": l3_bytes(topo.cpus),
        "ram_bytes": ram_bytes(),
        "os": f"{platform.system()} {platform.release()}",
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
