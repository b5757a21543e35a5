"""``distill(recipe, out_dir) -> DistillResult``: train (or load) the teacher, distil the
student, and write checkpoints, ``metrics.json``, ``log.csv`` and plots into ``out_dir``.

Each epoch ends with an atomic ``<role>_last.pt`` (everything needed to resume) and, when
validation top-1 improves, ``<role>_best.pt`` (weights + recipe + classes + normalisation).
A run killed at any moment resumes from its last finished epoch with ``resume=True``; batch
order, augmentation and dropout are seeded by ``(seed, role, epoch)``, so the resumed run
follows the uninterrupted one.

This module is the plan; each step is a module of ``edgekd.distill`` (see its docstring).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekd import artifacts
from edgekd.checkpoint import save_checkpoint, write_json
from edgekd.distill.context import Progress, check_run_dir, model_meta, open_run
from edgekd.distill.fit import fit
from edgekd.distill.metrics import run_metrics
from edgekd.distill.qat import check_qat_imports, qat_finetune
from edgekd.distill.student import check_student_weights, hard_training, new_student, stage_pairs
from edgekd.distill.teacher import build_teacher
from edgekd.distiller import Distiller
from edgekd.distributed import barrier
from edgekd.errors import EdgekdError
from edgekd.losses.methods import get_method
from edgekd.recipe import Recipe
from edgekd.report import plot_augmentors, write_plots
from edgekd.train import prepare_batch


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


def train_teacher(recipe: Recipe, out_dir: str | Path, progress: Progress | None = None) -> Path:
    """Only the teacher of ``recipe`` (trained, or resumed from its last epoch) into ``out_dir``:
    its ``teacher_best.pt``, for runs that share one teacher (``teacher.checkpoint``)."""
    ctx = open_run(recipe, Path(out_dir), True, progress)
    build_teacher(ctx, needs_teacher=True)
    return ctx.run_dir / artifacts.best_checkpoint("teacher")


def initial_student(recipe: Recipe, out_dir: str | Path) -> Path:
    """``student_best.pt`` of the student at its initial weights, untrained: its exported file has
    the size, latency and memory of the trained one (they do not depend on the weight values)."""
    ctx = open_run(recipe, Path(out_dir), False, None)
    student = new_student(recipe, ctx.data, ctx.device)
    path = ctx.run_dir / artifacts.best_checkpoint("student")
    save_checkpoint(path, {**model_meta(ctx, "student", recipe.student.arch, recipe.student.model_kwargs()),
                           "state_dict": student.state_dict(), "epoch": 0, "val_top1": float("nan")})
    return path


def distill(recipe: Recipe, out_dir: str | Path, *, resume: bool = False,
            progress: Progress | None = None) -> DistillResult:
    """Run the distil stage of ``recipe`` into ``out_dir`` (see the module docstring)."""
    run_dir = Path(out_dir)
    resumed = check_run_dir(run_dir, resume)
    if recipe.distill.qat.epochs:
        check_qat_imports()  # before the float epochs, not after them
    method = get_method(recipe.distill.method)
    t_start = time.perf_counter()
    ctx = open_run(recipe, run_dir, resume, progress)
    if recipe.distill.qat.epochs and ctx.world.size > 1:  # before the float epochs, not after them
        raise EdgekdError("distill.qat runs in one process: distil under torchrun with --qat-epochs 0, then add "
                          "QAT in one process (edgekd distill RECIPE --out DIR --resume)")
    if recipe.student.weights:
        check_student_weights(recipe, ctx.data)  # before the teacher's epochs, not after them
    teacher, t_hist, t_source = build_teacher(ctx, method.needs_teacher)
    student = new_student(recipe, ctx.data, ctx.device, ctx.weights_loaded)
    pairs = stage_pairs(recipe, method, teacher, student, ctx.data)
    hard = hard_training(ctx)
    s_hist = fit(ctx, "student", student, recipe.student.arch, recipe.student.model_kwargs(),
                 lambda m: Distiller(m, method, recipe.distill, teacher=teacher, pairs=pairs,
                                     label_smoothing=recipe.train.label_smoothing),
                 recipe.student.epochs, recipe.train.lr, hard=hard)
    qat = qat_finetune(ctx, method, teacher, student, pairs) if recipe.distill.qat.epochs else None
    metrics = run_metrics(ctx, method.name, teacher, t_hist, t_source, student, s_hist, pairs, hard, resumed)
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
