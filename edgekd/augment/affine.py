"""HARD-Affine: a learned Gaussian over the 2×3 affine matrix of the sampling grid (a spatial
transformer, Jaderberg et al. 2015), initialised to the identity."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekd.augment.base import Augmentor


class HardAffine(Augmentor):
    """``θ = μ + exp(log σ) ⊙ ε`` per image, ``x̃ = grid_sample(x, affine_grid(θ))`` (zeros
    outside the image). μ starts at the identity and σ at 0.002, so at initialisation x̃ = x
    up to a fraction of a pixel; the learned distribution shifts, rotates, scales and shears."""

    l_min, l_max, lr = 5.0, 40.0, 0.05  # the paper's affine settings (appendix A)

    def __init__(self, channels: int = 1, image_size: int = 28, init_std: float = 0.002) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))
        self.log_std = nn.Parameter(torch.full((6,), math.log(init_std)))

    def forward(self, x01: torch.Tensor, generator: torch.Generator | None = None,
                sample: bool = True) -> torch.Tensor:
        n = x01.shape[0]
        theta = self.mean.expand(n, 6)
        if sample:
            eps = torch.randn(n, 6, device=x01.device, generator=generator)
            theta = theta + self.log_std.exp() * eps
        grid = F.affine_grid(theta.view(n, 2, 3), list(x01.shape), align_corners=False)
        return F.grid_sample(x01, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
