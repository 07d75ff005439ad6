"""Shared code of the TotalSegmentator --fast CPU benchmark suite (I/O, math, runtimes, reports)."""
