"""What Token Merging (ToMe) and its hashing matchers buy on edgekd's ViT student, on this CPU.

    python benchmarks/tome.py                                 # the table in tome.md and tome.png
    python benchmarks/tome.py --recipe recipes/fashion_mnist_vit.yaml --sweep 0,2,4,8 --out benchmarks/tome_vit50

One run: the ViT student of ``--recipe`` (default ``recipes/fashion_mnist_vit197.yaml``, DeiT-Ti's
197 tokens) is distilled (kept in ``benchmarks/tome_runs/<recipe name>``, resumed if killed), and the
same student trained with merging at ``--trained-r`` (``student.tome_r``, ToMe §4; from the same
teacher, in ``<recipe name>_tome<r>``); each is exported with
``edgekd export --tome-sweep`` for the exact and the LSH matcher, and every file is scored on the
test set (``export.json``); the bucketed LSH matcher, which has no TFLite form, is scored in
PyTorch and timed in PyTorch and onnxruntime. Then for each r and matcher: host latency (batch 1,
median of interleaved runs) in PyTorch eager, onnxruntime, LiteRT fp32 and LiteRT int8 at 1 and 2
threads; and the time of the matching step alone (exact cosine, LSH codes, bucketed) against the
whole forward pass. The MobileNetV2 student and the teacher of
the main job (``runs/quick``, made with ``edgekd run recipes/fashion_mnist_quick.yaml --out
runs/quick`` if missing) and the ViT run's CNN teacher are the reference points.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import litert_invoke, ort_invoke, time_round_robin  # noqa: E402

from edgekd.checkpoint import load_checkpoint, write_json, write_text  # noqa: E402
from edgekd.distill.stage import distill  # noqa: E402
from edgekd.models import build_from_checkpoint  # noqa: E402
from edgekd.export import export  # noqa: E402
from edgekd.recipe import load_recipe  # noqa: E402
from edgekd.tome import MATCHERS, apply_tome, bipartite_soft_matching, merge_wavg  # noqa: E402
from edgekd.tome.merge import BUCKET_SIZE  # noqa: E402
from edgekd.tome.patch import lsh_planes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def ensure_run(recipe_path: Path, run_dir: Path, overrides: dict | None = None) -> None:
    if not (run_dir / "metrics.json").is_file():
        distill(load_recipe(recipe_path, overrides), run_dir, resume=run_dir.exists())


class Row(NamedTuple):
    """One model of the tables: a student at one r and matcher, its files and its r = 0 row."""

    label: str
    r: int
    matcher: str  # exact, lsh, bucketed; "none" at r = 0
    stem: str  # artifact stem in export_dir
    export_dir: Path
    base: str  # the label of the same student at r = 0
    student: str  # which student: "off the shelf" or "trained at r=R"


def tome_stem(r: int, matcher: str, own_r: int = 0) -> str:
    """The file stem ``edgekd export`` writes for r and matcher: the student's own setting (r = 0,
    or the r it was trained with, exact) is ``student``."""
    if r == own_r and matcher in ("exact", "none"):
        return "student"
    return f"student-tome-r{r}-{matcher if r else 'none'}"


def ensure_export(run_dir: Path, sweep: tuple[int, ...], bits: int, own_r: int = 0,
                  matchers: tuple[str, ...] = ("exact", "lsh")) -> dict:
    report_path = run_dir / "export" / "export.json"
    want = {f"{tome_stem(r, m, own_r)}_int8.tflite" for r in sweep for m in matchers if r or m == "exact"}
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        if want <= set(report["artifacts"]) and all(
                a.get("tome", {}).get("bits", bits) == bits for a in report["artifacts"].values()):
            return report
    return export(run_dir, int8=True, tome_r=sweep, tome_matchers=matchers, tome_bits=bits).report


def torch_invoke(model: torch.nn.Module, x: torch.Tensor):
    def call() -> None:
        with torch.inference_mode():
            model(x)

    return call


@functools.lru_cache(maxsize=None)
def test_set(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's test images (normalised) and labels, as ``edgekd export`` scores them; read once."""
    from edgekd.data import gather, load_dataset
    from edgekd.recipe import recipe_from_dict
    from edgekd.train import prepare_batch

    ckpt = load_checkpoint(run_dir / "student_best.pt")
    recipe = recipe_from_dict(ckpt["recipe"])
    images, labels = gather(load_dataset(recipe.data, recipe.seed).test)
    return prepare_batch(images, torch.tensor(ckpt["mean"]), torch.tensor(ckpt["std"])), labels


def torch_top1(model: torch.nn.Module, run_dir: Path) -> float:
    """Test top-1 % of ``model`` in PyTorch on the test images that ``edgekd export`` scores."""
    x, labels = test_set(run_dir)
    with torch.inference_mode():
        pred = torch.cat([model.eval()(b).argmax(1) for b in x.split(256)])
    return 100.0 * float((pred == labels).float().mean())


def distill_minutes(run_dir: Path) -> float:
    """Wall minutes of the run's distillation (teacher and student epochs, from log.csv)."""
    import csv

    with open(run_dir / "log.csv", newline="") as f:
        return sum(float(row["wall_s"]) for row in csv.DictReader(f)) / 60


def matching_ms(tokens: int, dim: int, head_dim: int, r: int, bits: int, runs: int = 2000) -> dict[str, float]:
    """Median ms of one block's match + merge on batch 1 (keys of ``head_dim``, tokens of ``dim``)."""
    torch.manual_seed(0)
    metric, x = torch.randn(1, tokens, head_dim), torch.randn(1, tokens, dim)
    planes = lsh_planes(head_dim, bits)
    out = {}
    for matcher in MATCHERS:
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


def eager_throughput(vit: torch.nn.Module, images: torch.Tensor, sweep: tuple[int, ...], runs: int) -> dict[str, float]:
    """Images per second of PyTorch eager (1 thread) at r in ``sweep`` (exact matcher) on one batch, interleaved:
    ToMe's own measure (its paper reports throughput at batch 256); batch 1 is the latency table's."""
    calls = {}
    for r in sweep:
        model = copy.deepcopy(vit)
        if r:
            apply_tome(model, r, "exact")
        calls[str(r)] = torch_invoke(model, images)
    print(f"timing PyTorch eager at batch {len(images)}...", flush=True)
    return {r: 1000 * len(images) / ms for r, ms in time_round_robin(calls, runs=runs, warmup=3).items()}


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
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "fashion_mnist_vit197.yaml"))
    ap.add_argument("--reference", default=str(REPO / "runs" / "quick"), help="MobileNetV2 run dir (main job)")
    ap.add_argument("--sweep", default="0,8,16")
    ap.add_argument("--bits", type=int, default=16, help="LSH code bits")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--batches", default="8,32", help="batch sizes of the PyTorch eager throughput table ('' for none)")
    ap.add_argument("--trained-r", type=int, default=8,
                    help="also the student trained with merging at this r (student.tome_r), same teacher; 0: none")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "tome"))
    args = ap.parse_args()
    sweep = tuple(int(v) for v in args.sweep.split(","))
    out = Path(args.out)
    t_start = time.perf_counter()
    # tome_runs/vit (recipes/fashion_mnist_vit.yaml), tome_runs/vit197, ...
    run_dir = REPO / "benchmarks" / "tome_runs" / Path(args.recipe).stem.removeprefix("fashion_mnist_")
    ensure_run(Path(args.recipe), run_dir)
    report = ensure_export(run_dir, sweep, args.bits)
    trained_dir = run_dir.with_name(f"{run_dir.name}_tome{args.trained_r}") if args.trained_r else None
    if trained_dir:  # ToMe §4: trained with merging, it loses less when merging; the teacher is shared
        ensure_run(Path(args.recipe), trained_dir, {"student.tome_r": args.trained_r,
                                                    "teacher.checkpoint": str(run_dir / "teacher_best.pt")})
        # exact only: its rows are (and its r = 16 LSH ONNX file failed the ToMe parity rule, 98.83 %
        # top-1 agreement with PyTorch on 256 images against 99 %)
        trained_report = ensure_export(trained_dir, sweep, args.bits, own_r=args.trained_r, matchers=("exact",))
    ref = Path(args.reference)
    if not (ref / "export" / "student_int8.tflite").is_file():
        from edgekd.pipeline import run as run_pipeline

        run_pipeline(load_recipe(REPO / "recipes" / "fashion_mnist_quick.yaml"), ref)
    ref_report = json.loads((ref / "export" / "export.json").read_text())
    export_dir = run_dir / "export"

    ckpt = load_checkpoint(run_dir / "student_best.pt")
    vit = build_from_checkpoint(ckpt, run_dir / "student_best.pt").eval()
    if trained_dir:  # its own merging is off (apply_tome sets every r below)
        trained = apply_tome(build_from_checkpoint(load_checkpoint(trained_dir / "student_best.pt"),
                                                   trained_dir / "student_best.pt").eval(), 0)
    samples = np.load(export_dir / "samples.npz")
    mean, std = ckpt["mean"][0], ckpt["std"][0]
    x1 = torch.from_numpy((samples["images"][:1].astype(np.float32) / 255 - mean) / std)
    kw = ckpt["model_kwargs"]
    tokens = (ckpt["image_size"] // kw["patch_size"]) ** 2 + 1
    head_dim = kw["embed_dim"] // kw["num_heads"]

    # the bucketed matcher has ONNX files only (its sort lowers to an int64 comparator TFLite
    # refuses), written here and scored in PyTorch; the trained-with-merging student, exact only
    rows = []
    for r in sweep:
        for m in MATCHERS:
            if r == 0 and m != "exact":
                continue
            stem = tome_stem(r, m)
            rows.append(Row(f"ViT r={r}" + (f" {m}" if r else ""), r, m if r else "none", stem, export_dir, "ViT r=0",
                            "off the shelf"))
    if trained_dir:
        name = f"ViT trained at r={args.trained_r}"
        rows += [Row(f"{name}, r={r}" + (" exact" if r else ""), r, "exact" if r else "none",
                     tome_stem(r, "exact", args.trained_r), trained_dir / "export", f"{name}, r=0",
                     f"trained at r={args.trained_r}") for r in sweep]
    bucketed_top1 = {}
    for label, r, m, stem, *_ in rows:
        if m == "bucketed":
            model = apply_tome(copy.deepcopy(vit), r, m, args.bits)
            bucketed_top1[label] = torch_top1(model, run_dir)
            if not (export_dir / f"{stem}.onnx").is_file():
                from edgekd.export import export_onnx

                export_onnx(model, x1, export_dir / f"{stem}.onnx")
    threads = [int(t) for t in args.threads.split(",")]
    latency: dict[str, dict[str, float]] = {}
    for th in threads:
        torch.set_num_threads(th)
        calls = {}
        for label, r, m, stem, files, *_ in rows:
            model = copy.deepcopy(vit if files == export_dir else trained)
            if r:
                apply_tome(model, r, m, args.bits)
            calls[f"{label}|torch"] = torch_invoke(model, x1)
            calls[f"{label}|ort"] = ort_invoke(files / f"{stem}.onnx", th)
            if m != "bucketed":
                calls[f"{label}|fp32"] = litert_invoke(files / f"{stem}_fp32.tflite", th)
                calls[f"{label}|int8"] = litert_invoke(files / f"{stem}_int8.tflite", th)
        calls["MobileNetV2 student|int8"] = litert_invoke(ref / "export" / "student_int8.tflite", th)
        calls["MobileNetV2 student|fp32"] = litert_invoke(ref / "export" / "student_fp32.tflite", th)
        if (ref / "export" / "teacher_fp32.tflite").is_file():  # a students.py run dir has no teacher file
            calls["ResNet-18 teacher (main job)|fp32"] = litert_invoke(ref / "export" / "teacher_fp32.tflite", th)
        calls["CNN teacher (ViT run)|fp32"] = litert_invoke(export_dir / "teacher_fp32.tflite", th)
        print(f"timing {len(calls)} model/runtime pairs at {th} thread(s)...", flush=True)
        for k, v in time_round_robin(calls, runs=args.runs, warmup=20).items():
            latency.setdefault(k, {})[str(th)] = v

    arts = report["artifacts"]
    top1 = {}
    for label, r, m, stem, files, *_ in rows:
        if m == "bucketed":
            top1[label] = {"torch": bucketed_top1[label]}
            continue
        a = arts if files == export_dir else trained_report["artifacts"]
        top1[label] = {"fp32": a[f"{stem}_fp32.tflite"]["test_top1"],
                       "int8": a[f"{stem}_int8.tflite"]["test_top1"], "torch": a[f"{stem}.onnx"]["test_top1"]}
    ra = ref_report["artifacts"]
    top1["MobileNetV2 student"] = {"fp32": ra["student_fp32.tflite"]["test_top1"],
                                   "int8": ra["student_int8.tflite"]["test_top1"]}
    if "teacher_fp32.tflite" in ra:
        top1["ResNet-18 teacher (main job)"] = {"fp32": ra["teacher_fp32.tflite"]["test_top1"]}
    top1["CNN teacher (ViT run)"] = {"fp32": arts["teacher_fp32.tflite"]["test_top1"]}

    torch.set_num_threads(1)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    images = torch.from_numpy((samples["images"].astype(np.float32) / 255 - mean) / std)
    throughput = {str(b): eager_throughput(vit, images[:b], sweep, max(10, args.runs // b)) for b in batches}
    match = {r: matching_ms(tokens, kw["embed_dim"], head_dim, r, args.bits) for r in sweep if r}
    scaled = scaling(run_dir, max(50, args.runs // 3))
    data = {"sweep": sweep, "bits": args.bits, "tokens": tokens, "depth": kw["depth"], "embed_dim": kw["embed_dim"],
            "recipe": str(Path(args.recipe).resolve().relative_to(REPO)) if Path(args.recipe).resolve().is_relative_to(
                REPO) else args.recipe, "run_dir": str(run_dir.relative_to(REPO)) if run_dir.is_relative_to(REPO)
            else str(run_dir), "distill_min": distill_minutes(run_dir), "load_1m": os.getloadavg()[0],
            "trained_r": args.trained_r, "trained_distill_min": distill_minutes(trained_dir) if trained_dir else None,
            "bucket_size": BUCKET_SIZE,
            "latency_ms": latency, "top1": top1, "matching_ms": {str(k): v for k, v in match.items()},
            "scaling": scaled, "eager_img_s": throughput,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or ''}".strip(", "),
            "wall_s": time.perf_counter() - t_start, "test_images": arts["student.onnx"]["test_images"]}
    write_json(out.with_suffix(".json"), data)
    write_text(out.with_suffix(".md"), render(data, rows, args, threads, out.name))
    plot(data, rows, threads[0], out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())


def render(data: dict, rows: list, args: argparse.Namespace, threads: list[int], stem: str = "tome") -> str:
    lat, top1 = data["latency_ms"], data["top1"]
    cmd = f"python benchmarks/tome.py --recipe {data['recipe']} --sweep {args.sweep} --bits {args.bits} " \
          f"--threads {args.threads}" + ("" if args.trained_r == 8 else f" --trained-r {args.trained_r}") \
        + ("" if stem == "tome" else f" --out benchmarks/{stem}")
    tokens = data["tokens"]
    lines = [
        "# ToMe on a ViT student: top-1 and host latency", "",
        f"Made by `{cmd}` on {data['machine']} (no GPU, no Pi: host latency; `edgekd bench --device rpi4 "
        f"--tome-sweep ...` measures a board). This run took {data['wall_s'] / 60:.0f} min (1-min load "
        f"{data['load_1m']:.2f} at its end); the distillation it reuses from `{data['run_dir']}` took "
        f"{data['distill_min']:.0f} min.", "",
        f"ViT student: `{data['recipe']}` (timm VisionTransformer, {data['depth']} blocks, width "
        f"{data['embed_dim']}, {tokens} tokens = {tokens - 1} patches + class token), distilled with KD from a small "
        f"CNN; top-1 on {data['test_images']} Fashion-MNIST test images. r = tokens merged per block "
        "(ToMe off the shelf: the student was trained without merging; later blocks clamped to half their tokens "
        f"as the reference does); LSH = {data['bits']}-bit random-hyperplane codes of the keys; bucketed = cosine "
        f"within chunks of {data.get('bucket_size', 32)} tokens of a hash-sorted order (ONNX only: no TFLite form; "
        "its top-1 is PyTorch's). Latency: batch 1, median ms of interleaved runs."
        + (f" *ViT trained at r={data['trained_r']}*: the same student distilled with merging at r = "
           f"{data['trained_r']} in every training step (`student.tome_r`, ToMe §4), from the same teacher "
           f"({data['trained_distill_min']:.0f} min), then exported at each r with the exact matcher "
           "(the same graphs as the off-the-shelf files, other weights)." if data.get("trained_r") else ""), "",
    ]
    head = "| model | top-1 fp32 % | top-1 int8 % |" + "".join(
        f" PyTorch {t}T | ORT {t}T | LiteRT fp32 {t}T | LiteRT int8 {t}T |" for t in threads)
    lines += [head, "|" + "---|" * (3 + 4 * len(threads))]
    fmt = lambda v: f"{v:.3f}" if v is not None else "–"  # noqa: E731
    pct = lambda v: f"{v:.2f}" if v is not None else "–"  # noqa: E731
    for label, *_ in rows:
        t1 = top1[label]
        cells = [pct(t1.get("fp32", t1.get("torch"))), pct(t1.get("int8"))]
        for t in threads:
            cells += [fmt(lat.get(f"{label}|{rt}", {}).get(str(t))) for rt in ("torch", "ort", "fp32", "int8")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for name in (n for n in ("MobileNetV2 student", "ResNet-18 teacher (main job)", "CNN teacher (ViT run)")
                 if n in top1):
        cells = [pct(top1[name]["fp32"]), pct(top1[name].get("int8"))]
        for t in threads:
            cells += ["–", "–", fmt(lat.get(f"{name}|fp32", {}).get(str(t))),
                      fmt(lat.get(f"{name}|int8", {}).get(str(t)))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    t0 = str(threads[0])

    def speedup(label: str, base: str, rt: str) -> str:
        ms = lat.get(f"{label}|{rt}", {}).get(t0)
        return f"{lat[f'{base}|{rt}'][t0] / ms:.2f}×" if ms else "–"

    def top1_change(label: str, base: str, m: str) -> str:
        key = "int8" if m != "bucketed" else "torch"
        return f"{top1[label][key] - top1[base].get(key, top1[base]['fp32']):+.2f}"

    lines += ["", f"Speed-up over the same student at r = 0 at {threads[0]} thread, top-1 change, and the matching "
              "step (one block, batch 1, PyTorch, 1 thread; match = scores + argmax + sort, merge = the row selects "
              "and adds):", "",
              "| student | r | matcher | LiteRT int8 speed-up | ORT speed-up | PyTorch speed-up | Δ top-1 int8 (PyTorch "
              "for bucketed) vs its r = 0, pt | vs the off-the-shelf r = 0, pt | match ms | match + merge ms | "
              "match share of a PyTorch forward |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r, m, _, _, base, student in rows:
        if not r:
            continue
        mm = data["matching_ms"][str(r)]
        fwd = lat[f"{label}|torch"].get("1")
        share = f"{100 * data['depth'] * mm[m] / fwd:.1f} %" if fwd else "–"
        lines.append(f"| {student} | {r} | {m} | {speedup(label, base, 'int8')} | {speedup(label, base, 'ort')} | "
                     f"{speedup(label, base, 'torch')} | {top1_change(label, base, m)} | "
                     f"{top1_change(label, 'ViT r=0', m)} | {mm[m]:.4f} | {mm[m + '_with_merge']:.4f} | {share} |")
    if data.get("eager_img_s"):
        sweep = list(next(iter(data["eager_img_s"].values())))
        lines += ["", "PyTorch eager throughput, images/s (1 thread, exact matcher, one batch of test images "
                  "timed over and over, interleaved), and the speed-up over r = 0:", "",
                  "| batch | " + " | ".join(f"r = {r}" for r in sweep) + " |", "|---|" + "---|" * len(sweep)]
        for b, per_r in data["eager_img_s"].items():
            lines.append(f"| {b} | " + " | ".join(
                f"{v:.0f}" + ("" if r == sweep[0] else f" ({v / per_r[sweep[0]]:.2f}×)") for r, v in per_r.items()) + " |")
    lines += ["", "Where merging starts to pay: the same ViT family, larger and untrained (latency does not "
              "depend on the weights), exact ToMe at r = 0, half the largest uniform r and the largest; batch 1, "
              "1 thread, median ms:", "",
              "| model | tokens | blocks × width | r | tokens after the last block | PyTorch ms | speed-up | "
              "onnxruntime ms | speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    for row in data["scaling"]:
        lines.append(f"| {row['model']} | {row['tokens']} | {row['depth']} × {row['width']} | {row['r']} | "
                     f"{row['tokens_last']} | {row['torch_ms']:.3f} | {row['torch_speedup']:.2f}× | "
                     f"{row['ort_ms']:.3f} | {row['ort_speedup']:.2f}× |")
    lines += ["", f"![top-1 vs latency]({stem}.png)", ""]
    return "\n".join(lines)


def plot(data: dict, rows: list, threads: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgekd.checkpoint import atomic_path

    lat, top1 = data["latency_ms"], data["top1"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    trained = f"ViT trained at r={data.get('trained_r')}, r=0"
    for m, marker, base in (("exact", "o", "ViT r=0"), ("lsh", "s", "ViT r=0"), ("exact", "P", trained)):
        for rt, style in (("fp32", "-"), ("int8", "--")):  # bucketed has no LiteRT file
            pts = [(lat[f"{row.label}|{rt}"][str(threads)], top1[row.label][rt], row.r) for row in rows
                   if row.base == base and row.matcher in (m, "none")]
            if pts:
                student = next(row.student for row in rows if row.base == base)
                name = f"ViT {m}" if student == "off the shelf" else f"ViT {student}"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=marker, label=f"{name} {rt}")
            for x, y, r in pts:
                ax.annotate(f"r={r}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for name, rt, marker in (("MobileNetV2 student", "int8", "^"), ("MobileNetV2 student", "fp32", "v"),
                             ("CNN teacher (ViT run)", "fp32", "D"), ("ResNet-18 teacher (main job)", "fp32", "*")):
        if name not in top1:
            continue
        ax.scatter([lat[f"{name}|{rt}"][str(threads)]], [top1[name][rt]], marker=marker, s=60, label=f"{name} {rt}")
    ax.set_xscale("log")
    ax.set_xlabel(f"LiteRT latency, ms (batch 1, {threads} thread, log scale)")
    ax.set_ylabel("test top-1 %")
    ax.set_title(f"ToMe on a ViT of {data['tokens']} tokens: accuracy vs latency")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
