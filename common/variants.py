"""Named pipeline variants: a variant is data (runtime + options + pipeline settings), not a code path.

`05_optimized_python_benchmark.py --list-variants` prints this table; 06 and segment mode pick from it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.pipeline import PipelineConfig


@dataclass(frozen=True)
class Variant:
    name: str
    tier: str  # "exact": same math as vanilla, float rounding only; "approximate": changes the math
    backend: str  # key of common.backends.BACKENDS
    description: str
    backend_options: dict = field(default_factory=dict)
    config: PipelineConfig = PipelineConfig()


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("ort_default", "exact", "onnxruntime", "ONNX Runtime, default session (only threads set)"),
]}


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def make_pipeline_runner(implementation: str, variant: Variant, threads: int):
    """A bench.Runner running `variant` through the shared pipeline (backend built once)."""
    from common.backends import make_backend
    from common.bench import Runner
    from common.pipeline import segment_file

    backend = make_backend(variant.backend, threads, **variant.backend_options)

    def run(input_path: Path, output_path: Path | None) -> dict:
        result = segment_file(input_path, output_path, backend, variant.config)
        return {**result.timings, "n_tiles": result.n_tiles}

    return Runner(implementation, variant.name, variant.tier, run)
