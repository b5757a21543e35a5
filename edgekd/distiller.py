"""``Distiller``: a student, an optional frozen teacher, taps on their paired stages, and a
method; ``forward(x, y)`` returns the student's logits and the weighted loss terms."""

from __future__ import annotations

import torch
import torch.nn as nn

from edgekd.losses.methods import Method, Outputs
from edgekd.models import FeatureTaps, StagePair
from edgekd.recipe import DistillConfig


class Distiller(nn.Module):
    def __init__(self, student: nn.Module, method: Method, cfg: DistillConfig, *, teacher: nn.Module | None = None,
                 pairs: list[StagePair] | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if method.needs_teacher and teacher is None:
            raise ValueError(f"method '{method.name}' needs a teacher")
        self.student, self.method, self.cfg, self.label_smoothing = student, method, cfg, label_smoothing
        self.teacher = teacher if method.needs_teacher else None
        if self.teacher is not None:
            self.teacher.eval().requires_grad_(False)
        self.pairs = list(pairs or []) if method.needs_features else []
        self.regressors = None
        if method.needs_regressors:
            self.regressors = nn.ModuleList(
                nn.Sequential(nn.Conv2d(p.student_shape[0], p.teacher_shape[0], 1, bias=False),
                              nn.BatchNorm2d(p.teacher_shape[0]))
                for p in self.pairs
            )
        # a student that returns its own features (a QAT graph, edgekd.qat) brings its taps along
        self._s_taps = (getattr(student, "feature_taps", None) or FeatureTaps(student, [p.student for p in self.pairs])
                        if self.pairs else None)
        self._t_taps = FeatureTaps(self.teacher, [p.teacher for p in self.pairs]) if self.pairs else None

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher's BatchNorm statistics stay put
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.student.parameters())
        if self.regressors is not None:
            params += list(self.regressors.parameters())
        return params

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s_logits = self.student(x)
        s = Outputs(s_logits, self._s_taps.features if self._s_taps else [])
        t = None
        if self.teacher is not None:
            with torch.no_grad():
                t_logits = self.teacher(x)
            t = Outputs(t_logits, self._t_taps.features if self._t_taps else [])
        terms = self.method.loss(s, t, y, self.cfg, self.label_smoothing, self.regressors)
        for taps in (self._s_taps, self._t_taps):
            if taps is not None:
                taps.clear()  # drop references so activations can be freed
        return s_logits, terms

    def remove_taps(self) -> None:
        for taps in (self._s_taps, self._t_taps):
            if taps is not None:
                taps.remove()
