"""Quality and host speed of the exported student: fp32 vs int8 (and fp16 / dynamic-range) TFLite.

    edgekd distill recipes/fashion_mnist_quick.yaml --out runs/quick
    python benchmarks/export_quality.py runs/quick                      # exports first if needed
    python benchmarks/export_quality.py runs/quick --converter onnx2tf --reexport

Scores every student TFLite file in RUN/export on the *full* official test set of the run's
dataset (10,000 images for Fashion-MNIST, not the recipe's subset) in LiteRT, and times a bare
``invoke()`` loop on one image with 1 and 2 threads (median of the timed runs, after warm-up).
Goal for the quick recipe's student: int8 within 0.3 pt of fp32 and <= 0.30x its size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from edgekd.checkpoint import load_checkpoint
from edgekd.data import gather, load_dataset
from edgekd.export import export, tflite_runner
from edgekd.recipe import recipe_from_dict
from edgekd.runner import time_invokes
from edgekd.train import prepare_batch

VARIANTS = ("fp32", "int8", "fp16", "dynamic")


def invoke_ms(path: Path, threads: int, runs: int, warmup: int = 20) -> float:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=threads)
    it.allocate_tensors()
    inp = it.get_input_details()[0]
    it.set_tensor(inp["index"], np.zeros(inp["shape"], inp["dtype"]))
    return float(np.median(time_invokes(it.invoke, warmup, runs)))  # the board's own timing loop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--converter", default="onnx2tf", choices=("onnx2tf", "litert-torch"))
    ap.add_argument("--reexport", action="store_true", help="convert again even if the files exist")
    ap.add_argument("--calib", type=int, default=500)
    ap.add_argument("--runs", type=int, default=500, help="timed invokes per file and thread count")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    out = args.run_dir / "export"
    if args.reexport or not all((out / f"student_{v}.tflite").is_file() for v in VARIANTS):
        export(args.run_dir, formats=("tflite", "fp16", "dynamic"), int8=True, calib=args.calib,
               max_int8_drop=100.0, converter=args.converter)
    ckpt = load_checkpoint(args.run_dir / "student_best.pt")
    recipe = recipe_from_dict(ckpt["recipe"])
    recipe.data.test_subset = None  # the full official test set
    data = load_dataset(recipe.data, recipe.seed)
    u8, labels = gather(data.test)
    x = prepare_batch(u8, torch.tensor(ckpt["mean"]), torch.tensor(ckpt["std"])).numpy()
    rows = {}
    for v in VARIANTS:
        path = out / f"student_{v}.tflite"
        logits = tflite_runner(path)(x)
        rows[v] = {"file": path.name, "size_bytes": path.stat().st_size,
                   "test_top1": 100.0 * float((logits.argmax(1) == labels.numpy()).mean()),
                   "invoke_ms_1thread": invoke_ms(path, 1, args.runs), "invoke_ms_2threads": invoke_ms(path, 2, args.runs)}
    fp32 = rows["fp32"]
    summary = {"run_dir": str(args.run_dir), "converter": json.loads((out / "export.json").read_text())["converters"],
               "test_images": len(labels), "int8_drop_top1": fp32["test_top1"] - rows["int8"]["test_top1"],
               "int8_size_ratio": rows["int8"]["size_bytes"] / fp32["size_bytes"], "files": rows}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{args.run_dir}: student on {len(labels):,} test images, LiteRT bare invoke, median of {args.runs}")
    print(f"{'file':24s} {'KB':>7s} {'x fp32':>7s} {'top-1 %':>8s} {'ms 1 thr':>9s} {'ms 2 thr':>9s}")
    for r in rows.values():
        print(f"{r['file']:24s} {r['size_bytes'] / 1024:7.0f} {r['size_bytes'] / fp32['size_bytes']:7.3f} "
              f"{r['test_top1']:8.2f} {r['invoke_ms_1thread']:9.3f} {r['invoke_ms_2threads']:9.3f}")
    print(f"int8 vs fp32: {-summary['int8_drop_top1']:+.2f} pt top-1, {summary['int8_size_ratio']:.3f}x size "
          "(goal: within 0.3 pt, <= 0.30x)")


if __name__ == "__main__":
    main()
