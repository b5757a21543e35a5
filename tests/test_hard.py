"""HARD (learned hard augmentations): the augmentors, the alternating game and its switching
rule, and HARD runs from the CLI on real Fashion-MNIST, resumed exactly after an interruption."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from edgekd.augment import AUGMENTORS, get_augmentor
from edgekd.augment.hard import HardTraining
from edgekd.cli import app
from edgekd.errors import EdgekdError
from edgekd.models import build_model

from conftest import one_line_error, write_recipe


def _real_batch(n: int = 16, size: int = 16) -> torch.Tensor:
    from edgekd.data import gather, load_dataset
    from edgekd.recipe import DataConfig

    x, _ = gather(load_dataset(DataConfig(image_size=size, train_subset=64, test_subset=10), 0).train, n)
    return x.float() / 255.0


def _hard(augmentor_name: str = "hard-affine", **kw: object) -> tuple[HardTraining, torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    student = build_model("mlp", 10, 1, 16)
    teacher = build_model("cnn", 10, 1, 16, width=8).eval().requires_grad_(False)
    hard = HardTraining(get_augmentor(augmentor_name, 1, 16), mean=torch.tensor([0.3]), std=torch.tensor([0.35]),
                        temperature=4.0, **kw)
    return hard, student, teacher


def test_affine_augmentor_starts_as_the_identity():
    x = _real_batch()
    aug = get_augmentor("hard-affine", 1, 16)
    assert torch.allclose(aug(x, sample=False), x, atol=1e-5)
    noisy = aug(x, torch.Generator().manual_seed(0))
    assert (noisy - x).abs().max() < 0.05  # a fraction of a pixel of jitter at initialisation


def test_unknown_augmentor_lists_the_valid_names(tmp_path):
    with pytest.raises(EdgekdError, match="choose one of hard-affine, hard-mix"):
        get_augmentor("hard-gan", 1, 16)
    r = CliRunner().invoke(app, ["distill", str(write_recipe(tmp_path / "r.yaml")), "--augment", "hard-gan",
                                 "--out", str(tmp_path / "run")])
    assert "unknown augmentor 'hard-gan'; choose one of " + ", ".join(AUGMENTORS) in one_line_error(r)
    r = CliRunner().invoke(app, ["distill", str(write_recipe(tmp_path / "r.yaml")), "--augment", "hard-affine",
                                 "--method", "ce", "--out", str(tmp_path / "run")])
    assert "trains against a teacher" in one_line_error(r)


@pytest.mark.parametrize("name", ["hard-affine", "hard-mix", "hard-vae"])
def test_augmentor_step_moves_only_the_augmentor(name):
    hard, student, teacher = _hard(name)
    x = (_real_batch() - 0.3) / 0.35
    before_s = [p.detach().clone() for p in student.parameters()]
    before_t = [p.detach().clone() for p in teacher.parameters()]
    before_a = [p.detach().clone() for p in hard.augmentor.parameters()]
    hard.augmentor_step(student, teacher, x, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(before_s, student.parameters()))
    assert all(p.grad is None for p in student.parameters())  # nothing left for the student's optimizer
    assert all(torch.equal(a, b) for a, b in zip(before_t, teacher.parameters()))
    assert all(p.grad is None for p in teacher.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before_a, hard.augmentor.parameters()))  # gradients reached it


def test_student_term_trains_the_student_not_the_augmentor():
    hard, student, teacher = _hard()
    x = (_real_batch() - 0.3) / 0.35
    term, disagreement = hard.student_term(student, teacher, x, torch.Generator().manual_seed(0))
    term.backward()
    assert term.item() > 0 and 0 <= disagreement <= 100
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in hard.augmentor.parameters())


def test_switching_rule_on_a_scripted_sequence():
    """student → augmentor after k iterations below l_min in a row; augmentor → student after k
    above l_max, saving the augmentor; a streak broken in between does not count."""
    hard, student, teacher = _hard(l_min=5.0, l_max=40.0, consecutive=3)
    assert hard.phase == "student" and len(hard.pool) == 1
    for d in (50, 4, 3, 10, 4, 2):  # broken streak: no switch yet
        hard.end_iteration(d)
    assert hard.phase == "student"
    hard.end_iteration(1)  # the third in a row below 5 %
    assert hard.phase == "augmentor" and hard.switches == 1 and len(hard.pool) == 1
    for d in (45, 50, 10, 41, 42):
        hard._count(d > hard.l_max, to="student", disagreement=d)
    assert hard.phase == "augmentor"
    hard._count(True, to="student", disagreement=60)
    assert hard.phase == "student" and hard.switches == 2 and len(hard.pool) == 2


def test_an_augmentor_phase_that_never_reaches_l_max_ends_at_the_cap():
    """max_phase: an augmentor phase stuck below l_max ends after exactly max_phase augmentor steps,
    its augmentor saved; without the cap (the paper's rule) the same sequence never leaves it."""
    x = (_real_batch(8) - 0.3) / 0.35
    for cap in (None, 4):
        hard, student, teacher = _hard(l_min=5.0, l_max=101.0, consecutive=2, max_phase=cap)  # l_max unreachable
        for d in (1, 1):
            hard.end_iteration(d)
        assert hard.phase == "augmentor" and hard.switches == 1
        g = torch.Generator().manual_seed(0)
        for step in range(1, 7):
            hard.augmentor_step(student, teacher, x, g)
            if cap is not None and step == cap:
                assert hard.phase == "student" and hard.switches == 2 and len(hard.pool) == 2 and hard.capped == 1
                break
            assert hard.phase == "augmentor", step
        if cap is None:
            assert hard.switches == 1 and len(hard.pool) == 1 and hard.capped == 0
    # a new augmentor phase counts from zero, and the count survives a checkpoint
    for d in (1, 1):
        hard.end_iteration(d)
    hard.augmentor_step(student, teacher, x, g)
    again, _, _ = _hard(l_min=5.0, l_max=101.0, consecutive=2, max_phase=cap)
    again.load_state_dict(hard.state_dict())
    assert again.phase_iterations == 1 and again.capped == 1


def test_relative_threshold_switches_on_what_the_augmentation_adds():
    """A student that disagrees with its teacher on 20 % of clean images never gets below an
    absolute l_min of 5 %; read relative to that, it switches exactly at the third iteration in a
    row where the augmentation adds less than 5 points."""
    seq = [(30, 20), (24, 20), (26, 20), (23, 20), (22, 21), (24, 20), (25, 20)]  # (augmented, clean) %
    absolute, _, _ = _hard(l_min=5.0, l_max=40.0, consecutive=3)
    relative, student, teacher = _hard(l_min=5.0, l_max=40.0, consecutive=3, threshold="relative")
    for i, (aug, clean) in enumerate(seq):
        absolute.end_iteration(absolute.switch_metric(aug, clean))
        relative.end_iteration(relative.switch_metric(aug, clean))
        assert relative.phase == ("augmentor" if i >= 5 else "student"), i  # +4, +3, +1 at i = 3, 4, 5
    assert absolute.phase == "student" and absolute.switches == 0
    assert [row[2] for row in relative.phase_log] == [10, 4, 6, 3, 1, 4, 5]
    # the augmentor step's metric is relative too: the clean disagreement comes from the same batch
    x = _real_batch(8)
    x = (x - 0.3) / 0.35
    d_rel = relative.augmentor_step(student, teacher, x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        student.eval()
        clean = 100.0 * (student(x).argmax(1) != teacher(x).argmax(1)).float().mean().item()
    assert -100 <= d_rel <= 100 and d_rel <= 100 - clean


def test_student_phases_draw_from_every_saved_augmentor():
    hard, student, teacher = _hard()
    for shift in (0.3, -0.3):  # two distinct saved augmentors besides the identity
        with torch.no_grad():
            hard.augmentor.mean[2] = shift
        hard.pool.append(hard._snapshot())
    seen = set()
    hard.start_epoch(0)
    x = (_real_batch(4) - 0.3) / 0.35
    for _ in range(30):
        hard.student_term(student, teacher, x, torch.Generator().manual_seed(0))
        seen.add(round(float(hard.frozen.mean[2]), 2))
    assert seen == {0.0, 0.3, -0.3}


def _hard_recipe(tmp_path, **distill: object):
    return write_recipe(tmp_path / "r.yaml", data={"train_subset": 600, "augment": {"crop_padding": 0, "hflip": False,
                                                                                  "rotation_deg": 0, "brightness": 0}},
                        teacher={"arch": "cnn", "width": 8, "epochs": 1}, student={"arch": "mlp", "epochs": 2},
                        train={"batch_size": 20},
                        distill={"method": "kd", "augment": "hard-affine",
                                 "hard": {"consecutive": 2, "l_min": 60, "l_max": 61, "lr": 0.2}, **distill})


class _StopAfterFirstEpoch:
    """A Ctrl-C right after the student's first epoch was saved."""

    def start(self, label: str, total: int) -> None: ...
    def advance(self, n: int) -> None: ...

    def end_epoch(self, role: str, row: dict) -> None:
        if role == "student" and row["epoch"] == 1:
            raise KeyboardInterrupt


@pytest.mark.e2e
def test_hard_run_resumes_exactly(tmp_path):
    """Loose thresholds make both phases and several switches happen in two short epochs; an
    interrupted run resumed from its checkpoint (pool and phase state included) ends equal."""
    from edgekd.distill.stage import distill
    from edgekd.recipe import load_recipe

    recipe = load_recipe(_hard_recipe(tmp_path))
    full = distill(recipe, tmp_path / "full").metrics
    hard = full["student"]["hard"]
    assert hard["switches"] >= 2 and hard["pool"] >= 2
    assert {row[1] for row in hard["phase_log"]} == {"student", "augmentor"}
    assert (tmp_path / "full" / "augmentor.png").stat().st_size > 0
    log = (tmp_path / "full" / "log.csv").read_text()
    assert "loss_hard" in log.splitlines()[0] and "hard_switches" in log.splitlines()[0]

    with pytest.raises(KeyboardInterrupt):
        distill(recipe, tmp_path / "cut", progress=_StopAfterFirstEpoch())
    resumed = distill(recipe, tmp_path / "cut", resume=True).metrics
    assert resumed["student"]["hard"]["phase_log"] == hard["phase_log"]
    assert resumed["student"]["test_top1"] == full["student"]["test_top1"]


@pytest.mark.e2e
def test_hard_mix_trains_from_the_cli(tmp_path):
    r = CliRunner().invoke(app, ["distill", str(_hard_recipe(tmp_path)), "--augment", "hard-mix",
                                 "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output + r.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["student"]["hard"]["augmentor"] == "hard-mix"
    assert {row[1] for row in m["student"]["hard"]["phase_log"]} == {"joint"}
    assert m["student"]["epochs"][-1]["loss_hard"] > 0 and (tmp_path / "run" / "augmentor.png").is_file()


@pytest.mark.e2e
def test_hard_vae_trains_its_vae_once_and_reuses_it(tmp_path):
    """No pretrained VAE is reachable offline: the run trains one on its training images, keeps it
    in the run dir (vae.pt) and a resumed run reuses it rather than training again."""
    recipe = _hard_recipe(tmp_path)
    r = CliRunner().invoke(app, ["distill", str(recipe), "--augment", "hard-vae", "--epochs", "1",
                                 "--teacher-epochs", "1", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output + r.stderr
    vae = tmp_path / "run" / "vae.pt"
    stamp = vae.stat().st_mtime_ns
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["student"]["hard"]["augmentor"] == "hard-vae" and m["student"]["epochs"][0]["loss_hard"] > 0
    r = CliRunner().invoke(app, ["distill", str(recipe), "--augment", "hard-vae", "--epochs", "1",
                                 "--teacher-epochs", "1", "--out", str(tmp_path / "run"), "--resume"])
    assert r.exit_code == 0, r.output + r.stderr
    assert vae.stat().st_mtime_ns == stamp


@pytest.mark.e2e
def test_vae_reconstructs_after_pretraining(tmp_path):
    """The pretrained VAE is a reconstruction of real images, so hard-vae starts near the identity."""
    from edgekd.augment.vae import HardVAE

    x = _real_batch(64)
    batches = [(x[i:i + 16].mul(255).round().to(torch.uint8), None) for i in range(0, 64, 16)]
    aug = HardVAE(1, 16)
    aug.pretrain_epochs = 30
    before = (aug(x, sample=False) - x).abs().mean()
    aug.prepare(lambda seed: batches, tmp_path / "vae.pt", torch.device("cpu"), 0)
    after = (aug(x, sample=False) - x).abs().mean()
    assert after < 0.5 * before and (tmp_path / "vae.pt").is_file()
