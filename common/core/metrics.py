"""Agreement and Dice between label volumes (vs vanilla, vs ground truth)."""
from __future__ import annotations

import numpy as np


def voxel_agreement(labels: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of voxels with the same label."""
    _check_same_grid(labels, reference)
    return float(np.count_nonzero(labels == reference) / labels.size)


def dice_per_class(labels: np.ndarray, reference: np.ndarray, classes=None) -> dict[int, float]:
    """Dice for each class present in `reference` (or for `classes`), background excluded.

    One pass with bincount over label pairs, so 117 classes cost about as much as one.
    """
    _check_same_grid(labels, reference)
    n = int(max(labels.max(initial=0), reference.max(initial=0))) + 1
    pairs = np.bincount(reference.astype(np.int64).ravel() * n + labels.astype(np.int64).ravel(), minlength=n * n)
    confusion = pairs.reshape(n, n)  # [reference, labels]
    ref_count, lab_count, hits = confusion.sum(1), confusion.sum(0), np.diag(confusion)
    wanted = [c for c in (classes if classes is not None else np.flatnonzero(ref_count)) if c != 0]
    result = {}
    for c in wanted:
        if c >= n:  # in neither volume
            result[int(c)] = 1.0
            continue
        denom = ref_count[c] + lab_count[c]
        result[int(c)] = float(2 * hits[c] / denom) if denom else 1.0
    return result


def mean_dice(labels: np.ndarray, reference: np.ndarray) -> float | None:
    """Mean Dice over the classes the reference contains; None where it contains none."""
    scores = dice_per_class(labels, reference)
    return float(np.mean(list(scores.values()))) if scores else None


def map_ground_truth(gt: np.ndarray, label_map: dict[int, int]) -> np.ndarray:
    """Dataset labels -> TotalSegmentator ids; labels not in the map become background."""
    lut = np.zeros(max(int(gt.max(initial=0)), max(label_map, default=0)) + 1, dtype=np.uint8)
    for source, target in label_map.items():
        lut[source] = target
    return lut[gt.astype(np.int64)]


def ground_truth_dice(labels: np.ndarray, gt: np.ndarray, label_map: dict[int, int]) -> dict[int, float]:
    """Dice vs ground truth for each mapped TotalSegmentator class present in the ground truth."""
    mapped = map_ground_truth(gt, label_map)
    present = [c for c in sorted(set(label_map.values())) if np.any(mapped == c)]
    return dice_per_class(labels, mapped, classes=present)


def _check_same_grid(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"label volumes differ in shape: {a.shape} vs {b.shape}")
