"""The model weights, three kinds: real, proxy, stand-in.

- real: Dataset297 through TotalSegmentator's downloader, or imported from the official zip (`weights_zip`).
- proxy: the same architecture trained here on labelled CTs (`tools/train_proxy.py`, committed under
  models/proxy/): trained-like logit margins, so offline accuracy verdicts mean something.
- stand-in: nnU-Net's He init from a fixed seed: plumbing and speed only, every voxel near a tie.

Proxy and stand-in folders have exactly the layout, plans and architecture of the real `--fast` model
(nnU-Net Dataset297, 3d_fullres, fold 0), so TotalSegmentator itself runs on them unchanged.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from common.core import paths
from common.model import proxy

TASK_ID = 297
DATASET_FOLDER = "Dataset297_TotalSegmentator_total_3mm_1559subj"
TRAINER = "nnUNetTrainer_4000epochs_NoMirroring"
MODEL_FOLDER = f"{TRAINER}__nnUNetPlans__3d_fullres"
CHECKPOINT = "fold_0/checkpoint_final.pth"
STAND_IN_MARKER = "TSBENCH_STAND_IN.json"
PROXY_MARKER = "TSBENCH_PROXY.json"
KINDS = ("real", "proxy", "stand-in")
STAND_IN_SEED = 297
# Where TotalSegmentator downloads Dataset297 from; the override only changes the reachability probe (tests).
WEIGHTS_URL = os.environ.get(
    "TSBENCH_WEIGHTS_URL",
    f"https://github.com/wasserth/TotalSegmentator/releases/download/v2.0.0-weights/{DATASET_FOLDER}.zip")

PATCH_SIZE = (112, 112, 128)  # (z, y, x) of the canonical image, as nnU-Net sees it
SPACING_MM = 3.0
NUM_CLASSES = 118  # 117 organs + background
CT_CLIP = (-1004.0, 1588.0)
CT_MEAN = -50.38697721419439
CT_STD = 503.39235619144
FEATURES = [32, 64, 128, 256, 320]
STRIDES = [1, 2, 2, 2, 2]

STAND_IN_WARNING = ("STAND-IN WEIGHTS: seeded random weights with the real architecture. "
                    "Speed and implementation parity only; labels are NOT clinically meaningful.")
PROXY_WARNING = ("PROXY WEIGHTS: the real architecture trained offline on this project's labelled CTs, not "
                 "TotalSegmentator's release. Speed, parity and drift are meaningful; accuracy is the proxy's own.")


class WeightsError(RuntimeError):
    """A one-line, user-facing problem with the model weights or the exported model."""


@dataclass
class Weights:
    kind: str  # "real", "proxy" or "stand-in"
    model_dir: Path  # the nnU-Net training output folder (plans.json, dataset.json, fold_0/)
    checkpoint: Path
    sha256: str

    @property
    def is_stand_in(self) -> bool:
        return self.kind == "stand-in"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_dir(home: Path | None = None) -> Path:
    return Path(home or paths.totalseg_home()) / "nnunet" / "results"


def model_dir(home: Path | None = None) -> Path:
    return weights_dir(home) / DATASET_FOLDER / MODEL_FOLDER


def configure_totalseg_home(home: Path | None = None) -> Path:
    """Point TotalSegmentator at the project-local home and switch its usage statistics off."""
    home = Path(home or paths.totalseg_home()).resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["TOTALSEG_HOME_DIR"] = str(home)
    config_file = home / "config.json"
    config = {}
    if config_file.exists():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError:
            config = {}
    config.setdefault("totalseg_id", "totalseg_tsbench")
    config.setdefault("prediction_counter", 0)
    config.update(send_usage_stats=False, statistics_disclaimer_shown=True)
    _atomic_write_text(config_file, json.dumps(config, indent=4))
    return home


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plans_json() -> dict:
    """nnU-Net v2 plans for Dataset297 `3d_fullres` (architecture and CT normalization of DESIGN.md s3)."""
    n = len(FEATURES)
    return {
        "dataset_name": DATASET_FOLDER.replace("_1559subj", ""),
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [SPACING_MM] * 3,
        "original_median_shape_after_transp": [150, 137, 137],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(PATCH_SIZE),
                "median_image_size_in_voxels": [150, 137, 137],
                "spacing": [SPACING_MM] * 3,
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                       "force_separate_z": None},
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": {
                        "n_stages": n,
                        "features_per_stage": FEATURES,
                        "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": [[3, 3, 3]] * n,
                        "strides": [[s] * 3 for s in STRIDES],
                        "n_conv_per_stage": [2] * n,
                        "n_conv_per_stage_decoder": [2] * (n - 1),
                        "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                        "dropout_op": None,
                        "dropout_op_kwargs": None,
                        "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True},
                    },
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 3071.0, "mean": CT_MEAN, "median": 31.0, "min": -1024.0,
                  "percentile_00_5": CT_CLIP[0], "percentile_99_5": CT_CLIP[1], "std": CT_STD}
        },
    }


def dataset_json() -> dict:
    from totalsegmentator.map_to_binary import class_map

    labels = {"background": 0}
    labels.update({name: idx for idx, name in sorted(class_map["total"].items())})
    if len(labels) != NUM_CLASSES:
        raise WeightsError(f"TotalSegmentator's class map has {len(labels)} labels, expected {NUM_CLASSES}")
    return {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1559, "file_ending": ".nii.gz"}


def build_network(plans: dict | None = None, dataset: dict | None = None):
    """The Dataset297 network exactly as nnU-Net builds it for inference (deep supervision off)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.inference.predict_from_raw_data import recursive_find_trainer_class_by_name

    plans_manager = PlansManager(plans or plans_json())
    configuration = plans_manager.get_configuration("3d_fullres")
    trainer_class = recursive_find_trainer_class_by_name(TRAINER)
    n_out = plans_manager.get_label_manager(dataset or dataset_json()).num_segmentation_heads
    return trainer_class.build_network_architecture(plans_manager, configuration, 1, n_out,
                                                    enable_deep_supervision=False)


def _write_model_folder(home: Path | None, kind: str, state_dict: dict, marker: str, note: dict) -> Weights:
    """The complete Dataset297 folder around `state_dict` (atomic: all or nothing)."""
    import torch

    target = model_dir(home)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{kind}-"))
    try:
        plans, dataset = plans_json(), dataset_json()
        (staging / "fold_0").mkdir()
        (staging / "plans.json").write_text(json.dumps(plans, indent=2))
        (staging / "dataset.json").write_text(json.dumps(dataset, indent=2))
        checkpoint = {
            "network_weights": state_dict,
            "optimizer_state": None,
            "grad_scaler_state": None,
            "current_epoch": 0,
            "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset},
            "trainer_name": TRAINER,
            "inference_allowed_mirroring_axes": None,
            f"tsbench_{kind.replace('-', '_')}": note,
        }
        torch.save(checkpoint, staging / CHECKPOINT)
        (staging / marker).write_text(json.dumps(note, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Weights(kind, target, target / CHECKPOINT, sha256_file(target / CHECKPOINT))


def write_stand_in(home: Path | None = None, seed: int = STAND_IN_SEED) -> Weights:
    """Seeded He-initialised weights with the real architecture."""
    import torch

    torch.manual_seed(seed)
    network = build_network()
    return _write_model_folder(home, "stand-in", network.state_dict(), STAND_IN_MARKER,
                               {"seed": seed, "warning": STAND_IN_WARNING})


def write_proxy(home: Path | None = None, folder: Path | None = None) -> Weights:
    """The committed proxy (float16 on disk, float32 here) as a Dataset297 folder; sha256 checked first."""
    try:
        state, meta = proxy.load_state_dict(folder)
    except proxy.ProxyError as exc:
        raise WeightsError(str(exc)) from exc
    return _write_model_folder(home, "proxy", state, PROXY_MARKER,
                               {"sha256": meta["sha256"], "recipe_version": meta.get("recipe_version"),
                                "trained_on": proxy.describe(meta), "warning": PROXY_WARNING})


def _is_current_proxy(found: Weights | None, folder: Path | None = None) -> bool:
    """The home's proxy folder was written from the proxy committed now (a retrained proxy replaces it)."""
    if found is None or found.kind != "proxy":
        return False
    try:
        note = json.loads((found.model_dir / PROXY_MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    meta = proxy.read_meta(folder)
    return bool(meta) and note.get("sha256") == meta.get("sha256")


def existing_weights(home: Path | None = None) -> Weights | None:
    """The weights already in the home folder, or None where the folder is absent or incomplete."""
    folder = model_dir(home)
    checkpoint = folder / CHECKPOINT
    if not (checkpoint.is_file() and (folder / "plans.json").is_file() and (folder / "dataset.json").is_file()):
        return None
    kind = ("stand-in" if (folder / STAND_IN_MARKER).exists()
            else "proxy" if (folder / PROXY_MARKER).exists() else "real")
    return Weights(kind, folder, checkpoint, sha256_file(checkpoint))


def download_real(home: Path | None = None, timeout: float = 15.0) -> Weights:
    """Fetch Dataset297 through TotalSegmentator's own downloader (with its progress bar)."""
    import requests

    configure_totalseg_home(home)
    folder = weights_dir(home) / DATASET_FOLDER
    try:
        # TotalSegmentator's downloader has no timeout: probe first so a dead network fails fast.
        requests.head(WEIGHTS_URL, timeout=timeout, allow_redirects=True).raise_for_status()
        if _ours(folder):
            shutil.rmtree(folder)  # the downloader only runs where the dataset folder is missing
        from totalsegmentator.libs import download_pretrained_weights
        download_pretrained_weights(TASK_ID)
    except Exception as exc:  # network, HTTP or archive error: one line for the user
        if not _ours(folder):
            shutil.rmtree(folder, ignore_errors=True)  # a partial real download
        raise WeightsError(f"could not download the real weights ({WEIGHTS_URL}): "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    found = existing_weights(home)
    if found is None or found.kind != "real":
        raise WeightsError(f"download finished but {model_dir(home)} is incomplete")
    return found


def _ours(folder: Path) -> bool:
    return any((folder / MODEL_FOLDER / marker).exists() for marker in (STAND_IN_MARKER, PROXY_MARKER))


def _banner(warn, lines: list[str]) -> None:
    warn("=" * 78)
    for line in lines:
        warn(line)
    warn("=" * 78)


def ensure_weights(kind: str = "auto", home: Path | None = None, warn=print) -> Weights:
    """Weights ready for TotalSegmentator and for export.

    kind: real | proxy | stand-in forces one; auto takes real (already here, else downloaded), then the
    committed proxy, then the stand-in, with a loud banner for each fallback.
    """
    if kind not in ("auto", *KINDS):
        raise WeightsError(f"unknown weights kind {kind!r} (choose auto, real, proxy or stand-in)")
    configure_totalseg_home(home)
    found = existing_weights(home)
    if kind == "stand-in":
        return found if found and found.is_stand_in else write_stand_in(home)
    if kind == "proxy":
        return found if _is_current_proxy(found) else write_proxy(home)
    if found and found.kind == "real":
        return found
    try:
        return download_real(home)
    except WeightsError as exc:
        if kind == "real":
            raise
        reason = f"WARNING: {exc}"
    if proxy.available():
        try:
            weights = found if _is_current_proxy(found) else write_proxy(home)
            _banner(warn, [reason, f"WARNING: falling back to {PROXY_WARNING}",
                           f"WARNING: {proxy.describe(proxy.read_meta())}"])
            return weights
        except WeightsError as exc:
            reason += f"\nWARNING: the committed proxy is unusable: {exc}"
    else:
        reason += f"\nWARNING: no proxy weights in {proxy.PROXY_DIR} (tools/train_proxy.py makes them)"
    _banner(warn, [*reason.split("\n"), f"WARNING: falling back to {STAND_IN_WARNING}"])
    found = existing_weights(home)
    return found if found and found.is_stand_in else write_stand_in(home)


def load_network(weights: Weights):
    """The torch network with the checkpoint's weights; a truncated or mismatched file is a WeightsError."""
    import torch

    try:
        checkpoint = torch.load(weights.checkpoint, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise WeightsError(f"checkpoint {weights.checkpoint} is unreadable (truncated or corrupt): "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}") from exc
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise WeightsError(f"checkpoint {weights.checkpoint} has no 'network_weights': not an nnU-Net checkpoint")
    plans = json.loads((weights.model_dir / "plans.json").read_text())
    dataset = json.loads((weights.model_dir / "dataset.json").read_text())
    network = build_network(plans, dataset)
    try:
        network.load_state_dict(checkpoint["network_weights"])
    except RuntimeError as exc:
        first = str(exc).splitlines()
        raise WeightsError(f"checkpoint {weights.checkpoint} does not match the Dataset297 architecture: "
                           f"{' '.join(first[:2])[:200]}") from exc
    return network.eval()


def count_parameters(network) -> int:
    return sum(p.numel() for p in network.parameters())


@dataclass
class ModelInfo:
    weights_kind: str
    checkpoint_sha256: str
    model_dir: str
    onnx_path: str
    onnx_sha256: str
    architecture: dict
    versions: dict
    warning: str

    def save(self, path: Path = paths.MODEL_INFO) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(path, json.dumps(asdict(self), indent=2))


def read_model_info(path: Path = paths.MODEL_INFO) -> dict:
    """models/model_info.json, or a placeholder saying the model was never exported."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {"weights_kind": "unknown (run 02_export_model.py)", "checkpoint_sha256": "", "warning": ""}


def weights_banner(info: dict | None = None) -> str:
    """The first lines of every report: which weights produced these numbers."""
    info = info or read_model_info()
    kind = info.get("weights_kind", "unknown")
    line = f"**Weights: {kind}** (checkpoint sha256 `{info.get('checkpoint_sha256', '')[:16]}`)"
    if kind == "stand-in":
        line += f"\n\n> **{STAND_IN_WARNING}**"
    elif kind == "proxy":
        line += f"\n\n> **{PROXY_WARNING}** {info.get('warning', '')}".rstrip()
    return line


def random_weights(info: dict | None = None) -> bool:
    """Dice vs ground truth means nothing on random weights: reports print n/a (stand-in) instead."""
    return (info or read_model_info()).get("weights_kind") == "stand-in"
