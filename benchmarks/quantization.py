"""Post-training int8 against quantization-aware distillation, per student family (issue #37).

For each family of ``benchmarks/students.md`` and each seed, on the main job's data and teacher
(``benchmarks/methods_main_teacher.pt``): the float student is distilled as in students.py (AT-KD,
KD where the student has no feature maps); its int8 file is post-training quantised with 500 and
with 2,000 calibration images (``edgekd export --calib``), and with 500 by litert-torch ("ptq-hist":
PT2E histogram observers against onnx2tf's min-max ranges); "ptq-best" is the one of the three
with the best *validation* top-1; then ``distill.qat.epochs`` of quantization-aware fine-tuning against the same
teacher are added to the same run (``edgekd distill --resume --qat-epochs``) and its int8 file is
exported from the trained fake-quant graph. Every file is scored on the test set; at the end all
int8 files are timed in LiteRT at 1 thread in one interleaved run. Cells are kept in ``<out>.json``;
run it again to continue (a killed cell resumes). Writes ``<out>.md`` and ``<out>.png``.

    nice -n 10 python benchmarks/quantization.py                      # benchmarks/quantization.md
    nice -n 10 python benchmarks/quantization.py --qat-epochs 0.5     # + QAT cells of 0.5 epoch beside
    python benchmarks/quantization.py --families timm/mobilenetv3_small_100 --seeds 1
    python benchmarks/quantization.py --report-only                   # tables of the cells so far
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cells import Cells, mean_std  # noqa: E402
from latency import litert_invoke, time_round_robin  # noqa: E402
from students import FAMILIES  # noqa: E402

from edgekd import artifacts  # noqa: E402
from edgekd.checkpoint import load_checkpoint, save_checkpoint, write_text  # noqa: E402
from edgekd.cli import _parse_sets  # noqa: E402  (the commands' own --set parser)
from edgekd.distill.stage import distill  # noqa: E402
from edgekd.errors import EdgekdError  # noqa: E402
from edgekd.export import export  # noqa: E402
from edgekd.recipe import Recipe, load_recipe  # noqa: E402

# the MobileNetV3s first: the families post-training int8 fails on (students.md)
ORDER = ["timm/mobilenetv3_small_100", "timm/mobilenetv3_large_100", "torchvision/mobilenet_v3_small",
         *[f for f in FAMILIES if "mobilenetv3" not in f and "mobilenet_v3" not in f]]
CALIBS = (500, 2000)
DEFAULT_QAT_EPOCHS = 1.0
LOADED = "walls_under_load"  # {why, cells}: cells whose QAT wall was measured while other jobs ran
# the converters' observers: onnx2tf calibrates in TFLite's converter (min-max ranges); litert-torch's
# PT2E quantizer observes activations with histograms (its ranges minimise the quantisation error)
HIST = "ptq-hist"
# how the cells of one table were made, by its file name: what its figures depend on beyond the
# command (run dirs made again, files gone, converter changes between its cells)
NOTES = {
    "quantization": [
        "A run dir made again retrains its float student: the QAT and ptq-hist cells measured after bb1cab5 came "
        "from run dirs made again, so on a seed whose retrained student scores otherwise they differ from the ptq "
        "rows, and ptq-best compares files of one float student only. An empty p50: that row's files were no "
        "longer on disk when it was timed (the onnx2tf ptq files of seeds 1 and 2 went with run dirs made again; "
        "seed 0's run dirs are gone).",
        "The ptq-hist files were written before bf93586, with a non-strict trace that left a residual CNN's adds "
        "float32 (the rows name the float32 ops of the files still on disk); since, litert-torch's int8 file of a "
        "CNN has its adds in int8, as the QAT files already had.",
        "QAT rows of other than 1 epoch (the quick recipe's 0.5) fine-tune a copy of the same run's float student "
        "where its run dir was kept (seeds 1, 2), and a float student trained again in a run dir of their own "
        "where it was not (seed 0): that row's fp32 is then its own.",
        "The 0.5-epoch QAT cells of the three MobileNetV3 families were made again after 62f6559, which makes "
        "their QAT files full-integer (hard-swish annotated int8, each hard-sigmoid traced as relu6(x + 3) / 6), by "
        "the last command above. Their run dirs were gone, so each trained its float student again in a run dir "
        "of its own (that row's fp32 is its own), beside other jobs (their QAT walls are left out), and were not "
        "timed (the clip table times such files: quantization_clip.md). Their 1-epoch "
        "QAT rows are of the cells before: files that keep HARD_SWISH, MEAN, ADD and MUL float32.",
        "A row names the float32 ops of the files its cells recorded or that are on disk. Cells made before "
        "these 0.5-epoch MobileNetV3 ones recorded none, and their files went with their run dirs; last rendered "
        "with them on disk (9473f9b), the ptq-hist files of every family kept ADDs float32 (timm's MobileNetV3s "
        "also HARD_SWISH and MEAN, both MobileNetV3 kinds also MUL), the older MobileNetV3 QAT files kept ADD and "
        "MUL (timm's also HARD_SWISH and MEAN), and MobileViTv2's files kept its activations, norms and "
        "attention float32, as in quantization_clip.md.",
    ],
    "quantization_clip": [
        "The families of quantization.md again, on the same recipe, teacher and seeds, with one change: every "
        "float student and QAT step clips the global gradient norm to 1.0 (`--set train.clip_grad_norm=1.0`). "
        "Without it, seed 0's timm MobileNetV3 float students trained unstably at the quick recipe's SGD lr 0.1 "
        "and their QAT files missed the parity rule (quantization.md's timm MobileNetV3 rows), and "
        "ShuffleNetV2's QAT files lost 0.45 pt on the mean. The two timm MobileNetV3 families ran first, the "
        "other families later, one family after the other (the commands above, in that order). All cells made "
        "in one run dir per family and seed, with only commands of a few seconds beside them (a test file, "
        "report renders, structure walks, a duplicate scan), except EfficientNet-Lite0's seeds 0 and 1, which ran "
        "beside a CI run (their QAT walls are left out); the files timed together at the end, nothing else "
        "running.",
        "The QAT cells of the three MobileNetV3 families were made again after 62f6559, which makes their QAT "
        "files full-integer (hard-swish annotated int8, each hard-sigmoid traced as relu6(x + 3) / 6): from the "
        "same float students (the run dirs' float copies), by the same command. They, and ResNet-18's cells (new in "
        "this table), ran beside other torch processes (timm MobileNetV3-small's beside one 40-s test; the others "
        "beside a CI run, a test file's run or int8 conversion experiments): their QAT walls are left out. "
        "MobileViTv2's cells (new too) ran with nothing beside them. "
        "The cells they replace kept HARD_SWISH, MEAN, ADD and MUL float32 and lost (mean ± sd) "
        "0.03 ± 0.31 (timm MobileNetV3-small), -0.05 ± 0.25 (timm MobileNetV3-large) and -0.25 ± 0.28 pt "
        "(torchvision MobileNetV3-small); quantization.md's QAT files of these families are of that kind.",
    ],
}
ANCHORS = [  # published fp32 -> int8 figures (ImageNet top-1), kept beside the table
    ("torchvision QAT weights", "MobileNetV2", "71.88 → 71.66 (−0.22)"),
    ("torchvision QAT weights", "MobileNetV3-Large", "74.04 → 73.00 (−1.04)"),
    ("Krishnamoorthi 2018, Tables 3–4", "MobileNetV2", "−2.1 per-channel PTQ, −0.8 QAT"),
    ("Intel NNCF, QAT + distillation", "MobileNetV3-small", "67.66 → 66.98 (−0.68)"),
    ("TF slim, PTQ", "MobileNetV3-L / -S", "−1.3 / −2.6"),
]


def _float(cells: Cells, key: str, base: Recipe, arch: str, seed: int, runs: Path) -> tuple[Recipe, Path] | None:
    """The float student of one family and seed (distilled, or resumed); None when it was refused."""
    for method in ("atkd", "kd"):  # AT-KD where the student has feature maps to match
        recipe, run_dir = student_run(base, arch, seed, method, runs)
        if key in cells.cells:
            if cells.cells[key].get("method") == method:
                return recipe, run_dir
            continue
        try:
            t0 = time.perf_counter()
            metrics = distill(recipe, run_dir, resume=run_dir.exists()).metrics
        except EdgekdError as e:
            if method == "atkd" and "has none" in str(e):
                continue
            cells.keep(key, {"family": arch, "seed": seed, "refused": str(e)})
            return None
        cells.keep(key, {"family": arch, "seed": seed, "method": method, "fp32_pytorch_top1": metrics["student"]
                         ["test_top1"], "student_wall_s": time.perf_counter() - t0})
        return recipe, run_dir
    return None


def student_run(base: Recipe, arch: str, seed: int, method: str, runs: Path) -> tuple[Recipe, Path]:
    """The recipe and run dir of one family's float student."""
    recipe = base.model_copy(update={"seed": seed, "student": base.student.model_copy(update={"arch": arch}),
                                     "distill": base.distill.model_copy(update={"method": method})})
    return recipe, runs / f"{arch.replace('/', '_')}_seed{seed}_{method}"


def _int8_cell(run_dir: Path, keep: Path, calib: int, converter: str = "auto") -> dict[str, Any]:
    """Export ``run_dir`` (int8 PTQ with ``calib`` images, or its QAT graph) and score its files."""
    t0 = time.perf_counter()
    try:
        report = export(run_dir, formats=("onnx", "tflite"), int8=True, calib=calib, max_int8_drop=100.0,
                        val=True, converter=converter).report
    except EdgekdError as e:
        return {"int8_top1": None, "refused": str(e)}
    arts = report["artifacts"]
    fp32, int8 = arts[artifacts.tflite_file("student", "fp32")], arts.get(artifacts.tflite_file("student", "int8"))
    cell = {"fp32_top1": fp32["test_top1"], "export_wall_s": time.perf_counter() - t0}
    if int8 is None:
        return {**cell, "int8_top1": None, "refused": str(report.get("refused", {}).get("student", "no int8 file"))}
    shutil.copyfile(run_dir / artifacts.EXPORT_DIR / artifacts.tflite_file("student", "int8"), keep)
    return {**cell, "int8_top1": int8["test_top1"], "int8_val_top1": int8.get("val_top1"),
            "converter": int8["converter"], "int8_bytes": int8["size_bytes"], "int8_file": str(keep),
            "float_ops": int8["io"]["float_ops"], "parity": int8.get("parity")}


def _family_seed(cells: Cells, base: Recipe, arch: str, seed: int, runs: Path, qat_epochs: float) -> None:
    prefix = f"{arch}|seed={seed}"
    got = _float(cells, f"{prefix}|float", base, arch, seed, runs)
    if got is None:
        return
    recipe, run_dir = got
    qat_started = (run_dir / artifacts.last_checkpoint(artifacts.QAT_ROLE)).exists()
    for calib in CALIBS:  # before QAT: once the run has a QAT student, its int8 file is the QAT one
        key = f"{prefix}|ptq-{calib}"
        if key not in cells.cells:
            if qat_started:
                raise SystemExit(f"{run_dir} already has a QAT student but no {key} cell: remove the run dir")
            cells.keep(key, {"family": arch, "seed": seed, "quantization": "ptq", "calib": calib,
                             **_int8_cell(run_dir, run_dir / f"ptq_calib{calib}.tflite", calib)})
    key = f"{prefix}|{qat_cell_name(qat_epochs)}"
    if key not in cells.cells:
        qat_dir, float_source = _qat_run_dir(run_dir, qat_epochs)
        cells.keep(key, {"family": arch, "seed": seed, "quantization": "qat", "float_student": float_source,
                         **_qat_cell(recipe, qat_dir, qat_epochs)})
    key = f"{prefix}|{HIST}"
    if key not in cells.cells and (run_dir / artifacts.best_checkpoint("student")).is_file():
        cells.keep(key, {"family": arch, "seed": seed, "quantization": "ptq", "calib": CALIBS[0],
                         **_int8_cell(_float_only(run_dir), run_dir / "ptq_hist.tflite", CALIBS[0],
                                      converter="litert-torch")})


def qat_cell_name(qat_epochs: float) -> str:
    """The cell of ``qat_epochs`` of QAT: "qat" for the default 1 epoch (the cells measured first)."""
    return "qat" if qat_epochs == DEFAULT_QAT_EPOCHS else f"qat-{qat_epochs:g}ep"


def _qat_run_dir(run_dir: Path, qat_epochs: float) -> tuple[Path, str]:
    """Where ``qat_epochs`` of QAT fine-tune the float student, and which float student that is: the
    run dir itself for the default epochs; for others a copy of its float student ("same"), or, where
    that run dir is gone, a new run dir whose float student is trained again ("retrained")."""
    if qat_epochs == DEFAULT_QAT_EPOCHS:
        return run_dir, "same"
    copy = run_dir.with_name(f"{run_dir.name}_qat{qat_epochs:g}")
    float_dir = run_dir.with_name(run_dir.name + "_float")
    if not float_dir.is_dir() and (run_dir / artifacts.best_checkpoint("student")).is_file():
        float_dir = _float_only(run_dir)
    if copy.is_dir() or not float_dir.is_dir():
        return copy, "same" if float_dir.is_dir() else "retrained"
    copy_float_student(float_dir, copy)
    return copy, "same"


def copy_float_student(float_dir: Path, copy: Path) -> None:
    """``float_dir``'s finished float student into the new run dir ``copy`` (atomically), recorded
    as a float-only run, so that any QAT epochs may be added to it as to any finished float run."""
    tmp = copy.with_name(copy.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(float_dir, tmp, ignore=shutil.ignore_patterns(artifacts.EXPORT_DIR, "*.tflite"))
    for name in (artifacts.last_checkpoint("student"), artifacts.best_checkpoint("student")):
        # The float run was made with the 1-epoch QAT recipe (its float epochs do not depend on
        # distill.qat: resume ignores it once QAT is added)
        state = load_checkpoint(tmp / name)
        state["recipe"]["distill"]["qat"]["epochs"] = 0.0
        save_checkpoint(tmp / name, state)
    tmp.rename(copy)


def _qat_cell(recipe: Recipe, run_dir: Path, qat_epochs: float) -> dict[str, Any]:
    """``qat_epochs`` of QAT added to the run (the float student trained first where the run dir is
    new), its int8 file exported from the fake-quant graph and scored."""
    try:
        qat = distill(with_qat(recipe, qat_epochs), run_dir, resume=True).metrics["student"]["qat"]
    except EdgekdError as e:
        return {"qat_epochs": qat_epochs, "int8_top1": None, "refused": str(e)}
    cell = _int8_cell(run_dir, run_dir / "qat.tflite", CALIBS[0])  # calib: unused by a QAT graph
    if cell["int8_top1"] is None and "fake-quant" in cell.get("refused", ""):
        cell |= _refused_qat_file(run_dir)
    return {"qat_epochs": qat_epochs, "qat_wall_s": epochs_wall(run_dir, artifacts.QAT_ROLE),
            "student_epochs_wall_s": epochs_wall(run_dir, "student"), "qat_pytorch_top1": qat["test_top1"], **cell}


def with_qat(recipe: Recipe, qat_epochs: float) -> Recipe:
    return recipe.model_copy(update={"distill": recipe.distill.model_copy(update={
        "qat": recipe.distill.qat.model_copy(update={"epochs": qat_epochs})})})


def _float_only(run_dir: Path) -> Path:
    """A copy of ``run_dir`` without its QAT student and export dir: export quantises a run's QAT
    graph whenever it has one, and this cell wants the float student quantised post-training."""
    copy = run_dir.with_name(run_dir.name + "_float")
    if not copy.is_dir():
        tmp = copy.with_name(copy.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(run_dir, tmp, ignore=shutil.ignore_patterns(f"{artifacts.QAT_ROLE}_*", artifacts.EXPORT_DIR,
                                                                   "*.tflite"))
        tmp.rename(copy)
    return copy


def epochs_wall(run_dir: Path, role: str) -> float:
    """Seconds of ``role``'s epochs in the run's log.csv: the same whether the run was resumed or not."""
    import csv

    with open(run_dir / artifacts.LOG, newline="") as f:
        return sum(float(row["wall_s"]) for row in csv.DictReader(f) if row["role"] == role)


def _measured_part(refusal: str) -> str:
    """A parity refusal up to its rule: what was measured, not the diagnosis of the edgekd that made it."""
    at = refusal.find("(the rule is")
    return refusal if at < 0 else refusal[:refusal.index(")", at) + 1]


def _refused_qat_file(run_dir: Path) -> dict[str, Any]:
    """What export's parity rule refused: the QAT int8 file converted again and scored on the test
    set, against its fake-quant graph (top-1, agreement, logit differences in output LSBs)."""
    import numpy as np

    from edgekd.export import stage
    from edgekd.export.stage import QAT_LSB_TOLERANCE
    from edgekd.export.score import tflite_runner, tied_top1_agreement

    plan = stage._plan(run_dir, ("tflite",), True, CALIBS[0], "onnx2tf", 16, False, (), ("exact",), 16, False, 1)
    inputs = stage._inputs(plan, 0, 16, False)
    path, fake_quant, _ = stage._qat_int8(plan.qat, plan.jobs[0], inputs, run_dir / "qat_refused.tflite")
    got, y = tflite_runner(path)(inputs.test_x), inputs.test_y
    lsb = float(np.min(np.diff(np.unique(fake_quant))))  # the output's quantisation step
    return {"int8_file": str(path), "refused_file_top1": 100.0 * float((got.argmax(1) == y).mean()),
            "fake_quant_top1": 100.0 * float((fake_quant.argmax(1) == y).mean()),
            "refused_file_agreement_ties": tied_top1_agreement(got, fake_quant),
            "refused_file_agreement_within_lsb": tied_top1_agreement(got, fake_quant, QAT_LSB_TOLERANCE * lsb),
            "refused_file_logit_diff_lsb": {"median": float(np.median(np.abs(got - fake_quant)) / lsb),
                                            "p99": float(np.percentile(np.abs(got - fake_quant), 99) / lsb)}}


def table(cells: Cells) -> list[dict[str, Any]]:
    """The issue's JSON rows: {family, seed, quantization: ptq|ptq-best|qat, fp32_top1, int8_top1,
    p50_ms, wall_s} (plus refused, calib, qat_epochs). ptq-best: the calibration with the better
    validation top-1 (a refused file counts as the worst)."""
    rows = []
    for key, c in cells.cells.items():
        arch, seed, what = key.split("|")
        if what == "float" or "quantization" not in c:
            continue
        row = {"family": c["family"], "seed": c["seed"], "quantization": c["quantization"],
               "fp32_top1": c.get("fp32_top1"), "int8_top1": c.get("int8_top1"), "p50_ms": c.get("p50_ms"),
               "wall_s": c.get("qat_wall_s", c.get("export_wall_s")),
               **{k: c[k] for k in ("refused", "calib", "qat_epochs", "converter", "refused_file_top1",
                                    "refused_file_agreement_ties") if k in c}}
        row["cell"] = what
        if c["quantization"] == "ptq":
            row["observer"] = _observer(c)
        if c["quantization"] == "qat" and "export_wall_s" not in c and c.get("float_student", "same") == "same":
            # export refused the file: no fp32 score of its own, but the float student is the ptq cells'
            row["fp32_top1"] = _same_float_fp32(cells, f"{arch}|{seed}")
        rows.append(row)
        if what == f"ptq-{CALIBS[-1]}":
            got = {n: cells.cells.get(f"{arch}|{seed}|{n}") for n in (*(f"ptq-{c}" for c in CALIBS), HIST)}
            if all(got[f"ptq-{c}"] for c in CALIBS):
                # only files of one float student compete: a run dir made again retrains it, and its
                # fp32 file then scores otherwise
                same = {n: c for n, c in got.items() if c and c.get("fp32_top1") == row["fp32_top1"]}
                name, best = max(same.items(), key=lambda nc: nc[1].get("int8_val_top1") or -1.0)
                rows.append({**row, "quantization": "ptq-best", "cell": name, "calib": best["calib"],
                             "observer": _observer(best), "int8_top1": best.get("int8_top1"),
                             "p50_ms": best.get("p50_ms"), "fp32_top1": best.get("fp32_top1"),
                             "wall_s": best.get("export_wall_s"), "converter": best.get("converter", "")})
    return rows


def render(cells: Cells, command: str) -> str:
    rows, t = table(cells), cells.data.get("timing")
    lines = ["# Post-training int8 against quantization-aware distillation", "",
             f"Made by {_made_by(cells, command)} (cells in `{cells.path.name}`; its `table` is the issue's JSON "
             "rows).", "",
             "Teacher: the main job's (methods_main_teacher.pt); float student trained with the quick recipe's "
             "budget (AT-KD, KD without feature maps), then int8: PTQ with 500 / 2,000 calibration images "
             "by the default converter, and with 500 by litert-torch (ptq-hist: onnx2tf calibrates in TFLite's "
             "converter with min-max ranges, litert-torch's PT2E quantizer with histogram observers; ptq-best: the "
             "best of the three on validation images), and QAT fine-tuning of the same student against the "
             "same teacher. Drop: fp32 TFLite top-1 − int8 TFLite top-1 on the test set, points (mean ± sd over "
             "seeds); each row's fp32 is its own float student's. p50: median bare LiteRT `invoke()`, 1 thread, "
             "all files interleaved"
             + (f" (load average {t['load_1m_before']:.2f} before, {t['load_1m_after']:.2f} after)." if t else
                " (not timed yet).") + " QAT wall: the QAT epochs' wall time over the float student's epochs', "
             "from the run's log.csv"
             + (f"; left out where it was measured beside other jobs ({len(cells.data[LOADED]['cells'])} cells: "
                f"{cells.data[LOADED]['why']})." if cells.data.get(LOADED) else "."),
             "", *(line for note in NOTES.get(cells.path.stem, []) for line in (note, "")),
             "| student | quantization | seeds | fp32 top-1 % | int8 top-1 % | drop, pt | p50 ms | QAT wall, "
             "% of the student's | converter / refused |", "|---|---|---|---|---|---|---|---|---|"]
    families = list(dict.fromkeys(r["family"] for r in rows))
    kinds = ("ptq", HIST, "ptq-best", *(f"{q}@{e:g}" for e in _qat_epochs(rows) for q in ("qat", "qat-refused")))
    loaded = set(cells.data.get(LOADED, {}).get("cells", []))
    for fam in families:
        for q in kinds:
            mine = [r for r in rows if r["family"] == fam and _is(r, q)]
            if q.startswith("qat-refused"):  # the files export's parity rule refused, converted again and scored
                mine = [{**r, "int8_top1": r["refused_file_top1"], "converter": "litert-torch"} for r in mine
                        if r.get("refused_file_top1") is not None and r["fp32_top1"] is not None]
            if not mine:
                continue
            ok = [r for r in mine if r["int8_top1"] is not None]
            # the measurement, not the diagnosis: a cell keeps the message of the edgekd that made it
            refused = [_measured_part(r["refused"]) for r in mine if r["int8_top1"] is None]
            p50 = [r["p50_ms"] for r in ok if r.get("p50_ms")]
            share = ""
            if q.startswith("qat"):
                keys = [k for k in (f"{fam}|seed={r['seed']}|{r['cell']}" for r in mine)  # a file refused: its QAT ran
                        if cells.cells[k].get("qat_wall_s")]
                quiet = [k for k in keys if k not in loaded]  # a wall measured beside other jobs is no figure
                shares = [cells.cells[k]["qat_wall_s"] / cells.cells[k]["student_epochs_wall_s"] * 100 for k in quiet]
                share = ("" if not keys else "not timed quietly" if not shares else f"{statistics.fmean(shares):.0f} %"
                         + (f" ({len(quiet)} of {len(keys)} seeds)" if len(quiet) < len(keys) else ""))
            label = q.split("@")[0] + (f" ({'/'.join(_calib_label(r) for r in mine)})" if q == "ptq-best" else
                         f" ({CALIBS[0]})" if q == "ptq" else f" ({CALIBS[0]}, litert-torch)" if q == HIST
                         else f" ({mine[0].get('qat_epochs', '')} ep)")
            if q.startswith("qat-refused"):
                label = "qat, the file parity refused, scored anyway (agreement with its fake-quant: " + ", ".join(
                    f"{r['refused_file_agreement_ties']:.2f} %" for r in mine) + ")"
            conv = ", ".join(sorted({r["converter"] + (f" ({r['observer']})" if r.get("observer") else "")
                                     for r in ok}))
            note = conv + _float_ops_note([cells.cells[f"{fam}|seed={r['seed']}|{r['cell']}"] for r in ok]) + (
                f"; {len(refused)} refused: {refused[0][:160]}" if refused else "")
            lines.append(f"| {fam} | {label} | {len(ok)} | {mean_std([r['fp32_top1'] for r in ok])} | "
                         f"{mean_std([r['int8_top1'] for r in ok])} | "
                         f"{mean_std([r['fp32_top1'] - r['int8_top1'] for r in ok])} | "
                         f"{f'{statistics.fmean(p50):.3f}' if p50 else ''} | {share} | {note} |" if ok else
                         f"| {fam} | {label} | 0 | | | | | | refused: {refused[0][:200]} |")
    lines += ["", "Published anchors (ImageNet, fp32 → int8 top-1 %; other data, other budgets):", "",
              "| source | model | fp32 → int8 |", "|---|---|---|"]
    lines += [f"| {s} | {m} | {v} |" for s, m, v in ANCHORS]
    return "\n".join(lines) + "\n"


@functools.cache
def _float_ops_of_file(path: str, mtime_ns: int) -> dict[str, int]:
    """A file's float32 ops, read once per version of the file (the table is rendered after every cell)."""
    from edgekd.export.score import tflite_io_details

    return tflite_io_details(Path(path))["float_ops"]


def float_ops(cell: dict[str, Any]) -> dict[str, int] | None:
    """The ops a cell's int8 file leaves float32 (between QUANTIZE/DEQUANTIZE): as the cell recorded
    them when it was made, else read from the file while it is on disk; None when neither."""
    if "float_ops" in cell:
        return cell["float_ops"]
    path = cell.get("int8_file")
    return _float_ops_of_file(path, Path(path).stat().st_mtime_ns) if path and Path(path).is_file() else None


def _float_ops_note(row_cells: list[dict[str, Any]]) -> str:
    """The ops left float32 in the row's int8 files: such a file scores as int8 but is not
    full-integer (export.json's io.float_ops)."""
    found = [ops for ops in map(float_ops, row_cells) if ops is not None]
    hybrid = [ops for ops in found if ops]
    if not hybrid:
        return ""
    ops = ", ".join(f"{name} {n}" for name, n in max(hybrid, key=lambda o: sum(o.values())).items())
    return f"; not full-integer in {len(hybrid)} of {len(found)} files read, float32 ops: {ops}"


def _same_float_fp32(cells: Cells, prefix: str) -> float | None:
    """The fp32 file's top-1 of the float student a QAT cell fine-tuned: the ptq-hist cell exports a
    copy of that very run dir (a run dir made again retrains its float student), else ptq-500's."""
    for name in (HIST, f"ptq-{CALIBS[0]}"):
        if (cells.cells.get(f"{prefix}|{name}") or {}).get("fp32_top1") is not None:
            return cells.cells[f"{prefix}|{name}"]["fp32_top1"]
    return None


def _observer(cell: dict[str, Any]) -> str | None:
    """How the converter that wrote a PTQ file chose its activation ranges (see HIST)."""
    return {"onnx2tf": "min-max", "litert-torch": "histogram"}.get(cell.get("converter", ""))


def _qat_epochs(rows: list[dict[str, Any]]) -> list[float]:
    """The QAT epochs of the table's qat rows, the default first."""
    return sorted({r.get("qat_epochs", DEFAULT_QAT_EPOCHS) for r in rows if r["quantization"] == "qat"},
                  key=lambda e: (e != DEFAULT_QAT_EPOCHS, e))


def _is(row: dict[str, Any], q: str) -> bool:
    """Whether a table row belongs to the rendered row kind ``q`` (ptq: the default calibration, auto converter;
    qat@E and qat-refused@E: E epochs of QAT)."""
    if q in ("ptq", HIST):
        return row["quantization"] == "ptq" and row.get("cell") == (f"ptq-{CALIBS[0]}" if q == "ptq" else HIST)
    if "@" in q:
        return row["quantization"] == "qat" and f"{row.get('qat_epochs', DEFAULT_QAT_EPOCHS):g}" == q.split("@")[1]
    return row["quantization"] == q


def _calib_label(row: dict[str, Any]) -> str:
    return f"{row['calib']}" + (" histogram" if row.get("observer") == "histogram" else "")


def _time(cells: Cells, runs: int) -> None:
    files = {k: c["int8_file"] for k, c in cells.cells.items() if c.get("int8_file") and Path(c["int8_file"]).is_file()}
    load = os.getloadavg()[0]
    for k, ms in time_round_robin({k: litert_invoke(Path(f), 1) for k, f in files.items()}, runs=runs,
                                  warmup=20).items():
        cells.update(k, p50_ms=ms)
    cells.save(timing={"load_1m_before": load, "load_1m_after": os.getloadavg()[0], "runs": runs, "threads": 1})


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgekd.report import _save as save_png  # atomic, as every report edgekd writes

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families = list(dict.fromkeys(r["family"] for r in rows))
    kinds = ("ptq", HIST, "ptq-best", *(f"qat@{e:g}" for e in _qat_epochs(rows)))
    width = 0.8 / len(kinds)
    for i, q in enumerate(kinds):
        drops = [[r["fp32_top1"] - r["int8_top1"] for r in rows if r["family"] == f and _is(r, q)
                  and r["int8_top1"] is not None] for f in families]
        ax.bar([j + (i - (len(kinds) - 1) / 2) * width for j in range(len(families))],
               [statistics.fmean(d) if d else 0 for d in drops], width,
               label=q.replace("@", ", ") + (" ep" if "@" in q else ""))
    ax.axhline(0.3, color="k", ls="--", lw=0.8, label="0.3 pt target")
    ax.set_xticks(range(len(families)), [f.split("/")[-1] for f in families], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("fp32 → int8 drop, pt (test, mean over seeds)")
    ax.set_title("int8: post-training against quantization-aware distillation")
    ax.legend(fontsize=7)
    save_png(fig, path)


def _made_by(cells: Cells, command: str) -> str:
    """The commands that filled the table, in order (a --report-only one added nothing)."""
    made = [c for c in cells.data.get("commands", []) if c != command] + (
        [] if "--report-only" in command and cells.data.get("commands") else [command])
    return ", then ".join(f"`{c}`" for c in made)


def _write(cells: Cells, out: Path, command: str) -> None:
    if "--report-only" not in command and command not in cells.data.get("commands", []):
        cells.data["commands"] = [*cells.data.get("commands", []), command]
    cells.save(table=table(cells), commands=cells.data.get("commands", []))
    write_text(Path(f"{out}.md"), render(cells, command))
    _plot(cells.data["table"], Path(f"{out}.png"))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/fashion_mnist_quick.yaml")
    ap.add_argument("--teacher", default="benchmarks/methods_main_teacher.pt")
    ap.add_argument("--families", default=",".join(ORDER))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed-order", default=None, metavar="S,S,...",
                    help="the seeds in the order to run them (default 0 .. --seeds - 1)")
    ap.add_argument("--qat-epochs", type=float, default=DEFAULT_QAT_EPOCHS,
                    help="QAT epochs of the qat cells; other than 1, a cell of their own beside the 1-epoch one")
    ap.add_argument("--runs", type=int, default=300, help="timed invokes per file")
    ap.add_argument("--no-timing", action="store_true", help="distil and export only")
    ap.add_argument("--report-only", action="store_true", help="write the tables of the cells so far")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override, as in edgekd's commands (e.g. data.train_subset=400 for a smoke run)")
    ap.add_argument("--out", default="benchmarks/quantization")
    return ap


def command_args(command: str) -> argparse.Namespace:
    """The arguments of one of a table's recorded ``commands``, as this script parsed them."""
    argv = shlex.split(command)
    return parser().parse_args(argv[argv.index("benchmarks/quantization.py") + 1:])


def base_recipe(args: argparse.Namespace) -> Recipe:
    """The float students' recipe (the QAT cells add their epochs to the same run): the main job's,
    with the table's teacher and --set overrides."""
    return load_recipe(args.recipe, {"teacher.checkpoint": args.teacher, "distill.qat.epochs": 0,
                                     **_parse_sets(args.set)})


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    command = "python " + shlex.join(["benchmarks/quantization.py", *(argv if argv is not None else sys.argv[1:])])
    if not Path(args.teacher).is_file():
        raise SystemExit(f"no teacher at {args.teacher}: run `python benchmarks/methods.py --main` first, "
                         "or pass --teacher")
    out, runs = Path(args.out), Path(f"{args.out}_runs")
    base = base_recipe(args)  # the float student first (its PTQ cells); the QAT cell adds its own epochs
    cells = Cells(Path(f"{out}.json"))
    families = args.families.split(",")
    seeds = [int(s) for s in args.seed_order.split(",")] if args.seed_order else list(range(args.seeds))
    for seed in [] if args.report_only else seeds:
        for arch in families:
            with cells.claim(runs / f"{arch.replace('/', '_')}_seed{seed}") as mine:
                if mine:  # else another process is running this family and seed
                    cells.refresh()
                    _family_seed(cells, base, arch, seed, runs, args.qat_epochs)
                    _write(cells, out, command)
    if not (args.no_timing or args.report_only):
        _time(cells, args.runs)
    _write(cells, out, command)
    print(Path(f"{out}.md").read_text())


if __name__ == "__main__":
    main()
