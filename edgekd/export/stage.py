"""``export(run_dir) -> ExportResult``: ONNX and TFLite (fp32, full-integer int8) artifacts of a
distil run, each checked against PyTorch and scored on the test set in its own runtime, into
``RUN/export``: the deployable, which benches on its own once copied elsewhere.

The plan reads the checkpoints and the recipe they carry (``_plan``), the inputs are the run's
own test, validation and calibration images (``_inputs``), then each model is converted
(``convert``), scored and held to its parity rule (``score``), and written with its sidecar
and export.json (``report``). ToMe variants of a ViT student are planned by ``tome``.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from edgekd import artifacts
from edgekd.checkpoint import atomic_path, load_checkpoint
from edgekd.data import gather, load_dataset
from edgekd.errors import EdgekdError
from edgekd.export.convert import (CONVERTERS, check_imports, check_loads, convert_model, resolve_converter,
                                   zero_dead_channels)
from edgekd.export.int8_limits import fit_hard_swish_scales
from edgekd.export.report import write_export_report, write_sidecar
from edgekd.export.score import (check_onnx_parity, onnx_runner, parity, tflite_io_details, tflite_runner,
                                 tied_top1_agreement, torch_logits)
from edgekd.export.tome import auto_role, check_tome_threads, refusal, tome_roles, trained_tome
from edgekd.models import build_from_checkpoint
from edgekd.recipe import ExportConfig, recipe_from_dict
from edgekd.train import prepare_batch

log = logging.getLogger(__name__)
_DEFAULTS = ExportConfig()  # the recipe's export: section is the one source of these defaults
QAT_MIN_AGREEMENT = 99.0  # top-1 agreement of a QAT int8 file with its fake-quant graph, percent
# ... counting a class within this many output steps (int8 LSBs) of the fake-quant top one: LiteRT's
# int8 kernels requantise each op in fixed point, PyTorch's fake-quant in float, and the two round
# an op's output differently by up to 1 LSB (measured, tiny MobileNetV2: PT2E's converted graph
# matches the fake-quant on 100 % of images, the TFLite file differs by <= 3 LSB on 99 % of logits)
QAT_LSB_TOLERANCE = 4


@dataclass
class ExportResult:
    export_dir: Path
    report: dict[str, Any]
    int8_drop: float | None = None
    int8_drop_exceeded: bool = False
    files: list[Path] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # ToMe role -> why its files were not written


@dataclass
class _Job:
    """One model to export: the student, the teacher, or a ToMe variant of the student."""

    role: str
    ckpt: dict[str, Any]
    source: Path
    tome: dict[str, Any] | None
    variants: list[str]  # TFLite variants: fp32, fp16, dynamic, int8


@dataclass
class _Plan:
    run_dir: Path
    out_dir: Path
    jobs: list[_Job]
    converter: str  # as resolved for the student
    fallback_ok: bool  # converter auto: a graph onnx2tf refuses goes through litert-torch
    onnx: bool
    dynamic_batch: bool
    tome_bits: int
    qat: Path | None = None  # student_qat_best.pt: the int8 student comes from its trained fake-quant graph


@dataclass
class _Inputs:
    data: Any
    test_x: np.ndarray
    test_y: np.ndarray
    calib_x: torch.Tensor | None
    val_x: np.ndarray | None  # validation top-1 chooses ToMe schedules (a ViT) and search candidates
    val_y: np.ndarray | None
    samples: int


def export(run_dir: str | Path, *, formats: tuple[str, ...] = tuple(_DEFAULTS.formats), int8: bool = _DEFAULTS.int8,
           calib: int = _DEFAULTS.calib, max_int8_drop: float = _DEFAULTS.max_int8_drop, dynamic_batch: bool = False,
           parity_images: int = 256, converter: str = _DEFAULTS.converter, samples: int = _DEFAULTS.samples,
           tome_r: tuple[int, ...] = (), tome_matchers: tuple[str, ...] = ("exact",), tome_bits: int = 16,
           tome_auto: bool = False, tome_max_drop: float = 0.5, tome_threads: int = 1,
           tome_timer: Callable[[list[Path]], list[float]] | None = None, val: bool = False) -> ExportResult:
    """Export the student (and the teacher, when the run trained one) of ``run_dir``.

    ``formats``: onnx, tflite (fp32), fp16, dynamic; ``int8`` adds the full-integer student; the
    teacher gets ONNX and fp32 TFLite only (the bench compares the student against it).
    ``converter``: onnx2tf, litert-torch, or auto (onnx2tf; litert-torch for ViT students and for
    a graph onnx2tf refuses). ``samples`` test images go into ``samples.npz`` for the bench.
    ``tome_r`` (ViT students): for each r and each of ``tome_matchers`` (exact, lsh with ``tome_bits``
    bits) also ``student-tome-r{r}-{matcher}`` files; ``tome_auto`` (``--tome-r auto``): the schedule
    timed fastest on this host by ``tome_timer`` (LiteRT at ``tome_threads`` threads) within
    ``tome_max_drop`` validation points of r = 0, exported as ``student-tome-auto-exact``.
    ``val``: score the student's files on the validation images too (a ViT's always are); a
    search chooses on them.
    """
    plan = _plan(Path(run_dir), formats, int8, calib, converter, samples, dynamic_batch, tome_r, tome_matchers,
                 tome_bits, tome_auto, tome_threads)
    inputs = _inputs(plan, calib if int8 and plan.qat is None else 0, samples, val)
    auto = None
    if tome_auto:
        student = plan.jobs[0]
        auto, role = auto_role(student.ckpt, student.source, inputs.data, plan.converter, inputs.calib_x,
                               plan.out_dir, tome_max_drop, tome_threads, tome_timer)
        plan.jobs += [_Job(name, student.ckpt, student.source, tome, [v for v in student.variants
                                                                       if v in ("fp32", "int8")])
                      for name, tome in role.items()]
    files: dict[str, dict[str, Any]] = {}
    sidecars, zeroed, refused, fallbacks = [], {}, {}, {}
    for job in plan.jobs:
        written, zeroed[job.role], why = _export_model(plan, inputs, job, parity_images, fallbacks)
        if why:
            refused[job.role] = why
            continue
        files |= written
        own = trained_tome(job.ckpt) if job.role == "student" else None
        sidecars.append(write_sidecar(plan.out_dir, job.role, job.ckpt, job.source, job.tome or own, files))
    calib_n = int(len(inputs.calib_x)) if inputs.calib_x is not None else 0
    report = write_export_report(plan.out_dir, plan.run_dir, plan.converter, fallbacks, calib_n, inputs.samples,
                                 zeroed, max_int8_drop, files, auto, refused)
    drop = report["int8_drop_top1"]
    return ExportResult(plan.out_dir, report, drop, drop is not None and drop > max_int8_drop,
                        [plan.out_dir / n for n in files] + sidecars + [plan.out_dir / artifacts.EXPORT_REPORT],
                        refused)


def _plan(run_dir: Path, formats: tuple[str, ...], int8: bool, calib: int, converter: str, samples: int,
          dynamic_batch: bool, tome_r: tuple[int, ...], tome_matchers: tuple[str, ...], tome_bits: int,
          tome_auto: bool, tome_threads: int) -> _Plan:
    """What to export, checked before anything is converted: every bad flag is one line here."""
    unknown = [f for f in formats if f not in artifacts.FORMATS]
    if unknown:
        raise EdgekdError(f"unknown format '{unknown[0]}'; choose from {', '.join(artifacts.FORMATS)}")
    if converter not in CONVERTERS:
        raise EdgekdError(f"unknown converter '{converter}'; choose from {', '.join(CONVERTERS)}")
    student_path = run_dir / artifacts.best_checkpoint("student")
    if not student_path.is_file():
        raise EdgekdError(f"{run_dir}: no {student_path.name}; run 'edgekd distill RECIPE --out {run_dir}' first")
    if calib < 1:
        raise EdgekdError("--calib must be at least 1 image")
    if samples < 1:
        raise EdgekdError("--samples must be at least 1 image")
    if tome_auto:
        check_tome_threads(tome_threads)
    variants = [artifacts.TFLITE_VARIANTS[f] for f in formats if f in artifacts.TFLITE_VARIANTS]
    variants += ["int8"] if int8 else []
    student = load_checkpoint(student_path)
    resolved = resolve_converter(converter, student["arch"])
    check_imports(formats, int8, resolved)
    jobs = [_Job("student", student, student_path, None, variants)]
    teacher_path = run_dir / artifacts.best_checkpoint("teacher")
    if teacher_path.is_file():  # the reference the bench compares the student against
        jobs.append(_Job("teacher", load_checkpoint(teacher_path), teacher_path, None,
                         [v for v in variants if v == "fp32"]))
    for role, tome in tome_roles(student, student_path, tome_r, tome_matchers, tome_bits,
                                 tflite=bool(variants)).items():  # the files the ToMe bench compares
        jobs.append(_Job(role, student, student_path, tome, [v for v in variants if v in ("fp32", "int8")]))
    out_dir = run_dir / artifacts.EXPORT_DIR
    if out_dir.exists() and not out_dir.is_dir():
        raise EdgekdError(f"{out_dir} is a file, not a folder; move it away so export can write there")
    qat = run_dir / artifacts.best_checkpoint(artifacts.QAT_ROLE)
    return _Plan(run_dir, out_dir, jobs, resolved, converter == "auto" and resolved == "onnx2tf",
                 "onnx" in formats, dynamic_batch, tome_bits, qat if int8 and qat.is_file() else None)


def _inputs(plan: _Plan, calib: int, samples: int, val: bool) -> _Inputs:
    """The run's own images, normalised as it trained: test (parity and scores), calibration
    (the first ``calib`` training images), validation for a ViT or ``val``; writes samples.npz for
    the bench."""
    student = plan.jobs[0].ckpt
    recipe = recipe_from_dict(student["recipe"])
    data = load_dataset(recipe.data, recipe.seed)
    mean, std = torch.tensor(student["mean"]), torch.tensor(student["std"])
    test_u8, test_y = gather(data.test)
    calib_x = None
    if calib:
        calib_u8, _ = gather(data.train, calib, seed=0)
        if len(calib_u8) == 0:
            raise EdgekdError(f"{plan.run_dir}: no training images to calibrate int8 with; check the recipe's data "
                              "section")
        calib_x = prepare_batch(calib_u8, mean, std)
    val_x = val_y = None
    if (val or student["arch"] == "vit") and len(data.val):
        val_u8, val_labels = gather(data.val)
        val_x, val_y = prepare_batch(val_u8, mean, std).numpy(), val_labels.numpy()
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    bench_u8, bench_y = gather(data.test, samples, seed=0)
    with atomic_path(plan.out_dir / artifacts.SAMPLES) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=bench_u8.numpy().astype(np.uint8), labels=bench_y.numpy().astype(np.int64))
    return _Inputs(data, prepare_batch(test_u8, mean, std).numpy(), test_y.numpy(), calib_x, val_x, val_y,
                   int(len(bench_y)))


def _export_model(plan: _Plan, inputs: _Inputs, job: _Job, parity_images: int,
                  fallbacks: dict[str, str]) -> tuple[dict[str, dict[str, Any]], int, str | None]:
    """Convert, score and write one model's files: (name -> export.json entry, dead channels
    zeroed, why a ToMe variant was refused or None)."""
    original = build_from_checkpoint(job.ckpt, job.source).eval()
    if job.tome is not None:
        from edgekd.tome import apply_tome

        apply_tome(original, job.tome["r"], job.tome["matcher"] if job.tome["r"] else "exact", plan.tome_bits)
    model = copy.deepcopy(original)
    zeroed = zero_dead_channels(model)
    # parity is against the checkpoint as trained, before any rewrite. A merging file (a ToMe
    # schedule, or the student's own files when it was trained with merging) is held to a share
    # of top-1 agreement (>= 99 %), which 256 images cannot resolve (one image is 0.39 pt: a
    # 16-bit LSH file that agrees on 99.55 % of 2000 images agreed on 98.83 % of the first 256),
    # so it is compared on every test image it is scored on
    own = trained_tome(job.ckpt) if job.role == "student" else None
    merges = job.tome is not None or bool(own and own["r"])
    reference = torch_logits(original, inputs.test_x if merges else inputs.test_x[:parity_images])
    with tempfile.TemporaryDirectory(prefix=f".{job.role}-", dir=plan.out_dir) as work:
        qat = plan.qat if job.role == "student" else None
        ptq_job = replace(job, variants=[v for v in job.variants if v != "int8"]) if qat else job
        made = _convert_with_fallback(plan, inputs, ptq_job, model, Path(work), fallbacks)
        qat_reference = None
        if qat is not None:  # the int8 file from the trained fake-quant graph, held to agree with it
            name = artifacts.tflite_file(job.role, "int8")
            path, qat_reference, seconds = _qat_int8(qat, job, inputs, Path(work) / name)
            made[name] = (path, "tflite_int8", seconds, "litert-torch (PT2E QAT)")
        scored, why = _score(made, inputs, job, reference, merges, qat_reference)
        if why:  # nor any file an earlier export left under these names
            for name in [*made, artifacts.sidecar(job.role)]:
                (plan.out_dir / name).unlink(missing_ok=True)
            return {}, zeroed, why
        for name, (tmp, entry) in scored.items():
            with atomic_path(plan.out_dir / name) as final:  # fsync + rename: never a half-written artifact
                shutil.copyfile(tmp, final)
            log.info("%s: %s", name, {k: v for k, v in entry.items() if k != "io"})
    return {name: entry for name, (_, entry) in scored.items()}, zeroed, None


def _convert_with_fallback(plan: _Plan, inputs: _Inputs, job: _Job, model: torch.nn.Module, work: Path,
                           fallbacks: dict[str, str]) -> dict[str, tuple[Path, str, float, str]]:
    """Every file of one model, converted into ``work``: name -> (file, format, seconds, converter)."""
    kw = dict(onnx=plan.onnx, dynamic_batch=plan.dynamic_batch, tflite=job.variants,
              sample_images=torch.from_numpy(inputs.test_x[:20].copy()))
    sample, mean, std = torch.from_numpy(inputs.test_x[:1].copy()), job.ckpt["mean"], job.ckpt["std"]
    converter = plan.converter
    try:
        made = convert_model(job.role, model, sample, inputs.calib_x, mean, std, work / "a", converter=converter, **kw)
    except EdgekdError as e:
        # auto: a graph onnx2tf cannot rewrite to NHWC (torchvision's ShuffleNet channel shuffle,
        # measured) goes through litert-torch instead, which converts the PyTorch graph itself
        if not plan.fallback_ok or not job.variants:
            raise
        log.warning("%s: %s; converting it with litert-torch instead", job.role, e)
        fallbacks[job.role] = str(e)
        converter = "litert-torch"
        made = convert_model(job.role, model, sample, inputs.calib_x, mean, std, work / "b", converter=converter,
                             **kw)
    return {name: (*m, "torch.onnx" if m[1] == "onnx" else converter) for name, m in made.items()}


def _qat_int8(qat_path: Path, job: _Job, inputs: _Inputs, path: Path) -> tuple[Path, np.ndarray, float]:
    """The QAT student's int8 file, its fake-quant graph's own logits on the test images (the
    reference the file must agree with) and the conversion time."""
    from edgekd.qat import export_int8, prepare_qat

    state = load_checkpoint(qat_path)
    info = state["qat"]
    sample = torch.from_numpy(inputs.test_x[:1].copy())
    student = prepare_qat(build_from_checkpoint(job.ckpt, job.source), info["taps"], sample,
                          freeze_bn_step=info["freeze_bn_step"], freeze_observer_step=info["freeze_observer_step"])
    student.load_state_dict(state["state_dict"])
    reference = torch_logits(student.eval(), inputs.test_x)
    t0 = time.perf_counter()
    try:
        export_int8(student, sample, path)
    except Exception as e:  # noqa: BLE001 - a converter failure is one line for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise EdgekdError(f"converting the QAT student to int8 TFLite failed: {type(e).__name__}: {first}") from None
    fit_hard_swish_scales(path)
    check_loads(path, path.name)
    return path, reference, time.perf_counter() - t0


def _score(made: dict[str, tuple[Path, str, float, str]], inputs: _Inputs, job: _Job, reference: np.ndarray,
           merges: bool, qat_reference: np.ndarray | None = None) -> tuple[dict[str, tuple[Path, dict[str, Any]]],
                                                                            str | None]:
    """Each file's parity with PyTorch and its test (and validation) top-1, in its own runtime. A
    QAT int8 file is compared with the fake-quant graph it was converted from, and must agree
    with it on top-1 (within ``QAT_LSB_TOLERANCE`` int8 steps) for at least ``QAT_MIN_AGREEMENT`` %
    of the test images."""
    scored: dict[str, tuple[Path, dict[str, Any]]] = {}
    for name, (tmp, fmt, convert_s, converter) in made.items():
        runner = onnx_runner if fmt == "onnx" else tflite_runner
        logits = runner(tmp)(inputs.test_x)  # parity + top-1, one pass
        qat = fmt == "tflite_int8" and qat_reference is not None
        agreement = parity(logits, qat_reference if qat else reference)
        io = tflite_io_details(tmp) if fmt.startswith("tflite") else None
        if fmt == "tflite_int8" and io["float_ops"]:  # it runs, but is not the full-integer file asked for
            log.warning("%s (%s) is not full-integer: %d ops stay float32 between QUANTIZE/DEQUANTIZE (%s); "
                        "export.json io.float_ops lists them",
                        name, converter, sum(io["float_ops"].values()), ", ".join(io["float_ops"]))
        if qat:
            lsb = io["output_quantization"]["scale"]
            agreement |= {"top1_agreement_ties": tied_top1_agreement(logits, qat_reference),
                          "top1_agreement_within_lsb": tied_top1_agreement(logits, qat_reference,
                                                                           QAT_LSB_TOLERANCE * lsb),
                          "agreement_lsb_tolerance": QAT_LSB_TOLERANCE,
                          "median_abs_logit_diff_lsb": agreement["median_abs_logit_diff"] / lsb}
            if agreement["top1_agreement_within_lsb"] < QAT_MIN_AGREEMENT:
                raise EdgekdError(f"{name} agrees with the QAT model's fake-quant output on "
                                  f"{agreement['top1_agreement_within_lsb']:.2f} % of {agreement['images']} test "
                                  f"images within {QAT_LSB_TOLERANCE} int8 steps (the rule is >= "
                                  f"{QAT_MIN_AGREEMENT:g} %): the int8 kernels round each op within a step "
                                  "of the fake-quant graph, and this student grows those steps into other top-1 "
                                  "classes, so the file is not the model QAT trained; a student trained steadier "
                                  "agrees (timm MobileNetV3 and ShuffleNetV2: train.clip_grad_norm: 1.0, as the "
                                  "fashion_mnist_mobilenetv3 recipe trains), or export post-training int8 "
                                  "(distill.qat.epochs: 0, or --qat-epochs 0 on a new --out)")
        if fmt == "onnx":
            try:
                check_onnx_parity(name, agreement, tome=merges)
            except EdgekdError:
                if job.tome is None:  # the student's own files are the deployable: no export without them
                    raise
                # one refused ToMe schedule must not cost the hours of the others' conversions
                log.warning("%s", refusal(name, agreement))
                return scored, refusal(name, agreement)
        entry = {"model": job.role, **({"tome": job.tome} if job.tome else {}), "format": fmt,
                 "converter": converter, "size_bytes": tmp.stat().st_size, "convert_s": round(convert_s, 2),
                 "parity": agreement, "test_top1": 100.0 * float((logits.argmax(1) == inputs.test_y).mean()),
                 "test_images": int(len(inputs.test_y)),
                 **({"quantization": "qat" if qat else "ptq"} if fmt == "tflite_int8" else {}),
                 **({"parity_reference": "the QAT model's fake-quant output"} if qat else {})}
        if inputs.val_x is not None and job.role.startswith("student"):
            entry["val_top1"] = 100.0 * float((runner(tmp)(inputs.val_x).argmax(1) == inputs.val_y).mean())
        if fmt.startswith("tflite"):
            entry["io"] = io
        scored[name] = (tmp, entry)
    return scored, None
