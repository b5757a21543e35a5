"""The benchmark scripts run end to end at a tiny scale, so they cannot rot unnoticed."""

import json
import subprocess
import sys

from conftest import REPO


def test_methods_table_is_resumable(tmp_path):
    out = tmp_path / "methods"
    cmd = [sys.executable, str(REPO / "benchmarks" / "methods.py"), "--seeds", "2", "--methods", "ce,at",
           "--betas", "100", "--sweep-seeds", "2", "--train-subset", "300", "--test-subset", "100", "--epochs", "1",
           "--teacher-epochs", "1", "--device", "cpu", "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert first.returncode == 0, first.stderr[-3000:]
    cells = json.loads((tmp_path / "methods.json").read_text())["cells"]
    assert len(cells) == 2 * 3  # ce, at at the default beta, at at beta 100: two seeds each
    table = (tmp_path / "methods.md").read_text()
    assert "benchmarks/methods.py --seeds 2" in table and "student alone" in table and "RepDistiller" in table
    assert "| at | 100 | 2 |" in table
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 0 and "seed=" not in again.stdout.split("# Distillation")[0]  # nothing rerun
    assert json.loads((tmp_path / "methods.json").read_text())["cells"] == cells


def test_hard_table_runs_and_resumes(tmp_path):
    out = tmp_path / "hard"
    cmd = [sys.executable, str(REPO / "benchmarks" / "hard.py"), "--seeds", "1", "--train-subset", "300",
           "--no-mobilenet", "--device", "cpu", "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert first.returncode == 0, first.stderr[-3000:]
    cells = json.loads((tmp_path / "hard.json").read_text())["cells"]
    assert {k.split("|")[1] for k in cells} == {"teacher", "ce", "kd", "kd-shifts", "kd-hard-affine", "kd-hard-mix"}
    table = (tmp_path / "hard.md").read_text()
    assert "benchmarks/hard.py --seeds 1" in table and "| KD + hard-affine | 1 |" in table
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 0 and json.loads((tmp_path / "hard.json").read_text())["cells"] == cells
