"""TotalSegmentator itself (`totalsegmentator(..., fast=True, device="cpu")`), as a user calls it.

Only two things are set around the call: the project-local home with usage statistics off,
and the thread count. TotalSegmentator sets torch's threads to the machine's CPU count;
the call below caps that at the benchmark's thread count so every row uses the same number.
"""
from __future__ import annotations

import contextlib
import io as _io
import time
from pathlib import Path


@contextlib.contextmanager
def capped_torch_threads(threads: int):
    import torch

    original = torch.set_num_threads
    torch.set_num_threads = lambda n: original(min(int(n), threads))
    try:
        original(threads)
        yield
    finally:
        torch.set_num_threads = original


def run_vanilla(input_path: Path, output_path: Path, threads: int, quiet: bool = True) -> dict[str, float]:
    """Segment one file with TotalSegmentator; returns {'wall_s': seconds from call to written output}."""
    from common.model.weights import configure_totalseg_home

    configure_totalseg_home()
    from totalsegmentator.python_api import totalsegmentator

    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(f".{output_path.name}.tmp.nii.gz")
    start = time.perf_counter()
    sink = contextlib.redirect_stdout(_io.StringIO()) if quiet else contextlib.nullcontext()
    try:
        with capped_torch_threads(threads), sink:
            totalsegmentator(input_path, tmp, ml=True, fast=True, device="cpu", quiet=quiet)
        wall = time.perf_counter() - start
        tmp.replace(output_path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"wall_s": wall}


def vanilla_runner(threads: int):
    """The bench.Runner for TotalSegmentator (warm-up runs write to a temporary folder)."""
    import tempfile

    from common.harness.bench import Runner

    def run(input_path: Path, output_path: Path | None) -> dict:
        if output_path is None:
            with tempfile.TemporaryDirectory() as tmp:
                return run_vanilla(input_path, Path(tmp) / "warmup.nii.gz", threads)
        return run_vanilla(input_path, output_path, threads)

    return Runner("vanilla", "totalsegmentator", "exact", run)
