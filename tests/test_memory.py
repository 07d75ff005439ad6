"""Peak memory sampling sees an allocation made inside the block, in this process and in a child, and each
benchmark row only its own process tree."""
import subprocess
import sys


from common.core import paths


def test_peak_memory_sees_a_300_mb_allocation():
    """In a fresh process, for the reason given below (pytest's RSS after the heavy tests hides growth)."""
    probe = "\n".join([
        "import numpy as np",
        "from common.core.memory import PeakMemory",
        "with PeakMemory() as before:",
        "    pass",
        "with PeakMemory(interval=0.01) as peak:",
        "    block = np.ones(300 * 2**20 // 8)",
        "    block.sum()",
        "    del block",
        "print(peak.mb - before.mb)",
    ])
    run = subprocess.run([sys.executable, "-c", probe], cwd=paths.REPO_ROOT, capture_output=True, text=True,
                         timeout=120, check=True)
    assert float(run.stdout.split()[-1]) > 250


def test_peak_memory_counts_a_child_process():
    """Measured in a fresh process: pytest's own RSS, after the heavy tests, counts in full the library pages it
    shares with other processes (another job on the same torch), which the PSS sum with a child splits; that
    RSS, read before the child starts, then stays the maximum and hides the child."""
    probe = "\n".join([
        "import subprocess, sys",
        "from common.core.memory import PeakMemory",
        "code = 'import numpy as np, time; a = np.ones(200 * 2**20 // 8); a.sum(); time.sleep(0.5)'",
        "with PeakMemory() as alone:",
        "    pass",
        "with PeakMemory(interval=0.02) as peak:",
        "    subprocess.run([sys.executable, '-c', code], check=True)",
        "print(peak.mb - alone.mb)"])
    done = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                          cwd=paths.REPO_ROOT)
    assert float(done.stdout.split()[-1]) > 150


def test_each_row_measures_its_own_process_tree_in_one_run():
    """Two runners in one benchmark run, in a fresh process (pytest's RSS would hide the figures): `worker` holds
    400 MB in a long-lived child, measured by its pid (as the Rust row's binary); `in_process` allocates 150 MB
    inside its run while that child is alive. Each row's peak is its own tree's: the child's 400 MB only in its own
    row, and the parent's 150 MB not in the worker's."""
    probe = "\n".join([
        "import subprocess, sys, tempfile, time",
        "from pathlib import Path",
        "import nibabel as nib, numpy as np",
        "from common.harness.bench import Runner, run_benchmark",
        "from common.data.cases import Case",
        "code = 'import numpy as np, time; a = np.ones(400 * 2**20 // 8); a.sum(); print(flush=True); time.sleep(60)'",
        "holder = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)",
        "holder.stdout.readline()",
        "def labels(path):",
        "    path.parent.mkdir(parents=True, exist_ok=True)",
        "    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), path)",
        "def in_process(image, out):",
        "    block = np.ones(150 * 2**20 // 8); block.sum(); labels(out)",
        "    time.sleep(0.5)  # held while the 50 ms sampler runs (np.ones and sum keep the GIL)",
        "    del block",
        "    return {}",
        "def worker(image, out):",
        "    labels(out)",
        "    return {}",
        "runners = [Runner('in_process', 'a', 'exact', in_process),",
        "           Runner('worker', 'b', 'exact', worker, memory_pid=lambda: holder.pid)]",
        "with tempfile.TemporaryDirectory() as tmp:",
        "    case = Case('c', Path(tmp) / 'in.nii.gz', None, {}, 'test', (), (), '', '')",
        "    labels(case.image)",
        "    rows = run_benchmark(runners, [case], repeats=2, threads=1, environment={}, out_dir=Path(tmp),",
        "                         progress=False)",
        "holder.kill()",
        "assert all(r['status'] == 'ok' for r in rows), rows",
        "for r in rows:",
        "    print(r['implementation'], r['peak_rss_mb'])",
    ])
    done = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                          cwd=paths.REPO_ROOT, timeout=300)
    peaks: dict[str, list[float]] = {}
    for line in done.stdout.splitlines():
        name, mb = line.split()
        peaks.setdefault(name, []).append(float(mb))
    assert len(peaks["in_process"]) == len(peaks["worker"]) == 2
    assert all(400 < mb < 500 for mb in peaks["worker"]), peaks  # the child alone: 400 MB + an interpreter
    assert all(150 < mb < 400 for mb in peaks["in_process"]), peaks  # this process's 150 MB, not the child's
