"""Distillation under torchrun + DDP on CPU (gloo, 2 processes): the same steps as one process
with the same global batch, and a killed DDP run resumed ends where an uninterrupted one ends."""

from __future__ import annotations

import pytest
import os
import signal
import subprocess
import sys
import time

import torch

from edgekd.checkpoint import load_checkpoint

from conftest import REPO, write_recipe


def _recipe(tmp_path):
    # An MLP student (no BatchNorm, no dropout): per-rank BatchNorm statistics would differ from
    # one process's by design, so the exact comparison uses a student without them.
    return write_recipe(tmp_path / "r.yaml", data={"train_subset": 800}, student={"arch": "mlp", "epochs": 2},
                        distill={"method": "kd"}, train={"batch_size": 40, "lr": 0.05})


def _distill(recipe, out, teacher, *extra, nproc: int | None = None, torchrun: bool = False):
    cmd = [sys.executable, "-m", "edgekd", "distill", str(recipe), "--teacher", str(teacher), "--out", str(out),
           *extra]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "edgekd",
               *cmd[3:]]
    elif nproc:
        cmd += ["--nproc", str(nproc)]
    return cmd


def _weights(run):
    return load_checkpoint(run / "student_last.pt")["state_dict"]


@pytest.mark.e2e
def test_ddp_matches_one_process_and_resumes(tmp_path, tiny_teacher):
    recipe = _recipe(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(_distill(recipe, tmp_path / "one", tiny_teacher), capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(_distill(recipe, tmp_path / "two", tiny_teacher, nproc=2), capture_output=True, text=True,
                         env=env, cwd=REPO)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("edgekd distill: tiny") == 1  # rank 0 alone reports
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    m = __import__("json").loads((tmp_path / "two" / "metrics.json").read_text())
    assert m["world_size"] == 2

    # Kill the whole torchrun group after the first student epoch, then resume under torchrun.
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_distill(recipe, cut, tiny_teacher, torchrun=True), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 600
    while not (cut / "student_last.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(cut / "student_last.pt")["epoch"] == 1 and not (cut / "metrics.json").exists()
    resumed = subprocess.run(_distill(recipe, cut, tiny_teacher, "--resume", torchrun=True), capture_output=True,
                             text=True, env=env, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    c = _weights(cut)
    for k in b:
        assert torch.allclose(b[k], c[k], atol=1e-6), k


@pytest.mark.e2e
def test_global_batch_must_divide_among_processes(tmp_path, tiny_teacher):
    recipe = write_recipe(tmp_path / "r.yaml", student={"arch": "mlp"}, distill={"method": "kd"},
                          train={"batch_size": 45})
    r = subprocess.run(_distill(recipe, tmp_path / "o", tiny_teacher, nproc=2), capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode != 0 and "must divide among 2 processes" in r.stderr


@pytest.mark.e2e
def test_qat_under_torchrun_is_refused_before_the_float_epochs(tmp_path, tiny_teacher):
    recipe = write_recipe(tmp_path / "r.yaml", student={"arch": "mlp"}, distill={"method": "kd", "qat": {"epochs": 1}},
                          train={"batch_size": 40})
    r = subprocess.run(_distill(recipe, tmp_path / "o", tiny_teacher, nproc=2), capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode != 0 and "distill.qat runs in one process" in r.stderr and "--qat-epochs 0" in r.stderr
    assert not list((tmp_path / "o").glob("student_*.pt"))  # no float epoch was spent on it
