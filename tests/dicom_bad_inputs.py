"""Bad DICOM inputs, each built in a fresh folder: ``BAD[name](phantom, root) -> (input path, reason regex)``.

The regex matches the whole one-line reason (``str(DicomInputError)``, and what follows ``error: <input>: `` on
the command line). Shared by test_dicom_input.py (function level) and test_dicom_cli.py (the command).
"""
from __future__ import annotations

import shutil
import zipfile

import pydicom

from totalseg_fast.dicom.testing import write_ct_series


def _series(phantom, folder, n=10, **kw):
    hu, _, affine = phantom
    return write_ct_series(hu[:, :, :n], folder, affine, **kw)


def _bad_empty(phantom, root):
    (root / "in").mkdir()
    return root / "in", r"^empty folder: no files$"


def _bad_no_dicom(phantom, root):
    (root / "in").mkdir()
    (root / "in" / "notes.txt").write_text("hello\n" * 40)
    (root / "in" / "image.png").write_bytes(b"\x89PNG" + b"\0" * 300)
    return root / "in", r"^no DICOM files in this folder \(2 files, none DICOM\)$"


def _bad_no_image(phantom, root):
    _series(phantom, root / "in", n=1)
    path = next((root / "in").iterdir())
    ds = pydicom.dcmread(path)
    for key in ("PixelData", "Rows", "Columns"):  # a DICOM object that is no image (as a report would be)
        delattr(ds, key)
    ds.save_as(path)
    return root / "in", r"^no DICOM image series in this folder \(1 DICOM file, none an image slice\)$"


def _bad_multiframe(phantom, root):
    paths = _series(phantom, root / "in", n=4)
    ds = pydicom.dcmread(paths[0])
    for p in paths[1:]:
        p.unlink()
    ds.NumberOfFrames = 4  # one file, four frames: an enhanced-CT style object (no per-slice position)
    ds.PixelData = ds.PixelData * 4
    del ds.ImagePositionPatient
    ds.save_as(paths[0])
    return root / "in", (r"^multi-frame \(enhanced\) DICOM images are not supported \(1 file\): export the series "
                         r"as one file per slice$")


def _bad_single(phantom, root):
    _series(phantom, root / "in", n=1)
    return root / "in", r"^series [\d.]+ holds a single slice; a CT volume needs at least 4$"


def _bad_truncated(phantom, root):
    paths = _series(phantom, root / "in", shuffle_names=False)
    raw = paths[4].read_bytes()
    paths[4].write_bytes(raw[: len(raw) - 3000])
    return root / "in", r"^unreadable slice slice_0004\.dcm \("


def _bad_truncated_compressed(phantom, root):
    paths = _series(phantom, root / "in", shuffle_names=False, compress="jpeg2000")
    raw = paths[6].read_bytes()
    paths[6].write_bytes(raw[: len(raw) // 2])
    return root / "in", r"^unreadable (slice|DICOM file) slice_0006\.dcm \((no pixel data|no data elements read): truncated"


def _bad_garbage(phantom, root):
    paths = _series(phantom, root / "in", shuffle_names=False)
    paths[2].write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\x7f" + b"junk" * 10)
    return root / "in", r"^unreadable DICOM file slice_0002\.dcm \(no data elements read: truncated or corrupt\?\)$"


def _bad_unequal(phantom, root):
    paths = _series(phantom, root / "in", shuffle_names=False)
    ds = pydicom.dcmread(paths[3])
    pixels = ds.pixel_array[:32, :32].copy()
    ds.Rows = ds.Columns = 32
    ds.PixelData = pixels.tobytes()
    ds.save_as(paths[3])
    return root / "in", r"^slices of unequal size in one series \(9 of 64x64, 1 of 32x32; e\.g\. slice_0003\.dcm\)$"


def _bad_gap(phantom, root):
    paths = _series(phantom, root / "in", shuffle_names=False)
    paths[5].unlink()
    return root / "in", (r"^gap in slice positions: 16 mm between slice_0004\.dcm and slice_0006\.dcm, 8 mm "
                         r"elsewhere \(missing slices\?\)$")


def _bad_gantry_tilt(phantom, root):
    hu, _, affine = phantom
    tilted = affine.copy()
    tilted[1, 2] = 0.15 * affine[2, 2]  # each slice shifted along y: the stack leans (about 8.5 degrees)
    write_ct_series(hu[:, :, :10], root / "in", tilted, series_uid="1.2.3.99")
    return root / "in", (r"^series 1\.2\.3\.99 is tilted \(gantry tilt: slice positions not along the slice normal\); "
                         r"TotalSegmentator's conversion \(dicom2nifti\) refuses it too$")


def _bad_duplicate(phantom, root):
    paths = _series(phantom, root / "in", shuffle_names=False)
    shutil.copy(paths[5], root / "in" / "copy.dcm")
    return root / "in", r"^2 slices share a position \((copy|slice_0005)\.dcm, (copy|slice_0005)\.dcm\)"


def _bad_zip_parent(phantom, root):
    paths = _series(phantom, root / "s")
    with zipfile.ZipFile(root / "in.zip", "w") as zf:
        for p in paths[:-1]:
            zf.write(p, p.name)
        zf.write(paths[-1], "../escaped.dcm")
    return root / "in.zip", r"^zip holds an unsafe path '\.\./escaped\.dcm' \(absolute or with '\.\.'\); nothing extracted$"


def _bad_zip_absolute(phantom, root):
    paths = _series(phantom, root / "s")
    with zipfile.ZipFile(root / "in.zip", "w") as zf:
        zf.writestr(zipfile.ZipInfo("/tmp/abs.dcm"), paths[0].read_bytes())  # write() would strip the "/"
    return root / "in.zip", r"^zip holds an unsafe path '/tmp/abs\.dcm'"


def _bad_zip_damaged(phantom, root):
    paths = _series(phantom, root / "s")
    with zipfile.ZipFile(root / "in.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for p in paths:
            zf.write(p, p.name)
    raw = bytearray((root / "in.zip").read_bytes())
    raw[2000:2400] = bytes(400)  # zeros inside the first members' compressed data: CRC or inflate error
    (root / "in.zip").write_bytes(bytes(raw))
    return root / "in.zip", r"^not a readable zip file \((BadZipFile|error): "


def _bad_zip_corrupt(phantom, root):
    (root / "in.zip").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    return root / "in.zip", r"^not a zip file or a folder of DICOM slices$"


BAD = {f.__name__[5:]: f for f in (
    _bad_empty, _bad_no_dicom, _bad_no_image, _bad_multiframe, _bad_single, _bad_truncated, _bad_truncated_compressed,
    _bad_garbage, _bad_unequal, _bad_gap, _bad_gantry_tilt, _bad_duplicate, _bad_zip_parent, _bad_zip_absolute, _bad_zip_damaged,
    _bad_zip_corrupt)}
