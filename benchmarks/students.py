"""Which student for the board? Zoo student families distilled from the main job's teacher.

Each family is distilled with AT-KD (KD where the student has no feature maps) from one teacher
(default: the methods table's, ``benchmarks/methods_main_teacher.pt``, made by ``methods.py
--main``) on the main job's data, with seeds; each run is exported to ONNX and full-integer int8
TFLite (``edgekd export``, its default converter) and scored. Then every int8 file is timed in
LiteRT at 1 and 2 threads in one interleaved run (the median of bare ``invoke()`` calls), so a
noisy neighbour hits every family alike. Cells are kept in ``<out>.json``; run it again to
continue. Writes ``<out>.md`` and ``<out>.png`` (top-1 against p50: the Pareto front).

    python benchmarks/students.py                                     # benchmarks/students.md
    python benchmarks/students.py --families timm/mobilenetv3_small_100,mobilenet_v2 --seeds 1
    python benchmarks/students.py --no-timing & python benchmarks/students.py --no-timing  # one per core
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cells import Cells, mean_std  # noqa: E402
from latency import litert_invoke, time_round_robin  # noqa: E402

from edgekd.checkpoint import write_text  # noqa: E402
from edgekd.errors import EdgekdError  # noqa: E402
from edgekd.export import export  # noqa: E402
from edgekd.recipe import Recipe, load_recipe  # noqa: E402

FAMILIES = ["mobilenet_v2", "timm/mobilenetv3_small_100", "timm/mobilenetv3_large_100", "timm/efficientnet_lite0",
            "timm/mobilevitv2_050", "torchvision/mobilenet_v3_small", "torchvision/shufflenet_v2_x0_5",
            "torchvision/resnet18", "torchvision/mnasnet0_5"]


def _row(run_dir: Path, metrics: dict, method: str) -> dict:
    report = export(run_dir, formats=("onnx", "tflite"), int8=True, calib=500, max_int8_drop=100.0).report
    arts = report["artifacts"]
    int8, fp32 = arts["student_int8.tflite"], arts["student_fp32.tflite"]
    return {"arch": metrics["student"]["arch"], "method": method, "params": metrics["student"]["params"],
            "pytorch_top1": metrics["student"]["test_top1"], "fp32_top1": fp32["test_top1"],
            "int8_top1": int8["test_top1"], "int8_drop": fp32["test_top1"] - int8["test_top1"],
            "int8_bytes": int8["size_bytes"], "int8_file": str(run_dir / "export" / "student_int8.tflite"),
            "converter": int8["converter"], "val_top1": metrics["student"]["val_top1"]}


def _distil_cell(cells: Cells, key: str, base: Recipe, arch: str, seed: int, runs: Path) -> None:
    """Distil and export one family at one seed into ``cells`` (or record why it was refused)."""
    for method in ("atkd", "kd"):  # AT-KD where the student has feature maps to match
        recipe = base.model_copy(update={
            "seed": seed, "student": base.student.model_copy(update={"arch": arch}),
            "distill": base.distill.model_copy(update={"method": method})})
        run_dir = runs / f"{arch.replace('/', '_')}_seed{seed}_{method}"
        try:
            cells.run(key, recipe, run_dir, lambda m, d=run_dir, me=method: _row(d, m, me))
            return
        except EdgekdError as e:
            if method == "kd" or "has none" not in str(e):
                cells.keep(key, {"arch": arch, "error": str(e)})
                print(f"{key}: {e}", flush=True)
                return


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/fashion_mnist_quick.yaml")
    ap.add_argument("--teacher", default="benchmarks/methods_main_teacher.pt")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train-subset", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--test-subset", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--epochs", type=int, default=None, help="student epochs; default: the recipe's")
    ap.add_argument("--runs", type=int, default=300, help="timed invokes per file and thread count")
    ap.add_argument("--no-timing", action="store_true", help="distil and export only")
    ap.add_argument("--timing-only", action="store_true", help="time the files of the finished cells; distil nothing")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads while training")
    ap.add_argument("--out", default="benchmarks/students")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    command = "python " + shlex.join(["benchmarks/students.py", *(argv if argv is not None else sys.argv[1:])])
    if not Path(args.teacher).is_file():
        raise SystemExit(f"no teacher at {args.teacher}: run `python benchmarks/methods.py --main` first (it trains "
                         "and keeps the main job's teacher), or pass --teacher")
    out, runs = Path(args.out), Path(f"{args.out}_runs")
    base = load_recipe(args.recipe, {"data.train_subset": args.train_subset, "data.test_subset": args.test_subset,
                                     "student.epochs": args.epochs, "teacher.checkpoint": args.teacher,
                                     "distill.qat.epochs": 0})  # float students: QAT has its own table
    cells = Cells(Path(f"{out}.json"))
    families = args.families.split(",")
    for seed in range(0 if args.timing_only else args.seeds):
        for arch in families:
            key = f"{arch}|seed={seed}"
            cells.refresh()  # another process may have finished it (one process per core may fill the table)
            if key in cells.cells or "error" in cells.cells.get(f"{arch}|seed=0", {}):
                continue  # done, or a family refused at seed 0 (conversion or a non-finite loss)
            with cells.claim(runs / f"{arch.replace('/', '_')}_seed{seed}") as mine:
                if not mine:  # another process is running this cell
                    continue
                cells.refresh()
                if key not in cells.cells:
                    _distil_cell(cells, key, base, arch, seed, runs)
    if not args.no_timing:
        files = {k: c["int8_file"] for k, c in cells.cells.items() if "int8_file" in c and Path(c["int8_file"]).is_file()
                 and k.split("|")[0] in families}
        load = os.getloadavg()[0]
        for threads in (1, 2):
            calls = {k: litert_invoke(Path(f), threads) for k, f in files.items()}
            for k, ms in time_round_robin(calls, runs=args.runs, warmup=20).items():
                cells.update(k, **{f"int8_p50_ms_{threads}t": ms})  # kept by save, as this process's
        cells.save(timing={"load_1m_before": load, "load_1m_after": os.getloadavg()[0], "runs": args.runs})
    write_text(Path(f"{out}.md"), render(cells, families, command))
    _plot(cells, families, Path(f"{out}.png"))
    print(Path(f"{out}.md").read_text())


def _by_arch(cells: Cells, families: list[str]) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = {}
    for k, c in cells.cells.items():
        if k.split("|")[0] in families:
            by.setdefault(k.split("|")[0], []).append(c)
    return by


def render(cells: Cells, families: list[str], command: str) -> str:
    t = cells.data.get("timing")
    lines = ["# Student families for the board", "", f"Made by `{command}` (cells in `{cells.path.name}`).", "",
             "Teacher: the main job's (methods_main_teacher.pt); student trained with the quick recipe's budget. "
             "int8: full-integer TFLite from `edgekd export` (default converter), scored on the test set; p50: "
             "median of bare LiteRT `invoke()` calls, all files interleaved in one run"
             + (f" (load average {t['load_1m_before']:.2f} before, {t['load_1m_after']:.2f} after)." if t else "."), "",
             "| student | method | seeds | params | int8 KB | int8 top-1 % | fp32 → int8 drop, pt | p50 ms 1 thread | "
             "p50 ms 2 threads | converter |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arch, rows in _by_arch(cells, families).items():
        ok = [r for r in rows if "error" not in r]
        if not ok:
            lines.append(f"| {arch} | refused: {rows[0]['error']} | | | | | | | | |")
            continue
        p50 = [[r[f"int8_p50_ms_{n}t"] for r in ok if f"int8_p50_ms_{n}t" in r] for n in (1, 2)]
        timed = " | ".join(f"{statistics.fmean(p):.3f}" if p else "" for p in p50)
        refused = [r for r in rows if "error" in r]  # a seed whose file the converter or runtime refused
        seeds = f"{len(ok)} (+{len(refused)} refused: {refused[0]['error']})" if refused else f"{len(ok)}"
        lines.append(f"| {arch} | {ok[0]['method']} | {seeds} | {ok[0]['params']:,} | "
                     f"{statistics.fmean(r['int8_bytes'] for r in ok) / 1024:,.0f} | "
                     f"{mean_std([r['int8_top1'] for r in ok])} | {mean_std([r['int8_drop'] for r in ok])} | "
                     f"{timed} | {ok[0]['converter']} |")
    return "\n".join(lines) + "\n"


def _plot(cells: Cells, families: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arch, rows in _by_arch(cells, families).items():
        ok = [r for r in rows if "int8_p50_ms_1t" in r]
        if ok:
            ax.scatter([statistics.fmean(r["int8_p50_ms_1t"] for r in ok)],
                       [statistics.fmean(r["int8_top1"] for r in ok)], label=arch)
    ax.set_xlabel("LiteRT int8 p50, ms (1 thread, this host)")
    ax.set_ylabel("int8 test top-1 %")
    ax.set_title("Student families: accuracy against latency")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
