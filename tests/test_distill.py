"""The distil stage end to end on real Fashion-MNIST: every method, the run directory, resume
after SIGKILL, and the errors a user meets."""

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from edgekd.checkpoint import load_checkpoint
from edgekd.cli import app

from conftest import sigkill_after, write_recipe

EXPECTED_TERMS = {
    "ce": {"ce"},
    "kd": {"ce", "kd"},
    "at": {"ce", "at"},
    "atkd": {"ce", "kd", "at"},
    "atkd-sa": {"ce", "kd", "at"},
    "fitnet": {"ce", "fitnet"},
}


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.e2e
@pytest.mark.parametrize("method", list(EXPECTED_TERMS))
def test_every_method_trains_from_the_cli(tmp_path, tiny_teacher, method):
    recipe = write_recipe(tmp_path / "r.yaml")
    out = tmp_path / "run"
    result = _cli("distill", recipe, "--method", method, "--teacher", tiny_teacher, "--out", out)
    assert result.exit_code == 0, result.output + result.stderr
    assert "student" in result.output and "test top-1" in result.output
    m = json.loads((out / "metrics.json").read_text())
    epoch = m["student"]["epochs"][0]
    nonzero = {t for t in ("ce", "kd", "at", "fitnet") if epoch[f"loss_{t}"] != 0.0}
    assert nonzero == EXPECTED_TERMS[method]
    assert m["method"] == method and m["teacher"]["source"].startswith("checkpoint:")
    assert 0.0 <= m["student"]["test_top1"] <= 100.0


@pytest.mark.e2e
def test_run_directory_and_metrics_schema(tiny_teacher):
    run = tiny_teacher.parent
    for name in ("teacher_best.pt", "teacher_last.pt", "student_best.pt", "student_last.pt", "metrics.json",
                 "log.csv", "recipe.yaml", "curves.png", "confusion.png", "attention.png"):
        assert (run / name).is_file(), name
    m = json.loads((run / "metrics.json").read_text())
    assert m["schema"] == "edgekd.metrics/1"
    for role in ("teacher", "student"):
        s = m[role]
        assert set(s) >= {"arch", "params", "test_top1", "val_top1", "shifted_top1", "per_class_top1",
                          "confusion_matrix", "epochs"}
        assert sum(map(sum, s["confusion_matrix"])) == m["dataset"]["n_test"] == 200
        row = s["epochs"][-1]
        assert set(row) >= {"epoch", "loss", "loss_ce", "loss_kd", "loss_at", "loss_fitnet", "train_top1",
                            "val_top1", "test_top1", "img_per_s", "wall_s"}
    assert len(m["teacher"]["epochs"]) == 3
    assert m["teacher"]["test_top1"] > 30.0  # trained on real images for 3 epochs: far above chance (10 %)
    assert 0 <= m["agreement_top1"] <= 100
    assert [p["teacher"] for p in m["stage_pairs"]] == ["layer1", "layer2", "layer3", "layer4"]
    assert all(p["teacher_shape"][1:] == p["student_shape"][1:] for p in m["stage_pairs"])
    ck = load_checkpoint(run / "student_best.pt")
    assert ck["class_names"][0] == "T-shirt/top" and len(ck["mean"]) == 1 and ck["recipe"]["name"] == "tiny"
    lines = (run / "log.csv").read_text().splitlines()
    assert lines[0].startswith("role,epoch,loss") and len(lines) == 1 + 3 + 1


def _train_cmd(recipe, out, *extra):
    return [sys.executable, "-m", "edgekd.cli", "distill", str(recipe), "--out", str(out), *extra]


@pytest.mark.e2e
def test_sigkill_during_epoch_2_then_resume_matches_uninterrupted(tmp_path, tiny_teacher):
    recipe = write_recipe(tmp_path / "r.yaml", data={"train_subset": 1200, "val_fraction": 0.1},
                          student={"epochs": 3}, train={"batch_size": 30})
    common = ["--teacher", str(tiny_teacher)]
    subprocess.run(_train_cmd(recipe, tmp_path / "full", *common), check=True, capture_output=True)

    killed = tmp_path / "killed"
    sigkill_after(_train_cmd(recipe, killed, *common), killed / "student_last.pt", 0.5)  # well inside epoch 2
    assert load_checkpoint(killed / "student_last.pt")["epoch"] == 1
    assert not (killed / "metrics.json").exists()

    # Without --resume the started run is refused, and nothing is touched.
    before = (killed / "student_last.pt").stat().st_mtime_ns
    r = subprocess.run(_train_cmd(recipe, killed, *common), capture_output=True, text=True)
    assert r.returncode == 2 and "--resume" in r.stderr
    assert (killed / "student_last.pt").stat().st_mtime_ns == before

    subprocess.run(_train_cmd(recipe, killed, *common, "--resume"), check=True, capture_output=True)
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    resumed = json.loads((killed / "metrics.json").read_text())
    assert len(resumed["student"]["epochs"]) == 3
    assert abs(full["student"]["test_top1"] - resumed["student"]["test_top1"]) <= 0.5


def test_missing_data_is_one_line_exit_2(tmp_path):
    r = _cli("distill", write_recipe(tmp_path / "r.yaml"), "--data", tmp_path / "none", "--out", tmp_path / "o")
    assert r.exit_code == 2
    assert "apt-get install dataset-fashion-mnist" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.e2e
def test_teacher_with_other_classes_is_refused(tmp_path, tiny_teacher):
    ck = load_checkpoint(tiny_teacher)
    ck["class_names"] = [f"c{i}" for i in range(100)]
    other = tmp_path / "other.pt"
    torch.save(ck, other)
    r = _cli("distill", write_recipe(tmp_path / "r.yaml"), "--teacher", other, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "other classes" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.e2e
def test_teacher_of_another_architecture_is_refused(tmp_path, tiny_teacher):
    recipe = write_recipe(tmp_path / "r.yaml", teacher={"arch": "resnet34"})
    r = _cli("distill", recipe, "--teacher", tiny_teacher, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "resnet18" in r.stderr and "teacher.arch" in r.stderr


def test_corrupt_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(os.urandom(2048))
    r = _cli("distill", write_recipe(tmp_path / "r.yaml"), "--teacher", bad, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "corrupt" in r.stderr and len(r.stderr.strip().splitlines()) == 1


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EDGEKD_TEST_MARK', '/tmp/edgekd-mark')}",))


def test_pickle_payload_checkpoint_is_refused_and_never_runs(tmp_path, monkeypatch):
    mark = tmp_path / "ran"
    monkeypatch.setenv("EDGEKD_TEST_MARK", str(mark))
    evil = tmp_path / "evil.pt"
    torch.save({"format": "edgekd-checkpoint", "state_dict": {}, "x": _Payload()}, evil)
    r = _cli("distill", write_recipe(tmp_path / "r.yaml"), "--teacher", evil, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "refused" in r.stderr
    assert not mark.exists()


def test_method_that_needs_a_teacher_without_one(tmp_path):
    r = _cli("distill", write_recipe(tmp_path / "r.yaml", teacher={"epochs": 0}), "--out", tmp_path / "o")
    assert r.exit_code == 2 and "needs a teacher" in r.stderr


@pytest.mark.e2e
def test_student_alone_runs_without_teacher(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", teacher={"epochs": 0}, distill={"method": "ce"},
                          data={"val_fraction": 0.0})
    r = _cli("distill", recipe, "--out", tmp_path / "o")
    assert r.exit_code == 0, r.stderr

    def no_nan(token):
        raise AssertionError(f"metrics.json holds {token}, which strict JSON parsers reject")

    m = json.loads((tmp_path / "o" / "metrics.json").read_text(), parse_constant=no_nan)
    assert m["teacher"] is None and m["agreement_top1"] is None and m["student"]["test_top1"] > 0
    assert m["student"]["val_top1"] is None and m["dataset"]["n_val"] == 0


@pytest.mark.e2e
def test_baseline_is_the_student_alone_and_is_cached(tmp_path, tiny_teacher):
    """--baseline trains the same student with ce (same init, batches, augmentation, epochs): it
    must equal a plain ce run exactly, report the gain, and be reused by the next run."""
    import re

    recipe = write_recipe(tmp_path / "r.yaml", student={"epochs": 2})
    env = {"EDGEKD_CACHE": str(tmp_path / "cache")}
    r = CliRunner().invoke(app, ["distill", str(recipe), "--teacher", str(tiny_teacher), "--method", "kd",
                                 "--baseline", "--out", str(tmp_path / "kd")], env=env)
    assert r.exit_code == 0, r.output + r.stderr
    assert re.search(r"kd: [+-]\d+\.\d pt over the same student alone", r.output), r.output
    m = json.loads((tmp_path / "kd" / "metrics.json").read_text())
    b = m["baseline"]
    assert b["method"] == "ce" and b["source"] == "trained" and len(b["epochs"]) == 2
    assert m["gain_over_baseline"]["test_top1"] == pytest.approx(m["student"]["test_top1"] - b["test_top1"])
    assert m["gain_over_baseline"]["agreement_top1"] == pytest.approx(m["agreement_top1"] - b["agreement_top1"])
    assert "baseline" in (tmp_path / "kd" / "log.csv").read_text()

    alone = _cli("distill", recipe, "--method", "ce", "--teacher-epochs", "0", "--epochs", "2",
                 "--out", tmp_path / "ce")
    assert alone.exit_code == 0, alone.stderr
    ce = json.loads((tmp_path / "ce" / "metrics.json").read_text())["student"]
    assert ce["test_top1"] == b["test_top1"] and ce["shifted_top1"] == b["shifted_top1"]

    r = CliRunner().invoke(app, ["distill", str(recipe), "--teacher", str(tiny_teacher), "--method", "at",
                                 "--baseline", "--out", str(tmp_path / "at")], env=env)
    assert r.exit_code == 0, r.output + r.stderr
    again = json.loads((tmp_path / "at" / "metrics.json").read_text())["baseline"]
    assert again["source"].startswith("cache:") and again["test_top1"] == b["test_top1"]
    assert not (tmp_path / "at" / "baseline_last.pt").exists()  # reused, not retrained


@pytest.mark.e2e
def test_compiled_step_trains_the_same_student_as_eager(tmp_path, tiny_teacher):
    """train.compile puts the student, the teacher's forward, the feature taps and the AT-KD terms
    through torch.compile. aot_eager captures the same graphs as inductor (dynamo + AOTAutograd)
    without generating code, so the test takes seconds; the weights must match eager training."""
    from edgekd.distill.stage import distill
    from edgekd.recipe import load_recipe

    weights = {}
    for name, train in (("eager", {}), ("compiled", {"compile": True, "compile_backend": "aot_eager"})):
        recipe = load_recipe(write_recipe(tmp_path / f"{name}.yaml", teacher={"checkpoint": str(tiny_teacher)},
                                          train={**train, "lr": 0.02}))
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        distill(recipe, tmp_path / name)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == (name == "compiled"), graphs  # the compiled run did go through dynamo
        weights[name] = load_checkpoint(tmp_path / name / "student_last.pt")["state_dict"]
    for k, v in weights["eager"].items():
        if v.is_floating_point():
            torch.testing.assert_close(weights["compiled"][k], v, rtol=1e-3, atol=1e-4, msg=k)
    epochs = {n: json.loads((tmp_path / n / "metrics.json").read_text())["student"]["epochs"][0] for n in weights}
    for term in ("loss_ce", "loss_kd", "loss_at"):  # every AT-KD term went through the compiled graph
        assert epochs["compiled"][term] > 0
        assert epochs["compiled"][term] == pytest.approx(epochs["eager"][term], rel=1e-4)


def test_warmup_ramps_only_the_teacher_terms():
    """train_one_epoch scales kd/at/fitnet by the ramp at each step and leaves ce alone; the terms
    come from a distiller whose terms are constants, so the logged means are exact."""
    import torch.nn as nn

    from edgekd.data import TensorSplit
    from edgekd.recipe import AugmentConfig, TrainConfig
    from edgekd.train import make_optimizer, train_one_epoch

    class ConstantTerms(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x, y):
            logits = torch.zeros(len(y), 10) + self.w
            one = 1.0 + 0 * self.w
            return logits, {"ce": one, "kd": 2 * one, "at": 3 * one}

    split = TensorSplit(torch.zeros(40, 1, 4, 4, dtype=torch.uint8), torch.zeros(40, dtype=torch.long))
    d = ConstantTerms()
    opt = make_optimizer(list(d.parameters()), TrainConfig(), 0.0)
    kw = dict(mean=torch.zeros(1), std=torch.ones(1), aug=AugmentConfig(crop_padding=0, hflip=False, rotation_deg=0,
              brightness=0), batch_size=10, device=torch.device("cpu"), seed=0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    # 4 steps per epoch, warm-up over 8 steps: epoch 2 (steps 4..7) has scales 5/8 .. 8/8
    row = train_one_epoch(d, split, opt, sched, first_step=4, warmup_steps=8, **kw)
    scale = (5 + 6 + 7 + 8) / 8 / 4
    assert row["loss_kd"] == pytest.approx(2 * scale) and row["loss_at"] == pytest.approx(3 * scale)
    assert row["loss_ce"] == pytest.approx(1.0)
    row = train_one_epoch(d, split, opt, sched, first_step=8, warmup_steps=8, **kw)
    assert row["loss_kd"] == pytest.approx(2.0)  # after the warm-up: full weight


@pytest.mark.parametrize("clip", [None, 0.5])
def test_clip_grad_norm_bounds_each_step(clip):
    """train.clip_grad_norm: one plain SGD step (lr 1) on a loss whose gradient has norm 3,000
    moves the weights by 3,000 unclipped, by exactly the clip norm clipped."""
    import torch.nn as nn

    from edgekd.data import TensorSplit
    from edgekd.recipe import AugmentConfig
    from edgekd.train import train_one_epoch

    class Steep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3))

        def forward(self, x, y):
            return torch.zeros(len(y), 10) + 0 * self.w.sum(), {"ce": 1000 * (self.w * torch.tensor([1., 2., 2.])).sum()}

    d = Steep()
    opt = torch.optim.SGD(d.parameters(), lr=1.0)
    split = TensorSplit(torch.zeros(10, 1, 4, 4, dtype=torch.uint8), torch.zeros(10, dtype=torch.long))
    train_one_epoch(d, split, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0), mean=torch.zeros(1),
                    std=torch.ones(1), aug=AugmentConfig(crop_padding=0, hflip=False, rotation_deg=0, brightness=0),
                    batch_size=10, device=torch.device("cpu"), seed=0, clip_grad_norm=clip)
    assert float(d.w.detach().norm()) == pytest.approx(3000.0 if clip is None else clip, rel=1e-5)


@pytest.mark.e2e
def test_early_stopping_stops_when_validation_stalls(tmp_path, tiny_teacher):
    from edgekd.distill.stage import distill
    from edgekd.recipe import load_recipe

    # an MLP (no BatchNorm statistics to drift) at lr 1e-12: the weights never move, validation stalls
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", teacher={"checkpoint": str(tiny_teacher)},
                                      distill={"method": "kd"}, student={"arch": "mlp", "epochs": 6},
                                      train={"lr": 1e-12, "patience": 1}))
    metrics = distill(recipe, tmp_path / "run").metrics
    assert len(metrics["student"]["epochs"]) == 2  # epoch 1 is the best; epoch 2 does not beat it; stop
    assert metrics["student"]["epochs_run"] == 2 and metrics["student"]["stopped_early"]
