"""Bad input, stage by stage: each case must end in exit code 2 with one 'error:' line naming
the problem and the fix, no traceback, and nothing half-written (no temporary file, no report
that looks finished). Ctrl-C in each stage ends in exit code 130 with one line, the same way.

The cases run the real CLI on real files: tiny recipes on real Fashion-MNIST, real checkpoints,
the real export of the session's chain, and a real sshd on 127.0.0.1 for the bench.
"""

from __future__ import annotations

import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from typer.testing import CliRunner

from edgekd.cli import app

from conftest import _free_port, _keygen, default_sigint, one_line_error, tiny_recipe_dict, write_recipe, write_rgb_imagefolder

FINISHED_MARKERS = {"metrics.json", "export.json", "bench.json", "report.md"}


class Case:
    def __init__(self, tmp: Path, request: pytest.FixtureRequest):
        self.tmp, self.request = tmp, request

    def fixture(self, name: str):  # noqa: ANN201 - whatever the fixture gives
        return self.request.getfixturevalue(name)

    def recipe(self, **sections: object) -> Path:
        return write_recipe(self.tmp / "r.yaml", **sections)

    def distill(self, *args: object, recipe: Path | None = None) -> list[str]:
        return ["distill", str(recipe or self.recipe()), "--out", str(self.tmp / "run"), *map(str, args)]

    def export_copy(self) -> Path:
        """A copy of the session chain's export dir, without its bench results."""
        dst = self.tmp / "export"
        shutil.copytree(self.fixture("chain")[1] / "export", dst)
        for f in ("bench.json", "report.md", "bench_latency.png"):
            (dst / f).unlink(missing_ok=True)
        return dst

    def run_copy(self) -> Path:
        run = self.tmp / "run"
        run.mkdir()
        shutil.copy(self.fixture("chain")[1] / "student_best.pt", run)
        return run

    def bench_json(self, content: object) -> Path:
        p = self.tmp / "bench.json"
        p.write_text(content if isinstance(content, str) else __import__("json").dumps(content))
        return p


CASES: dict[str, Callable[[Case], tuple[list[str], str]]] = {}
E2E_CASES: set[str] = set()  # cases that need a trained run, an export or an sshd (the session fixtures)


def case(name: str, e2e: bool = False) -> Callable:
    def register(fn: Callable[[Case], tuple[list[str], str]]) -> Callable:
        CASES[name] = fn
        if e2e:
            E2E_CASES.add(name)
        return fn

    return register


# --- recipes and flags ---

@case("recipe: unknown key")
def _(c):
    (c.tmp / "r.yaml").write_text("student:\n  widht_mult: 0.5\n")
    return c.distill(recipe=c.tmp / "r.yaml"), "unknown key 'student.widht_mult'"


@case("recipe: wrong type")
def _(c):
    return c.distill(recipe=c.recipe(train={"lr": "fast"})), "key 'train.lr'"


@case("recipe: bad YAML")
def _(c):
    (c.tmp / "r.yaml").write_text("data: {dataset: [fashion_mnist\n")
    return c.distill(recipe=c.tmp / "r.yaml"), "not valid YAML"


@case("recipe: not a mapping")
def _(c):
    (c.tmp / "r.yaml").write_text("- just\n- a list\n")
    return c.distill(recipe=c.tmp / "r.yaml"), "start from a shipped recipe (edgekd recipes)"


@case("recipe: unknown method")
def _(c):
    return c.distill("--method", "magic"), "choose one of ce, kd"


@case("recipe: unknown dataset")
def _(c):
    return c.distill(recipe=c.recipe(data={"dataset": "mnist"})), "data.dataset"


@case("recipe: no such file")
def _(c):
    return ["distill", str(c.tmp / "none.yaml")], "no such file"


@case("--set without '='")
def _(c):
    return c.distill("--set", "distill.beta"), "expected KEY=VALUE"


@case("--set wrong type")
def _(c):
    return c.distill("--set", "train.batch_size=many"), "train.batch_size"


@case("unknown device")
def _(c):
    return c.distill("--device", "tpu"), "train.device"


@case("--out is a file (distill)")
def _(c):
    (c.tmp / "run").write_text("not a folder")
    return c.distill(), "is a file"


@case("--out is a file (run)")
def _(c):
    (c.tmp / "run").write_text("not a folder")
    return ["run", str(c.recipe()), "--out", str(c.tmp / "run")], "is a file"


# --- data ---

@case("data: Fashion-MNIST missing")
def _(c):
    return c.distill("--data", c.tmp / "nowhere"), "apt-get install dataset-fashion-mnist"


@case("data: IDX truncated")
def _(c):
    d = c.tmp / "fm"
    d.mkdir()
    for name in os.listdir("/usr/share/datasets/fashion-mnist"):
        os.symlink(f"/usr/share/datasets/fashion-mnist/{name}", d / name)
    (d / "train-labels-idx1-ubyte.gz").unlink()
    (d / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 234, 96]) + b"\x00" * 100)
    return c.distill("--data", d), "truncated"


def _imagefolder_recipe(c: Case, root: Path, **data: object) -> Path:
    return c.recipe(data={"dataset": "imagefolder", "root": str(root), "image_size": 16, "train_subset": None,
                          "test_subset": None, "num_workers": 0, **data})


@case("data: unreadable image in an ImageFolder")
def _(c):
    root = write_rgb_imagefolder(c.tmp / "img", train=4, val=2)
    (root / "train" / "class_1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return c.distill(recipe=_imagefolder_recipe(c, root)), "broken.png: not a readable image"


@case("data: empty class")
def _(c):
    root = write_rgb_imagefolder(c.tmp / "img", train=4, val=2)
    (root / "train" / "class_9").mkdir()
    return c.distill(recipe=_imagefolder_recipe(c, root)), "class 'class_9' has no readable images"


@case("data: one class only")
def _(c):
    root = write_rgb_imagefolder(c.tmp / "img", classes=1, train=4, val=2)
    return c.distill(recipe=_imagefolder_recipe(c, root)), "only one class"


@case("data: ImageFolder without val/")
def _(c):
    root = write_rgb_imagefolder(c.tmp / "img", train=4, val=2)
    shutil.rmtree(root / "val")
    return c.distill(recipe=_imagefolder_recipe(c, root)), "val/<class>/"


@case("data: CIFAR file with a pickle payload")
def _(c):
    folder = c.tmp / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    (folder / "data_batch_1").write_bytes(pickle.dumps(_Payload()))
    return c.distill("--data", c.tmp / "cifar", recipe=c.recipe(data={"dataset": "cifar10"})), "not allowed"


class _Payload:
    def __reduce__(self):
        return (os.system, ("true",))


# --- checkpoints ---

@case("checkpoint: truncated", e2e=True)
def _(c):
    bad = c.tmp / "t.pt"
    bad.write_bytes(c.fixture("tiny_teacher").read_bytes()[:1000])
    return c.distill("--teacher", bad), "corrupt"


@case("checkpoint: foreign")
def _(c):
    bad = c.tmp / "t.pt"
    torch.save({"weight": torch.zeros(3)}, bad)
    return c.distill("--teacher", bad), "not an edgekd checkpoint"


@case("checkpoint: pickle payload")
def _(c):
    bad = c.tmp / "t.pt"
    torch.save({"format": "edgekd-checkpoint", "state_dict": {}, "x": _Payload()}, bad)
    return c.distill("--teacher", bad), "refused for safety"


@case("checkpoint: another architecture", e2e=True)
def _(c):
    return c.distill("--teacher", c.fixture("tiny_teacher"), "--set", "teacher.arch=resnet34"), "teacher.arch"


@case("checkpoint: another class count", e2e=True)
def _(c):
    ck = torch.load(c.fixture("tiny_teacher"), weights_only=True)
    ck["class_names"] = [f"c{i}" for i in range(100)]
    torch.save(ck, c.tmp / "t.pt")
    return c.distill("--teacher", c.tmp / "t.pt"), "other classes"


# --- export ---

@case("export: no student checkpoint")
def _(c):
    return ["export", str(c.tmp)], "no student_best.pt"


@case("export: unknown format", e2e=True)
def _(c):
    return ["export", str(c.run_copy()), "--formats", "coreml"], "unknown format 'coreml'"


@case("export: unknown converter", e2e=True)
def _(c):
    return ["export", str(c.run_copy()), "--converter", "tvm"], "unknown converter 'tvm'"


@case("export: corrupt student checkpoint")
def _(c):
    run = c.tmp / "run"
    run.mkdir()
    (run / "student_best.pt").write_bytes(os.urandom(4096))
    return ["export", str(run)], "corrupt"


@case("export: weights of another width", e2e=True)
def _(c):
    run = c.run_copy()
    ck = torch.load(run / "student_best.pt", weights_only=True)
    ck["model_kwargs"] = {"width_mult": 1.0}
    torch.save(ck, run / "student_best.pt")
    return ["export", str(run), "--formats", "onnx", "--no-int8"], "weights do not fit"


# --- bench ---

def _bench(export_dir: Path, *args: object) -> list[str]:
    return ["bench", str(export_dir), "--runs", "3", "--warmup", "0", "--samples", "10", *map(str, args)]


@case("bench: not an export dir")
def _(c):
    return _bench(c.tmp), "no export.json"


@case("bench: corrupt .tflite", e2e=True)
def _(c):
    export = c.export_copy()
    (export / "student_int8.tflite").write_bytes(b"TFL3" + os.urandom(2000))
    return _bench(export), "student_int8.tflite"


@case("bench: export dir without samples", e2e=True)
def _(c):
    export = c.export_copy()
    (export / "samples.npz").unlink()
    return _bench(export), "no samples.npz"


@case("bench: unknown device", e2e=True)
def _(c):
    return _bench(c.export_copy(), "--device", "jetson"), "unknown device 'jetson'"


@case("bench: host name that is an option", e2e=True)
def _(c):
    return _bench(c.export_copy(), "--device", "rpi4", "--host", "-oProxyCommand=x"), "not a host name"


@case("bench: unreachable host", e2e=True)
def _(c):
    sshd = c.fixture("sshd")
    args = sshd.args()
    args[args.index("--port") + 1] = str(_free_port())
    return _bench(c.export_copy(), "--device", "rpi4", *args), "connection refused"


@case("bench: host key changed", e2e=True)
def _(c):
    sshd = c.fixture("sshd")
    known = c.tmp / "known_hosts"
    known.write_text(sshd.known_line(_keygen(c.tmp / "old_host_key")))
    return _bench(c.export_copy(), "--device", "rpi4", *sshd.args(known_hosts=known)), "CHANGED"


# --- gate ---

@case("gate: not JSON")
def _(c):
    return ["gate", str(c.bench_json("{not json")), "--max-p50-ms", "1"], "not valid JSON"


@case("gate: foreign JSON")
def _(c):
    return ["gate", str(c.bench_json({"hello": 1})), "--max-p50-ms", "1"], "not an edgekd bench report"


@case("gate: no such file")
def _(c):
    return ["gate", str(c.tmp / "nothing.json"), "--max-p50-ms", "1"], "no such file"


@case("gate: no thresholds", e2e=True)
def _(c):
    return ["gate", str(c.fixture("chain")[1] / "export" / "bench.json")], "no thresholds"


@case("gate: accuracy given in percent", e2e=True)
def _(c):
    return ["gate", str(c.fixture("chain")[1] / "export" / "bench.json"), "--min-accuracy", "85"], "a fraction"


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def assert_nothing_half_written(root: Path, before: set[Path]) -> None:
    new = _files(root) - before
    assert not [p for p in _files(root) if p.name.endswith(".tmp")], "temporary files left behind"
    assert not [p for p in new if p.name in FINISHED_MARKERS], sorted(new)
    assert not [p for p in root.rglob(".student-*")] + [p for p in root.rglob(".teacher-*")], "work dirs left"


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.e2e) if n in E2E_CASES else n for n in CASES])
def test_bad_input_is_one_line_exit_2(name, tmp_path, request):
    c = Case(tmp_path, request)
    argv, expected = CASES[name](c)
    before = _files(tmp_path)
    r = CliRunner().invoke(app, argv, env={"COLUMNS": "200"})
    line = one_line_error(r)
    assert expected in line, line
    assert_nothing_half_written(tmp_path, before)


# --- a full disk and Ctrl-C need a real process ---

def _cmd(*args: object) -> list[str]:
    return [sys.executable, "-m", "edgekd", *map(str, args)]


@pytest.mark.parametrize("weights", ["missing", "another arch"])
def test_bad_student_weights_stop_the_run_before_the_teacher_trains(tmp_path, weights):
    """student.weights is loaded when the student is built, after the teacher's epochs: a typo
    or a file of another model must stop the run before those epochs are spent."""
    path = tmp_path / "student.pt"
    if weights == "another arch":
        torch.save({"conv.weight": torch.zeros(3, 3, 3, 3)}, path)
    recipe = write_recipe(tmp_path / "r.yaml", teacher={"epochs": 2}, student={"weights": str(path)})
    r = CliRunner().invoke(app, ["distill", str(recipe), "--out", str(tmp_path / "run")], env={"COLUMNS": "200"})
    line = one_line_error(r)
    assert f"weights {path}" in line, line
    assert not list((tmp_path / "run").glob("teacher_*.pt")), "the teacher trained before the student's weights were read"


def test_run_without_the_converter_stops_before_it_distils(tmp_path, monkeypatch):
    """edgekd run needs LiteRT for the int8 file; without it the run must stop before the
    distillation it could not export, not after. (None in sys.modules: find_spec finds no such package.)"""
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    recipe = write_recipe(tmp_path / "r.yaml")
    r = CliRunner().invoke(app, ["run", str(recipe), "--out", str(tmp_path / "run")], env={"COLUMNS": "200"})
    line = one_line_error(r)
    assert "export needs the 'ai_edge_litert' package" in line, line
    assert not list((tmp_path / "run").glob("*.pt")), "it distilled before finding it could not export"


def test_run_to_a_host_that_does_not_answer_stops_before_it_distils(tmp_path):
    """A real ssh to a closed loopback port: edgekd run names the host's problem before it distils."""
    port = _free_port()  # nothing listens on it
    recipe = write_recipe(tmp_path / "r.yaml")
    r = CliRunner().invoke(app, ["run", str(recipe), "--out", str(tmp_path / "run"), "--host", "pi@127.0.0.1",
                                 "--port", str(port)], env={"COLUMNS": "200"})
    line = one_line_error(r)
    assert "pi@127.0.0.1: connecting failed" in line and f"connection refused on port {port}" in line, line
    assert not list((tmp_path / "run").glob("*.pt")), "it distilled before finding the host would not answer"


@pytest.mark.e2e
def test_disk_full_on_the_run_dir_is_one_line(tmp_path):
    """RLIMIT_FSIZE makes every write past 150 kB fail with EFBIG, as a full disk fails with ENOSPC."""
    recipe = write_recipe(tmp_path / "r.yaml")

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))

    proc = subprocess.run(_cmd("distill", recipe, "--out", tmp_path / "run"), capture_output=True, text=True,
                          preexec_fn=small_files, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write" in lines[0] and "teacher_" in lines[0], proc.stderr
    assert_nothing_half_written(tmp_path, {recipe})
    assert not list((tmp_path / "run").glob("*.pt"))  # no checkpoint that looks complete


def test_atomic_writes_get_the_mode_open_would_give(tmp_path):
    """A report written atomically is not left 0600: others on the board or in CI read it."""
    from edgekd.checkpoint import write_json

    old = os.umask(0o027)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640


def _interrupt(cmd: list[str], ready: Callable[[], bool], timeout: float = 900) -> str:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=default_sigint)
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the stage never reached the point to interrupt"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    _, err = proc.communicate(timeout=180)
    lines = err.strip().splitlines()
    assert proc.returncode == 130 and len(lines) == 1 and "interrupted" in lines[0], err
    return lines[0]


@pytest.mark.e2e
def test_ctrl_c_in_distill_keeps_finished_epochs(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", teacher={"epochs": 3}, data={"train_subset": 2000})
    run = tmp_path / "run"
    line = _interrupt(_cmd("distill", recipe, "--out", run), lambda: (run / "teacher_last.pt").exists())
    assert "--resume" in line
    assert_nothing_half_written(tmp_path, {recipe})
    assert torch.load(run / "teacher_last.pt", weights_only=True)["epoch"] >= 1


@pytest.mark.e2e
def test_ctrl_c_in_export_leaves_no_work_dir(tmp_path, chain):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(chain[1] / "student_best.pt", run)
    shutil.copy(chain[1] / "teacher_best.pt", run)
    _interrupt(_cmd("export", run, "--calib", "16"),
               lambda: any((run / "export").glob(".student-*/*/onnx2tf")) if (run / "export").is_dir() else False)
    assert_nothing_half_written(tmp_path, set())


@pytest.mark.e2e
def test_ctrl_c_in_run_then_the_same_command_continues(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", teacher={"epochs": 3}, data={"train_subset": 2000},
                          export={"formats": ["onnx"], "int8": False}, bench={"runs": 5, "samples": 20})
    run = tmp_path / "run"
    line = _interrupt(_cmd("run", recipe, "--out", run), lambda: (run / "teacher_last.pt").exists())
    assert "run the same command again" in line
    assert_nothing_half_written(tmp_path, {recipe})


def test_skip_unreadable_counts_the_skipped_files(tmp_path):
    root = write_rgb_imagefolder(tmp_path / "img", train=10, val=4, size=16)
    (root / "train" / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "val" / "class_2" / "empty.png").write_bytes(b"")
    rec = tiny_recipe_dict(data={"dataset": "imagefolder", "root": str(root), "image_size": 16, "train_subset": None,
                                 "test_subset": None, "num_workers": 0, "skip_unreadable": True},
                           train={"batch_size": 8}, distill={"method": "ce"}, teacher={"epochs": 0})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rec))
    r = CliRunner().invoke(app, ["distill", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output + r.stderr
    m = __import__("json").loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["dataset"]["unreadable_skipped"] == 2
    assert {Path(p).name for p in m["dataset"]["unreadable_files"]} == {"broken.jpg", "empty.png"}
    assert m["dataset"]["n_train"] + m["dataset"]["n_val"] == 30 and m["dataset"]["n_test"] == 12


def test_recipe_reference_is_generated_from_the_models():
    from edgekd.recipe import reference_markdown

    from conftest import REPO

    assert (REPO / "docs" / "reference" / "recipe.md").read_text() == reference_markdown() + "\n", (
        "docs/reference/recipe.md is stale: python -m edgekd.recipe > docs/reference/recipe.md")


def test_error_messages_point_to_files_that_exist(tmp_path):
    from conftest import REPO

    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: fast\n")
    r = CliRunner().invoke(app, ["distill", str(p)])
    line = one_line_error(r)
    assert "docs/reference/recipe.md" in line and (REPO / "docs" / "reference" / "recipe.md").is_file()
