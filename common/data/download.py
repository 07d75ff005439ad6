"""HTTP downloads that survive faults, checksums, and safe archive extraction.

- ``download(url, dest, md5=..., sha256=...)`` writes to ``dest + ".part"``, resumes an
  interrupted transfer with an HTTP Range request (restarts cleanly where the server ignores
  Range or the file changed), retries connection errors, timeouts and 5xx with exponential
  backoff, verifies the checksum, and only then renames the file to ``dest``. A file that
  fails its checksum is moved to ``dest + ".bad"``.
- ``extract(archive, dest_dir)`` checks every member of a tar or zip before writing anything:
  absolute paths, ``..`` components, links pointing outside ``dest_dir``, and device files
  are refused. macOS ``._*`` / ``__MACOSX`` members are skipped. Extraction goes to a
  temporary folder that is renamed to ``dest_dir`` when complete.

Every failure is raised as ``DownloadError`` with a one-line message.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import stat
import tarfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import requests
from tqdm import tqdm

CHUNK = 1 << 20
# Small network reads: a read cut by a dropped connection loses its partial chunk.
NET_CHUNK = 1 << 16
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class DownloadError(Exception):
    """A download, checksum or extraction failure; ``str(e)`` is one line."""


def file_hash(path: Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, md5: str | None = None, sha256: str | None = None) -> bool:
    """True when ``path`` matches every checksum given (and exists)."""
    path = Path(path)
    if not path.is_file():
        return False
    return all(file_hash(path, algo) == want.lower()
               for algo, want in (("md5", md5), ("sha256", sha256)) if want)


def quarantine(path: Path, name: str | None = None) -> Path:
    """Move a file that failed its checksum aside, to ``<name or path.name>.bad``."""
    bad = path.with_name((name or path.name) + ".bad")
    os.replace(path, bad)
    return bad


# --------------------------------------------------------------------------- download

class _Interrupted(Exception):
    """A transfer that stopped early; retried and resumed."""


def _parse_content_range(value: str | None):
    m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", value or "")
    if not m:
        return None
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), total


def _transfer(session, url, part: Path, meta: Path, timeout, progress: bool) -> None:
    """One attempt: continue ``part`` from its current size where the server allows."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}  # byte offsets must count the bytes on disk
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if meta.exists():
            headers["If-Range"] = meta.read_text().strip()  # the server sends all if it changed
    with session.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416 and offset:
            # Range not satisfiable: either we already have all of it, or the part is wrong.
            total = (r.headers.get("Content-Range") or "").rpartition("/")[2]
            if total.isdigit() and int(total) == offset:
                return
            part.unlink()
            raise _Interrupted(f"server refused resume at byte {offset}; restarting")
        if r.status_code in RETRY_STATUS:
            raise _Interrupted(f"HTTP {r.status_code} from {url}")
        if r.status_code not in (200, 206):
            raise DownloadError(f"HTTP {r.status_code} {r.reason} for {url}")

        if r.status_code == 206:
            start, total = _parse_content_range(r.headers.get("Content-Range")) or (-1, None)
            if start != offset:
                part.unlink(missing_ok=True)
                raise _Interrupted("server answered a different range; restarting")
            mode = "ab"
        else:  # 200: full body, whether we asked for a range or not
            offset, mode = 0, "wb"
            length = r.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            validator = r.headers.get("ETag") or r.headers.get("Last-Modified")
            if validator:
                meta.write_text(validator)
            else:
                meta.unlink(missing_ok=True)

        with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=part.name[:-5], leave=False,
                                         disable=not progress) as bar:
            try:
                for block in r.iter_content(NET_CHUNK):
                    f.write(block)
                    bar.update(len(block))
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    requests.Timeout) as e:
                raise _Interrupted(f"transfer interrupted: {type(e).__name__}") from e
        size = part.stat().st_size
        if total is not None and size < total:
            raise _Interrupted(f"transfer stopped at {size} of {total} bytes")
        if total is not None and size > total:
            part.unlink()
            raise _Interrupted(f"got {size} bytes, expected {total}; restarting")


def download(url: str, dest: Path, *, md5: str | None = None, sha256: str | None = None,
             retries: int = 5, backoff: float = 1.0, timeout: float | tuple = (10, 60),
             progress: bool = True, session: requests.Session | None = None) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verify, then rename atomically.

    ``retries`` is the number of extra attempts after the first; waits are
    ``backoff * 2**attempt`` seconds. An existing ``dest`` is kept without any network access
    when it matches its checksums, or when no checksum is given; otherwise it is downloaded anew.
    """
    dest = Path(dest)
    if dest.is_file() and verify(dest, md5, sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    meta = dest.with_name(dest.name + ".part.etag")
    session = session or requests.Session()
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            _transfer(session, url, part, meta, timeout, progress)
            break
        except _Interrupted as e:
            last = str(e)
        except requests.Timeout:
            last = f"timed out connecting to {url}"
        except requests.ConnectionError as e:
            last = f"cannot connect to {url} ({_reason(e)})"
        except requests.RequestException as e:
            raise DownloadError(f"{type(e).__name__} for {url}: {_reason(e)}") from e
    else:
        raise DownloadError(f"download failed after {retries + 1} attempts: {last}")

    for algo, want in (("md5", md5), ("sha256", sha256)):
        if want:
            got = file_hash(part, algo)
            if got != want.lower():
                bad = quarantine(part, dest.name)
                meta.unlink(missing_ok=True)
                raise DownloadError(f"checksum mismatch for {dest.name}: {algo} {got}, expected "
                                    f"{want.lower()}; moved to {bad}")
    os.replace(part, dest)
    meta.unlink(missing_ok=True)
    return dest


def _reason(e: Exception) -> str:
    text = str(e.args[0] if e.args else e)
    for pattern in (r"\[Errno -?\d+\] [^'\")]+", r"Connection refused", r"timed out", r"Name or service not known"):
        m = re.search(pattern, text)
        if m:
            return m.group(0).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def reachable(url: str, timeout: float = 3.0, attempts: int = 2) -> bool:
    """Quick probe: any HTTP answer counts; DNS failure, refusal or timeout does not."""
    for _ in range(attempts):
        try:
            requests.head(url, timeout=timeout, allow_redirects=False).close()
            return True
        except requests.RequestException:
            pass
    return False


def reachable_all(urls: list[str], timeout: float = 3.0) -> dict[str, bool]:
    """Probe ``urls`` in parallel; a probe still running (e.g. slow DNS, which ``timeout`` does
    not bound) after ``3 * timeout`` seconds counts as unreachable."""
    pool = ThreadPoolExecutor(max_workers=max(1, len(urls)))
    futures = {url: pool.submit(reachable, url, timeout) for url in urls}
    wait(futures.values(), timeout=3 * timeout)
    pool.shutdown(wait=False, cancel_futures=True)
    return {url: f.done() and f.result() for url, f in futures.items()}


# --------------------------------------------------------------------------- extraction

def _skipped(name: str) -> bool:
    parts = name.split("/")
    return parts[-1].startswith("._") or "__MACOSX" in parts or parts[-1] in ("", ".DS_Store")


def _safe_name(name: str) -> str:
    """Return the normalised relative member path, or raise for absolute/traversing names."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or "\\" in name:
        raise DownloadError(f"refused archive member with an absolute path: {name!r}")
    if ".." in name.split("/"):
        raise DownloadError(f"refused archive member with '..' (path traversal): {name!r}")
    norm = posixpath.normpath(name)
    if norm in (".", ""):
        return ""
    return norm


def _check_link(name: str, target: str, hard: bool) -> None:
    """A link is allowed only where it resolves inside the extraction folder."""
    base = "" if hard else posixpath.dirname(name)
    resolved = posixpath.normpath(posixpath.join(base, target))
    if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
        kind = "hard link" if hard else "symlink"
        raise DownloadError(f"refused {kind} pointing outside the archive: {name!r} -> {target!r}")


class _Member:
    def __init__(self, name, kind, size, target=None, ref=None):
        self.name, self.kind, self.size, self.target, self.ref = name, kind, size, target, ref


def _tar_members(tf: tarfile.TarFile):
    for m in tf.getmembers():
        if _skipped(m.name):
            continue
        name = _safe_name(m.name)
        if m.issym() or m.islnk():
            _check_link(name, m.linkname, m.islnk())
            yield _Member(name, "hardlink" if m.islnk() else "symlink", 0, m.linkname, m)
        elif m.isdir():
            yield _Member(name, "dir", 0)
        elif m.isfile():
            yield _Member(name, "file", m.size, ref=m)
        else:
            raise DownloadError(f"refused special archive member (device or fifo): {m.name!r}")


def _zip_members(zf: zipfile.ZipFile):
    for info in zf.infolist():
        if _skipped(info.filename):
            continue
        name = _safe_name(info.filename)
        if stat.S_ISLNK(info.external_attr >> 16):
            target = zf.read(info).decode("utf-8", "replace")
            _check_link(name, target, False)
            yield _Member(name, "symlink", 0, target)
        elif info.is_dir():
            yield _Member(name, "dir", 0)
        else:
            yield _Member(name, "file", info.file_size, ref=info)


def _check_no_member_under_link(members) -> None:
    # A member below a link (``a -> .`` then ``a/b -> ../x``) would resolve elsewhere than checked.
    links = {m.name for m in members if m.kind in ("symlink", "hardlink")}
    for m in members:
        parts = m.name.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in links:
                raise DownloadError(f"refused archive member below a link: {m.name!r}")


def extract(archive: Path, dest_dir: Path, progress: bool = True) -> Path:
    """Extract a tar (any compression) or zip into ``dest_dir``; nothing is written on refusal."""
    archive, dest_dir = Path(archive), Path(dest_dir)
    if tarfile.is_tarfile(archive):
        handle, lister = tarfile.open(archive), _tar_members
        opener = lambda m: handle.extractfile(m.ref)  # noqa: E731
    elif zipfile.is_zipfile(archive):
        handle, lister = zipfile.ZipFile(archive), _zip_members
        opener = lambda m: handle.open(m.ref)  # noqa: E731
    else:
        raise DownloadError(f"{archive.name} is neither a tar nor a zip archive")

    tmp = dest_dir.with_name(dest_dir.name + ".extracting")
    with handle:
        try:
            members = list(lister(handle))  # validates every member before anything is written
            _check_no_member_under_link(members)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
            raise DownloadError(f"cannot read {archive.name}: {e}") from e
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        links = []
        try:
            with tqdm(total=sum(m.size for m in members), unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"extract {archive.name}", leave=False, disable=not progress) as bar:
                for m in members:
                    out = tmp / m.name
                    if m.kind == "dir":
                        out.mkdir(parents=True, exist_ok=True)
                    elif m.kind == "file":
                        out.parent.mkdir(parents=True, exist_ok=True)
                        with opener(m) as src, open(out, "wb") as dst:
                            for block in iter(lambda: src.read(CHUNK), b""):
                                dst.write(block)
                                bar.update(len(block))
                    else:
                        links.append(m)
            for m in links:  # after the files, so that nothing is ever written through a link
                out = tmp / m.name
                out.parent.mkdir(parents=True, exist_ok=True)
                if m.kind == "symlink":
                    os.symlink(m.target, out)
                else:
                    shutil.copyfile(tmp / _safe_name(m.target), out)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DownloadError(f"extraction of {archive.name} failed: {e}") from e
    shutil.rmtree(dest_dir, ignore_errors=True)
    os.replace(tmp, dest_dir)
    return dest_dir
