"""Converting one model: ``torch.onnx`` (TorchScript exporter, opset 17), and for TFLite
``onnx2tf`` (TensorFlow's converter, NHWC input) or ``litert-torch`` (int8 by PT2E static
quantisation: per-channel int8 weights, int8 activations, int8 input and output, calibrated on
real training images with the recipe's normalisation). fp16 and dynamic-range files come from
the fp32 file through ``ai-edge-quantizer``. Nothing here touches the network: onnx2tf is
handed its calibration data.

Before conversion, BatchNorm channels that never vary on the training data are made exact
constants (``zero_dead_channels``): their folded weights are huge (gamma / sqrt(eps)), which
makes the per-channel int8 bias scale so coarse that the constant is rounded away.

Every file is written to a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from edgekd import artifacts
from edgekd.checkpoint import atomic_path
from edgekd.errors import EdgekdError
from edgekd.export.int8_limits import fit_hard_swish_scales
from edgekd.models.dead_channels import zero_dead_channels

log = logging.getLogger(__name__)

CONVERTERS = ("auto", "onnx2tf", "litert-torch")


def export_onnx(model: nn.Module, sample: torch.Tensor, path: Path, dynamic_batch: bool = False) -> None:
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # ToMe's per-block r and chunk sizes are Python ints of the token count, which is static: the
        # trace fixing them is what is wanted, so the tracer's warnings about it are noise to a user
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
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
    observed with histograms over the calibration images (fed one at a time: batch 1 graph).
    ToMe's matching (``TokenMatch``) stays float: its step functions and ranks are exact only in
    float; so does its size-weighted merge (``TokenMerge``): one int8 scale cannot hold tokens
    of mass 1 and of mass 70 (see its docstring)."""
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from edgekd.tome.merge import TokenMatch, TokenMerge

    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    # torch.export records a module's type in nn_module_stack as the class or, in this torch, as its
    # dotted name; the quantizer's filter compares with ``in``, so both are given
    for float_module in (TokenMatch, TokenMerge):
        for module_type in (float_module, f"{float_module.__module__}.{float_module.__qualname__}"):
            quantizer.set_module_type(module_type, None)
    graph = prepare_pt2e(_export_for_quantizer(model, sample), quantizer)
    with torch.no_grad():
        for i in range(len(calib)):
            graph(calib[i : i + 1])
    quantised = convert_pt2e(graph, fold_quantize=False)
    # torch.export's module says training=True and refuses .eval(); the graph was captured from the
    # model in eval mode (no dropout, batch-norm statistics frozen), so only the flag is wrong, and on
    # it litert-torch would warn that the model "is converted in training mode"
    for module in quantised.modules():
        module.training = False
    return quantised, quantizer


def _export_for_quantizer(model: nn.Module, sample: torch.Tensor) -> nn.Module:
    """The model as the graph the PT2E quantizer annotates. A CNN is traced strict (as for QAT):
    a non-strict trace leaves its residual adds out of the quantizer's patterns, and they stay
    float32 in the file (a MobileNetV2's 9 ADDs). A model with attention is traced non-strict:
    strict, a small timm ViT's int8 graph agreed with its float model on 6 % of test images
    (100 % non-strict), and ToMe's float-only modules are found by the module stack the
    non-strict trace records. A CNN that traces only non-strict still converts, its adds float
    (export.json's io.float_ops names them)."""
    if not any(isinstance(m, nn.MultiheadAttention) or type(m).__name__.endswith("Attention") for m in model.modules()):
        try:
            return torch.export.export(model, (sample,), strict=True).module()
        except Exception as e:  # noqa: BLE001 - any trace failure: the non-strict trace is the fallback
            log.warning("the strict trace for int8 failed (%s: %s); traced non-strict, so some ops may stay float32",
                        type(e).__name__, (str(e).strip().splitlines() or [""])[0][:160])
    return torch.export.export(model, (sample,), strict=False).module()


def export_tflite_int8(model: nn.Module, sample: torch.Tensor, calib: torch.Tensor, path: Path) -> None:
    import litert_torch
    from litert_torch.quantize.quant_config import QuantConfig

    quantised, quantizer = calibrate_int8(model, sample, calib)
    edge = litert_torch.convert(quantised, (sample,), quant_config=QuantConfig(pt2e_quantizer=quantizer))
    with atomic_path(path) as tmp:
        edge.export(str(tmp))
        fit_hard_swish_scales(tmp)


def quantize_weights(fp32_path: Path, path: Path, kind: str) -> None:
    """fp16 weights (``kind="fp16"``) or dynamic-range int8 weights (``"dynamic"``) from an fp32
    TFLite file, with ai-edge-quantizer; activations stay float, so no calibration is needed."""
    from ai_edge_quantizer import quantizer, recipe
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    qt = quantizer.Quantizer(str(fp32_path))
    if kind == "dynamic":
        qt.load_quantization_recipe(recipe.dynamic_wi8_afp32())
    else:
        qt.load_quantization_recipe([{
            "regex": ".*", "operation": "*", "algorithm_key": AlgorithmName.FLOAT_CASTING,
            "op_config": {"weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"},
                          "compute_precision": "FLOAT", "explicit_dequantize": True}}])
    result = qt.quantize()
    with atomic_path(path) as tmp:
        result.export_model(str(tmp), overwrite=True)


# onnx2tf checks every 3-channel (RGB-looking) model on 20 sample images that it downloads
# unless this file is in its working directory, even when handed calibration data.
ONNX2TF_SAMPLE_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"


def _onnx2tf_sample_file(images: torch.Tensor, mean: list[float], std: list[float], path: Path) -> None:
    """onnx2tf's sample-image file made from our own real images (normalised NCHW): 20 x 128 x
    128 x 3 float32 in [0, 1], the shape and range it expects (it resizes them to the input)."""
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    unit = (images[:20].float() * s + m).clamp(0, 1)
    unit = unit.repeat((20 + len(unit) - 1) // len(unit), 1, 1, 1)[:20]
    unit = torch.nn.functional.interpolate(unit, size=(128, 128), mode="bilinear", align_corners=False)
    np.save(path, unit.permute(0, 2, 3, 1).contiguous().numpy().astype(np.float32))


def convert_onnx2tf(onnx_path: Path, out_dir: Path, calib: torch.Tensor | None, mean: list[float],
                    std: list[float], sample: torch.Tensor | None = None) -> dict[str, Path]:
    """TFLite files from an ONNX file with onnx2tf (TensorFlow), run as a subprocess.

    With ``calib`` (normalised NCHW images) it also writes full-integer int8 (per-channel,
    int8 input and output), calibrated on those images: they are handed over as an NHWC .npy in
    [0, 1] with the mean/std. For 3-channel models onnx2tf also wants sample images of its own:
    they are made from ``sample`` (else ``calib``), so onnx2tf never touches the network.
    Returns the variant → file map (fp32, fp16, and with calibration dynamic and int8); inputs
    are NHWC.
    """
    beside = Path(sys.executable).with_name("onnx2tf")  # the venv's own, before any on PATH
    exe = str(beside) if beside.is_file() else shutil.which("onnx2tf")
    if exe is None:
        raise EdgekdError("converter onnx2tf needs the 'onnx2tf' command: pip install 'edgekd[export]'")
    out_dir = out_dir.resolve()
    src = out_dir / "onnx2tf" / onnx_path.name  # onnx2tf may rewrite its input; keep ours as exported
    src.parent.mkdir()
    shutil.copyfile(onnx_path, src)
    cmd = [exe, "-i", str(src), "-o", str(out_dir), "-n"]
    images = sample if sample is not None else calib
    if len(mean) == 3:
        if images is None:
            raise EdgekdError(f"onnx2tf needs sample images for the 3-channel {onnx_path.name}; pass some")
        _onnx2tf_sample_file(images, mean, std, out_dir / ONNX2TF_SAMPLE_FILE)
    if calib is not None:
        m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        unit = (calib * s + m).permute(0, 2, 3, 1).contiguous().numpy().astype(np.float32)  # NHWC in [0, 1]
        np.save(out_dir / "calib.npy", unit)
        cmd += ["-oiqt", "-qt", "per-channel", "-iqd", "int8", "-oqd", "int8", "-cind", "input",
                str(out_dir / "calib.npy"), str([[[mean]]]), str([[[std]]])]
    proc = subprocess.run(cmd, cwd=out_dir, capture_output=True, text=True, check=False,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    stem = onnx_path.stem
    files = {"fp32": f"{stem}_float32.tflite", "fp16": f"{stem}_float16.tflite"}
    if calib is not None:
        files |= {"dynamic": f"{stem}_dynamic_range_quant.tflite", "int8": f"{stem}_full_integer_quant.tflite"}
    found = {k: out_dir / v for k, v in files.items() if (out_dir / v).is_file()}
    if proc.returncode != 0 or len(found) != len(files):
        text = re.sub(r"\x1b\[[0-9;]*m", "", proc.stderr + proc.stdout)  # drop terminal colours
        lines = [ln for ln in text.splitlines() if "error" in ln.lower()] or ["no output"]
        raise EdgekdError(f"onnx2tf failed on {onnx_path.name} (exit {proc.returncode}): {lines[-1].strip()[:200]}")
    return found


def resolve_converter(converter: str, student_arch: str) -> str:
    """``auto``: onnx2tf, except litert-torch for a ViT student: onnx2tf's NCHW→NHWC rewriting
    mis-shapes the token matmuls of timm's ViT (it stops at blocks.0/attn/qkv/MatMul)."""
    if converter != "auto":
        return converter
    return "litert-torch" if student_arch == "vit" else "onnx2tf"


def convert_model(role: str, model: nn.Module, sample: torch.Tensor, calib_x: torch.Tensor | None, mean: list[float],
             std: list[float], work: Path, *, onnx: bool, dynamic_batch: bool, tflite: list[str],
             converter: str, sample_images: torch.Tensor) -> dict[str, tuple[Path, str, float]]:
    """Every artifact of one model, converted into ``work``: name → (file, format, seconds)."""
    made: dict[str, tuple[Path, str, float]] = {}
    work.mkdir(parents=True, exist_ok=True)

    def timed(name: str, fmt: str, fn: Callable[[Path], Any]) -> Path:
        path, t0 = work / name, time.perf_counter()
        try:
            fn(path)
        except EdgekdError:
            raise
        except Exception as e:  # noqa: BLE001 - a converter failure is one line for the user
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise EdgekdError(f"converting {role} to {fmt} failed: {type(e).__name__}: {first}") from None
        seconds = time.perf_counter() - t0
        if fmt.startswith("tflite"):
            check_loads(path, name)  # as for onnx2tf's files below: one line, not a traceback later
        made[name] = (path, fmt, seconds)
        return path

    if onnx or converter == "onnx2tf":
        onnx_file = timed(artifacts.onnx_file(role), "onnx", lambda p: export_onnx(model, sample, p))
        if not onnx:
            del made[artifacts.onnx_file(role)]
    if onnx and dynamic_batch:
        timed(artifacts.onnx_file(role, dynamic_batch=True), "onnx", lambda p: export_onnx(model, sample, p, dynamic_batch=True))
    if not tflite:
        return made
    if converter == "onnx2tf":
        t0 = time.perf_counter()
        files = convert_onnx2tf(onnx_file, work, calib_x if "int8" in tflite or "dynamic" in tflite else None,
                                mean, std, sample_images)
        seconds = time.perf_counter() - t0  # one run writes every variant
        for v in tflite:
            if v == "int8":
                fit_hard_swish_scales(files[v])
            check_loads(files[v], artifacts.tflite_file(role, v))
            made[artifacts.tflite_file(role, v)] = (files[v], f"tflite_{v}", seconds)
        return made
    if {"fp32", "fp16", "dynamic"} & set(tflite):  # fp16 and dynamic are made from the fp32 file
        fp32 = timed(artifacts.tflite_file(role, "fp32"), "tflite_fp32", lambda p: export_tflite_fp32(model, sample, p))
    if "int8" in tflite:
        assert calib_x is not None
        timed(artifacts.tflite_file(role, "int8"), "tflite_int8", lambda p: export_tflite_int8(model, sample, calib_x, p))
    for v in ("fp16", "dynamic"):
        if v in tflite:
            timed(artifacts.tflite_file(role, v), f"tflite_{v}", lambda p, k=v: quantize_weights(fp32, p, k))
    if "fp32" not in tflite:
        made.pop(artifacts.tflite_file(role, "fp32"), None)
    return made


def check_loads(path: Path, name: str) -> None:
    """A converted file LiteRT cannot prepare is a conversion failure (onnx2tf wrote int8 tensors
    with an infinite scale for a torchvision MNASNet, measured), reported in one line."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        Interpreter(model_path=str(path), num_threads=1).allocate_tensors()
    except (RuntimeError, ValueError) as e:
        first = " ".join(str(e).split())[:160]
        raise EdgekdError(f"the converter wrote {name}, and LiteRT cannot load it: {first}") from None


def check_imports(formats: tuple[str, ...], int8: bool, converter: str) -> None:
    """Every package that exporting ``formats`` (and int8) with ``converter`` (resolved) needs is
    installed: checked before the export, and by ``edgekd run`` before it distils."""
    import importlib.util

    tflite = int8 or any(f in artifacts.TFLITE_VARIANTS for f in formats)
    needed = list(("onnx", "onnxruntime") if "onnx" in formats or converter == "onnx2tf" else ())
    if tflite:
        needed += ["ai_edge_litert"] + (["litert_torch", "ai_edge_quantizer"] if converter == "litert-torch"
                                        else ["onnx2tf", "tensorflow"])
    for mod in needed:
        if importlib.util.find_spec(mod) is None:
            raise EdgekdError(f"export needs the '{mod}' package: pip install 'edgekd[export]'")

