"""Benchmark cases: dataset definitions, case selection, folder scanning and the manifest.

The manifest (``ct_data/manifest.csv``) is what every later script reads, through
``read_manifest``. One row per case::

    case_id      unique name, e.g. msd_spleen_10, abdomenctct_0001, phantom_03, example_ct
    image        CT path, relative to the manifest's folder (POSIX separators)
    label        ground-truth path, same convention; empty when there is none
    label_map    dataset label -> TotalSegmentator id, "1:1;6:5" (empty when no label)
    source       msd_spleen | abdomenctct | offline_phantom | from_dir
    shape        voxels "512x512x90"
    spacing      mm "0.703125x0.703125x5"
    orientation  nibabel axis codes of the stored image, "RAS" or "LPS" ...
    sha256       of the image file
"""
from __future__ import annotations

import csv
import fnmatch
import json
import math
import os
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from common.core.paths import NIFTI_SUFFIXES
from common.data import phantoms
from common.data.download import DownloadError, download, extract, file_hash

COLUMNS = ("case_id", "image", "label", "label_map", "source", "shape", "spacing", "orientation", "sha256")
DEFAULT_EXCLUDE = ("*seg*", "*label*", "*mask*")


class DataError(Exception):
    """A problem with local data (no cases, unreadable file); ``str(e)`` is one line."""


# --------------------------------------------------------------------------- datasets

@dataclass(frozen=True)
class Dataset:
    key: str
    url: str
    archive: str
    md5: str | None = None
    sha256: str | None = None
    label_map: dict[int, int] = field(default_factory=dict)


MSD_SPLEEN = Dataset(
    key="msd_spleen",
    url="https://msd-for-monai.s3-us-west-2.amazonaws.com/Task09_Spleen.tar",
    archive="Task09_Spleen.tar",
    md5="410d4a301da4e5b2f6f86ec3ddba524e",
    label_map={1: 1},
)

# Learn2Reg AbdomenCTCT labels 1..13 (BTCV order) -> TotalSegmentator "total" ids.
ABDOMENCTCT = Dataset(
    key="abdomenctct",
    url="https://cloud.imi.uni-luebeck.de/s/32WaSRaTnFk2JeT/download/AbdomenCTCT.zip",
    archive="AbdomenCTCT.zip",
    label_map={1: 1, 2: 2, 3: 3, 4: 4, 5: 15, 6: 5, 7: 6, 8: 52, 9: 63, 10: 64, 11: 7, 12: 8, 13: 9},
)

# Organ names as datasets spell them (lower case, letters only) -> TotalSegmentator id.
_ORGAN_IDS = {
    "spleen": 1, "rightkidney": 2, "kidneyright": 2, "leftkidney": 3, "kidneyleft": 3,
    "gallbladder": 4, "liver": 5, "stomach": 6, "pancreas": 7,
    "rightadrenalgland": 8, "adrenalglandright": 8, "leftadrenalgland": 9, "adrenalglandleft": 9,
    "esophagus": 15, "oesophagus": 15, "aorta": 52, "inferiorvenacava": 63, "ivc": 63,
    "portalveinandsplenicvein": 64, "portalandsplenicvein": 64, "portalsplenicvein": 64,
}


def label_map_from_json(path: Path) -> dict[int, int] | None:
    """Read ``{"labels": {"1": "spleen", ...}}`` and map the names to TotalSegmentator ids.

    Returns None when the file has no such table or a name is not recognised.
    """
    try:
        labels = json.loads(Path(path).read_text()).get("labels")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(labels, dict):
        return None
    out = {}
    for k, name in labels.items():
        if isinstance(name, str) and str(k).isdigit() and int(k) > 0:
            ts = _ORGAN_IDS.get(re.sub(r"[^a-z]", "", name.lower()))
            if ts is None:
                return None
            out[int(k)] = ts
    return out or None


# --------------------------------------------------------------------------- manifest

@dataclass
class Case:
    """One manifest row; fields are typed, and ``case["image"]`` works as well as ``case.image``."""

    case_id: str
    image: Path
    label: Path | None
    label_map: dict[int, int]
    source: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    orientation: str
    sha256: str

    def __getitem__(self, key: str):
        return getattr(self, key)


def describe(image: Path) -> tuple[tuple[int, ...], tuple[float, ...], str]:
    """Shape, spacing (mm) and orientation code of a NIfTI file, from its header only."""
    img = nib.load(str(image))
    return (tuple(int(n) for n in img.shape[:3]),
            tuple(float(z) for z in img.header.get_zooms()[:3]),
            "".join(nib.aff2axcodes(img.affine)))


def make_case(case_id, image, label, label_map, source, sha256=None) -> Case:
    shape, spacing, orientation = describe(image)
    return Case(case_id, Path(image), Path(label) if label else None, dict(label_map), source,
                shape, spacing, orientation, sha256 or file_hash(Path(image)))


def _fmt_map(m: dict[int, int]) -> str:
    return ";".join(f"{k}:{v}" for k, v in sorted(m.items()))


def _parse_map(text: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in (item.split(":") for item in text.split(";") if item)}


def write_manifest(cases: list[Case], path: Path, info: dict | None = None) -> Path:
    """Write ``cases`` to ``path`` (CSV, atomically); ``info`` goes to ``path`` with ``.json``."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise DataError(f"duplicate case ids in manifest: {sorted({i for i in ids if ids.count(i) > 1})}")

    def rel(p):
        return Path(os.path.relpath(p.absolute(), path.parent)).as_posix() if p else ""

    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for c in cases:
            w.writerow([c.case_id, rel(c.image), rel(c.label), _fmt_map(c.label_map), c.source,
                        "x".join(str(n) for n in c.shape), "x".join(f"{s:.6g}" for s in c.spacing),
                        c.orientation, c.sha256])
    os.replace(tmp, path)
    if info is not None:
        info_path = path.with_suffix(".json")
        info_tmp = info_path.with_name("." + info_path.name + ".tmp")
        info_tmp.write_text(json.dumps(info, indent=2) + "\n")
        os.replace(info_tmp, info_path)
    return path


def read_manifest(path: Path | str | None = None) -> list[Case]:
    """Read a manifest (default ``ct_data/manifest.csv``) into typed ``Case`` rows.

    ``image``/``label`` come back as absolute paths (``label`` None where empty),
    ``label_map`` as ``dict[int, int]``, ``shape`` as ints, ``spacing`` as floats (mm).
    """
    from common.core.paths import DEFAULT_MANIFEST

    path = Path(path or DEFAULT_MANIFEST).absolute()
    base = path.parent
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path} is missing columns {sorted(missing)}")
        return [Case(
            case_id=r["case_id"],
            image=Path(os.path.normpath(base / r["image"])),
            label=Path(os.path.normpath(base / r["label"])) if r["label"] else None,
            label_map=_parse_map(r["label_map"]),
            source=r["source"],
            shape=tuple(int(n) for n in r["shape"].split("x")),
            spacing=tuple(float(s) for s in r["spacing"].split("x")),
            orientation=r["orientation"],
            sha256=r["sha256"],
        ) for r in reader]


# --------------------------------------------------------------------------- selection

def _case_number(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", _stem(path))) or (0,)


def _stem(path: Path) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def select_evenly(items: list, n: int) -> list:
    """The selection rule: ``n`` items evenly spaced over ``items`` (first and last included).

    ``items`` must already be in a deterministic order (we sort by case number).
    """
    if n >= len(items):
        return list(items)
    if n <= 0:
        return []
    if n == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def labelled_pairs(root: Path) -> list[tuple[Path, Path]]:
    """(image, label) pairs under ``root``: ``*/imagesTr/X.nii.gz`` with ``*/labelsTr/X.nii.gz``,
    sorted by case number; macOS ``._*`` files are ignored."""
    pairs = []
    for image in Path(root).rglob("imagesTr/*.nii*"):
        if image.name.startswith("._"):
            continue
        label = image.parent.parent / "labelsTr" / image.name
        if label.is_file():
            pairs.append((image, label))
    return sorted(pairs, key=lambda p: (_case_number(p[0]), p[0].name))


# --------------------------------------------------------------------------- real datasets

Log = Callable[[str], None]


def _print(msg: str) -> None:
    print(msg, flush=True)


def _ensure_extracted(archive: Path, dest: Path, fingerprint: str, progress: bool, log: Log) -> Path:
    marker = dest / ".extracted"
    if marker.is_file() and marker.read_text().strip() == fingerprint:
        log(f"  {dest.name}: already extracted, verified against {archive.name}")
        return dest
    log(f"  extracting {archive.name} -> {dest}")
    extract(archive, dest, progress=progress)
    marker.write_text(fingerprint + "\n")
    return dest


def prepare_msd_l2r(out: Path, n_cases: int = 20, *, msd_url: str = MSD_SPLEEN.url,
                    l2r_url: str = ABDOMENCTCT.url, msd_md5: str | None = MSD_SPLEEN.md5,
                    l2r_sha256: str | None = None, retries: int = 5, backoff: float = 1.0,
                    timeout=(10, 60), progress: bool = True, log: Log = _print) -> list[Case]:
    """Download, verify, extract and select ceil(n/2) MSD Spleen + floor(n/2) AbdomenCTCT cases.

    AbdomenCTCT has no published checksum: unless ``l2r_sha256`` is given, the sha256 of the
    first download is recorded in ``out/AbdomenCTCT.zip.sha256`` and later runs verify against it.
    """
    out = Path(out)
    downloads = out / "downloads"
    kw = dict(retries=retries, backoff=backoff, timeout=timeout, progress=progress)

    log(f"MSD Task09_Spleen <- {msd_url}")
    msd_archive = download(msd_url, downloads / MSD_SPLEEN.archive, md5=msd_md5, **kw)
    msd_fp = msd_md5 or file_hash(msd_archive)
    msd_dir = _ensure_extracted(msd_archive, out / MSD_SPLEEN.key, msd_fp, progress, log)

    log(f"Learn2Reg AbdomenCTCT <- {l2r_url}")
    record = out / (ABDOMENCTCT.archive + ".sha256")
    recorded = record.read_text().split()[0] if record.is_file() and record.read_text().strip() else None
    want = l2r_sha256 or recorded
    try:
        l2r_archive = download(l2r_url, downloads / ABDOMENCTCT.archive, sha256=want, **kw)
    except DownloadError as e:
        if want and want == recorded and not l2r_sha256 and "checksum mismatch" in str(e):
            raise DownloadError(f"{e} (expected value recorded in {record}; delete it to accept a new file)") from e
        raise
    l2r_fp = want or file_hash(l2r_archive)
    if not recorded:
        record.write_text(f"{l2r_fp}  {ABDOMENCTCT.archive}\n")
        log(f"  no published checksum: recorded sha256 {l2r_fp} in {record}")
    l2r_dir = _ensure_extracted(l2r_archive, out / ABDOMENCTCT.key, l2r_fp, progress, log)

    n_msd, n_l2r = math.ceil(n_cases / 2), n_cases // 2
    cases = []
    for ds, root, n in ((MSD_SPLEEN, msd_dir, n_msd), (ABDOMENCTCT, l2r_dir, n_l2r)):
        pairs = labelled_pairs(root)
        if not pairs:
            raise DataError(f"no labelled cases (imagesTr/ + labelsTr/) found in {root}")
        chosen = select_evenly(pairs, n)
        if len(pairs) < n:
            log(f"  {ds.key}: only {len(pairs)} labelled cases available (asked for {n}); taking all")
        label_map = ds.label_map
        if ds is ABDOMENCTCT:
            label_map = _abdomenctct_label_map(root, log)
        for image, label in chosen:
            cases.append(make_case(_case_id(ds, image), image, label, label_map, ds.key))
    return cases


def _case_id(ds: Dataset, image: Path) -> str:
    """spleen_10 -> msd_spleen_10; AbdomenCTCT_0001_0000 -> abdomenctct_0001."""
    stem = re.sub(r"_0000$", "", _stem(image)).lower()
    prefix = "msd_" if ds is MSD_SPLEEN else ""
    return prefix + stem if stem.startswith(ds.key.removeprefix("msd_")) else f"{ds.key}_{stem}"


def _abdomenctct_label_map(root: Path, log: Log) -> dict[int, int]:
    for js in sorted(Path(root).rglob("*.json")):
        found = label_map_from_json(js)
        if found:
            if found != ABDOMENCTCT.label_map:
                log(f"  note: {js.name} gives label order {found}, which differs from the BTCV default; using it")
            return found
    log("  note: no label table found in the AbdomenCTCT json files; assuming BTCV order (docs/DATA.md)")
    return ABDOMENCTCT.label_map


# --------------------------------------------------------------------------- offline phantoms

def _phantom_job(spec: phantoms.PhantomSpec, image: Path, label: Path) -> tuple[list[int], str]:
    ids = phantoms.write_phantom(spec, image, label)
    return ids, file_hash(image)


def prepare_offline(out: Path, n_cases: int | None = None, seed: int = 0, workers: int | None = None,
                    log: Log = _print) -> list[Case]:
    """Write the synthetic phantom set to ``out/phantoms`` (labels in ``out/phantoms/labels``).

    A phantom whose files and recorded parameters match is kept, not regenerated.
    """
    folder = Path(out) / "phantoms"
    specs = phantoms.default_specs(n_cases, seed)
    todo, results = [], {}
    for spec in specs:
        image, label = folder / f"{spec.case_id}.nii.gz", folder / "labels" / f"{spec.case_id}.nii.gz"
        meta_path = folder / f"{spec.case_id}.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {}
        if (meta.get("spec") == json.loads(phantoms.spec_json(spec)) and image.is_file() and label.is_file()
                and meta.get("sha256") == file_hash(image) and meta.get("label_sha256") == file_hash(label)):
            results[spec.case_id] = (meta["ids"], meta["sha256"])
        else:
            todo.append((spec, image, label))
    if todo:
        workers = workers or min(2, len(todo), len(os.sched_getaffinity(0)))
        log(f"generating {len(todo)} synthetic phantom(s) in {folder} ({workers} worker(s))")
        if workers > 1:
            pool = ProcessPoolExecutor(workers)
            futures = {pool.submit(_phantom_job, *t): t for t in todo}
            done = ((futures[f], f.result()) for f in as_completed(futures))
        else:
            pool, done = None, ((t, _phantom_job(*t)) for t in todo)
        for (spec, image, label), (ids, sha) in done:
            results[spec.case_id] = (ids, sha)
            meta = {"spec": json.loads(phantoms.spec_json(spec)), "ids": ids, "sha256": sha,
                    "label_sha256": file_hash(label)}
            (folder / f"{spec.case_id}.json").write_text(json.dumps(meta, indent=1) + "\n")
            log(f"  {spec.case_id}: {'x'.join(map(str, spec.shape))} at "
                f"{'x'.join(f'{s:g}' for s in spec.spacing)} mm, {spec.orientation}")
        if pool:
            pool.shutdown()
    else:
        log(f"phantoms in {folder} are up to date")
    cases = []
    for spec in specs:
        ids, sha = results[spec.case_id]
        cases.append(make_case(spec.case_id, folder / f"{spec.case_id}.nii.gz",
                               folder / "labels" / f"{spec.case_id}.nii.gz",
                               {i: i for i in ids}, "offline_phantom", sha))
    return cases


# --------------------------------------------------------------------------- a folder of CTs

def scan_dir(folder: Path, exclude: tuple[str, ...] = DEFAULT_EXCLUDE, log: Log = _print) -> list[Case]:
    """Every ``*.nii``/``*.nii.gz`` in ``folder`` (not recursive) whose name matches none of the
    ``exclude`` patterns (case-insensitive; the default drops segmentations) becomes a case.
    Ground truth is ``folder/labels/<same name>`` where present, its values taken as
    TotalSegmentator ids."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--from-dir {folder}: not a folder")
    cases = []
    for image in sorted(folder.iterdir()):
        if not image.name.endswith(NIFTI_SUFFIXES) or not image.is_file():
            continue
        if any(fnmatch.fnmatch(image.name.lower(), p.lower()) for p in exclude):
            continue
        try:
            img = nib.load(str(image))
            if len(img.shape) != 3:
                log(f"  skipping {image.name}: not a 3D image (shape {img.shape})")
                continue
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, with the reason
            log(f"  skipping {image.name}: cannot read it as NIfTI ({type(e).__name__})")
            continue
        label = folder / "labels" / image.name
        label_map = {}
        if label.is_file():
            values = np.unique(np.asanyarray(nib.load(str(label)).dataobj))
            label_map = {int(v): int(v) for v in values if v > 0}
        cases.append(make_case(_stem(image), image, label if label.is_file() else None, label_map, "from_dir"))
    if not cases:
        raise DataError(f"--from-dir {folder}: no CT images (*.nii, *.nii.gz not matching {', '.join(exclude)})")
    return cases
