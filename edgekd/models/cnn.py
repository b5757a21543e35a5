"""A small CNN teacher: conv stages and global average pooling, hence nearly shift-invariant,
and cheap enough to train on a CPU in seconds (the teacher of HARD's invariance experiment)."""

from __future__ import annotations

import torch.nn as nn


class SmallCNN(nn.Module):
    """Four 3×3 conv-BN-ReLU blocks of ``width, 2w, 4w, 4w`` channels, 2×2 max-pools after the
    second and third, global average pooling and a linear head."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: int = 32, **_: object) -> None:
        super().__init__()
        chans = [width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        c_in = in_channels
        self.stage_ends: list[int] = []
        for i, c in enumerate(chans):
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            if i in (1, 2):
                self.stage_ends.append(len(layers) - 1)  # the ReLU before each pool ends a stage
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.stage_ends.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.fc(self.pool(self.features(x)).flatten(1))
