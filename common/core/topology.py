"""CPU topology of this process (packages, cores, SMT, L3 domains, NUMA) and worker CPU-set planning.

Everything is read from Linux sysfs (``/sys/devices/system``) and ``/proc/cpuinfo``, limited to the
CPUs in the process affinity mask. Missing files degrade to a simpler model (one L3 domain, one
NUMA node, one thread per core) and the degradation is recorded in ``Topology.notes``.
"""
from __future__ import annotations

import os
import platform
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# Flags that matter for CPU inference kernels (oneDNN / MLAS / OpenVINO pick code paths on these).
FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni")
FLAG_PREFIXES_OF_INTEREST = ("amx",)


def parse_cpu_list(text: str) -> list[int]:
    """Parse a kernel CPU list such as ``"0-3,8,10-11"`` into a sorted list of CPU ids."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise ValueError(f"invalid CPU list element {part!r} in {text!r}")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise ValueError(f"invalid CPU range {part!r} in {text!r}")
        cpus.update(range(first, last + 1))
    return sorted(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """Format CPU ids as a compact kernel-style list: ``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    ids = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


@dataclass(frozen=True)
class CpuInfo:
    """Placement of one logical CPU."""

    cpu: int
    package: int
    core_id: int
    siblings: tuple[int, ...]  # SMT siblings as the kernel lists them (including this CPU)
    l3: int  # index into Topology.l3_domains
    node: int  # NUMA node id, -1 if unknown

    @property
    def core_key(self) -> int:
        """Identifier of the physical core: the lowest CPU id among its SMT siblings."""
        return min(self.siblings)


@dataclass
class Topology:
    """CPU topology restricted to the process affinity mask."""

    cpus: list[int]
    cpu_info: dict[int, CpuInfo]
    l3_domains: list[list[int]]
    numa_nodes: dict[int, list[int]]
    model_name: str = "unknown"
    flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def physical_cores(self) -> list[list[int]]:
        """Affinity CPUs grouped by physical core, ordered by NUMA node, L3 domain, then CPU id."""
        groups: dict[int, list[int]] = {}
        for cpu in self.cpus:
            groups.setdefault(self.cpu_info[cpu].core_key, []).append(cpu)
        return sorted(groups.values(), key=lambda cores: self._core_sort_key(cores[0]))

    @property
    def threads_per_core(self) -> int:
        """Largest number of affinity CPUs sharing one physical core (1 = no SMT in the mask)."""
        return max((len(c) for c in self.physical_cores), default=0)

    @property
    def packages(self) -> list[int]:
        """Physical package (socket) ids present in the affinity mask."""
        return sorted({self.cpu_info[c].package for c in self.cpus})

    def _core_sort_key(self, cpu: int) -> tuple[int, int, int]:
        info = self.cpu_info[cpu]
        return (info.node, info.l3, info.core_key)

    def placement_domains(self) -> list[tuple[int, list[int]]]:
        """``(numa_node, cpus)`` for each L3 domain split by NUMA node: CPUs sharing both L3 and memory."""
        groups: dict[tuple[int, int], list[int]] = {}
        for cpu in self.cpus:
            info = self.cpu_info[cpu]
            groups.setdefault((info.node, info.l3), []).append(cpu)
        return [(node, cpus) for (node, _), cpus in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[1][0]))]

    def summary(self) -> dict:
        """JSON-serialisable description for reports."""
        return {
            "model_name": self.model_name,
            "flags": list(self.flags),
            "cpus": format_cpu_list(self.cpus),
            "n_cpus": len(self.cpus),
            "packages": len(self.packages),
            "physical_cores": len(self.physical_cores),
            "threads_per_core": self.threads_per_core,
            "numa_nodes": {str(node): format_cpu_list(cpus) for node, cpus in sorted(self.numa_nodes.items())},
            "l3_domains": [format_cpu_list(d) for d in self.l3_domains],
            "notes": list(self.notes),
        }

    def to_markdown(self) -> str:
        """Short two-column Markdown table of the summary."""
        s = self.summary()
        nodes = "; ".join(f"node{n}: {cpus}" for n, cpus in s["numa_nodes"].items())
        rows = [
            ("CPU model", s["model_name"]),
            ("CPUs (affinity)", f"{s['n_cpus']} ({s['cpus']})"),
            ("Packages / cores / threads per core", f"{s['packages']} / {s['physical_cores']} / {s['threads_per_core']}"),
            ("NUMA nodes", f"{len(s['numa_nodes'])} ({nodes})"),
            ("L3 domains", f"{len(s['l3_domains'])} ({'; '.join(s['l3_domains'])})"),
            ("ISA flags", ", ".join(s["flags"]) or "none detected"),
        ]
        if s["notes"]:
            rows.append(("Notes", "; ".join(s["notes"])))
        lines = ["| Topology | |", "|---|---|"]
        lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows]
        return "\n".join(lines)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _read_l3_shared(cpu_dir: Path) -> list[int] | None:
    for index_dir in sorted(cpu_dir.glob("cache/index*")):
        if _read(index_dir / "level") == "3":
            shared = _read(index_dir / "shared_cpu_list")
            if shared:
                return parse_cpu_list(shared)
    return None


def _read_cpuinfo(path: Path) -> tuple[str | None, list[str]]:
    """Model name and the flags of interest, from the first processor entry of /proc/cpuinfo."""
    text = _read(path)
    if text is None:
        return None, []
    model = None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if model is None and key in ("model name", "cpu model", "processor") and not value.strip().isdigit():
            model = value.strip() or None
        elif not flags and key in ("flags", "features"):
            flags = set(value.split())
    wanted = [f for f in FLAGS_OF_INTEREST if f in flags]
    wanted += sorted(f for f in flags if f.startswith(FLAG_PREFIXES_OF_INTEREST))
    return model, wanted


def read_topology(
    sysfs_root: str | os.PathLike = "/sys/devices/system",
    affinity: Iterable[int] | None = None,
    cpuinfo_path: str | os.PathLike = "/proc/cpuinfo",
) -> Topology:
    """Read the topology of the CPUs in ``affinity`` (default: this process's affinity mask)."""
    root = Path(sysfs_root)
    cpus = sorted(set(affinity if affinity is not None else os.sched_getaffinity(0)))
    if not cpus:
        raise ValueError("empty CPU affinity set")
    notes: list[str] = []

    node_of: dict[int, int] = {}
    for node_dir in sorted(root.glob("node/node[0-9]*")):
        cpulist = _read(node_dir / "cpulist")
        if cpulist is not None:
            for cpu in parse_cpu_list(cpulist):
                node_of[cpu] = int(node_dir.name[4:])
    if not node_of:
        notes.append("no NUMA information in sysfs: assumed a single node 0")
        node_of = {cpu: 0 for cpu in cpus}
    elif missing := [c for c in cpus if c not in node_of]:
        notes.append(f"CPUs {format_cpu_list(missing)} are in no NUMA node: node -1")

    raw: dict[int, tuple[int, int, tuple[int, ...], list[int] | None]] = {}
    no_topology: list[int] = []
    for cpu in cpus:
        cpu_dir = root / "cpu" / f"cpu{cpu}"
        topo = cpu_dir / "topology"
        package = _read_int(topo / "physical_package_id")
        core_id = _read_int(topo / "core_id")
        siblings_text = _read(topo / "core_cpus_list") or _read(topo / "thread_siblings_list")
        siblings = tuple(parse_cpu_list(siblings_text)) if siblings_text else (cpu,)
        if cpu not in siblings:  # malformed sibling list; trust the CPU id over it
            siblings = (cpu,)
        if package is None or core_id is None or siblings_text is None:
            no_topology.append(cpu)
        raw[cpu] = (package if package is not None else 0, core_id if core_id is not None else cpu, siblings,
                    _read_l3_shared(cpu_dir))
    if no_topology:
        notes.append(f"incomplete sysfs topology for CPUs {format_cpu_list(no_topology)}: "
                     "each treated as its own core on package 0")

    # Group by the kernel's full shared_cpu_list, so CPUs of one L3 stay together whatever the mask.
    l3_groups: dict[tuple[int, ...] | None, list[int]] = {}
    for cpu in cpus:
        shared = raw[cpu][3]
        l3_groups.setdefault(tuple(shared) if shared else None, []).append(cpu)
    if None in l3_groups:
        unknown = l3_groups[None]
        notes.append("no L3 cache information in sysfs" + ("" if len(unknown) == len(cpus) else
                     f" for CPUs {format_cpu_list(unknown)}") + ": treated as one shared L3 domain")
    l3_domains = sorted(l3_groups.values(), key=lambda d: d[0])
    l3_index = {cpu: i for i, domain in enumerate(l3_domains) for cpu in domain}

    cpu_info = {
        cpu: CpuInfo(cpu=cpu, package=raw[cpu][0], core_id=raw[cpu][1], siblings=raw[cpu][2],
                     l3=l3_index[cpu], node=node_of.get(cpu, -1))
        for cpu in cpus
    }
    numa_nodes: dict[int, list[int]] = {}
    for cpu in cpus:
        numa_nodes.setdefault(cpu_info[cpu].node, []).append(cpu)

    model, flags = _read_cpuinfo(Path(cpuinfo_path))
    if model is None:
        model = platform.processor() or platform.machine() or "unknown"
        notes.append(f"no model name in {cpuinfo_path}")
    return Topology(cpus=cpus, cpu_info=cpu_info, l3_domains=l3_domains, numa_nodes=numa_nodes,
                    model_name=model, flags=flags, notes=notes)


def _interleave_by_node(domains: list[tuple[int, list[int]]]) -> list[list[int]]:
    """Order domains so that consecutive ones alternate NUMA nodes: n0d0, n1d0, n0d1, n1d1, ..."""
    rank: dict[int, int] = {}
    keyed = []
    for node, cpus in domains:
        keyed.append(((rank.get(node, 0), node, cpus[0]), cpus))
        rank[node] = rank.get(node, 0) + 1
    return [cpus for _, cpus in sorted(keyed, key=lambda kv: kv[0])]


def _assign_round_robin(free_sizes: list[int], workers: int, threads: int) -> list[int]:
    """Domain index for up to ``workers`` workers, cycling over domains that still have ``threads`` free CPUs."""
    free = list(free_sizes)
    assigned: list[int] = []
    start = 0
    while len(assigned) < workers:
        for step in range(len(free)):
            d = (start + step) % len(free)
            if free[d] >= threads:
                assigned.append(d)
                free[d] -= threads
                start = d + 1
                break
        else:
            break  # no domain has room left at this level
    return assigned


def _pick_from_domain(topology: Topology, free_cpus: list[int], n_workers: int, threads: int) -> list[list[int]]:
    """Split ``n_workers * threads`` of ``free_cpus`` into worker sets, one thread per core before SMT siblings.

    CPUs are chosen first-thread-of-every-core first; the chosen ones are then dealt out core by core,
    so that when SMT siblings are needed each worker owns whole cores instead of sharing them.
    """
    by_core: dict[int, list[int]] = {}
    for cpu in sorted(free_cpus, key=topology._core_sort_key):
        by_core.setdefault(topology.cpu_info[cpu].core_key, []).append(cpu)
    core_order = {key: i for i, key in enumerate(by_core)}
    thread_rank = {cpu: r for cores in by_core.values() for r, cpu in enumerate(cores)}

    def rank_key(cpu: int) -> tuple[int, int]:
        return thread_rank[cpu], core_order[topology.cpu_info[cpu].core_key]

    chosen = sorted(free_cpus, key=rank_key)[: n_workers * threads]
    chosen.sort(key=lambda cpu: rank_key(cpu)[::-1])
    return [sorted(chosen[i * threads:(i + 1) * threads]) for i in range(n_workers)]


def plan_worker_cpusets(topology: Topology, workers: int, threads_per_worker: int) -> list[list[int]]:
    """Disjoint CPU sets for ``workers`` workers of ``threads_per_worker`` threads each.

    A worker stays inside one L3 domain and one NUMA node when it fits; workers are spread
    round-robin over domains (alternating NUMA nodes). Workers that fit in no remaining L3
    domain fall back to one NUMA node, then to any free CPUs. Within a domain one thread per
    physical core is used before SMT siblings. Raises ValueError if workers x threads exceeds
    the CPUs of the topology.
    """
    if workers < 1 or threads_per_worker < 1:
        raise ValueError(f"workers and threads_per_worker must be >= 1 (got {workers} and {threads_per_worker})")
    needed = workers * threads_per_worker
    if needed > len(topology.cpus):
        raise ValueError(
            f"{workers} workers x {threads_per_worker} threads = {needed} CPUs, but only {len(topology.cpus)} "
            f"CPUs are in the affinity mask ({format_cpu_list(topology.cpus)}); reduce workers or threads per worker"
        )
    levels = [
        _interleave_by_node(topology.placement_domains()),
        [cpus for _, cpus in sorted(topology.numa_nodes.items())],
        [list(topology.cpus)],
    ]
    free = set(topology.cpus)
    cpusets: list[list[int]] = []
    for domains in levels:
        remaining = workers - len(cpusets)
        if remaining == 0:
            break
        free_domains = [[c for c in d if c in free] for d in domains]
        assigned = _assign_round_robin([len(d) for d in free_domains], remaining, threads_per_worker)
        picked = {
            d: iter(_pick_from_domain(topology, free_domains[d], assigned.count(d), threads_per_worker))
            for d in set(assigned)
        }
        for d in assigned:
            cpuset = next(picked[d])
            cpusets.append(cpuset)
            free.difference_update(cpuset)
    assert len(cpusets) == workers  # the last level holds all CPUs and needed <= len(cpus)
    return cpusets
