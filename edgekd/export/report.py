"""What an export writes besides the model files: a sidecar per model (what the board needs to
feed it) and export.json (schema ``edgekd.export/1``: every artifact with its parity and score)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekd import __version__, artifacts
from edgekd.checkpoint import write_json


def write_sidecar(out_dir: Path, role: str, ckpt: dict[str, Any], source: Path, tome: dict[str, Any] | None,
                  files: dict[str, dict[str, Any]]) -> Path:
    """``<role>.model.json``: classes, input shape and normalisation, int8 scales, ToMe setting, source."""
    int8_io = files.get(artifacts.tflite_file(role, "int8"), {}).get("io")
    path = out_dir / artifacts.sidecar(role)
    write_json(path, {
        "model": role, "arch": ckpt["arch"], "class_names": ckpt["class_names"],
        "input_shape": [1, ckpt["in_channels"], ckpt["image_size"], ckpt["image_size"]], "layout": "NCHW",
        "input": "float32 (x/255 - mean) / std per channel; int8 files take that value quantised; "
                 "a TFLite file's own layout is in export.json (onnx2tf writes NHWC)",
        "mean": ckpt["mean"], "std": ckpt["std"],
        "int8_quantization": {"input": int8_io["input_quantization"], "output": int8_io["output_quantization"]}
        if int8_io else None,
        "tome": tome,
        "source_checkpoint": source.name, "source_sha256": artifacts.sha256(source),
        "edgekd_version": __version__, "artifacts": [n for n, a in files.items() if a["model"] == role],
    })
    return path


def write_export_report(out_dir: Path, run_dir: Path, converter: str, fallbacks: dict[str, str], calib_images: int,
                        sample_images: int, zeroed: dict[str, int], max_int8_drop: float,
                        files: dict[str, dict[str, Any]], tome_auto: dict[str, Any] | None,
                        refused: dict[str, str]) -> dict[str, Any]:
    """export.json, with the int8 student's top-1 drop against its fp32 file."""
    int8, fp32 = artifacts.tflite_file("student", "int8"), artifacts.tflite_file("student", "fp32")
    drop = files[fp32]["test_top1"] - files[int8]["test_top1"] if int8 in files and fp32 in files else None
    report = {"schema": artifacts.EXPORT_SCHEMA, "edgekd_version": __version__, "run_dir": str(run_dir),
              "converters": {"onnx": "torch.onnx (opset 17)",
                             "tflite": "litert-torch (PT2E int8)" if converter == "litert-torch" else "onnx2tf",
                             "tflite_fallback": {role: f"litert-torch (onnx2tf failed: {why})"
                                                 for role, why in fallbacks.items()}},
              "calibration_images": calib_images,
              "samples": {"file": artifacts.SAMPLES, "images": sample_images, "split": "test", "order_seed": 0},
              "dead_channels_zeroed": zeroed, "int8_drop_top1": drop, "max_int8_drop": max_int8_drop,
              "artifacts": files}
    if tome_auto is not None:
        report["tome_auto"] = tome_auto
    if refused:
        report["refused"] = refused
    write_json(out_dir / artifacts.EXPORT_REPORT, report)
    return report
