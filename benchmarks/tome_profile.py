"""Where a ToMe block spends its time in PyTorch eager, and what the matching step could ever save.

    python benchmarks/tome_profile.py            # tome_profile.md / .json (run it on a quiet machine)

Untrained ViTs (latency does not depend on the weights), batch 1, 1 thread, every call timed in one
interleaved round robin so a noisy neighbour hits all alike. For each shape and token count:
one whole forward at r = 0, 8 and 16; one block (its second, which already carries token sizes)
at r = 0 and r = 8; and the parts ToMe adds to that block: the matching step (exact cosine and
LSH codes) and the merge. The matching step's share of a block bounds what any faster matcher
(hashing, bucketed or not) can save: it cannot remove more than the whole step.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import time_round_robin  # noqa: E402

from edgekd.checkpoint import write_json, write_text  # noqa: E402
from edgekd.models import build_model  # noqa: E402
from edgekd.tome import apply_tome, bipartite_soft_matching, check_r, merge_wavg  # noqa: E402
from edgekd.tome.patch import lsh_planes  # noqa: E402

# (label, px, patch, width, depth, heads): a student-sized ViT and DeiT-Ti's shape, at 197 and 785 tokens
SHAPES = (("ViT 6×96", 56, 4, 96, 6, 3), ("DeiT-Ti shape", 56, 4, 192, 12, 3),
          ("ViT 6×96, 112 px", 112, 4, 96, 6, 3), ("DeiT-Ti shape, 112 px", 112, 4, 192, 12, 3))


def profile_shape(label: str, px: int, patch: int, width: int, depth: int, heads: int, runs: int,
                  bits: int) -> dict:
    torch.manual_seed(0)
    plain = build_model("vit", 10, 1, px, embed_dim=width, depth=depth, num_heads=heads, patch_size=patch).eval()
    tokens = (px // patch) ** 2 + 1
    x = torch.randn(1, 1, px, px)
    models = {r: apply_tome(copy.deepcopy(plain), r) for r in (0, 8, 16)}
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
              "merge": call(lambda: merge_wavg(merge, h, size))}
    t = time_round_robin(calls, runs=runs, warmup=10)
    return {"shape": label, "tokens": tokens, "width": width, "depth": depth, "ms": t,
            "schedule_r16": check_r(16, tokens, depth),
            "match_share": t["match exact"] / t["block r=0"], "merge_share": t["merge"] / t["block r=0"],
            "speedup_r8": t["forward r=0"] / t["forward r=8"], "speedup_r16": t["forward r=0"] / t["forward r=16"]}


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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--bits", type=int, default=16)
    ap.add_argument("--shapes", default=",".join(str(i) for i in range(len(SHAPES))), help="indices into SHAPES")
    ap.add_argument("--out", default="benchmarks/tome_profile")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    rows = []
    for i in (int(v) for v in args.shapes.split(",")):
        rows.append(profile_shape(*SHAPES[i], runs=args.runs, bits=args.bits))
        print(f"{SHAPES[i][0]}: {rows[-1]['ms']}", flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").is_file() else "unknown CPU"
    meta = {"runs": args.runs, "load_before": load_before, "load_after": os.getloadavg()[0], "cpu": cpu}
    write_json(Path(f"{args.out}.json"), {"meta": meta, "rows": rows})
    write_text(Path(f"{args.out}.md"), render(rows, meta))
    print(Path(f"{args.out}.md").read_text())


if __name__ == "__main__":
    main()
