"""A killed run resumes from ``<role>_last.pt``: which recipe changes forbid it, and the state
it reloads (weights, regressors, HARD, optimizer, schedule, history)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch.nn as nn

from edgekd import artifacts
from edgekd.augment.hard import HardTraining
from edgekd.checkpoint import load_checkpoint
from edgekd.distill.context import RunContext
from edgekd.distiller import Distiller
from edgekd.errors import EdgekdError
from edgekd.recipe import Recipe, recipe_from_dict
from edgekd.train import unwrap

QAT_ROLE = artifacts.QAT_ROLE
_RESUME_IGNORED = {("train", "device"), ("export",), ("bench",), ("gate",), ("search",)}  # not training
# QAT comes after the float epochs: a finished float run may take QAT on afterwards (resume, or
# `edgekd run` again with --qat-epochs), its float checkpoints as they are
_FLOAT_RESUME_IGNORED = _RESUME_IGNORED | {("distill", "qat")}


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


def resume_state(ctx: RunContext, last_path: Path, model: nn.Module, distiller: Distiller, hard: HardTraining | None,
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
