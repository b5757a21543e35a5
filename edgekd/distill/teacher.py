"""The teacher of a run: the user's checkpoint (kept at its own input size), ImageNet or the
user's weights as they are, or trained here with cross-entropy."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from edgekd.checkpoint import load_checkpoint, save_checkpoint
from edgekd.distill.context import RunContext, model_meta
from edgekd.distill.fit import fit
from edgekd.distiller import Distiller
from edgekd.errors import EdgekdError
from edgekd.losses.methods import METHODS
from edgekd.models import build_from_checkpoint, build_model
from edgekd.models.resize import resize_input
from edgekd.models.weights import load_weights

log = logging.getLogger(__name__)


def build_teacher(ctx: RunContext, needs_teacher: bool) -> tuple[nn.Module | None, list[dict[str, float]], str]:
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
            save_checkpoint(ctx.run_dir / "teacher_best.pt", {**model_meta(ctx, "teacher", tcfg.arch, kwargs),
                                                              "state_dict": model.state_dict(), "epoch": 0})
        return model, [], "trained"
    ce = METHODS["ce"]
    hist = fit(ctx, "teacher", model, tcfg.arch, kwargs,
               lambda m: Distiller(m, ce, ctx.recipe.distill, label_smoothing=ctx.recipe.train.label_smoothing),
               tcfg.epochs, tcfg.lr or ctx.recipe.train.lr)
    return model, hist, "trained"
