"""The epoch loop of every role (teacher, student, baseline, QAT): train, evaluate, keep the
best and the last checkpoint atomically, rewrite log.csv; read top to bottom on one screen.

Batch order, augmentation and dropout are seeded by ``(seed, role, epoch)``, so a resumed run
follows the uninterrupted one."""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from edgekd import artifacts
from edgekd.augment.hard import HardTraining
from edgekd.checkpoint import load_checkpoint, save_checkpoint, write_text
from edgekd.distill.context import RunContext, model_meta
from edgekd.distill.resume import resume_state
from edgekd.distiller import Distiller
from edgekd.distributed import barrier
from edgekd.errors import EdgekdError
from edgekd.losses.methods import TERMS
from edgekd.train import evaluate, make_optimizer, make_scheduler, train_one_epoch, unwrap

log = logging.getLogger(__name__)
QAT_ROLE = artifacts.QAT_ROLE


def fit(ctx: RunContext, role: str, model: nn.Module, arch: str, model_kwargs: dict[str, Any],
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
    history, best_val, start = resume_state(ctx, last_path, model, distiller, hard, opt, sched)
    if start:
        log.info("%s: resuming after epoch %d of %d", role, start, epochs)
    meta = {**model_meta(ctx, role, arch, model_kwargs), **(meta_extra or {})}
    # The baseline sees exactly the student's batches, augmentation and dropout: same seed.
    role_seed = ctx.recipe.seed * 1000 + {"teacher": 0, QAT_ROLE: 700}.get(role, 500)
    # the teacher's terms of the student (and the baseline's, which has none) ramp up from 0
    warmup_steps = round(ctx.recipe.distill.warmup_epochs * steps) if role in ("student", "baseline") else 0
    for epoch in range(start, math.ceil(epochs)):
        last_steps = round((epochs - epoch) * steps) if epoch + 1 > epochs else None  # a fraction of an epoch
        if cfg.patience and epochs_since_best(history) >= cfg.patience:
            log.info("%s: validation top-1 has not improved for %d epochs: stopping after epoch %d",
                     role, cfg.patience, epoch)
            break
        ctx.progress.start(f"{role} {epoch + 1}/{epochs:g}", len(ctx.data.train))
        row: dict[str, float] = {"epoch": epoch + 1}
        row.update(train_one_epoch(
            step, ctx.data.train, opt, sched, mean=ctx.mean, std=ctx.std, aug=ctx.recipe.data.augment,
            batch_size=cfg.batch_size, device=ctx.device, seed=role_seed + epoch, hard=hard, world=ctx.world,
            first_step=epoch * steps, warmup_steps=warmup_steps, on_batch=ctx.progress.advance, max_steps=last_steps,
            clip_grad_norm=cfg.clip_grad_norm,
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


def epochs_since_best(history: list[dict[str, float]]) -> int:
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
