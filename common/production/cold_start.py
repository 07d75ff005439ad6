"""06: cold start (a fresh, pinned `segment` process to its first output) and the command lines that
reproduce a pinned setting."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common.core import paths
from common.production.pinning import shell_command, taskset_command
from common.core.topology import format_cpu_list

SCRIPT = paths.REPO_ROOT / "06_linux_production_benchmark.py"


def segment_argv(inputs: list[str], out_dir: str, variant: str, threads: int, extra: list[str] = ()) -> list[str]:
    return [sys.executable, str(SCRIPT), "segment", *inputs, "-o", out_dir, "--ml", "--variant", variant,
            "--threads", str(threads), *extra]


def reproduce_command(cpus: list[int], variant: str, threads: int, inputs: str = "IN.nii.gz",
                      out: str = "OUT_DIR") -> str:
    """The exact command line that reproduces a pinned setting (python as `python`)."""
    argv = ["python", SCRIPT.name, "segment", inputs, "-o", out, "--variant", variant, "--threads", str(threads)]
    return shell_command(taskset_command(cpus, argv, with_thread_env=True))


def cold_start(case, variant: str, threads: int, cpus: list[int], tmp_root: Path) -> dict:
    """Time from spawning a fresh `segment` process (taskset-pinned) to its output file appearing."""
    from common.production.pinning import thread_env

    with tempfile.TemporaryDirectory(dir=tmp_root, prefix=".cold_") as tmp:
        timings_json = Path(tmp) / "timings.json"
        argv = segment_argv([str(case.image)], str(Path(tmp) / "out"), variant, threads,
                            ["--no-progress", "--timings-json", str(timings_json)])
        env = {**os.environ, **thread_env(threads)}
        if shutil.which("taskset"):
            command = taskset_command(cpus, argv)
        else:
            command = argv[:3] + ["--cpus", format_cpu_list(cpus)] + argv[3:]
        output = Path(tmp) / "out" / f"{_stem(case.image)}.nii.gz"
        t0 = time.time()
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   cwd=paths.REPO_ROOT)
        first_output = None
        while process.poll() is None:
            if first_output is None and output.exists():
                first_output = time.time()
            time.sleep(0.02)
        exit_s = time.time() - t0
        if first_output is None and output.exists():
            first_output = time.time()
        _, stderr = process.communicate()
        row = {"variant": variant, "threads": threads, "cpus": format_cpu_list(cpus), "case_id": case.case_id,
               "command": shell_command(command), "returncode": process.returncode, "process_exit_s": exit_s,
               "to_first_output_s": (first_output - t0) if first_output else np.nan}
        if process.returncode != 0 or first_output is None:
            lines = [line for line in stderr.splitlines() if line.startswith("error")] or stderr.splitlines()[-1:]
            row.update(status="error", error=(lines[0] if lines else f"exit code {process.returncode}")[:300])
            return row
        row["status"] = "ok"
        row["error"] = ""
        try:
            info = json.loads(timings_json.read_text())
            row["startup_imports_s"] = info["imports_done"] - t0
            row["session_s"] = info["session_s"]
            row["segment_s"] = info["files"][0]["wall_s"] if info["files"] else np.nan
        except (OSError, ValueError, KeyError, IndexError):
            pass
        return row


def _stem(path) -> str:
    from totalseg_fast.inputs import nifti_stem

    return nifti_stem(Path(path))
