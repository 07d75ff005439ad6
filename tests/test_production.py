"""06 benchmark mode: sweeps scale from the topology, variants come from 05's numbers, the recommendation is
derived from the measurements, memory refusal, and a real throughput run (W=2 x T=1, two small cases)."""
import os
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from common.production import sweeps
from common.variants.choice import VariantChoice, choose_variants
from common.production.cold_start import cold_start
from common.production.recommend import recommend, reproduce_lines
from common.core.topology import read_topology
from tests.test_topology import make_sysfs

AFFINITY = sorted(os.sched_getaffinity(0))


def fake_topology(tmp_path, n_cpus, l3_size, numa_nodes=1):
    cpus = {c: {"core": c, "l3": list(range(c - c % l3_size, c - c % l3_size + l3_size))} for c in range(n_cpus)}
    per_node = n_cpus // numa_nodes
    nodes = {n: list(range(n * per_node, (n + 1) * per_node)) for n in range(numa_nodes)}
    root = make_sysfs(tmp_path / f"sys{n_cpus}", cpus, nodes)
    return read_topology(root, affinity=range(n_cpus), cpuinfo_path=tmp_path / "no_cpuinfo")


def case(case_id, image, shape=(1, 1, 1)):
    return SimpleNamespace(case_id=case_id, image=Path(image), label=None, label_map={}, shape=shape)


def test_sweeps_scale_with_the_machine(tmp_path):
    small = fake_topology(tmp_path, 2, 2)
    assert sweeps.default_thread_counts(small) == [1, 2]
    assert sweeps.default_combos([1, 2], 2) == [(1, 1), (2, 1), (1, 2)]

    epyc = fake_topology(tmp_path, 96, 12, numa_nodes=2)  # 8 CCDs of 12 cores, 2 NUMA nodes
    counts = sweeps.default_thread_counts(epyc)
    assert {1, 2, 4, 8, 12, 16, 32, 48, 64, 96} <= set(counts) and max(counts) == 96
    assert sweeps.default_thread_counts(epyc, max_threads=24)[-1] == 24
    combos = sweeps.default_combos(counts, 96)
    assert (8, 12) in combos and (96, 1) in combos and (1, 96) in combos
    assert all(w * t <= 96 for w, t in combos)
    assert sweeps.parse_combos("2x1, 1X2") == [(2, 1), (1, 2)]
    with pytest.raises(ValueError, match="bad W x T"):
        sweeps.parse_combos("2by1")


def test_choose_variants_from_05_results(tmp_path, monkeypatch):
    from common.variants import table as variants

    choice = choose_variants(tmp_path)
    assert (choice.exact, choice.approximate) == ("exact_ort_default", None) and "no 05 results" in choice.note

    for name, tier in [("fast_exact_drifts", "exact"), ("slow_exact", "exact"), ("approx", "approximate")]:
        monkeypatch.setitem(variants.VARIANTS, name, variants.Variant(name, tier, "onnxruntime", "test"))
    rows = []
    for variant, tier, wall, parity in [("fast_exact_drifts", "exact", 1.0, 0.9994), ("slow_exact", "exact", 3.0, 0.99995),
                                        ("exact_ort_default", "exact", 4.0, 1.0), ("approx", "approximate", 2.0, 0.95),
                                        ("removed_variant", "approximate", 0.5, 0.9)]:
        for case_id in ("a", "b"):
            rows.append({"implementation": "onnx_optimized", "variant": variant, "tier": tier, "case_id": case_id,
                         "status": "ok", "wall_s": wall, "parity_agreement": parity,
                         "parity_dice": 0.995})  # approximate rows are picked only at Dice >= 0.99 (test_approx_pick)
    pd.DataFrame(rows).to_csv(tmp_path / "onnx_optimized_results.csv", index=False)
    choice = choose_variants(tmp_path)
    assert choice.exact == "slow_exact", "the faster exact variant fails parity >= PARITY_MIN"
    assert choice.approximate == "approx", "a variant unknown to this checkout is not picked"


def synthetic(lat_by_threads, tp_by_combo, variant="v"):
    latency = pd.DataFrame([{"variant": variant, "tier": "exact", "threads": t, "cpus": "0", "status": "ok",
                             "error": "", "wall_s": w, "inference_s": w, "build_s": 1.0, "peak_rss_mb": 500.0,
                             "case_id": "c", "repeat": 0} for t, w in lat_by_threads.items()])
    throughput = pd.DataFrame([{"variant": variant, "tier": "exact", "workers": w, "threads": t, "status": "ok",
                                "source": "measured", "cases_per_hour": cph, "latency_median_s": 3600 / cph * w}
                               for (w, t), cph in tp_by_combo.items()])
    return latency, throughput


def test_recommendation_follows_the_numbers(tmp_path):
    topo = fake_topology(tmp_path, 2, 2)
    choice = VariantChoice("v", None, "")
    env = {"weights_kind": "stand-in"}
    latency, throughput = synthetic({1: 40.0, 2: 22.0}, {(1, 1): 90, (1, 2): 164, (2, 1): 190})
    rec = recommend(latency, throughput, pd.DataFrame(), topo, choice, env)
    assert (rec.workers, rec.threads, rec.latency_threads) == (2, 1, 2)
    assert rec.cpusets == [[0], [1]] and "190 cases/hour" in rec.text[0] and "stand-in" in rec.text[-1]
    assert reproduce_lines(rec)[0].startswith("env OMP_NUM_THREADS=1")
    assert "taskset -c 0 python 06_linux_production_benchmark.py segment" in reproduce_lines(rec)[0]

    latency, throughput = synthetic({1: 40.0, 2: 30.0}, {(1, 1): 90, (1, 2): 200, (2, 1): 150})
    rec = recommend(latency, throughput, pd.DataFrame(), topo, choice, env)
    assert (rec.workers, rec.threads) == (1, 2) and rec.cpusets == [[0, 1]]
    assert reproduce_lines(rec) == [
        "env OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 MKL_NUM_THREADS=2 nnUNet_def_n_proc=2 nnUNet_n_proc_DA=2 taskset -c 0-1 python "
        "06_linux_production_benchmark.py segment IN.nii.gz -o OUT_DIR --variant v --threads 2"]
    assert not any("idle" in t for t in rec.text)

    latency, throughput = synthetic({1: 20.0, 2: 30.0}, {(1, 1): 180, (1, 2): 120, (2, 1): 150})
    rec = recommend(latency, throughput, pd.DataFrame(), topo, choice, env)
    assert (rec.workers, rec.threads, rec.latency_threads) == (1, 1, 1)
    assert any("leaves 1 of 2 CPUs idle" in t for t in rec.text)


def test_worker_count_that_does_not_fit_is_refused(tmp_path):
    topo = fake_topology(tmp_path, 4, 4)
    latency, _ = synthetic({1: 10.0}, {})
    settings = sweeps.Settings(variants=["v"], tiers={"v": "exact"}, cases=[case("c", "/nonexistent")],
                               thread_counts=[1], combos=[(4, 1), (8, 1)], out_dir=tmp_path, available_mb=1000)
    messages = []
    combos, items = sweeps.throughput_sweep(settings, topo, "v", latency, log=messages.append)
    assert items.empty, "nothing may run"
    assert list(combos.status) == ["refused", "refused"]
    assert "4 workers x 575 MB peak RSS = 2300 MB does NOT fit in 1000 MB" in combos.message[0]
    assert "8 x 1 = 8 CPUs > 4" in combos.message[1]
    assert len(messages) == 2 and all(m.startswith("refused: W=") for m in messages)


@pytest.mark.skipif(len(AFFINITY) < 2, reason="needs 2 CPUs in the affinity mask")
def test_throughput_two_pinned_workers_two_cases(tmp_path, generated_volumes, onnx_model, vanilla):
    """W=2 x T=1 on two generated CTs (one and two tiles): two self-pinning Ray actors on an embedded instance, each
    writing TotalSegmentator's labels (>= the exact tier's bound vs vanilla: an all-zero output fails)."""
    from common.core import metrics
    from common.harness import bench

    from parity_bounds import EXACT_MIN, assert_written_like

    topo = read_topology()
    images = {name: generated_volumes[name] for name in ("lps_anisotropic", "ras_3mm")}
    cases = [case(name, image) for name, image in images.items()]
    latency, _ = synthetic({1: 10.0}, {}, variant="exact_ort_default")
    settings = sweeps.Settings(variants=["exact_ort_default"], tiers={"exact_ort_default": "exact"}, cases=cases,
                               thread_counts=[1], combos=[(2, 1)], warmup=0, out_dir=tmp_path)
    combos, items = sweeps.throughput_sweep(settings, topo, "exact_ort_default", latency)

    [row] = combos.to_dict("records")
    assert row["status"] == "ok", row
    assert row["items"] == 2 and row["workers"] == 2 and row["threads"] == 1
    assert row["cases_per_hour"] == pytest.approx(2 * 3600 / row["makespan_s"])
    assert row["peak_rss_mb_max"] > 50
    assert sorted(items.case_id) == sorted(images)
    assert set(items.worker) == {0, 1}, "each worker took one case"
    sets = list(items.worker_cpus)
    assert len(set(sets)) == 2 and all(len(s.split(",")) == 1 and "-" not in s for s in sets), sets
    assert list(items.child_affinity) == sets, "each worker ran on exactly its own CPU"
    assert row["source"] == sweeps.SOURCE_RAY and sorted(row["cpusets"].split()) == sorted(sets)
    # Both workers overlapped in time: the queue really ran them in parallel.
    assert max(items.start) < min(items.end)
    for r in items.itertuples():
        image = images[r.case_id]
        reference = vanilla(image)
        assert_written_like(r.output, image, reference)
        agreement = metrics.voxel_agreement(bench.read_labels(r.output), bench.read_labels(reference))
        print(f"{r.case_id}: worker output agreement with vanilla {agreement:.7f}")
        assert agreement >= EXACT_MIN, f"{r.case_id}: agreement with vanilla {agreement:.6f} < {EXACT_MIN}"


def test_cold_start_reports_a_failing_process(tmp_path, onnx_model, threads):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    row = cold_start(case("bad", bad), "exact_ort_default", threads, AFFINITY[:threads], tmp_path)
    assert row["status"] == "error" and row["returncode"] == 1
    assert row["error"].startswith(f"error: {bad}: not a readable NIfTI")
    assert row["command"].startswith("taskset -c ") and " segment " in row["command"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cold_")], "temporary folder removed"
