"""Bad inputs: one clear error each, raised before the voxel data is read where the header tells."""
from __future__ import annotations

import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest

from common.core import io


def _save(tmp_path, name, data, affine=None):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 3.0, 1.0]) if affine is None else affine), path)
    return path


def _write(path, content: bytes):
    path.write_bytes(content)
    return path


@pytest.fixture
def good(tmp_path):
    return _save(tmp_path, "good.nii.gz", np.arange(20 * 30 * 10, dtype=np.int16).reshape(20, 30, 10))


def test_good_volume_loads(good):
    volume = io.load_volume(good)
    assert volume.shape == (20, 30, 10) and volume.data.dtype == np.float64


def test_four_d_with_one_volume_is_accepted(tmp_path):
    volume = io.load_volume(_save(tmp_path, "one.nii.gz", np.ones((5, 6, 7, 1), np.int16)))
    assert volume.shape == (5, 6, 7)


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.nii.gz", "no such file"),
    (lambda p: p, "not a file"),
    (lambda p: _write(p / "empty.nii.gz", b""), "empty file"),
    (lambda p: _write(p / "text.nii.gz", b"hello, I am not a CT"), "not a readable NIfTI"),
    (lambda p: _write(p / "text.nii", b"x" * 400), "not a readable NIfTI"),
    (lambda p: _save(p, "flat.nii.gz", np.ones((5, 6), np.int16)), "expected a 3-D volume"),
    (lambda p: _save(p, "series.nii.gz", np.ones((5, 6, 7, 3), np.int16)), "3 volumes"),
    (lambda p: _save(p, "nan.nii.gz", np.full((5, 6, 7), np.nan, np.float32)), "NaN or infinite"),
    (lambda p: _save(p, "inf.nii.gz", np.where(np.eye(5, 6)[..., None] > 0, np.inf, 1.0).repeat(7, 2)
                     .astype(np.float32)), "NaN or infinite"),
])
def test_bad_input_gives_one_clear_error(tmp_path, make, message):
    with pytest.raises(io.InputError, match=message) as err:
        io.load_volume(make(tmp_path))
    assert "\n" not in str(err.value)


def test_truncated_gzip_is_refused(good, tmp_path):
    raw = good.read_bytes()
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(io.InputError, match="truncated|unreadable|not a readable"):
        io.load_volume(bad)


def test_truncated_uncompressed_is_refused_from_the_header(tmp_path):
    path = _save(tmp_path, "plain.nii", np.ones((20, 30, 10), np.int16))
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(io.InputError, match="truncated: the header needs"):
        io.validate_nifti(path)


def test_header_claiming_more_voxels_than_the_file_holds(good, tmp_path):
    img = nib.load(good)
    header = img.header.copy()
    header.set_data_shape((40, 30, 10))  # twice the voxels the stream holds
    lying = tmp_path / "lying.nii.gz"
    with gzip.open(lying, "wb") as f:
        f.write(header.binaryblock + b"\0" * 4 + np.asarray(img.dataobj).tobytes(order="F"))
    with pytest.raises(io.InputError, match="truncated"):
        io.validate_nifti(lying)


def test_multi_member_gzip_is_not_mistaken_for_truncation(good, tmp_path):
    raw = gzip.decompress(good.read_bytes())
    multi = tmp_path / "multi.nii.gz"
    multi.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    assert io.load_volume(multi).shape == (20, 30, 10)


def test_save_atomic_leaves_nothing_on_failure(tmp_path, good):
    volume = io.load_volume(good)
    target = tmp_path / "out" / "labels.nii.gz"
    io.save_atomic(io.label_image(np.zeros(volume.shape, np.uint8), volume), target)
    saved = nib.load(target)
    assert saved.get_data_dtype() == np.uint8 and np.allclose(saved.affine, volume.affine)
    with pytest.raises(AttributeError, match="to_bytes"):  # fails mid-write: the temporary file must go
        io.save_atomic("not an image", tmp_path / "out" / "broken.nii.gz")
    assert sorted(p.name for p in target.parent.iterdir()) == ["labels.nii.gz"]
    shutil.rmtree(target.parent)
