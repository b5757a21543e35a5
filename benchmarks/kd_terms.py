"""Why does KD lose early? The loss terms and their gradients, measured step by step.

For a budget (training images, epochs) the student is trained with AT-KD exactly as the trainer
does (same seed, batches, augmentation, optimizer and schedule), and at every step the gradient of
each weighted term (CE, KD, AT) with respect to the student's weights is taken on its own: its
norm, and the cosine between the KD and CE gradients (does the teacher pull the way the labels
do?). With the validation curves of ce, kd and atkd from the method tables (``methods.json`` and
``methods_main.json``, mean over seeds) it draws ``<out>.png`` and writes ``<out>.json``.

    python benchmarks/kd_terms.py                       # both tables' budgets -> benchmarks/methods_curves.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from edgekd.checkpoint import load_checkpoint, write_json  # noqa: E402
from edgekd.data import load_dataset  # noqa: E402
from edgekd.distiller import Distiller  # noqa: E402
from edgekd.losses.methods import METHODS  # noqa: E402
from edgekd.distill.student import new_student  # noqa: E402
from edgekd.models import build_from_checkpoint  # noqa: E402
from edgekd.models import pair_stages, stage_shapes, tap_candidates  # noqa: E402
from edgekd.recipe import load_recipe  # noqa: E402
from edgekd.train import make_optimizer, make_scheduler, prepare_batch  # noqa: E402

BUDGETS = {"tiny (methods.md)": (3000, 2), "main job (methods_main.md)": (8000, 5)}


def probe(recipe_path: str, teacher_path: str, train_subset: int, epochs: int, seed: int,
          max_steps: int | None) -> list[dict]:
    """Per step: each weighted term's value and gradient norm, and cos(grad KD, grad CE)."""
    recipe = load_recipe(recipe_path, {"data.train_subset": train_subset, "student.epochs": epochs, "seed": seed,
                                       "train.device": "cpu", "distill.qat.epochs": 0})  # the float terms
    data = load_dataset(recipe.data, seed)
    teacher = build_from_checkpoint(load_checkpoint(teacher_path), teacher_path).eval()
    student = new_student(recipe, data, torch.device("cpu"))  # the trainer's own initial weights
    size = (data.channels, data.image_size)
    pairs = pair_stages(stage_shapes(teacher, tap_candidates(recipe.teacher.arch, teacher, *size), *size),
                        stage_shapes(student, tap_candidates(recipe.student.arch, student, *size), *size))
    distiller = Distiller(student, METHODS["atkd"], recipe.distill, teacher=teacher, pairs=pairs)
    cfg = recipe.train
    params = [p for p in student.parameters() if p.requires_grad]
    opt = make_optimizer(distiller.trainable_parameters(), cfg, cfg.lr)
    steps = max(1, len(data.train) // cfg.batch_size)
    sched = make_scheduler(opt, cfg, cfg.lr, epochs * steps)
    mean, std = torch.tensor(data.mean), torch.tensor(data.std)
    rows, step = [], 0
    for epoch in range(epochs):
        distiller.train()
        e_seed = seed * 1000 + 500 + epoch  # the student's (seed, role, epoch) seed in edgekd.distill.fit
        gen = torch.Generator().manual_seed(e_seed)
        torch.manual_seed(e_seed)
        for x_u8, y in data.train.batches(cfg.batch_size, torch.device("cpu"), seed=e_seed):
            x = prepare_batch(x_u8, mean, std, recipe.data.augment, gen)
            _, terms = distiller(x, y)
            grads = {k: torch.autograd.grad(v, params, retain_graph=True, allow_unused=True) for k, v in terms.items()}
            flat = {k: torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)])
                    for k, gs in grads.items()}
            row = {"step": step, "epoch": epoch + 1, "lr": opt.param_groups[0]["lr"]}
            for k, v in terms.items():
                row[f"{k}_value"], row[f"{k}_grad_norm"] = float(v.detach()), float(flat[k].norm())
            row["cos_kd_ce"] = float(torch.nn.functional.cosine_similarity(flat["kd"], flat["ce"], dim=0))
            rows.append(row)
            opt.zero_grad(set_to_none=True)
            sum(terms.values()).backward()
            opt.step()
            sched.step()
            step += 1
            if max_steps and step >= max_steps:
                return rows
    return rows


def val_curves(table: Path) -> dict[str, list[float]]:
    """Mean validation top-1 per epoch of ce, kd and atkd at the default setting over seeds."""
    if not table.is_file():
        return {}
    cells = json.loads(table.read_text())["cells"]
    out = {}
    for method in ("ce", "kd", "atkd"):
        curves = [[e["val_top1"] for e in c["curve"]] for k, c in cells.items()
                  if k.startswith(f"{method}|beta=1000|seed=") and "curve" in c]
        if curves:
            n = min(len(c) for c in curves)
            out[method] = [statistics.fmean(c[i] for c in curves) for i in range(n)]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/fashion_mnist_quick.yaml")
    ap.add_argument("--teacher", default="benchmarks/methods_main_teacher.pt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=None, help="stop each budget after this many steps")
    ap.add_argument("--budgets", default=None, help="e.g. 3000x2,8000x5 [default: both tables']")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--replot", action="store_true", help="redraw OUT.png with the tables' current validation "
                    "curves, from the steps already in OUT.json")
    ap.add_argument("--out", default="benchmarks/methods_curves")
    args = ap.parse_args(argv)
    here = Path(__file__).resolve().parent
    if args.replot:
        result = json.loads(Path(f"{args.out}.json").read_text())
        result["val_curves"] = {"tiny (methods.md)": val_curves(here / "methods.json"),
                                "main job (methods_main.md)": val_curves(here / "methods_main.json")}
        write_json(Path(f"{args.out}.json"), result)
        plot(result, Path(f"{args.out}.png"))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = BUDGETS if not args.budgets else {
        b: tuple(int(v) for v in b.split("x")) for b in args.budgets.split(",")}
    result = {"teacher": args.teacher, "seed": args.seed, "budgets": {}}
    for name, (subset, epochs) in budgets.items():
        result["budgets"][name] = {"train_subset": subset, "epochs": epochs,
                                   "steps": probe(args.recipe, args.teacher, subset, epochs, args.seed, args.max_steps)}
    result["val_curves"] = {"tiny (methods.md)": val_curves(here / "methods.json"),
                            "main job (methods_main.md)": val_curves(here / "methods_main.json")}
    write_json(Path(f"{args.out}.json"), result)
    plot(result, Path(f"{args.out}.png"))
    for name, b in result["budgets"].items():
        s = b["steps"]
        first = s[: max(1, len(s) // 10)]
        print(f"{name}: first {len(first)} steps: CE grad {statistics.fmean(r['ce_grad_norm'] for r in first):.3f}, "
              f"KD grad {statistics.fmean(r['kd_grad_norm'] for r in first):.3f}, AT grad "
              f"{statistics.fmean(r['at_grad_norm'] for r in first):.3f}, cos(KD, CE) "
              f"{statistics.fmean(r['cos_kd_ce'] for r in first):+.3f}; last step cos(KD, CE) {s[-1]['cos_kd_ce']:+.3f}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(result["budgets"].items())
    fig, axes = plt.subplots(3, len(budgets), figsize=(6 * len(budgets), 10), squeeze=False)
    for col, (name, b) in enumerate(budgets):
        steps = b["steps"]
        x = [r["step"] for r in steps]
        for term in ("ce", "kd", "at"):
            axes[0][col].plot(x, [r[f"{term}_grad_norm"] for r in steps], label=f"‖∇ {term}‖", lw=0.8)
        axes[0][col].set_title(f"{name}: gradient norm per weighted term")
        axes[0][col].set_yscale("log")
        axes[0][col].legend()
        axes[1][col].plot(x, [r["cos_kd_ce"] for r in steps], lw=0.8, color="tab:purple")
        axes[1][col].axhline(0, color="gray", lw=0.5)
        axes[1][col].set_title("cos(∇ KD, ∇ CE)")
        axes[1][col].set_xlabel("step")
        curves = result["val_curves"].get(name, {})
        for method, ys in curves.items():
            axes[2][col].plot(range(1, len(ys) + 1), ys, marker="o", label=method)
        axes[2][col].set_title("validation top-1 per epoch (mean over seeds)")
        axes[2][col].set_xlabel("epoch")
        if curves:
            axes[2][col].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
