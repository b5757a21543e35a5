"""A trained model's final scores: test, validation and shifted-canvas top-1, per class, and
the confusion matrix."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from edgekd.distill.context import RunContext
from edgekd.train import evaluate, predict


def _per_class(pred: torch.Tensor, labels: torch.Tensor, names: list[str]) -> tuple[dict[str, float], list[list[int]]]:
    k = len(names)
    cm = torch.bincount(labels * k + pred, minlength=k * k).view(k, k)
    per = {n: (100.0 * cm[i, i].item() / cm[i].sum().item()) if cm[i].sum() else float("nan")
           for i, n in enumerate(names)}
    return per, cm.tolist()


def final_eval(ctx: RunContext, model: nn.Module) -> tuple[dict[str, Any], torch.Tensor]:
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
