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


# Without 05's results on this machine the tool still runs an exact variant chosen by what the study measured:
# OpenVINO f32 with the split skip concatenations and the last layer fused into the float16 accumulation was the
# fastest exact variant, at the lowest exact peak memory (agreement 1.00000, 0.30 of vanilla's memory; 2-core
# Intel Xeon Ice Lake, docs/speed.md); it needs rust/'s kernels and AVX-512, else the same without the fused head
# (3.5-3.8x vanilla, 0.31 of its memory on 2-core AMD EPYC and Intel Xeon); without OpenVINO, ONNX Runtime's
# default session (the suite's FALLBACK_VARIANT).
MEASURED_EXACT = "exact_ov_f32_fused_head"
MEASURED_EXACT_PORTABLE = "exact_ov_f32_split_concat"


def measured_default() -> tuple[str, str]:
    """(variant, why) when no 05 results exist here."""
    import importlib.util

    from common.variants.selection import FALLBACK_VARIANT

    if importlib.util.find_spec("openvino") is None:
        return FALLBACK_VARIANT, f"no 05 results and no OpenVINO here: using {FALLBACK_VARIANT}"
    from common.runtime import native_kernels

    if native_kernels.fused_head_available():
        return MEASURED_EXACT, (f"no 05 results here: using {MEASURED_EXACT}, the study's fastest exact variant "
                                "(run 05 to pick the fastest on this machine)")
    return MEASURED_EXACT_PORTABLE, (f"no 05 results here, and {MEASURED_EXACT} cannot run here (it needs rust/'s "
                                     f"kernels and AVX-512): using {MEASURED_EXACT_PORTABLE}, the study's fastest "
                                     "exact variant without them (run 05 to pick the fastest on this machine)")


def default_variant(out_dir: Path | None = None) -> tuple[str, str]:
    """(variant name, why): the best exact variant of 05's results, else `measured_default()`."""
    from common.core import paths
    from common.variants.selection import FALLBACK_VARIANT

    csv = Path(out_dir or paths.BENCHMARKS_DIR) / "onnx_optimized_results.csv"
    if not csv.is_file() or csv.stat().st_size == 0:
        return measured_default()  # no pandas import on a machine without results
    try:
        from common.variants.choice import choose_variants

        selection = choose_variants(out_dir)
        return selection.exact, selection.note
    except Exception as exc:  # noqa: BLE001 - an unreadable results file must not stop segmentation
        return FALLBACK_VARIANT, f"could not read 05 results ({type(exc).__name__}): using {FALLBACK_VARIANT}"
