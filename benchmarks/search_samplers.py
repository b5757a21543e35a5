"""Is the search's miss the sampler's or the trial budget's? Samplers replayed on the measured grid.

Also how a new study starts: from the sampler's first pick, or from the budget frontier
(``edgekd.search.frontier``: the candidates that spend the most of the budget, trained first).

``benchmarks/search.md`` runs 3 sampler seeds per budget; one p90 search of the six missed the
grid's best by more than 0.5 pt. This replays the same search loop (``edgekd.search.stage``: the
study, the repeat-pick hand-over, the constraints) over the grid's measured table instead of
training: a candidate's objective is its grid val top-1 and its p90 / size are the grid's (the
untrained file measures the same: latency and size do not depend on the weights). So each sampler
can be run over many seeds in seconds. Same budgets and trial count as search.json.

    python benchmarks/search_samplers.py --seeds 20     # writes benchmarks/search_samplers.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from edgekd.checkpoint import write_text  # noqa: E402
from edgekd.recipe import load_recipe  # noqa: E402
from edgekd.search import SearchTarget  # noqa: E402
from edgekd.search.stage import _open_study, _optimize  # noqa: E402  (the loop under test, as tests/test_search.py)

SAMPLERS = {  # name -> factory(seed, n): the search's own first, then the alternatives Optuna offers
    "tpe (edgekd's)": lambda s, n: _optuna().samplers.TPESampler(seed=s, n_startup_trials=max(2, min(10, n // 3)),
                                                                  constant_liar=True),
    "tpe multivariate": lambda s, n: _optuna().samplers.TPESampler(
        seed=s, n_startup_trials=max(2, min(10, n // 3)), constant_liar=True, multivariate=True, group=True),
    "gp": lambda s, n: _optuna().samplers.GPSampler(seed=s, n_startup_trials=2),
    "random": lambda s, n: _optuna().samplers.RandomSampler(seed=s),
}


def _optuna():
    import optuna

    return optuna


class _GridRunner:
    """The trial runner with the grid's measured figures in place of distil, export and time."""

    def __init__(self, recipe, grid: dict, key: str, limit: float):
        self.recipe, self.grid, self.key, self.limit, self.trained = recipe, grid, key, limit, []
        self.budget = {key: limit}

    def measure_untrained(self, c) -> dict:
        return {"p90_ms": self.grid[c.key]["p90_ms"], "size_mb": self.grid[c.key]["size_mb"]}

    def run(self, trial, c) -> float:
        g = self.grid[c.key]
        measured = {"p90_ms": g["p90_ms"], "size_mb": g["size_mb"]}
        trial.set_user_attr("config", c.key)
        trial.set_user_attr("untrained", measured)
        trial.set_constraint(self.key, g[self.key] - self.limit)
        if g[self.key] > self.limit:  # screened: measured over budget, never trained (as TrialRunner.run)
            trial.set_user_attr("over", f"untrained file: {self.key} {g[self.key]} > {self.limit}")
            return 0.0
        trial.set_user_attr("measured", measured)
        self.trained.append(c.key)
        return g["val_top1"]


def _gap(recipe, grid: dict, sampler, key: str, limit: float, n: int) -> float:
    """The grid's best inside the budget minus the best the search trained (points)."""
    with tempfile.TemporaryDirectory() as d:
        study = _open_study(recipe, {key: limit}, SearchTarget(bench=recipe.bench), f"sqlite:///{d}/study.db", n)
        study.sampler = sampler
        runner = _GridRunner(recipe, grid, key, limit)
        _optimize(study, runner, n, None)
    best = max(g["val_top1"] for g in grid.values() if g[key] <= limit)
    return best - max((grid[k]["val_top1"] for k in runner.trained), default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=20)
    args = ap.parse_args()
    rep = json.loads((HERE / "search.json").read_text())
    grid = {g["config"]: g for g in rep["grid"] if g["val_top1"] is not None}
    budgets = [("p90_ms", float(b)) for b in rep["grid_best"]] + [("size_mb", float(b)) for b in rep["grid_best_size"]]
    n, tol = rep["search_trials"], rep["tolerance_pt"]
    _optuna().logging.set_verbosity(_optuna().logging.ERROR)
    warnings.simplefilter("ignore")  # GPSampler and the heartbeat are marked experimental
    lines = ["# Is the search's miss the sampler's or the trial budget's?", "",
             f"Made by `python benchmarks/search_samplers.py --seeds {args.seeds}` (see its docstring): the search "
             f"loop replayed over the {len(grid)} configurations measured in `search.json`, {n} trials, "
             f"{args.seeds} seeds per sampler and budget. Each cell: searches whose best trained candidate is within "
             f"{tol} pt of the grid's best inside the budget, and the mean gap.", "",
             "`start`: how the study begins (`sampler`: the sampler picks every trial; `frontier`, the default "
             "since this table: every untrained file measured, the budget frontier trained first, then the sampler).",
             "",
             "| start | sampler | trials | " + " | ".join(f"{k} <= {b:g}" for k, b in budgets) + " |",
             "|---|---|---|" + "---|" * len(budgets)]
    # every sampler from the first trial at the search's trial count, then edgekd's with more trials: which
    # one moves the hit rate; then the search as it starts a new study (search.start: frontier)
    tpe = next(iter(SAMPLERS))
    rows = ([("sampler", name, n) for name in SAMPLERS] + [("sampler", tpe, m) for m in (n * 3 // 2, n * 2)]
            + [("frontier", tpe, n), ("frontier", "random", n)])
    for start, name, trials in rows:
        cells = []
        for key, limit in budgets:
            gaps = []
            for seed in range(args.seeds):
                rec = load_recipe("fashion_mnist_search")
                rec = rec.model_copy(update={"search": rec.search.model_copy(update={"sampler_seed": seed,
                                                                                    "start": start})})
                gaps.append(_gap(rec, grid, SAMPLERS[name](seed, trials), key, limit, trials))
            cells.append(f"{sum(g <= tol for g in gaps)}/{len(gaps)} (gap {statistics.mean(gaps):.2f})")
        lines.append(f"| {start} | {name} | {trials} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    write_text(HERE / "search_samplers.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
