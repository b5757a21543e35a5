"""The augmentor interface shared by every HARD augmentor."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn


class Augmentor(nn.Module):
    """``x̃ = g(x, ε)`` on images in [0, 1] (N, C, H, W), ε ~ N(0, I) drawn from ``generator``
    (the reparameterisation trick, so gradients reach the distribution's parameters).

    Class attributes say how HARD trains it: ``teacher_invariance`` adds the teacher–teacher
    term ``λt·D(t(x̃), t(x))``; ``phased`` alternates augmentor and student phases with the
    switching rule, else both train every iteration; ``l_min``/``l_max`` are the paper's
    thresholds (percent student–teacher disagreement on augmented batches) and ``lr`` its
    learning rate.
    """

    teacher_invariance = True
    phased = True
    l_min, l_max, lr = 5.0, 40.0, 0.05

    def forward(self, x01: torch.Tensor, generator: torch.Generator | None = None,
                sample: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, train_batches, cache: Path, device: torch.device, seed: int) -> None:  # noqa: ANN001
        """Anything the augmentor needs before HARD starts (hard-vae trains its VAE here), kept in
        ``cache`` so a resumed run reuses it. ``train_batches(seed)`` yields uint8 training batches."""
