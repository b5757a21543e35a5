"""``distill(recipe, out_dir) -> DistillResult``: train (or load) the teacher, distil the
student, and write checkpoints, ``metrics.json``, ``log.csv`` and plots into ``out_dir``.

Each epoch ends with an atomic ``<role>_last.pt`` (everything needed to resume) and, when
validation top-1 improves, ``<role>_best.pt`` (weights + recipe + classes + normalisation).
A run killed at any moment resumes from its last finished epoch with ``resume=True``; batch
order, augmentation and dropout are seeded by ``(seed, role, epoch)``, so the resumed run
follows the uninterrupted one.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import logging
import os
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
import yaml

from edgekd import __version__, artifacts
from edgekd.augment import get_augmentor
from edgekd.augment.hard import HardTraining
from edgekd.checkpoint import load_checkpoint, save_checkpoint, write_json, write_text
from edgekd.data import DataBundle, load_dataset
from edgekd.distiller import Distiller
from edgekd.losses.methods import METHODS, TERMS, get_method
from edgekd.errors import EdgekdError
from edgekd.models import build_from_checkpoint, build_model, count_params, pair_stages, stage_shapes, tap_candidates
from edgekd.models.dead_channels import QAT_REL_VAR, zero_dead_channels
from edgekd.models.resize import resize_input
from edgekd.models.weights import load_weights
from edgekd.recipe import Recipe, recipe_from_dict
from edgekd.distributed import World, barrier, init
from edgekd.report import plot_augmentors, write_plots
from edgekd.train import unwrap, evaluate, make_optimizer, make_scheduler, predict, prepare_batch, train_one_epoch

log = logging.getLogger(__name__)
QAT_ROLE = artifacts.QAT_ROLE
_RESUME_IGNORED = {("train", "device"), ("export",), ("bench",), ("gate",), ("search",)}  # not training
# QAT comes after the float epochs: a finished float run may take QAT on afterwards (resume, or
# `edgekd run` again with --qat-epochs), its float checkpoints as they are
_FLOAT_RESUME_IGNORED = _RESUME_IGNORED | {("distill", "qat")}


class Progress(Protocol):
    """What the trainer reports while it runs; the CLI draws it, tests may ignore it."""

    def start(self, label: str, total: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def end_epoch(self, role: str, row: dict[str, float]) -> None: ...


class _NoProgress:
    def start(self, label: str, total: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def end_epoch(self, role: str, row: dict[str, float]) -> None: ...


@dataclass
class DistillResult:
    run_dir: Path
    metrics: dict[str, Any]
    teacher_checkpoint: Path | None
    student_checkpoint: Path
    files: list[Path] = field(default_factory=list)

    @property
    def student_top1(self) -> float:
        return self.metrics["student"]["test_top1"]

    @property
    def teacher_top1(self) -> float | None:
        return self.metrics["teacher"]["test_top1"] if self.metrics["teacher"] else None


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise EdgekdError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class _Ctx:
    recipe: Recipe
    data: DataBundle
    device: torch.device
    run_dir: Path
    resume: bool
    progress: Progress
    mean: torch.Tensor
    std: torch.Tensor
    world: World = World()
    weights_loaded: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> LoadReport.as_dict()
    teacher_image_size: int | None = None  # a teacher checkpoint of another size than the data's

    def eval_kwargs(self) -> dict[str, Any]:
        return dict(mean=self.mean, std=self.std, batch_size=self.recipe.train.eval_batch_size, device=self.device)


def _model_meta(ctx: _Ctx, role: str, arch: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {
        "role": role, "arch": arch, "model_kwargs": kwargs, "num_classes": ctx.data.num_classes,
        "in_channels": ctx.data.channels, "image_size": ctx.data.image_size,
        "class_names": ctx.data.class_names, "mean": ctx.data.mean, "std": ctx.data.std,
        "recipe": ctx.recipe.model_dump(), "edgekd_version": __version__,
    }


def _recipe_diff(a: dict, b: dict, prefix: tuple = (),
                 ignored: set[tuple[str, ...]] = _RESUME_IGNORED) -> tuple[str, Any, Any] | None:
    for k in sorted(set(a) | set(b)):
        key = prefix + (k,)
        if key in ignored:
            continue
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            d = _recipe_diff(va, vb, key, ignored)
            if d:
                return d
        elif va != vb:
            return ".".join(key), va, vb
    return None


def resume_difference(started: Recipe, recipe: Recipe, *,
                      qat_checkpoint: bool = False) -> tuple[str, Any, Any] | None:
    """The first key (dotted) where ``recipe`` differs from the one a run was started with, and the
    two values; keys that do not change training are no difference. Nor is QAT added to a run
    started without it, except to a QAT checkpoint's own check (``qat_checkpoint``)."""
    qat_added = started.distill.qat.epochs == 0 and not qat_checkpoint
    return _recipe_diff(started.model_dump(), recipe.model_dump(),
                        ignored=_FLOAT_RESUME_IGNORED if qat_added else _RESUME_IGNORED)


def _fit(ctx: _Ctx, role: str, model: nn.Module, arch: str, model_kwargs: dict[str, Any],
         make_distiller: Callable[[nn.Module], Distiller], epochs: float, lr: float,
         hard: HardTraining | None = None, meta_extra: dict[str, Any] | None = None) -> list[dict[str, float]]:
    """Train ``model`` in place for ``epochs`` (with HARD when ``hard`` is given; a fraction of an
    epoch ends that many steps in); leaves the best-validation weights loaded."""
    cfg = ctx.recipe.train
    if ctx.device.type == "cuda":
        model.to(memory_format=torch.channels_last)  # with bf16, the fast layout for cuDNN convolutions
    distiller = make_distiller(model).to(ctx.device)
    if ctx.world.size > 1:  # what trains is wrapped in DDP (its gradients are averaged across ranks)
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        distiller.student = DDP(distiller.student, device_ids=ids)
        if distiller.regressors is not None:
            distiller.regressors = DDP(distiller.regressors, device_ids=ids)
    # One graph for the student's forward, the frozen teacher's forward, the taps and the loss terms;
    # the optimizer step stays eager. The module is shared, so checkpoints read the same weights.
    # (a QAT graph is already an exported graph: it trains eagerly)
    compiled = cfg.compile and role != QAT_ROLE
    step = torch.compile(distiller, backend=cfg.compile_backend) if compiled else distiller
    opt = make_optimizer(distiller.trainable_parameters(), cfg, lr)
    steps = max(1, len(ctx.data.train) // cfg.batch_size) if len(ctx.data.train) >= cfg.batch_size else 1
    sched = make_scheduler(opt, cfg, lr, round(epochs * steps))
    last_path = ctx.run_dir / artifacts.last_checkpoint(role)
    best_path = ctx.run_dir / artifacts.best_checkpoint(role)
    history, best_val, start = _resume(ctx, last_path, model, distiller, hard, opt, sched)
    if start:
        log.info("%s: resuming after epoch %d of %d", role, start, epochs)
    meta = {**_model_meta(ctx, role, arch, model_kwargs), **(meta_extra or {})}
    # The baseline sees exactly the student's batches, augmentation and dropout: same seed.
    role_seed = ctx.recipe.seed * 1000 + {"teacher": 0, QAT_ROLE: 700}.get(role, 500)
    # the teacher's terms of the student (and the baseline's, which has none) ramp up from 0
    warmup_steps = round(ctx.recipe.distill.warmup_epochs * steps) if role in ("student", "baseline") else 0
    for epoch in range(start, math.ceil(epochs)):
        last_steps = round((epochs - epoch) * steps) if epoch + 1 > epochs else None  # a fraction of an epoch
        if cfg.patience and _epochs_since_best(history) >= cfg.patience:
            log.info("%s: validation top-1 has not improved for %d epochs: stopping after epoch %d",
                     role, cfg.patience, epoch)
            break
        ctx.progress.start(f"{role} {epoch + 1}/{epochs:g}", len(ctx.data.train))
        row: dict[str, float] = {"epoch": epoch + 1}
        row.update(train_one_epoch(
            step, ctx.data.train, opt, sched, mean=ctx.mean, std=ctx.std, aug=ctx.recipe.data.augment,
            batch_size=cfg.batch_size, device=ctx.device, seed=role_seed + epoch, hard=hard, world=ctx.world,
            first_step=epoch * steps, warmup_steps=warmup_steps, on_batch=ctx.progress.advance, max_steps=last_steps,
        ))
        if not math.isfinite(row["loss"]):
            raise EdgekdError(f"{role}: the training loss became {row['loss']} in epoch {epoch + 1}; lower train.lr "
                              f"(now {lr:g}){' or teacher.lr' if role == 'teacher' else ''} and start again")
        row["val_top1"] = evaluate(model, ctx.data.val, **ctx.eval_kwargs())["top1"]
        row["test_top1"] = evaluate(model, ctx.data.test, **ctx.eval_kwargs())["top1"]
        history.append(row)
        val = row["val_top1"] if not math.isnan(row["val_top1"]) else float(epoch)  # no val: keep the last
        improved = val > best_val
        best_val = max(val, best_val)
        if ctx.world.main:  # every rank holds the same weights; one writes them
            if improved:
                save_checkpoint(best_path, {**meta, "state_dict": model.state_dict(), "epoch": epoch + 1,
                                            "val_top1": row["val_top1"]})
            save_checkpoint(last_path, {
                **meta, "state_dict": model.state_dict(), "epoch": epoch + 1, "history": history,
                "best_val": best_val, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "regressors": unwrap(distiller.regressors).state_dict() if distiller.regressors is not None else {},
                "hard": hard.state_dict() if hard is not None else {},
            })
            _write_log(ctx.run_dir, role, history)
        barrier()
        log.info("%s epoch %d: %s", role, epoch + 1, {k: round(v, 4) for k, v in row.items()})
        ctx.progress.end_epoch(role, row)
    distiller.remove_taps()
    model.load_state_dict(load_checkpoint(best_path)["state_dict"])
    return history


def _resume(ctx: _Ctx, last_path: Path, model: nn.Module, distiller: Distiller, hard: HardTraining | None,
            opt: Any, sched: Any) -> tuple[list[dict[str, float]], float, int]:
    """Load ``<role>_last.pt`` into the model, the regressors, HARD, the optimizer and the
    schedule when resuming: (history, best validation top-1, epochs done); else a fresh start."""
    if not (ctx.resume and last_path.is_file()):
        return [], -math.inf, 0
    state = load_checkpoint(last_path)
    # Through the model first: a key added since (with its default) is not a difference.
    diff = resume_difference(recipe_from_dict(state["recipe"]), ctx.recipe,
                             qat_checkpoint=last_path.name == artifacts.last_checkpoint(QAT_ROLE))
    if diff:
        raise EdgekdError(f"{ctx.run_dir} was started with another recipe (key '{diff[0]}': {diff[1]!r} -> "
                          f"{diff[2]!r}); resume with the same recipe or pick a new --out")
    model.load_state_dict(state["state_dict"])
    if distiller.regressors is not None:
        unwrap(distiller.regressors).load_state_dict(state["regressors"])
    if hard is not None:
        hard.load_state_dict(state["hard"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return list(state["history"]), state["best_val"], state["epoch"]


def _epochs_since_best(history: list[dict[str, float]]) -> int:
    """Epochs since the best validation top-1 (0 when the last epoch was the best). Read from the
    history, so a resumed run stops exactly where the uninterrupted one would."""
    vals = [h["val_top1"] for h in history if not math.isnan(h["val_top1"])]
    if not vals:
        return 0
    best = max(range(len(vals)), key=lambda i: (vals[i], -i))  # the first epoch that reached the best
    return len(vals) - 1 - best


_LOG_COLUMNS = ["role", "epoch", "loss", *[f"loss_{t}" for t in TERMS], "train_top1", "val_top1", "test_top1",
                "img_per_s", "wall_s", "lr",
                "hard_student_iters", "hard_augmentor_iters", "hard_switches", "hard_pool"]  # HARD runs only


def _write_log(run_dir: Path, role: str, history: list[dict[str, float]]) -> None:
    """Rewrite log.csv from the histories of both roles (atomic, so always complete)."""
    path = run_dir / "log.csv"
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["role"] != role]
    rows += [{"role": role, **h} for h in history]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_LOG_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def _teacher(ctx: _Ctx, needs_teacher: bool) -> tuple[nn.Module | None, list[dict[str, float]], str]:
    tcfg, data = ctx.recipe.teacher, ctx.data
    if tcfg.checkpoint:
        ckpt = load_checkpoint(tcfg.checkpoint)
        if ckpt.get("arch") != tcfg.arch:
            raise EdgekdError(f"teacher checkpoint {tcfg.checkpoint} is a {ckpt.get('arch')}, the recipe says "
                              f"teacher.arch: {tcfg.arch}; set teacher.arch to match")
        if list(ckpt.get("class_names", [])) != data.class_names:
            raise EdgekdError(
                f"teacher checkpoint {tcfg.checkpoint} was trained on {len(ckpt.get('class_names', []))} other "
                f"classes than this data's {data.num_classes}; train a teacher on this dataset (unset teacher.checkpoint)")
        if ckpt.get("in_channels") != data.channels:
            raise EdgekdError(
                f"teacher checkpoint {tcfg.checkpoint} takes {ckpt.get('in_channels')}-channel input, the data has "
                f"{data.channels}; use a teacher trained on this dataset (unset teacher.checkpoint)")
        model = build_from_checkpoint(ckpt, tcfg.checkpoint).to(ctx.device)
        if ckpt.get("image_size") != data.image_size:  # it keeps its own size: each batch is resized for it
            ctx.teacher_image_size = int(ckpt["image_size"])
            resize_input(model, ctx.teacher_image_size)
            log.info("teacher: trained at %s px, the student at %d px: batches are resized for the teacher",
                     ckpt["image_size"], data.image_size)
        return model, [], f"checkpoint:{tcfg.checkpoint}"
    if tcfg.epochs == 0 and not tcfg.pretrained and not tcfg.weights:
        if needs_teacher:
            raise EdgekdError("the method needs a teacher: set teacher.epochs > 0, teacher.weights or "
                              "teacher.checkpoint")
        return None, [], "none"
    kwargs = {"width": tcfg.width, "pretrained": tcfg.pretrained}
    torch.manual_seed(ctx.recipe.seed)
    model = build_model(tcfg.arch, data.num_classes, data.channels, data.image_size, **kwargs)
    if tcfg.weights:  # the user's own weights; with epochs > 0 they are fine-tuned (a new head if needed)
        ctx.weights_loaded["teacher"] = load_weights(model, tcfg.weights, role="teacher", arch=tcfg.arch,
                                                     new_head_ok=tcfg.epochs > 0, key=tcfg.weights_key).as_dict()
    model = model.to(ctx.device)
    kwargs["pretrained"] = False  # the checkpoint holds the weights; rebuilding must not download
    if tcfg.epochs == 0:  # ImageNet weights or the user's, used as they are
        if ctx.world.main:
            save_checkpoint(ctx.run_dir / "teacher_best.pt", {**_model_meta(ctx, "teacher", tcfg.arch, kwargs),
                                                              "state_dict": model.state_dict(), "epoch": 0})
        return model, [], "trained"
    ce = METHODS["ce"]
    hist = _fit(ctx, "teacher", model, tcfg.arch, kwargs,
                lambda m: Distiller(m, ce, ctx.recipe.distill, label_smoothing=ctx.recipe.train.label_smoothing),
                tcfg.epochs, tcfg.lr or ctx.recipe.train.lr)
    return model, hist, "trained"


def _per_class(pred: torch.Tensor, labels: torch.Tensor, names: list[str]) -> tuple[dict[str, float], list[list[int]]]:
    k = len(names)
    cm = torch.bincount(labels * k + pred, minlength=k * k).view(k, k)
    per = {n: (100.0 * cm[i, i].item() / cm[i].sum().item()) if cm[i].sum() else float("nan")
           for i, n in enumerate(names)}
    return per, cm.tolist()


def _final_eval(ctx: _Ctx, model: nn.Module) -> tuple[dict[str, Any], torch.Tensor]:
    kw = ctx.eval_kwargs()
    logits, labels = predict(model, ctx.data.test, **kw)
    pred = logits.argmax(1)
    shifted_logits, _ = predict(model, ctx.data.test, shift_canvas=ctx.recipe.data.shifted_canvas,
                                shift_mode=ctx.recipe.data.shifted_mode,
                                shift_seed=ctx.recipe.seed, **kw)
    per, cm = _per_class(pred, labels, ctx.data.class_names)
    return {
        "test_top1": 100.0 * (pred == labels).float().mean().item(),
        "val_top1": evaluate(model, ctx.data.val, **kw)["top1"],
        "shifted_top1": 100.0 * (shifted_logits.argmax(1) == labels).float().mean().item(),
        "per_class_top1": per,
        "confusion_matrix": cm,
    }, pred


def _new_student(recipe: Recipe, data: DataBundle, device: torch.device,
                 loaded: dict[str, dict[str, Any]] | None = None) -> nn.Module:
    """The student at its initial weights (the user's ``student.weights`` when given): the
    distilled one and its baseline start equal."""
    torch.manual_seed(recipe.seed + 1)
    model = build_model(recipe.student.arch, data.num_classes, data.channels, data.image_size,
                        **recipe.student.model_kwargs())
    if recipe.student.weights:
        report = load_weights(model, recipe.student.weights, role="student", arch=recipe.student.arch,
                              new_head_ok=True, key=recipe.student.weights_key)
        if loaded is not None:
            loaded["student"] = report.as_dict()
    return model.to(device)


def baseline_key(recipe: Recipe) -> str:
    """What a student trained alone depends on: the student, the data, the loop and the seed."""
    train = recipe.train.model_dump(exclude={"device"})
    spec = {"student": recipe.student.model_dump(), "data": recipe.data.model_dump(exclude={"num_workers"}),
            "train": train, "seed": recipe.seed, "edgekd": __version__}
    if recipe.student.weights and Path(recipe.student.weights).is_file():  # the warm start's content, not its name
        spec["student_weights_sha256"] = hashlib.sha256(Path(recipe.student.weights).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def baseline_cache_dir() -> Path:
    """Baselines shared between runs: $EDGEKD_CACHE, else $XDG_CACHE_HOME/edgekd, else ~/.cache/edgekd."""
    root = os.environ.get("EDGEKD_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgekd"
    return Path(root) / "baselines"


def _baseline(ctx: _Ctx, t_pred: torch.Tensor | None) -> dict[str, Any]:
    """The same student trained alone (``ce``): same initial weights, seed, batches, augmentation
    and epochs. Reused from the cache when one was trained for the same student, data and budget."""
    recipe = ctx.recipe
    key = baseline_key(recipe)
    cached = baseline_cache_dir() / f"{key}.pt"
    model = _new_student(recipe, ctx.data, ctx.device)
    if cached.is_file():
        ckpt = load_checkpoint(cached)
        model.load_state_dict(ckpt["state_dict"])
        history, source = ckpt.get("history", []), f"cache:{cached}"
        log.info("baseline: reusing %s", cached)
    else:
        ce = METHODS["ce"]
        history = _fit(ctx, "baseline", model, recipe.student.arch, recipe.student.model_kwargs(),
                       lambda m: Distiller(m, ce, recipe.distill, label_smoothing=recipe.train.label_smoothing),
                       recipe.student.epochs, recipe.train.lr)
        meta = _model_meta(ctx, "baseline", recipe.student.arch, recipe.student.model_kwargs())
        if ctx.world.main:
            save_checkpoint(cached, {**meta, "state_dict": model.state_dict(), "history": history, "key": key})
        source = "trained"
    b_eval, b_pred = _final_eval(ctx, model)
    agreement = 100.0 * (t_pred == b_pred).float().mean().item() if t_pred is not None else None
    return {"arch": recipe.student.arch, "params": count_params(model), "method": "ce", "source": source,
            "cache_key": key, **b_eval, "agreement_top1": agreement, "epochs": history}


def train_teacher(recipe: Recipe, out_dir: str | Path, progress: Progress | None = None) -> Path:
    """Only the teacher of ``recipe`` (trained, or resumed from its last epoch) into ``out_dir``:
    its ``teacher_best.pt``, for runs that share one teacher (``teacher.checkpoint``)."""
    ctx = _context(recipe, Path(out_dir), True, progress)
    _teacher(ctx, needs_teacher=True)
    return ctx.run_dir / artifacts.best_checkpoint("teacher")


def initial_student(recipe: Recipe, out_dir: str | Path) -> Path:
    """``student_best.pt`` of the student at its initial weights, untrained: its exported file has
    the size, latency and memory of the trained one (they do not depend on the weight values)."""
    ctx = _context(recipe, Path(out_dir), False, None)
    student = _new_student(recipe, ctx.data, ctx.device)
    path = ctx.run_dir / artifacts.best_checkpoint("student")
    save_checkpoint(path, {**_model_meta(ctx, "student", recipe.student.arch, recipe.student.model_kwargs()),
                           "state_dict": student.state_dict(), "epoch": 0, "val_top1": float("nan")})
    return path


def distill(recipe: Recipe, out_dir: str | Path, *, resume: bool = False,
            progress: Progress | None = None) -> DistillResult:
    """Run the distil stage of ``recipe`` into ``out_dir`` (see the module docstring)."""
    run_dir = Path(out_dir)
    resumed = _check_run_dir(run_dir, resume)
    if recipe.distill.qat.epochs:
        _check_qat_imports()  # before the float epochs, not after them
    method = get_method(recipe.distill.method)
    t_start = time.perf_counter()
    ctx = _context(recipe, run_dir, resume, progress)
    if recipe.distill.qat.epochs and ctx.world.size > 1:  # before the float epochs, not after them
        raise EdgekdError("distill.qat runs in one process: distil under torchrun with --qat-epochs 0, then add "
                          "QAT in one process (edgekd distill RECIPE --out DIR --resume)")
    teacher, t_hist, t_source = _teacher(ctx, method.needs_teacher)
    student = _new_student(recipe, ctx.data, ctx.device, ctx.weights_loaded)
    pairs = _stage_pairs(recipe, method, teacher, student, ctx.data)
    hard = _hard(ctx)
    s_hist = _fit(ctx, "student", student, recipe.student.arch, recipe.student.model_kwargs(),
                  lambda m: Distiller(m, method, recipe.distill, teacher=teacher, pairs=pairs,
                                      label_smoothing=recipe.train.label_smoothing),
                  recipe.student.epochs, recipe.train.lr, hard=hard)
    qat = _qat(ctx, method, teacher, student, pairs) if recipe.distill.qat.epochs else None
    metrics = _metrics(ctx, method.name, teacher, t_hist, t_source, student, s_hist, pairs, hard, resumed)
    if qat is not None:
        metrics["student"]["qat"] = qat
    metrics["wall_s"] = time.perf_counter() - t_start
    files: list[Path] = []
    if ctx.world.main:  # the other ranks hold the same models and metrics; one writes the reports
        images, _ = next(iter(ctx.data.test.batches(6, ctx.device)))
        files = write_plots(run_dir, metrics, teacher, student, pairs, ctx.data.class_names, images,
                            prepare_batch(images, ctx.mean, ctx.std))
        if hard is not None:
            files.append(plot_augmentors(hard, images, run_dir / "augmentor.png"))
        write_json(run_dir / artifacts.METRICS, metrics)
    barrier()
    return DistillResult(run_dir, metrics,
                         run_dir / artifacts.best_checkpoint("teacher") if t_source == "trained" else None,
                         run_dir / artifacts.best_checkpoint("student"),
                         [run_dir / artifacts.METRICS, run_dir / artifacts.LOG, *files])


def _qat(ctx: _Ctx, method: Any, teacher: nn.Module | None, student: nn.Module, pairs: list[Any]) -> dict[str, Any]:
    """Quantization-aware fine-tuning of the converged student (``edgekd.qat``) with the same
    method and teacher, into ``student_qat_best.pt``; its section of metrics.json."""
    from edgekd.qat import prepare_qat

    recipe, cfg = ctx.recipe, ctx.recipe.distill.qat
    batch = recipe.train.batch_size
    steps = max(1, len(ctx.data.train) // batch) if len(ctx.data.train) >= batch else 1
    total = max(1, round(cfg.epochs * steps))
    taps = [p.student for p in pairs] if method.needs_features else []
    sample = torch.zeros(1, ctx.data.channels, ctx.data.image_size, ctx.data.image_size, device=ctx.device)
    freeze = {"freeze_bn_step": round(cfg.freeze_bn_after * total),
              "freeze_observer_step": round(cfg.freeze_observers_after * total)}
    t0 = time.perf_counter()
    float_student = copy.deepcopy(student)
    # as export does for PTQ (else the int8 file rounds their bias away), and the nearly dead too
    zeroed = zero_dead_channels(float_student, rel_var=QAT_REL_VAR)
    qat = prepare_qat(float_student, taps, sample, **freeze)
    hist = _fit(ctx, QAT_ROLE, qat, recipe.student.arch, recipe.student.model_kwargs(),
                lambda m: Distiller(m, method, recipe.distill, teacher=teacher, pairs=pairs,
                                    label_smoothing=recipe.train.label_smoothing),
                cfg.epochs, cfg.lr or recipe.train.lr / 100, meta_extra={"qat": {"taps": taps, **freeze}})
    best = max(hist, key=lambda h: h["val_top1"] if not math.isnan(h["val_top1"]) else -1.0)
    return {"checkpoint": artifacts.best_checkpoint(QAT_ROLE), "epochs": cfg.epochs, "steps": total,
            "taps": taps, **freeze, "dead_channels_zeroed": zeroed, "val_top1": best["val_top1"],
            "test_top1": best["test_top1"], "wall_s": time.perf_counter() - t0, "history": hist}


def _check_qat_imports() -> None:
    import importlib

    for mod in ("torchao", "litert_torch"):
        try:
            importlib.import_module(mod)
        except ImportError:
            raise EdgekdError(f"distill.qat needs the '{mod}' package: pip install 'edgekd[export]', or set "
                              "distill.qat.epochs: 0 (--qat-epochs 0)") from None


def _check_run_dir(run_dir: Path, resume: bool) -> str | None:
    """A run dir that already holds a run is continued only with ``resume``; what resume did."""
    if run_dir.exists() and not run_dir.is_dir():
        raise EdgekdError(f"--out {run_dir} is a file, not a folder; choose another --out")
    started = [p.name for p in (run_dir / artifacts.last_checkpoint("teacher"),
                                run_dir / artifacts.last_checkpoint("student"), run_dir / artifacts.METRICS)
               if p.exists()]
    if started and not resume:
        raise EdgekdError(f"{run_dir} already holds a run ({', '.join(started)}); pass --resume to continue it "
                          "or choose another --out")
    if not resume:
        return None
    if not started:
        log.warning("nothing to resume in %s: starting a new run", run_dir)
    return "continued" if started else "nothing to resume: started a new run"


def _context(recipe: Recipe, run_dir: Path, resume: bool, progress: Progress | None) -> _Ctx:
    """The device, the process group (DDP under torchrun), the data, and the run dir with its recipe."""
    device = resolve_device(recipe.train.device)
    world = init(device.type)
    if world.size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", world.local_rank)
        if recipe.train.batch_size % world.size:
            raise EdgekdError(f"train.batch_size {recipe.train.batch_size} is the global batch and must divide among "
                              f"{world.size} processes; pick a multiple of {world.size}")
    data = load_dataset(recipe.data, recipe.seed)
    if device.type == "cuda":
        data = data.to(device)  # small data sets live on the GPU; batches are index slices
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / artifacts.RECIPE, yaml.safe_dump(recipe.model_dump(), sort_keys=False))
    return _Ctx(recipe, data, device, run_dir, resume, progress if progress and world.main else _NoProgress(),
                torch.tensor(data.mean, device=device), torch.tensor(data.std, device=device), world)


def _stage_pairs(recipe: Recipe, method: Any, teacher: nn.Module | None, student: nn.Module,
                 data: DataBundle) -> list[Any]:
    """Teacher stage -> student stage pairs by spatial size, for the feature terms (and the
    attention plot of kd runs); a method that matches feature maps needs them on both sides."""
    s_taps = tap_candidates(recipe.student.arch, student, data.channels, data.image_size)
    if method.needs_features and not s_taps:
        raise EdgekdError(f"method '{method.name}' matches feature maps, and a {recipe.student.arch} student has "
                          "none; use --method kd (or ce)")
    if teacher is None or not s_taps:
        return []
    t_taps = tap_candidates(recipe.teacher.arch, teacher, data.channels, data.image_size)
    if method.needs_features and not t_taps:
        raise EdgekdError(f"method '{method.name}' matches feature maps, and a {recipe.teacher.arch} teacher has "
                          "none; use --method kd (or ce)")
    return pair_stages(stage_shapes(teacher, t_taps, data.channels, data.image_size),
                       stage_shapes(student, s_taps, data.channels, data.image_size))


def _hard(ctx: _Ctx) -> HardTraining | None:
    """HARD's augmentor game (Nix et al. 2023) when the recipe asks for an augmentor, else None."""
    recipe, data, device = ctx.recipe, ctx.data, ctx.device
    if not recipe.distill.augment:
        return None
    h = recipe.distill.hard
    torch.manual_seed(recipe.seed + 2)
    augmentor = get_augmentor(recipe.distill.augment, data.channels, data.image_size).to(device)
    augmentor.prepare(lambda seed: data.train.batches(recipe.train.batch_size, device, seed=seed),
                      ctx.run_dir / "vae.pt", device, recipe.seed)
    return HardTraining(augmentor, mean=ctx.mean, std=ctx.std, temperature=recipe.distill.temperature,
                        lambda_s=h.lambda_s, lambda_t=h.lambda_t, weight=h.weight, l_min=h.l_min, l_max=h.l_max,
                        consecutive=h.consecutive, lr=h.lr, threshold=h.threshold, max_phase=h.max_phase)


def _hard_section(hard: HardTraining, augment: str) -> dict[str, Any]:
    return {"augmentor": augment, "pool": len(hard.pool), "switches": hard.switches,
            "l_min": hard.l_min, "l_max": hard.l_max, "consecutive": hard.k,
            "max_phase": hard.max_phase, "phases_ended_by_cap": hard.capped,
            "switch_metric": "student-teacher top-1 disagreement on augmented batches, percent"
            + (", less that on the same batch un-augmented" if hard.relative else ""),
            "phase_log_columns": ["iteration", "phase", "disagreement"],
            "phase_log": hard.phase_log}


def _metrics(ctx: _Ctx, method: str, teacher: nn.Module | None, t_hist: list[dict[str, float]], t_source: str,
             student: nn.Module, s_hist: list[dict[str, float]], pairs: list[Any], hard: HardTraining | None,
             resumed: str | None) -> dict[str, Any]:
    """metrics.json (schema ``edgekd.metrics/1``): both models' final scores, their agreement, the
    baseline's when asked for, and how the run went."""
    recipe, scfg = ctx.recipe, ctx.recipe.student
    s_eval, s_pred = _final_eval(ctx, student)
    t_section = agreement = t_pred = None
    if teacher is not None:
        t_eval, t_pred = _final_eval(ctx, teacher)
        agreement = 100.0 * (t_pred == s_pred).float().mean().item()
        t_section = {"arch": recipe.teacher.arch, "params": count_params(teacher), "source": t_source,
                     "image_size": ctx.teacher_image_size or ctx.data.image_size,
                     "checkpoint": artifacts.best_checkpoint("teacher") if t_source == "trained"
                     else recipe.teacher.checkpoint, **t_eval, "epochs": t_hist}
    b_section, gain = None, None
    if recipe.distill.baseline and method != "ce":
        b_section = _baseline(ctx, t_pred)
        gain = {"test_top1": s_eval["test_top1"] - b_section["test_top1"],
                "shifted_top1": s_eval["shifted_top1"] - b_section["shifted_top1"],
                "agreement_top1": (agreement - b_section["agreement_top1"]) if agreement is not None else None}
    s_section = {"arch": scfg.arch, "params": count_params(student), "method": method,
                 "image_size": ctx.data.image_size,
                 "checkpoint": artifacts.best_checkpoint("student"), **s_eval, "epochs": s_hist,
                 "epochs_run": len(s_hist), "stopped_early": len(s_hist) < scfg.epochs}
    if hard is not None:
        s_section["hard"] = _hard_section(hard, recipe.distill.augment or "")
    return {"schema": artifacts.METRICS_SCHEMA, "edgekd_version": __version__, "recipe": recipe.model_dump(),
            "device": str(ctx.device), "dataset": ctx.data.describe(), "method": method,
            "stage_pairs": [p.as_dict() for p in pairs], "teacher": t_section, "student": s_section,
            "agreement_top1": agreement, "baseline": b_section, "gain_over_baseline": gain, "wall_s": None,
            "resume": resumed, "weights_loaded": ctx.weights_loaded, "world_size": ctx.world.size}
