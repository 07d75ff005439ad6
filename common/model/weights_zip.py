"""Air-gapped real weights: import the official Dataset297 zip a user copied by hand.

What `totalseg_import_weights` does (extract into the weights folder), with the checks a hospital server
needs before it trusts the file: a readable zip whose CRCs hold, no path that leaves the folder, the right
dataset and trainer, the three files nnU-Net needs, and a checkpoint that loads into the Dataset297 network.
The folder is replaced only when every check passed.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from common.model import weights
from common.model.weights import CHECKPOINT, DATASET_FOLDER, MODEL_FOLDER, NUM_CLASSES, Weights, WeightsError

REQUIRED = tuple(f"{DATASET_FOLDER}/{MODEL_FOLDER}/{name}" for name in ("plans.json", "dataset.json", CHECKPOINT))


def _check_members(names: list[str], zip_path: Path) -> None:
    for name in names:
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise WeightsError(f"{zip_path}: unsafe path {name!r} in the zip (absolute or '..'); refusing to extract")
    tops = {PurePosixPath(n).parts[0] for n in names if PurePosixPath(n).parts}
    if DATASET_FOLDER not in tops:
        found = ", ".join(sorted(tops)[:3]) or "nothing"
        raise WeightsError(f"{zip_path}: holds {found}, not {DATASET_FOLDER} (the --fast model's weights)")
    missing = [r for r in REQUIRED if r not in names]
    if missing:
        raise WeightsError(f"{zip_path}: incomplete Dataset297 zip, missing {', '.join(missing)}")


def import_weights_zip(zip_path: Path, home: Path | None = None) -> Weights:
    """Check `zip_path` and install it as the real weights under the TotalSegmentator home."""
    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise WeightsError(f"{zip_path}: no such file")
    weights.configure_totalseg_home(home)
    root = weights.weights_dir(home)
    root.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            names = archive.namelist()
            _check_members(names, zip_path)
            bad = archive.testzip()
            if bad is not None:
                raise WeightsError(f"{zip_path}: {bad} fails its CRC check (a damaged copy); copy the zip again")
            staging = Path(tempfile.mkdtemp(dir=root, prefix=".import-"))
            try:
                for name in names:
                    if PurePosixPath(name).parts[0] == DATASET_FOLDER:
                        archive.extract(name, staging)
                _verify_folder(staging / DATASET_FOLDER / MODEL_FOLDER, zip_path)
                target = root / DATASET_FOLDER
                old = root / f".old-{DATASET_FOLDER}"
                shutil.rmtree(old, ignore_errors=True)
                if target.exists():
                    os.replace(target, old)
                os.replace(staging / DATASET_FOLDER, target)
                shutil.rmtree(old, ignore_errors=True)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise WeightsError(f"{zip_path}: not a readable zip (truncated or corrupt): "
                           f"{type(exc).__name__}: {str(exc)[:120]}") from exc
    found = weights.existing_weights(home)
    if found is None or found.kind != "real":
        raise WeightsError(f"{zip_path}: imported, but {weights.model_dir(home)} is not a complete real-weights folder")
    return found


def _verify_folder(folder: Path, zip_path: Path) -> None:
    for marker in (weights.STAND_IN_MARKER, weights.PROXY_MARKER):
        if (folder / marker).exists():
            raise WeightsError(f"{zip_path}: holds {marker}: a stand-in or proxy folder, not the real weights")
    try:
        labels = json.loads((folder / "dataset.json").read_text())["labels"]
    except (OSError, ValueError, KeyError) as exc:
        raise WeightsError(f"{zip_path}: dataset.json unreadable ({type(exc).__name__})") from exc
    if len(labels) != NUM_CLASSES:
        raise WeightsError(f"{zip_path}: dataset.json has {len(labels)} labels, Dataset297 has {NUM_CLASSES}")
    checkpoint = folder / CHECKPOINT
    weights.load_network(Weights("real", folder, checkpoint, weights.sha256_file(checkpoint)))
