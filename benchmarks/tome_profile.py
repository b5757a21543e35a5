"""Where a ToMe block spends its time in PyTorch eager, and what the matching step could ever save.

    python benchmarks/tome_profile.py              # tome_profile.md / .json (run it on a quiet machine)
    python benchmarks/tome_profile.py --exported   # + the exported files at 197 tokens (~8 min more)
    python benchmarks/tome_profile.py --ceiling benchmarks/tome_runs/vit197   # + what merging costs in LiteRT int8

Untrained ViTs (latency does not depend on the weights), batch 1, 1 thread, every call timed in one
interleaved round robin so a noisy neighbour hits all alike. For each shape and token count:
one whole forward at r = 0, 8 and 16; one block (its second, which already carries token sizes)
at r = 0 and r = 8; and the parts ToMe adds to that block: the matching step (exact cosine, LSH
codes, and bucketed LSH: cosine within hash buckets) and the merge. The matching step's share of a
block bounds what any faster matcher (hashing, bucketed or not) can save: it cannot remove more
than the whole step.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import time_round_robin  # noqa: E402

from edgekd.checkpoint import write_json, write_text  # noqa: E402
from edgekd.models import build_model  # noqa: E402
from edgekd.tome import apply_tome, bipartite_soft_matching, check_r, merge_wavg  # noqa: E402
from edgekd.tome.merge import BUCKET_SIZE  # noqa: E402
from edgekd.tome.patch import lsh_planes  # noqa: E402

# (label, px, patch, width, depth, heads): a student-sized ViT and DeiT-Ti's shape, at 197 and 785 tokens
SHAPES = (("ViT 6×96", 56, 4, 96, 6, 3), ("ViT 12×96 (vit197 recipe)", 56, 4, 96, 12, 3),
          ("DeiT-Ti shape", 56, 4, 192, 12, 3),
          ("ViT 6×96, 112 px", 112, 4, 96, 6, 3), ("DeiT-Ti shape, 112 px", 112, 4, 192, 12, 3))


def profile_shape(label: str, px: int, patch: int, width: int, depth: int, heads: int, runs: int,
                  bits: int) -> dict:
    torch.manual_seed(0)
    plain = build_model("vit", 10, 1, px, embed_dim=width, depth=depth, num_heads=heads, patch_size=patch).eval()
    tokens = (px // patch) ** 2 + 1
    x = torch.randn(1, 1, px, px)
    models = {r: apply_tome(copy.deepcopy(plain), r) for r in (0, 8, 16)}
    bucketed = apply_tome(copy.deepcopy(plain), 8, "bucketed", bits=bits)
    h = torch.randn(1, tokens, width)
    size = torch.randint(1, 3, (1, tokens, 1)).float()
    metric = torch.randn(1, tokens, width // heads)
    planes = lsh_planes(width // heads, bits)
    merge = bipartite_soft_matching(metric, 8)
    block0, block8 = models[0].blocks[1], models[8].blocks[1]

    def call(fn):
        def run() -> None:
            with torch.inference_mode():
                fn()
        return run

    calls = {f"forward r={r}": call(lambda m=m: m(x)) for r, m in models.items()}
    calls |= {"block r=0": call(lambda: block0(h)), "block r=8": call(lambda: block8(h, size)),
              "match exact": call(lambda: bipartite_soft_matching(metric, 8)),
              "match lsh": call(lambda: bipartite_soft_matching(metric, 8, matcher="lsh", planes=planes)),
              "match bucketed": call(lambda: bipartite_soft_matching(metric, 8, matcher="bucketed", planes=planes)),
              "forward r=8 bucketed": call(lambda: bucketed(x)),
              "merge": call(lambda: merge_wavg(merge, h, size))}
    t = time_round_robin(calls, runs=runs, warmup=10)
    t_a, d = (tokens + 1) // 2, width // heads
    return {"shape": label, "tokens": tokens, "width": width, "depth": depth, "ms": t,
            # multiply-adds of the scores: all A × B pairs, or each token against its chunk (padded)
            "score_macs": {"exact": t_a * (tokens // 2) * d,
                           "bucketed": -(-tokens // BUCKET_SIZE) * BUCKET_SIZE ** 2 * d},
            "schedule_r16": check_r(16, tokens, depth),
            "match_share": t["match exact"] / t["block r=0"], "merge_share": t["merge"] / t["block r=0"],
            "speedup_r8": t["forward r=0"] / t["forward r=8"], "speedup_r16": t["forward r=0"] / t["forward r=16"]}


def exported_files(work: Path, sweep: tuple[int, ...]) -> Path:
    """The export dir of the 197-token ViT of ``recipes/fashion_mnist_vit197.yaml`` (12 × 96 at
    56 px) distilled for one epoch on 1,200 images: only a file to time and dissect (latency does
    not depend on the weights)."""
    from edgekd.distill.stage import distill
    from edgekd.export import export
    from edgekd.recipe import load_recipe

    run = work / "vit197_12x96_1epoch"
    if not (run / "metrics.json").is_file():
        recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "fashion_mnist_vit197.yaml", {
            "data.train_subset": 1200, "data.test_subset": 500, "teacher.epochs": 1, "student.epochs": 1})
        distill(recipe, run, resume=run.exists())
    if not all((run / "export" / f"student-tome-r{r}-exact_int8.tflite").is_file() for r in sweep if r):
        export(run, int8=True, tome_r=sweep, tome_matchers=("exact",))
    return run / "export"


def litert_census(path: Path) -> dict:
    """Op types of a TFLite file once LiteRT has applied XNNPACK, and how many delegate partitions
    it made (each partition boundary hands tensors between XNNPACK and TFLite's own kernels)."""
    import collections

    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    ops = collections.Counter(o["op_name"] for o in it._get_ops_details())
    return {"ops": sum(ops.values()), "partitions": ops.get("DELEGATE", 0), "types": dict(ops.most_common())}


def ort_op_profile(path: Path, runs: int) -> dict[str, float]:
    """Microseconds per run spent in each ONNX op type (onnxruntime's profiler, 1 thread)."""
    import collections
    import json

    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.enable_profiling = 1, True
    so.profile_file_prefix = str(path.parent / f".ort_profile_{path.stem}")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    feed = {inp.name: np.random.default_rng(0).standard_normal(
        [d if isinstance(d, int) else 1 for d in inp.shape]).astype(np.float32)}
    for _ in range(runs):
        sess.run(None, feed)
    trace = Path(sess.end_profiling())
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in json.loads(trace.read_text()):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / runs
    trace.unlink()
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def profile_exported(export_dir: Path, sweep: tuple[int, ...], runs: int) -> list[dict]:
    from latency import litert_invoke, ort_invoke

    stems = {r: "student" if r == 0 else f"student-tome-r{r}-exact" for r in sweep}
    calls = {}
    for r, stem in stems.items():
        calls[f"{r}|int8"] = litert_invoke(export_dir / f"{stem}_int8.tflite", 1)
        calls[f"{r}|fp32"] = litert_invoke(export_dir / f"{stem}_fp32.tflite", 1)
        calls[f"{r}|ort"] = ort_invoke(export_dir / f"{stem}.onnx", 1)
    t = time_round_robin(calls, runs=runs, warmup=10)
    rows = []
    for r, stem in stems.items():
        rows.append({"r": r, "litert_int8_ms": t[f"{r}|int8"], "litert_fp32_ms": t[f"{r}|fp32"],
                     "ort_ms": t[f"{r}|ort"],
                     "int8": litert_census(export_dir / f"{stem}_int8.tflite"),
                     "fp32": litert_census(export_dir / f"{stem}_fp32.tflite"),
                     "ort_us_per_op": ort_op_profile(export_dir / f"{stem}.onnx", runs)})
    return rows


class _FixedMatch(torch.nn.Module):
    """A block's matching replaced by the matrices it produced for one image: the merge's cost alone."""

    def __init__(self, matrices: tuple[torch.Tensor, ...]) -> None:
        super().__init__()
        for i, m in enumerate(matrices):
            self.register_buffer(f"m{i}", m, persistent=False)

    def forward(self, *_: object) -> tuple[torch.Tensor, ...]:
        return tuple(b for _, b in self.named_buffers())


class _KeepFirst(torch.nn.Module):
    """In place of the merge: keep the first t − r tokens. ToMe's token counts at no cost at all,
    the ceiling of what any matching and merge could reach."""

    def __init__(self, r: int) -> None:
        super().__init__()
        self.r = r

    def forward(self, *args: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x, size = args[-2], args[-1]
        t = x.shape[1] - self.r
        return x[:, :t], torch.ones_like(x[:, :t, :1]) if size is None else size[:, :t]


def merge_ceiling(run_dir: Path, sweep: tuple[int, ...], runs: int) -> dict:
    """LiteRT int8 files of a ViT student, 1 thread, interleaved: r = 0 and, for each r of the sweep,
    ToMe as exported, ToMe with fixed matrices in place of the matching (what the merge costs) and
    with the first t − r tokens kept in place of matching and merge (what the token counts alone give)."""
    import numpy as np
    from latency import litert_invoke

    import edgekd.tome.patch as tome_patch
    from edgekd.checkpoint import load_checkpoint
    from edgekd.models import build_from_checkpoint
    from edgekd.export import export_tflite_int8

    missing = [p for p in [run_dir / "student_best.pt", run_dir / "export" / "student_int8.tflite"] + [
        run_dir / "export" / f"student-tome-r{r}-exact_int8.tflite" for r in sweep if r] if not p.is_file()]
    if missing:
        raise SystemExit(f"--ceiling needs a distilled ViT run exported with 'edgekd export {run_dir} --int8 "
                         f"--tome-sweep {','.join(map(str, sweep))}': {missing[0]} is missing")
    ckpt = load_checkpoint(run_dir / "student_best.pt")
    samples = np.load(run_dir / "export" / "samples.npz")
    mean, std = torch.tensor(ckpt["mean"]).view(1, -1, 1, 1), torch.tensor(ckpt["std"]).view(1, -1, 1, 1)
    images = (torch.from_numpy(samples["images"][:101]).float() / 255 - mean) / std
    work = run_dir / "ceiling"
    work.mkdir(exist_ok=True)
    files = {"r=0": run_dir / "export" / "student_int8.tflite"}
    for r in (v for v in sweep if v):
        files[f"r={r}"] = run_dir / "export" / f"student-tome-r{r}-exact_int8.tflite"
        for variant in ("fixed matching", "no merge"):
            path = work / f"r{r}-{variant.replace(' ', '-')}_int8.tflite"
            files[f"r={r} {variant}"] = path
            if path.is_file():
                continue
            model = apply_tome(build_from_checkpoint(ckpt, run_dir / "student_best.pt").eval(), r)
            matrices: dict[int, tuple[torch.Tensor, ...]] = {}
            hooks = [b.token_match.register_forward_hook(
                lambda _m, _a, out, i=i: matrices.__setitem__(i, tuple(o.detach() for o in out)))
                for i, b in enumerate(model.blocks) if b.token_match is not None]
            form = tome_patch.default_form
            tome_patch.default_form = lambda *_: "matmul"  # the exported form, run once to record its matrices
            try:
                with torch.no_grad():
                    model(images[:1])
            finally:
                tome_patch.default_form = form
            for h in hooks:
                h.remove()
            for i, block in enumerate(model.blocks):
                if block.token_match is None:
                    continue
                if variant == "fixed matching":
                    block.token_match = _FixedMatch(matrices[i])
                else:
                    block.token_match, block.token_merge = _FixedMatch(()), _KeepFirst(model._tome_info["r"][i])
            export_tflite_int8(model, images[:1], images[1:], path)
    load_before = os.getloadavg()[0]
    ms = time_round_robin({k: litert_invoke(p, 1) for k, p in files.items()}, runs=runs, warmup=10)
    return {"run_dir": str(run_dir), "ms": ms, "load_before": load_before, "load_after": os.getloadavg()[0]}


def render_ceiling(c: dict) -> list[str]:
    ms = c["ms"]
    lines = ["## What merging costs in LiteRT int8, and the most it could give", "",
             f"`python benchmarks/tome_profile.py --ceiling {c['run_dir']}` — the student's int8 files, LiteRT with "
             f"XNNPACK, 1 thread, interleaved; load average {c['load_before']:.2f} before, {c['load_after']:.2f} "
             "after. *Fixed matching*: each block's matching replaced by the 0/1 matrices it produced for one image "
             "(the merge is still done). *No merge*: each block keeps its first t − r tokens: ToMe's token counts "
             "at no cost, the ceiling any matching and merge could reach.", "",
             "| r | as exported ms (vs r=0) | fixed matching ms (vs r=0) | no merge ms (vs r=0) | matching costs ms "
             "| merge costs ms |", "|---:|---:|---:|---:|---:|---:|"]
    rs = sorted({int(k.split()[0][2:]) for k in ms if k != "r=0"})
    for r in rs:
        full, fixed, free = ms[f"r={r}"], ms[f"r={r} fixed matching"], ms[f"r={r} no merge"]
        lines.append(f"| {r} | {full:.2f} ({ms['r=0'] / full:.2f}×) | {fixed:.2f} ({ms['r=0'] / fixed:.2f}×) | "
                     f"{free:.2f} ({ms['r=0'] / free:.2f}×) | {full - fixed:.2f} | {fixed - free:.2f} |")
    return lines + ["", f"r = 0: {ms['r=0']:.2f} ms.", ""]


def render_exported(rows: list[dict]) -> list[str]:
    base = rows[0]
    lines = ["## The exported files at 197 tokens", "",
             "The 12 × 96 ViT of `recipes/fashion_mnist_vit197.yaml` at 56 px (197 tokens), distilled one epoch "
             "only to have a file (its top-1 means "
             "nothing), exported by `edgekd export --int8 --tome-sweep`; LiteRT and onnxruntime, 1 thread, "
             "interleaved. *Partitions*: the XNNPACK delegate partitions LiteRT made; the op types added are "
             "counted over the file's ops beside r = 0's.", "",
             "| r | LiteRT int8 ms (vs r=0) | LiteRT fp32 ms (vs r=0) | onnxruntime ms (vs r=0) | int8 / fp32 "
             "partitions | int8 op types added by merging |", "|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        added = {k: v - base["int8"]["types"].get(k, 0) for k, v in row["int8"]["types"].items()
                 if v > base["int8"]["types"].get(k, 0) and k != "DELEGATE"}
        speed = base["litert_int8_ms"] / row["litert_int8_ms"]
        added_text = ", ".join(f"{k} +{v}" for k, v in sorted(added.items(), key=lambda kv: -kv[1])) or "–"
        lines.append(f"| {row['r']} | {row['litert_int8_ms']:.2f} ({speed:.2f}×) | {row['litert_fp32_ms']:.2f} "
                     f"({base['litert_fp32_ms'] / row['litert_fp32_ms']:.2f}×) | {row['ort_ms']:.2f} "
                     f"({base['ort_ms'] / row['ort_ms']:.2f}×) | {row['int8']['partitions']} / "
                     f"{row['fp32']['partitions']} | {added_text} |")
    lines += ["", "onnxruntime's profiler, µs per run in each op type (top 8):", "",
              "| r | " + " | ".join(f"op {i + 1}" for i in range(8)) + " | all ops µs |", "|---:|" + "---|" * 9]
    for row in rows:
        top = list(row["ort_us_per_op"].items())[:8]
        lines.append(f"| {row['r']} | " + " | ".join(f"{k} {v:.0f}" for k, v in top) +
                     f" | {sum(row['ort_us_per_op'].values()):.0f} |")
    return lines + [""]


def render(rows: list[dict], meta: dict) -> str:
    lines = ["# ToMe in PyTorch eager: where a block's time goes", "",
             f"`python benchmarks/tome_profile.py` — batch 1, 1 thread, median of {meta['runs']} interleaved calls, "
             f"untrained weights; load average {meta['load_before']:.2f} before, {meta['load_after']:.2f} after "
             f"({meta['cpu']}).", "",
             "| model | tokens | forward r=0 ms | r=8 ms (speed-up) | r=16 ms (speed-up) | block r=0 ms | "
             "block r=8 ms | matching exact ms (share of block) | matching LSH ms | merge ms (share) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms = r["ms"]
        lines.append(f"| {r['shape']} | {r['tokens']} | {ms['forward r=0']:.2f} | "
                     f"{ms['forward r=8']:.2f} ({r['speedup_r8']:.2f}×) | {ms['forward r=16']:.2f} "
                     f"({r['speedup_r16']:.2f}×) | {ms['block r=0']:.3f} | {ms['block r=8']:.3f} | "
                     f"{ms['match exact']:.3f} ({100 * r['match_share']:.1f} %) | {ms['match lsh']:.3f} | "
                     f"{ms['merge']:.3f} ({100 * r['merge_share']:.1f} %) |")
    lines += ["", "The matching step (scores, best match per token, top-r) is the most a faster matcher could "
              "remove from a merging block; `block r=8` minus `block r=0` is what merging adds to the block that "
              "merges (the blocks after it then run on fewer tokens).", ""]
    if all("match bucketed" in r["ms"] for r in rows):
        lines += ["### Bucketed LSH against exact matching (same r = 8)", "",
                  f"Bucketed: tokens sorted by an angular-LSH bucket ({meta.get('bits', 16)} hyperplanes, "
                  f"{2 * meta.get('bits', 16)} buckets), cut into chunks of {BUCKET_SIZE}; each A token is scored "
                  "only against the B tokens of its chunk (`edgekd.tome.merge.bucketed_best_match`).", "",
                  "| model | tokens | score multiply-adds exact → bucketed | matching exact ms | matching bucketed ms "
                  "| forward r=8 exact ms | forward r=8 bucketed ms |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            ms, macs = r["ms"], r["score_macs"]
            lines.append(f"| {r['shape']} | {r['tokens']} | {macs['exact'] / 1e6:.2f} M → {macs['bucketed'] / 1e6:.2f} M "
                         f"| {ms['match exact']:.3f} | {ms['match bucketed']:.3f} | {ms['forward r=8']:.2f} | "
                         f"{ms['forward r=8 bucketed']:.2f} |")
        lines.append("")
    if meta.get("exported"):
        lines += render_exported(meta["exported"])
    if meta.get("ceiling"):
        lines += render_ceiling(meta["ceiling"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--bits", type=int, default=16)
    ap.add_argument("--shapes", default=",".join(str(i) for i in range(len(SHAPES))), help="indices into SHAPES")
    ap.add_argument("--exported", action="store_true", help="also distil a 197-token ViT for one epoch, export "
                    "it at --sweep and profile the files (LiteRT op census, onnxruntime per-op times)")
    ap.add_argument("--sweep", default="0,8,16")
    ap.add_argument("--ceiling", type=Path, default=None, metavar="RUN_DIR",
                    help="a ViT run exported with --int8 --tome-sweep: time its int8 files beside the same "
                    "student with fixed matching and with no merge at all (converts 2 files per r)")
    ap.add_argument("--out", default="benchmarks/tome_profile")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    rows = []
    for i in (int(v) for v in args.shapes.split(",") if v):  # --shapes "": keep the eager rows of an earlier run
        rows.append(profile_shape(*SHAPES[i], runs=args.runs, bits=args.bits))
        print(f"{SHAPES[i][0]}: {rows[-1]['ms']}", flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").is_file() else "unknown CPU"
    meta = {"runs": args.runs, "load_before": load_before, "load_after": os.getloadavg()[0], "cpu": cpu,
            "bits": args.bits}
    previous_path = Path(f"{args.out}.json")
    previous = json.loads(previous_path.read_text()) if previous_path.is_file() else None
    if previous and not rows:
        rows, meta = previous["rows"], previous["meta"]
    if previous:  # keep the sections of earlier --exported / --ceiling runs not redone now
        for key in ("exported", "ceiling"):
            meta[key] = previous["meta"].get(key)
    if args.ceiling:
        meta["ceiling"] = merge_ceiling(args.ceiling, tuple(int(v) for v in args.sweep.split(",")), args.runs * 2)
    if args.exported:
        sweep = tuple(int(v) for v in args.sweep.split(","))
        meta["exported"] = profile_exported(exported_files(Path(f"{args.out}_runs"), sweep), sweep, args.runs * 4)
    write_json(Path(f"{args.out}.json"), {"meta": meta, "rows": rows})
    write_text(Path(f"{args.out}.md"), render(rows, meta))
    print(Path(f"{args.out}.md").read_text())


if __name__ == "__main__":
    main()
