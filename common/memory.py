"""Peak memory of this process and its children while a block runs (sampled).

With worker processes (TotalSegmentator spawns several) summed RSS counts shared pages once per
process; the proportional set size (PSS) splits them, so the tree's sum is what it really holds.
"""
from __future__ import annotations

import threading

import psutil


class PeakMemory:
    """`with PeakMemory() as peak: ...; peak.mb` -- RSS alone, or PSS summed over the tree with children."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.mb = 0.0
        self._stop = threading.Event()
        self._process = psutil.Process()

    def _tree_rss(self) -> int:
        children = self._process.children(recursive=True)
        if not children:
            return self._process.memory_info().rss
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
