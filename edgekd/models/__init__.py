"""Teacher and student models by name, one file per family, and hook-based feature taps.

Short names (``resnet18``, ``mobilenet_v2``, …) are edgekd's own small-input variants; any other
classifier comes from the zoos as ``timm/<name>`` or ``torchvision/<name>`` (``zoo.py``), and a
user's weights file loads into either (``weights.py``).

Model code is torchvision's where it exists, untouched: inputs of 64 px or less get a stride-1
stem (and no max-pool for ResNets), and intermediate features are read with forward hooks, so a
state dict stays loadable by plain torchvision.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from edgekd.errors import EdgekdError
from edgekd.models.cnn import SmallCNN
from edgekd.models.mlp import MLP
from edgekd.models.mobilenet import _mobilenet_v2
from edgekd.models.resnet import SMALL_INPUT, _resnet
from edgekd.models.taps import FeatureTaps, StagePair, count_params, pair_stages, stage_shapes
from edgekd.models.vit import vit
from edgekd.models.zoo import build_zoo_model, is_zoo_name, zoo_tap_candidates

__all__ = ["SMALL_INPUT", "FeatureTaps", "StagePair", "build_model", "count_params", "pair_stages", "stage_shapes",
           "tap_candidates", "TEACHERS", "STUDENTS", "build_from_checkpoint"]

TEACHERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": _resnet(18), "resnet34": _resnet(34), "resnet50": _resnet(50), "cnn": SmallCNN,
}
STUDENTS: dict[str, Callable[..., nn.Module]] = {"mobilenet_v2": _mobilenet_v2, "mlp": MLP, "vit": vit}
# Modules whose outputs may be tapped, in forward order. Stages are the last tap at each size;
# an MLP has no feature maps and a ViT has tokens (merged away under ToMe, so no fixed spatial
# grid to take an attention map of), so methods that need feature maps are refused for both.
TAP_CANDIDATES: dict[str, Callable[[nn.Module], list[str]]] = {
    "resnet": lambda m: ["layer1", "layer2", "layer3", "layer4"],
    "mobilenet_v2": lambda m: [f"features.{i}" for i in range(1, len(m.features))],
    "cnn": lambda m: [f"features.{i}" for i in m.stage_ends],
    "mlp": lambda m: [],
    "vit": lambda m: [],
}


def build_model(arch: str, num_classes: int, in_channels: int, image_size: int, **kwargs: object) -> nn.Module:
    if is_zoo_name(arch):
        return build_zoo_model(arch, num_classes, in_channels, image_size, **kwargs)
    registry = {**TEACHERS, **STUDENTS}
    if arch not in registry:
        raise EdgekdError(f"unknown model '{arch}'; choose one of {', '.join(registry)}, or timm/<name> or "
                          "torchvision/<name> (edgekd models lists them)")
    return registry[arch](num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)


def tap_candidates(arch: str, model: nn.Module, in_channels: int = 1, image_size: int = 28) -> list[str]:
    """Modules whose outputs may be tapped, in forward order (a zoo model's are found by running
    it once on an input of ``in_channels`` x ``image_size``²)."""
    if is_zoo_name(arch):
        return zoo_tap_candidates(arch, model, in_channels, image_size)
    return TAP_CANDIDATES["resnet" if arch.startswith("resnet") else arch](model)


def build_from_checkpoint(ckpt: dict, path: object) -> nn.Module:
    """A model rebuilt from an edgekd checkpoint's metadata, with its weights loaded."""
    try:
        model = build_model(ckpt["arch"], ckpt["num_classes"], ckpt["in_channels"], ckpt["image_size"],
                            **ckpt.get("model_kwargs", {}))
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0][:120]
        raise EdgekdError(f"checkpoint {path}: weights do not fit its architecture ({first})") from None
    return model
