"""HARD on Fashion-MNIST: can learned augmentations transfer a CNN teacher's robustness to shifts
to an MLP student (the paper's §5.1), and what do they do for MobileNetV2?

Rows, each over ``--seeds`` seeds (a teacher is trained per seed): the student alone, the
teacher, KD, KD + random shifts (the paper's "Shifts" control: translations up to a quarter of
the image), KD + hard-affine, KD + hard-mix, KD + hard-vae; then MobileNetV2-0.35 from the quick recipe's
ResNet-18: KD against KD + hard-affine. Centred and shifted test top-1 as mean ± std. Every
finished cell is kept in ``<out>.json`` and every teacher beside it, ``<out>_teacher_seedN.pt`` (the
CNN, ~250 KB) and ``<out>_mb_teacher_seedN.pt`` (the ResNet-18, ~3 MB), kept in git; run it again,
on this machine or another, to continue: a teacher is loaded (or trained) only when a cell that
needs it is still to run.

    python benchmarks/hard.py --seeds 3                          # the table in benchmarks/hard.md
    python benchmarks/hard.py --seeds 1 --train-subset 2000      # a quick look
    python benchmarks/hard.py --converged                        # benchmarks/hard_converged.md

``--converged`` is the paper's budget on Fashion-MNIST: the full training set (54,000 images after
the validation split), teacher and student trained until validation top-1 has not improved for
``--patience`` epochs (early stopping on validation; at most ``--max-epochs``), the priority rows
(KD, the random-shift control, KD + hard-affine) seed by seed first.
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cells import Cells, format_difference, mean_std, paired_difference  # noqa: E402

from edgekd.checkpoint import write_text  # noqa: E402
from edgekd.recipe import Recipe, load_recipe  # noqa: E402

SHIFTS = {"crop_padding": 7, "hflip": False, "rotation_deg": 0, "brightness": 0}  # ±25 % of 28 px
PHASE_CAP = 200  # augmentor iterations: about half an epoch of the converged budget (422 batches)


def _variant(base: Recipe, seed: int, teacher: str | None, method: str, augment: str | None = None,
             shifts: bool = False, hard: dict | None = None) -> Recipe:
    data = base.data.model_copy(update={"augment": base.data.augment.model_copy(update=SHIFTS)}) if shifts else base.data
    distill = base.distill.model_copy(update={"method": method, "augment": augment})
    if hard:
        distill = distill.model_copy(update={"hard": distill.hard.model_copy(update=hard)})
    return base.model_copy(update={
        "seed": seed, "data": data,
        "teacher": base.teacher.model_copy(update={"checkpoint": teacher}), "distill": distill,
    })


def _shift_text(r: Recipe) -> str:
    if r.data.shifted_mode == "translate":
        return f"each test image moved by up to {(r.data.shifted_canvas - 1) / 2:.0%} of its size, same scale"
    return f"each test image pasted at a random place on a {r.data.shifted_canvas:g}× canvas, then resized back"


def _student_row(m: dict) -> dict:
    epochs = m["student"]["epochs"]
    return {"test_top1": m["student"]["test_top1"], "shifted_top1": m["student"]["shifted_top1"],
            "val_top1": m["student"]["val_top1"], "epochs_run": len(epochs),
            "switches": (m["student"].get("hard") or {}).get("switches"),
            "pool": (m["student"].get("hard") or {}).get("pool"),
            "switches_per_epoch": [e.get("hard_switches") for e in epochs],
            "val_per_epoch": [e.get("val_top1") for e in epochs]}


def _table_args(argv: list[str]) -> list[str]:
    """The arguments that make the whole table: without those that only choose what one process does."""
    out, skip = [], False
    for a in argv:
        if skip or a in ("--report-only", "--mobilenet-only") or a.startswith("--rows="):
            skip = False
        elif a == "--rows":
            skip = True
        else:
            out.append(a)
    return out


def _teacher_row(m: dict) -> dict:
    return {"test_top1": m["teacher"]["test_top1"], "shifted_top1": m["teacher"]["shifted_top1"]}


def _plot_budget(cells: dict, path: Path) -> bool:
    """Switches (cumulative) and validation top-1 against epochs for every HARD cell: how much of
    the game a budget buys. False when no cell has per-epoch switch counts yet."""
    rows = {k: c for k, c in sorted(cells.items()) if any(v is not None for v in c.get("switches_per_epoch", []))}
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    # one colour per row (its thresholds and cap), one line style per seed: 13+ lines stay readable
    names = list(dict.fromkeys(k.rsplit("|", 1)[0] for k in rows))
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    for key, c in rows.items():
        name, seed = key.rsplit("|", 1)
        style = dict(color=colours[name], linestyle=("-", "--", ":", "-.")[int(seed) % 4], marker=".")
        epochs = range(1, len(c["switches_per_epoch"]) + 1)
        a.plot(epochs, c["switches_per_epoch"], label=name.replace("|", " ") if seed == "0" else None, **style)
        b.plot(epochs, c["val_per_epoch"], **style)
    a.set(xlabel="epoch", ylabel="switches so far (pool = 1 + augmentor phases ended)",
          title="HARD switches against the budget (line style: seed 0 — 1 -- 2 :)")
    b.set(xlabel="epoch", ylabel="validation top-1 % (centred)", title="validation top-1")
    a.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/fashion_mnist_invariance.yaml")
    ap.add_argument("--mobilenet-recipe", default="recipes/fashion_mnist_quick.yaml")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train-subset", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--mobilenet-train-subset", type=int, default=3000)
    ap.add_argument("--mobilenet-epochs", type=int, default=2)
    ap.add_argument("--mobilenet-seeds", type=int, default=None, help="default: --seeds")
    ap.add_argument("--no-mobilenet", action="store_true", help="the invariance rows only")
    ap.add_argument("--mobilenet-only", action="store_true",
                    help="the MobileNetV2 rows only (a second process can fill them beside one that runs the "
                         "invariance rows: both keep their cells in the same table)")
    ap.add_argument("--rows", default=None, help="comma-separated row keys (e.g. kd,kd-hard-affine): this process "
                    "runs those invariance rows only (no MobileNetV2 rows), beside another that runs the rest")
    ap.add_argument("--device", default=None)
    ap.add_argument("--converged", action="store_true", help="full training set, early stopping (see above)")
    ap.add_argument("--patience", type=int, default=3, help="--converged: epochs without a better val top-1")
    ap.add_argument("--max-epochs", type=int, default=40, help="--converged: student epochs at most")
    ap.add_argument("--teacher-max-epochs", type=int, default=12, help="--converged: teacher epochs at most")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--report-only", action="store_true", help="rewrite OUT.md from the finished cells; train nothing")
    ap.add_argument("--out", default=None, help="writes OUT.md, OUT.json, OUT_runs/ and the teachers as "
                    "OUT_teacher_seedN.pt and OUT_mb_teacher_seedN.pt (kept in git, so another machine continues "
                    "the table) "
                    "[default: benchmarks/hard, --converged: benchmarks/hard_converged]")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.out = args.out or ("benchmarks/hard_converged" if args.converged else "benchmarks/hard")
    command = "python " + shlex.join(["benchmarks/hard.py", *_table_args(argv if argv is not None else sys.argv[1:])])
    out, runs = Path(args.out), Path(f"{args.out}_runs")
    cells = Cells(Path(f"{out}.json"))
    overrides = {"data.train_subset": args.train_subset, "train.device": args.device}
    if args.converged:  # the whole training set (train_subset null), early stopping on validation
        overrides.update({"train.patience": args.patience, "student.epochs": args.max_epochs,
                          "teacher.epochs": args.teacher_max_epochs})
    base = load_recipe(args.recipe, overrides)
    if args.converged and args.train_subset is None:
        base = base.model_copy(update={"data": base.data.model_copy(update={"train_subset": None})})

    variants = (("student alone (MLP)", "ce", {"method": "ce"}),
                ("KD", "kd", {"method": "kd"}),
                ("KD + random shifts", "kd-shifts", {"method": "kd", "shifts": True}),
                ("KD + hard-affine", "kd-hard-affine", {"method": "kd", "augment": "hard-affine"}),
                # the converged run's stall (an augmentor phase that never reached l_max): the same
                # with every augmentor phase capped at half an epoch (edgekd.augment.hard)
                (f"KD + hard-affine, phase cap {PHASE_CAP}", f"kd-hard-affine-cap{PHASE_CAP}",
                 {"method": "kd", "augment": "hard-affine", "hard": {"max_phase": PHASE_CAP}}),
                # the ablation of the term suspected to brake the augmentor: λt keeps the teacher's
                # prediction on the augmented image where it was, and this teacher loses 22 pt on shifts
                (f"KD + hard-affine, phase cap {PHASE_CAP}, λt = 0", f"kd-hard-affine-cap{PHASE_CAP}-lt0",
                 {"method": "kd", "augment": "hard-affine", "hard": {"max_phase": PHASE_CAP, "lambda_t": 0.0}}),
                ("KD + hard-mix", "kd-hard-mix", {"method": "kd", "augment": "hard-mix"}),
                ("KD + hard-vae", "kd-hard-vae", {"method": "kd", "augment": "hard-vae"}),
                # issue #20 item 2: the thresholds read relative to the clean-batch disagreement, at
                # the paper's 5 % / 40 % (set before the run, not tuned), beside the absolute 20 / 50;
                # last: its augmentor phases all end by the cap, so the student gets 5 of every ~205
                # iterations and a run takes many epochs (README)
                (f"KD + hard-affine, relative ℓ 5 / 40 %, phase cap {PHASE_CAP}", f"kd-hard-affine-rel-cap{PHASE_CAP}",
                 {"method": "kd", "augment": "hard-affine",
                  "hard": {"max_phase": PHASE_CAP, "threshold": "relative", "l_min": 5.0, "l_max": 40.0}}))
    # seed by seed, the rows that answer the question first; hard-mix, hard-vae and the student
    # alone after every seed of those (the converged budget makes each cell long)
    if not args.converged:  # the first table keeps its rows
        variants = tuple(v for v in variants if f"cap{PHASE_CAP}" not in v[1])
    if args.rows:  # this process runs these rows only (the report keeps every finished one)
        unknown = set(args.rows.split(",")) - {v[1] for v in variants}
        if unknown:
            raise SystemExit(f"unknown --rows {', '.join(sorted(unknown))}; choose from "
                             f"{', '.join(v[1] for v in variants)}")
    first = (("kd", "kd-shifts", "kd-hard-affine", f"kd-hard-affine-cap{PHASE_CAP}",
              f"kd-hard-affine-cap{PHASE_CAP}-lt0") if args.converged else tuple(v[1] for v in variants))
    order = [(seed, v) for seed in range(args.seeds) for v in variants if v[1] in first]
    order += [(seed, v) for seed in range(args.seeds) for v in variants if v[1] not in first]
    teachers: dict[int, str] = {}
    # the deployable: in --converged, AT-KD (the main job's method) against AT-KD + hard-affine at
    # the main job's budget; else the first table's KD at a small budget
    mb_method = "atkd" if args.converged else "kd"
    mb_label = {"atkd": "AT-KD", "kd": "KD"}[mb_method]
    if args.converged:
        args.mobilenet_train_subset, args.mobilenet_epochs = 8000, None
    mb = load_recipe(args.mobilenet_recipe, {"data.train_subset": args.mobilenet_train_subset,
                                             "student.epochs": args.mobilenet_epochs, "train.device": args.device,
                                             "distill.qat.epochs": 0})  # float students
    args.mobilenet_epochs = mb.student.epochs

    def table(title: str, setting: str, table_rows: dict[str, list[dict]], reference: str) -> list[str]:
        lines = [f"## {title}", "", setting, "",
                 f"| row | seeds | centred top-1 % | shifted top-1 % | Δ centred vs {reference}, pt [95 % CI] | "
                 f"Δ shifted vs {reference}, pt [95 % CI] | epochs run | switches | wall s / run |",
                 "|---|---|---|---|---|---|---|---|---|"]
        kd = {r["seed"]: r for r in table_rows.get(reference, [])}

        def delta(rs: list[dict], col: str) -> str:
            d = paired_difference({r["seed"]: r[col] for r in rs}, {s: r[col] for s, r in kd.items()})
            if d is None:  # one pair: the difference itself
                one = [r[col] - kd[r["seed"]][col] for r in rs if r["seed"] in kd]
                return f"{one[0]:+.2f} (n=1)" if one else ""
            return format_difference(d)

        for label, rs in table_rows.items():
            if not rs:
                continue
            vs_kd = label.startswith(f"{reference} +")
            lines.append(f"| {label} | {len(rs)} | {mean_std([r['test_top1'] for r in rs])} | "
                         f"{mean_std([r['shifted_top1'] for r in rs])} | {delta(rs, 'test_top1') if vs_kd else ''} | "
                         f"{delta(rs, 'shifted_top1') if vs_kd else ''} | "
                         f"{', '.join(str(r['epochs_run']) for r in rs if r.get('epochs_run'))} | "
                         f"{', '.join(str(r['switches']) for r in rs if r.get('switches') is not None)} | "
                         f"{statistics.fmean(r['wall_s'] for r in rs):.0f} |")
        return lines + [""]

    def rows_from_cells() -> dict[str, list[dict]]:
        """Every finished invariance cell, in the table's order: a report written while this process
        is still early in its plan (a retrained teacher) keeps the rows other runs finished."""
        out: dict[str, list[dict]] = {"teacher (CNN)": []}
        for seed, (label, key, _) in order:
            if f"inv|teacher|{seed}" in cells.cells and all(r["seed"] != seed for r in out["teacher (CNN)"]):
                out["teacher (CNN)"].append({**cells.cells[f"inv|teacher|{seed}"], "seed": seed})
            if f"inv|{key}|{seed}" in cells.cells:
                out.setdefault(label, []).append({**cells.cells[f"inv|{key}|{seed}"], "seed": seed})
        return out

    mb_seeds = range(args.seeds if args.mobilenet_seeds is None else args.mobilenet_seeds)
    mb_rows = (("teacher (ResNet-18 w16)", "teacher", None), (mb_label, mb_method, {"method": mb_method}),
               (f"{mb_label} + hard-affine", f"{mb_method}-hard-affine",
                {"method": mb_method, "augment": "hard-affine"}))
    if args.converged:
        # with the augmentor's own thresholds (ℓmin 5 %) the augmentor never got a turn on MobileNetV2
        # (0 switches): the invariance recipe's ℓmin 20 % / ℓmax 50 %, and a phase cap of half an
        # epoch as in the invariance rows (a phase that stalls would stop the student for good)
        half_epoch = math.ceil(mb.data.train_subset * (1 - mb.data.val_fraction) / mb.train.batch_size) // 2
        mb_rows += ((f"{mb_label} + hard-affine, ℓmin 20 % / ℓmax 50 %, phase cap {half_epoch}",
                     f"{mb_method}-hard-affine-l20-cap{half_epoch}",
                     {"method": mb_method, "augment": "hard-affine",
                      "hard": {"l_min": 20.0, "l_max": 50.0, "max_phase": half_epoch}}),)

    def mobile_from_cells() -> dict[str, list[dict]]:
        """The MobileNetV2 rows finished so far, by this process or another."""
        out: dict[str, list[dict]] = {}
        for label, key, _ in mb_rows:
            rs = [{**cells.cells[f"mb|{key}|{seed}"], "seed": seed} for seed in mb_seeds
                  if f"mb|{key}|{seed}" in cells.cells]
            if rs:
                out[label] = rs
        return out

    def report() -> str:
        cells.refresh()  # the cells that another process filled meanwhile
        md = ["# HARD: learned hard augmentations, measured", "",
              f"Made by `{command}` (cells kept in `{out.name}.json`; run it again to continue).", "",
              f"Shifted test of the invariance rows: {_shift_text(base)}. Mean ± sample std over seeds; a seed "
              "changes the teacher too. hard-affine switches per run: "
              f"{[c.get('switches') for k, c in sorted(cells.cells.items()) if k.startswith('inv|kd-hard-affine')]}.", ""]
        retrained = {k: c for k, c in sorted(cells.cells.items()) if "retrained_test_top1" in c}
        if retrained:
            md += ["Some cells were added on another machine, whose run dirs were gone: their teachers were trained "
                   "again from the same seed and data (recorded → retrained top-1: " + ", ".join(
                       f"{k.split('|')[0]} seed {k.split('|')[2]} {c['test_top1']:.2f} → {c['retrained_test_top1']:.2f}"
                       for k, c in retrained.items()) + "); the rows show the recorded teachers.", ""]
        md += table("Invariance: CNN teacher → MLP student (centred training images only)",
                    f"`{args.recipe}`: {base.data.train_subset or 'all'} training images at {base.data.image_size} px, "
                    f"teacher {base.teacher.arch} width {base.teacher.width} × {base.teacher.epochs} epochs, "
                    f"student {base.student.arch} × {base.student.epochs} epochs"
                    + (f" at most, early stopping after {args.patience} epochs without a better validation top-1"
                       if args.converged else "") + f", KD T={base.distill.temperature}, HARD thresholds "
                    f"ℓmin {base.distill.hard.l_min:g} % / ℓmax {base.distill.hard.l_max:g} %. "
                    "Paper (MNIST, MLP student): KD + HARD-Affine +28.6 pt over KD on shifted digits.",
                    rows_from_cells(), "KD")
        mobile = mobile_from_cells()
        if mobile:
            md += table(f"MobileNetV2-0.35 from ResNet-18 (main job's recipe, {mb_method})",
                        f"`{args.mobilenet_recipe}` with {args.mobilenet_train_subset} training images, "
                        f"{args.mobilenet_epochs} student epochs.", mobile, mb_label)
        if _plot_budget(cells.cells, Path(f"{out}_budget.png")):
            md += [f"![switches and validation top-1 per epoch]({out.name}_budget.png)", ""]
        text = "\n".join(md)
        write_text(Path(f"{out}.md"), text)
        return text

    cells.after = report  # the report is rewritten after every new cell
    for seed, (label, key, kw) in order:
        if args.report_only or args.mobilenet_only:  # report() reads the finished cells
            continue
        if args.rows and key not in args.rows.split(","):
            continue
        if f"inv|{key}|{seed}" in cells.cells:
            # done: its teacher is not needed, so a new machine (no run dirs) does not train it again
            continue
        if seed not in teachers:
            t_dir = runs / f"inv_teacher_seed{seed}"
            teacher_recipe = base.model_copy(update={"seed": seed, "distill": base.distill.model_copy(
                update={"method": "ce"}), "student": base.student.model_copy(update={"epochs": 1})})
            _, teachers[seed] = cells.teacher(f"inv|teacher|{seed}", teacher_recipe, t_dir, _teacher_row,
                                              keep=Path(f"{out}_teacher_seed{seed}.pt"))
        cells.run(f"inv|{key}|{seed}", _variant(base, seed, teachers[seed], **kw), runs / f"inv_{key}_seed{seed}",
                  _student_row)

    if not args.no_mobilenet and not args.report_only and not args.rows:
        for seed in mb_seeds:
            if all(f"mb|{key}|{seed}" in cells.cells for _, key, _ in mb_rows):
                continue  # done: its teacher is not needed
            t_dir = runs / f"mb_teacher_seed{seed}"
            teacher_recipe = mb.model_copy(update={"seed": seed, "distill": mb.distill.model_copy(
                update={"method": "ce"}), "student": mb.student.model_copy(update={"epochs": 1})})
            _, teacher = cells.teacher(f"mb|teacher|{seed}", teacher_recipe, t_dir, _teacher_row,
                                       keep=Path(f"{out}_mb_teacher_seed{seed}.pt"))
            for _, key, kw in mb_rows[1:]:
                cells.run(f"mb|{key}|{seed}", _variant(mb, seed, teacher, **kw), runs / f"mb_{key}_seed{seed}",
                          _student_row)
    print(report())


if __name__ == "__main__":
    main()
