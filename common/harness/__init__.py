"""Benchmark harness: timing and scoring runs, shared CLI flags, vanilla/Rust/worker-process runners."""
