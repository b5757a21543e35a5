"""The training loop: one epoch of training and one evaluation, each returning a metric dict.

Checkpoints, logs and progress bars live in the caller (``edgekd.distill.fit``).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekd.augment.hard import HardTraining
from edgekd.data import Split
from edgekd.distributed import World, all_reduce_sum
from edgekd.data.augment import augment_batch, shift_batch
from edgekd.distiller import Distiller
from edgekd.losses.terms import warmup_scale
from edgekd.losses.methods import TEACHER_TERMS, TERMS
from edgekd.recipe import AugmentConfig, TrainConfig


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (HARD's augmentor step only reads it)."""
    return getattr(module, "module", module)


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, lr: float, total_steps: int):
    total_steps = max(1, total_steps)
    if cfg.schedule == "onecycle" and total_steps >= 8:  # fewer steps: OneCycleLR divides by a 0-step phase
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=0.25)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; fp32 on CPU (bf16 convolutions are slow on most CPUs)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def prepare_batch(x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                  aug: AugmentConfig | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    x = x_uint8.float().div_(255.0)
    if aug is not None:
        x = augment_batch(x, aug, generator)
    x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


def train_one_epoch(distiller: Distiller, split: Split, optimizer: torch.optim.Optimizer, scheduler,
                    *, mean: torch.Tensor, std: torch.Tensor, aug: AugmentConfig, batch_size: int,
                    device: torch.device, seed: int, hard: HardTraining | None = None, world: World = World(),
                    first_step: int = 0, warmup_steps: int = 0, max_steps: int | None = None,
                    clip_grad_norm: float | None = None,
                    on_batch: Callable[[int], None] | None = None) -> dict[str, float]:
    """Train for one pass over ``split``; batch order and augmentation depend only on ``seed``.
    With ``hard`` (HARD), augmentor iterations take the batch in augmentor phases, and student
    iterations add HARD's term on augmented images to the method's terms. Under DDP every rank
    draws the same global batch and augmentation and trains on its own shard of it, so N
    processes with batch B take the steps one process takes with batch B. The teacher's terms are
    scaled by ``warmup_scale(first_step + i, warmup_steps)`` at the i-th iteration (logged scaled).
    ``max_steps`` ends the pass early (the last, fractional epoch of QAT); ``clip_grad_norm`` clips
    the global gradient norm of the trained parameters before each step."""
    distiller.train()
    gen = torch.Generator(device=device).manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    if hard is not None:
        hard.start_epoch(seed)
    sums = {t: torch.zeros((), device=device) for t in TERMS}
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, phase_iters = 0, {"student": 0, "augmentor": 0}
    t0 = time.perf_counter()
    for i, (x_u8, y) in enumerate(split.batches(batch_size, device, seed=seed)):
        if max_steps is not None and i >= max_steps:
            break
        x = prepare_batch(x_u8, mean, std, aug, gen)
        if world.size > 1:
            part = world.shard(len(y))
            x, y = x[part], y[part]
        if hard is not None and hard.augmentor_turn:
            disagreement = hard.augmentor_step(unwrap(distiller.student), distiller.teacher, x, gen)
            if hard.phase == "augmentor":  # the student waits for its turn
                hard.end_iteration(disagreement)
                phase_iters["augmentor"] += 1
                scheduler.step()  # the schedule follows iterations, so it ends with the last epoch
                if on_batch is not None:
                    on_batch(len(y))
                continue
        with autocast(device):
            logits, terms = distiller(x, y)
            if warmup_steps:
                scale = warmup_scale(first_step + i, warmup_steps)
                terms = {k: v * scale if k in TEACHER_TERMS else v for k, v in terms.items()}
            if hard is not None:
                terms["hard"], disagreement = hard.student_term(distiller.student, distiller.teacher, x, gen)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad_norm)
        optimizer.step()
        scheduler.step()
        n = len(y)
        for k, v in terms.items():
            sums[k] += v.detach().float() * n
        correct += (logits.detach().argmax(1) == y).sum()
        seen += n
        if hard is not None:
            hard.end_iteration(disagreement)
            phase_iters["student"] += 1
        if on_batch is not None:
            on_batch(n)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    if world.size > 1:  # one all-reduce per epoch: the sums of every rank
        packed = all_reduce_sum(torch.stack([*sums.values(), correct.float(),
                                             torch.tensor(float(seen), device=device)]))
        sums = dict(zip(sums, packed[: len(sums)], strict=True))
        correct, seen = packed[len(sums)], int(packed[-1].item())
    seen = max(seen, 1)
    out = {f"loss_{k}": float(v) / seen for k, v in sums.items()}
    out["loss"] = sum(out[f"loss_{k}"] for k in TERMS)
    out.update(train_top1=100.0 * float(correct) / seen, img_per_s=seen / wall, wall_s=wall,
               lr=optimizer.param_groups[0]["lr"])
    if hard is not None:
        out.update(hard_student_iters=phase_iters["student"], hard_augmentor_iters=phase_iters["augmentor"],
                   hard_switches=hard.switches, hard_pool=len(hard.pool))
    return out


@torch.no_grad()
def predict(model: nn.Module, split: Split, *, mean: torch.Tensor, std: torch.Tensor, batch_size: int,
            device: torch.device, shift_canvas: float | None = None, shift_seed: int = 0, shift_mode: str = "canvas",
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels (on the CPU) for every image of ``split``, in order. With
    ``shift_canvas`` the images are first moved by ``shift_batch`` (seeded, reproducible)."""
    model.eval()
    gen = torch.Generator(device=device).manual_seed(shift_seed)
    all_logits, all_labels = [], []
    for x_u8, y in split.batches(batch_size, device):
        if shift_canvas:
            x_u8 = shift_batch(x_u8, shift_canvas, gen, shift_mode)
        with autocast(device):
            logits = model(prepare_batch(x_u8, mean, std))
        all_logits.append(logits.float().cpu())
        all_labels.append(y.cpu())
    return torch.cat(all_logits), torch.cat(all_labels)


def evaluate(model: nn.Module, split: Split, **kwargs: object) -> dict[str, float]:
    """Top-1 (percent) and mean cross-entropy of ``model`` on ``split``."""
    if len(split) == 0:
        return {"top1": float("nan"), "loss": float("nan")}
    logits, labels = predict(model, split, **kwargs)  # type: ignore[arg-type]
    return {"top1": 100.0 * (logits.argmax(1) == labels).float().mean().item(),
            "loss": F.cross_entropy(logits, labels).item()}
