"""Feature taps by forward hooks, stage shapes, and teacher-student stage pairing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn


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
