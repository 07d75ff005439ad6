"""The benchmark scripts on a manifest with a bad case: an error row with a one-line reason, the other
cases still run and are scored, the exit code says a case failed, and the reports are written."""
from __future__ import annotations

import csv
import subprocess
import sys

import pandas as pd
import pytest

from common.core import paths

COLUMNS = ["case_id", "image", "label", "label_map", "source", "shape", "spacing", "orientation", "sha256"]


def _manifest(tmp_path, rows):
    path = tmp_path / "manifest.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for case_id, image in rows:
            writer.writerow({"case_id": case_id, "image": str(image), "label": "", "label_map": "",
                             "source": "test", "shape": "1x1x1", "spacing": "1x1x1", "orientation": "RAS",
                             "sha256": ""})
    return path


def _run(script, *args):
    return subprocess.run([sys.executable, str(paths.REPO_ROOT / script), *args, "--no-progress"],
                          capture_output=True, text=True, cwd=paths.REPO_ROOT, timeout=900)


def test_bad_case_becomes_an_error_row_and_the_run_continues(tmp_path, generated_volumes, onnx_model):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b this is not a gzip stream")
    manifest = _manifest(tmp_path, [("broken", broken), ("small", generated_volumes["small"]),
                                    ("missing", tmp_path / "nope.nii.gz")])
    out = tmp_path / "bench"
    result = _run("04_onnx_benchmark.py", "--manifest", str(manifest), "--out", str(out))
    assert result.returncode == 1, result.stderr
    rows = pd.read_csv(out / "onnx_baseline_results.csv")
    by_case = rows.set_index("case_id")
    assert by_case.loc["small", "status"] == "ok"
    assert by_case.loc["small", "wall_s"] > 0 and by_case.loc["small", "n_tiles"] == 1
    stages = by_case.loc["small", ["load_s", "preprocess_s", "inference_s", "postprocess_s", "save_s"]].sum()
    assert stages == pytest.approx(by_case.loc["small", "wall_s"], rel=0.05)
    assert by_case.loc["broken", "status"] == "error" and "not a readable NIfTI" in by_case.loc["broken", "error"]
    assert by_case.loc["missing", "status"] == "error" and "no such file" in by_case.loc["missing", "error"]
    written = out / "outputs" / "onnx_baseline" / "exact_ort_default"
    assert sorted(p.name for p in written.iterdir()) == ["small.nii.gz"]  # nothing half-written for bad cases
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")].__len__() == 2
    summary = (out / "SUMMARY.md").read_text()
    assert "Weights: stand-in" in summary.splitlines()[2] and "Python-ONNX (baseline)" in summary


def test_missing_manifest_is_one_line(tmp_path):
    result = _run("04_onnx_benchmark.py", "--manifest", str(tmp_path / "none.csv"), "--out", str(tmp_path))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: manifest")
    assert "Traceback" not in result.stderr


def test_unknown_case_id_is_one_line(tmp_path, generated_volumes):
    manifest = _manifest(tmp_path, [("small", generated_volumes["small"])])
    result = _run("03_vanilla_benchmark.py", "--manifest", str(manifest), "--cases", "nope", "--out", str(tmp_path))
    assert result.returncode != 0 and "unknown case ids nope" in result.stderr
    assert "Traceback" not in result.stderr


def test_variant_that_fails_to_start_is_an_error_row_and_the_others_run(tmp_path, generated_volumes, onnx_model,
                                                                       monkeypatch, capsys):
    """05 with a variant whose model file is corrupt: its worker fails to start; that variant costs one error
    row per run (not the whole run), the other variant runs and is scored, and the exit code is 1."""
    import importlib

    from common.variants import table

    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"this is not an ONNX protobuf" * 100)
    broken = table.Variant("ort_corrupt", "exact", "onnxruntime", "test: corrupt model", {"model": str(corrupt)})
    monkeypatch.setitem(table.VARIANTS, "ort_corrupt", broken)
    manifest = _manifest(tmp_path, [("small", generated_volumes["small"])])
    out = tmp_path / "bench"
    script = importlib.import_module("05_optimized_python_benchmark")
    rc = script.main(["--manifest", str(manifest), "--out", str(out), "--variants", "ort_corrupt,exact_ort_tuned",
                      "--no-peak", "--no-profile", "--no-progress"])
    assert rc == 1
    rows = pd.read_csv(out / "onnx_optimized_results.csv").set_index("variant")
    assert rows.loc["exact_ort_tuned", "status"] == "ok" and rows.loc["exact_ort_tuned", "wall_s"] > 0
    assert rows.loc["ort_corrupt", "status"] == "error"
    assert "failed to start" in rows.loc["ort_corrupt", "error"]
    text = (out / "optimized_report.md").read_text()
    assert "ort_corrupt" in text
    assert "## Network efficiency per precision" in text and "## Per-layer profile" in text  # said not measured
    assert "error: variant ort_corrupt failed to start" in capsys.readouterr().err
