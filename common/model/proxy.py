"""The proxy weights: the Dataset297 network trained here (tools/train_proxy.py), committed under models/proxy/.

One compressed file of float16 tensors (not an int8 grid, which would flatter the INT8 variants), loaded as
float32: those float32 tensors *are* the proxy. Beside it, proxy.json records the file's sha256, the recipe
version, the training data, steps, wall time, CPU and final losses.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from common.core import paths

PROXY_DIR = paths.PROXY_DIR
TENSORS = "proxy_fp16.npz"
META = "proxy.json"
ALIASES = "__aliases__"


class ProxyError(RuntimeError):
    """The committed proxy is missing, truncated or does not match its recorded sha256."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_proxy(state_dict: dict, summary: dict, out: Path | None = None) -> str:
    """Write the tensors as float16 (.npz, compressed) and proxy.json beside them; returns the sha256."""
    out = Path(out or PROXY_DIR)
    out.mkdir(parents=True, exist_ok=True)
    arrays, aliases, seen = {}, {}, {}
    for name, tensor in state_dict.items():
        # nnU-Net's modules reach one tensor under several keys (conv and all_modules.0, decoder.encoder):
        # store it once, record the other keys as aliases
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        array = tensor.detach().cpu().float().numpy() if tensor.is_floating_point() else tensor.cpu().numpy()
        arrays[name] = array.astype(np.float16) if array.dtype == np.float32 else array
    arrays[ALIASES] = np.frombuffer(json.dumps(aliases).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".proxy-", suffix=".npz")
    os.close(fd)
    try:
        np.savez_compressed(tmp, **arrays)
        sha = _sha256(Path(tmp))
        os.replace(tmp, out / TENSORS)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta = {"sha256": sha, "file": TENSORS, "dtype": "float16 (loaded as float32)", **summary}
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return sha


def read_meta(folder: Path | None = None) -> dict | None:
    try:
        return json.loads((Path(folder or PROXY_DIR) / META).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def available(folder: Path | None = None) -> bool:
    folder = Path(folder or PROXY_DIR)
    return (folder / TENSORS).is_file() and read_meta(folder) is not None


def load_state_dict(folder: Path | None = None) -> tuple[dict, dict]:
    """(float32 torch state dict, proxy.json); a file that does not match its sha256 is a ProxyError."""
    import torch

    folder = Path(folder or PROXY_DIR)
    meta = read_meta(folder)
    path = folder / TENSORS
    if meta is None or not path.is_file():
        raise ProxyError(f"no proxy weights in {folder} (expected {TENSORS} and {META})")
    sha = _sha256(path)
    if sha != meta.get("sha256"):
        raise ProxyError(f"{path} has sha256 {sha[:16]}..., {META} records {str(meta.get('sha256'))[:16]}...: "
                         "the file is truncated or was changed (git checkout it again)")
    try:
        with np.load(path) as z:
            state = {k: torch.from_numpy(z[k].astype(np.float32) if z[k].dtype == np.float16 else z[k])
                     for k in z.files if k != ALIASES}
            aliases = json.loads(z[ALIASES].tobytes().decode()) if ALIASES in z.files else {}
        for name, original in aliases.items():
            state[name] = state[original]
    except Exception as exc:
        raise ProxyError(f"{path} is unreadable: {type(exc).__name__}: {str(exc)[:160]}") from exc
    return state, meta


def describe(meta: dict | None) -> str:
    """One line for banners: what the proxy was trained on and how long."""
    if not meta:
        return "proxy weights (no proxy.json)"
    data = meta.get("training_data", [])
    n_phantoms = sum(1 for d in data if d.startswith("phantom"))
    n_real = sum(1 for d in data if d.startswith("real"))
    steps = meta.get("steps_total") or meta.get("steps")
    minutes = float(meta.get("train_wall_s_total") or meta.get("train_wall_s") or 0) / 60
    return (f"proxy recipe v{meta.get('recipe_version')}: the real architecture trained here for {steps} "
            f"steps ({minutes:.0f} min, {meta.get('precision')}, {meta.get('cpu')}) "
            f"on {n_real} real CTs with TotalSegmentator --fast labels and {n_phantoms} generated phantoms")
