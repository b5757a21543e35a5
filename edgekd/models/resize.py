"""A teacher that keeps the input size it was trained at while its student sees another.

A search (``edgekd search``) distils students at several input sizes from one teacher: the
teacher is trained once, and each batch is resized to its own size on the way in. A forward
pre-hook does it, so the teacher stays the same module: its feature taps, its stage shapes and
its evaluation need no change, and pairing by spatial size handles maps of different sizes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def resize_input(model: nn.Module, size: int) -> torch.utils.hooks.RemovableHandle:
    """Resize every input of ``model`` to ``size`` x ``size`` (bilinear, antialiased: as the data
    loader resizes the images); returns the hook's handle."""

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        if x.shape[-2:] == (size, size):
            return args
        return (F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True),
                *args[1:])

    return model.register_forward_pre_hook(hook)
