"""``search(recipe, out_dir, budget, target) -> SearchResult``: the best int8 student for a
board under its budgets, every candidate distilled and measured on the board.

The engine is Optuna: one study in an RDB storage (``DIR/study.db`` by default, or any database
URL, so workers on several machines share it), maximising the int8 file's validation top-1 with
the budgets as constraints. A new study first measures every candidate's untrained file (seconds
each) and queues the budget's frontier, the candidates that spend the most of it (``frontier``);
the sampler goes on from there (``search.start: sampler`` leaves it all to the sampler). Each
trial calls the stages (``edgekd.search.trial``); nothing is re-implemented here. Then the best
k trials of the Pareto front inside the budgets are retrained at the recipe's own budget, and the
best of them is the winner (``DIR/best.yaml`` reproduces it).

A killed search continues when the same command runs again: finished trials are in the study;
a trial whose worker died stops beating (Optuna's heartbeat), is failed after ``GRACE_S`` and run
again (once) from its run dir's last epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgekd import __version__
from edgekd.bench import SSHOptions, check_reachable
from edgekd.errors import EdgekdError
from edgekd.recipe import Recipe
from edgekd.search.budget import format_budget
from edgekd.search.frontier import budget_frontier
from edgekd.search.measure import SearchTarget
from edgekd.search.report import pareto_front, trial_rows, write_search_report
from edgekd.search.space import Candidate, candidates, check_space, suggest
from edgekd.search.trial import TrialRunner, shared_teacher

log = logging.getLogger(__name__)
HEARTBEAT_S, GRACE_S = 5, 20  # a worker's running trial beats every 5 s; silent for 20 s, it is failed
# a sampler that keeps proposing tried candidates (this many times the space's size) ends the search
MAX_DUPLICATES = 4


class SearchProgress(Protocol):
    """What the search reports while it runs; the CLI draws it."""

    def trial_started(self, number: int, done: int, total: int, label: str) -> None: ...
    def trial_ended(self, row: dict[str, Any], done: int, total: int, best: dict[str, Any] | None) -> None: ...


@dataclass
class SearchResult:
    out_dir: Path
    study_name: str
    storage: str
    trials: list[dict[str, Any]]
    front: list[int]  # trial numbers on the Pareto front (val top-1 against p90)
    finals: list[dict[str, Any]]  # the best k, retrained at the recipe's budget
    winner: dict[str, Any] | None
    best_recipe: Path | None
    files: list[Path] = field(default_factory=list)


def search(recipe: Recipe, out_dir: str | Path, *, budget: dict[str, float], target: SearchTarget,
           trials: int | None = None, storage: str | None = None, progress: SearchProgress | None = None,
           distill_progress: Any = None, trial_dir: Path | None = None, best_k: int | None = None) -> SearchResult:
    """Search ``recipe.search``'s space for the best int8 student on ``target`` under ``budget``.
    ``trial_dir``: where trial runs live (default ``DIR/trials``; one config's run is reused)."""
    check_space(recipe)
    b = target.bench
    check_reachable(target.device, target.hosts, b.runs, b.samples, b.warmup,  # before anything trains
                    target.ssh or SSHOptions(port=b.port))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EdgekdError(f"--out {out} is a file, not a folder; choose another --out")
    n = trials or recipe.search.trials
    if storage is None:  # the default study lives in the out dir
        out.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{(out / 'study.db').resolve()}"
    study = _open_study(recipe, budget, target, storage, n)  # a bad --study URL is refused before DIR is made
    out.mkdir(parents=True, exist_ok=True)
    teacher = shared_teacher(recipe, out / "teacher", study, distill_progress)
    runner = TrialRunner(recipe, teacher, budget, target, study, trial_dir or out / "trials", distill_progress)
    _optimize(study, runner, n, progress)
    rows = trial_rows(study, budget)
    front = pareto_front(rows)
    finals, winner = runner.retrain_best(rows, front, recipe.search.best_k if best_k is None else best_k,
                                         out / "final")
    best_yaml = runner.write_best_recipe(winner, out / "best.yaml") if winner else None
    files = write_search_report(out, recipe, study.study_name, storage, budget, target, rows, front, finals, winner)
    return SearchResult(out, study.study_name, storage, rows, front, finals, winner, best_yaml,
                        files + ([best_yaml] if best_yaml else []))


def study_name(recipe: Recipe, budget: dict[str, float], target: SearchTarget) -> str:
    """The same command names the same study; another space, budget, target or base recipe another."""
    spec = recipe.model_dump()
    # how many trials, how the winner is chosen and how a new study starts do not change a trial
    spec["search"] = {k: v for k, v in spec["search"].items() if k not in ("trials", "best_k", "budget", "start")}
    spec.pop("bench"), spec.pop("gate")
    key = json.dumps({"recipe": spec, "budget": budget, "target": target.id, "edgekd": __version__}, sort_keys=True)
    return f"{recipe.name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _open_study(recipe: Recipe, budget: dict[str, float], target: SearchTarget, storage_url: str, n: int) -> Any:
    import optuna

    storage = _storage(storage_url)
    cfg = recipe.search
    # the budgets are the trials' constraints (Trial.set_constraint, trial.py): TPE models the
    # feasible trials apart from the infeasible ones; constant_liar keeps workers off one point
    sampler = optuna.samplers.TPESampler(seed=cfg.sampler_seed, n_startup_trials=max(2, min(10, n // 3)),
                                         constant_liar=True)
    # the proxy's epochs are its steps; a trial is pruned only before its last one (see trial.py),
    # and only when clearly behind: the bottom quarter, once 4 trials have reported
    pruner = (optuna.pruners.PercentilePruner(25.0, n_startup_trials=4, n_warmup_steps=0) if cfg.prune
              else optuna.pruners.NopPruner())
    study = optuna.create_study(storage=storage, study_name=study_name(recipe, budget, target), sampler=sampler,
                                pruner=pruner, direction="maximize", load_if_exists=True)
    study.set_user_attr("budget", format_budget(budget))
    study.set_user_attr("target", target.id)
    return study


def _storage(storage_url: str) -> Any:
    """The study's RDB storage, with Optuna's heartbeat; on SQLite, each transaction serialised."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    engine = {"connect_args": {"timeout": 60}} if storage_url.startswith("sqlite") else {}
    for attempt in range(5):
        try:  # the retry callback runs a dead worker's trial again (once): its run dir resumes
            with warnings.catch_warnings():  # the heartbeat is marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = RDBStorage(storage_url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                                     grace_period=GRACE_S,
                                     heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
            break
        except Exception as e:  # noqa: BLE001 - SQLAlchemy's many errors: one line for the user
            # workers that start together race to create the tables (measured: "UNIQUE constraint
            # failed: alembic_version"; SQLite may also say "table ... already exists" or "database is
            # locked"); the loser finds them made a moment later
            if any(w in str(e).lower() for w in ("constraint", "already exists", "locked")) and attempt < 4:
                time.sleep(1 + attempt)
                continue
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise EdgekdError(f"--study {storage_url}: cannot open it as an Optuna storage ({first}); give a "
                              "database URL such as sqlite:///search.db or postgresql://user@host/db") from None
    if storage_url.startswith("sqlite"):
        _serialise_sqlite(storage.engine)
    return storage


def _serialise_sqlite(engine: Any) -> None:
    """Python's sqlite3 opens a transaction only at the first write, so the read of Optuna's
    "pop a queued trial" (SELECT ... FOR UPDATE, which SQLite ignores) runs outside it: two
    workers both read WAITING and both run the trial (measured: 2 of 5 runs of 3 processes on 20
    queued trials; the second then fails "Cannot tell a COMPLETE trial"). SQLAlchemy's recipe for
    pysqlite: no implicit transactions, and each one begun IMMEDIATE, which takes the write lock
    at its start; a second worker waits (up to the 60 s timeout) and then reads the trial RUNNING."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the hooks are closed; new ones get them


def _optimize(study: Any, runner: TrialRunner, n: int, progress: SearchProgress | None) -> None:
    """Run trials until the study holds ``n`` finished ones, all workers together; then wait for
    the running ones (another worker's, or a dead worker's until it is failed and retried)."""
    import optuna

    def objective(trial: Any) -> float:
        c = Candidate.from_params(suggest(trial, runner.recipe.search))
        twin = _tried(study, trial.number).get(c.key)
        if twin is not None:  # a categorical sampler comes back to tried points: they cost and count nothing
            trial.set_user_attr("config", c.key)
            trial.set_user_attr("duplicate_of", twin)
            done, running, waiting, _ = _counts(study)
            if done + running + waiting < n:  # another worker's trials may already fill the budget
                _enqueue_untried(study, runner.recipe.search, trial.number)
            # pruned without a curve, TPE ranks it below every trained trial and turns elsewhere
            raise optuna.TrialPruned(f"duplicate of trial {twin}")
        if progress:
            progress.trial_started(trial.number, _counts(study)[0], n, c.key)
        return runner.run(trial, c)

    def ended(study: Any, frozen: Any) -> None:
        if progress and "duplicate_of" not in frozen.user_attrs:
            rows = trial_rows(study, runner.budget)
            row = next(r for r in rows if r["number"] == frozen.number)
            progress.trial_ended(row, _counts(study)[0], n, _best(rows))

    if runner.recipe.search.start == "frontier":
        _enqueue_frontier(study, runner, n)
    space = len(candidates(runner.recipe.search))
    while True:
        with warnings.catch_warnings():  # Optuna marks it experimental; it is what makes a dead worker's trial run again
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(study)
        done, running, waiting, screened = _counts(study)
        if (done + running >= n or done + screened + running >= space) and not waiting \
                or _duplicates(study) > MAX_DUPLICATES * space:
            if not running:
                return
            time.sleep(HEARTBEAT_S)
            continue
        study.optimize(objective, n_trials=1, catch=(EdgekdError,), callbacks=[ended])


def _enqueue_frontier(study: Any, runner: TrialRunner, n: int) -> None:
    """A new study's first trials: every candidate's untrained file measured, then up to ``n`` of
    the budget frontier (``edgekd.search.frontier``) queued. Once per study: a resumed search, or
    a worker that joins, finds them queued or run; a study begun before keeps its own course."""
    from optuna.trial import TrialState

    if "frontier" in study.user_attrs or any(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False)):
        return
    space = candidates(runner.recipe.search)
    figures = {}
    for c in space:
        try:
            figures[c.key] = runner.measure_untrained(c)
        except EdgekdError as e:  # the sampler may still pick it; its trial records why it fails
            log.warning("%s: untrained file not measured (%s); left to the sampler", c.key, e)
    front = budget_frontier(space, figures, runner.budget)[:n]
    tried = _tried(study, -1)
    for c in front:
        if c.key not in tried:
            study.enqueue_trial(c.params(), user_attrs={"config": c.key}, skip_if_exists=True)
    study.set_user_attr("frontier", [c.key for c in front])
    log.info("%d candidates measured untrained; the first trials, the budget's frontier: %s", len(figures),
             ", ".join(c.key for c in front) or "none inside the budget")


def _tried(study: Any, number: int) -> dict[str, int]:
    """Each candidate another trial than ``number`` finished, runs or waits to run, with that
    trial's number. A dead worker's trial is failed and re-queued as a waiting retry; a fresh
    sample of the same candidate is the duplicate, so the retry (which carries ``failed_trial``) runs it."""
    from optuna.trial import TrialState

    tried: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        key = t.user_attrs.get("config")
        if t.number != number and key and "duplicate_of" not in t.user_attrs and key not in tried and (
                t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
                or (t.state == TrialState.FAIL and "error" in t.user_attrs)):
            tried[key] = t.number
    return tried


def _enqueue_untried(study: Any, space: Any, number: int) -> None:
    """A repeat pick hands its turn to an untried candidate, drawn at random (seeded): over a space
    mostly over budget, TPE kept proposing the few candidates it had tried and never the rest
    (benchmarks/search, p90 budget 0.242 ms: 97 repeat picks, 2 of 6 trials trained)."""
    tried = _tried(study, number)
    untried = [c for c in candidates(space) if c.key not in tried]
    if untried:
        pick = random.Random(f"{space.sampler_seed}:{number}").choice(untried)
        study.enqueue_trial(pick.params(), user_attrs={"config": pick.key})


def _duplicates(study: Any) -> int:
    return sum("duplicate_of" in t.user_attrs for t in study.get_trials(deepcopy=False))


def _counts(study: Any) -> tuple[int, int, int, int]:
    """(finished, running, waiting, screened) trials, each a distinct candidate. A trial failed for
    a reason (a converter's refusal, a board that dropped) is finished; one failed because its
    worker died is retried, so is not; a duplicate of a tried candidate is not a trial of the
    budget. Neither is a screened one: a candidate whose untrained file was over budget cost
    seconds of measuring and no training, so ``--trials`` counts the candidates that trained."""
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if "duplicate_of" not in t.user_attrs]
    screened = sum(_screened(t) for t in trials)
    done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and "error" in t.user_attrs) for t in trials) - screened
    running = sum(t.state == TrialState.RUNNING for t in trials)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    return done, running, waiting, screened


def _screened(t: Any) -> bool:
    """Measured over budget at its initial weights, so never trained (``TrialRunner.run``)."""
    from optuna.trial import TrialState

    return t.state == TrialState.COMPLETE and "untrained" in t.user_attrs and "measured" not in t.user_attrs


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    feasible = [r for r in rows if r["state"] == "complete"]
    return max(feasible, key=lambda r: r["val_top1"]) if feasible else None


__all__ = ["SearchProgress", "SearchResult", "search", "study_name"]
