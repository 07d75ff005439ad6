"""Shared fixtures: the real CTs in ../shared/data, stand-in weights, the exported ONNX model, and
vanilla TotalSegmentator outputs (computed once per session, cached per input).

Real CTs only where a real CT is the point: a test that needs "some good CT" takes a generated phantom
(`generated_volumes`); a case parametrized over real and generated inputs asks for `shared_data` only for its
real inputs (`ct_input`), so a fresh clone without ../shared/data runs every phantom case and skips only the
real-CT ones, each skip saying so. The session ends with a count of skips by reason (`pytest_terminal_summary`).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from common.core import paths


@pytest.fixture(scope="session")
def shared_data() -> Path:
    folder = paths.shared_data_dir()
    if not (folder / "example_ct.nii.gz").is_file():
        pytest.skip(f"real CT case: real CTs not found in {folder} (set TSBENCH_SHARED_DATA to the shared/data folder)")
    return folder


@pytest.fixture
def ct_input(request, generated_volumes):
    """`ct_input(name)`: a real CT for a name ending in .nii.gz (asks for `shared_data` then, so only real-CT cases
    skip without it), else the generated volume of that name."""
    def resolve(name: str) -> Path:
        if name.endswith(".nii.gz"):
            return request.getfixturevalue("shared_data") / name
        return generated_volumes[name]
    return resolve


@pytest.fixture(scope="session")
def threads() -> int:
    from common.core.env import apply_threads, default_threads

    n = default_threads()
    apply_threads(n)
    return n


@pytest.fixture(scope="session")
def stand_in():
    """Stand-in weights in the project's models/ (reused between runs; written when absent)."""
    from common.model.weights import ensure_weights

    return ensure_weights("stand-in")


@pytest.fixture(scope="session")
def onnx_model(stand_in, threads) -> Path:
    """models/totalseg_fast.onnx exported from the stand-in (reused when its checkpoint hash matches)."""
    from common.model.onnx_meta import onnx_checkpoint_sha
    from common.model.export import export_onnx

    from common.model.export import save_model_info
    from common.model.weights import count_parameters, load_network, read_model_info

    path = paths.ONNX_MODEL
    if not path.is_file() or onnx_checkpoint_sha(path) != stand_in.sha256:
        export_onnx(stand_in, path)
    if read_model_info().get("checkpoint_sha256") != stand_in.sha256:
        save_model_info(stand_in, path, count_parameters(load_network(stand_in)), threads)
    return path


class VanillaCache:
    """Runs TotalSegmentator once per input file and keeps the output for every test that needs it."""

    def __init__(self, folder: Path, threads: int):
        self.folder, self.threads, self.done = folder, threads, {}

    def __call__(self, image: Path) -> Path:
        from common.harness.vanilla import run_vanilla

        key = str(image)
        if key not in self.done:
            out = self.folder / f"vanilla_{len(self.done)}_{image.name}"
            run_vanilla(image, out, self.threads)
            self.done[key] = out
        return self.done[key]


@pytest.fixture(scope="session")
def vanilla(tmp_path_factory, stand_in, threads) -> VanillaCache:
    return VanillaCache(tmp_path_factory.mktemp("vanilla"), threads)


@pytest.fixture(scope="session")
def generated_volumes(tmp_path_factory) -> dict[str, Path]:
    """Phantom CTs on grids the shared data lacks: non-RAS + anisotropic, already 3 mm, and an 8-tile one; `small`
    (100 x 100 x 32 at 3 mm RAS, one tile) is "some good CT" for tests of plumbing."""
    import nibabel as nib

    from common.data.phantoms import make_phantom

    folder = tmp_path_factory.mktemp("generated")
    specs = {
        # LPS storage, 0.7 x 0.7 x 5 mm: a thick-slice abdominal CT, 93 x 93 x 100 at 3 mm = one tile that
        # the anatomy mostly fills (a padding-dominated tile makes the stand-in's ties ORT-vs-torch noise)
        "lps_anisotropic": ((400, 400, 60), (0.7, 0.7, 5.0), "LPS"),
        # already on the 3 mm grid: change_spacing is skipped on the way in and out; fills one tile
        "ras_3mm": ((118, 108, 108), (3.0, 3.0, 3.0), "RAS"),
        # 137 x 137 x 150 at 3 mm after resampling: 2 x 2 x 2 = 8 tiles at step 0.8
        "eight_tiles": ((514, 514, 300), (0.8, 0.8, 1.5), "LPS"),
        "small": ((100, 100, 32), (3.0, 3.0, 3.0), "RAS"),
    }
    out = {}
    for name, (shape, spacing, orientation) in specs.items():
        hu, _, affine = make_phantom(shape, spacing, orientation, seed=7)
        path = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(hu, affine), path)
        out[name] = path
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Counts the skips by reason; `pytest_unconfigure` prints them as the session's very last line (after -ra's list
    of each skip and pytest's own pass/fail line)."""
    from collections import Counter

    reasons = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ").split(" (")[0][:90]] += 1
    total = sum(reasons.values())
    detail = "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common())
    config._skip_line = f"skipped: {total}" + (f" ({detail})" if total else "")


def pytest_unconfigure(config):
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    line = getattr(config, "_skip_line", None)
    if reporter is not None and line:
        reporter.write_line(line)
