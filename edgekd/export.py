"""``export(run_dir) -> ExportResult``: ONNX and TFLite (fp32, full-integer int8) artifacts of a
distil run, each checked against PyTorch and scored on the test set in its own runtime.

Converters: ``torch.onnx`` (TorchScript exporter, opset 17) checked in onnxruntime; for TFLite
``litert-torch`` by default (no TensorFlow; int8 by PT2E static quantisation: per-channel int8
weights, int8 activations, int8 input and output, calibrated on real training images with the
recipe's normalisation), or ``onnx2tf`` (TensorFlow's converter, NHWC input) with
``converter="onnx2tf"``. fp16 and dynamic-range files come from the fp32 file through
``ai-edge-quantizer``. Nothing here touches the network: onnx2tf is handed its calibration data.

Before conversion, BatchNorm channels that never vary on the training data are made exact
constants (``zero_dead_channels``): their folded weights are huge (gamma / sqrt(eps)), which
makes the per-channel int8 bias scale so coarse that the constant is rounded away.

Every file is written to a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from edgekd import __version__
from edgekd.bench import SAMPLES_FILE
from edgekd.checkpoint import atomic_path, load_checkpoint, write_json
from edgekd.data import gather, load_dataset
from edgekd.distill.stage import build_from_checkpoint
from edgekd.errors import EdgekdError
from edgekd.recipe import recipe_from_dict
from edgekd.train import prepare_batch

log = logging.getLogger(__name__)
EXPORT_SCHEMA = "edgekd.export/1"
FORMATS = ("onnx", "tflite", "fp16", "dynamic")
CONVERTERS = ("auto", "onnx2tf", "litert-torch")
TFLITE_VARIANTS = {"tflite": "fp32", "fp16": "fp16", "dynamic": "dynamic"}
# ONNX parity: the largest logit difference relative to the logits' own scale (the largest |logit|
# of the reference, at least 1). float32 reordering noise grows with that scale: an absolute 1e-3
# refused a correct 1-epoch quick export at 1.02e-3; a real conversion error is orders larger.
ONNX_MAX_REL_DIFF, ONNX_MIN_AGREEMENT = 1e-3, 99.9
TOME_MIN_AGREEMENT = 99.0


@dataclass
class ExportResult:
    export_dir: Path
    report: dict[str, Any]
    int8_drop: float | None = None
    int8_drop_exceeded: bool = False
    files: list[Path] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # ToMe role -> why its files were not written


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
        nhwc = _is_nhwc(inp["shape"], x.shape[1])
        rows = []
        for i in range(len(x)):
            xi = x[i : i + 1].transpose(0, 2, 3, 1) if nhwc else x[i : i + 1]
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


def _is_nhwc(shape: Any, channels: int) -> bool:
    return len(shape) == 4 and int(shape[1]) != channels and int(shape[3]) == channels


def tflite_io_details(path: Path) -> dict[str, Any]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    dtypes = sorted({np.dtype(t["dtype"]).name for t in it.get_tensor_details()})
    q = lambda d: {"scale": float(d["quantization"][0]), "zero_point": int(d["quantization"][1])}  # noqa: E731
    shape = [int(s) for s in inp["shape"]]
    return {"input_dtype": np.dtype(inp["dtype"]).name, "output_dtype": np.dtype(out["dtype"]).name,
            "input_shape": shape, "layout": "NHWC" if shape[-1] < shape[1] else "NCHW", "input_quantization": q(inp),
            "output_quantization": q(out), "tensor_dtypes": dtypes}


# --- converters ---

def zero_dead_channels(model: nn.Module, rel_var: float = 1e-6) -> int:
    """Make Conv→BatchNorm channels whose input never varied exact constants; returns how many.

    A channel whose pre-BN output was constant in training (running_var ≪ eps, e.g. fed only by
    dead ReLU6 units) outputs ``beta`` whatever its weights, but BN folding scales its weights by
    gamma/sqrt(eps) (~300×). Per-channel int8 then gives it a huge weight scale, the int32 bias
    (scale = input scale × weight scale) rounds ``beta`` to 0, and the error spreads through the
    network (measured: 86.7 % → 50 % top-1). Zeroing the weights and the running mean keeps the
    output ``beta`` and lets the bias be quantised finely. In place.
    """
    zeroed = 0
    for parent in model.modules():
        children = list(parent.children())
        for conv, bn in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.running_var is not None):
                continue
            dead = bn.running_var < rel_var * bn.eps
            if dead.any():
                with torch.no_grad():
                    conv.weight[dead] = 0
                    if conv.bias is not None:
                        conv.bias[dead] = 0
                    bn.running_mean[dead] = 0
                zeroed += int(dead.sum())
    return zeroed


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
    graph = torch.export.export(model, (sample,)).module()
    graph = prepare_pt2e(graph, quantizer)
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


def export_tflite_int8(model: nn.Module, sample: torch.Tensor, calib: torch.Tensor, path: Path) -> None:
    import litert_torch
    from litert_torch.quantize.quant_config import QuantConfig

    quantised, quantizer = calibrate_int8(model, sample, calib)
    edge = litert_torch.convert(quantised, (sample,), quant_config=QuantConfig(pt2e_quantizer=quantizer))
    with atomic_path(path) as tmp:
        edge.export(str(tmp))


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


def _parity(got: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Agreement of an artifact's logits with PyTorch's on the same (first) test images."""
    got = got[: len(reference)]
    diff = np.abs(got - reference).max(1)
    scale = max(1.0, float(np.abs(reference).max()))
    return {"images": int(len(got)), "max_abs_logit_diff": float(diff.max()),
            "median_abs_logit_diff": float(np.median(diff)), "logit_scale": scale,
            "max_rel_logit_diff": float(diff.max()) / scale, "median_rel_logit_diff": float(np.median(diff)) / scale,
            "top1_agreement": 100.0 * float((got.argmax(1) == reference.argmax(1)).mean())}


def check_onnx_parity(name: str, parity: dict[str, float], tome: bool = False) -> None:
    """Refuse an ONNX file whose logits differ from PyTorch's by more than ``ONNX_MAX_REL_DIFF`` of
    the logits' scale, or whose top-1 disagrees on more than 0.1 % of images. ToMe's merge choices
    are discrete: a rounding difference at a near-tie (or an LSH projection near 0) merges another
    token in that image, so a ToMe file must match PyTorch on the median image and nearly always on
    top-1, not on every image."""
    worst = "median_rel_logit_diff" if tome else "max_rel_logit_diff"
    min_agreement = TOME_MIN_AGREEMENT if tome else ONNX_MIN_AGREEMENT
    if parity[worst] > ONNX_MAX_REL_DIFF or parity["top1_agreement"] < min_agreement:
        raise EdgekdError(f"{name} disagrees with PyTorch in onnxruntime (max |dlogit| {parity['max_abs_logit_diff']:.2e}"
                          f" = {parity['max_rel_logit_diff']:.1e} of the logit scale {parity['logit_scale']:.1f}, "
                          f"top-1 agreement {parity['top1_agreement']:.2f} %); this is a conversion error: "
                          "report it with the export.json")


def export(run_dir: str | Path, *, formats: tuple[str, ...] = ("onnx", "tflite"), int8: bool = True,
           calib: int = 500, max_int8_drop: float = 1.0, dynamic_batch: bool = False, parity_images: int = 256,
           converter: str = "auto", samples: int = 1000, tome_r: tuple[int, ...] = (),
           tome_matchers: tuple[str, ...] = ("exact",), tome_bits: int = 16, tome_auto: bool = False,
           tome_max_drop: float = 0.5, tome_threads: int = 1,
           tome_timer: Callable[[list[Path]], list[float]] | None = None) -> ExportResult:
    """Export the student (and the teacher, when the run trained one) of ``run_dir``.

    ``formats``: onnx, tflite (fp32), fp16, dynamic; ``int8`` adds the full-integer student.
    The teacher gets ONNX and fp32 TFLite only: the bench compares the student against it.
    ``converter``: onnx2tf (int8 within 0.1 pt of fp32 on the quick student, measured in
    benchmarks/export_converters.md) or litert-torch (no TensorFlow, NCHW input, -0.6 pt there);
    auto (default) is onnx2tf, except litert-torch for ViT students (see ``resolve_converter``).
    ``samples``: this many test images (seeded order) with their labels go into ``samples.npz``,
    the images ``edgekd bench`` scores on the board: the export dir is all the bench needs.
    ``tome_r`` (ViT students): for each r and each of ``tome_matchers`` (exact, lsh with
    ``tome_bits`` bits) also ``student-tome-r{r}-{matcher}`` files (ONNX, fp32 and int8 TFLite),
    ToMe-patched with a fixed r, so every shape is static; the student's own files stay as trained.
    ``tome_auto`` (``--tome-r auto``): the schedule is chosen by ``edgekd.tome.auto`` from int8
    files timed on this host by ``tome_timer`` (default: the median of bare LiteRT invokes with
    ``tome_threads`` threads, interleaved) and scored on the validation split; the winner is exported as
    ``student-tome-auto-exact``, or nothing when r = 0 stays the fastest (``tome_auto`` in export.json).
    """
    run_dir = Path(run_dir)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise EdgekdError(f"unknown format '{unknown[0]}'; choose from {', '.join(FORMATS)}")
    if converter not in CONVERTERS:
        raise EdgekdError(f"unknown converter '{converter}'; choose from {', '.join(CONVERTERS)}")
    student_path = run_dir / "student_best.pt"
    if not student_path.is_file():
        raise EdgekdError(f"{run_dir}: no student_best.pt; run 'edgekd distill RECIPE --out {run_dir}' first")
    if calib < 1:
        raise EdgekdError("--calib must be at least 1 image")
    if samples < 1:
        raise EdgekdError("--samples must be at least 1 image")
    if tome_auto:
        # a ToMe file adds many small ops: at 2 threads it ran slower than at 1 on a 2-core host while
        # r = 0 got faster (benchmarks/tome.md), so the choice is timed with the deployment's threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if not 1 <= tome_threads <= cores:
            raise EdgekdError(f"--tome-threads {tome_threads}: this host can time 1 to {cores} threads; for a "
                              "target with more cores choose on the board: edgekd bench EXPORT_DIR --device "
                              "rpi4 --host pi@board --tome-sweep auto")
    variants = [TFLITE_VARIANTS[f] for f in formats if f in TFLITE_VARIANTS] + (["int8"] if int8 else [])
    roles = {"student": student_path}
    if (run_dir / "teacher_best.pt").is_file():
        roles["teacher"] = run_dir / "teacher_best.pt"
    ckpts = {role: load_checkpoint(p) for role, p in roles.items()}
    requested_converter, fallbacks = converter, {}
    converter = resolve_converter(converter, ckpts["student"]["arch"])
    _check_imports(formats, bool(variants), converter)
    tome_roles = _tome_roles(ckpts["student"], student_path, tome_r, tome_matchers, tome_bits,
                             tflite=bool(variants))
    recipe = recipe_from_dict(ckpts["student"]["recipe"])
    data = load_dataset(recipe.data, recipe.seed)
    mean, std = ckpts["student"]["mean"], ckpts["student"]["std"]
    test_u8, test_labels = gather(data.test)
    test_x, test_y = prepare_batch(test_u8, torch.tensor(mean), torch.tensor(std)).numpy(), test_labels.numpy()
    calib_x = None
    if int8:
        calib_u8, _ = gather(data.train, calib, seed=0)
        if len(calib_u8) == 0:
            raise EdgekdError(f"{run_dir}: no training images to calibrate int8 with; check the recipe's data section")
        calib_x = prepare_batch(calib_u8, torch.tensor(mean), torch.tensor(std))
    out_dir = run_dir / "export"
    if out_dir.exists() and not out_dir.is_dir():
        raise EdgekdError(f"{out_dir} is a file, not a folder; move it away so export can write there")
    out_dir.mkdir(parents=True, exist_ok=True)
    # a ViT student's files also get validation top-1: `edgekd bench --tome-sweep auto` chooses a
    # ToMe schedule by the board's latency and validation (never test) accuracy
    val_x = val_y = None
    if ckpts["student"]["arch"] == "vit" and len(data.val):
        val_u8, val_labels = gather(data.val)
        val_x, val_y = prepare_batch(val_u8, torch.tensor(mean), torch.tensor(std)).numpy(), val_labels.numpy()
    bench_u8, bench_y = gather(data.test, samples, seed=0)
    with atomic_path(out_dir / SAMPLES_FILE) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=bench_u8.numpy().astype(np.uint8), labels=bench_y.numpy().astype(np.int64))
    auto_report = None
    if tome_auto:
        if ckpts["student"]["arch"] != "vit":
            raise EdgekdError(f"--tome-r auto needs a vit student; {student_path} holds a {ckpts['student']['arch']}")
        choice = _choose_tome(ckpts["student"], student_path, data, mean, std, converter, calib_x, out_dir,
                              tome_max_drop, tome_timer or functools.partial(_litert_interleaved_ms,
                                                                             threads=tome_threads))
        auto_report = {**choice.as_dict(), "threads": tome_threads}
        if choice.merges:
            tome_roles["student-tome-auto-exact"] = {"r": choice.schedule, "schedule": choice.schedule,
                                                     "matcher": "exact", "auto": True}
        log.info("--tome-r auto: %s", choice.reason)
    artifacts: dict[str, dict[str, Any]] = {}
    sidecars, zeroed, refused = [], {}, {}
    jobs = [(role, ckpt, roles[role], None) for role, ckpt in ckpts.items()]
    jobs += [(role, ckpts["student"], student_path, tome) for role, tome in tome_roles.items()]
    for role, ckpt, source, tome in jobs:
        original = build_from_checkpoint(ckpt, source).eval()
        if tome is not None:
            from edgekd.tome import apply_tome

            apply_tome(original, tome["r"], tome["matcher"] if tome["r"] else "exact", tome_bits)
        model = copy.deepcopy(original)
        zeroed[role] = zero_dead_channels(model)
        sample = torch.from_numpy(test_x[:1].copy())
        # parity is against the checkpoint as trained, before any rewrite. A merging file (a ToMe
        # schedule, or the student's own files when it was trained with merging) is held to a share
        # of top-1 agreement (>= 99 %), which 256 images cannot resolve (one image is 0.39 pt: a
        # 16-bit LSH file that agrees on 99.55 % of 2000 images agreed on 98.83 % of the first 256),
        # so it is compared on every test image it is scored on
        own = _trained_tome(ckpt) if role == "student" else None
        merges = tome is not None or bool(own and own["r"])
        reference = _logits(original, test_x if merges else test_x[:parity_images])
        if role == "student":
            role_variants = variants
        elif tome:  # a ToMe student: the files the ToMe bench compares
            role_variants = [v for v in variants if v in ("fp32", "int8")]
        else:  # the teacher: the reference the bench compares the student against
            role_variants = [v for v in variants if v == "fp32"]
        with tempfile.TemporaryDirectory(prefix=f".{role}-", dir=out_dir) as work:
            kw = dict(onnx="onnx" in formats, dynamic_batch=dynamic_batch, tflite=role_variants,
                      sample_images=torch.from_numpy(test_x[:20].copy()))
            role_converter = converter
            try:
                made = _convert(role, model, sample, calib_x, mean, std, Path(work) / "a", converter=converter, **kw)
            except EdgekdError as e:
                # auto: a graph onnx2tf cannot rewrite to NHWC (torchvision's ShuffleNet channel shuffle,
                # measured) goes through litert-torch instead, which converts the PyTorch graph itself
                if requested_converter != "auto" or converter != "onnx2tf" or not role_variants:
                    raise
                log.warning("%s: %s; converting it with litert-torch instead", role, e)
                fallbacks[role] = str(e)
                role_converter = "litert-torch"
                made = _convert(role, model, sample, calib_x, mean, std, Path(work) / "b", converter=role_converter,
                                **kw)
            scored: dict[str, tuple[Path, dict[str, Any]]] = {}
            for name, (tmp, fmt, convert_s) in made.items():
                logits = (onnx_runner if fmt == "onnx" else tflite_runner)(tmp)(test_x)  # parity + top-1, one pass
                parity = _parity(logits, reference)
                if fmt == "onnx":
                    try:
                        check_onnx_parity(name, parity, tome=merges)
                    except EdgekdError:
                        if tome is None:  # the student's own files are the deployable: no export without them
                            raise
                        # one refused ToMe schedule must not cost the hours of the others' conversions
                        refused[role] = (
                            f"{name} merges other tokens than PyTorch on too many images (top-1 agreement "
                            f"{parity['top1_agreement']:.2f} % of {parity['images']}, median |dlogit| "
                            f"{parity['median_rel_logit_diff']:.1e} of the logit scale; the rule is >= "
                            f"{TOME_MIN_AGREEMENT:g} % and <= {ONNX_MAX_REL_DIFF:g}); not written: use the exact "
                            "matcher, or more --tome-bits for lsh (a hash bit flips where a projection is near 0)")
                        log.warning("%s", refused[role])
                        break
                entry = {"model": role, **({"tome": tome} if tome else {}), "format": fmt,
                         "converter": "torch.onnx" if fmt == "onnx" else role_converter,
                         "size_bytes": tmp.stat().st_size, "convert_s": round(convert_s, 2), "parity": parity,
                         "test_top1": 100.0 * float((logits.argmax(1) == test_y).mean()),
                         "test_images": int(len(test_y))}
                if val_x is not None and role.startswith("student"):
                    val_logits = (onnx_runner if fmt == "onnx" else tflite_runner)(tmp)(val_x)
                    entry["val_top1"] = 100.0 * float((val_logits.argmax(1) == val_y).mean())
                if fmt.startswith("tflite"):
                    entry["io"] = tflite_io_details(tmp)
                scored[name] = (tmp, entry)
            if role in refused:  # nor any file an earlier export left under these names
                for name in [*made, f"{role}.model.json"]:
                    (out_dir / name).unlink(missing_ok=True)
                continue
            for name, (tmp, entry) in scored.items():
                with atomic_path(out_dir / name) as final:  # fsync + rename: never a half-written artifact
                    shutil.copyfile(tmp, final)
                artifacts[name] = entry
                log.info("%s: %s", name, {k: v for k, v in entry.items() if k != "io"})
        int8_io = artifacts.get(f"{role}_int8.tflite", {}).get("io")
        sidecar = out_dir / f"{role}.model.json"
        write_json(sidecar, {
            "model": role, "arch": ckpt["arch"], "class_names": ckpt["class_names"],
            "input_shape": [1, ckpt["in_channels"], ckpt["image_size"], ckpt["image_size"]], "layout": "NCHW",
            "input": "float32 (x/255 - mean) / std per channel; int8 files take that value quantised; "
                     "a TFLite file's own layout is in export.json (onnx2tf writes NHWC)",
            "mean": mean, "std": std,
            "int8_quantization": {"input": int8_io["input_quantization"], "output": int8_io["output_quantization"]}
            if int8_io else None,
            "tome": tome or own,
            "source_checkpoint": source.name, "source_sha256": _sha256(source),
            "edgekd_version": __version__, "artifacts": [n for n, a in artifacts.items() if a["model"] == role],
        })
        sidecars.append(sidecar)
    drop = None
    if "student_int8.tflite" in artifacts and "student_fp32.tflite" in artifacts:
        drop = artifacts["student_fp32.tflite"]["test_top1"] - artifacts["student_int8.tflite"]["test_top1"]
    report = {"schema": EXPORT_SCHEMA, "edgekd_version": __version__, "run_dir": str(run_dir),
              "converters": {"onnx": "torch.onnx (opset 17)",
                             "tflite": "litert-torch (PT2E int8)" if converter == "litert-torch" else "onnx2tf",
                             "tflite_fallback": {role: f"litert-torch (onnx2tf failed: {why})"
                                                 for role, why in fallbacks.items()}},
              "calibration_images": int(len(calib_x)) if calib_x is not None else 0,
              "samples": {"file": SAMPLES_FILE, "images": int(len(bench_y)), "split": "test", "order_seed": 0},
              "dead_channels_zeroed": zeroed, "int8_drop_top1": drop, "max_int8_drop": max_int8_drop,
              "artifacts": artifacts}
    if auto_report is not None:
        report["tome_auto"] = auto_report
    if refused:
        report["refused"] = refused
    write_json(out_dir / "export.json", report)
    return ExportResult(out_dir, report, drop, drop is not None and drop > max_int8_drop,
                        [out_dir / n for n in artifacts] + sidecars + [out_dir / "export.json"], refused)


def _logits(model: nn.Module, x: np.ndarray, batch: int = 250) -> np.ndarray:
    """PyTorch logits in batches (a 197-token ViT's attention over 2000 images at once is ~1 GB a block)."""
    with torch.no_grad():
        return torch.cat([model(torch.from_numpy(x[i:i + batch].copy())) for i in range(0, len(x), batch)]).numpy()


def _litert_interleaved_ms(paths: list[Path], runs: int = 200, threads: int = 1) -> list[float]:
    """Median ms of bare LiteRT ``invoke()`` calls per file, the files interleaved in blocks."""
    import statistics

    from ai_edge_litert.interpreter import Interpreter

    calls = []
    for p in paths:
        it = Interpreter(model_path=str(p), num_threads=threads)
        it.allocate_tensors()
        inp = it.get_input_details()[0]
        it.set_tensor(inp["index"], np.zeros(inp["shape"], inp["dtype"]))
        for _ in range(10):
            it.invoke()
        calls.append(it.invoke)
    times: list[list[int]] = [[] for _ in paths]
    for _ in range(10):
        for i, call in enumerate(calls):
            for _ in range(max(1, runs // 10)):
                t0 = time.perf_counter_ns()
                call()
                times[i].append(time.perf_counter_ns() - t0)
    return [statistics.median(t) / 1e6 for t in times]


def _choose_tome(ckpt: dict[str, Any], path: Path, data: Any, mean: list[float], std: list[float], converter: str,
                 calib_x: torch.Tensor | None, out_dir: Path, max_drop: float,
                 timer: Callable[[list[Path]], list[float]]) -> Any:
    """``--tome-r auto``: int8 files of r = 0 and the candidate schedules, timed by ``timer`` and
    scored on the validation split in LiteRT (the deployable's own numbers)."""
    from edgekd.tome import apply_tome
    from edgekd.tome.auto import candidate_schedules, choose_schedule

    if calib_x is None:
        raise EdgekdError("--tome-r auto times the int8 files: drop --no-int8")
    if len(data.val) == 0:
        raise EdgekdError("--tome-r auto chooses on the validation split, and this run has none: set "
                          "data.val_fraction > 0 and distil again")
    kw = ckpt.get("model_kwargs", {})
    depth, tokens = int(kw.get("depth", 4)), (ckpt["image_size"] // kw.get("patch_size", 4)) ** 2 + 1
    val_u8, val_y = gather(data.val)
    val_x = prepare_batch(val_u8, torch.tensor(mean), torch.tensor(std)).numpy()
    files: dict[tuple[int, ...], Path] = {}
    with tempfile.TemporaryDirectory(prefix=".tome-auto-", dir=out_dir) as work:
        def int8_file(schedule: list[int]) -> Path:
            if tuple(schedule) not in files:
                model = apply_tome(build_from_checkpoint(ckpt, path).eval(), schedule)
                zero_dead_channels(model)
                made = _convert("student", model, torch.from_numpy(val_x[:1].copy()), calib_x, mean, std,
                                Path(work) / f"r{'-'.join(map(str, schedule))}", onnx=False, dynamic_batch=False,
                                tflite=["int8"], converter=converter, sample_images=torch.from_numpy(val_x[:20].copy()))
                files[tuple(schedule)] = made["student_int8.tflite"][0]
            return files[tuple(schedule)]

        def val_top1(schedule: list[int]) -> float:
            logits = tflite_runner(int8_file(schedule))(val_x)
            return 100.0 * float((logits.argmax(1) == val_y.numpy()).mean())

        return choose_schedule(candidate_schedules(tokens, depth), depth,
                               lambda schedules: timer([int8_file(s) for s in schedules]), val_top1, max_drop)


def resolve_converter(converter: str, student_arch: str) -> str:
    """``auto``: onnx2tf, except litert-torch for a ViT student: onnx2tf's NCHW→NHWC rewriting
    mis-shapes the token matmuls of timm's ViT (it stops at blocks.0/attn/qkv/MatMul)."""
    if converter != "auto":
        return converter
    return "litert-torch" if student_arch == "vit" else "onnx2tf"


def _trained_tome(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The ToMe setting a ViT student was trained (and is exported) with, else None."""
    if ckpt["arch"] != "vit":
        return None
    return {"r": int(ckpt.get("model_kwargs", {}).get("tome_r", 0)), "matcher": "exact"}


def _tome_roles(ckpt: dict[str, Any], path: Path, rs: tuple[int, ...], matchers: tuple[str, ...],
                bits: int, tflite: bool = True) -> dict[str, dict[str, Any]]:
    """The ToMe variants to export: role name → {r, matcher, bits}. Checked before any conversion."""
    if not rs:
        return {}
    if ckpt["arch"] != "vit":
        raise EdgekdError(f"--tome-r/--tome-sweep need a vit student; {path} holds a {ckpt['arch']} "
                          "(distil with student.arch: vit, e.g. recipes/fashion_mnist_vit.yaml)")
    from edgekd.tome import MATCHERS, check_r
    from edgekd.tome.merge import BUCKET_SIZE

    for m in matchers:
        if m not in MATCHERS:
            raise EdgekdError(f"unknown ToMe matcher '{m}'; choose from {', '.join(MATCHERS)}")
    if set(matchers) - {"exact"} and bits < 1:
        raise EdgekdError("--tome-bits must be at least 1")
    if "bucketed" in matchers and tflite:
        # its sort lowers to a TFLite comparator on int64 that the converter refuses, and XNNPACK
        # would not run a TopK in its place: in LiteRT it could only be slower than exact matching
        raise EdgekdError("the bucketed ToMe matcher exports to ONNX only (its hash sort does not convert to "
                          "TFLite); export it with --formats onnx --no-int8, or use exact or lsh for TFLite")
    kw = ckpt.get("model_kwargs", {})
    tokens = (ckpt["image_size"] // kw.get("patch_size", 4)) ** 2 + 1
    trained = _trained_tome(ckpt)
    roles = {}
    for r in sorted(set(rs)):
        schedule = check_r(r, tokens, int(kw.get("depth", 4)))  # what each block merges (later ones clamped)
        for m in matchers:
            if trained and r == trained["r"] and m == trained["matcher"]:
                continue  # that is the student's own file
            if r == 0 and m != matchers[0]:
                continue  # r = 0 merges nothing: one unpatched file is enough
            roles[f"student-tome-r{r}-{m if r else 'none'}"] = {"r": r, "schedule": schedule,
                                                               "matcher": m if r else "none",
                                                               **({"bits": bits} if m != "exact" and r else {}),
                                                               **({"bucket_size": BUCKET_SIZE} if m == "bucketed" and r
                                                                  else {})}
    return roles


def _convert(role: str, model: nn.Module, sample: torch.Tensor, calib_x: torch.Tensor | None, mean: list[float],
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
            _check_loads(path, name)  # as for onnx2tf's files below: one line, not a traceback later
        made[name] = (path, fmt, seconds)
        return path

    if onnx or converter == "onnx2tf":
        onnx_file = timed(f"{role}.onnx", "onnx", lambda p: export_onnx(model, sample, p))
        if not onnx:
            del made[f"{role}.onnx"]
    if onnx and dynamic_batch:
        timed(f"{role}_dynamic.onnx", "onnx", lambda p: export_onnx(model, sample, p, dynamic_batch=True))
    if not tflite:
        return made
    if converter == "onnx2tf":
        t0 = time.perf_counter()
        files = convert_onnx2tf(onnx_file, work, calib_x if "int8" in tflite or "dynamic" in tflite else None,
                                mean, std, sample_images)
        seconds = time.perf_counter() - t0  # one run writes every variant
        for v in tflite:
            _check_loads(files[v], f"{role}_{v}.tflite")
            made[f"{role}_{v}.tflite"] = (files[v], f"tflite_{v}", seconds)
        return made
    if {"fp32", "fp16", "dynamic"} & set(tflite):  # fp16 and dynamic are made from the fp32 file
        fp32 = timed(f"{role}_fp32.tflite", "tflite_fp32", lambda p: export_tflite_fp32(model, sample, p))
    if "int8" in tflite:
        assert calib_x is not None
        timed(f"{role}_int8.tflite", "tflite_int8", lambda p: export_tflite_int8(model, sample, calib_x, p))
    for v in ("fp16", "dynamic"):
        if v in tflite:
            timed(f"{role}_{v}.tflite", f"tflite_{v}", lambda p, k=v: quantize_weights(fp32, p, k))
    if "fp32" not in tflite:
        made.pop(f"{role}_fp32.tflite", None)
    return made


def _check_loads(path: Path, name: str) -> None:
    """A converted file LiteRT cannot prepare is a conversion failure (onnx2tf wrote int8 tensors
    with an infinite scale for a torchvision MNASNet, measured), reported in one line."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        Interpreter(model_path=str(path), num_threads=1).allocate_tensors()
    except (RuntimeError, ValueError) as e:
        first = " ".join(str(e).split())[:160]
        raise EdgekdError(f"the converter wrote {name}, and LiteRT cannot load it: {first}") from None


def _check_imports(formats: tuple[str, ...], tflite: bool, converter: str) -> None:
    import importlib.util

    needed = list(("onnx", "onnxruntime") if "onnx" in formats or converter == "onnx2tf" else ())
    if tflite:
        needed += ["ai_edge_litert"] + (["litert_torch", "ai_edge_quantizer"] if converter == "litert-torch"
                                        else ["onnx2tf", "tensorflow"])
    for mod in needed:
        if importlib.util.find_spec(mod) is None:
            raise EdgekdError(f"export needs the '{mod}' package: pip install 'edgekd[export]'")
