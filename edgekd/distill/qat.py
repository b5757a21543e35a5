"""The QAT step of distil: the converged student fine-tuned as a fake-quant graph
(``edgekd.qat``) against the same teacher and method, into ``student_qat_best.pt``."""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch
import torch.nn as nn

from edgekd import artifacts
from edgekd.distill.context import RunContext
from edgekd.distill.fit import fit
from edgekd.distiller import Distiller
from edgekd.errors import EdgekdError
from edgekd.models.dead_channels import QAT_REL_VAR, zero_dead_channels

QAT_ROLE = artifacts.QAT_ROLE


def qat_finetune(ctx: RunContext, method: Any, teacher: nn.Module | None, student: nn.Module,
                 pairs: list[Any]) -> dict[str, Any]:
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
    hist = fit(ctx, QAT_ROLE, qat, recipe.student.arch, recipe.student.model_kwargs(),
               lambda m: Distiller(m, method, recipe.distill, teacher=teacher, pairs=pairs,
                                   label_smoothing=recipe.train.label_smoothing),
               cfg.epochs, cfg.lr or recipe.train.lr / 100, meta_extra={"qat": {"taps": taps, **freeze}})
    best = max(hist, key=lambda h: h["val_top1"] if not math.isnan(h["val_top1"]) else -1.0)
    return {"checkpoint": artifacts.best_checkpoint(QAT_ROLE), "epochs": cfg.epochs, "steps": total,
            "taps": taps, **freeze, "dead_channels_zeroed": zeroed, "val_top1": best["val_top1"],
            "test_top1": best["test_top1"], "wall_s": time.perf_counter() - t0, "history": hist}


def check_qat_imports() -> None:
    import importlib

    for mod in ("torchao", "litert_torch"):
        try:
            importlib.import_module(mod)
        except ImportError:
            raise EdgekdError(f"distill.qat needs the '{mod}' package: pip install 'edgekd[export]', or set "
                              "distill.qat.epochs: 0 (--qat-epochs 0)") from None
