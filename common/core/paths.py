"""Where the project keeps generated files; every default is relative to the repository root."""
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# TSBENCH_MODELS_DIR moves every generated model file (ONNX exports, TotalSegmentator's home, caches) elsewhere,
# e.g. a test's own folder beside the project's models/; the committed proxy stays at PROXY_DIR.
MODELS_DIR = Path(os.environ.get("TSBENCH_MODELS_DIR") or REPO_ROOT / "models")
PROXY_DIR = REPO_ROOT / "models" / "proxy"  # committed (tools/train_proxy.py), never generated
CT_DATA_DIR = REPO_ROOT / "ct_data"
BENCHMARKS_DIR = REPO_ROOT / "benchmarks"
DEFAULT_MANIFEST = CT_DATA_DIR / "manifest.csv"
ONNX_MODEL = MODELS_DIR / "totalseg_fast.onnx"
MODEL_INFO = MODELS_DIR / "model_info.json"


def shared_data_dir() -> Path:
    """The read-only real CTs (``../shared/data``), overridable with ``TSBENCH_SHARED_DATA``."""
    return Path(os.environ.get("TSBENCH_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def totalseg_home() -> Path:
    """Project-local TotalSegmentator home (weights + config), overridable with ``TOTALSEG_HOME_DIR``."""
    return Path(os.environ.get("TOTALSEG_HOME_DIR", MODELS_DIR / "totalseg_home"))

NIFTI_SUFFIXES = (".nii.gz", ".nii")  # what the suite reads as a CT volume
