"""Issue 23: `approx_ov_f32_air_tiles` skips the tiles of vanilla's grid whose whole input is air; their blend share
goes to background, the grid does not move, so only voxels inside skipped tiles can change."""
from __future__ import annotations

import numpy as np
import pytest

from common.pipeline import sliding_window
from common.pipeline.air_tiles import AIR_BACKGROUND_LOGIT, air_threshold, count_air_tiles, skip_air

PATCH = (16, 16, 16)
CLASSES = 5
# Approximate-tier floor (tests/parity_bounds.APPROXIMATE_MIN lives with another owner: this one is here).
# Measured on the half-air volume below vs exact_ov_f32_split_concat with stand-in weights (2026-12-06): 0.61878.
# The random stand-in labels air as foreground, the skipped tile gives background: 60 % of the volume is air, so
# the floor only says the body half is kept; the proxy's figure is in benchmarks/optimized_report.md.
AIR_TILES_MIN = 0.59


def _fake_predict(calls):
    rng = np.random.default_rng(3)
    w = rng.standard_normal(CLASSES).astype(np.float32) * 3
    b = rng.standard_normal(CLASSES).astype(np.float32)

    def predict(tile):
        calls.append(1)
        t = tile.reshape(PATCH)
        return (w[:, None, None, None] * t[None] + b[:, None, None, None])[None].astype(np.float32)
    return predict


def _half_air_image():
    """Depth 40 (3 tiles at step 0.8 of 16): the first 12 slices body-like values, the rest air."""
    rng = np.random.default_rng(0)
    image = np.full((40, 20, 20), air_threshold() - 1.0, dtype=np.float32)
    image[:12] = rng.normal(0.5, 0.5, size=(12, 20, 20)).astype(np.float32)
    return image


def test_air_threshold_is_minus_500_hu_in_network_units():
    from common.model.weights import CT_MEAN, CT_STD

    assert air_threshold() == pytest.approx((-500.0 - CT_MEAN) / CT_STD)
    assert skip_air(np.full((2, 2), air_threshold() - 0.01, np.float32)) == AIR_BACKGROUND_LOGIT
    assert skip_air(np.zeros((2, 2), np.float32)) is None, "zero padding (about -50 HU) is not air"


def test_skipped_tiles_change_only_their_own_voxels():
    image = _half_air_image()
    air, total = count_air_tiles(image, PATCH, 0.8)
    starts = sliding_window.tile_steps(image.shape, PATCH, 0.8)
    assert total == np.prod([len(s) for s in starts]) and air > 0, (air, total)
    full_calls, skip_calls = [], []
    full = sliding_window.sliding_window_labels(image, _fake_predict(full_calls), PATCH, 0.8, CLASSES)
    fast = sliding_window.sliding_window_labels(image, _fake_predict(skip_calls), PATCH, 0.8, CLASSES,
                                                skip_tile=skip_air)
    assert len(skip_calls) == total - air and len(full_calls) == total
    inside = np.zeros(image.shape, bool)
    for sl in sliding_window.tile_slices(image.shape, PATCH, 0.8):
        if skip_air(image[sl]) is not None:
            inside[sl] = True
    assert np.array_equal(full[~inside], fast[~inside]), "a voxel outside every skipped tile changed"
    only_skipped = inside.copy()
    for sl in sliding_window.tile_slices(image.shape, PATCH, 0.8):
        if skip_air(image[sl]) is None:
            only_skipped[sl] = False
    assert only_skipped.any() and (fast[only_skipped] == 0).all(), "voxels only skipped tiles reach: background"


def test_air_tiles_needs_the_streaming_loop():
    from common.pipeline.run import PipelineConfig

    assert not PipelineConfig(air_tiles=True).exact


@pytest.fixture(scope="module")
def half_air_ct(generated_volumes, tmp_path_factory):
    """A phantom already on the 3 mm grid, 112 x 112 voxels in y and z (one tile each: no zero padding, which is
    not air), with 180 slices of air beside it along x: tiles start at x = 0, 85, 170; the last is all air."""
    import nibabel as nib

    from common.data.phantoms import make_phantom

    hu, _, affine = make_phantom((118, 112, 112), (3.0, 3.0, 3.0), "RAS", seed=7)
    hu = np.asarray(hu)
    air = np.full((180, *hu.shape[1:]), -1024, dtype=hu.dtype)
    path = tmp_path_factory.mktemp("air") / "half_air.nii.gz"
    nib.save(nib.Nifti1Image(np.concatenate([hu, air], axis=0), affine), path)
    return path


def test_air_tiles_variant_grid_affine_dtype_and_floor(half_air_ct, onnx_model, threads, tmp_path):
    import nibabel as nib

    from common.core.metrics import voxel_agreement
    from common.pipeline.run import StageTimer, segment_file
    from common.runtime.backends import BackendUnavailable, make_backend
    from common.variants.table import VARIANTS

    air, exact = VARIANTS["approx_ov_f32_air_tiles"], VARIANTS["exact_ov_f32_split_concat"]
    assert air.backend_options == exact.backend_options and air.config.air_tiles and not exact.config.air_tiles
    try:
        backend = make_backend(air.backend, threads, **air.backend_options)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    fast = segment_file(half_air_ct, tmp_path / "air.nii.gz", backend, air.config_for(threads), timer=StageTimer())
    ref = segment_file(half_air_ct, tmp_path / "ref.nii.gz", backend, exact.config_for(threads), timer=StageTimer())
    assert (fast.n_tiles, ref.n_tiles) == (2, 3)
    written, source = nib.load(tmp_path / "air.nii.gz"), nib.load(half_air_ct)
    assert written.shape == source.shape[:3] and written.header.get_zooms() == source.header.get_zooms()
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    assert written.get_data_dtype() == np.uint8 and fast.labels.dtype == np.uint8
    assert np.array_equal(fast.labels[:170], ref.labels[:170]), "a voxel outside the skipped tile changed"
    assert (fast.labels[213:] == 0).all(), "voxels only the skipped tile reaches are background"
    assert voxel_agreement(fast.labels, ref.labels) >= AIR_TILES_MIN
