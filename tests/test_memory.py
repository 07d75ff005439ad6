"""Peak memory sampling sees an allocation made inside the block, in this process and in a child."""
import subprocess
import sys


from common.core import paths
from common.core.memory import PeakMemory


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



def test_peak_memory_of_another_process_by_pid():
    """A worker's figure is its own: the 400 MB process measured by its pid, without this process."""
    code = "import numpy as np, sys, time; a = np.ones(400 * 2**20 // 8); a.sum(); print(flush=True); time.sleep(30)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()  # allocated
        with PeakMemory(interval=0.02) as mine:
            pass
        with PeakMemory(interval=0.02, pid=holder.pid) as its_own:
            pass
    finally:
        holder.kill()
        holder.wait()
    assert its_own.mb > 400 and mine.mb > its_own.mb  # this process tree = the holder + the test process
