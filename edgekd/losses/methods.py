"""The distillation methods, by name. Each is one function from model outputs to weighted loss
terms; the total loss is their sum. Terms a method does not use are absent (logged as 0)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekd.losses.terms import at_loss, hint_loss, kd_loss
from edgekd.errors import EdgekdError

TERMS = ("ce", "kd", "at", "fitnet", "hard")  # hard: HARD's student term (edgekd.augment.hard)
TEACHER_TERMS = ("kd", "at", "fitnet")  # the terms distill.warmup_epochs ramps up


class LossWeights(Protocol):
    """The weights a method reads; ``edgekd.recipe.DistillConfig`` is one. A protocol, so this
    registry sits below the recipe module (which validates method names against it)."""

    w_ce: float
    alpha: float
    temperature: float
    beta: float
    p: float
    fitnet_weight: float


@dataclass
class Outputs:
    logits: torch.Tensor
    features: list[torch.Tensor]


LossFn = Callable[[Outputs, "Outputs | None", torch.Tensor, LossWeights, float, "nn.ModuleList | None"],
                  dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Method:
    name: str
    loss: LossFn
    needs_teacher: bool
    needs_features: bool = False
    needs_regressors: bool = False
    summary: str = ""


def _ce(s: Outputs, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return F.cross_entropy(s.logits.float(), y, label_smoothing=label_smoothing)


def ce_method(s, t, y, cfg, ls, reg):  # noqa: ANN001 - signature is LossFn
    return {"ce": _ce(s, y, ls)}


def kd_method(s, t, y, cfg, ls, reg):  # noqa: ANN001
    return {"ce": cfg.w_ce * _ce(s, y, ls), "kd": cfg.alpha * kd_loss(s.logits, t.logits, cfg.temperature)}


def at_method(s, t, y, cfg, ls, reg):  # noqa: ANN001
    return {"ce": cfg.w_ce * _ce(s, y, ls), "at": cfg.beta * at_loss(t.features, s.features, cfg.p)}


def atkd_method(s, t, y, cfg, ls, reg):  # noqa: ANN001
    return {**kd_method(s, t, y, cfg, ls, reg), "at": cfg.beta * at_loss(t.features, s.features, cfg.p)}


def atkd_sa_method(s, t, y, cfg, ls, reg):  # noqa: ANN001
    return {**kd_method(s, t, y, cfg, ls, reg), "at": cfg.beta * at_loss(t.features, s.features, map_fn="self")}


def fitnet_method(s, t, y, cfg, ls, reg):  # noqa: ANN001
    regressed = [r(f) for r, f in zip(reg, s.features, strict=True)]
    return {"ce": cfg.w_ce * _ce(s, y, ls), "fitnet": cfg.fitnet_weight * hint_loss(t.features, regressed)}


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("ce", ce_method, needs_teacher=False, summary="cross-entropy on labels only (no teacher)"),
        Method("kd", kd_method, needs_teacher=True, summary="w_ce·CE + α·T²·KL (Hinton 2015)"),
        Method("at", at_method, needs_teacher=True, needs_features=True,
               summary="w_ce·CE + β·Σ MSE(at_t, at_s) (Zagoruyko 2016)"),
        Method("atkd", atkd_method, needs_teacher=True, needs_features=True,
               summary="w_ce·CE + α·T²·KL + β·Σ MSE(at_t, at_s)"),
        Method("atkd-sa", atkd_sa_method, needs_teacher=True, needs_features=True,
               summary="AT-KD with self-attention maps (the AT-KD poster)"),
        Method("fitnet", fitnet_method, needs_teacher=True, needs_features=True, needs_regressors=True,
               summary="w_ce·CE + hint MSE through 1x1-conv regressors (Romero 2015)"),
    ]
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise EdgekdError(f"unknown method '{name}'; choose one of {', '.join(METHODS)}")
    return METHODS[name]
