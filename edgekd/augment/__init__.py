"""Learned hard augmentations for distillation (HARD, Nix, Burg & Sinz 2023), by name.

An augmentor is ``x̃ = g(x, ε)``: a small module with learned parameters and reparameterised
Gaussian noise ε, trained to make teacher and student disagree while the teacher stays put
(``edgekd.augment.hard``). Pick one with ``--augment NAME`` / ``distill.augment``.
"""

from __future__ import annotations

from typing import Callable

from edgekd.augment.affine import HardAffine
from edgekd.augment.base import Augmentor
from edgekd.augment.mix import HardMix
from edgekd.augment.vae import HardVAE
from edgekd.errors import EdgekdError

AUGMENTORS: dict[str, Callable[..., Augmentor]] = {
    "hard-affine": HardAffine,
    "hard-mix": HardMix,
    "hard-vae": HardVAE,
}


def get_augmentor(name: str, channels: int, image_size: int) -> Augmentor:
    if name not in AUGMENTORS:
        raise EdgekdError(f"unknown augmentor '{name}'; choose one of {', '.join(AUGMENTORS)}")
    return AUGMENTORS[name](channels=channels, image_size=image_size)
