"""A fast stand-in for the network in the Ray engine's fault tests (segment mode's TSBENCH_RAY_PIPELINE hook).

``fake_pipeline(variant, threads)`` reads the input with the project's reader (so bad inputs fail as they
really do), sleeps ``TSBENCH_FAKE_DELAY`` seconds instead of running the network, and writes an all-zero
label file atomically. Each run appends ``<input> <pid>`` to ``TSBENCH_FAKE_LOG``. An input whose name
contains ``killme`` makes the first actor that runs it write a temporary output and SIGKILL itself
(``TSBENCH_FAKE_MARKER`` records that this happened once).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np


class FakePipeline:
    def __init__(self, variant: str, threads: int):
        self.delay = float(os.environ.get("TSBENCH_FAKE_DELAY", "0.3"))

    def load(self, path: str):
        from common.core import io

        return io.load_volume(path)

    def run(self, volume, output: str | None) -> dict:
        from common.core import io

        start = time.perf_counter()
        name = Path(volume.path).name
        log = os.environ.get("TSBENCH_FAKE_LOG")
        if log:
            with open(log, "a") as f:
                f.write(f"{volume.path} {os.getpid()}\n")
        marker = os.environ.get("TSBENCH_FAKE_MARKER")
        if "killme" in name and marker and not os.path.exists(marker) and output:
            Path(marker).write_text(str(os.getpid()))
            out = Path(output)
            (out.parent / f".{out.name}.deadbeef.tmp.nii.gz").write_bytes(b"half a file")  # as save_atomic names it
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(self.delay)
        if output:
            io.save_atomic(io.label_image(np.zeros(volume.data.shape, np.uint8), volume), output)
        return {"preprocess_s": 0.0, "inference_s": time.perf_counter() - start, "postprocess_s": 0.0,
                "save_s": 0.0, "wall_s": time.perf_counter() - start, "n_tiles": 1}


def fake_pipeline(variant: str, threads: int) -> FakePipeline:
    return FakePipeline(variant, threads)
