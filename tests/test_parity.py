"""Our pipeline is TotalSegmentator: the same labels as `totalsegmentator(fast=True)` on real and generated CTs.

- torch twin (our pipeline, the network in torch): any gap here is a pipeline mistake, so >= 0.99999;
- ONNX Runtime baseline: last-bit differences from torch flip near-ties of the stand-in's random
  logits through the float16 accumulation, so >= 0.997 (real weights: expect >= 0.999).
"""
from __future__ import annotations

import numpy as np
import pytest

from common import bench, metrics
from common.pipeline import PipelineConfig, segment_file

TWIN_MIN = 0.99999
ORT_MIN = 0.997

SHARED = ["example_ct.nii.gz", "example_ct_sm.nii.gz"]
GENERATED = ["lps_anisotropic", "ras_3mm", "eight_tiles"]


@pytest.fixture(scope="module")
def torch_backend(stand_in, threads):
    from common.backends import torch_backend

    return torch_backend(threads, stand_in)


@pytest.fixture(scope="module")
def ort_backend(onnx_model, threads):
    from common.backends import onnxruntime_backend

    return onnxruntime_backend(threads, onnx_model)


def _input(name, shared_data, generated_volumes):
    return shared_data / name if name.endswith(".nii.gz") else generated_volumes[name]


def _agreement(image, backend, vanilla, tmp_path):
    import nibabel as nib

    out = tmp_path / "ours.nii.gz"
    result = segment_file(image, out, backend, PipelineConfig())
    reference_img = nib.load(vanilla(image))
    ours_img = nib.load(out)
    assert ours_img.shape == nib.load(image).shape[:3]
    np.testing.assert_allclose(ours_img.affine, reference_img.affine, atol=1e-5)
    assert ours_img.get_data_dtype() == np.uint8
    ours, reference = bench.read_labels(out), bench.read_labels(vanilla(image))
    assert len(np.unique(reference)) > 5, "vanilla found almost nothing: the comparison would be empty"
    return metrics.voxel_agreement(ours, reference), result


@pytest.mark.parametrize("name", SHARED + GENERATED)
def test_torch_twin_reproduces_vanilla(name, shared_data, generated_volumes, torch_backend, vanilla, tmp_path):
    image = _input(name, shared_data, generated_volumes)
    agreement, result = _agreement(image, torch_backend, vanilla, tmp_path)
    if name == "eight_tiles":
        assert result.n_tiles == 8
    assert agreement >= TWIN_MIN, f"{name}: pipeline differs from TotalSegmentator ({agreement:.6f})"


@pytest.mark.parametrize("name", SHARED + GENERATED)
def test_onnx_baseline_matches_vanilla(name, shared_data, generated_volumes, ort_backend, vanilla, tmp_path):
    image = _input(name, shared_data, generated_volumes)
    agreement, _ = _agreement(image, ort_backend, vanilla, tmp_path)
    assert agreement >= ORT_MIN, f"{name}: ONNX Runtime pipeline agreement {agreement:.6f} < {ORT_MIN}"
