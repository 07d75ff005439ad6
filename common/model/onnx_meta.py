"""What an ONNX file says about itself: its checkpoint, its shape, and whether it is the current model.

One shape rule: 02 exports the network for the tile every sliding-window run feeds, a static
(1, 1, *PATCH_SIZE) input and (1, NUM_CLASSES, *PATCH_SIZE) output. Every consumer of that file
(ONNX Runtime's bound output, OpenVINO's tile model, the INT8 copy, the precise-norm rewrite) checks
it with `require_patch_model` and refuses anything else with one line: rerun 02. Whole-volume models
are made from it by the runtime (OpenVINO reshape), never exported separately.

One stale-model rule: the model the backends and the Rust runner load (paths.ONNX_MODEL, and the INT8 /
precise-norm copies made from it) must come from the checkpoint models/model_info.json names, and be the
static patch model (`check_current_model`).
"""
from __future__ import annotations

from pathlib import Path

from common.core import paths
from common.model.weights import NUM_CLASSES, PATCH_SIZE, WeightsError

PATCH_INPUT = [1, 1, *PATCH_SIZE]
PATCH_OUTPUT = [1, NUM_CLASSES, *PATCH_SIZE]


def _load(model_path: Path):
    import onnx

    return onnx.load(str(model_path), load_external_data=False)


FACTS_CACHE = ".onnx_facts.json"  # beside the models: what each file says about itself, keyed by its stat


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def model_facts(model_path: Path) -> dict:
    """{"metadata": {key: value}, "inputs": dims, "outputs": dims} of an ONNX file, parsed once per file version:
    the answer is kept in FACTS_CACHE beside it under the file's size, mtime (ns), inode and device, so a cold
    start neither imports onnx (1-2 s) nor parses the 66 MB protobuf again. Any rewrite (os.replace: a new
    inode) misses the cache and is parsed."""
    import json
    import os
    import tempfile

    model_path = Path(model_path)
    cache = model_path.parent / FACTS_CACHE
    key = _stat_key(model_path)
    try:
        entry = json.loads(cache.read_text()).get(model_path.name)
        if entry and entry.get("stat") == key:
            return entry["facts"]
    except (OSError, ValueError, AttributeError):
        pass
    model = _load(model_path)
    inputs, outputs = io_dims(model)
    facts = {"metadata": {p.key: p.value for p in model.metadata_props}, "inputs": inputs, "outputs": outputs}
    try:  # best effort: a read-only models/ folder still works, only slower
        try:
            table = json.loads(cache.read_text())
        except (OSError, ValueError):
            table = {}
        table = table if isinstance(table, dict) else {}
        table[model_path.name] = {"stat": key, "facts": facts}
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=cache.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(table, f)
        os.replace(tmp, cache)
    except OSError:
        pass
    return facts


def onnx_checkpoint_sha(model_path: Path) -> str:
    return model_facts(model_path)["metadata"].get("checkpoint_sha256", "")


def io_dims(model) -> tuple[list, list]:
    """(input dims, output dims) of an onnx ModelProto: ints, or the axis name where an axis is open."""
    def dims(value):
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]

    return dims(model.graph.input[0]), dims(model.graph.output[0])


def require_patch_model(model, where: str = "", static_only: bool = False) -> None:
    """WeightsError unless `model` (a path or an onnx ModelProto) is the static patch model.

    `static_only`: any static shape passes (the precise-norm rewrite, also tested on small graphs)."""
    if isinstance(model, (str, Path)):
        where = where or str(model)
        facts = model_facts(Path(model))
        inputs, outputs = facts["inputs"], facts["outputs"]
    else:
        inputs, outputs = io_dims(model)
    if static_only and all(isinstance(d, int) and d > 0 for d in (*inputs, *outputs)):
        return
    if inputs != PATCH_INPUT or outputs != PATCH_OUTPUT:
        raise WeightsError(f"{where or 'the model'} has input {inputs} and output {outputs}, not the static patch "
                           f"model {PATCH_INPUT} -> {PATCH_OUTPUT}: rerun `python 02_export_model.py`")


def check_onnx_matches(model_path: Path, checkpoint_sha256: str | None, model=None) -> None:
    """An ONNX file exported from another checkpoint is refused (stale models/ after new weights).
    `model`: the file already loaded (one parse, not two)."""
    if not Path(model_path).is_file():
        raise WeightsError(f"{model_path} is missing: run `python 02_export_model.py` first")
    if checkpoint_sha256:
        found = ({p.key: p.value for p in model.metadata_props} if model is not None
                 else model_facts(Path(model_path))["metadata"]).get("checkpoint_sha256", "")
        if found != checkpoint_sha256:
            raise WeightsError(f"{model_path} was exported from checkpoint {found[:16] or '?'}, "
                               f"not the current one {checkpoint_sha256[:16]}: rerun 02_export_model.py")


def check_current_model(model_path: Path = paths.ONNX_MODEL) -> Path:
    """The stale-model check every script and backend uses (Rust's row through 04 too): `model_path`
    (default: the model the backends load) exists, comes from the checkpoint model_info.json names, and is
    the static patch model."""
    from common.model.weights import read_model_info

    if not Path(model_path).is_file():
        raise WeightsError(f"{model_path} is missing: run `python 02_export_model.py` first")
    check_onnx_matches(model_path, read_model_info().get("checkpoint_sha256"))
    require_patch_model(Path(model_path), str(model_path))
    return Path(model_path)
