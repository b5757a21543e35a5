"""The student trained alone (``ce``), the baseline the distilled one is measured against;
cached between runs by what it depends on."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from edgekd import __version__
from edgekd.checkpoint import load_checkpoint, save_checkpoint
from edgekd.distill.context import RunContext, model_meta
from edgekd.distill.evaluate import final_eval
from edgekd.distill.fit import fit
from edgekd.distill.student import new_student
from edgekd.distiller import Distiller
from edgekd.losses.methods import METHODS
from edgekd.models import count_params
from edgekd.recipe import Recipe

log = logging.getLogger(__name__)


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


def train_baseline(ctx: RunContext, t_pred: torch.Tensor | None) -> dict[str, Any]:
    """The same student trained alone (``ce``): same initial weights, seed, batches, augmentation
    and epochs. Reused from the cache when one was trained for the same student, data and budget."""
    recipe = ctx.recipe
    key = baseline_key(recipe)
    cached = baseline_cache_dir() / f"{key}.pt"
    model = new_student(recipe, ctx.data, ctx.device)
    if cached.is_file():
        ckpt = load_checkpoint(cached)
        model.load_state_dict(ckpt["state_dict"])
        history, source = ckpt.get("history", []), f"cache:{cached}"
        log.info("baseline: reusing %s", cached)
    else:
        ce = METHODS["ce"]
        history = fit(ctx, "baseline", model, recipe.student.arch, recipe.student.model_kwargs(),
                      lambda m: Distiller(m, ce, recipe.distill, label_smoothing=recipe.train.label_smoothing),
                      recipe.student.epochs, recipe.train.lr)
        meta = model_meta(ctx, "baseline", recipe.student.arch, recipe.student.model_kwargs())
        if ctx.world.main:
            save_checkpoint(cached, {**meta, "state_dict": model.state_dict(), "history": history, "key": key})
        source = "trained"
    b_eval, b_pred = final_eval(ctx, model)
    agreement = 100.0 * (t_pred == b_pred).float().mean().item() if t_pred is not None else None
    return {"arch": recipe.student.arch, "params": count_params(model), "method": "ce", "source": source,
            "cache_key": key, **b_eval, "agreement_top1": agreement, "epochs": history}
