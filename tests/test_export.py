"""The export stage on a tiny student trained on real Fashion-MNIST: real ONNX and TFLite
conversions, each artifact loaded and scored in its own runtime."""

import hashlib
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from edgekd.cli import app

pytest.importorskip("litert_torch", reason="export extras: pip install 'edgekd[export]'")

from conftest import write_recipe  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from edgekd.distill.stage import distill
    from edgekd.recipe import load_recipe

    d = tmp_path_factory.mktemp("export")
    run = d / "run"
    distill(load_recipe(write_recipe(d / "r.yaml", distill={"method": "kd"})), run)
    # Generous limit: this test is about the files; the limit's exit code is tested below.
    result = CliRunner().invoke(app, ["export", str(run), "--int8", "--calib", "64", "--max-int8-drop", "100"])
    assert result.exit_code == 0, result.output + result.stderr
    return run / "export", result.output


def test_all_artifacts_are_written_and_scored(exported):
    out, printed = exported
    report = json.loads((out / "export.json").read_text())
    assert report["schema"] == "edgekd.export/1"
    expected = {"student.onnx", "student_fp32.tflite", "student_int8.tflite", "teacher.onnx", "teacher_fp32.tflite"}
    assert set(report["artifacts"]) == expected
    for name, a in report["artifacts"].items():
        assert (out / name).stat().st_size == a["size_bytes"] > 0
        assert a["test_images"] == 200 and 0 <= a["test_top1"] <= 100
        assert a["parity"]["images"] == 200
        assert name in printed or name[:14] in printed
    assert not list(out.glob(".*.tmp"))


def test_onnx_and_fp32_tflite_match_pytorch(exported):
    report = json.loads((exported[0] / "export.json").read_text())["artifacts"]
    for name in ("student.onnx", "teacher.onnx", "student_fp32.tflite", "teacher_fp32.tflite"):
        assert report[name]["parity"]["max_abs_logit_diff"] < 1e-3, name
        assert report[name]["parity"]["top1_agreement"] >= 99.5, name
    assert abs(report["student.onnx"]["test_top1"] - report["student_fp32.tflite"]["test_top1"]) < 1.0


def test_int8_file_really_is_int8(exported):
    from ai_edge_litert.interpreter import Interpreter

    out = exported[0]
    it = Interpreter(model_path=str(out / "student_int8.tflite"))
    it.allocate_tensors()
    assert it.get_input_details()[0]["dtype"] == np.int8
    assert it.get_output_details()[0]["dtype"] == np.int8
    weights = [t for t in it.get_tensor_details() if t["dtype"] == np.int8 and len(t["shape"]) == 4
               and t["quantization_parameters"]["scales"].size > 1]
    assert weights, "no per-channel quantised int8 weight tensors"
    report = json.loads((out / "export.json").read_text())["artifacts"]
    ratio = report["student_int8.tflite"]["size_bytes"] / report["student_fp32.tflite"]["size_bytes"]
    # Tiny widths carry proportionally more per-channel metadata; the full-width ratio is lower.
    assert ratio < 0.45, ratio


def test_sidecar_describes_the_model(exported):
    out = exported[0]
    side = json.loads((out / "student.model.json").read_text())
    assert side["class_names"][9] == "Ankle boot" and side["input_shape"] == [1, 1, 16, 16]
    assert side["layout"] == "NCHW" and len(side["mean"]) == 1
    q = side["int8_quantization"]["input"]
    assert q["scale"] > 0 and -128 <= q["zero_point"] <= 127
    ckpt = out.parent / side["source_checkpoint"]
    assert side["source_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()


def test_int8_drop_limit_exits_1_naming_the_drop(exported):
    run = exported[0].parent
    r = CliRunner().invoke(app, ["export", str(run), "--formats", "tflite", "--calib", "16", "--max-int8-drop", "-101"])
    assert r.exit_code == 1 and "int8 student loses" in r.stderr and "--max-int8-drop -101" in r.stderr


def test_export_errors_are_one_line_exit_2(tmp_path, exported):
    r = CliRunner().invoke(app, ["export", str(tmp_path)])
    assert r.exit_code == 2 and "no student_best.pt" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = CliRunner().invoke(app, ["export", str(exported[0].parent), "--formats", "coreml"])
    assert r.exit_code == 2 and "unknown format 'coreml'" in r.stderr
