"""Teacher and student models by name, with small-input stems and hook-based feature taps.

Model code is torchvision's, untouched: inputs of 64 px or less get a stride-1 stem (and no
max-pool for ResNets), and intermediate features are read with forward hooks, so a state
dict stays loadable by plain torchvision.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torchvision

from edgekd.errors import EdgekdError

log = logging.getLogger(__name__)
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


TEACHERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": _resnet(18), "resnet34": _resnet(34), "resnet50": _resnet(50),
}
STUDENTS: dict[str, Callable[..., nn.Module]] = {"mobilenet_v2": _mobilenet_v2}
# Modules whose outputs may be tapped, in forward order. Stages are the last tap at each size.
TAP_CANDIDATES: dict[str, Callable[[nn.Module], list[str]]] = {
    "resnet": lambda m: ["layer1", "layer2", "layer3", "layer4"],
    "mobilenet_v2": lambda m: [f"features.{i}" for i in range(1, len(m.features))],
}


def build_model(arch: str, num_classes: int, in_channels: int, image_size: int, **kwargs: object) -> nn.Module:
    registry = {**TEACHERS, **STUDENTS}
    if arch not in registry:
        raise EdgekdError(f"unknown model '{arch}'; choose one of {', '.join(registry)}")
    return registry[arch](num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)


def tap_candidates(arch: str, model: nn.Module) -> list[str]:
    return TAP_CANDIDATES["resnet" if arch.startswith("resnet") else arch](model)


class FeatureTaps:
    """Records the outputs of named submodules on every forward; ``.features`` in tap order."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        modules = dict(model.named_modules())
        self.names = list(names)
        self._out: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str) -> Callable:
        def hook(_m: nn.Module, _inp: object, out: torch.Tensor) -> None:
            self._out[name] = out

        return hook

    @property
    def features(self) -> list[torch.Tensor]:
        return [self._out[n] for n in self.names]

    def clear(self) -> None:
        self._out.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def stage_shapes(model: nn.Module, names: list[str], in_channels: int, image_size: int) -> dict[str, tuple]:
    """Output shape (C, H, W) of each named module for one dummy input."""
    taps = FeatureTaps(model, names)
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    model(torch.zeros(1, in_channels, image_size, image_size, device=dev))
    shapes = {n: tuple(f.shape[1:]) for n, f in zip(names, taps.features, strict=True)}
    taps.remove()
    model.train(was_training)
    return shapes


@dataclass(frozen=True)
class StagePair:
    teacher: str
    student: str
    teacher_shape: tuple[int, int, int]
    student_shape: tuple[int, int, int]

    def as_dict(self) -> dict:
        return {"teacher": self.teacher, "student": self.student,
                "teacher_shape": list(self.teacher_shape), "student_shape": list(self.student_shape)}


def _stages(shapes: dict[str, tuple]) -> list[str]:
    """The last tap at each spatial size: the end of each resolution stage."""
    last: dict[tuple, str] = {}
    for name, s in shapes.items():
        last[s[1:]] = name
    return list(last.values())


def pair_stages(teacher_shapes: dict[str, tuple], student_shapes: dict[str, tuple]) -> list[StagePair]:
    """Pair each teacher stage with the student stage of the same spatial size (or the
    nearest one when none matches; the attention loss then pools the larger map)."""
    t_stages, s_stages = _stages(teacher_shapes), _stages(student_shapes)
    pairs = []
    for t in t_stages:
        th = teacher_shapes[t][1]
        s = min(s_stages, key=lambda n: (abs(student_shapes[n][1] - th), -s_stages.index(n)))
        pairs.append(StagePair(t, s, teacher_shapes[t], student_shapes[s]))
    return pairs


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
