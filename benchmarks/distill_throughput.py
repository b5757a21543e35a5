"""Training throughput (img/s) of teacher training, the KD step and the AT-KD step.

    python benchmarks/distill_throughput.py                      # ResNet-50 -> MobileNetV2, 32 px
    python benchmarks/distill_throughput.py --teacher resnet18 --teacher-width 16 --width-mult 0.35 --size 28

It times the same code the trainer runs (``edgekd.train.train_one_epoch`` over a ``Distiller``)
on real Fashion-MNIST images held on the device, after warm-up steps, and prints one line per
step kind. Target on one H100 at 32 px, ResNet-50 -> MobileNetV2: AT-KD >= 40,000 img/s.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from edgekd.data import TensorSplit, load_dataset
from edgekd.distiller import Distiller
from edgekd.losses.methods import METHODS
from edgekd.distill.context import resolve_device
from edgekd.models import build_model, pair_stages, stage_shapes, tap_candidates
from edgekd.recipe import AugmentConfig, DataConfig, DistillConfig, TrainConfig
from edgekd.train import autocast, make_optimizer, make_scheduler, prepare_batch, train_one_epoch


def _teacher_forward(teacher: torch.nn.Module, x: torch.Tensor, bs: int, device: torch.device, repeats: int) -> float:
    """img/s of the frozen teacher's forward pass alone: the ceiling of any KD step."""
    teacher.eval()
    with torch.no_grad(), autocast(device):
        for _ in range(3):
            teacher(x[:bs])
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(repeats):
            start = (i * bs) % max(1, len(x) - bs + 1)
            teacher(x[start:start + bs])
        if device.type == "cuda":
            torch.cuda.synchronize()
    return repeats * bs / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--teacher", default="resnet50")
    ap.add_argument("--teacher-width", type=int, default=64)
    ap.add_argument("--width-mult", type=float, default=1.0)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch-sizes", default=None, help="comma-separated; default: 512,1024,2048 on CUDA, 128 on CPU")
    ap.add_argument("--batch-size", type=int, default=None, help="one batch size (same as --batch-sizes N)")
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile'd step (train.compile)")
    ap.add_argument("--kinds", default="teacher_ce,kd,atkd")
    ap.add_argument("--images", type=int, default=None, help="images timed per step kind")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = ap.parse_args()

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    sizes = ([args.batch_size] if args.batch_size else
             [int(b) for b in (args.batch_sizes or ("512,1024,2048" if cuda else "128")).split(",")])
    n_images = args.images or (max(sizes) * 30 if cuda else max(sizes) * 6)
    if cuda:
        torch.backends.cudnn.benchmark = True
    data = load_dataset(DataConfig(image_size=args.size, train_subset=n_images + 3 * max(sizes), test_subset=10,
                                   val_fraction=0.0), seed=0)
    train = data.train.to(device) if isinstance(data.train, TensorSplit) else data.train
    mean, std = torch.tensor(data.mean, device=device), torch.tensor(data.std, device=device)
    x_all = prepare_batch(train.x[:n_images], mean, std)
    results = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
               "teacher": args.teacher, "student": f"mobilenet_v2 x{args.width_mult}", "size": args.size,
               "images": n_images, "rows": []}
    modes = ["eager", "compiled"] if args.compile else ["eager"]
    for bs in sizes:
        warm = TensorSplit(train.x[: 3 * bs], train.y[: 3 * bs])
        timed = TensorSplit(train.x[:n_images], train.y[:n_images])
        for mode in modes:
            torch.manual_seed(0)
            teacher = build_model(args.teacher, 10, 1, args.size, width=args.teacher_width).to(device)
            student = build_model("mobilenet_v2", 10, 1, args.size, width_mult=args.width_mult).to(device)
            if cuda:
                teacher, student = (m.to(memory_format=torch.channels_last) for m in (teacher, student))
            pairs = pair_stages(stage_shapes(teacher, tap_candidates(args.teacher, teacher), 1, args.size),
                                stage_shapes(student, tap_candidates("mobilenet_v2", student), 1, args.size))
            cfg, tcfg = DistillConfig(), TrainConfig(batch_size=bs)
            row = {"batch_size": bs, "mode": mode}
            for kind in args.kinds.split(","):
                method = "ce" if kind == "teacher_ce" else kind
                model = teacher if kind == "teacher_ce" else student
                distiller = Distiller(model, METHODS[method], cfg, teacher=teacher if method != "ce" else None,
                                      pairs=pairs)
                step = torch.compile(distiller) if mode == "compiled" else distiller
                opt = make_optimizer(distiller.trainable_parameters(), tcfg, 0.01)
                sched = make_scheduler(opt, tcfg, 0.01, 10_000)
                kw = dict(mean=mean, std=std, aug=AugmentConfig(), batch_size=bs, device=device)
                t0 = time.perf_counter()
                train_one_epoch(step, warm, opt, sched, seed=0, **kw)  # compiles here
                row[f"{kind}_warmup_s"] = round(time.perf_counter() - t0, 1)
                row[f"{kind}_img_per_s"] = round(train_one_epoch(step, timed, opt, sched, seed=1, **kw)["img_per_s"], 1)
                distiller.remove_taps()
                if kind == "teacher_ce":
                    teacher.eval().requires_grad_(False)
            row["teacher_forward_img_per_s"] = round(
                _teacher_forward(teacher, x_all, bs, device, max(3, n_images // bs)), 1)
            results["rows"].append(row)
            if not args.json:
                print(f"batch {bs:5d} {mode:8s} " + "  ".join(
                    f"{k} {row[f'{k}_img_per_s']:>9,.0f}" for k in args.kinds.split(",")) +
                    f"  teacher forward {row['teacher_forward_img_per_s']:>9,.0f} img/s", flush=True)
    if args.json:
        print(json.dumps(results))
        return
    print(f"device: {results['device']}  teacher {args.teacher} -> mobilenet_v2 x{args.width_mult}  {args.size}px")
    for row in results["rows"]:
        if "atkd_img_per_s" in row:
            print(f"batch {row['batch_size']} {row['mode']}: AT-KD at "
                  f"{row['atkd_img_per_s'] / row['teacher_forward_img_per_s']:.0%} of the teacher-forward ceiling")


if __name__ == "__main__":
    main()
