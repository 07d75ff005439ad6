"""Peak resident memory of this process and its children while a block runs (sampled)."""
from __future__ import annotations

import threading

import psutil


class PeakMemory:
    """`with PeakMemory() as peak: ...; peak.mb` -- RSS of the process tree, sampled every `interval` s."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.mb = 0.0
        self._stop = threading.Event()
        self._process = psutil.Process()

    def _tree_rss(self) -> int:
        total = 0
        for proc in [self._process, *self._process.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
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
