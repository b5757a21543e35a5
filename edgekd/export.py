"""``export(run_dir) -> ExportResult``: ONNX and TFLite (fp32, full-integer int8) artifacts of a
distil run, each checked against PyTorch and scored on the test set in its own runtime.

Converters: ``torch.onnx`` (TorchScript exporter, opset 17) checked in onnxruntime, and
``litert-torch`` for TFLite (no TensorFlow). int8 uses PT2E static quantisation (per-channel
int8 weights, int8 activations, int8 input and output) calibrated on real training images
with the recipe's normalisation. Nothing here touches the network.

Every file is written to a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from edgekd import __version__
from edgekd.checkpoint import atomic_path, load_checkpoint, write_json
from edgekd.data import gather, load_dataset
from edgekd.distill.stage import build_from_checkpoint
from edgekd.errors import EdgekdError
from edgekd.recipe import recipe_from_dict
from edgekd.train import prepare_batch

log = logging.getLogger(__name__)
EXPORT_SCHEMA = "edgekd.export/1"
FORMATS = ("onnx", "tflite")
ONNX_MAX_ABS_DIFF, ONNX_MIN_AGREEMENT = 1e-3, 99.9


@dataclass
class ExportResult:
    export_dir: Path
    report: dict[str, Any]
    int8_drop: float | None = None
    int8_drop_exceeded: bool = False
    files: list[Path] = field(default_factory=list)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- runtimes: each returns a function from a float NCHW batch (normalised) to float logits ---

def onnx_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: np.concatenate([sess.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])


def tflite_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """LiteRT interpreter; quantises the input and dequantises the output from the tensor details."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]

    def run(x: np.ndarray) -> np.ndarray:
        rows = []
        for i in range(len(x)):
            xi = x[i : i + 1]
            if inp["dtype"] != np.float32:
                scale, zero = inp["quantization"]
                info = np.iinfo(inp["dtype"])
                xi = np.clip(np.round(xi / scale + zero), info.min, info.max).astype(inp["dtype"])
            it.set_tensor(inp["index"], xi)
            it.invoke()
            y = it.get_tensor(out["index"])
            if out["dtype"] != np.float32:
                scale, zero = out["quantization"]
                y = (y.astype(np.float32) - zero) * scale
            rows.append(y.astype(np.float32))
        return np.concatenate(rows)

    return run


def tflite_io_details(path: Path) -> dict[str, Any]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    dtypes = sorted({np.dtype(t["dtype"]).name for t in it.get_tensor_details()})
    q = lambda d: {"scale": float(d["quantization"][0]), "zero_point": int(d["quantization"][1])}  # noqa: E731
    return {"input_dtype": np.dtype(inp["dtype"]).name, "output_dtype": np.dtype(out["dtype"]).name,
            "input_shape": [int(s) for s in inp["shape"]], "input_quantization": q(inp),
            "output_quantization": q(out), "tensor_dtypes": dtypes}


# --- converters ---

def export_onnx(model: nn.Module, sample: torch.Tensor, path: Path, dynamic_batch: bool = False) -> None:
    with atomic_path(path) as tmp:
        torch.onnx.export(
            model, (sample,), str(tmp), opset_version=17, dynamo=False, input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None,
        )


def export_tflite_fp32(model: nn.Module, sample: torch.Tensor, path: Path) -> None:
    import litert_torch

    edge = litert_torch.convert(model, (sample,))
    with atomic_path(path) as tmp:
        edge.export(str(tmp))


def calibrate_int8(model: nn.Module, sample: torch.Tensor, calib: torch.Tensor) -> tuple[nn.Module, Any]:
    """PT2E static quantisation: per-channel symmetric int8 weights, int8 activations
    observed with histograms over the calibration images (fed one at a time: batch 1 graph)."""
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    graph = torch.export.export(model, (sample,)).module()
    graph = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for i in range(len(calib)):
            graph(calib[i : i + 1])
    return convert_pt2e(graph, fold_quantize=False), quantizer


def export_tflite_int8(model: nn.Module, sample: torch.Tensor, calib: torch.Tensor, path: Path) -> None:
    import litert_torch
    from litert_torch.quantize.quant_config import QuantConfig

    quantised, quantizer = calibrate_int8(model, sample, calib)
    edge = litert_torch.convert(quantised, (sample,), quant_config=QuantConfig(pt2e_quantizer=quantizer))
    with atomic_path(path) as tmp:
        edge.export(str(tmp))


def _parity(got: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Agreement of an artifact's logits with PyTorch's on the same (first) test images."""
    got = got[: len(reference)]
    return {"images": int(len(got)), "max_abs_logit_diff": float(np.abs(got - reference).max()),
            "top1_agreement": 100.0 * float((got.argmax(1) == reference.argmax(1)).mean())}


def export(run_dir: str | Path, *, formats: tuple[str, ...] = FORMATS, int8: bool = True, calib: int = 500,
           max_int8_drop: float = 1.0, dynamic_batch: bool = False, parity_images: int = 256) -> ExportResult:
    """Export the student (and the teacher, when the run trained one) of ``run_dir``."""
    run_dir = Path(run_dir)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise EdgekdError(f"unknown format '{unknown[0]}'; choose from {', '.join(FORMATS)}")
    student_path = run_dir / "student_best.pt"
    if not student_path.is_file():
        raise EdgekdError(f"{run_dir}: no student_best.pt; run 'edgekd distill RECIPE --out {run_dir}' first")
    if calib < 1:
        raise EdgekdError("--calib must be at least 1 image")
    _check_imports(formats)
    roles = {"student": student_path}
    if (run_dir / "teacher_best.pt").is_file():
        roles["teacher"] = run_dir / "teacher_best.pt"
    ckpts = {role: load_checkpoint(p) for role, p in roles.items()}
    recipe = recipe_from_dict(ckpts["student"]["recipe"])
    data = load_dataset(recipe.data, recipe.seed)
    mean, std = torch.tensor(ckpts["student"]["mean"]), torch.tensor(ckpts["student"]["std"])
    test_u8, test_labels = gather(data.test)
    test_x, test_y = prepare_batch(test_u8, mean, std).numpy(), test_labels.numpy()
    if int8:
        calib_u8, _ = gather(data.train, calib, seed=0)
        if len(calib_u8) == 0:
            raise EdgekdError(f"{run_dir}: no training images to calibrate int8 with; check the recipe's data section")
        calib_x = prepare_batch(calib_u8, mean, std)
    out_dir = run_dir / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts: dict[str, dict[str, Any]] = {}
    sidecars = []
    for role, ckpt in ckpts.items():
        model = build_from_checkpoint(ckpt, roles[role]).eval()
        size = ckpt["image_size"]
        sample = torch.from_numpy(test_x[:1].copy())
        with torch.no_grad():
            reference = model(torch.from_numpy(test_x[:parity_images].copy())).numpy()
        jobs: list[tuple[str, str, Callable[[Path], None], Callable[[Path], Callable]]] = []
        if "onnx" in formats:
            jobs.append((f"{role}.onnx", "onnx", lambda p, m=model, x=sample: export_onnx(m, x, p), onnx_runner))
            if dynamic_batch:
                jobs.append((f"{role}_dynamic.onnx", "onnx", lambda p, m=model, x=sample: export_onnx(m, x, p, True), onnx_runner))
        if "tflite" in formats:
            jobs.append((f"{role}_fp32.tflite", "tflite_fp32", lambda p, m=model, x=sample: export_tflite_fp32(m, x, p),
                         tflite_runner))
            if int8 and role == "student":
                jobs.append((f"{role}_int8.tflite", "tflite_int8",
                             lambda p, m=model, x=sample: export_tflite_int8(m, x, calib_x, p), tflite_runner))
        quant: dict[str, Any] = {}
        for name, fmt, convert, runtime in jobs:
            path = out_dir / name
            t0 = time.perf_counter()
            try:
                convert(path)
            except EdgekdError:
                raise
            except Exception as e:  # noqa: BLE001 - a converter failure is one line for the user
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise EdgekdError(f"converting {role} to {fmt} failed: {type(e).__name__}: {first}") from None
            convert_s = time.perf_counter() - t0
            logits = runtime(path)(test_x)  # one pass: parity on the first images, top-1 on all
            parity = _parity(logits, reference)
            if fmt == "onnx" and (parity["max_abs_logit_diff"] > ONNX_MAX_ABS_DIFF
                                  or parity["top1_agreement"] < ONNX_MIN_AGREEMENT):
                path.unlink(missing_ok=True)
                raise EdgekdError(f"{name} disagrees with PyTorch in onnxruntime (max |dlogit| "
                                  f"{parity['max_abs_logit_diff']:.2e}, top-1 agreement {parity['top1_agreement']:.2f} %)")
            entry = {"model": role, "format": fmt, "size_bytes": path.stat().st_size, "convert_s": round(convert_s, 2),
                     "parity": parity, "test_top1": 100.0 * float((logits.argmax(1) == test_y).mean()),
                     "test_images": int(len(test_y))}
            if fmt.startswith("tflite"):
                entry["io"] = tflite_io_details(path)
                if fmt == "tflite_int8":
                    quant = {"input": entry["io"]["input_quantization"], "output": entry["io"]["output_quantization"]}
            artifacts[name] = entry
            log.info("%s: %s", name, {k: v for k, v in entry.items() if k != "io"})
        sidecar = out_dir / f"{role}.model.json"
        write_json(sidecar, {
            "model": role, "arch": ckpt["arch"], "class_names": ckpt["class_names"],
            "input_shape": [1, ckpt["in_channels"], size, size], "layout": "NCHW",
            "input": "float32 (x/255 - mean) / std per channel; int8 files take that value quantised",
            "mean": ckpt["mean"], "std": ckpt["std"], "int8_quantization": quant or None,
            "source_checkpoint": roles[role].name, "source_sha256": _sha256(roles[role]),
            "edgekd_version": __version__, "artifacts": [n for n, a in artifacts.items() if a["model"] == role],
        })
        sidecars.append(sidecar)
    drop = None
    if "student_int8.tflite" in artifacts and "student_fp32.tflite" in artifacts:
        drop = artifacts["student_fp32.tflite"]["test_top1"] - artifacts["student_int8.tflite"]["test_top1"]
    report = {"schema": EXPORT_SCHEMA, "edgekd_version": __version__, "run_dir": str(run_dir),
              "converters": {"onnx": "torch.onnx (opset 17)", "tflite": "litert-torch (PT2E int8)"},
              "calibration_images": calib if int8 else 0, "int8_drop_top1": drop,
              "max_int8_drop": max_int8_drop, "artifacts": artifacts}
    write_json(out_dir / "export.json", report)
    return ExportResult(out_dir, report, drop, drop is not None and drop > max_int8_drop,
                        [out_dir / n for n in artifacts] + sidecars + [out_dir / "export.json"])


def _check_imports(formats: tuple[str, ...]) -> None:
    needed = {"onnx": ("onnx", "onnxruntime"), "tflite": ("litert_torch", "ai_edge_litert")}
    for fmt in formats:
        for mod in needed[fmt]:
            try:
                __import__(mod)
            except ImportError:
                raise EdgekdError(f"{fmt} export needs the '{mod}' package: pip install 'edgekd[export]'") from None
