"""An MLP student: no convolution, so no built-in translation invariance (HARD's §5.1 student)."""

from __future__ import annotations

import torch
import torch.nn as nn


class MLP(nn.Sequential):
    """``flatten → [Linear → ReLU] × depth → Linear``, as the three-layer MLPs of Nix et al."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, hidden: int = 512, depth: int = 2,
                 **_: object) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * image_size * image_size
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)
