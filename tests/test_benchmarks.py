"""The benchmark scripts run end to end at a tiny scale, so they cannot rot unnoticed."""

import pytest
import hashlib
import json
import re
import shutil
import subprocess
import sys
import threading
import time

import yaml

from conftest import REPO


@pytest.mark.e2e
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
    assert "- at, β = 100:" in table and "| at | β=1000 | 2 |" in table
    assert (tmp_path / "methods_teacher.pt").is_file()  # the table's one teacher, kept beside it
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 0 and "seed=" not in again.stdout.split("# Distillation")[0]  # nothing rerun
    assert json.loads((tmp_path / "methods.json").read_text())["cells"] == cells
    # the recipe's default moves (as the quick recipe's warm-up did): the table keeps its own keys
    recipe = yaml.safe_load((REPO / "recipes" / "fashion_mnist_quick.yaml").read_text())
    recipe["distill"]["warmup_epochs"] = 1.0 - recipe["distill"].get("warmup_epochs", 0.0)
    (tmp_path / "moved.yaml").write_text(yaml.safe_dump(recipe))
    moved = subprocess.run(cmd + ["--recipe", str(tmp_path / "moved.yaml")], capture_output=True, text=True, cwd=REPO)
    assert moved.returncode == 0 and "seed=" not in moved.stdout.split("# Distillation")[0], moved.stderr[-3000:]
    assert json.loads((tmp_path / "methods.json").read_text())["cells"] == cells


def test_paired_difference_and_t_interval_by_hand():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from cells import format_difference, paired_difference

    # differences 2, 3, 1 (seed 3 has no partner): mean 2, sample std 1, t(0.975, 2) = 4.303
    d = paired_difference({0: 80.0, 1: 82.0, 2: 81.0, 3: 90.0}, {0: 78.0, 1: 79.0, 2: 80.0})
    half = 4.303 / 3 ** 0.5
    assert d["n"] == 3 and d["mean"] == 2.0 and d["std"] == 1.0
    assert (d["lo"], d["hi"]) == (2.0 - half, 2.0 + half)
    assert format_difference(d) == "+2.00 [-0.48, +4.48] (n=3)"  # includes 0: no star
    five = paired_difference({s: 1.0 + s % 2 for s in range(5)}, {s: 0.0 for s in range(5)})
    assert format_difference(five).endswith("*")  # 1, 2, 1, 2, 1: the interval excludes 0
    assert paired_difference({0: 1.0}, {0: 0.0}) is None


def test_each_family_s_recipe_is_read_against_the_quantization_table_that_trained_as_it(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import quantization_recipes as qr

    tables = {n: json.loads((REPO / "benchmarks" / f"{n}.json").read_text()) for n in qr.TABLES}
    text, met = qr.render(tables)
    assert text == (REPO / "benchmarks" / "quantization_recipes.md").read_text(), \
        "benchmarks/quantization_recipes.md is stale: run python benchmarks/quantization_recipes.py"
    row = next(line for line in text.splitlines() if line.startswith("| torchvision/shufflenet_v2_x0_5 |"))
    values, refused = qr.drops(tables["quantization_clip"], "torchvision/shufflenet_v2_x0_5")
    assert "| `fashion_mnist_shufflenet` | 1.0 |" in row and len(values) == 3 and not refused
    assert f"{sum(values) / 3:.2f}" in row
    assert met == all("| yes |" in line for line in text.splitlines() if line.startswith("| ") and "`" in line)

    # a recipe that trains otherwise than the table measured stands for no table
    quick = yaml.safe_load((REPO / "edgekd" / "recipes" / "fashion_mnist_quick.yaml").read_text())
    quick["distill"]["warmup_epochs"] = 0.0
    (tmp_path / "cold.yaml").write_text(yaml.safe_dump(quick))
    monkeypatch.setitem(qr.FAMILY_RECIPES, "mobilenet_v2", (str(tmp_path / "cold.yaml"), None))
    with pytest.raises(SystemExit, match=r"does not train as quantization\.json measured it: distill\.warmup_epochs"):
        qr.render(tables)


def test_two_processes_fill_one_table_without_losing_cells(tmp_path):
    """Two workers read the table, each finishes a different cell: both cells survive, and a cell
    one worker holds is refused to the other."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from cells import Cells

    path = tmp_path / "t.json"
    first, second = Cells(path), Cells(path)  # both read the (missing) file before either writes
    held = first.data  # a caller's reference (methods.py renders from it) must see every later cell
    first.keep("a|seed=0", {"top1": 1.0})
    second.keep("b|seed=0", {"top1": 2.0})
    second.save(timing={"runs": 3})
    first.keep("c|seed=0", {"top1": 3.0})
    on_disk = json.loads(path.read_text())
    assert set(on_disk["cells"]) == {"a|seed=0", "b|seed=0", "c|seed=0"} and on_disk["timing"] == {"runs": 3}
    assert held is first.data and set(held["cells"]) == set(on_disk["cells"])
    # a cell one worker updates (a teacher's kept file recorded) is not undone by the other's stale copy
    second.keep("b|seed=0", {"top1": 2.0, "sha256": "abc"})
    first.keep("d|seed=0", {"top1": 4.0})
    assert json.loads(path.read_text())["cells"]["b|seed=0"] == {"top1": 2.0, "sha256": "abc"}
    with first.claim(tmp_path / "runs" / "a") as mine, second.claim(tmp_path / "runs" / "a") as theirs:
        assert mine and not theirs
    with second.claim(tmp_path / "runs" / "a") as now_mine:
        assert now_mine


def test_two_processes_that_need_one_teacher_train_it_once(tmp_path):
    """Two table processes (threads here: flock holds between separate opens) reach the same teacher:
    the second waits for the first and takes the teacher it kept. The training itself is replaced by
    a stand-in that writes a finished run: what is under test is who trains."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from cells import Cells

    trained: list[str] = []

    class StandInTraining(Cells):
        def run(self, key, recipe, run_dir, row):
            if key not in self.cells:
                trained.append(key)
                time.sleep(0.5)
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "teacher_best.pt").write_bytes(b"teacher weights")
                (run_dir / "metrics.json").write_text("{}")
                self.keep(key, {"test_top1": 90.0})
            return self.cells[key]

    workers = [StandInTraining(tmp_path / "t.json") for _ in range(2)]  # both read the table before either trains
    got: list[tuple[dict, str]] = []
    kept = tmp_path / "t_teacher_seed0.pt"
    threads = [threading.Thread(target=lambda w=w: got.append(
        w.teacher("inv|teacher|0", None, tmp_path / "runs" / "teacher", lambda m: m, keep=kept))) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert trained == ["inv|teacher|0"] and len(got) == 2 and got[0] == got[1]
    assert got[0][1] == str(kept) and got[0][0]["sha256"] == hashlib.sha256(kept.read_bytes()).hexdigest()


@pytest.mark.e2e
def test_hard_table_runs_and_resumes(tmp_path):
    out = tmp_path / "hard"
    cmd = [sys.executable, str(REPO / "benchmarks" / "hard.py"), "--seeds", "1", "--train-subset", "300",
           "--no-mobilenet", "--device", "cpu", "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert first.returncode == 0, first.stderr[-3000:]
    cells = json.loads((tmp_path / "hard.json").read_text())["cells"]
    assert {k.split("|")[1] for k in cells} == {"teacher", "ce", "kd", "kd-shifts", "kd-hard-affine", "kd-hard-mix",
                                                "kd-hard-vae"}
    table = (tmp_path / "hard.md").read_text()
    assert "benchmarks/hard.py --seeds 1" in table and "| KD + hard-affine | 1 |" in table
    # the MobileNetV2 rows by a second process (as beside a running one): the same table gains them
    mb_cmd = [*cmd[:cmd.index("--no-mobilenet")], "--mobilenet-only", "--mobilenet-train-subset", "200",
              "--mobilenet-epochs", "1", *cmd[cmd.index("--no-mobilenet") + 1:]]
    mobile = subprocess.run(mb_cmd, capture_output=True, text=True, cwd=REPO)
    assert mobile.returncode == 0, mobile.stderr[-3000:]
    both = json.loads((tmp_path / "hard.json").read_text())["cells"]
    assert {k for k in both if k not in cells} == {"mb|teacher|0", "mb|kd|0", "mb|kd-hard-affine|0"}
    assert (tmp_path / "hard_mb_teacher_seed0.pt").is_file()
    cells = both
    kept = tmp_path / "hard_teacher_seed0.pt"  # the teacher beside the table, for git
    assert cells["inv|teacher|0"]["sha256"] == hashlib.sha256(kept.read_bytes()).hexdigest()

    def without(cell: str) -> None:
        table = json.loads((tmp_path / "hard.json").read_text())
        del table["cells"][cell]
        (tmp_path / "hard.json").write_text(json.dumps(table))

    # a new machine has the table and the kept teacher but not the run dirs: a cell still to run
    # there uses the kept teacher; the teacher is not trained again
    shutil.rmtree(tmp_path / "hard_runs")
    without("inv|kd-hard-vae|0")
    wrong_row = subprocess.run([*cmd, "--rows", "kd,hard-nothing"], capture_output=True, text=True, cwd=REPO)
    assert wrong_row.returncode != 0 and "unknown --rows hard-nothing; choose from ce, kd," in wrong_row.stderr
    # this process runs only the row asked for (as beside another process); the table's command stays whole
    again = subprocess.run([*cmd, "--rows", "kd-hard-vae"], capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "--rows" not in (tmp_path / "hard.md").read_text()
    after = json.loads((tmp_path / "hard.json").read_text())["cells"]
    assert after.keys() == cells.keys() and not (tmp_path / "hard_runs" / "inv_teacher_seed0").exists()
    assert {k: v for k, v in after.items() if k != "inv|kd-hard-vae|0"} == {
        k: v for k, v in cells.items() if k != "inv|kd-hard-vae|0"}  # the recorded cells are kept
    # another file under the kept teacher's name is refused before anything trains
    without("inv|kd-hard-vae|0")
    good = kept.read_bytes()
    kept.write_bytes(good[:-1])
    wrong = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert wrong.returncode != 0 and "SHA-256 differs" in wrong.stderr, wrong.stderr[-3000:]
    # without the kept teacher it is trained again and must reproduce its recorded top-1 before the
    # new cell may use it
    kept.unlink()
    retrain = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert retrain.returncode == 0, retrain.stderr[-3000:]
    teacher = json.loads((tmp_path / "hard.json").read_text())["cells"]["inv|teacher|0"]
    assert abs(teacher["retrained_test_top1"] - cells["inv|teacher|0"]["test_top1"]) <= 0.5
    assert teacher["test_top1"] == cells["inv|teacher|0"]["test_top1"]  # the recorded row stays
    assert teacher["sha256"] == hashlib.sha256(kept.read_bytes()).hexdigest()
    # a teacher run that was killed (a teacher_best.pt but no metrics.json yet) is resumed to its end,
    # never taken for the finished teacher
    kept.unlink()
    (tmp_path / "hard_runs" / "inv_teacher_seed0" / "metrics.json").unlink()
    without("inv|kd-hard-vae|0")
    resumed = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "hard_runs" / "inv_teacher_seed0" / "metrics.json").is_file()
    assert kept.is_file()
    # the invariance process's report keeps the rows the other process made
    assert "## MobileNetV2-0.35 from ResNet-18" in (tmp_path / "hard.md").read_text()


@pytest.mark.e2e
def test_students_table_distils_exports_and_times_each_family(tmp_path, tiny_teacher):
    from conftest import write_recipe

    recipe = write_recipe(tmp_path / "tiny.yaml", data={"train_subset": 300, "test_subset": 100})
    out = tmp_path / "students"
    cmd = [sys.executable, str(REPO / "benchmarks" / "students.py"), "--recipe", str(recipe), "--teacher",
           str(tiny_teacher), "--families", "mobilenet_v2,torchvision/mobilenet_v3_small,mlp", "--seeds", "1",
           "--runs", "10", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    cells = json.loads((tmp_path / "students.json").read_text())["cells"]
    assert cells["mlp|seed=0"]["method"] == "kd"  # no feature maps: KD
    assert cells["torchvision/mobilenet_v3_small|seed=0"]["method"] == "atkd"
    for c in cells.values():
        assert c["int8_p50_ms_1t"] > 0 and c["int8_p50_ms_2t"] > 0 and c["int8_bytes"] > 0
    table = (tmp_path / "students.md").read_text()
    assert "| torchvision/mobilenet_v3_small | atkd | 1 |" in table
    assert (tmp_path / "students.png").is_file()


@pytest.mark.e2e
def test_quantization_table_scores_ptq_and_qat_and_resumes(tmp_path, tiny_teacher):
    from conftest import write_recipe

    recipe = write_recipe(tmp_path / "tiny.yaml", data={"train_subset": 300, "test_subset": 100})
    out = tmp_path / "quant"
    cmd = [sys.executable, str(REPO / "benchmarks" / "quantization.py"), "--recipe", str(recipe), "--teacher",
           str(tiny_teacher), "--families", "mobilenet_v2", "--seeds", "1", "--qat-epochs", "0.5", "--runs", "10",
           "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    data = json.loads((tmp_path / "quant.json").read_text())
    rows = {(row["quantization"], row.get("cell")): row for row in data["table"]}
    ptq = ("ptq-500", "ptq-2000", "ptq-hist")
    assert {q for q, _ in rows} == {"ptq", "ptq-best", "qat"} and {c for q, c in rows if q == "ptq"} == set(ptq)
    assert all(rows[("ptq", n)]["int8_top1"] is not None for n in ptq)
    # the observers compared: TFLite's min-max ranges (onnx2tf) against PT2E histograms (litert-torch)
    assert (rows[("ptq", "ptq-500")]["observer"], rows[("ptq", "ptq-hist")]["observer"]) == ("min-max", "histogram")
    best = next(row for (q, _), row in rows.items() if q == "ptq-best")
    val = {n: data["cells"][f"mobilenet_v2|seed=0|{n}"]["int8_val_top1"] for n in ptq}
    assert val[best["cell"]] == max(val.values())  # chosen on validation images, never test
    qat = rows[("qat", "qat-0.5ep")]  # other than 1 epoch: a cell and a run dir of their own
    for row in rows.values():
        assert {"family", "seed", "quantization", "fp32_top1", "int8_top1", "p50_ms", "wall_s"} <= set(row)
    cell = data["cells"]["mobilenet_v2|seed=0|qat-0.5ep"]
    assert qat["int8_top1"] is not None or cell["refused_file_top1"] is not None  # a refused file is scored too
    assert cell["qat_wall_s"] > 0 and cell["student_epochs_wall_s"] > 0 and qat["p50_ms"] > 0
    assert "| mobilenet_v2 | qat (0.5 ep) |" in (tmp_path / "quant.md").read_text()
    assert "| mobilenet_v2 | ptq-hist (500, litert-torch) |" in (tmp_path / "quant.md").read_text()

    before = (tmp_path / "quant.json").read_text()
    r = subprocess.run(cmd + ["--no-timing"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "quant.json").read_text())["cells"] == json.loads(before)["cells"]  # nothing redone

    # the QAT wall measured again on a copy of the table's float student; the table is left as it was
    table_before, runs_before = (tmp_path / "quant.json").read_text(), sorted(p.name for p in (tmp_path / "quant_runs").iterdir())
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "qat_wall.py"), "--table", str(out), "--families",
                        "mobilenet_v2"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    wall = re.search(r"mobilenet_v2 seed 0: 0\.5 QAT epoch\(s\) ([\d.]+) s, float epochs ([\d.]+) s: QAT ([\d.]+) %",
                     r.stdout)
    assert wall and float(wall[1]) > 0 and float(wall[3]) == pytest.approx(100 * float(wall[1]) / float(wall[2]), rel=0.05)
    assert float(wall[2]) == pytest.approx(cell["student_epochs_wall_s"], abs=0.01)  # the table's own float epochs
    assert (tmp_path / "quant.json").read_text() == table_before
    assert sorted(p.name for p in (tmp_path / "quant_runs").iterdir()) == runs_before

    # op by op, the QAT file against the graph it was trained as
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "qat_drift.py"), str(tmp_path / "quant_runs" / "mobilenet_v2_seed0_atkd_qat0.5"),
                        "--images", "5"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    ops = [line.split() for line in r.stdout.splitlines() if line[:4].strip().isdigit()]
    assert len(ops) >= 10
    first_conv = next(op for op in ops if "CONV" in op[1])
    assert int(first_conv[2]) <= 1  # the same int8 image in: the first conv's outputs agree within a step
    assert "top-1 agreement, file vs converted graph:" in r.stdout and "logits (op" in r.stdout


@pytest.mark.e2e
def test_kd_terms_measures_each_terms_gradient(tmp_path, tiny_teacher):
    from conftest import write_recipe

    recipe = write_recipe(tmp_path / "tiny.yaml", data={"train_subset": 300, "test_subset": 100})
    out = tmp_path / "curves"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kd_terms.py"), "--recipe", str(recipe), "--teacher",
                        str(tiny_teacher), "--budgets", "300x2", "--max-steps", "5", "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = json.loads((tmp_path / "curves.json").read_text())["budgets"]["300x2"]["steps"]
    assert len(steps) == 5
    for row in steps:
        assert row["ce_grad_norm"] > 0 and row["kd_grad_norm"] > 0 and row["at_grad_norm"] > 0
        assert -1.0 <= row["cos_kd_ce"] <= 1.0
    assert (tmp_path / "curves.png").is_file() and "cos(KD, CE)" in r.stdout


@pytest.mark.e2e
def test_distill_throughput_prints_every_step_kind_and_the_ceiling():
    cmd = [sys.executable, str(REPO / "benchmarks" / "distill_throughput.py"), "--device", "cpu", "--teacher",
           "resnet18", "--teacher-width", "8", "--width-mult", "0.25", "--size", "16", "--batch-sizes", "16,32",
           "--images", "64", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout)["rows"]
    assert [row["batch_size"] for row in rows] == [16, 32]
    for row in rows:
        for key in ("teacher_ce_img_per_s", "kd_img_per_s", "atkd_img_per_s", "teacher_forward_img_per_s"):
            assert row[key] > 0


@pytest.mark.e2e
def test_tome_profile_times_each_part_of_a_merging_block(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import tome_profile

    tome_profile.main(["--runs", "2", "--shapes", "0", "--out", str(tmp_path / "tp")])
    (row,) = json.loads((tmp_path / "tp.json").read_text())["rows"]
    assert row["tokens"] == 197 and row["schedule_r16"] == [16, 16, 16, 16, 16, 16]
    for part in ("forward r=0", "forward r=8", "block r=8", "match exact", "match lsh", "match bucketed",
                 "forward r=8 bucketed", "merge"):
        assert row["ms"][part] > 0
    assert row["score_macs"] == {"exact": 99 * 98 * 32, "bucketed": 7 * 32 * 32 * 32}
    md = (tmp_path / "tp.md").read_text()
    assert 0 < row["match_share"] < 1 and "| ViT 6×96 | 197 |" in md and "Bucketed LSH against exact" in md


def test_tome_table_sets_a_student_trained_with_merging_against_its_own_r0():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import argparse
    from pathlib import Path

    import tome

    from edgekd.export.tome import tome_roles as _tome_roles

    # the file names tome.py reads are the ones `edgekd export --tome-sweep` writes: the student's own
    # setting is `student`, so a student trained at r = 8 has an r = 0 file and no r = 8 one
    for own in (0, 8):
        ckpt = {"arch": "vit", "image_size": 56, "model_kwargs": {"patch_size": 4, "depth": 12, "tome_r": own}}
        written = set(_tome_roles(ckpt, Path("s.pt"), (0, 8, 16), ("exact", "lsh"), 16)) | {"student"}
        assert {tome.tome_stem(r, m, own) for r in (0, 8, 16) for m in ("exact", "lsh") if r or m == "exact"} == written
    shelf, trained = ("ViT r=0", "off the shelf"), ("ViT trained at r=8, r=0", "trained at r=8")
    rows = [tome.Row("ViT r=0", 0, "none", "student", Path("a"), *shelf),
            tome.Row("ViT r=8 exact", 8, "exact", "student-tome-r8-exact", Path("a"), *shelf),
            tome.Row("ViT trained at r=8, r=0", 0, "none", "student-tome-r0-none", Path("b"), *trained),
            tome.Row("ViT trained at r=8, r=8 exact", 8, "exact", "student", Path("b"), *trained)]
    ms = {"ViT r=0": 10.0, "ViT r=8 exact": 8.0, "ViT trained at r=8, r=0": 12.0, "ViT trained at r=8, r=8 exact": 6.0}
    data = {"latency_ms": {f"{k}|{rt}": {"1": v} for k, v in ms.items() for rt in ("torch", "ort", "fp32", "int8")},
            "top1": {"ViT r=0": {"fp32": 60.0, "int8": 59.0}, "ViT r=8 exact": {"fp32": 60.0, "int8": 58.5},
                     "ViT trained at r=8, r=0": {"fp32": 63.0, "int8": 62.0},
                     "ViT trained at r=8, r=8 exact": {"fp32": 63.0, "int8": 62.5}},
            "matching_ms": {"8": {"exact": 0.1, "exact_with_merge": 0.2}}, "depth": 12, "tokens": 197,
            "embed_dim": 96, "bits": 16, "recipe": "r.yaml", "run_dir": "d", "distill_min": 1.0, "trained_r": 8,
            "trained_distill_min": 2.0, "machine": "m", "wall_s": 60.0, "load_1m": 0.1, "test_images": 100,
            "scaling": []}
    args = argparse.Namespace(sweep="0,8", bits=16, threads="1", trained_r=8)
    md = tome.render(data, rows, args, [1])
    # each student's speed-up and top-1 change are over its own r = 0 (12 / 6 ms, 62.5 - 62.0), and
    # the trained one's change is also given against the off-the-shelf r = 0 (62.5 - 59.0)
    assert "| off the shelf | 8 | exact | 1.25× | 1.25× | 1.25× | -0.50 | -0.50 |" in md
    assert "| trained at r=8 | 8 | exact | 2.00× | 2.00× | 2.00× | +0.50 | +3.50 |" in md


@pytest.mark.e2e
def test_int8_kernels_compares_litert_xnnpack_with_its_builtin_kernels(chain):
    export_dir = chain[1] / "export"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "int8_kernels.py"), str(export_dir)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    control, xnnpack = [json.loads(line) for line in r.stdout.splitlines()]
    assert control["kernels"] == "litert builtin (again)" and xnnpack["kernels"] == "litert xnnpack (export's)"
    assert control["images"] == xnnpack["images"] == 200
    assert control["top1_differ"] == control["max_steps"] == 0  # the same kernels twice: identical
    assert 0 <= xnnpack["top1_differ"] <= 200
    # the XNNPACK row runs the kernels export scores with: the same top-1 on the same images
    export = json.loads((export_dir / "export.json").read_text())
    assert xnnpack["top1"] == pytest.approx(export["artifacts"]["student_int8.tflite"]["test_top1"], abs=1e-6)
