"""Downloads and extraction against a loopback HTTP server that this file starts itself."""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.data import phantoms
from common.data.cases import ABDOMENCTCT, read_manifest
from common.data.download import DownloadError, download, extract, reachable_all

REPO = Path(__file__).resolve().parents[1]

FAST = dict(retries=0, backoff=0.01, timeout=2, progress=False)


def _load_cli():
    spec = importlib.util.spec_from_file_location("download_cli", REPO / "01_download_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cli = _load_cli()


# --------------------------------------------------------------------------- loopback server

class FaultyServer:
    """Serves ``files`` (path -> bytes) on 127.0.0.1 with switchable faults.

    ranges     honour ``Range`` (and ``If-Range`` against the ETag)
    drops      this many GETs send ``drop_at`` bytes of the body, then cut the connection
    corrupt    send a different body of the same length
    fail_503   this many GETs answer 503
    """

    def __init__(self, files: dict[str, bytes], ranges=True):
        self.files, self.ranges = dict(files), ranges
        self.drops, self.drop_at, self.corrupt, self.fail_503 = 0, None, False, 0
        self.log: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                outer._serve(self, head=True)

            def do_GET(self):
                outer._serve(self, head=False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"

    def etag(self, path: str) -> str:
        return '"' + hashlib.md5(self.files[path]).hexdigest() + '"'

    def gets(self) -> list[dict]:
        return [e for e in self.log if e["method"] == "GET"]

    def _serve(self, h: BaseHTTPRequestHandler, head: bool):
        entry = {"method": h.command, "path": h.path, "range": h.headers.get("Range"), "sent": 0}
        self.log.append(entry)
        body = self.files.get(h.path)
        if body is None:
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if not head and self.fail_503:
            self.fail_503 -= 1
            h.send_response(503)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if self.corrupt:
            body = bytes(b ^ 0xFF for b in body[:64]) + body[64:]
        start, status = 0, 200
        rng, if_range = h.headers.get("Range"), h.headers.get("If-Range")
        if rng and self.ranges and (if_range is None or if_range == self.etag(h.path)):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            status = 206
            if start >= len(body):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(body)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
        payload = body[start:]
        h.send_response(status)
        h.send_header("Content-Length", str(len(payload)))
        h.send_header("ETag", self.etag(h.path))
        if self.ranges:
            h.send_header("Accept-Ranges", "bytes")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        h.end_headers()
        if head:
            return
        if self.drops:
            self.drops -= 1
            cut = payload[: self.drop_at]
            entry["sent"] = len(cut)  # recorded before writing: the client may finish before this thread resumes
            h.wfile.write(cut)
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        entry["sent"] = len(payload)
        h.wfile.write(payload)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(files, ranges=True):
        s = FaultyServer(files, ranges)
        servers.append(s)
        return s
    yield start
    for s in servers:
        s.close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # A proxy from the environment must not intercept loopback requests.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def refused_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


BLOB = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()


# --------------------------------------------------------------------------- download()

def test_download_success_and_rename(serve, tmp_path):
    s = serve({"/f.bin": BLOB})
    dest = download(s.url("/f.bin"), tmp_path / "f.bin", md5=md5(BLOB), **FAST)
    assert dest.read_bytes() == BLOB
    assert not (tmp_path / "f.bin.part").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_interrupted_then_rerun_resumes_with_range(serve, tmp_path):
    s = serve({"/f.bin": BLOB})
    s.drops, s.drop_at = 1, 100_000
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError, match="after 1 attempts"):
        download(s.url("/f.bin"), dest, md5=md5(BLOB), **FAST)
    assert not dest.exists(), "an incomplete download must not appear under its final name"
    kept = (tmp_path / "f.bin.part").stat().st_size
    assert 0 < kept <= 100_000  # what arrived, less at most one partial read

    download(s.url("/f.bin"), dest, md5=md5(BLOB), **FAST)
    first, second = s.gets()
    assert first["range"] is None
    assert second["range"] == f"bytes={kept}-"
    assert second["sent"] == len(BLOB) - kept, "the rerun must not restart from zero"
    assert dest.read_bytes() == BLOB


def test_retries_resume_within_one_run(serve, tmp_path):
    s = serve({"/f.bin": BLOB})
    s.drops, s.drop_at = 2, 70_000
    dest = download(s.url("/f.bin"), tmp_path / "f.bin", md5=md5(BLOB), **{**FAST, "retries": 3})
    assert dest.read_bytes() == BLOB
    ranges = [g["range"] for g in s.gets()]
    assert len(ranges) == 3 and ranges[0] is None
    assert all(r and r.startswith("bytes=") and int(r[6:-1]) > 0 for r in ranges[1:])
    assert int(ranges[2][6:-1]) > int(ranges[1][6:-1]), "each retry continues where the last stopped"


def test_server_without_range_support_restarts_cleanly(serve, tmp_path):
    s = serve({"/f.bin": BLOB}, ranges=False)
    s.drops, s.drop_at = 1, 120_000
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError):
        download(s.url("/f.bin"), dest, md5=md5(BLOB), **FAST)
    download(s.url("/f.bin"), dest, md5=md5(BLOB), **FAST)
    assert s.gets()[1]["range"].startswith("bytes=")  # asked, but got the whole file
    assert s.gets()[1]["sent"] == len(BLOB)
    assert dest.read_bytes() == BLOB, "a 200 answer to a Range request must replace, not append"


def test_changed_file_is_not_spliced(serve, tmp_path):
    """If-Range: after the file changed on the server, a resume gets the new file whole."""
    s = serve({"/f.bin": BLOB})
    s.drops, s.drop_at = 1, 100_000
    with pytest.raises(DownloadError):
        download(s.url("/f.bin"), tmp_path / "f.bin", **FAST)
    new = BLOB[::-1]
    s.files["/f.bin"] = new
    download(s.url("/f.bin"), tmp_path / "f.bin", md5=md5(new), **FAST)
    assert (tmp_path / "f.bin").read_bytes() == new


def test_checksum_mismatch_quarantines(serve, tmp_path):
    s = serve({"/f.bin": BLOB})
    s.corrupt = True
    with pytest.raises(DownloadError, match="checksum mismatch") as e:
        download(s.url("/f.bin"), tmp_path / "f.bin", md5=md5(BLOB), **FAST)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "f.bin").exists()
    assert not (tmp_path / "f.bin.part").exists()
    assert (tmp_path / "f.bin.bad").stat().st_size == len(BLOB)


def test_http_503_is_retried(serve, tmp_path):
    s = serve({"/f.bin": BLOB})
    s.fail_503 = 2
    download(s.url("/f.bin"), tmp_path / "f.bin", sha256=hashlib.sha256(BLOB).hexdigest(),
             **{**FAST, "retries": 2})
    assert len(s.gets()) == 3


def test_http_404_fails_at_once(serve, tmp_path):
    s = serve({})
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(s.url("/missing"), tmp_path / "f.bin", **{**FAST, "retries": 3, "backoff": 5})
    assert len(s.gets()) == 1


def test_connection_refused_retries_with_backoff(tmp_path):
    url = f"http://127.0.0.1:{refused_port()}/f.bin"
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="after 3 attempts.*cannot connect") as e:
        download(url, tmp_path / "f.bin", **{**FAST, "retries": 2, "backoff": 0.1})
    assert time.monotonic() - t0 >= 0.1 + 0.2, "waits 0.1 s, then 0.2 s"
    assert "\n" not in str(e.value)
    assert not (tmp_path / "f.bin").exists()


def test_timeout_is_retried_then_fails(tmp_path):
    listener = socket.socket()  # accepts TCP connections (backlog) but never answers
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/f.bin"
        t0 = time.monotonic()
        with pytest.raises(DownloadError, match="after 2 attempts.*(timed out|Timeout)"):
            download(url, tmp_path / "f.bin", **{**FAST, "retries": 1, "timeout": 0.3})
        assert time.monotonic() - t0 < 5
    finally:
        listener.close()


def test_existing_verified_file_is_not_downloaded(serve, tmp_path):
    s = serve({"/f.bin": BLOB})
    (tmp_path / "f.bin").write_bytes(BLOB)
    download(s.url("/f.bin"), tmp_path / "f.bin", md5=md5(BLOB), **FAST)
    assert s.log == []


def test_reachable_all(serve):
    s = serve({"/f.bin": BLOB})
    dead = f"http://127.0.0.1:{refused_port()}/x"
    assert reachable_all([s.url("/f.bin"), dead], timeout=1) == {s.url("/f.bin"): True, dead: False}


# --------------------------------------------------------------------------- extract()

def _tar(entries) -> bytes:
    """entries: (name, bytes) files, or (name, ("sym"|"hard", target)) links."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, content in entries:
            ti = tarfile.TarInfo(name)
            if isinstance(content, tuple):
                ti.type = tarfile.SYMTYPE if content[0] == "sym" else tarfile.LNKTYPE
                ti.linkname = content[1]
                tf.addfile(ti)
            else:
                ti.size = len(content)
                tf.addfile(ti, io.BytesIO(content))
    return buf.getvalue()


def _zip(entries) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in entries:
            if isinstance(content, tuple):
                info = zipfile.ZipInfo(name)
                info.external_attr = 0o120777 << 16
                zf.writestr(info, content[1])
            else:
                zf.writestr(name, content)
    return buf.getvalue()


def _files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


BAD_MEMBERS = {
    "dotdot": [("ok/a.txt", b"a"), ("../evil.txt", b"x")],
    "nested_dotdot": [("ok/../../evil.txt", b"x")],
    "absolute": [("ok/a.txt", b"a"), ("/tmp/evil_abs.txt", b"x")],
    "symlink_out": [("ok/a.txt", b"a"), ("ok/link", ("sym", "../../outside"))],
    "symlink_abs": [("link", ("sym", "/etc"))],
    "write_through_link": [("d", ("sym", ".")), ("d/e", ("sym", "../outside"))],
}


@pytest.mark.parametrize("fmt", ["tar", "zip"])
@pytest.mark.parametrize("case", sorted(BAD_MEMBERS))
def test_extract_refuses_escaping_members(tmp_path, fmt, case):
    entries = BAD_MEMBERS[case]
    archive = tmp_path / f"a.{fmt}"
    archive.write_bytes(_tar(entries) if fmt == "tar" else _zip(entries))
    root = tmp_path / "ct_data"
    root.mkdir()
    with pytest.raises(DownloadError, match="refused") as e:
        extract(archive, root / "out", progress=False)
    assert "\n" not in str(e.value)
    assert _files_under(tmp_path) == {"a." + fmt, "ct_data"}, "nothing may be written anywhere"
    assert not Path("/tmp/evil_abs.txt").exists()


def test_extract_refuses_hardlink_outside(tmp_path):
    archive = tmp_path / "a.tar"
    archive.write_bytes(_tar([("h", ("hard", "../../etc/passwd"))]))
    with pytest.raises(DownloadError, match="hard link"):
        extract(archive, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_extract_skips_macos_files_and_keeps_inner_links(tmp_path):
    entries = [("T/imagesTr/a.nii.gz", b"A"), ("T/imagesTr/._a.nii.gz", b"junk"),
               ("__MACOSX/T/._x", b"junk"), ("T/latest", ("sym", "imagesTr/a.nii.gz"))]
    for fmt, blob in (("tar", _tar(entries)), ("zip", _zip(entries))):
        archive = tmp_path / f"a.{fmt}"
        archive.write_bytes(blob)
        out = extract(archive, tmp_path / f"out_{fmt}", progress=False)
        assert _files_under(out) == {"T", "T/imagesTr", "T/imagesTr/a.nii.gz", "T/latest"}
        assert (out / "T/latest").is_symlink() and (out / "T/latest").read_bytes() == b"A"


def test_extract_rejects_non_archive(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"not an archive" * 100)
    with pytest.raises(DownloadError, match="neither a tar nor a zip"):
        extract(tmp_path / "x.tar", tmp_path / "out", progress=False)


# --------------------------------------------------------------------------- the CLI, end to end

def _nii(shape, values, dtype) -> bytes:
    rng = np.random.default_rng(len(values))
    data = rng.choice(np.asarray(values), size=shape).astype(dtype)
    img = nib.Nifti1Image(data, np.diag([0.8, 0.8, 5.0, 1.0]))
    return gzip.compress(img.to_bytes(), mtime=0)


MSD_NUMBERS = [2, 3, 10, 12, 40]
L2R_NUMBERS = [1, 2, 3, 4]


def msd_tar() -> bytes:
    entries = [("Task09_Spleen/dataset.json", json.dumps({"labels": {"0": "background", "1": "spleen"}}).encode()),
               ("Task09_Spleen/imagesTs/spleen_1.nii.gz", _nii((6, 6, 3), [-1000, 40], np.int16))]
    for n in MSD_NUMBERS:
        entries += [(f"Task09_Spleen/imagesTr/spleen_{n}.nii.gz", _nii((6, 6, 3), [-1000, 40, 300], np.int16)),
                    (f"Task09_Spleen/labelsTr/spleen_{n}.nii.gz", _nii((6, 6, 3), [0, 1], np.uint8)),
                    (f"Task09_Spleen/imagesTr/._spleen_{n}.nii.gz", b"\x00\x05\x16\x07 AppleDouble"),
                    (f"Task09_Spleen/labelsTr/._spleen_{n}.nii.gz", b"\x00\x05\x16\x07 AppleDouble")]
    return _tar(entries)


def l2r_zip() -> bytes:
    names = ["spleen", "right kidney", "left kidney", "gall bladder", "esophagus", "liver", "stomach",
             "aorta", "inferior vena cava", "portal and splenic vein", "pancreas",
             "right adrenal gland", "left adrenal gland"]
    meta = {"name": "AbdomenCTCT", "labels": {str(i): n for i, n in enumerate(["background"] + names)}}
    entries = [("AbdomenCTCT/AbdomenCTCT_dataset.json", json.dumps(meta).encode())]
    for n in L2R_NUMBERS:
        entries += [(f"AbdomenCTCT/imagesTr/AbdomenCTCT_{n:04d}_0000.nii.gz",
                     _nii((6, 5, 8), [-1000, 50], np.int16)),
                    (f"AbdomenCTCT/labelsTr/AbdomenCTCT_{n:04d}_0000.nii.gz",
                     _nii((6, 5, 8), list(range(14)), np.uint8))]
    return _zip(entries)


@pytest.fixture
def datasets(serve):
    tar, zp = msd_tar(), l2r_zip()
    s = serve({"/Task09_Spleen.tar": tar, "/AbdomenCTCT.zip": zp})
    return s, tar, zp


def _cli_args(s, out, *extra, md5_=None):
    return ["--dataset", "msd-l2r", "--out", str(out), "--msd-url", s.url("/Task09_Spleen.tar"),
            "--l2r-url", s.url("/AbdomenCTCT.zip"), "--retries", "1", "--backoff", "0.01",
            "--timeout", "2", "--no-progress", *(["--msd-md5", md5_] if md5_ else []), *extra]


def test_cli_msd_l2r_success_then_second_run_skips(datasets, tmp_path, capsys):
    s, tar, zp = datasets
    out = tmp_path / "ct_data"
    assert cli.main(_cli_args(s, out, "--n-cases", "5", md5_=md5(tar))) == 0
    rows = read_manifest(out / "manifest.csv")
    ids = [r.case_id for r in rows]
    # selection: 3 MSD evenly over sorted [2, 3, 10, 12, 40] (first, middle, last), 2 AbdomenCTCT
    assert ids == ["msd_spleen_2", "msd_spleen_10", "msd_spleen_40", "abdomenctct_0001", "abdomenctct_0004"]
    msd, l2r = rows[0], rows[3]
    assert msd.source == "msd_spleen" and msd.label_map == {1: 1}
    assert l2r.source == "abdomenctct" and l2r.label_map == ABDOMENCTCT.label_map
    assert l2r.label_map[6] == 5 and l2r.label_map[8] == 52 and l2r.label_map[5] == 15
    assert msd.shape == (6, 6, 3) and msd.spacing == (0.8, 0.8, 5.0) and msd.orientation == "RAS"
    assert msd.image.is_file() and msd.label.is_file()
    assert msd.sha256 == hashlib.sha256(msd.image.read_bytes()).hexdigest()
    assert not [p for p in out.rglob("._*")], "macOS ._ files must be skipped"
    record = out / "AbdomenCTCT.zip.sha256"
    assert record.read_text().split()[0] == hashlib.sha256(zp).hexdigest()
    assert json.loads((out / "manifest.json").read_text())["dataset"] == "msd-l2r"

    n_requests = len(s.log)
    manifest_before = (out / "manifest.csv").read_text()
    assert cli.main(_cli_args(s, out, "--n-cases", "5", md5_=md5(tar))) == 0
    assert len(s.log) == n_requests, "second run must verify and skip, no download"
    assert (out / "manifest.csv").read_text() == manifest_before


def test_cli_fewer_cases_than_asked_takes_all(datasets, tmp_path, capsys):
    s, tar, _ = datasets
    out = tmp_path / "ct_data"
    assert cli.main(_cli_args(s, out, "--n-cases", "20", md5_=md5(tar))) == 0
    rows = read_manifest(out / "manifest.csv")
    assert len(rows) == len(MSD_NUMBERS) + len(L2R_NUMBERS)
    text = capsys.readouterr().out
    assert "only 5 labelled cases available (asked for 10); taking all" in text
    assert "only 4 labelled cases available (asked for 10); taking all" in text


def test_cli_recorded_sha256_catches_a_changed_file(datasets, tmp_path, capsys):
    s, tar, zp = datasets
    out = tmp_path / "ct_data"
    assert cli.main(_cli_args(s, out, "--n-cases", "2", md5_=md5(tar))) == 0
    (out / "downloads" / "AbdomenCTCT.zip").unlink()
    s.corrupt = True
    assert cli.main(_cli_args(s, out, "--n-cases", "2", md5_=md5(tar))) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checksum mismatch for AbdomenCTCT.zip") and "recorded in" in err
    assert "\n" not in err


def test_cli_checksum_mismatch_extracts_nothing(datasets, tmp_path, capsys):
    s, tar, _ = datasets
    out = tmp_path / "ct_data"
    assert cli.main(_cli_args(s, out, md5_="0" * 32)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checksum mismatch for Task09_Spleen.tar") and "\n" not in err
    assert not (out / "msd_spleen").exists() and not (out / "manifest.csv").exists()
    assert (out / "downloads" / "Task09_Spleen.tar.bad").is_file()
    assert not (out / "downloads" / "Task09_Spleen.tar").exists()


def test_cli_refuses_traversal_archive(serve, tmp_path, capsys):
    evil = _tar([("Task09_Spleen/imagesTr/spleen_1.nii.gz", b"x"), ("../../escaped.txt", b"x")])
    s = serve({"/Task09_Spleen.tar": evil, "/AbdomenCTCT.zip": l2r_zip()})
    out = tmp_path / "work" / "ct_data"
    assert cli.main(_cli_args(s, out, md5_=md5(evil))) == 1
    assert "refused archive member" in capsys.readouterr().err
    assert _files_under(tmp_path) == {"work", "work/ct_data", "work/ct_data/downloads",
                                      "work/ct_data/downloads/Task09_Spleen.tar"}


def test_cli_server_down_one_error_line(tmp_path):
    dead = f"http://127.0.0.1:{refused_port()}"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(REPO / "01_download_data.py"), "--dataset", "msd-l2r", "--out", str(tmp_path),
         "--msd-url", dead + "/Task09_Spleen.tar", "--l2r-url", dead + "/AbdomenCTCT.zip",
         "--retries", "2", "--backoff", "0.05", "--no-progress"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, "NO_PROXY": "127.0.0.1"})
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: download failed after 3 attempts"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 60


def test_cli_auto_falls_back_to_offline_quickly(tmp_path, monkeypatch, capsys):
    tiny = (phantoms.PhantomSpec("phantom_00", (40, 40, 24), (10.0, 10.0, 18.0), "RAS", 1),
            phantoms.PhantomSpec("phantom_01", (40, 40, 24), (10.0, 10.0, 18.0), "LPS", 2))
    monkeypatch.setattr(phantoms, "DEFAULT_SET", tiny)
    dead = f"http://127.0.0.1:{refused_port()}"
    out = tmp_path / "ct_data"
    t0 = time.monotonic()
    rc = cli.main(["--out", str(out), "--msd-url", dead + "/a.tar", "--l2r-url", dead + "/b.zip", "--no-progress"])
    assert rc == 0 and time.monotonic() - t0 < 30
    assert "OFFLINE FALLBACK" in capsys.readouterr().out
    info = json.loads((out / "manifest.json").read_text())
    assert info["requested"] == "auto" and info["dataset"] == "offline" and "unreachable" in info["note"]
    rows = read_manifest(out / "manifest.csv")
    assert [r.source for r in rows] == ["offline_phantom"] * 2
    assert [r.orientation for r in rows] == ["RAS", "LPS"]


def test_cli_auto_uses_network_when_reachable(datasets, tmp_path):
    s, tar, _ = datasets
    out = tmp_path / "ct_data"
    args = _cli_args(s, out, "--n-cases", "2", md5_=md5(tar))
    args[1] = "auto"
    assert cli.main(args) == 0
    assert json.loads((out / "manifest.json").read_text())["dataset"] == "msd-l2r"
    assert {r.source for r in read_manifest(out / "manifest.csv")} == {"msd_spleen", "abdomenctct"}
