"""Does distillation pay? Every method against the same student trained alone, with seeds.

One teacher is trained once and kept beside the table (``<out>_teacher.pt``, its SHA-256
recorded); then for each method (ce = the student alone, kd, at, atkd, atkd-sa, fitnet) and each
seed the student is distilled from it. Every finished cell is kept in ``<out>.json`` (written
atomically) with its validation curve and loss terms per epoch, so a killed run continues where
it stopped and never re-runs a finished cell; ``<out>.md`` is rewritten after each cell.

    python benchmarks/methods.py --seeds 3 --train-subset 3000 --epochs 2        # methods.md (tiny budget)
    python benchmarks/methods.py --main                                          # methods_main.md (main job's budget)

``--main`` is the main job's budget (the quick recipe's 7,200 training images and epochs), 5 seeds
for ce, kd and atkd and 3 for the rest, and a sweep of AT-KD's settings chosen on *validation*
top-1 (``--sweep``: α ∈ {0.5, 0.9} × T ∈ {2, 4} × β ∈ {100, 1000}, and a one-epoch warm-up of the
teacher's terms at the default point), whose winner then runs with 5 seeds.

A seed changes the student's initial weights, batch order, augmentation and the train/val
split; the test set and the teacher stay the same for every cell. Differences are paired by seed
(same initial weights and batches) with a 95 % t interval.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cells import (RETRAIN_TOLERANCE, Cells, format_difference, keep_file, mean_std, paired_difference,  # noqa: E402
                   sha256)

from edgekd.checkpoint import write_json, write_text  # noqa: E402
from edgekd.distill.stage import distill  # noqa: E402
from edgekd.recipe import Recipe, load_recipe  # noqa: E402

METHODS = ["ce", "kd", "at", "atkd", "atkd-sa", "fitnet"]
SWEEP = {"alpha": (0.5, 0.9), "temperature": (2.0, 4.0), "beta": (100.0, 1000.0)}

# Published figures, for orientation only: other data, models and budgets than ours.
ANCHORS = [
    ("RepDistiller (Tian et al. 2020, CRD), CIFAR-100, ResNet-50 (79.34) → MobileNetV2, 240 epochs",
     {"ce": 64.60, "kd": 67.35, "at": 58.58, "fitnet": 63.16}),
    ("AT paper (Zagoruyko & Komodakis 2017), ImageNet, ResNet-34 → ResNet-18, top-1 = 100 − error",
     {"ce": 69.6, "at": 70.7}),
]


@dataclass(frozen=True)
class Setting:
    """What a cell trains with besides its seed; the recipe's values unless swept."""

    method: str
    alpha: float
    temperature: float
    beta: float
    warmup_epochs: float = 0.0

    def label(self, default: "Setting") -> str:
        parts = [f"{k}={getattr(self, k):g}" for k in ("alpha", "temperature", "warmup_epochs")
                 if getattr(self, k) != getattr(default, k)]
        return ", ".join(parts)


def cell_key(s: Setting, seed: int, default: Setting) -> str:
    """``method|beta=B|seed=S`` (the first tables' keys), with any other non-default setting
    inserted before the seed."""
    extra = "".join(f"|{k}={getattr(s, k):g}" for k in ("alpha", "temperature", "warmup_epochs")
                    if getattr(s, k) != getattr(default, k))
    return f"{s.method}|beta={s.beta:g}{extra}|seed={seed}"


def _row(setting: Setting, seed: int, teacher_sha: str, metrics: dict) -> dict:
    s = metrics["student"]
    curve = [{k: h.get(k) for k in ("epoch", "val_top1", "test_top1", "train_top1", "loss_ce", "loss_kd",
                                    "loss_at", "loss_fitnet", "wall_s")} for h in s["epochs"]]
    return {"method": setting.method, "alpha": setting.alpha, "temperature": setting.temperature,
            "beta": setting.beta, "warmup_epochs": setting.warmup_epochs, "seed": seed,
            "val_top1": s["val_top1"], "test_top1": s["test_top1"], "shifted_top1": s["shifted_top1"],
            "agreement_top1": metrics["agreement_top1"], "teacher_sha256": teacher_sha, "curve": curve,
            "threads": metrics.get("threads"), "load_1m_end": os.getloadavg()[0]}


def _rows_of(cells: dict, setting: Setting) -> dict[int, dict]:
    return {c["seed"]: c for c in cells.values()
            if Setting(c["method"], c.get("alpha", setting.alpha), c.get("temperature", setting.temperature),
                       c["beta"], c.get("warmup_epochs", 0.0)) == setting}


def sweep_points(default: Setting) -> list[Setting]:
    grid = [Setting("atkd", a, t, b) for a, t, b in itertools.product(*SWEEP.values())]
    return grid + [replace(default, method="atkd", warmup_epochs=1.0)]


def chosen_setting(cells: dict, default: Setting) -> tuple[Setting | None, list[tuple[Setting, dict]]]:
    """The sweep point with the best validation top-1 (seed 0), once every point has run."""
    points = [(p, _rows_of(cells, p).get(0)) for p in sweep_points(default)]
    done = [(p, r) for p, r in points if r is not None]
    if len(done) < len(points):
        return None, done
    return max(done, key=lambda pr: pr[1]["val_top1"])[0], done


def render(results: dict, command: str, default: Setting, methods: list[str]) -> str:
    cells = results["cells"]
    teacher = results.get("teacher")
    lines = ["# Distillation methods on Fashion-MNIST, with seeds", "",
             f"Made by `{command}` (cells kept in `{Path(results['json']).name}`; run it again to continue).", "",
             f"Setting: {results['setting']}", ""]
    if teacher:
        lines += [f"Teacher: {teacher['arch']} ({teacher['params']:,} params), trained once: test top-1 "
                  f"{teacher['test_top1']:.2f} %, shifted {teacher['shifted_top1']:.2f} %, {teacher['wall_s']:.0f} s"
                  + (f"; SHA-256 {teacher['sha256'][:16]}…, kept as `{Path(teacher['file']).name}`"
                     if teacher.get("sha256") else "") + ".", ""]
    ce = {s: r["test_top1"] for s, r in _rows_of(cells, replace(default, method="ce")).items()}
    kd = {s: r["test_top1"] for s, r in _rows_of(cells, replace(default, method="kd")).items()}
    settings = [replace(default, method=m) for m in methods]
    chosen, sweep = chosen_setting(cells, default)
    if chosen is not None and chosen not in settings:
        settings.insert(settings.index(replace(default, method="atkd")) + 1 if "atkd" in methods else len(settings),
                        chosen)
    lines += ["| method | settings | seeds | val top-1 % | test top-1 % | shifted top-1 % | agreement % | "
              "Δ vs student alone, pt [95 % CI] | Δ vs KD, pt [95 % CI] | wall s / run |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for st in settings:
        rows = _rows_of(cells, st)
        if not rows:
            continue
        test = {s: r["test_top1"] for s, r in rows.items()}
        uses_beta = st.method in ("at", "atkd", "atkd-sa")
        label = ", ".join(x for x in ([f"β={st.beta:g}"] if uses_beta else []) + [st.label(default)] if x)
        walls = [r["wall_s"] for r in rows.values()]
        lines.append(
            f"| {st.method}{' (student alone)' if st.method == 'ce' else ''} | {label or '–'} | {len(rows)} | "
            f"{mean_std([r['val_top1'] for r in rows.values()])} | {mean_std(list(test.values()))} | "
            f"{mean_std([r['shifted_top1'] for r in rows.values()])} | "
            f"{mean_std([r['agreement_top1'] for r in rows.values() if r['agreement_top1'] is not None])} | "
            f"{format_difference(paired_difference(test, ce)) if st.method != 'ce' else ''} | "
            f"{format_difference(paired_difference(test, kd)) if st.method not in ('ce', 'kd') else ''} | "
            f"{statistics.fmean(walls):.0f} |")
    lines += ["", "Mean ± sample standard deviation over seeds. Δ: mean of the per-seed differences (same seed = "
              "same initial weights, batches and split), 95 % t interval; * = the interval excludes 0.", ""]
    if sweep:
        lines += ["## AT-KD settings, chosen on validation (seed 0)", "",
                  "| α | T | β | warm-up epochs | val top-1 % | test top-1 % (not used to choose) |",
                  "|---|---|---|---|---|---|"]
        for p, r in sorted(sweep, key=lambda pr: -pr[1]["val_top1"]):
            lines.append(f"| {p.alpha:g} | {p.temperature:g} | {p.beta:g} | {p.warmup_epochs:g} | "
                         f"{r['val_top1']:.2f} | {r['test_top1']:.2f} |")
        lines += ["", f"Chosen on validation: α={chosen.alpha:g}, T={chosen.temperature:g}, β={chosen.beta:g}, "
                  f"warm-up {chosen.warmup_epochs:g} epochs" if chosen else f"{len(sweep)} of {len(sweep_points(default))} points run.", ""]
    legacy_betas = sorted({c["beta"] for c in cells.values() if c["method"] in ("at", "atkd")} - {default.beta})
    for m in ("at", "atkd"):
        for b in legacy_betas:
            rows = _rows_of(cells, replace(default, method=m, beta=b))
            if rows:
                lines.append(f"- {m}, β = {b:g}: {mean_std([r['test_top1'] for r in rows.values()])} test top-1 "
                             f"({len(rows)} seed{'s' if len(rows) > 1 else ''})")
    lines += ["", "Published anchors (not ours: other data, models and budgets; top-1 %):", "",
              "| source and setting | student alone | KD | AT | FitNet |", "|---|---|---|---|---|"]
    for name, a in ANCHORS:
        cols = [f"{a[k]:.2f}" if k in a else "–" for k in ("ce", "kd", "at", "fitnet")]
        lines.append(f"| {name} | {' | '.join(cols)} |")
    return "\n".join(lines) + "\n"


def _train_teacher(base: Recipe, runs: Path, keep: Path, results: dict, json_path: Path) -> str:
    """The table's one teacher, kept at ``keep`` (a file small enough for git) so the table can be
    continued on another machine; a different file under that name is refused."""
    recorded = results.get("teacher")
    if recorded and recorded.get("sha256") and keep.is_file():
        if sha256(keep) != recorded["sha256"]:
            raise SystemExit(f"{keep} is not the teacher this table recorded (SHA-256 differs): restore it or "
                             "start a new table with --out")
        return str(keep)
    teacher_dir = runs / "teacher"
    t0 = time.perf_counter()
    teacher_recipe = base.model_copy(update={"distill": base.distill.model_copy(update={"method": "ce"}),
                                             "student": base.student.model_copy(update={"epochs": 1})})
    m = distill(teacher_recipe, teacher_dir, resume=teacher_dir.exists()).metrics["teacher"]
    trained = {k: m[k] for k in ("arch", "params", "test_top1", "shifted_top1")}
    trained["wall_s"] = time.perf_counter() - t0
    if recorded and abs(recorded["test_top1"] - trained["test_top1"]) > RETRAIN_TOLERANCE:
        raise SystemExit(f"the teacher trained again scores {trained['test_top1']:.2f} %, not the recorded "
                         f"{recorded['test_top1']:.2f} %: start a new table with --out")
    if recorded and recorded.get("sha256") and results["cells"]:
        raise SystemExit(f"{keep} is gone and its cells were made with it; restore it (git checkout) or start a new "
                         "table with --out")
    results["teacher"] = {**(recorded or trained), "sha256": keep_file(teacher_dir / "teacher_best.pt", keep),
                          "file": str(keep)}
    if recorded:
        results["teacher"]["retrained_test_top1"] = trained["test_top1"]
    write_json(json_path, results)
    return str(keep)


def plan(methods: list[str], seeds: int, main_methods: list[str], main_seeds: int, default: Setting,
         sweep: bool, betas: list[float], sweep_seeds: int, cells: dict) -> list[tuple[Setting, int]]:
    """The order cells run in: what answers the question first (the main methods' first three
    seeds), then the sweep and the chosen setting's seeds (the default follows it), the other
    methods, the remaining seeds."""
    first = min(seeds, main_seeds)
    order = [(replace(default, method=m), s) for s in range(first) for m in methods if m in main_methods]
    if sweep:
        order += [(p, 0) for p in sweep_points(default)]
        chosen, _ = chosen_setting(cells, default)
        if chosen is not None:
            order += [(chosen, s) for s in range(main_seeds)]
    order += [(replace(default, method=m), s) for s in range(seeds) for m in methods if m not in main_methods]
    order += [(replace(default, method=m), s) for s in range(first, main_seeds) for m in methods if m in main_methods]
    order += [(replace(default, method=m, beta=b), s) for m in ("at", "atkd") if m in methods for b in betas
              if b != default.beta for s in range(sweep_seeds)]
    seen, unique = set(), []
    for item in order:
        if item not in seen:
            seen.add(item)
            unique.append(item)
    return unique


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/fashion_mnist_quick.yaml")
    ap.add_argument("--main", action="store_true", help="the main job's budget: --train-subset 8000, the recipe's "
                    "epochs, --main-seeds 5, --sweep, --betas '' and --out benchmarks/methods_main")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--main-methods", default="ce,kd,atkd", help="methods run with --main-seeds")
    ap.add_argument("--main-seeds", type=int, default=None, help="default: --seeds")
    ap.add_argument("--sweep", action="store_true", help="AT-KD settings grid, chosen on validation")
    ap.add_argument("--betas", default="100,1000,5000", help="beta sweep for at and atkd")
    ap.add_argument("--sweep-seeds", type=int, default=1, help="seeds of the beta sweep's extra values")
    ap.add_argument("--train-subset", type=int, default=4000)
    ap.add_argument("--test-subset", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--epochs", type=int, default=3, help="student epochs")
    ap.add_argument("--teacher-epochs", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default="benchmarks/methods", help="writes OUT.md, OUT.json, OUT_teacher.pt, OUT_runs/")
    args = ap.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    if args.main:
        flags = set(a.split("=")[0] for a in given)
        args.train_subset = 8000 if "--train-subset" not in flags else args.train_subset
        args.epochs = None if "--epochs" not in flags else args.epochs
        args.main_seeds = 5 if args.main_seeds is None else args.main_seeds
        args.sweep, args.betas = True, "" if "--betas" not in flags else args.betas
        args.out = "benchmarks/methods_main" if "--out" not in flags else args.out
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    command = "python " + shlex.join(["benchmarks/methods.py", *given])
    out = Path(args.out)
    runs = Path(f"{out}_runs")
    overrides = {"data.train_subset": args.train_subset, "data.test_subset": args.test_subset,
                 "student.epochs": args.epochs, "teacher.epochs": args.teacher_epochs, "train.device": args.device,
                 "distill.qat.epochs": 0}  # float students: QAT has its own table (quantization.py)
    base = load_recipe(args.recipe, overrides)
    json_path = Path(f"{out}.json")
    table = Cells(json_path)
    results = table.data
    results["json"] = str(json_path)
    results["setting"] = (f"`{args.recipe}` with {base.data.train_subset} training images "
                          f"({base.data.val_fraction:.0%} held out for validation), {base.data.test_subset or 'all'} "
                          f"test images at {base.data.image_size} px; student {base.student.arch} "
                          f"×{base.student.width_mult}, {base.student.epochs} epochs; teacher {base.teacher.arch} "
                          f"width {base.teacher.width}, {base.teacher.epochs} epochs")
    teacher_ckpt = _train_teacher(base, runs, Path(f"{out}_teacher.pt"), results, json_path)
    teacher_sha = results["teacher"]["sha256"]
    for key, c in table.cells.items():
        if c.get("teacher_sha256", teacher_sha) != teacher_sha:
            raise SystemExit(f"cell {key} was made with another teacher than this table's: start a new table "
                             "with --out")
    d = base.distill
    default = Setting(d.method, d.alpha, d.temperature, d.beta, d.warmup_epochs)
    if "default_setting" in results:
        # cells are keyed relative to the setting the table started with: a recipe whose defaults
        # moved since (the quick recipe took the warm-up this table chose) keeps the table's keys
        default = Setting(**results["default_setting"])
    else:
        table.save(default_setting=asdict(default))
    results["setting"] += (f"; T={default.temperature:g}, α={default.alpha:g}, default β={default.beta:g}, "
                           f"warm-up {default.warmup_epochs:g} epochs unless the row says otherwise.")
    methods = args.methods.split(",")
    main_seeds = args.seeds if args.main_seeds is None else args.main_seeds
    betas = [float(b) for b in args.betas.split(",") if b]
    md = Path(f"{out}.md")
    while True:  # the chosen setting joins the plan once the sweep is complete
        todo = [(st, s) for st, s in plan(methods, args.seeds, args.main_methods.split(","), main_seeds, default,
                                          args.sweep, betas, args.sweep_seeds, table.cells)
                if cell_key(st, s, default) not in table.cells]
        if not todo:
            break
        setting, seed = todo[0]
        recipe = base.model_copy(update={
            "seed": seed,
            "teacher": base.teacher.model_copy(update={"checkpoint": teacher_ckpt}),
            "distill": base.distill.model_copy(update={
                "method": setting.method, "alpha": setting.alpha, "temperature": setting.temperature,
                "beta": setting.beta, "warmup_epochs": setting.warmup_epochs}),
        })
        key = cell_key(setting, seed, default)
        table.run(key, recipe, runs / key.replace("|", "_").replace("=", ""),
                  lambda m, st=setting, s=seed: _row(st, s, teacher_sha, {**m, "threads": _threads()}))
        write_text(md, render(results, command, default, methods))
    write_text(md, render(results, command, default, methods))
    print(md.read_text())


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
