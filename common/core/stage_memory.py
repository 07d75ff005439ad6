"""Peak memory of this process per stage: the kernel's RSS high-water mark (VmHWM), read and reset at
each stage boundary (`echo 5 > /proc/self/clear_refs`), so a stage's peak is its own, not the run's so far.

Linux only; elsewhere (or where the reset is refused) `StageMemory.available` is False and no rows are kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class StagePeak:
    stage: str
    peak_mb: float  # the highest RSS while the stage ran (its starting RSS included)
    after_mb: float  # RSS when it ended: what it left alive for the next stage


def status_mb(field: str) -> float:
    """A /proc/self/status size field (VmRSS, VmHWM) in MB."""
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> bool:
    """Set VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class StageMemory:
    """`memory.checkpoint("load")` at the end of each stage: that stage's peak since the last checkpoint.

    The first checkpoint's peak covers everything since the process started (or since construction with
    `reset=True`)."""

    def __init__(self, reset: bool = False):
        self.rows: list[StagePeak] = []
        self.available = STATUS.is_file() and reset_peak() if reset else STATUS.is_file()

    def checkpoint(self, stage: str) -> StagePeak | None:
        if not self.available:
            return None
        row = StagePeak(stage, round(status_mb("VmHWM"), 1), round(status_mb("VmRSS"), 1))
        self.rows.append(row)
        self.available = reset_peak()
        return row

    def as_dicts(self) -> list[dict]:
        return [{"stage": r.stage, "peak_mb": r.peak_mb, "after_mb": r.after_mb} for r in self.rows]
