"""segment --engine ray on a local Ray instance of 2 single-thread workers: an actor killed mid-case, a bad
input, an interrupted cohort resumed, an address where nothing listens, a head stopped mid-cohort, the
embedded instance's sockets (loopback only), token and independence from a `ray start` cluster, and the
real pipeline end to end.

The fault tests run a fast stand-in for the network (tests/ray_fakes.py through TSBENCH_RAY_PIPELINE);
test_real_pipeline_on_ray runs the real one on one small phantom and checks it against the local engine.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import psutil
import pytest

from common.core import paths

pytest.importorskip("ray")

from totalseg_fast.engines.ray_engine import MANIFEST, RESULTS, read_manifest  # noqa: E402
from totalseg_fast.cli import main as segment_main  # noqa: E402

SCRIPT = paths.REPO_ROOT / "06_linux_production_benchmark.py"
TESTS = Path(__file__).resolve().parent
RAY_ARGS = ["--engine", "ray", "--workers", "2", "--threads", "1", "--worker-memory-mb", "200", "--no-progress"]


def write_inputs(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths_ = []
    for i, name in enumerate(names):
        path = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.full((8, 8, 8), i, np.int16), np.eye(4)), path)
        paths_.append(path)
    return paths_


def fake_env(tmp_path: Path, delay: float = 0.3) -> dict[str, str]:
    return {"TSBENCH_RAY_PIPELINE": "ray_fakes:fake_pipeline", "TSBENCH_FAKE_DELAY": str(delay),
            "TSBENCH_FAKE_LOG": str(tmp_path / "runs.log"), "TSBENCH_FAKE_MARKER": str(tmp_path / "killed"),
            "PYTHONPATH": os.pathsep.join([str(paths.REPO_ROOT), str(TESTS)]), "RAY_USAGE_STATS_ENABLED": "0"}


def runs(tmp_path: Path) -> list[str]:
    log = tmp_path / "runs.log"
    return [line.split()[0] for line in log.read_text().splitlines()] if log.exists() else []


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def outputs(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_actor_killed_mid_case_is_retried_elsewhere(tmp_path, monkeypatch, capsys):
    for key, value in fake_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    inputs = write_inputs(tmp_path / "in", ["a", "b", "c", "killme", "d"])
    out = tmp_path / "out"
    rc = segment_main([str(tmp_path / "in"), "-o", str(out), *RAY_ARGS])
    err = capsys.readouterr().err

    assert rc == 0, err
    killed_pid = int((tmp_path / "killed").read_text())  # the actor SIGKILLed itself mid-case
    assert f"retry: {tmp_path / 'in' / 'killme.nii.gz'}: worker" in err
    # Every output, and no temporary file of the killed attempt.
    assert outputs(out) == sorted([f"{p.name}" for p in inputs] + [MANIFEST, RESULTS])
    results = pd.read_csv(out / RESULTS)
    row = results[results.input.str.endswith("killme.nii.gz")].iloc[0]
    assert row.status == "ok" and row.attempts == 2 and row.pid != killed_pid
    assert (results.status == "ok").all() and len(results) == 5
    # The two workers ran pinned to disjoint CPU sets, each reported in the results.
    first = results[results.pid != killed_pid].groupby("pid").cpus.first().astype(str)
    assert results.node.notna().all() and len(set(first)) == len(first)
    assert set(runs(tmp_path)) == {str(p) for p in inputs}


def test_bad_input_one_error_line_others_complete(tmp_path, monkeypatch, capsys):
    for key, value in fake_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    good = write_inputs(tmp_path / "in", ["a", "b", "c"])
    bad = tmp_path / "in" / "garbage.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file")
    missing = tmp_path / "missing.nii.gz"
    out = tmp_path / "out"
    rc = segment_main([str(tmp_path / "in"), str(missing), "-o", str(out), *RAY_ARGS])
    err = capsys.readouterr().err

    assert rc == 1, err
    errors = error_lines(err)
    assert len(errors) == 2, err
    assert any(e.startswith(f"error: {bad}: ") for e in errors)
    assert any(e.startswith(f"error: {missing}: ") and "no such file" in e for e in errors)
    assert outputs(out) == sorted([p.name for p in good] + [MANIFEST, RESULTS])
    results = pd.read_csv(out / RESULTS)
    assert sorted(results.status) == ["error", "error", "ok", "ok", "ok"]


def test_interrupted_cohort_resumes_by_content_hash(tmp_path):
    env = {**os.environ, **fake_env(tmp_path, delay=1.0)}
    # 16 one-second cases on 2 workers: the Ctrl-C below lands mid-cohort even on a loaded machine
    inputs = write_inputs(tmp_path / "in", [f"case{i:02d}" for i in range(16)])
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "segment", str(tmp_path / "in"), "-o", str(out), *RAY_ARGS]
    # SIGINT as a terminal delivers it: a runner started in the background (nohup, `cmd &`) hands its children
    # SIGINT ignored, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen(command, env=env, cwd=paths.REPO_ROOT, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while len(read_manifest(out)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # Ctrl-C mid-cohort
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    done = {Path(o) for o in read_manifest(out)}
    assert 2 <= len(done) < len(inputs), err
    assert not [n for n in outputs(out) if n.startswith(".")]  # no partial output
    before = {p: p.stat().st_mtime_ns for p in done}
    # One finished case's input changes content but keeps its name: it must be recomputed.
    changed_out = sorted(done)[0]
    changed_in = tmp_path / "in" / changed_out.name
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), 99, np.int16), np.eye(4)), changed_in)
    (tmp_path / "runs.log").unlink()
    unfinished = next(p for p in inputs if out / p.name not in done)
    stale = out / f".{unfinished.name}.k1ll3d.tmp.nii.gz"  # as a SIGKILLed driver's actor would leave it
    stale.write_bytes(b"half a file")

    proc = subprocess.run([*command, "--resume"], env=env, cwd=paths.REPO_ROOT, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert f"--resume keeps {len(done) - 1} finished output(s)" in proc.stderr
    expected = {str(p) for p in inputs if out / p.name not in done} | {str(changed_in)}
    assert sorted(runs(tmp_path)) == sorted(expected)  # kept outputs were not recomputed
    for path, mtime in before.items():
        assert (path.stat().st_mtime_ns == mtime) == (path != changed_out)
    assert outputs(out) == sorted([p.name for p in inputs] + [MANIFEST, RESULTS])
    assert (pd.read_csv(out / RESULTS).status == "kept").sum() == len(done) - 1
    assert not stale.exists() and "removed 1 temporary output(s)" in proc.stderr


def test_address_to_nothing_exits_2_quickly(tmp_path):
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write_inputs(tmp_path / "in", ["a"])
    start = time.time()
    proc = subprocess.run([sys.executable, str(SCRIPT), "segment", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                           "--engine", "ray", "--address", f"127.0.0.1:{port}", "--no-progress"],
                          cwd=paths.REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert time.time() - start < 30
    [line] = error_lines(proc.stderr)
    assert f"127.0.0.1:{port}" in line and "no Ray cluster" in line
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def listening_sockets(pid: int) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of ``pid`` and its descendants."""
    found = set()
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return found
    for proc in tree:
        try:
            name = proc.name()
            found |= {(name, c.laddr.ip, c.laddr.port) for c in proc.net_connections("tcp")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.Error:  # exited between the listing and the look
            continue
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def test_embedded_ray_listens_on_loopback_only(tmp_path):
    """06 segment --engine ray without --address: every socket Ray's processes listen on is 127.0.0.1 / ::1."""
    env = {**os.environ, **fake_env(tmp_path, delay=1.0)}
    env.pop("RAY_ADDRESS", None)
    write_inputs(tmp_path / "in", [f"case{i}" for i in range(6)])
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "segment", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                             *RAY_ARGS], env=env, cwd=paths.REPO_ROOT, stderr=subprocess.PIPE, text=True)
    seen = set()
    while proc.poll() is None:  # the driver, GCS, raylet, agents and actors come and go: sample throughout
        seen |= listening_sockets(proc.pid)
        time.sleep(0.2)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 0, err
    names = {name for name, _, _ in seen}
    assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::") for n in names), seen  # Ray was seen
    exposed = sorted(s for s in seen if not is_loopback(s[1]))
    assert not exposed, f"listening beyond localhost: {exposed}"
    assert "token authentication on" in err


def test_embedded_ray_refuses_a_wrong_token(monkeypatch):
    """Token authentication stays on in embedded mode: a GCS call with another token is refused."""
    from totalseg_fast.engines import ray_cluster

    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    connection = ray_cluster.connect(None)
    probe = ("import sys\nfrom ray._raylet import GcsClient\n"
             "print(GcsClient(address=sys.argv[1]).internal_kv_keys(b'', None, timeout=10))")
    try:
        calls = {token: subprocess.run([sys.executable, "-c", probe, connection.address], capture_output=True,
                                       text=True, timeout=60, env={**os.environ, "RAY_AUTH_MODE": "token", **extra})
                 for token, extra in (("same", {}), ("wrong", {"RAY_AUTH_TOKEN": "0" * 32}))}
    finally:
        ray_cluster.shutdown(connection)
    assert connection.address.startswith("127.0.0.1:")
    assert calls["same"].returncode == 0, calls["same"].stderr
    assert calls["wrong"].returncode != 0 and "InvalidAuthToken" in calls["wrong"].stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_tmpdir():
    """A Ray temp dir of the test's own (short: Ray's socket paths live in it), so that a `ray start` here records
    its address there, not in /tmp/ray/ray_current_cluster where other Ray users of this machine look."""
    folder = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def stop_head(head: subprocess.Popen) -> None:
    """SIGTERM to the head's processes, as `ray stop` stops them."""
    try:
        children = psutil.Process(head.pid).children(recursive=True)
    except psutil.Error:
        children = []
    for child in children:
        child.terminate()
    if head.poll() is None:
        head.terminate()


@contextlib.contextmanager
def ray_head(env: dict):
    """A local `ray start --head` (token authentication on) in ``env["RAY_TMPDIR"]``; yields (process, GCS port)."""
    port = free_port()
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}",
                             "--include-dashboard=false", "--num-cpus=2", "--block"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    recorded = Path(env["RAY_TMPDIR"]) / "ray" / "ray_current_cluster"  # written once the head is up
    try:
        deadline = time.time() + 60
        while time.time() < deadline and head.poll() is None and not recorded.exists():
            time.sleep(0.5)
        yield head, port
    finally:
        stop_head(head)
        head.wait(90)  # `ray start --block` stops its processes before it exits


def head_env(tmp_path: Path, ray_tmpdir: str) -> dict[str, str]:
    env = {**os.environ, **fake_env(tmp_path, delay=1.0), "RAY_AUTH_MODE": "token", "RAY_TMPDIR": ray_tmpdir}
    env.pop("RAY_ADDRESS", None)
    return env


def test_head_stopped_mid_cohort_is_one_error(tmp_path, ray_tmpdir):
    """--address to a local `ray start --head` that stops mid-cohort: one error line, exit 2, no partial output."""
    env = head_env(tmp_path, ray_tmpdir)
    inputs = write_inputs(tmp_path / "in", [f"case{i:02d}" for i in range(24)])
    out = tmp_path / "out"
    with ray_head(env) as (head, port):
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "segment", str(tmp_path / "in"), "-o", str(out),
                                 *RAY_ARGS, "--address", f"127.0.0.1:{port}"], env=env, cwd=paths.REPO_ROOT,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while len(read_manifest(out)) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        stop_head(head)
        stopped = time.time()
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert time.time() - stopped < 45, err
    [line] = error_lines(err)
    assert "lost the Ray cluster" in line and f":{port} " in line and "--resume" in line, line
    done = read_manifest(out)
    assert 2 <= len(done) < len(inputs), err
    assert outputs(out) == sorted([Path(o).name for o in done] + [MANIFEST, RESULTS])  # nothing half-written
    assert (pd.read_csv(out / RESULTS).status == "ok").sum() == len(done)


def test_embedded_beside_a_ray_start_cluster(tmp_path, ray_tmpdir, monkeypatch, capsys):
    """Embedded mode starts its own instance while `ray start` runs here (a plain ray.init joins that cluster)."""
    env = head_env(tmp_path, ray_tmpdir)
    for key in (*fake_env(tmp_path), "RAY_TMPDIR"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    write_inputs(tmp_path / "in", ["a", "b"])
    with ray_head(env) as (_, port):
        rc = segment_main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), *RAY_ARGS])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "Ray embedded at 127.0.0.1:" in err and f":{port} " not in err


def test_real_pipeline_on_ray(tmp_path, onnx_model, monkeypatch, capsys):
    """The real pipeline (exact_ort_default, stand-in weights) on a one-tile phantom: the same labels as the local engine."""
    from common.data.phantoms import make_phantom

    monkeypatch.delenv("TSBENCH_RAY_PIPELINE", raising=False)
    hu, _, affine = make_phantom((70, 64, 60), (3.0, 3.0, 3.0), "RAS", seed=3)
    src = tmp_path / "in" / "phantom.nii.gz"
    src.parent.mkdir()
    nib.save(nib.Nifti1Image(hu, affine), src)
    rc = segment_main([str(src), "-o", str(tmp_path / "ray"), "--variant", "exact_ort_default", *RAY_ARGS[:-3],
                       "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    rc = segment_main([str(src), "-o", str(tmp_path / "local"), "--ml", "--variant", "exact_ort_default", "--threads",
                       "1", "--no-progress"])  # --ml: one multilabel file, as the Ray engine writes
    assert rc == 0, capsys.readouterr().err
    ray_seg, local_seg = nib.load(tmp_path / "ray" / "phantom.nii.gz"), nib.load(tmp_path / "local" / "phantom.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(ray_seg.dataobj), np.asanyarray(local_seg.dataobj))
    np.testing.assert_array_equal(ray_seg.affine, nib.load(src).affine)
    row = pd.read_csv(tmp_path / "ray" / RESULTS).iloc[0]
    assert row.status == "ok" and row.inference_s > 0 and row.n_tiles == 1 and str(row.cpus) in ("0", "1")


def test_no_node_can_hold_a_worker_is_one_error(tmp_path, monkeypatch, capsys):
    for key, value in fake_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    write_inputs(tmp_path / "in", ["a"])
    args = [a if a != "200" else str(64 * 2**20) for a in RAY_ARGS]  # 64 TB per worker
    rc = segment_main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    [line] = error_lines(err)
    assert "no node can hold one worker" in line
    assert runs(tmp_path) == []


def test_engines_section_prefetch_and_projection():
    """06 --engines: the prefetch gain, Ray's costs and the N-node table, from the rows; a noisy run gets no verdict."""
    from common.production.engine_bench import engines_markdown

    rows = []
    for repeat in range(3):
        for engine, steady in (("ray", 390.0), ("ray-noprefetch", 375.0)):
            rows.append({"engine": engine, "repeat": repeat, "workers": 2, "threads": 1, "items": 4, "ok": 4,
                         "status": "ok", "wall_s": 41.0, "steady_s": 36.9, "cases_per_hour": 351.0,
                         "steady_cases_per_hour": steady, "startup_s": 4.0, "ray_rss_mb": 700.0,
                         "worker_peak_rss_mb": 2900.0, "input_mb": 40.0, "output_mb": 2.0, "load_s": 0.5})
    text = engines_markdown(pd.DataFrame(rows))
    assert "Prefetch of the next case" in text and "+4.0 %" in text and "Not conclusive" not in text
    assert "median 4.0 s" in text and "700 MB RSS" in text
    # 195 cases/hour per worker, 2 per node; 10 nodes: 3900 cases/hour x 42 MB / 3600 s = 45.5 MB/s
    assert "| 10 | 20 | 3900 | 1.3 | 45.50 |" in text
    rows[1]["steady_cases_per_hour"] = 90.0  # one no-prefetch repeat 4x slower: a busy machine, no verdict
    text = engines_markdown(pd.DataFrame(rows))
    assert "Not conclusive" in text


def test_engines_option_refuses_the_deleted_local_pool(tmp_path, capsys):
    """`--engines local` names the engine that is gone: one error line, exit 2, nothing measured."""
    import importlib

    bench = importlib.import_module("06_linux_production_benchmark")
    rc = bench.main(["--engines", "local,ray", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and len(error_lines(err)) == 1, err
    assert "local process pool is gone" in err
    assert not list(tmp_path.glob("*.csv"))
