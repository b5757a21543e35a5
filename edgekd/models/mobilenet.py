"""MobileNetV2 students (torchvision's) with a width multiplier and a small-input stem."""

from __future__ import annotations

import torch.nn as nn
import torchvision

from edgekd.models.resnet import SMALL_INPUT


def _mobilenet_v2(num_classes: int, in_channels: int, image_size: int, width_mult: float = 1.0,
                  **_: object) -> nn.Module:
    model = torchvision.models.MobileNetV2(num_classes=num_classes, width_mult=width_mult)
    stem: nn.Conv2d = model.features[0][0]
    if in_channels != 3 or image_size <= SMALL_INPUT:
        stride = 1 if image_size <= SMALL_INPUT else 2
        model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride, 1, bias=False)
    if image_size <= SMALL_INPUT:
        # The usual CIFAR MobileNetV2: the first stride-2 block keeps resolution too, so the
        # last feature map is image_size / 8, like the small-stem ResNet's.
        model.features[2].conv[1][0].stride = (1, 1)
    return model
