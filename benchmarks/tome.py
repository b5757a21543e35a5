"""What Token Merging (ToMe) and its hashing matcher buy on edgekd's small ViT student, on this CPU.

    python benchmarks/tome.py                                 # the table in tome.md and tome.png
    python benchmarks/tome.py --sweep 0,2,4,8 --bits 16 --threads 1,2

One run: the ViT student of ``recipes/fashion_mnist_vit.yaml`` is distilled (kept in
``tome_runs/vit``, resumed if killed), exported with ``edgekd export --tome-sweep`` for the exact
and the LSH matcher, and every file is scored on the test set (``export.json``). Then for each r
and matcher: host latency (batch 1, median of interleaved runs) in PyTorch eager, onnxruntime,
LiteRT fp32 and LiteRT int8 at 1 and 2 threads; and the time of the matching step alone (exact
cosine vs LSH codes) against the whole forward pass. The MobileNetV2 student and the teacher of
the main job (``runs/quick``, made with ``edgekd run recipes/fashion_mnist_quick.yaml --out
runs/quick`` if missing) and the ViT run's CNN teacher are the reference points.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import litert_invoke, ort_invoke, time_round_robin  # noqa: E402

from edgekd.checkpoint import load_checkpoint, write_json, write_text  # noqa: E402
from edgekd.distill.stage import build_from_checkpoint, distill  # noqa: E402
from edgekd.export import export  # noqa: E402
from edgekd.recipe import load_recipe  # noqa: E402
from edgekd.tome import apply_tome, bipartite_soft_matching, merge_wavg  # noqa: E402
from edgekd.tome.patch import lsh_planes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def ensure_run(recipe_path: Path, run_dir: Path) -> None:
    if not (run_dir / "metrics.json").is_file():
        distill(load_recipe(recipe_path), run_dir, resume=run_dir.exists())


def ensure_export(run_dir: Path, sweep: tuple[int, ...], bits: int) -> dict:
    report_path = run_dir / "export" / "export.json"
    want = {f"student-tome-r{r}-{m}_int8.tflite" for r in sweep if r for m in ("exact", "lsh")}
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        if want <= set(report["artifacts"]) and all(
                a.get("tome", {}).get("bits", bits) == bits for a in report["artifacts"].values()):
            return report
    return export(run_dir, int8=True, tome_r=sweep, tome_matchers=("exact", "lsh"), tome_bits=bits).report


def torch_invoke(model: torch.nn.Module, x: torch.Tensor):
    def call() -> None:
        with torch.inference_mode():
            model(x)

    return call


def matching_ms(tokens: int, dim: int, head_dim: int, r: int, bits: int, runs: int = 2000) -> dict[str, float]:
    """Median ms of one block's match + merge on batch 1 (keys of ``head_dim``, tokens of ``dim``)."""
    torch.manual_seed(0)
    metric, x = torch.randn(1, tokens, head_dim), torch.randn(1, tokens, dim)
    planes = lsh_planes(head_dim, bits)
    out = {}
    for matcher in ("exact", "lsh"):
        def step() -> None:
            with torch.inference_mode():
                merge = bipartite_soft_matching(metric, r, True, matcher, planes)
                merge_wavg(merge, x, None)

        def match_only() -> None:
            with torch.inference_mode():
                bipartite_soft_matching(metric, r, True, matcher, planes)

        t = time_round_robin({"step": step, "match": match_only}, runs=runs, warmup=100)
        out[matcher] = t["match"]
        out[f"{matcher}_with_merge"] = t["step"]
    return out


# Where would merging pay? Larger ViTs of the same family, untrained (latency does not depend on
# the weights), timed at r = 0, half the largest uniform r and the largest: (label, px, patch, width, depth).
SCALING = (("edgekd student size, 28 px / 4", 28, 4, 64, 4), ("ViT-Ti width, 32 px / 4", 32, 4, 192, 12),
           ("ViT-Ti width, 32 px / 2", 32, 2, 192, 12))


def scaling(workdir: Path, runs: int) -> list[dict]:
    """PyTorch and onnxruntime latency (1 thread, batch 1) of ToMe on larger ViTs."""
    from edgekd.export import export_onnx
    from edgekd.models import build_model
    from edgekd.tome import max_uniform_r, tokens_after

    torch.set_num_threads(1)
    out = []
    for label, px, patch, width, depth in SCALING:
        tokens = (px // patch) ** 2 + 1
        top = max_uniform_r(tokens, depth)
        calls, meta = {}, {}
        for r in sorted({0, top // 2, top}):
            torch.manual_seed(0)
            model = build_model("vit", 10, 1, px, embed_dim=width, depth=depth, num_heads=3 if width == 192 else 2,
                                patch_size=patch).eval()
            apply_tome(model, r)
            x = torch.randn(1, 1, px, px)
            onnx_path = workdir / f"scaling-{px}-{patch}-{width}-{depth}-r{r}.onnx"
            if not onnx_path.is_file():
                export_onnx(model, x, onnx_path)
            calls[f"{r}|torch"], calls[f"{r}|ort"] = torch_invoke(model, x), ort_invoke(onnx_path, 1)
            meta[r] = tokens_after(tokens, [r] * depth)[-1]
        t = time_round_robin(calls, runs=runs, warmup=10)
        for r, last in meta.items():
            out.append({"model": label, "tokens": tokens, "depth": depth, "width": width, "r": r, "tokens_last": last,
                        "torch_ms": t[f"{r}|torch"], "ort_ms": t[f"{r}|ort"],
                        "torch_speedup": t["0|torch"] / t[f"{r}|torch"], "ort_speedup": t["0|ort"] / t[f"{r}|ort"]})
        print(f"scaling: {label} done", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "fashion_mnist_vit.yaml"))
    ap.add_argument("--reference", default=str(REPO / "runs" / "quick"), help="MobileNetV2 run dir (main job)")
    ap.add_argument("--sweep", default="0,2,4,8")
    ap.add_argument("--bits", type=int, default=16, help="LSH code bits")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "tome"))
    args = ap.parse_args()
    sweep = tuple(int(v) for v in args.sweep.split(","))
    out = Path(args.out)
    t_start = time.perf_counter()
    run_dir = out.parent / f"{out.name}_runs" / "vit"
    ensure_run(Path(args.recipe), run_dir)
    report = ensure_export(run_dir, sweep, args.bits)
    ref = Path(args.reference)
    if not (ref / "export" / "student_int8.tflite").is_file():
        from edgekd.pipeline import run as run_pipeline

        run_pipeline(load_recipe(REPO / "recipes" / "fashion_mnist_quick.yaml"), ref)
    ref_report = json.loads((ref / "export" / "export.json").read_text())
    export_dir = run_dir / "export"

    ckpt = load_checkpoint(run_dir / "student_best.pt")
    vit = build_from_checkpoint(ckpt, run_dir / "student_best.pt").eval()
    samples = np.load(export_dir / "samples.npz")
    mean, std = ckpt["mean"][0], ckpt["std"][0]
    x1 = torch.from_numpy((samples["images"][:1].astype(np.float32) / 255 - mean) / std)
    kw = ckpt["model_kwargs"]
    tokens = (ckpt["image_size"] // kw["patch_size"]) ** 2 + 1
    head_dim = kw["embed_dim"] // kw["num_heads"]

    # rows: (label, r, matcher, artifact stem)
    rows = []
    for r in sweep:
        for m in ("exact", "lsh"):
            if r == 0 and m == "lsh":
                continue
            stem = "student" if r == 0 else f"student-tome-r{r}-{m}"
            rows.append((f"ViT r={r}" + (f" {m}" if r else ""), r, m if r else "none", stem))
    threads = [int(t) for t in args.threads.split(",")]
    latency: dict[str, dict[str, float]] = {}
    for th in threads:
        torch.set_num_threads(th)
        calls = {}
        for label, r, m, stem in rows:
            model = copy.deepcopy(vit)
            if r:
                apply_tome(model, r, m, args.bits)
            calls[f"{label}|torch"] = torch_invoke(model, x1)
            calls[f"{label}|ort"] = ort_invoke(export_dir / f"{stem}.onnx", th)
            calls[f"{label}|fp32"] = litert_invoke(export_dir / f"{stem}_fp32.tflite", th)
            calls[f"{label}|int8"] = litert_invoke(export_dir / f"{stem}_int8.tflite", th)
        calls["MobileNetV2 student|int8"] = litert_invoke(ref / "export" / "student_int8.tflite", th)
        calls["MobileNetV2 student|fp32"] = litert_invoke(ref / "export" / "student_fp32.tflite", th)
        calls["ResNet-18 teacher (main job)|fp32"] = litert_invoke(ref / "export" / "teacher_fp32.tflite", th)
        calls["CNN teacher (ViT run)|fp32"] = litert_invoke(export_dir / "teacher_fp32.tflite", th)
        print(f"timing {len(calls)} model/runtime pairs at {th} thread(s)...", flush=True)
        for k, v in time_round_robin(calls, runs=args.runs, warmup=20).items():
            latency.setdefault(k, {})[str(th)] = v

    arts = report["artifacts"]
    top1 = {}
    for label, r, m, stem in rows:
        top1[label] = {"fp32": arts[f"{stem}_fp32.tflite"]["test_top1"],
                       "int8": arts[f"{stem}_int8.tflite"]["test_top1"], "torch": arts[f"{stem}.onnx"]["test_top1"]}
    ra = ref_report["artifacts"]
    top1["MobileNetV2 student"] = {"fp32": ra["student_fp32.tflite"]["test_top1"],
                                   "int8": ra["student_int8.tflite"]["test_top1"]}
    top1["ResNet-18 teacher (main job)"] = {"fp32": ra["teacher_fp32.tflite"]["test_top1"]}
    top1["CNN teacher (ViT run)"] = {"fp32": arts["teacher_fp32.tflite"]["test_top1"]}

    torch.set_num_threads(1)
    match = {r: matching_ms(tokens, kw["embed_dim"], head_dim, r, args.bits) for r in sweep if r}
    scaled = scaling(run_dir, max(50, args.runs // 3))
    data = {"sweep": sweep, "bits": args.bits, "tokens": tokens, "depth": kw["depth"], "embed_dim": kw["embed_dim"],
            "latency_ms": latency, "top1": top1, "matching_ms": {str(k): v for k, v in match.items()},
            "scaling": scaled,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or ''}".strip(", "),
            "wall_s": time.perf_counter() - t_start, "test_images": arts["student.onnx"]["test_images"]}
    write_json(out.with_suffix(".json"), data)
    write_text(out.with_suffix(".md"), render(data, rows, args, threads))
    plot(data, rows, threads[0], out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())


def render(data: dict, rows: list, args: argparse.Namespace, threads: list[int]) -> str:
    lat, top1 = data["latency_ms"], data["top1"]
    cmd = f"python benchmarks/tome.py --sweep {args.sweep} --bits {args.bits} --threads {args.threads}"
    lines = [
        "# ToMe on a small ViT student: top-1 and host latency", "",
        f"Made by `{cmd}` on {data['machine']} (no GPU, no Pi: host latency; `edgekd bench --device rpi4 "
        f"--tome-sweep ...` measures a board). This run took {data['wall_s'] / 60:.0f} min; the distillation "
        "and the export sweep it reuses from `tome_runs/vit` took 28 and ~20 min the first time.", "",
        f"ViT student: `recipes/fashion_mnist_vit.yaml` (timm VisionTransformer, {data['depth']} blocks, width "
        f"{data['embed_dim']}, {data['tokens']} tokens = 49 patches + class token), distilled with KD from a small "
        f"CNN; top-1 on {data['test_images']} Fashion-MNIST test images. r = tokens merged per block "
        f"(ToMe off the shelf: the student was trained without merging); LSH = {data['bits']}-bit "
        "random-hyperplane codes of the keys. Latency: batch 1, median ms of interleaved runs.", "",
    ]
    head = "| model | top-1 fp32 % | top-1 int8 % |" + "".join(
        f" PyTorch {t}T | ORT {t}T | LiteRT fp32 {t}T | LiteRT int8 {t}T |" for t in threads)
    lines += [head, "|" + "---|" * (3 + 4 * len(threads))]
    fmt = lambda v: f"{v:.3f}" if v is not None else "–"  # noqa: E731
    for label, *_ in rows:
        cells = [f"{top1[label]['fp32']:.2f}", f"{top1[label]['int8']:.2f}"]
        for t in threads:
            cells += [fmt(lat[f"{label}|{rt}"][str(t)]) for rt in ("torch", "ort", "fp32", "int8")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for name in ("MobileNetV2 student", "ResNet-18 teacher (main job)", "CNN teacher (ViT run)"):
        cells = [f"{top1[name]['fp32']:.2f}", f"{top1[name]['int8']:.2f}" if "int8" in top1[name] else "–"]
        for t in threads:
            cells += ["–", "–", fmt(lat.get(f"{name}|fp32", {}).get(str(t))),
                      fmt(lat.get(f"{name}|int8", {}).get(str(t)))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    base = lat["ViT r=0|int8"][str(threads[0])]
    lines += ["", f"Speed-up of LiteRT int8 at {threads[0]} thread over r = 0, and the matching step "
              "(one block, batch 1, PyTorch, 1 thread; match = scores + argmax + top-k, merge = the "
              "two 0/1 matmuls):", "",
              "| r | matcher | LiteRT int8 speed-up | match ms | match + merge ms | match share of a PyTorch forward |",
              "|---|---|---|---|---|---|"]
    for label, r, m, _ in rows:
        if not r:
            continue
        mm = data["matching_ms"][str(r)]
        fwd = lat[f"{label}|torch"]["1"] if "1" in lat[f"{label}|torch"] else None
        share = f"{100 * data['depth'] * mm[m] / fwd:.1f} %" if fwd else "–"
        lines.append(f"| {r} | {m} | {base / lat[f'{label}|int8'][str(threads[0])]:.2f}× | {mm[m]:.4f} | "
                     f"{mm[m + '_with_merge']:.4f} | {share} |")
    lines += ["", "Where merging starts to pay: the same ViT family, larger and untrained (latency does not "
              "depend on the weights), exact ToMe at r = 0, half the largest uniform r and the largest; batch 1, "
              "1 thread, median ms:", "",
              "| model | tokens | blocks × width | r | tokens after the last block | PyTorch ms | speed-up | "
              "onnxruntime ms | speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    for row in data["scaling"]:
        lines.append(f"| {row['model']} | {row['tokens']} | {row['depth']} × {row['width']} | {row['r']} | "
                     f"{row['tokens_last']} | {row['torch_ms']:.3f} | {row['torch_speedup']:.2f}× | "
                     f"{row['ort_ms']:.3f} | {row['ort_speedup']:.2f}× |")
    lines += ["", "![top-1 vs latency](tome.png)", ""]
    return "\n".join(lines)


def plot(data: dict, rows: list, threads: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgekd.checkpoint import atomic_path

    lat, top1 = data["latency_ms"], data["top1"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, marker in (("exact", "o"), ("lsh", "s")):
        for rt, style in (("fp32", "-"), ("int8", "--")):
            pts = [(lat[f"{label}|{rt}"][str(threads)], top1[label][rt], r) for label, r, mm, _ in rows
                   if mm in (m, "none")]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=marker, label=f"ViT {m} {rt}")
            for x, y, r in pts:
                ax.annotate(f"r={r}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for name, rt, marker in (("MobileNetV2 student", "int8", "^"), ("MobileNetV2 student", "fp32", "v"),
                             ("CNN teacher (ViT run)", "fp32", "D"), ("ResNet-18 teacher (main job)", "fp32", "*")):
        ax.scatter([lat[f"{name}|{rt}"][str(threads)]], [top1[name][rt]], marker=marker, s=60, label=f"{name} {rt}")
    ax.set_xscale("log")
    ax.set_xlabel(f"LiteRT latency, ms (batch 1, {threads} thread, log scale)")
    ax.set_ylabel("test top-1 %")
    ax.set_title("ToMe on a small ViT: accuracy vs latency")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
