"""HARD-Mix: a learned, input-dependent Mixup/CutMix over a group of images."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekd.augment.base import Augmentor


class HardMix(Augmentor):
    """Each image is mixed with ``group - 1`` others of the batch. Every image is cut into
    patches and projected (a strided conv); each patch embedding is compared with one query
    ``q = μ + exp(log σ) ⊙ ε`` drawn per mixed image; the similarities are normalised across the
    group (softmax) and the patches of the group are combined with those weights. No
    teacher–teacher term (a teacher need not be invariant to a mix), and no phases: augmentor
    and student train together every iteration."""

    teacher_invariance = False
    phased = False
    l_min, l_max, lr = 5.0, 40.0, 0.05

    def __init__(self, channels: int = 1, image_size: int = 28, patch: int = 4, dim: int = 16,
                 group: int = 2) -> None:
        super().__init__()
        self.patch = patch if image_size % patch == 0 else 1
        self.group = group
        self.project = nn.Conv2d(channels, dim, self.patch, stride=self.patch)
        self.query_mean = nn.Parameter(torch.zeros(dim))
        self.query_log_std = nn.Parameter(torch.zeros(dim))

    def forward(self, x01: torch.Tensor, generator: torch.Generator | None = None,
                sample: bool = True) -> torch.Tensor:
        n = x01.shape[0]
        perms = [torch.arange(n, device=x01.device)] + [
            torch.randperm(n, device=x01.device, generator=generator) for _ in range(self.group - 1)]
        images = torch.stack([x01[p] for p in perms], 1)  # N, G, C, H, W
        g, c, h, w = images.shape[1:]
        emb = self.project(images.flatten(0, 1))  # N*G, D, h', w'
        emb = emb.view(n, g, *emb.shape[1:])
        q = self.query_mean.expand(n, -1)
        if sample:
            q = q + self.query_log_std.exp() * torch.randn(n, q.shape[1], device=x01.device, generator=generator)
        sim = torch.einsum("ngdhw,nd->nghw", emb, q) / math.sqrt(q.shape[1])
        weights = sim.softmax(dim=1)  # across the group, per patch
        weights = F.interpolate(weights, size=(h, w), mode="nearest").unsqueeze(2)  # N, G, 1, H, W
        return (weights * images).sum(1)
