"""NIfTI input validation, loading, orientation to RAS and back, atomic label saving.

Every check that can be made from the header runs before the voxel data is read, so a bad
file costs a one-line error, not a large allocation.
"""
from __future__ import annotations

import gzip
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform


class InputError(ValueError):
    """A one-line, user-facing reason why an input volume cannot be processed."""


@dataclass
class Volume:
    """A CT as loaded: voxel data (float64, as TotalSegmentator reads it) on the file's own grid."""
    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    path: Path

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)


def _expected_data_bytes(header) -> int:
    return int(np.prod(header.get_data_shape(), dtype=np.int64)) * header.get_data_dtype().itemsize


def _gzip_uncompressed_size_mod32(path: Path) -> int:
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


def _gzip_stream_size(path: Path) -> int:
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while block := f.read(1 << 22):
                total += len(block)
    except (EOFError, OSError, gzip.BadGzipFile):
        pass  # a truncated stream: report what could be read
    return total


def validate_nifti(path: str | Path) -> nib.Nifti1Image:
    """Open a NIfTI file lazily and check it is a readable 3-D volume; raise InputError otherwise."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file")
    try:
        img = nib.load(path)
    except Exception as exc:
        raise InputError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120] if str(exc) else 'no detail'})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path}: not a NIfTI image (found {type(img).__name__})")
    shape = img.shape
    if len(shape) < 3 or (len(shape) == 3 and min(shape) < 1):
        raise InputError(f"{path}: expected a 3-D volume, found shape {shape}")
    if len(shape) > 3 and int(np.prod(shape[3:])) != 1:
        raise InputError(f"{path}: expected a 3-D volume, found {len(shape)}-D shape {shape} "
                         f"with {int(np.prod(shape[3:]))} volumes")
    if img.header.get_data_dtype().fields is not None:
        raise InputError(f"{path}: structured/RGB voxel type {img.header.get_data_dtype()} is not a CT")
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-12:
        raise InputError(f"{path}: the header's affine is degenerate or not finite")
    _check_size_matches_header(path, img.header, int(getattr(img.dataobj, "offset", 352)))
    return img


def _check_size_matches_header(path: Path, header, offset: int) -> None:
    """`offset`: where nibabel reads the voxels (a header vox_offset of 0 means right after the header)."""
    needed = offset + _expected_data_bytes(header)
    if path.name.endswith(".gz"):
        # The gzip trailer gives the size for free; only a mismatch (e.g. a multi-member stream) costs a full read.
        if _gzip_uncompressed_size_mod32(path) != needed % (1 << 32):
            actual = _gzip_stream_size(path)
            if actual < needed:
                raise InputError(f"{path}: truncated: the header needs {needed} bytes, "
                                 f"the gzip stream holds {actual}")
    else:
        actual = path.stat().st_size
        if actual < needed:
            raise InputError(f"{path}: truncated: the header needs {needed} bytes, the file has {actual}")


def read_gzip(path: Path) -> bytes:
    """The whole decompressed stream, by ISA-L (about 2.5x zlib's speed here); InputError when truncated."""
    from isal import igzip

    try:
        with igzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, OSError) as exc:
        raise InputError(f"{path}: voxel data unreadable ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120] if str(exc) else 'truncated'})") from None


def load_volume(path: str | Path) -> Volume:
    """Validate, read the voxels as float64 (TotalSegmentator's `get_fdata`) and reject NaN/inf."""
    img = validate_nifti(path)
    try:
        data = img.get_fdata()
    except (EOFError, OSError, ValueError, gzip.BadGzipFile) as exc:
        raise InputError(f"{path}: voxel data unreadable ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120] if str(exc) else 'truncated'})") from None
    if data.ndim > 3:
        data = data.reshape(data.shape[:3])
    if not np.isfinite(data).all():
        bad = int(np.size(data) - np.isfinite(data).sum())
        raise InputError(f"{path}: {bad} voxels are NaN or infinite")
    return Volume(data, img.affine.copy(), img.header.copy(), Path(path))


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorient to the closest RAS axes (`nibabel.as_closest_canonical`): (data, affine, orientation)."""
    ornt = io_orientation(affine)
    img = nib.Nifti1Image(data, affine)
    if np.array_equal(ornt, axcodes2ornt("RAS")):
        return data, affine, ornt
    canon = img.as_reoriented(ornt)
    return np.asarray(canon.dataobj), canon.affine, ornt


def from_canonical(data: np.ndarray, canonical_affine: np.ndarray, original_affine: np.ndarray) -> np.ndarray:
    """Undo `to_canonical` on a volume living on the canonical grid (TotalSegmentator's `undo_canonical`)."""
    original = io_orientation(original_affine)
    back = ornt_transform(axcodes2ornt("RAS"), original)
    if np.array_equal(original, axcodes2ornt("RAS")):
        return data
    return np.asarray(nib.Nifti1Image(data, canonical_affine).as_reoriented(back).dataobj)


def orientation_code(affine: np.ndarray) -> str:
    return "".join(nib.aff2axcodes(affine))


def label_image(labels: np.ndarray, volume: Volume) -> nib.Nifti1Image:
    """uint8 labels with the input's affine and header (TotalSegmentator's multilabel output)."""
    header = volume.header.copy()
    header.set_data_dtype(np.uint8)
    return nib.Nifti1Image(labels.astype(np.uint8, copy=False), volume.affine, header)


def save_atomic(img: nib.Nifti1Image, path: str | Path) -> Path:
    """Write to a temporary name in the target folder and rename: never a half-written output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    try:
        if suffix == ".nii.gz":  # ISA-L level 1: ~3.5x faster than nibabel's zlib level 1, same format
            from isal import igzip

            with igzip.open(tmp, "wb", compresslevel=1) as f:
                f.write(img.to_bytes())
        else:
            nib.save(img, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the user's usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
