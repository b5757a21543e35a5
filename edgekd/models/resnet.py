"""ResNet teachers (torchvision's code, untouched) with an optional width and a small-input stem."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn
import torchvision

from edgekd.errors import EdgekdError

SMALL_INPUT = 64


def _resnet(depth: int) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, image_size: int, width: int = 64, pretrained: bool = False,
              **_: object) -> nn.Module:
        weights = None
        if pretrained:
            weights = {18: "IMAGENET1K_V1", 34: "IMAGENET1K_V1", 50: "IMAGENET1K_V2"}[depth]
            if width != 64:
                raise EdgekdError("teacher.pretrained needs teacher.width 64 (the ImageNet weights' width)")
        block = torchvision.models.resnet.BasicBlock if depth < 50 else torchvision.models.resnet.Bottleneck
        layers = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3]}[depth]
        if weights is not None:
            model = getattr(torchvision.models, f"resnet{depth}")(weights=_imagenet_weights(depth, weights))
            if model.fc.out_features != num_classes:  # keep ImageNet's head for ImageNet
                model.fc = nn.Linear(model.fc.in_features, num_classes)
        else:
            model = _narrow_resnet(block, layers, num_classes, width)
        if in_channels != 3 or image_size <= SMALL_INPUT:
            stride, k = (1, 3) if image_size <= SMALL_INPUT else (2, 7)
            model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, k, stride, k // 2, bias=False)
        if image_size <= SMALL_INPUT:
            model.maxpool = nn.Identity()
        return model

    return build


def _narrow_resnet(block: type, layers: list[int], num_classes: int, width: int) -> nn.Module:
    """A ResNet whose stages have ``width, 2w, 4w, 8w`` channels (torchvision's is w = 64)."""
    model = torchvision.models.ResNet(block, layers, num_classes=num_classes)
    if width == 64:
        return model
    model.inplanes = width
    model.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    model.layer1 = model._make_layer(block, width, layers[0])
    model.layer2 = model._make_layer(block, width * 2, layers[1], stride=2)
    model.layer3 = model._make_layer(block, width * 4, layers[2], stride=2)
    model.layer4 = model._make_layer(block, width * 8, layers[3], stride=2)
    model.fc = nn.Linear(width * 8 * block.expansion, num_classes)
    for m in model.modules():  # torchvision's init, for the rebuilt layers
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def _imagenet_weights(depth: int, tag: str) -> object:
    enum = getattr(torchvision.models, f"ResNet{depth}_Weights")
    weights = getattr(enum, tag)
    try:
        weights.get_state_dict(progress=False)  # fills torch hub's cache, or fails offline
    except Exception as e:  # noqa: BLE001 - any download failure means the same to the user
        raise EdgekdError(
            f"cannot get ImageNet weights for resnet{depth} ({type(e).__name__}): connect to the internet once, "
            "or set teacher.pretrained: false, or pass teacher.checkpoint"
        ) from None
    return weights
