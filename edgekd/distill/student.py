"""The student at its initial weights, the teacher-student stage pairs its feature terms
match, and HARD's augmentor game when the recipe asks for one."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from edgekd.augment import get_augmentor
from edgekd.augment.hard import HardTraining
from edgekd.data import DataBundle
from edgekd.distill.context import RunContext
from edgekd.errors import EdgekdError
from edgekd.models import build_model, pair_stages, stage_shapes, tap_candidates
from edgekd.models.weights import load_weights
from edgekd.recipe import Recipe


def new_student(recipe: Recipe, data: DataBundle, device: torch.device,
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


def check_student_weights(recipe: Recipe, data: DataBundle) -> None:
    """Load ``student.weights`` into a throwaway student, leaving the global RNG as it was: a
    missing, corrupt or mismatched file stops the run before the teacher's epochs, not after them."""
    with torch.random.fork_rng(devices=[]):
        new_student(recipe, data, torch.device("cpu"))


def stage_pairs(recipe: Recipe, method: Any, teacher: nn.Module | None, student: nn.Module,
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


def hard_training(ctx: RunContext) -> HardTraining | None:
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
