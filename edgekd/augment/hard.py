"""HARD's alternating game (Nix, Burg & Sinz 2023, eq. 1–3) around a student and a frozen teacher.

The augmentor maximises ``λs·D(s(x̃), t(x̃)) − λt·D(t(x̃), t(x))`` (the second term only for
augmentors with ``teacher_invariance``); the student minimises ``D(s(x̃), t(x̃))`` on top of its
method's own terms on the clean batch. D is the temperature-scaled KL of ``softmax_kl``.

Switching rule (phased augmentors): the student trains until its top-1 disagreement with the
teacher on augmented batches stays below ``l_min`` percent for ``k`` consecutive iterations;
then the augmentor trains until that disagreement stays above ``l_max`` for ``k`` iterations,
is saved into the pool, and the student trains again, each iteration on a random saved
augmentor (against forgetting). The pool starts with the identity augmentor. Unphased
augmentors (hard-mix) take one augmentor step and one student step every iteration.

``max_phase`` (not in the paper) ends an augmentor phase that has not reached ``l_max`` within
that many iterations, saving its augmentor all the same: measured on Fashion-MNIST
(benchmarks/hard_converged.md), an augmentor held back by the teacher-invariance term plateaued
at 12.5 % disagreement against ℓmax 50 % for ~1,280 iterations, the student took no step, and
early stopping ended the run after 5 switches.

The switching metric is the disagreement on augmented batches in percent (``threshold=
"absolute"``, the paper's reading), or that minus the disagreement the student already has on the
same batch un-augmented (``"relative"``: what the augmentation adds), for a student that never
gets within ℓmin of its teacher even on clean images.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from edgekd.augment.base import Augmentor
from edgekd.losses.terms import softmax_kl
from edgekd.distributed import all_reduce_mean_


def _disagreement(s_logits: torch.Tensor, t_logits: torch.Tensor) -> float:
    """Top-1 disagreement in percent, averaged over ranks so that every rank switches together."""
    d = 100.0 * (s_logits.detach().argmax(1) != t_logits.detach().argmax(1)).float().mean().view(1)
    all_reduce_mean_([d])
    return float(d.item())


class HardTraining:
    def __init__(self, augmentor: Augmentor, *, mean: torch.Tensor, std: torch.Tensor, temperature: float,
                 lambda_s: float = 1.0, lambda_t: float = 1.0, weight: float = 1.0, l_min: float | None = None,
                 l_max: float | None = None, consecutive: int = 5, lr: float | None = None,
                 threshold: str = "absolute", max_phase: int | None = None) -> None:
        self.augmentor = augmentor
        self.frozen = copy.deepcopy(augmentor).requires_grad_(False)  # the pool member in use
        self.mean, self.std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
        self.t, self.lambda_s, self.lambda_t, self.weight = temperature, lambda_s, lambda_t, weight
        self.l_min = augmentor.l_min if l_min is None else l_min
        self.l_max = augmentor.l_max if l_max is None else l_max
        self.k = consecutive
        self.max_phase = max_phase
        if threshold not in ("absolute", "relative"):
            raise ValueError(f"threshold must be absolute or relative, not {threshold!r}")
        self.relative = threshold == "relative"
        self.optimizer = torch.optim.Adam(augmentor.parameters(), lr=lr or augmentor.lr)
        self.pool: list[dict[str, torch.Tensor]] = [self._snapshot()]
        self.phase = "student" if augmentor.phased else "joint"
        self.streak, self.iteration, self.switches = 0, 0, 0
        self.phase_iterations, self.capped = 0, 0  # iterations in this augmentor phase; phases ended by the cap
        self.phase_log: list[list[Any]] = []  # [iteration, phase, disagreement %]
        self._picks = torch.Generator().manual_seed(0)

    def start_epoch(self, seed: int) -> None:
        """Which saved augmentor each student iteration draws depends only on ``seed``."""
        self._picks = torch.Generator().manual_seed(seed)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.augmentor.state_dict().items()}

    def _augment(self, module: nn.Module, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Normalised batch in, normalised augmented batch out (augmentors work in [0, 1])."""
        return (module(x * self.std + self.mean, generator) - self.mean) / self.std

    def switch_metric(self, augmented: float, clean: float) -> float:
        """What the thresholds are compared with: the augmented disagreement, less the clean one
        when relative (both in percent)."""
        return augmented - clean if self.relative else augmented

    @torch.no_grad()
    def _clean_disagreement(self, student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
        if not self.relative:
            return 0.0
        was_training = student.training
        student.eval()
        d = _disagreement(student(x), teacher(x))
        student.train(was_training)
        return d

    @property
    def augmentor_turn(self) -> bool:
        return self.phase in ("augmentor", "joint")

    def augmentor_step(self, student: nn.Module, teacher: nn.Module, x: torch.Tensor,
                       generator: torch.Generator) -> float:
        """One ascent step of the augmentor; the student and teacher are only read (eval mode,
        gradients to the augmentor's parameters alone). Returns the disagreement in percent."""
        was_training = student.training
        student.eval()
        x_aug = self._augment(self.augmentor, x, generator)
        s_aug, t_aug = student(x_aug), teacher(x_aug)
        gain = self.lambda_s * softmax_kl(t_aug, s_aug, self.t)
        if self.augmentor.teacher_invariance:
            with torch.no_grad():
                t_clean = teacher(x)
            gain = gain - self.lambda_t * softmax_kl(t_clean, t_aug, self.t)
        params = [p for p in self.augmentor.parameters() if p.requires_grad]
        grads = torch.autograd.grad(-gain, params)
        all_reduce_mean_(list(grads))  # under DDP every rank's augmentor takes the same step
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        student.train(was_training)
        disagreement = self.switch_metric(_disagreement(s_aug, t_aug), self._clean_disagreement(student, teacher, x))
        if self.phase == "augmentor":
            self.phase_iterations += 1
            self._count(disagreement > self.l_max, to="student", disagreement=disagreement)
            if self.phase == "augmentor" and self.max_phase and self.phase_iterations >= self.max_phase:
                self.capped += 1
                self._switch("student")
        return disagreement

    def student_term(self, student: nn.Module, teacher: nn.Module, x: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, float]:
        """``weight·D(s(x̃), t(x̃))`` on a batch augmented by a random saved augmentor (the current
        one for unphased augmentors), and the disagreement in percent."""
        if self.phase == "joint":
            self.frozen.load_state_dict(self.augmentor.state_dict())
        else:
            self.frozen.load_state_dict(self.pool[int(torch.randint(len(self.pool), (1,), generator=self._picks))])
        with torch.no_grad():
            x_aug = self._augment(self.frozen, x, generator)
            t_aug = teacher(x_aug)
        s_aug = student(x_aug)
        term = self.weight * softmax_kl(t_aug, s_aug, self.t)
        return term, self.switch_metric(_disagreement(s_aug, t_aug), self._clean_disagreement(student, teacher, x))

    def end_iteration(self, disagreement: float) -> None:
        """Log the iteration and apply the switching rule of the student phase."""
        self.phase_log.append([self.iteration, self.phase, round(disagreement, 2)])
        self.iteration += 1
        if self.phase == "student":
            self._count(disagreement < self.l_min, to="augmentor", disagreement=disagreement)

    def _count(self, beyond: bool, to: str, disagreement: float) -> None:
        self.streak = self.streak + 1 if beyond else 0
        if self.streak >= self.k:
            self._switch(to)

    def _switch(self, to: str) -> None:
        if to == "student":
            self.pool.append(self._snapshot())  # the augmentor that made the student fail (or tried longest)
        self.phase, self.streak, self.phase_iterations = to, 0, 0
        self.switches += 1

    def state_dict(self) -> dict[str, Any]:
        return {"augmentor": self.augmentor.state_dict(), "optimizer": self.optimizer.state_dict(),
                "pool": self.pool, "phase": self.phase, "streak": self.streak, "iteration": self.iteration,
                "switches": self.switches, "phase_log": self.phase_log, "phase_iterations": self.phase_iterations,
                "capped": self.capped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.augmentor.load_state_dict(state["augmentor"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.pool = list(state["pool"])
        self.phase, self.streak = state["phase"], state["streak"]
        self.iteration, self.switches = state["iteration"], state["switches"]
        self.phase_log = [list(r) for r in state["phase_log"]]
        # checkpoints written before the cap existed have neither: a phase starts counting anew
        self.phase_iterations, self.capped = state.get("phase_iterations", 0), state.get("capped", 0)
