"""Host latency of the student (int8, fp32) against the fp32 teacher, and the runner's overhead.

    python benchmarks/latency.py                                  # the product pair of a recipe
    python benchmarks/latency.py --recipe recipes/fashion_mnist_quick.yaml
    python benchmarks/latency.py --export runs/quick/export       # files of a finished export

With a recipe (default ``recipes/fashion_mnist.yaml``: ResNet-50 teacher, MobileNetV2-1.0
student, 32 px Fashion-MNIST) the two models are built with their initial weights — latency
does not depend on the weight values — exported to ONNX and, with onnx2tf as ``edgekd export``
does, to fp32 TFLite and to int8 TFLite calibrated on real training images. Then, for 1 and 2
threads: the median of a bare ``invoke()`` loop in LiteRT and of ``session.run`` in onnxruntime,
interleaved round-robin so that a noisy neighbour hits every model alike. Last, the runner
(``edgekd/runner.py``, as ``edgekd bench`` starts it) times the int8 student and its p50
is compared with the bare loop's. Goals: int8 student >= 25x faster than the fp32 teacher;
runner overhead <= 5 %.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgekd.runner import time_invokes

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "edgekd" / "runner.py"


def litert_invoke(path: Path, threads: int):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=threads)
    it.allocate_tensors()
    inp = it.get_input_details()[0]
    it.set_tensor(inp["index"], np.zeros(inp["shape"], inp["dtype"]))
    return it.invoke


def ort_invoke(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    feed = {inp.name: np.zeros([d if isinstance(d, int) else 1 for d in inp.shape], np.float32)}
    return lambda: sess.run(None, feed)


def time_round_robin(calls: dict[str, object], runs: int, warmup: int, rounds: int = 10) -> dict[str, float]:
    """Median ms per call; each model gets ``runs`` calls, in ``rounds`` interleaved blocks."""
    for fn in calls.values():
        time_invokes(fn, warmup, 0)
    times: dict[str, list[float]] = {k: [] for k in calls}
    block = max(1, runs // rounds)
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name] += time_invokes(fn, 0, block)  # the board's own timing loop
    return {k: statistics.median(v) for k, v in times.items()}


def build_files(recipe_path: Path, work: Path, calib: int) -> tuple[dict[str, Path], dict]:
    from edgekd.data import gather, load_dataset
    from edgekd.export import convert_onnx2tf, export_onnx
    from edgekd.models import build_model, count_params
    from edgekd.recipe import load_recipe
    from edgekd.train import prepare_batch

    recipe = load_recipe(recipe_path)
    data = load_dataset(recipe.data, recipe.seed)
    calib_u8, _ = gather(data.train, calib, seed=0)
    mean, std = torch.tensor(data.mean), torch.tensor(data.std)
    calib_x = prepare_batch(calib_u8, mean, std)
    sample = calib_x[:1]
    torch.manual_seed(recipe.seed)
    teacher = build_model(recipe.teacher.arch, data.num_classes, data.channels, data.image_size,
                          width=recipe.teacher.width).eval()
    student = build_model(recipe.student.arch, data.num_classes, data.channels, data.image_size,
                          width_mult=recipe.student.width_mult).eval()
    with torch.no_grad():  # a few forward passes in train mode give BN realistic statistics
        for model in (teacher, student):
            model.train()
            for i in range(0, len(calib_x), 50):
                model(calib_x[i : i + 50])
            model.eval()
    files = {}
    for role, model, cal in (("student", student, calib_x), ("teacher", teacher, None)):
        d = work / role
        d.mkdir()
        files[f"{role}.onnx"] = d / f"{role}.onnx"
        export_onnx(model, sample, files[f"{role}.onnx"])
        made = convert_onnx2tf(files[f"{role}.onnx"], d, cal, data.mean, data.std)
        files[f"{role}_fp32.tflite"] = made["fp32"]
        if role == "student":
            files["student_int8.tflite"] = made["int8"]
    side = work / "student.model.json"
    side.write_text(json.dumps({"mean": data.mean, "std": data.std}))
    np.savez(work / "samples.npz", images=calib_u8[:50].numpy(), labels=np.zeros(min(50, len(calib_u8)), np.int64))
    desc = {"recipe": str(recipe_path), "image_size": data.image_size,
            "teacher": f"{recipe.teacher.arch} (width {recipe.teacher.width}, {count_params(teacher):,} params)",
            "student": f"{recipe.student.arch} (width_mult {recipe.student.width_mult}, "
                       f"{count_params(student):,} params)"}
    return files, desc


def runner_p50(path: Path, meta: Path, samples: Path, threads: int, runs: int) -> float:
    out = subprocess.run([sys.executable, str(RUNNER), "--model", str(path), "--meta", str(meta), "--samples",
                          str(samples), "--threads", str(threads), "--runs", str(runs), "--warmup", "50"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["latency_ms"]["p50"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "fashion_mnist.yaml")
    ap.add_argument("--export", type=Path, help="time the files of this export directory instead")
    ap.add_argument("--calib", type=int, default=200, help="real training images to calibrate int8 with")
    ap.add_argument("--runs", type=int, default=300, help="timed calls per model and thread count")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.export:
            names = ("student_int8.tflite", "student_fp32.tflite", "teacher_fp32.tflite", "student.onnx",
                     "teacher.onnx")
            files = {n: args.export / n for n in names if (args.export / n).is_file()}
            meta = args.export / "student.model.json"
            desc = {"export": str(args.export)}
            from edgekd.bench.bundle import make_bundle as _bundle  # the bench's own samples

            with tarfile.open(fileobj=io.BytesIO(_bundle(args.export, ("student_int8.tflite",), 50, 0))) as tar:
                tar.extractall(work, filter="data")
        else:
            files, desc = build_files(args.recipe, work, args.calib)
            meta = work / "student.model.json"
        rows: dict[str, dict[str, float]] = {}
        for threads in (1, 2):
            calls = {n: (ort_invoke if n.endswith(".onnx") else litert_invoke)(p, threads) for n, p in files.items()}
            for name, ms in time_round_robin(calls, args.runs, warmup=30).items():
                rows.setdefault(name, {})[f"ms_{threads}t"] = ms
        for name, path in files.items():
            rows[name]["size_bytes"] = path.stat().st_size
        bare = rows["student_int8.tflite"]["ms_1t"]
        # The runner in its own process, like `edgekd bench`; against a fresh bare loop taken just before.
        runner = statistics.median(runner_p50(files["student_int8.tflite"], meta, work / "samples.npz", 1, args.runs)
                                   for _ in range(3))
        bare_again = time_round_robin({"b": litert_invoke(files["student_int8.tflite"], 1)}, args.runs, 50)["b"]
    teacher = rows["teacher_fp32.tflite"]
    summary = {**desc, "runs": args.runs, "models": rows,
               "speedup_int8_vs_teacher": {t: teacher[t] / rows["student_int8.tflite"][t] for t in ("ms_1t", "ms_2t")},
               "speedup_fp32_vs_teacher": {t: teacher[t] / rows["student_fp32.tflite"][t] for t in ("ms_1t", "ms_2t")},
               "runner_p50_ms": runner, "bare_p50_ms": min(bare, bare_again),
               "runner_overhead": runner / min(bare, bare_again) - 1}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(", ".join(f"{k}: {v}" for k, v in desc.items()))
    print(f"median ms per call over {args.runs} calls, interleaved; LiteRT for .tflite, onnxruntime for .onnx")
    print(f"{'model':22s} {'KB':>8s} {'1 thread':>9s} {'2 threads':>9s}")
    for name, r in rows.items():
        print(f"{name:22s} {r['size_bytes'] / 1024:8,.0f} {r['ms_1t']:9.3f} {r['ms_2t']:9.3f}")
    s = summary["speedup_int8_vs_teacher"]
    print(f"int8 student vs fp32 teacher (LiteRT): {s['ms_1t']:.1f}x (1 thread), {s['ms_2t']:.1f}x (2 threads); "
          "goal >= 25x")
    print(f"runner p50 {runner:.4f} ms vs bare loop {summary['bare_p50_ms']:.4f} ms: overhead "
          f"{100 * summary['runner_overhead']:+.1f} % (goal <= 5 %)")


if __name__ == "__main__":
    main()
