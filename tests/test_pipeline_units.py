"""Each pipeline step against the function it re-implements (nnU-Net, TotalSegmentator), on real inputs."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from common.core import io, metrics
from common.model.weights import CT_CLIP, CT_MEAN, CT_STD, PATCH_SIZE
from common.pipeline import preprocess, resample, sliding_window


@pytest.mark.parametrize("size", [(112, 112, 128), (137, 137, 150), (300, 120, 129), (113, 250, 400)])
@pytest.mark.parametrize("step", [0.5, 0.8, 1.0])
def test_tile_steps_match_nnunet(size, step):
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    assert sliding_window.tile_steps(size, PATCH_SIZE, step) == compute_steps_for_sliding_window(size, PATCH_SIZE, step)


def test_eight_tiles_for_the_large_ct_grid():
    assert sliding_window.count_tiles((150, 137, 137), PATCH_SIZE, 0.8) == 8
    assert sliding_window.count_tiles((30, 101, 122), PATCH_SIZE, 0.8) == 1  # padded to one patch


def test_gaussian_matches_nnunet_bit_for_bit():
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    theirs = compute_gaussian(PATCH_SIZE, sigma_scale=1 / 8, value_scaling_factor=10, device=torch.device("cpu"))
    ours = sliding_window.gaussian_importance(PATCH_SIZE)
    assert ours.dtype == np.float16
    assert np.array_equal(ours.view(np.uint16), theirs.numpy().view(np.uint16))
    assert ours.max() == np.float16(10) and ours.min() > 0


def test_float16_accumulation_matches_torch():
    rng = np.random.default_rng(0)
    acc = rng.normal(size=(4, 8, 8, 8)).astype(np.float16)
    pred = rng.normal(size=(4, 8, 8, 8)).astype(np.float32) * 37
    t_acc = torch.from_numpy(acc.copy())
    t_acc += torch.from_numpy(pred)
    np.add(acc, pred, out=acc, casting="unsafe")
    assert np.array_equal(acc.view(np.uint16), t_acc.numpy().view(np.uint16))


def test_sliding_window_with_identity_network_returns_the_input():
    """Gaussian-weighted averaging of identical predictions gives back the prediction (to float16)."""
    image = np.random.default_rng(1).normal(size=(40, 50, 60)).astype(np.float32)
    patch = (24, 32, 32)
    logits = sliding_window.sliding_window(image, lambda x: x.copy(), patch, 0.5, n_classes=1)
    assert logits.shape == (1, *image.shape) and logits.dtype == np.float16
    close = np.isclose(logits[0].astype(np.float32), image, atol=0.02, rtol=0.01)
    # only the outermost corners, where the float16 Gaussian weights underflow, may drift (as in nnU-Net)
    assert close.mean() > 0.99
    assert close[5:-5, 5:-5, 5:-5].all()


@pytest.fixture(scope="module")
def real_ct(generated_volumes):
    """A CT with anatomy (generated: the units need realistic intensities, not a real scan)."""
    return io.load_volume(generated_volumes["small"])


@pytest.mark.parametrize("spacing", [(0.8, 0.8, 1.5), (0.7, 0.7, 5.0), (3.0, 3.0, 3.0), (1.2, 0.9, 2.0)])
def test_resampling_matches_totalsegmentator_change_spacing(real_ct, spacing):
    from totalsegmentator.resampling import change_spacing

    affine = np.diag([*spacing, 1.0])
    data = real_ct.data[:60, :50, :20]
    theirs = change_spacing(nib.Nifti1Image(data, affine), 3.0, order=1, dtype=np.int32, nr_cpus=1)
    zoom = resample.zoom_factors(resample.header_spacing(data.shape, affine))
    ours = resample.to_target_spacing(data, zoom)
    assert ours.shape == theirs.shape
    assert np.array_equal(ours, np.asanyarray(theirs.dataobj))
    if zoom is not None:
        assert ours.dtype == np.int32
        back = resample.labels_to_shape(ours.astype(np.uint8), data.shape)
        theirs_back = change_spacing(nib.Nifti1Image(ours.astype(np.uint8), theirs.affine), 3.0, data.shape,
                                     order=0, dtype=np.uint8, nr_cpus=1, force_affine=affine)
        assert np.array_equal(back, np.asanyarray(theirs_back.dataobj))


def test_crop_matches_nnunet(real_ct):
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    data = np.zeros((40, 50, 60), dtype=np.float32)
    data[5:30, 10:41, 3:33] = real_ct.data[:25, :31, :30] + 2000  # shifted so the block has no zeros
    data[10:12, 20:22, 10:12] = 0  # a hole: filled by nnU-Net, cannot change the box
    _, _, bbox = crop_to_nonzero(data[None])
    assert preprocess.nonzero_bbox(data) == [tuple(b) for b in bbox]


def test_normalization_matches_nnunet_ctnormalization(real_ct):
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization

    props = {"mean": CT_MEAN, "std": CT_STD, "percentile_00_5": CT_CLIP[0], "percentile_99_5": CT_CLIP[1]}
    data = real_ct.data.astype(np.int32).astype(np.float32)
    theirs = CTNormalization(use_mask_for_norm=False, intensityproperties=props).run(data.copy())
    assert np.array_equal(preprocess.normalize_ct(data), theirs)


def test_padding_matches_nnunet():
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    image = np.random.default_rng(2).normal(size=(30, 101, 122)).astype(np.float32)
    theirs, slicer = pad_nd_image(torch.from_numpy(image[None]), PATCH_SIZE, "constant", {"value": 0}, True)
    ours, unpad = preprocess.pad_to_patch(image, PATCH_SIZE)
    assert np.array_equal(ours, theirs[0].numpy())
    assert np.array_equal(ours[unpad], image)


def test_orientation_round_trip_for_lps(real_ct):
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine = real_ct.affine @ flip
    data = real_ct.data[::-1, ::-1, :]
    canon, canon_affine, _ = io.to_canonical(data, affine)
    assert io.orientation_code(canon_affine) == "RAS"
    assert np.array_equal(canon, np.asarray(nib.as_closest_canonical(nib.Nifti1Image(data, affine)).dataobj))
    assert np.array_equal(io.from_canonical(canon, canon_affine, affine), data)


def test_dice_on_hand_made_volumes():
    ref = np.zeros((10, 10, 10), np.uint8)
    ours = np.zeros_like(ref)
    ref[:5] = 1          # 500 voxels
    ours[:4] = 1         # 400, all inside
    ref[7:, :5] = 2      # 150
    ours[7:, 5:] = 2     # 150, disjoint
    dice = metrics.dice_per_class(ours, ref)
    assert dice[1] == pytest.approx(2 * 400 / 900)
    assert dice[2] == 0.0
    assert metrics.mean_dice(ours, ref) == pytest.approx((2 * 400 / 900) / 2)
    assert metrics.voxel_agreement(ours, ref) == pytest.approx(1 - (100 + 150 + 150) / 1000)
    assert metrics.mean_dice(ref, ref) == 1.0


def test_ground_truth_labels_are_mapped_to_totalsegmentator_ids():
    gt = np.zeros((4, 4, 4), np.uint8)
    gt[0] = 6   # AbdomenCTCT liver
    gt[1] = 1   # spleen
    ours = np.zeros_like(gt)
    ours[0] = 5  # TotalSegmentator liver
    ours[1, :2] = 1
    dice = metrics.ground_truth_dice(ours, gt, {1: 1, 6: 5})
    assert dice == {1: pytest.approx(2 * 8 / 24), 5: 1.0}


def test_threads_setting_reaches_the_numpy_and_native_work(monkeypatch, tmp_path):
    """`--threads 1` under a wider affinity mask: every parallel helper of the pipeline's stages (slab zoom,
    float16 accumulation, divide + argmax, native or torch) is handed 1 thread by the variant's runner, so the
    process keeps one CPU busy there; with no setting they get the mask's CPU count."""
    import os
    from dataclasses import replace

    import nibabel as nib

    from common.model.weights import NUM_CLASSES
    from common.pipeline import resample, sliding_window
    from common.runtime import backends, native_kernels
    from common.variants.table import EXACT_STAGES, Variant, make_pipeline_runner

    cpus = len(os.sched_getaffinity(0))
    if cpus < 2:
        pytest.skip(f"needs an affinity mask of 2 CPUs or more, this process has {cpus}")
    seen = []

    def record(module, name, position):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            seen.append((name, args[position] if len(args) > position else kwargs["threads"]))
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    record(resample, "zoom_in_slabs", 3)
    record(sliding_window, "parallel_ranges", 1)
    record(native_kernels, "accumulate_tile", 4)
    record(native_kernels, "divide_argmax", 3)

    def predict(tile):
        return np.repeat(tile, NUM_CLASSES, axis=1) * np.linspace(-1, 1, NUM_CLASSES, dtype=np.float32)[None, :, None,
                                                                                                        None, None]

    monkeypatch.setattr(backends, "make_backend", lambda name, threads, **options: backends.Backend("fake", predict))
    image = tmp_path / "ct.nii.gz"
    data = np.random.default_rng(0).integers(-1000, 1000, (70, 60, 50)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 2.0, 1.0])), image)
    variant = Variant("small_tiles", "exact", "fake", "test", {}, replace(EXACT_STAGES, patch=(32, 32, 32)))
    for threads in (1, cpus):
        seen.clear()
        make_pipeline_runner("test", variant, threads).run(image, None)
        assert {name for name, _ in seen} >= {"zoom_in_slabs", "accumulate_tile", "divide_argmax"}, seen
        assert {n for _, n in seen} == {threads}, seen
