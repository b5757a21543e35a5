"""The search space: the candidates a ``search:`` section declares, each a recipe.

A candidate is a student arch (with its width multiplier where the family has one), an input
size, a method, a quantisation (ptq / qat) and, for a ViT, a ToMe r. Every combination of the
section is checked when the search starts, so an impossible one is one line before anything
trains. ``candidate_recipe`` turns a candidate into the recipe its trial distils.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgekd.errors import EdgekdError
from edgekd.losses.methods import METHODS
from edgekd.models import STUDENTS
from edgekd.recipe import Recipe, SearchConfig, _check_arch

WIDTH_FAMILIES = ("mobilenet_v2",)  # edgekd's own students with a channel multiplier
NO_FEATURE_MAPS = ("mlp", "vit")  # students a feature-matching method cannot pair (see edgekd.models)


@dataclass(frozen=True)
class Candidate:
    student: str
    image_size: int
    method: str
    quantization: str = "ptq"
    width_mult: float | None = None  # mobilenet_v2 only
    tome_r: int | None = None  # vit only

    @property
    def key(self) -> str:
        """A readable unique name: ``mobilenet_v2-w0.35-28px-atkd-ptq``; also its folder name."""
        return "-".join(p for p in (self.student.replace("/", "_"), self._width, f"{self.image_size}px",
                                    self.method, self.quantization, self._tome) if p)

    @property
    def arch_key(self) -> str:
        """What the file's size, latency and memory depend on: not the method, not the weights."""
        return "-".join(p for p in (self.student.replace("/", "_"), self._width, f"{self.image_size}px",
                                    self.quantization, self._tome) if p)

    @property
    def _width(self) -> str:
        return f"w{self.width_mult:g}" if self.width_mult is not None else ""

    @property
    def _tome(self) -> str:
        return f"r{self.tome_r}" if self.tome_r else ""

    def params(self) -> dict[str, Any]:
        """The Optuna parameters (conditional ones only where they apply)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "Candidate":
        return cls(**params)


def candidates(cfg: SearchConfig) -> list[Candidate]:
    """Every combination of the space (the brute-force grid), in a fixed order."""
    out = []
    for student, size, method, quant in itertools.product(cfg.students, cfg.image_sizes, cfg.methods,
                                                          cfg.quantization):
        widths = cfg.width_mults if student in WIDTH_FAMILIES else [None]
        tomes = cfg.tome_r if student == "vit" else [None]
        for width, r in itertools.product(widths, tomes):
            out.append(Candidate(student, size, method, quant, width, r))
    return list(dict.fromkeys(out))


def check_space(recipe: Recipe) -> list[Candidate]:
    """The grid of ``recipe.search``, each combination checked; the first bad one is one line."""
    cfg = recipe.search
    where = "search:"
    for field, values in (("students", cfg.students), ("image_sizes", cfg.image_sizes), ("methods", cfg.methods),
                          ("quantization", cfg.quantization)):
        if not values:
            raise EdgekdError(f"{where} {field} is empty; list at least one")
        if len(set(values)) != len(values):
            raise EdgekdError(f"{where} {field} lists a value twice; list each once")
    for arch in cfg.students:
        try:
            _check_arch(arch, tuple(STUDENTS))
        except ValueError as e:
            raise EdgekdError(f"{where} students: {e}") from None
        if "/" in arch:
            from edgekd.models.zoo import check_zoo_name

            check_zoo_name(arch)
    for m in cfg.methods:
        if m not in METHODS:
            raise EdgekdError(f"{where} methods: unknown method '{m}'; choose from {', '.join(METHODS)}")
    for s in cfg.image_sizes:
        if not 8 <= s <= 512:
            raise EdgekdError(f"{where} image_sizes: {s} px is outside 8..512")
    for w in cfg.width_mults:
        if not 0 < w <= 2:
            raise EdgekdError(f"{where} width_mults: {w} is outside (0, 2]")
    grid = candidates(cfg)
    for c in grid:
        _check_candidate(c, recipe)
    return grid


def _check_candidate(c: Candidate, recipe: Recipe) -> None:
    method = METHODS[c.method]
    if method.needs_features and c.student in NO_FEATURE_MAPS:
        raise EdgekdError(f"search: {c.student} with method {c.method} is impossible (a {c.student} has no feature "
                          f"maps to match); drop one of them or use methods such as kd")
    if c.student == "vit":
        patch = recipe.student.patch_size
        if c.image_size % patch:
            raise EdgekdError(f"search: vit at {c.image_size} px does not split into {patch}-px patches; use sizes "
                              f"that are multiples of student.patch_size ({patch})")
        tokens = (c.image_size // patch) ** 2
        if c.tome_r and c.tome_r * recipe.student.depth >= tokens:
            raise EdgekdError(f"search: tome_r {c.tome_r} merges {c.tome_r * recipe.student.depth} of {tokens} tokens "
                              f"of a vit at {c.image_size} px; use a smaller r")
        if c.tome_r and c.quantization == "qat":
            raise EdgekdError("search: QAT of a ToMe vit is not supported; use quantization [ptq] with tome_r")


def candidate_recipe(base: Recipe, c: Candidate, teacher: Path | None, *, proxy: bool) -> Recipe:
    """The recipe of one candidate: the base recipe with the candidate's student, size, method and
    quantisation, the search's teacher (trained once, at its own size), and at the proxy budget
    when ``proxy``; its own search: section is the default (it searches nothing)."""
    data = base.model_dump()
    data.pop("search")
    data["name"] = f"{base.name}-{c.key}"
    data["student"].update(arch=c.student, **({"width_mult": c.width_mult} if c.width_mult is not None else {}),
                           **({"tome_r": c.tome_r} if c.tome_r is not None else {}))
    data["data"]["image_size"] = c.image_size
    data["distill"]["method"] = c.method
    data["distill"]["qat"]["epochs"] = base.search.qat_epochs if c.quantization == "qat" else 0.0
    if teacher is not None:
        data["teacher"].update(checkpoint=str(teacher), epochs=0, weights=None, pretrained=False)
    if proxy:
        data["student"]["epochs"] = base.search.proxy.epochs
        data["distill"]["baseline"] = False
        if base.search.proxy.train_subset is not None:
            data["data"]["train_subset"] = base.search.proxy.train_subset
    return Recipe.model_validate(data)


def suggest(trial: Any, cfg: SearchConfig) -> dict[str, Any]:
    """A candidate's parameters from an Optuna trial; the width and ToMe r only where they apply
    (an enqueued trial, such as a grid point, gets its own values back)."""
    params: dict[str, Any] = {
        "student": trial.suggest_categorical("student", cfg.students),
        "image_size": trial.suggest_categorical("image_size", cfg.image_sizes),
        "method": trial.suggest_categorical("method", cfg.methods),
        "quantization": trial.suggest_categorical("quantization", cfg.quantization),
    }
    if params["student"] in WIDTH_FAMILIES:
        params["width_mult"] = trial.suggest_categorical("width_mult", cfg.width_mults)
    if params["student"] == "vit":
        params["tome_r"] = trial.suggest_categorical("tome_r", cfg.tome_r)
    return params
