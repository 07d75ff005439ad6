"""The Rust row: run `rust/target/release/totalseg-rust` on many cases in one process.

The binary (built by `rust/setup.sh`) loads the ONNX Runtime shared library that the installed
onnxruntime Python wheel ships, creates one session, and prints one JSON line per case with
its stage timings. Scoring (Dice, parity) happens on the Python side like for every other row.

- `run_rust_cases(jobs, model, threads)`: a batch of cases, one process, rows back in job order.
- `RustWorker` / `benchmark_runner(threads)`: one long-lived process fed one case at a time, so
  the harness can interleave implementations case by case while the session is created once.
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import subprocess
import tempfile
from pathlib import Path

from common.core import paths
from common.pipeline.run import STAGES

BINARY_NAME = "totalseg-rust"
TIMING_KEYS = (*STAGES, "wall_s")


def rust_binary() -> Path | None:
    """The release binary (or ``$TSBENCH_RUST_BIN``) when it exists and is executable."""
    override = os.environ.get("TSBENCH_RUST_BIN")
    path = Path(override) if override else paths.REPO_ROOT / "rust" / "target" / "release" / BINARY_NAME
    return path if path.is_file() and os.access(path, os.X_OK) else None


def ort_library_path() -> Path:
    """``libonnxruntime.so.*`` of the installed onnxruntime package (``$TSBENCH_ORT_LIB`` overrides)."""
    override = os.environ.get("TSBENCH_ORT_LIB")
    if override:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"TSBENCH_ORT_LIB={override} does not exist")
        return path
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the onnxruntime Python package is not installed")
    capi = Path(list(spec.submodule_search_locations)[0]) / "capi"
    libs = sorted(capi.glob("libonnxruntime.so*"))
    if not libs:
        raise FileNotFoundError(f"no libonnxruntime.so* in {capi}")
    return libs[-1]


def skip_reason(model_path: Path | None = None) -> str | None:
    """Why the Rust row cannot run here (None when it can)."""
    if rust_binary() is None:
        return (f"Rust binary not built (rust/target/release/{BINARY_NAME}); run `bash rust/setup.sh` "
                "(needs cargo and the Debian librust-*-dev crates)")
    try:
        ort_library_path()
    except FileNotFoundError as exc:
        return f"ONNX Runtime library not found: {exc}"
    if model_path is not None and not Path(model_path).is_file():
        return f"model {model_path} not found (run 02_export_model.py)"
    return None


def run_rust_cases(jobs: list[tuple[str, Path, Path]], model_path: Path, threads: int,
                   timeout: float | None = None, extra_args: list[str] | None = None) -> list[dict]:
    """Segment ``(case_id, input_path, output_path)`` jobs in one Rust process.

    Returns one dict per job, in job order: ``case_id``, ``status`` ("ok"/"error"), ``error`` and,
    for "ok", the stage timings (load_s, preprocess_s, inference_s, postprocess_s, save_s, wall_s),
    ``n_tiles``, ``network_s``, ``session_s`` (one-time session creation), ``threads``, ``ort_version``.
    A case the binary never reported (crash, timeout) comes back as an error row with the reason.
    """
    binary = rust_binary()
    if binary is None:
        raise FileNotFoundError(skip_reason() or "Rust binary missing")
    ids = [str(case_id) for case_id, _, _ in jobs]
    if len(set(ids)) != len(ids):
        raise ValueError("case ids must be unique")
    with tempfile.TemporaryDirectory(prefix="tsbench-rust-") as tmp:
        jobs_file = Path(tmp) / "jobs.jsonl"
        jobs_file.write_text("".join(
            json.dumps({"case_id": cid, "input": str(Path(inp).resolve()), "output": str(Path(out).resolve())}) + "\n"
            for cid, (_, inp, out) in zip(ids, jobs)))
        cmd = [str(binary), "--model", str(model_path), "--threads", str(int(threads)),
               "--ort-lib", str(ort_library_path()), "--jobs", str(jobs_file), *(extra_args or [])]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            stdout, stderr, failure = proc.stdout, proc.stderr, None
            if proc.returncode not in (0, 1):  # 1 = some case failed (reported per case)
                failure = f"totalseg-rust exited with {proc.returncode}: {_tail(stderr)}"
        except subprocess.TimeoutExpired as exc:
            stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            failure = f"totalseg-rust timed out after {timeout} s"
    reported = {}
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "case_id" in row:
            reported[str(row["case_id"])] = row
    rows = []
    for cid in ids:
        row = reported.get(cid)
        if row is None:
            row = {"case_id": cid, "status": "error",
                   "error": failure or f"no result from totalseg-rust: {_tail(stderr)}"}
        row["case_id"] = cid
        rows.append(row)
    return rows


def _tail(text: str, limit: int = 500) -> str:
    text = (text or "").strip()
    return text if len(text) <= limit else "..." + text[-limit:]


class RustWorker:
    """One `totalseg-rust --jobs -` process serving cases one at a time (session created once)."""

    def __init__(self, model_path: Path, threads: int, extra_args: list[str] | None = None):
        binary = rust_binary()
        if binary is None:
            raise FileNotFoundError(skip_reason() or "Rust binary missing")
        self._stderr = tempfile.TemporaryFile(mode="w+")
        cmd = [str(binary), "--model", str(model_path), "--threads", str(int(threads)),
               "--ort-lib", str(ort_library_path()), "--jobs", "-", *(extra_args or [])]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                      text=True, bufsize=1)
        self._count = 0
        atexit.register(self.close)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def run(self, input_path: Path, output_path: Path, case_id: str | None = None) -> dict:
        """Segment one case; returns the binary's row (status "ok" or "error" with the reason)."""
        self._count += 1
        cid = case_id or f"case{self._count}"
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write(json.dumps({"case_id": cid, "input": str(Path(input_path).resolve()),
                                                   "output": str(Path(output_path).resolve())}) + "\n")
                self._proc.stdin.flush()
                line = self._proc.stdout.readline()
                if line:
                    return json.loads(line)
            except (BrokenPipeError, json.JSONDecodeError):
                pass
        self._proc.wait(timeout=30)
        self._stderr.seek(0)
        return {"case_id": cid, "status": "error",
                "error": f"totalseg-rust exited with {self._proc.returncode}: {_tail(self._stderr.read())}"}

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._stderr.close()


def benchmark_runner(threads: int, model: str | Path | None = None):
    """The bench.Runner for the `rust_onnx` row (one worker process for the whole benchmark).

    `model`: as the backends name it (common/runtime/backends.resolve_model, stale-model check included);
    default: the exact rows' model."""
    from common.harness.bench import Runner
    from common.runtime.backends import EXACT_MODEL, resolve_model

    worker = RustWorker(resolve_model(EXACT_MODEL if model is None else model), threads)

    def run(input_path: Path, output_path: Path | None) -> dict:
        if output_path is not None:
            row = worker.run(input_path, output_path)
        else:  # warm-up: the labels are not kept
            with tempfile.TemporaryDirectory(prefix="tsbench-rust-") as tmp:
                row = worker.run(input_path, Path(tmp) / "warmup.nii.gz")
        if row.get("status") != "ok":
            raise RuntimeError(row.get("error") or "totalseg-rust failed")
        return {k: row[k] for k in (*TIMING_KEYS, "n_tiles", "network_s") if k in row}

    # the row's peak memory is the binary's own process, not the Python process that feeds it
    return Runner("rust_onnx", "ort_c_api", "exact", run, memory_pid=lambda: worker.pid, close=worker.close)
