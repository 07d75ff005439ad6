"""CPU topology parsing from fake sysfs trees, and L3/NUMA-aware worker CPU-set planning."""
import json
import os
from pathlib import Path

import pytest

from common.core.topology import format_cpu_list, parse_cpu_list, plan_worker_cpusets, read_topology

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_bf16 avx512_vnni amx_tile amx_int8
"""


def make_sysfs(root: Path, cpus: dict[int, dict], nodes: dict[int, list[int]] | None = None) -> Path:
    """Fake /sys/devices/system: cpus maps cpu -> {package, core, siblings, l3 (list or None)}."""
    for cpu, spec in cpus.items():
        topo = root / "cpu" / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{spec.get('package', 0)}\n")
        (topo / "core_id").write_text(f"{spec['core']}\n")
        (topo / "thread_siblings_list").write_text(format_cpu_list(spec.get("siblings", [cpu])) + "\n")
        cache = root / "cpu" / f"cpu{cpu}" / "cache"
        for index, (level, shared) in enumerate([(1, [cpu]), (2, [cpu]), (3, spec.get("l3"))]):
            if shared is None:
                continue
            (cache / f"index{index}").mkdir(parents=True)
            (cache / f"index{index}" / "level").write_text(f"{level}\n")
            (cache / f"index{index}" / "shared_cpu_list").write_text(format_cpu_list(shared) + "\n")
    for node, node_cpus in (nodes or {}).items():
        (root / "node" / f"node{node}").mkdir(parents=True)
        (root / "node" / f"node{node}" / "cpulist").write_text(format_cpu_list(node_cpus) + "\n")
    return root


def check_plan(topology, cpusets, workers, threads):
    """Invariants of every plan: right sizes, disjoint, inside the affinity mask."""
    assert len(cpusets) == workers
    assert all(len(s) == threads for s in cpusets)
    flat = [c for s in cpusets for c in s]
    assert len(flat) == len(set(flat)), f"overlapping cpusets {cpusets}"
    assert set(flat) <= set(topology.cpus)


def domain_of(topology, cpuset):
    return {topology.cpu_info[c].l3 for c in cpuset}


def node_of(topology, cpuset):
    return {topology.cpu_info[c].node for c in cpuset}


@pytest.fixture
def one_l3_4cpus(tmp_path):
    cpus = {c: {"core": c, "l3": [0, 1, 2, 3]} for c in range(4)}
    return make_sysfs(tmp_path / "sys", cpus, nodes={0: [0, 1, 2, 3]})


@pytest.fixture
def two_ccx_smt(tmp_path):
    """EPYC-like: 4 cores x 2 threads (siblings c and c+4), two CCX of 2 cores, each with its own L3."""
    cpus = {}
    for cpu in range(8):
        core = cpu % 4
        cpus[cpu] = {"core": core, "siblings": [core, core + 4],
                     "l3": [0, 1, 4, 5] if core < 2 else [2, 3, 6, 7]}
    return make_sysfs(tmp_path / "sys", cpus, nodes={0: list(range(8))})


def test_parse_and_format_cpu_list():
    assert parse_cpu_list("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpu_list(" 5\n") == [5]
    assert parse_cpu_list("") == []
    assert format_cpu_list([0, 1, 2, 5]) == "0-2,5"
    assert format_cpu_list([5, 1, 0, 1, 2]) == "0-2,5"
    assert format_cpu_list([0, 2, 3, 4, 6, 7]) == "0,2-4,6-7"
    assert format_cpu_list([]) == ""
    cpus = [0, 1, 2, 3, 8, 10, 11, 64, 65]
    assert parse_cpu_list(format_cpu_list(cpus)) == cpus
    for bad in ("3-1", "a", "1-", "0,,x"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


def test_one_l3_domain_four_cpus(one_l3_4cpus, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO)
    topo = read_topology(one_l3_4cpus, affinity=range(4), cpuinfo_path=cpuinfo)
    assert topo.cpus == [0, 1, 2, 3]
    assert topo.l3_domains == [[0, 1, 2, 3]]
    assert topo.numa_nodes == {0: [0, 1, 2, 3]}
    assert topo.threads_per_core == 1 and len(topo.physical_cores) == 4
    assert topo.model_name == "AMD EPYC 9654 96-Core Processor"
    assert topo.flags == ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_tile"]
    assert topo.notes == []

    assert plan_worker_cpusets(topo, 2, 2) == [[0, 1], [2, 3]]
    assert plan_worker_cpusets(topo, 4, 1) == [[0], [1], [2], [3]]
    assert plan_worker_cpusets(topo, 1, 4) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match=r"3 workers x 2 threads = 6 CPUs, but only 4"):
        plan_worker_cpusets(topo, 3, 2)
    with pytest.raises(ValueError):
        plan_worker_cpusets(topo, 5, 1)
    with pytest.raises(ValueError):
        plan_worker_cpusets(topo, 0, 1)


def test_affinity_subset_limits_everything(one_l3_4cpus):
    topo = read_topology(one_l3_4cpus, affinity=[1, 3])
    assert topo.cpus == [1, 3]
    assert topo.l3_domains == [[1, 3]]
    assert topo.numa_nodes == {0: [1, 3]}
    assert plan_worker_cpusets(topo, 2, 1) == [[1], [3]]
    with pytest.raises(ValueError, match="only 2 CPUs"):
        plan_worker_cpusets(topo, 1, 3)


def test_missing_cache_and_node_info_degrade_to_one_domain(tmp_path):
    cpus = {c: {"core": c, "l3": None} for c in range(4)}
    root = make_sysfs(tmp_path / "sys", cpus, nodes=None)
    topo = read_topology(root, affinity=range(4), cpuinfo_path=tmp_path / "missing_cpuinfo")
    assert topo.l3_domains == [[0, 1, 2, 3]]
    assert topo.numa_nodes == {0: [0, 1, 2, 3]}
    assert any("L3" in n for n in topo.notes) and any("NUMA" in n for n in topo.notes)
    assert topo.flags == []

    # No sysfs at all: still a usable topology (each CPU its own core).
    bare = read_topology(tmp_path / "nothing", affinity=[0, 1])
    assert bare.l3_domains == [[0, 1]] and len(bare.physical_cores) == 2
    assert plan_worker_cpusets(bare, 2, 1) == [[0], [1]]


def test_two_l3_domains_with_smt(two_ccx_smt):
    topo = read_topology(two_ccx_smt, affinity=range(8))
    assert topo.l3_domains == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert topo.physical_cores == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert topo.threads_per_core == 2
    assert topo.summary()["physical_cores"] == 4

    # One worker per domain, one thread per physical core (no SMT siblings while cores are free).
    plan = plan_worker_cpusets(topo, 2, 2)
    assert plan == [[0, 1], [2, 3]]
    assert [domain_of(topo, s) for s in plan] == [{0}, {1}]

    # Round-robin across domains, first threads of every core before any sibling.
    assert plan_worker_cpusets(topo, 4, 1) == [[0], [2], [1], [3]]

    # Siblings needed: each worker owns whole cores rather than sharing cores with another worker.
    plan = plan_worker_cpusets(topo, 4, 2)
    assert plan == [[0, 4], [2, 6], [1, 5], [3, 7]]
    for cpuset in plan:
        check_plan(topo, [cpuset], 1, 2)
        assert len({topo.cpu_info[c].core_key for c in cpuset}) == 1

    for workers, threads in [(2, 3), (2, 4), (8, 1), (1, 4), (3, 2)]:
        plan = plan_worker_cpusets(topo, workers, threads)
        check_plan(topo, plan, workers, threads)
        assert all(len(domain_of(topo, s)) == 1 for s in plan), (workers, threads, plan)
        per_domain = [sum(domain_of(topo, s) == {d} for s in plan) for d in range(2)]
        assert max(per_domain) - min(per_domain) <= 1, f"workers not spread: {plan}"

    # Worker larger than an L3 domain: allowed, spans both.
    assert plan_worker_cpusets(topo, 1, 8) == [list(range(8))]
    with pytest.raises(ValueError, match="9 CPUs, but only 8"):
        plan_worker_cpusets(topo, 3, 3)


def test_two_numa_nodes(tmp_path):
    # Two nodes, each with two L3 domains of 2 CPUs.
    cpus = {c: {"core": c, "package": c // 4, "l3": [c - c % 2, c - c % 2 + 1]} for c in range(8)}
    topo = read_topology(make_sysfs(tmp_path / "a", cpus, nodes={0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}),
                         affinity=range(8))
    assert topo.numa_nodes == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}
    assert topo.l3_domains == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert topo.packages == [0, 1]
    # Spread alternates nodes before filling a second L3 domain of the same node.
    assert plan_worker_cpusets(topo, 2, 1) == [[0], [4]]
    assert plan_worker_cpusets(topo, 4, 1) == [[0], [4], [2], [6]]
    # Too big for an L3 domain, fits a node: one node per worker.
    plan = plan_worker_cpusets(topo, 2, 4)
    assert plan == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [node_of(topo, s) for s in plan] == [{0}, {1}]
    # Mixed: 2-CPU workers stay in L3 domains; a 3-CPU worker at least stays in one node.
    plan = plan_worker_cpusets(topo, 2, 3)
    check_plan(topo, plan, 2, 3)
    assert [node_of(topo, s) for s in plan] == [{0}, {1}]


def test_l3_spanning_two_nodes_is_split_by_node(tmp_path):
    # Sub-NUMA clustering: one L3 for the package, two NUMA nodes. Workers must not straddle nodes.
    cpus = {c: {"core": c, "l3": list(range(8))} for c in range(8)}
    topo = read_topology(make_sysfs(tmp_path / "sys", cpus, nodes={0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}),
                         affinity=range(8))
    assert topo.l3_domains == [list(range(8))]
    plan = plan_worker_cpusets(topo, 2, 4)
    assert plan == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert plan_worker_cpusets(topo, 2, 1) == [[0], [4]]


def test_real_machine_topology_reads():
    topo = read_topology()
    assert topo.cpus == sorted(os.sched_getaffinity(0))
    in_domains = sorted(c for d in topo.l3_domains for c in d)
    assert in_domains == topo.cpus, "every CPU must be in exactly one L3 domain"
    assert sorted(c for cpus in topo.numa_nodes.values() for c in cpus) == topo.cpus
    assert sorted(c for core in topo.physical_cores for c in core) == topo.cpus
    summary = json.loads(json.dumps(topo.summary()))
    assert summary["n_cpus"] == len(topo.cpus)
    assert summary["cpus"] == format_cpu_list(topo.cpus)
    markdown = topo.to_markdown()
    assert markdown.startswith("| Topology") and topo.model_name in markdown
    plan = plan_worker_cpusets(topo, len(topo.cpus), 1)
    check_plan(topo, plan, len(topo.cpus), 1)
