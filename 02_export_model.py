#!/usr/bin/env python3
"""02: get the TotalSegmentator --fast model (Dataset297) and export it to ONNX.

Weights (see README, "Weights"):
  real      Dataset297 through TotalSegmentator's own downloader into a project-local
            TOTALSEG_HOME_DIR (default models/totalseg_home), or --weights-zip for the official
            zip copied by hand to an air-gapped server
  proxy     the same architecture trained here (models/proxy/, tools/train_proxy.py): offline
            accuracy and drift verdicts
  stand-in  seeded random weights with the real architecture: plumbing and speed only
  auto      real, else the proxy, else the stand-in, with a loud banner for each fallback

The exported model always has the static patch shape every sliding-window run feeds; the
static-vs-dynamic timing is a report line only (a build artefact must not depend on a noisy
timing). Writes models/totalseg_fast.onnx, models/model_info.json and benchmarks/export_report.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.core import paths
from common.core.env import apply_threads, default_threads


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", choices=("auto", "real", "proxy", "stand-in"), default="auto",
                        help="which weights to use (default: auto = real, else proxy, else stand-in, with a warning)")
    parser.add_argument("--weights-zip", type=Path, default=None, metavar="ZIP",
                        help="import the official Dataset297 zip copied by hand (air-gapped servers); "
                             "checked, then used as the real weights")
    parser.add_argument("--home", type=Path, default=None,
                        help="TotalSegmentator home (default: $TOTALSEG_HOME_DIR or models/totalseg_home)")
    parser.add_argument("--onnx", type=Path, default=paths.ONNX_MODEL, help="ONNX output path")
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="threads for the checks (default: CPUs in this process's affinity mask)")
    parser.add_argument("--skip-shape-study", action="store_true",
                        help="skip timing static vs dynamic spatial axes (saves about a minute)")
    parser.add_argument("--report", type=Path, default=paths.BENCHMARKS_DIR / "export_report.md")
    return parser.parse_args(argv)


def shape_study(weights, threads: int, static_path: Path) -> dict:
    """Seconds per 112x112x128 patch with a static-shape and a dynamic-axes model, same session settings."""
    import tempfile

    from common.model.export import export_onnx, time_patch

    with tempfile.TemporaryDirectory(dir=static_path.parent) as tmp:
        dynamic_path = export_onnx(weights, Path(tmp) / "dynamic.onnx", dynamic_spatial=True)
        dynamic_s = time_patch(dynamic_path, threads)
        static_s = time_patch(static_path, threads)
        static_again = time_patch(static_path, threads, repeats=1)
        dynamic_again = time_patch(dynamic_path, threads, repeats=1)
    return {"static_s": (static_s + static_again) / 2, "dynamic_s": (dynamic_s + dynamic_again) / 2}


def write_report(path: Path, info, check, study: dict | None) -> None:
    from common.model.weights import weights_banner
    from common.reports.environment import environment_lines
    from common.reports.report import write_text_atomic

    lines = ["# ONNX export report", "", weights_banner(info.__dict__), "",
             *environment_lines(threads=info.architecture["threads"]),
             f"- ONNX model: `{info.onnx_path}` (sha256 `{info.onnx_sha256[:16]}`), opset {info.architecture['opset']}",
             f"- Architecture: {info.architecture['network']}, features {info.architecture['features']}, "
             f"patch (z,y,x) {info.architecture['patch_zyx']}, {info.architecture['classes']} output channels, "
             f"{info.architecture['parameters'] / 1e6:.2f} M parameters",
             "", "## Verification against torch (one real-CT patch)", "",
             f"- Patch source: `{check.source}`",
             f"- Max |logit difference|: {check.max_abs_diff:.3g}",
             f"- Argmax agreement: {check.argmax_agreement:.6f} (required >= 0.999)"]
    if check.top2_margin_of_flips is not None:
        lines.append(f"- Largest top-2 logit margin among flipped voxels: {check.top2_margin_of_flips:.3g}")
    lines += ["", "## Static patch shape vs dynamic spatial axes", ""]
    if study:
        lines += ["| model | s per 112x112x128 patch (ONNX Runtime, default session) |", "| --- | ---: |",
                  f"| static (1,1,112,112,128) | {study['static_s']:.2f} |",
                  f"| dynamic z,y,x | {study['dynamic_s']:.2f} |", "",
                  f"The exported model is always the static one: the sliding window only ever feeds full patches, "
                  f"and a build artefact must not depend on a timing ({info.architecture['threads']} threads; "
                  f"timings on a shared machine drift)."]
    else:
        lines.append("Not measured in this run (--skip-shape-study).")
    write_text_atomic(path, "\n".join(lines) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    apply_threads(args.threads)
    from common.model import export
    from common.model.weights import WeightsError, count_parameters, ensure_weights, load_network

    try:
        if args.weights_zip:
            from common.model.weights_zip import import_weights_zip

            print(f"Importing {args.weights_zip} ...")
            import_weights_zip(args.weights_zip, args.home)
            args.weights = "real"
        weights = ensure_weights(args.weights, args.home)
        print(f"Weights: {weights.kind} ({weights.model_dir})")
        if weights.is_stand_in:
            print("NOTE: using STAND-IN weights: seeded random weights with the real architecture; "
                  "results show speed and parity only, never clinical accuracy.")
        elif weights.kind == "proxy":
            print(f"NOTE: using PROXY weights ({export.weights_note(weights)}).")
        network = load_network(weights)
        print(f"Exporting ONNX to {args.onnx} ...")
        export.export_onnx(weights, args.onnx)
        check = export.verify_export(weights, args.onnx, args.threads)
        print(f"Export check on {check.source}: max |diff| {check.max_abs_diff:.3g}, "
              f"argmax agreement {check.argmax_agreement:.6f}")
        study = None if args.skip_shape_study else shape_study(weights, args.threads, args.onnx)
    except WeightsError as exc:
        args.onnx.unlink(missing_ok=True)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    info = export.save_model_info(weights, args.onnx, count_parameters(network), args.threads)
    write_report(args.report, info, check, study)
    print(f"Wrote {paths.MODEL_INFO} and {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
