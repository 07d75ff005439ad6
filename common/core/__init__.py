"""Shared basics for every stage: repository paths, thread/environment settings, NIfTI I/O, metrics, peak memory."""
