"""One trial of a search, through the stage functions: measure first, train second.

Size, latency and memory do not depend on the weight values, so a candidate's int8 file is
first exported from its initial weights (calibrated on real images, as always) and measured on
the target; a candidate over budget is recorded with those figures and never trained. The
others are distilled at the proxy budget from the search's one teacher, exported (scored on
validation images: only they choose), and measured again as trained. A QAT candidate's
untrained file is its PTQ twin; its trained QAT file is what the budget is finally held to.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import yaml

from edgekd import artifacts
from edgekd.checkpoint import write_text
from edgekd.distill.stage import initial_student, train_teacher
from edgekd.errors import EdgekdError
from edgekd.losses.methods import METHODS
from edgekd.pipeline import ensure_distilled, ensure_exported
from edgekd.recipe import Recipe
from edgekd.runner import exclusive_lock
from edgekd.search.budget import format_budget, over_budget, violations
from edgekd.search.measure import INT8, SearchTarget, measure
from edgekd.search.space import Candidate, candidate_recipe

log = logging.getLogger(__name__)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (a sibling ``.lock`` file): workers sharing a folder take
    turns at one run dir, and the second finds the first one's results."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(str(path.with_name(path.name + ".lock"))):
        yield


def shared_teacher(recipe: Recipe, teacher_dir: Path, study: Any, progress: Any = None) -> Path | None:
    """The search's one teacher: ``teacher.checkpoint``, else trained once into ``teacher_dir``
    at the recipe's own input size (None when no method of the space uses a teacher)."""
    if not any(METHODS[m].needs_teacher for m in recipe.search.methods):
        return None
    if recipe.teacher.checkpoint:
        path = Path(recipe.teacher.checkpoint)
        if not path.is_file():
            raise EdgekdError(f"teacher.checkpoint {path}: no such file; fix the path or unset it to train one")
    else:
        with locked(teacher_dir):
            path = train_teacher(recipe, teacher_dir, progress)
    sha = artifacts.sha256(path)
    seen = study.user_attrs.get("teacher_sha256")
    if seen is None:
        study.set_user_attr("teacher_sha256", sha)
    elif seen != sha:  # another worker's teacher: both are the recipe's, trained apart
        log.warning("this worker's teacher (%s) differs from the study's first one (sha256 %s…); give every worker "
                    "the same teacher.checkpoint to compare trials from one teacher", path, seen[:12])
    return path


class _PruningProgress:
    """Forwards the trainer's progress and reports the student's validation curve to Optuna; a
    trial clearly behind the others is pruned before its last epoch (after it, only the export
    is left to save)."""

    def __init__(self, trial: Any, epochs: int, inner: Any) -> None:
        self.trial, self.epochs, self.inner = trial, epochs, inner

    def start(self, label: str, total: int) -> None:
        if self.inner:
            self.inner.start(label, total)

    def advance(self, n: int) -> None:
        if self.inner:
            self.inner.advance(n)

    def end_epoch(self, role: str, row: dict[str, float]) -> None:
        import optuna

        if self.inner:
            self.inner.end_epoch(role, row)
        epoch = int(row["epoch"])
        if role == "student" and epoch < self.epochs and not math.isnan(row["val_top1"]):
            self.trial.report(row["val_top1"], epoch)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"validation top-1 {row['val_top1']:.2f} % after epoch {epoch}")


class TrialRunner:
    """Runs trials and the final retraining of one search (the objective's body)."""

    def __init__(self, recipe: Recipe, teacher: Path | None, budget: dict[str, float], target: SearchTarget,
                 study: Any, trial_dir: Path, progress: Any = None) -> None:
        self.recipe, self.teacher, self.budget, self.target = recipe, teacher, budget, target
        self.study, self.trial_dir, self.progress = study, Path(trial_dir), progress

    # the study is the cache every worker shares: figures by architecture and by file SHA-256
    def _get(self, key: str) -> dict[str, Any] | None:
        return self.study.user_attrs.get(key)

    def _put(self, key: str, value: dict[str, Any]) -> None:
        self.study.set_user_attr(key, value)

    def run(self, trial: Any, c: Candidate) -> float:
        """The objective: the int8 file's validation top-1 (0 for a candidate over budget untrained)."""
        trial.set_user_attr("config", c.key)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        try:
            untrained = self.measure_untrained(c)
            trial.set_user_attr("untrained", untrained)
            over = over_budget(untrained, self.budget)
            if over:  # not worth training: no weights make this file smaller or faster
                trial.set_user_attr("over", "untrained file: " + "; ".join(over))
                _constrain(trial, untrained, self.budget)
                return 0.0
            recipe = candidate_recipe(self.recipe, c, self.teacher, proxy=True)
            run_dir = self.trial_dir / c.key
            report = self.train_and_export(recipe, run_dir, _PruningProgress(trial, recipe.student.epochs,
                                                                             self.progress))
            measured = measure(run_dir / artifacts.EXPORT_DIR, self.target, self._get, self._put)
            int8 = report["artifacts"][INT8]
            trial.set_user_attr("measured", measured)
            trial.set_user_attr("run_dir", str(run_dir))
            trial.set_user_attr("fp32_val_top1", _fp32_val(run_dir))
            trial.set_user_attr("quantization_used", int8.get("quantization", "ptq"))
            _constrain(trial, measured, self.budget)
            if over_budget(measured, self.budget):
                trial.set_user_attr("over", "trained file: " + "; ".join(over_budget(measured, self.budget)))
            return float(int8["val_top1"])
        except EdgekdError as e:
            trial.set_user_attr("error", str(e))
            raise

    def measure_untrained(self, c: Candidate) -> dict[str, Any]:
        """The candidate's file at its initial weights, measured on the target (once per architecture)."""
        twin = replace(c, quantization="ptq")
        key = f"untrained:{self.target.id}:{twin.arch_key}"
        hit = self._get(key)
        if hit is not None:
            return {**hit, "cached": True}
        run_dir = self.trial_dir / "untrained" / twin.arch_key
        with locked(run_dir):
            hit = self._get(key)  # measured by another worker while this one waited
            if hit is not None:
                return {**hit, "cached": True}
            recipe = candidate_recipe(self.recipe, twin, self.teacher, proxy=True)
            if not (run_dir / artifacts.best_checkpoint("student")).is_file():
                initial_student(recipe, run_dir)
            ensure_exported(recipe.export.model_copy(update={"formats": []}), run_dir, recipe.student.arch)
            figures = measure(run_dir / artifacts.EXPORT_DIR, self.target, self._get, self._put)
        self._put(key, figures)
        return figures

    def train_and_export(self, recipe: Recipe, run_dir: Path, progress: Any,
                         formats: list[str] | None = None) -> dict[str, Any]:
        """Distil (or resume, or reuse) ``recipe`` into ``run_dir`` and export its int8 file, scored
        on validation images; export.json."""
        with locked(run_dir):
            ensure_distilled(recipe, run_dir, progress)
            report, _ = ensure_exported(recipe.export.model_copy(update={"formats": formats or []}), run_dir,
                                        recipe.student.arch, val=True)
        return report

    def retrain_best(self, rows: list[dict[str, Any]], front: list[int], k: int,
                     final_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """The best ``k`` trials of the front inside the budgets, retrained at the recipe's budget,
        exported and measured; the winner (measured once more, uncached) or None. With k = 0 the
        best trial that holds its budget measured again is the winner (a p90 near the budget may not:
        benchmarks/search's seed 1 at 0.242 ms lost its best trial so and returned none)."""
        inside = sorted((r for r in rows if r["number"] in front and r["state"] == "complete"),
                        key=lambda r: -r["val_top1"])
        finals = []
        for r in inside[:k]:
            c = Candidate.from_params(r["params"])
            recipe = candidate_recipe(self.recipe, c, self.teacher, proxy=False)
            run_dir = final_dir / c.key
            report = self.train_and_export(recipe, run_dir, self.progress, formats=list(recipe.export.formats))
            measured = measure(run_dir / artifacts.EXPORT_DIR, self.target, self._get, self._put)
            finals.append({"trial": r["number"], "config": c.key, "params": r["params"], "proxy": False,
                           "val_top1": report["artifacts"][INT8]["val_top1"], "measured": measured,
                           "within_budget": not over_budget(measured, self.budget), "run_dir": str(run_dir)})
        if k == 0:  # the trials themselves, best first, until one holds its budget measured again
            finals = [{"trial": r["number"], "config": r["config"], "params": r["params"], "proxy": True,
                       "val_top1": r["val_top1"], "measured": r["measured"], "within_budget": True,
                       "run_dir": r["run_dir"]} for r in inside]
        for i, f in enumerate(sorted((f for f in finals if f["within_budget"]), key=lambda f: -f["val_top1"])):
            export_dir = Path(f["run_dir"]) / artifacts.EXPORT_DIR
            again = measure(export_dir, self.target, self._get, self._put, cached=False)
            f["remeasured"] = again
            broken = over_budget(again, self.budget)
            if broken:  # a winner must hold its budget when measured again
                f["within_budget"] = False
                f["why_not"] = "over budget when measured again: " + "; ".join(broken)
                continue
            report = artifacts.read_json(export_dir / artifacts.EXPORT_REPORT) or {}
            return (finals if k else finals[:i + 1]), {**f, "test_top1": report["artifacts"][INT8]["test_top1"],
                                                       "export_dir": str(export_dir)}
        return finals, None

    def write_best_recipe(self, winner: dict[str, Any], path: Path) -> Path:
        """A recipe that reproduces the winner (``edgekd run DIR/best.yaml``), gated on the budgets."""
        c = Candidate.from_params(winner["params"])
        recipe = candidate_recipe(self.recipe, c, self.teacher, proxy=winner["proxy"])
        data = recipe.model_dump()
        data.pop("search")
        gate = {"p50_ms": "max_p50_ms", "p90_ms": "max_p90_ms", "size_mb": "max_size_mb"}
        data["gate"].update({gate[k]: v for k, v in self.budget.items() if k in gate})
        head = (f"# edgekd search winner: {c.key}, int8 validation top-1 {winner['val_top1']:.2f} %, "
                f"under {format_budget(self.budget)} on {self.target.id}\n"
                f"# reproduce: edgekd run {path}\n")
        write_text(path, head + yaml.safe_dump(data, sort_keys=False))
        return path


def _constrain(trial: Any, measured: dict[str, float], budget: dict[str, float]) -> None:
    """The budgets as the trial's constraints: measured - limit per key (feasible when all <= 0)."""
    for key, value in violations(measured, budget).items():
        trial.set_constraint(key, value)


def _fp32_val(run_dir: Path) -> float | None:
    metrics = artifacts.read_json(run_dir / artifacts.METRICS) or {}
    return (metrics.get("student") or {}).get("val_top1")
