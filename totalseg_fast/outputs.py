"""What `totalseg_fast` writes, file for file as TotalSegmentator 2.18 writes it for `--fast`.

- folder mode: one `<class name>.nii.gz` per class, uint8 0/1, the input's header with dtype uint8 and the input's
  affine (TotalSegmentator's `nnunet.save_segmentation_nifti`);
- `--ml`: one uint8 multilabel file with the label map as a NIfTI header extension (code 0, TotalSegmentator's
  `nifti_ext_header.add_label_map_to_nifti` XML, byte for byte);
- `-s`: `statistics.json` with TotalSegmentator's `--fast` rules (`statistics.get_basic_statistics` on the 3 mm
  canonical grid: volume in mm3, mean intensity rounded to 5 decimals, classes touching the border zeroed unless
  `-sii`), computed in one pass over the labels instead of one per class;
- `-p`: `preview_total.png`, axial, coronal and sagittal overlays (matplotlib; TotalSegmentator renders 3-D
  surfaces with fury, which this tool does not need).

Every file is written under a temporary name and renamed when complete. Masks are compressed by ISA-L in a thread
pool (the compressor releases the GIL); the header is serialized once by nibabel and shared by every mask, and
the masks of absent classes (most of the 117 on any CT) are one compressed stream written many times.
"""
from __future__ import annotations

import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

LABEL_COLORS = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255], [255, 128, 0],
                [255, 0, 128], [128, 255, 128], [0, 128, 255], [128, 128, 128], [185, 170, 155]]


def label_map_xml(label_map: dict[int, str]) -> bytes:
    """The extension TotalSegmentator's `add_label_map_to_nifti` appends (same bytes)."""
    xmlpre = ('<?xml version="1.0" encoding="UTF-8"?> <CaretExtension>  <Date><![CDATA[2013-07-14T05:45:09]]></Date>'
              '   <VolumeInformation Index="0">   <LabelTable>')
    body = ""
    for label_id, label_name in label_map.items():
        rgb = LABEL_COLORS[label_id % len(LABEL_COLORS)]
        body += (f'<Label Key="{label_id}" Red="{rgb[0]/255}" Green="{rgb[1]/255}" Blue="{rgb[2]/255}" Alpha="1">'
                 f'<![CDATA[{label_name}]]></Label>\n')
    xmlpost = ('  </LabelTable>  <StudyMetaDataLinkSet>  </StudyMetaDataLinkSet>  <VolumeType><![CDATA[Label]]>'
               '</VolumeType>   </VolumeInformation></CaretExtension>')
    return bytes(xmlpre + "\n" + body + "\n" + xmlpost + "\n              ", "utf-8")


def uint8_header(header: nib.Nifti1Header) -> nib.Nifti1Header:
    header = header.copy()
    header.set_data_dtype(np.uint8)
    return header


def _tmp_beside(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def _publish(tmp: Path, path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the user's usual permissions
    os.replace(tmp, path)


def write_bytes_atomic(path: Path, chunks) -> Path:
    tmp = _tmp_beside(path)
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        _publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _gzip(prefix: bytes, data) -> bytes:
    """One gzip member of `prefix + data` at ISA-L level 1 (what io.save_atomic writes); releases the GIL."""
    from isal import isal_zlib

    comp = isal_zlib.compressobj(1, isal_zlib.DEFLATED, 31)
    return comp.compress(prefix) + comp.compress(data) + comp.flush()


def write_multilabel(labels: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header, path: Path,
                     label_map: dict[int, str]) -> Path:
    """TotalSegmentator's `--ml` file: uint8 labels, the input's header (dtype uint8), the label map extension."""
    img = nib.Nifti1Image(labels.astype(np.uint8, copy=False), affine, uint8_header(header))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(0, label_map_xml(label_map)))
    raw = img.to_bytes()
    if not path.name.endswith(".gz"):
        return write_bytes_atomic(path, [raw])
    return write_bytes_atomic(path, [_gzip(b"", raw)])


def _mask_prefix(shape: tuple[int, ...], affine: np.ndarray, header: nib.Nifti1Header) -> bytes:
    """The bytes nibabel writes before the voxels of `Nifti1Image(mask.astype(uint8), affine, header)`: the same for
    every mask of one image (dtype, shape, affine and header are; uint8 data are written unscaled). Serialized
    from an all-zero stand-in that takes no memory (a broadcast view)."""
    zeros = np.broadcast_to(np.uint8(0), shape)
    raw = nib.Nifti1Image(zeros, affine, uint8_header(header)).to_bytes()
    return raw[: len(raw) - zeros.size]


def write_masks(labels: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header, out_dir: Path,
                classes: dict[int, str], threads: int, candidates=None) -> list[Path]:
    """One `<name>.nii.gz` per class in `classes` (uint8 0/1), compressed in `threads` threads.

    `candidates`: labels that may be present (e.g. those of the 3 mm labels the volume was resampled from: a
    superset); the others are written as the one all-zero stream. Default: every class is compared."""
    import threading

    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = _mask_prefix(labels.shape, affine, header)
    # NIfTI stores x fastest (Fortran order): the (z, y, x) C-order view of the labels has those bytes
    fortran = labels.T if labels.T.flags.c_contiguous else _transposed_copy(labels, threads)
    present = set(classes) if candidates is None else {int(c) for c in candidates}
    step = max(1, (4 << 20) // max(1, fortran[0].size))  # slices per 4 MB chunk
    empty: dict[str, bytes] = {}
    local = threading.local()

    def empty_stream() -> bytes:
        if "gz" not in empty:
            empty["gz"] = _gzip(prefix, np.zeros(fortran.size, np.uint8))
        return empty["gz"]

    def one(item: tuple[int, str]) -> Path:
        label, name = item
        if label in present:
            from isal import isal_zlib

            if getattr(local, "mask", None) is None:  # one cache-sized buffer per thread, not a volume per class
                local.mask = np.empty((step, *fortran.shape[1:]), np.bool_)
            comp = isal_zlib.compressobj(1, isal_zlib.DEFLATED, 31)
            parts = [comp.compress(prefix)]
            for lo in range(0, fortran.shape[0], step):
                chunk = fortran[lo:lo + step]
                out = local.mask[: len(chunk)]
                np.equal(chunk, label, out=out)
                parts.append(comp.compress(out.view(np.uint8)))
            parts.append(comp.flush())
            stream = b"".join(parts)
        else:
            stream = empty_stream()
        return write_bytes_atomic(out_dir / f"{name}.nii.gz", [stream])

    if any(label not in present for label in classes):
        empty_stream()  # once, before the pool
    with ThreadPoolExecutor(max(1, threads)) as pool:
        return list(pool.map(one, classes.items()))


def _transposed_copy(labels: np.ndarray, threads: int) -> np.ndarray:
    """np.ascontiguousarray(labels.T), slab by slab in threads (numpy's copy releases the GIL)."""
    view = labels.T
    out = np.empty(view.shape, labels.dtype)
    bounds = np.linspace(0, view.shape[0], max(1, threads) + 1).astype(int)

    def part(lo_hi):
        lo, hi = lo_hi
        out[lo:hi] = view[lo:hi]

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(part, zip(bounds[:-1], bounds[1:])))
    return out


def _touching_border(labels: np.ndarray) -> set[int]:
    """Labels present within 3 voxels of any face (TotalSegmentator's `touches_border`)."""
    found: set[int] = set()
    for axis in range(3):
        for part in (slice(None, 3), slice(-3, None)):
            index = [slice(None)] * 3
            index[axis] = part
            found.update(np.unique(labels[tuple(index)]).tolist())
    return found


def statistics(labels_3mm: np.ndarray, ct_3mm: np.ndarray, spacing: tuple[float, ...], classes: dict[int, str],
               exclude_masks_at_border: bool = True) -> dict:
    """TotalSegmentator's `get_basic_statistics(seg, img_in_rsp, metric="mean")`, one pass for all classes:
    volume = voxels * the product of the float32 zooms, intensity = mean of the int16-cast CT, rounded to 5."""
    labels = labels_3mm.astype(np.intp, copy=False).ravel()
    ct = np.asarray(ct_3mm).astype(np.int16).astype(np.float64).ravel()
    counts = np.bincount(labels, minlength=256)
    sums = np.bincount(labels, weights=ct, minlength=256)
    zooms = np.asarray(spacing, dtype=np.float32)
    vox_vol = zooms[0] * zooms[1] * zooms[2]
    at_border = _touching_border(labels_3mm) if exclude_masks_at_border else set()
    stats = {}
    for label, name in classes.items():
        n = int(counts[label])
        if label in at_border:
            stats[name] = {"volume": 0.0, "intensity": 0.0}
            continue
        volume = np.int64(n) * vox_vol
        intensity = np.round(sums[label] / n, 5) if n > 0 else 0.0
        stats[name] = {"volume": float(volume), "intensity": float(intensity)}
    return stats


def write_statistics(stats: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(path, [json.dumps(stats, indent=4).encode()])


def write_preview(ct_3mm: np.ndarray, labels_3mm: np.ndarray, path: Path) -> Path:
    """Axial, coronal and sagittal slices through the segmented volume's centre, labels overlaid (RAS grid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    ct = np.asarray(ct_3mm, dtype=np.float32)
    labels = np.asarray(labels_3mm)
    where = np.argwhere(labels > 0)
    centre = where.mean(axis=0).round().astype(int) if len(where) else np.array(labels.shape) // 2
    rng = np.random.default_rng(0)
    colors = np.concatenate([[[0, 0, 0, 0]], np.c_[rng.uniform(0.2, 1.0, (255, 3)), np.full(255, 0.55)]])
    cmap = ListedColormap(colors)
    views = [("axial", ct[:, :, centre[2]], labels[:, :, centre[2]]),
             ("coronal", ct[:, centre[1], :], labels[:, centre[1], :]),
             ("sagittal", ct[centre[0], :, :], labels[centre[0], :, :])]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.5))
    for ax, (title, image, seg) in zip(axes, views):
        # RAS voxels: show the first axis left-right in radiological convention, superior up
        ax.imshow(np.clip(image, -200, 400).T, cmap="gray", origin="lower")
        ax.imshow(seg.T, cmap=cmap, vmin=0, vmax=255, origin="lower", interpolation="nearest")
        ax.set_title(f"{title} ({len(np.unique(seg)) - (1 if (seg == 0).any() else 0)} classes)")
        ax.axis("off")
        if title != "sagittal":
            ax.invert_xaxis()
    fig.tight_layout()
    tmp = _tmp_beside(path)
    try:
        fig.savefig(tmp, format="png", dpi=80)
        _publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path
