"""Batch transforms that run on the training device, so a GPU never waits for a CPU loader.

Geometric augmentation (translation ~ random crop with padding, rotation, horizontal flip)
is one affine ``grid_sample`` per batch; brightness is one multiply.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from edgekd.recipe import AugmentConfig



def augment_batch(x01: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random translation, rotation, flip and brightness on a float batch in [0, 1]."""
    n, _, h, w = x01.shape
    dev = x01.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, device=dev, generator=generator) * (hi - lo) + lo

    if cfg.crop_padding or cfg.rotation_deg or cfg.hflip:
        angle = uniform(-cfg.rotation_deg, cfg.rotation_deg) * (math.pi / 180.0)
        # Integer-pixel offsets, as a random crop of a padded image would give.
        tx = torch.randint(-cfg.crop_padding, cfg.crop_padding + 1, (n,), device=dev, generator=generator)
        ty = torch.randint(-cfg.crop_padding, cfg.crop_padding + 1, (n,), device=dev, generator=generator)
        flip = torch.ones(n, device=dev)
        if cfg.hflip:
            flip = torch.where(torch.rand(n, device=dev, generator=generator) < 0.5, -flip, flip)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [
                torch.stack([cos * flip, -sin, tx.float() * 2 / w], 1),
                torch.stack([sin * flip, cos, ty.float() * 2 / h], 1),
            ],
            1,
        )
        grid = F.affine_grid(theta, list(x01.shape), align_corners=False)
        x01 = F.grid_sample(x01, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if cfg.brightness:
        x01 = x01 * uniform(1 - cfg.brightness, 1 + cfg.brightness).view(n, 1, 1, 1)
    return x01.clamp_(0.0, 1.0)


def shift_batch(x_uint8: torch.Tensor, canvas: float, generator: torch.Generator,
                mode: str = "canvas") -> torch.Tensor:
    """The "shifted" test set. ``canvas``: paste each image at a random place on a ``canvas``×
    larger black canvas, then resize the canvas back (objects get smaller and move).
    ``translate``: paste it at a random place on the same larger canvas and crop the original
    size around the centre again, so objects move by up to (canvas - 1) / 2 of the image at the
    same scale, the part that leaves the frame cut off (as MNIST-C's translations)."""
    n, c, h, w = x_uint8.shape
    big_h, big_w = round(h * canvas), round(w * canvas)
    out = torch.zeros(n, c, big_h, big_w, dtype=torch.float32, device=x_uint8.device)
    oy = torch.randint(0, big_h - h + 1, (n,), generator=generator, device=x_uint8.device).tolist()
    ox = torch.randint(0, big_w - w + 1, (n,), generator=generator, device=x_uint8.device).tolist()
    for i in range(n):
        out[i, :, oy[i] : oy[i] + h, ox[i] : ox[i] + w] = x_uint8[i].float()
    if mode == "translate":
        top, left = (big_h - h) // 2, (big_w - w) // 2
        out = out[:, :, top : top + h, left : left + w]
    else:
        out = F.interpolate(out, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def resize_uint8(x_uint8: torch.Tensor, size: int) -> torch.Tensor:
    if x_uint8.shape[-1] == size and x_uint8.shape[-2] == size:
        return x_uint8
    out = F.interpolate(x_uint8.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)
