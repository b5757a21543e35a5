"""Does distillation pay? Every method against the same student trained alone, with seeds.

One teacher is trained once; then for each method (ce = the student alone, kd, at, atkd,
atkd-sa, fitnet) and each seed the student is distilled from it, and a beta sweep runs for at
and atkd. Every finished cell is kept in ``<out>.json`` (written atomically), so a killed run
continues where it stopped; ``<out>.md`` is rewritten after each cell.

    python benchmarks/methods.py --seeds 3                              # the table in methods.md
    python benchmarks/methods.py --seeds 3 --train-subset 2000 --epochs 2  # smaller and faster
    python benchmarks/methods.py --recipe recipes/fashion_mnist.yaml --device cuda --out benchmarks/methods_gpu

A seed changes the student's initial weights, batch order, augmentation and the train/val
split; the test set and the teacher stay the same for every cell.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cells import RETRAIN_TOLERANCE, Cells, mean_std  # noqa: E402

from edgekd.checkpoint import write_json, write_text  # noqa: E402
from edgekd.distill.stage import distill  # noqa: E402
from edgekd.recipe import load_recipe  # noqa: E402

METHODS = ["ce", "kd", "at", "atkd", "atkd-sa", "fitnet"]

# Published figures, for orientation only: other data, models and budgets than ours.
ANCHORS = [
    ("RepDistiller (Tian et al. 2020, CRD), CIFAR-100, ResNet-50 (79.34) → MobileNetV2, 240 epochs",
     {"ce": 64.60, "kd": 67.35, "at": 58.58, "fitnet": 63.16}),
    ("AT paper (Zagoruyko & Komodakis 2017), ImageNet, ResNet-34 → ResNet-18, top-1 = 100 − error",
     {"ce": 69.6, "at": 70.7}),
]


def _cell_key(method: str, beta: float, seed: int) -> str:
    return f"{method}|beta={beta:g}|seed={seed}"


def render(results: dict, command: str, teacher: dict | None, default_beta: float) -> str:
    cells = results["cells"]
    by = {}
    for c in cells.values():
        by.setdefault((c["method"], c["beta"]), []).append(c)
    base = {c["seed"]: c for c in by.get(("ce", default_beta), [])}
    lines = ["# Distillation methods on Fashion-MNIST, with seeds", "",
             f"Made by `{command}` (cells kept in `{Path(results['json']).name}`; run it again to continue).", "",
             f"Setting: {results['setting']}", ""]
    if teacher:
        lines += [f"Teacher: {teacher['arch']} ({teacher['params']:,} params), trained once: test top-1 "
                  f"{teacher['test_top1']:.2f} %, shifted {teacher['shifted_top1']:.2f} %, "
                  f"{teacher['wall_s']:.0f} s.", ""]
    lines += ["| method | β | seeds | test top-1 % | shifted top-1 % | agreement with teacher % | "
              "Δ top-1 vs student alone, pt (paired by seed) | wall s / run |",
              "|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        for (m, beta), rows in sorted(by.items(), key=lambda kv: kv[0][1]):
            if m != method or (beta != default_beta and m in ("ce", "kd", "fitnet")):
                continue
            deltas = [r["test_top1"] - base[r["seed"]]["test_top1"] for r in rows if r["seed"] in base]
            agree = [r["agreement_top1"] for r in rows if r["agreement_top1"] is not None]
            beta_col = f"{beta:g}" if m in ("at", "atkd", "atkd-sa") else "–"
            lines.append(f"| {m}{' (student alone)' if m == 'ce' else ''} | {beta_col} | {len(rows)} | "
                         f"{mean_std([r['test_top1'] for r in rows])} | {mean_std([r['shifted_top1'] for r in rows])} | "
                         f"{mean_std(agree)} | {mean_std(deltas) if m != 'ce' else '0'} | "
                         f"{statistics.fmean(r['wall_s'] for r in rows):.0f} |")
    lines += ["", "Mean ± sample standard deviation over seeds. Published anchors (not ours: other data, "
              "models and budgets; top-1 %):", "", "| source and setting | student alone | KD | AT | FitNet |",
              "|---|---|---|---|---|"]
    for name, a in ANCHORS:
        cols = [f"{a[k]:.2f}" if k in a else "–" for k in ("ce", "kd", "at", "fitnet")]
        lines.append(f"| {name} | {' | '.join(cols)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/fashion_mnist_quick.yaml")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--betas", default="100,1000,5000", help="beta sweep for at and atkd")
    ap.add_argument("--sweep-seeds", type=int, default=1, help="seeds of the beta sweep's extra values")
    ap.add_argument("--train-subset", type=int, default=4000)
    ap.add_argument("--test-subset", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--epochs", type=int, default=3, help="student epochs")
    ap.add_argument("--teacher-epochs", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="benchmarks/methods", help="writes OUT.md, OUT.json and OUT_runs/")
    args = ap.parse_args(argv)
    command = "python " + shlex.join(["benchmarks/methods.py", *(argv if argv is not None else sys.argv[1:])])
    out = Path(args.out)
    runs = Path(f"{out}_runs")
    overrides = {"data.train_subset": args.train_subset, "data.test_subset": args.test_subset,
                 "student.epochs": args.epochs,
                 "teacher.epochs": args.teacher_epochs, "train.device": args.device}
    base = load_recipe(args.recipe, overrides)
    json_path = Path(f"{out}.json")
    table = Cells(json_path)
    results = table.data
    results["json"] = str(json_path)
    results["setting"] = (f"`{args.recipe}` with {base.data.train_subset} training images "
                          f"({base.data.val_fraction:.0%} held out for validation), {base.data.test_subset or 'all'} "
                          f"test images at {base.data.image_size} px; student {base.student.arch} "
                          f"×{base.student.width_mult}, {base.student.epochs} epochs; teacher {base.teacher.arch} "
                          f"width {base.teacher.width}, {base.teacher.epochs} epochs; T={base.distill.temperature}, "
                          f"α={base.distill.alpha}, default β={base.distill.beta:g}.")

    teacher_dir = runs / "teacher"
    # the runs dir is not kept in git: on a new machine the teacher is trained again (same seed and
    # data) and checked against the recorded one before any further cell uses it (see Cells.teacher)
    if "teacher" not in results or not (teacher_dir / "teacher_best.pt").is_file():
        t0 = time.perf_counter()
        teacher_recipe = base.model_copy(update={"distill": base.distill.model_copy(update={"method": "ce"}),
                                                 "student": base.student.model_copy(update={"epochs": 1})})
        m = distill(teacher_recipe, teacher_dir, resume=teacher_dir.exists()).metrics["teacher"]
        trained = {k: m[k] for k in ("arch", "params", "test_top1", "shifted_top1")}
        trained["wall_s"] = time.perf_counter() - t0
        recorded = results.get("teacher")
        if recorded and abs(recorded["test_top1"] - trained["test_top1"]) > RETRAIN_TOLERANCE:
            raise SystemExit(f"the teacher trained again scores {trained['test_top1']:.2f} %, not the recorded "
                             f"{recorded['test_top1']:.2f} %: start a new table with --out")
        results["teacher"] = {**recorded, "retrained_test_top1": trained["test_top1"]} if recorded else trained
        write_json(json_path, results)
    teacher_ckpt = str(teacher_dir / "teacher_best.pt")

    betas = [float(b) for b in args.betas.split(",") if b]
    plan = [(m, base.distill.beta, s) for m in args.methods.split(",") for s in range(args.seeds)]
    plan += [(m, b, s) for m in ("at", "atkd") if m in args.methods.split(",") for b in betas
             if b != base.distill.beta for s in range(args.sweep_seeds)]
    for method, beta, seed in plan:
        key = _cell_key(method, beta, seed)
        recipe = base.model_copy(update={
            "seed": seed,
            "teacher": base.teacher.model_copy(update={"checkpoint": teacher_ckpt}),
            "distill": base.distill.model_copy(update={"method": method, "beta": beta}),
        })
        table.run(key, recipe, runs / key.replace("|", "_").replace("=", ""), lambda m, method=method, beta=beta,
                  seed=seed: {"method": method, "beta": beta, "seed": seed, "test_top1": m["student"]["test_top1"],
                              "shifted_top1": m["student"]["shifted_top1"], "agreement_top1": m["agreement_top1"]})
        write_text(Path(f"{out}.md"), render(results, command, results["teacher"], base.distill.beta))
    write_text(Path(f"{out}.md"), render(results, command, results["teacher"], base.distill.beta))
    print(Path(f"{out}.md").read_text())


if __name__ == "__main__":
    main()
