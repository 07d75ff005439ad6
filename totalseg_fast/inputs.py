"""Segment mode's inputs and outputs: NIfTI files or folders of them in, `<name>.nii.gz` out, and the variant
run when none is named. Light imports only: segment mode sets CPU affinity and thread variables first."""
from __future__ import annotations

from pathlib import Path

from common.core.paths import NIFTI_SUFFIXES


def nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files as given; folders expand to their (non-hidden) ``*.nii``/``*.nii.gz`` files, sorted.

    Returns (files, errors) where errors are (input, reason) for folders without any NIfTI file.
    """
    files: list[Path] = []
    errors: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.is_file() and not p.name.startswith(".") and p.name.endswith(NIFTI_SUFFIXES))
            if not found:
                errors.append((item, "folder holds no .nii or .nii.gz file"))
            files.extend(found)
        else:
            files.append(path)  # existence and format are checked by common.core.io when it is processed
    return files, errors


def output_for(input_path: Path, out_dir: Path) -> Path:
    return out_dir / f"{nifti_stem(input_path)}.nii.gz"


def default_variant(out_dir: Path | None = None) -> tuple[str, str]:
    """(variant name, why): the best exact variant of 05's results, else exact_ort_default."""
    from common.variants.selection import FALLBACK_VARIANT

    try:
        from common.variants.choice import choose_variants

        selection = choose_variants(out_dir)
        return selection.exact, selection.note
    except Exception as exc:  # noqa: BLE001 - an unreadable results file must not stop segmentation
        return FALLBACK_VARIANT, f"could not read 05 results ({type(exc).__name__}): using {FALLBACK_VARIANT}"
