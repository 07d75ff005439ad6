"""Peak memory of a process (this one, or a worker by pid) and its children while a block runs (sampled).

With worker processes (TotalSegmentator spawns several) summed RSS counts shared pages once per
process; the proportional set size (PSS) splits them, so the tree's sum is what it really holds.
"""
from __future__ import annotations

import functools
import threading

import psutil


class PeakMemory:
    """`with PeakMemory() as peak: ...; peak.mb` -- RSS alone, or PSS summed over the tree with children.

    `pid`: the tree's root (default: this process). A root that dies meanwhile counts as 0 from then on,
    so the caller sees its own error for the death, not the sampler's. This process's tree is this process and
    the children started while the block runs: a child already running at the start is another's (the Rust
    row's long-lived worker while an in-process row runs), measured by its own pid."""

    def __init__(self, interval: float = 0.05, pid: int | None = None):
        self.interval = interval
        self.mb = 0.0
        self._stop = threading.Event()
        try:
            self._process = psutil.Process(pid)
            self._others = {child.pid for child in self._process.children(recursive=True)} if pid is None else set()
        except psutil.NoSuchProcess:
            self._process, self._others = None, set()

    def _tree_rss(self) -> int:
        if self._process is None:
            return 0
        try:
            children = [c for c in self._process.children(recursive=True) if c.pid not in self._others]
            if not children:
                return self._process.memory_info().rss
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for proc in [self._process, *children]:
            try:
                total += proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
                pass
        return total

    def _sample(self) -> None:
        while True:
            self.mb = max(self.mb, self._tree_rss() / 2**20)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "PeakMemory":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.mb = max(self.mb, self._tree_rss() / 2**20)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim from this process's own symbols (no find_library: that runs ldconfig each call)."""
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def return_freed_heap() -> bool:
    """Hand the heap pages freed so far back to the OS (glibc's malloc_trim); False where there is no glibc.

    numpy's large arrays are mmapped and go back when freed, but many mid-size ones (the loaded CT's copies on
    the way to the 3 mm grid) leave ~100-150 MB of free heap that RSS keeps counting otherwise.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
