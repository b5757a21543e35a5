"""metrics.json (schema ``edgekd.metrics/1``): both models' final scores, their agreement,
the baseline's when asked for, HARD's game, and how the run went."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from edgekd import __version__, artifacts
from edgekd.augment.hard import HardTraining
from edgekd.distill.baseline import train_baseline
from edgekd.distill.context import RunContext
from edgekd.distill.evaluate import final_eval
from edgekd.models import count_params


def hard_section(hard: HardTraining, augment: str) -> dict[str, Any]:
    return {"augmentor": augment, "pool": len(hard.pool), "switches": hard.switches,
            "l_min": hard.l_min, "l_max": hard.l_max, "consecutive": hard.k,
            "max_phase": hard.max_phase, "phases_ended_by_cap": hard.capped,
            "switch_metric": "student-teacher top-1 disagreement on augmented batches, percent"
            + (", less that on the same batch un-augmented" if hard.relative else ""),
            "phase_log_columns": ["iteration", "phase", "disagreement"],
            "phase_log": hard.phase_log}


def run_metrics(ctx: RunContext, method: str, teacher: nn.Module | None, t_hist: list[dict[str, float]], t_source: str,
                student: nn.Module, s_hist: list[dict[str, float]], pairs: list[Any], hard: HardTraining | None,
                resumed: str | None) -> dict[str, Any]:
    """metrics.json (schema ``edgekd.metrics/1``): both models' final scores, their agreement, the
    baseline's when asked for, and how the run went."""
    recipe, scfg = ctx.recipe, ctx.recipe.student
    s_eval, s_pred = final_eval(ctx, student)
    t_section = agreement = t_pred = None
    if teacher is not None:
        t_eval, t_pred = final_eval(ctx, teacher)
        agreement = 100.0 * (t_pred == s_pred).float().mean().item()
        t_section = {"arch": recipe.teacher.arch, "params": count_params(teacher), "source": t_source,
                     "image_size": ctx.teacher_image_size or ctx.data.image_size,
                     "checkpoint": artifacts.best_checkpoint("teacher") if t_source == "trained"
                     else recipe.teacher.checkpoint, **t_eval, "epochs": t_hist}
    b_section, gain = None, None
    if recipe.distill.baseline and method != "ce":
        b_section = train_baseline(ctx, t_pred)
        gain = {"test_top1": s_eval["test_top1"] - b_section["test_top1"],
                "shifted_top1": s_eval["shifted_top1"] - b_section["shifted_top1"],
                "agreement_top1": (agreement - b_section["agreement_top1"]) if agreement is not None else None}
    s_section = {"arch": scfg.arch, "params": count_params(student), "method": method,
                 "image_size": ctx.data.image_size,
                 "checkpoint": artifacts.best_checkpoint("student"), **s_eval, "epochs": s_hist,
                 "epochs_run": len(s_hist), "stopped_early": len(s_hist) < scfg.epochs}
    if hard is not None:
        s_section["hard"] = hard_section(hard, recipe.distill.augment or "")
    return {"schema": artifacts.METRICS_SCHEMA, "edgekd_version": __version__, "recipe": recipe.model_dump(),
            "device": str(ctx.device), "dataset": ctx.data.describe(), "method": method,
            "stage_pairs": [p.as_dict() for p in pairs], "teacher": t_section, "student": s_section,
            "agreement_top1": agreement, "baseline": b_section, "gain_over_baseline": gain, "wall_s": None,
            "resume": resumed, "weights_loaded": ctx.weights_loaded, "world_size": ctx.world.size}
