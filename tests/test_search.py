"""``edgekd search``: budgets and spaces checked strictly (fast), then real searches: tiny
spaces of real students distilled from a real teacher, exported and timed here or on the
loopback sshd, an Optuna study in a real SQLite file shared by two worker processes, one of
them SIGKILLed and started again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import one_line_error, write_recipe
from edgekd.cli import app
from edgekd.errors import EdgekdError
from edgekd.recipe import load_recipe
from edgekd.search import candidates, check_space, parse_budget
from edgekd.search.report import pareto_front

FAST_BENCH = {"runs": 10, "warmup": 2, "samples": 50}
FAST_EXPORT = {"formats": [], "calib": 32, "samples": 100}


def _space(**search):
    return {"students": ["mobilenet_v2", "mlp"], "width_mults": [0.25], "image_sizes": [16, 20], "methods": ["kd"],
            "proxy": {"epochs": 1, "train_subset": None}, "trials": 2, "best_k": 0, **search}


def _search_recipe(path: Path, teacher: Path | None = None, **search) -> Path:
    return write_recipe(path, distill={"method": "kd"}, export=FAST_EXPORT, bench=FAST_BENCH, search=_space(**search),
                        **({"teacher": {"checkpoint": str(teacher), "epochs": 0}} if teacher else {}))


# -- fast tier: budgets and spaces ---------------------------------------------------------

def test_budget_parses_every_key():
    assert parse_budget("p90_ms<=20, size_mb<=2,rss_mb<=100") == {"p90_ms": 20.0, "size_mb": 2.0, "rss_mb": 100.0}
    assert parse_budget("p50_ms<=1.5e1") == {"p50_ms": 15.0}
    assert parse_budget(None) == {} and parse_budget("  ") == {}


@pytest.mark.parametrize("text,says", [
    ("p90_ms<20", "not KEY<=NUMBER"), ("p90_ms=20", "not KEY<=NUMBER"), ("latency<=20", "unknown key 'latency'"),
    ("p90_ms<=20,p90_ms<=10", "given twice"), ("size_mb<=0", "no limit"), ("p90_ms<=-1", "not KEY<=NUMBER"),
    ("p90_ms<=20,", "not KEY<=NUMBER"), ("p90_ms<=twenty", "not KEY<=NUMBER"),
])
def test_bad_budget_is_refused(text, says):
    with pytest.raises(EdgekdError, match=says):
        parse_budget(text)


def test_bad_budget_on_the_cli_is_one_line(tmp_path):
    recipe = _search_recipe(tmp_path / "r.yaml")
    line = one_line_error(CliRunner().invoke(app, ["search", str(recipe), "--budget", "p90<=3", "--out",
                                                   str(tmp_path / "s")]))
    assert "unknown key 'p90'" in line and "p90_ms" in line
    assert not (tmp_path / "s").exists()  # refused before anything was made


def test_a_study_url_that_is_no_database_is_one_line(tmp_path):
    recipe = _search_recipe(tmp_path / "r.yaml")
    line = one_line_error(CliRunner().invoke(app, ["search", str(recipe), "--budget", "p90_ms<=5", "--study",
                                                   "nosuch://x", "--out", str(tmp_path / "s")]))
    assert "--study nosuch://x: cannot open it as an Optuna storage" in line
    assert not (tmp_path / "s").exists()


_OPEN_AT = """
import sys, time
from pathlib import Path
from edgekd.recipe import load_recipe
from edgekd.search import SearchTarget
from edgekd.search.stage import _open_study
recipe, url, ready, n = load_recipe(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
(ready / str(time.time_ns())).touch()
while len(list(ready.iterdir())) < n:  # imports done everywhere: all open the new database at once
    time.sleep(0.001)
print(_open_study(recipe, {"p90_ms": 5.0}, SearchTarget(bench=recipe.bench), url, 2).study_name)
"""


def test_workers_that_open_one_new_study_together_all_get_it(tmp_path):
    """Eight processes open one study in a SQLite file that does not exist yet, at one moment:
    they race to create its tables (without a retry some fail on "UNIQUE constraint failed:
    alembic_version"), and every one of them must end up in the one study."""
    recipe, n = _search_recipe(tmp_path / "r.yaml"), 8
    url, ready = f"sqlite:///{tmp_path / 'study.db'}", tmp_path / "ready"
    ready.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN_AT, str(recipe), url, str(ready), str(n)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(n)]
    outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-1500:] for o in outputs)
    assert len({o.strip().splitlines()[-1] for o in outputs}) == 1


@pytest.mark.parametrize("search,says", [
    ({"students": ["resnet_tiny"]}, "'resnet_tiny' is not one of mobilenet_v2, mlp, vit"),
    ({"methods": ["kd", "distil"]}, "unknown method 'distil'"),
    ({"methods": ["atkd"]}, "mlp with method atkd is impossible"),
    ({"students": ["vit"], "image_sizes": [18]}, "does not split into 4-px patches"),
    ({"image_sizes": []}, "image_sizes is empty"),
    ({"image_sizes": [16, 16]}, "lists a value twice"),
])
def test_bad_space_is_one_line_before_anything_runs(tmp_path, search, says):
    recipe = _search_recipe(tmp_path / "r.yaml", **search)
    line = one_line_error(CliRunner().invoke(app, ["search", str(recipe), "--budget", "p90_ms<=5", "--out",
                                                   str(tmp_path / "s")]))
    assert says in line
    assert not (tmp_path / "s").exists()


def test_the_shipped_search_recipe_declares_a_24_point_grid():
    recipe = load_recipe("fashion_mnist_search")
    grid = check_space(recipe)
    assert len(grid) == len(candidates(recipe.search)) == 24
    assert len({c.key for c in grid}) == 24 and len({c.arch_key for c in grid}) == 12  # methods share a file
    assert parse_budget(recipe.search.budget)  # its default budget parses


def test_pareto_front_keeps_only_undominated_trained_trials():
    rows = [{"number": i, "state": s, "val_top1": v, "p90_ms": p} for i, (s, v, p) in enumerate([
        ("complete", 80.0, 2.0), ("complete", 85.0, 4.0), ("complete", 84.0, 5.0),  # 2 is dominated by 1
        ("over budget", 90.0, 9.0), ("over budget (untrained)", None, 1.0), ("failed", None, None)])]
    assert pareto_front(rows) == [0, 1, 3]


class _TableRunner:
    """Stands in for the trial runner (distil, export, time): each candidate's objective from a
    table, its file's figures from another (default: 1 ms, or 9 ms for those ``over`` the 2 ms
    budget), and a count of the candidates run. What is tested is the study's loop around it."""

    def __init__(self, recipe, table, over=(), figures=None, budget=None):
        self.recipe, self.table, self.over, self.runs = recipe, table, set(over), []
        self.budget = budget or {"p90_ms": 2.0}
        fast = {"p90_ms": 1.0, "size_mb": 0.5}
        self.figures = figures or {k: {**fast, "p90_ms": 9.0} if k in self.over else fast for k in table}
        self.measured_untrained = []

    def measure_untrained(self, c):
        self.measured_untrained.append(c.key)
        return self.figures[c.key]

    def run(self, trial, c):
        from edgekd.search.budget import over_budget, violations

        trial.set_user_attr("config", c.key)
        figures = self.figures[c.key]
        trial.set_user_attr("untrained", figures)
        for key, value in violations(figures, self.budget).items():
            trial.set_constraint(key, value)
        if over_budget(figures, self.budget):  # screened as TrialRunner.run does: measured over, never trained
            trial.set_user_attr("over", "untrained file: over budget")
            return 0.0
        trial.set_user_attr("measured", figures)
        self.runs.append(c.key)
        return self.table[c.key]


def _sampler_only(rec):
    """The recipe with ``search.start: sampler``: the sampler picks every trial (what these tests test)."""
    return rec.model_copy(update={"search": rec.search.model_copy(update={"start": "sampler"})})


@pytest.mark.parametrize("n", [4, 9])
def test_the_sampler_picking_a_tried_candidate_again_runs_and_counts_nothing(tmp_path, n):
    """A 6-point space with a steep objective: TPE comes back to its best point, and those picks
    are duplicates (never run, not of the budget); n distinct candidates run, all 6 when n > 6."""
    import optuna

    from edgekd.search.report import trial_rows
    from edgekd.search.stage import _open_study, _optimize
    from edgekd.search import SearchTarget

    rec = _sampler_only(load_recipe(_search_recipe(tmp_path / "r.yaml", students=["mobilenet_v2"],
                                                   image_sizes=[16, 20, 24], width_mults=[0.25, 0.5])))
    table = {c.key: 50.0 + 10 * i for i, c in enumerate(candidates(rec.search))}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _open_study(rec, {}, SearchTarget(bench=rec.bench), f"sqlite:///{tmp_path / 'study.db'}", n)
    runner = _TableRunner(rec, table)
    _optimize(study, runner, n, None)
    assert len(runner.runs) == len(set(runner.runs)) == min(n, len(table))  # each candidate run once
    rows = trial_rows(study, {})
    assert sum(r["state"] == "complete" for r in rows) == min(n, len(table))
    dups = [r for r in rows if r["state"] == "duplicate"]
    assert all(r["config"] in runner.runs and "not run again" in r["reason"] for r in dups)
    if n > len(table):
        assert dups  # the space was spent: the sampler can only have picked tried points


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_sampler_stuck_on_tried_candidates_still_tries_the_rest(tmp_path, seed):
    """The shipped 24-point space with 20 candidates over budget, as the p90 budget 0.242 ms of
    benchmarks/search made it: TPE kept proposing the few it had tried (97 repeat picks) and the
    search stopped with 2 of 6 trials trained and 6 candidates never tried. A repeat pick now
    hands its turn to an untried candidate: every candidate is tried, the 4 inside all trained."""
    import optuna

    from edgekd.search import SearchTarget
    from edgekd.search.stage import _open_study, _optimize

    rec = _sampler_only(load_recipe("fashion_mnist_search"))
    rec = rec.model_copy(update={"search": rec.search.model_copy(update={"sampler_seed": seed})})
    space = [c.key for c in candidates(rec.search)]
    table = {k: 50.0 + i for i, k in enumerate(space)}
    inside = {k for k in space if "w0.25" in k}  # the 4 best inside are of one width
    inside = set(sorted(inside, key=table.get)[-4:])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _open_study(rec, {}, SearchTarget(bench=rec.bench), f"sqlite:///{tmp_path / 'study.db'}", 6)
    runner = _TableRunner(rec, table, set(space) - inside)
    _optimize(study, runner, 6, None)
    assert sorted(runner.runs) == sorted(inside)  # each trained once
    tried = {t.user_attrs["config"] for t in study.trials if "duplicate_of" not in t.user_attrs}
    assert tried == set(space)


def _scaled_figures(space):
    """A file's size grows with width, its latency with width x pixels (as a MobileNetV2's do)."""
    return {c.key: {"size_mb": 2.0 * c.width_mult, "p90_ms": c.width_mult * c.image_size ** 2 / 100}
            for c in space}


def test_the_budget_frontier_is_the_costliest_inside_each_family():
    from edgekd.search.frontier import budget_frontier

    rec = load_recipe("fashion_mnist_search")  # mobilenet_v2 at 3 widths x 3 sizes, and MobileNetV3-S at 3 sizes
    space = candidates(rec.search)
    figures = _scaled_figures(c for c in space if c.width_mult)
    mnv2 = [c for c in space if c.width_mult]
    front = budget_frontier(mnv2, figures, {"p90_ms": 5.0})
    # inside 5 ms, none of these three is costlier than another on both size and p90 (0.5 MB at 4.84 ms,
    # 0.7 at 4.54, 1.0 at 3.92); each smaller one of its width is; the most of the budget spent first
    assert [(c.width_mult, c.image_size) for c in front if c.method == "atkd"] == [(0.25, 44), (0.35, 36), (0.5, 28)]
    assert {c.method for c in front} == {"atkd", "kd"} and len(front) == 6  # each method is its own family
    assert budget_frontier(mnv2, figures, {"size_mb": 0.6})[0].key == "mobilenet_v2-w0.25-44px-atkd-ptq"
    assert budget_frontier(mnv2, figures, {"p90_ms": 0.1}) == []  # nothing fits
    assert budget_frontier(mnv2, {}, {"p90_ms": 5.0}) == []  # nothing measured


def test_a_new_study_trains_the_budget_frontier_first(tmp_path):
    """Every candidate measured untrained, then the frontier's candidates are the first trials,
    the most of the budget spent first; the sampler goes on after them; once per study."""
    import optuna

    from edgekd.search import SearchTarget
    from edgekd.search.stage import _open_study, _optimize

    rec = load_recipe(_search_recipe(tmp_path / "r.yaml", students=["mobilenet_v2"], image_sizes=[16, 20, 24],
                                     width_mults=[0.25, 0.5]))
    space = candidates(rec.search)
    table = {c.key: 50.0 + i for i, c in enumerate(space)}
    budget = {"p90_ms": 1.9}  # w0.25 fits at every size (up to 1.44 ms), w0.5 at 16 px only (1.28 ms)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _open_study(rec, budget, SearchTarget(bench=rec.bench), f"sqlite:///{tmp_path / 'study.db'}", 3)
    runner = _TableRunner(rec, table, figures=_scaled_figures(space), budget=budget)
    _optimize(study, runner, 3, None)
    assert sorted(runner.measured_untrained) == sorted(c.key for c in space)
    assert runner.runs[:2] == ["mobilenet_v2-w0.25-24px-kd-ptq", "mobilenet_v2-w0.5-16px-kd-ptq"]
    assert len(runner.runs) == len(set(runner.runs)) == 3  # then one the sampler picked
    assert study.user_attrs["frontier"] == runner.runs[:2]
    _optimize(study, runner, 4, None)  # resumed with one trial more: the frontier is not queued again
    assert len(runner.runs) == len(set(runner.runs)) == 4 and len(runner.measured_untrained) == len(space)


# -- end to end ------------------------------------------------------------------------------

@pytest.mark.e2e
def test_tiny_search_end_to_end(tmp_path, tiny_teacher):
    """2 archs x 2 sizes through `edgekd search`: measured first, trained, exported, timed, the
    best retrained; search.md/png, best.yaml (a recipe `edgekd run` takes) and the study file."""
    recipe = _search_recipe(tmp_path / "r.yaml", tiny_teacher, trials=4, best_k=1)
    out = tmp_path / "s"
    r = CliRunner().invoke(app, ["search", str(recipe), "--budget", "p90_ms<=200,size_mb<=5", "--out", str(out)],
                           env={"COLUMNS": "120"})
    assert r.exit_code == 0, r.output + r.stderr
    assert "trial 4/4" in r.output and "best so far" in r.output and "winner " in r.output
    import json

    report = json.loads((out / "search.json").read_text())
    ran = [t for t in report["trials"] if t["state"] != "duplicate"]  # the sampler's repeat picks run nothing
    assert len(ran) == len({t["config"] for t in ran}) == 4 and all(t["state"] == "complete" for t in ran)
    assert report["front"] and report["winner"]["config"] in {t["config"] for t in report["trials"]}
    w = report["winner"]
    assert w["remeasured"]["p90_ms"] <= 200 and w["remeasured"]["cached"] is False  # measured again, holds
    assert Path(w["export_dir"], "student_int8.tflite").is_file() and "test_top1" in w
    assert (out / "study.db").is_file() and (out / "search.png").stat().st_size > 10_000
    assert (out / "search.md").read_text().count("\n| ") >= 4 + 1
    best = load_recipe(out / "best.yaml")  # runnable with edgekd run: a valid recipe, gated on the budget
    assert best.gate.max_p90_ms == 200 and best.gate.max_size_mb == 5
    assert best.student.epochs == 1 and best.teacher.checkpoint == str(tiny_teacher)
    # the teacher keeps its 16 px; a 20 px student sees its own size
    big = next(t for t in report["trials"] if "20px" in t["config"])
    metrics = json.loads(Path(big["run_dir"], "metrics.json").read_text())
    assert metrics["teacher"]["image_size"] == 16 and metrics["student"]["image_size"] == 20
    # the same command again: the study is finished, nothing is trained or measured again
    again = CliRunner().invoke(app, ["search", str(recipe), "--budget", "p90_ms<=200,size_mb<=5", "--out", str(out)],
                               env={"COLUMNS": "120"})
    assert again.exit_code == 0, again.output + again.stderr
    assert "trial " not in again.output and json.loads((out / "search.json").read_text())["trials"] == report["trials"]
    # best_k 0: the best trial that holds its budget measured again wins, not only the best trial
    import optuna

    from edgekd.search import SearchTarget
    from edgekd.search.trial import TrialRunner

    rec = load_recipe(recipe)
    sizes = sorted({t["size_mb"] for t in ran})
    cut = {"size_mb": (sizes[0] + sizes[-1]) / 2}  # the bigger arch's file is over it
    rows = [{**t, "state": "complete", "val_top1": 90.0 if t["size_mb"] == sizes[-1] else 80.0 - i}
            for i, t in enumerate(ran)]
    runner = TrialRunner(rec, tiny_teacher, cut, SearchTarget(bench=rec.bench),
                         optuna.load_study(study_name=report["study"], storage=report["storage"]), out / "trials")
    finals, winner = runner.retrain_best(rows, [t["number"] for t in rows], 0, out / "final")
    assert finals[0]["val_top1"] == 90.0 and "over budget when measured again" in finals[0]["why_not"]
    assert winner["within_budget"] and winner["remeasured"]["size_mb"] <= cut["size_mb"] < sizes[-1]


@pytest.mark.e2e
def test_a_candidate_over_budget_is_measured_but_never_trained(tmp_path, tiny_teacher):
    """It is measured in seconds and recorded, and is not one of ``--trials``: with one trial and
    the over-budget 24 px candidate queued first, the 16 px one still trains."""
    import optuna

    from edgekd.search import SearchTarget, candidates, search, study_name

    rec = load_recipe(_search_recipe(tmp_path / "r.yaml", tiny_teacher, students=["mlp"], image_sizes=[16, 24],
                                     trials=1))
    budget, target = {"size_mb": 0.46}, SearchTarget(bench=rec.bench)  # 16 px fits, 24 px does not
    (tmp_path / "s").mkdir()
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's' / 'study.db'}", direction="maximize",
                                study_name=study_name(rec, budget, target))
    study.enqueue_trial(next(c for c in candidates(rec.search) if c.image_size == 24).params())
    res = search(rec, tmp_path / "s", budget=budget, target=target)
    by_config = {t["config"]: t for t in res.trials if t["state"] != "duplicate"}  # TPE may sample 24 px again
    big = by_config["mlp-24px-kd-ptq"]
    assert big["state"] == "over budget (untrained)" and big["measured_untrained"] and big["size_mb"] > 0.46
    assert "size_mb" in big["reason"] and not (tmp_path / "s" / "trials" / "mlp-24px-kd-ptq").exists()
    assert by_config["mlp-16px-kd-ptq"]["state"] == "complete"
    trained = [p.name for p in (tmp_path / "s" / "trials").iterdir() if (p / "metrics.json").exists()]
    assert trained == ["mlp-16px-kd-ptq"]  # one trial: the one that fits


@pytest.mark.e2e
def test_one_trial_search_over_ssh(tmp_path, tiny_teacher, sshd):
    """The SSH path of `edgekd bench`, with the loopback sshd as the board."""
    recipe = _search_recipe(tmp_path / "r.yaml", tiny_teacher, students=["mlp"], image_sizes=[16], trials=1)
    out = tmp_path / "s"
    r = CliRunner().invoke(app, ["search", str(recipe), "--budget", "p90_ms<=500", "--out", str(out), *sshd.args(),
                                 "--device", "generic-arm64", "--set", f"bench.python={sys.executable}"],
                           env={"COLUMNS": "120"})
    assert r.exit_code == 0, r.output + r.stderr
    import json

    report = json.loads((out / "search.json").read_text())
    assert report["target"].startswith(f"generic-arm64@{sshd.host}")
    bench = json.loads(Path(report["winner"]["export_dir"], "bench.json").read_text())
    assert set(bench["hosts"]) == {sshd.host} and bench["hosts"][sshd.host]["status"] == "ok"


def _worker(recipe: Path, out: Path, n: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgekd.cli", "search", str(recipe), "--budget", "p90_ms<=500",
                             "--trials", str(n), "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "COLUMNS": "120"})


@pytest.mark.e2e
def test_two_workers_share_one_study_and_a_killed_one_resumes(tmp_path, tiny_teacher):
    """Two `edgekd search` processes on one SQLite study finish N trials between them; one is
    SIGKILLed mid-trial and started again: no finished trial runs again, the dead one's trial
    is failed by its stopped heartbeat and run once more, and the study ends with N."""
    import optuna
    import sqlalchemy.exc
    from optuna.trial import TrialState

    n = 3
    recipe = _search_recipe(tmp_path / "r.yaml", tiny_teacher, students=["mlp"], image_sizes=[16, 20, 24], trials=n)
    out = tmp_path / "s"
    a, b = _worker(recipe, out, n), _worker(recipe, out, n)
    url = f"sqlite:///{out / 'study.db'}"

    def trials():
        if not (out / "study.db").is_file():
            return []
        try:
            (name,) = optuna.get_all_study_names(url)
        except ValueError:
            return []
        except sqlalchemy.exc.SQLAlchemyError:  # this poller races the workers to create the tables
            return []
        return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)

    deadline = time.monotonic() + 600
    while not any(t.state == TrialState.RUNNING and t.user_attrs.get("worker", "").endswith(f":{a.pid}")
                  for t in trials()):
        assert time.monotonic() < deadline and a.poll() is None, a.communicate()[0].decode()[-3000:]
        time.sleep(0.5)
    time.sleep(2)
    a.send_signal(signal.SIGKILL)
    a.wait()
    finished = {t.number: t.datetime_complete for t in trials() if t.state == TrialState.COMPLETE}
    a2 = _worker(recipe, out, n)
    for p in (a2, b):
        output = p.communicate(timeout=600)[0].decode()
        assert p.returncode == 0, output[-3000:]
    final = trials()
    complete = [t for t in final if t.state == TrialState.COMPLETE]
    assert len(complete) == n
    assert {t.number: t.datetime_complete for t in complete if t.number in finished} == finished  # none re-run
    dead = [t for t in final if t.state == TrialState.FAIL]
    assert len(dead) == 1 and dead[0].user_attrs["worker"].endswith(f":{a.pid}") and "error" not in dead[0].user_attrs
    retried = [t for t in complete if t.system_attrs.get("failed_trial") == dead[0].number]
    assert len(retried) == 1 and retried[0].params == dead[0].params
    workers = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in complete}
    assert str(b.pid) in workers  # both workers ran trials of the one study


_POP_WORKER = """
import os, sys, time
import optuna
from edgekd.search.stage import _storage
optuna.logging.set_verbosity(optuna.logging.ERROR)
study = optuna.load_study(study_name="s", storage=_storage(sys.argv[1]))
while time.time() < float(sys.argv[2]):
    time.sleep(0.001)
for _ in range(int(sys.argv[3])):
    study.optimize(lambda t: time.sleep(0.02) or 1.0, n_trials=1)  # a trial run twice fails its second tell
"""


@pytest.mark.e2e
def test_workers_popping_queued_trials_together_run_each_once(tmp_path):
    """SQLite's implicit transactions let two workers both pop one queued trial (the frontier, a
    retry, a hand-over) and run it twice: measured 2 of 5 rounds before each transaction was begun
    IMMEDIATE. Three workers, 30 queued trials, started on the same instant."""
    import time

    import optuna

    url = f"sqlite:///{tmp_path / 's.db'}"
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(study_name="s", storage=url)
    for i in range(30):
        study.enqueue_trial({"x": i})
    start = time.time() + 8  # past the imports of all three
    workers = [subprocess.Popen([sys.executable, "-c", _POP_WORKER, url, str(start), "10"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT) for _ in range(3)]
    outputs = [w.communicate(timeout=120)[0].decode() for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(o[-1500:] for o in outputs)
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert len(trials) == 30 and all(t.state.name == "COMPLETE" for t in trials)
