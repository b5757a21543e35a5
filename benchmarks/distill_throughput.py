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

import torch

from edgekd.data import TensorSplit, load_dataset
from edgekd.distill.distiller import Distiller
from edgekd.distill.methods import METHODS
from edgekd.distill.stage import resolve_device
from edgekd.models import build_model, pair_stages, stage_shapes, tap_candidates
from edgekd.recipe import AugmentConfig, DataConfig, DistillConfig, TrainConfig
from edgekd.train import make_optimizer, make_scheduler, train_one_epoch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--teacher", default="resnet50")
    ap.add_argument("--teacher-width", type=int, default=64)
    ap.add_argument("--width-mult", type=float, default=1.0)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=None, help="default: 512 on CUDA, 128 on CPU")
    ap.add_argument("--images", type=int, default=None, help="images timed per step kind")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = ap.parse_args()

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    bs = args.batch_size or (512 if cuda else 128)
    n_images = args.images or (bs * 60 if cuda else bs * 6)
    if cuda:
        torch.backends.cudnn.benchmark = True
    data = load_dataset(DataConfig(image_size=args.size, train_subset=max(n_images + bs, 2 * bs), test_subset=10,
                                   val_fraction=0.0), seed=0)
    train = data.train.to(device) if isinstance(data.train, TensorSplit) else data.train
    mean, std = torch.tensor(data.mean, device=device), torch.tensor(data.std, device=device)
    warm = TensorSplit(train.x[: 3 * bs], train.y[: 3 * bs])
    timed = TensorSplit(train.x[:n_images], train.y[:n_images])

    teacher = build_model(args.teacher, 10, 1, args.size, width=args.teacher_width).to(device)
    student = build_model("mobilenet_v2", 10, 1, args.size, width_mult=args.width_mult).to(device)
    if cuda:
        teacher, student = (m.to(memory_format=torch.channels_last) for m in (teacher, student))
    pairs = pair_stages(stage_shapes(teacher, tap_candidates(args.teacher, teacher), 1, args.size),
                        stage_shapes(student, tap_candidates("mobilenet_v2", student), 1, args.size))
    cfg, tcfg = DistillConfig(), TrainConfig(batch_size=bs)
    results = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
               "teacher": args.teacher, "size": args.size, "batch_size": bs}
    for kind, model, method in (("teacher_ce", teacher, "ce"), ("kd", student, "kd"), ("atkd", student, "atkd")):
        distiller = Distiller(model, METHODS[method], cfg, teacher=teacher if method != "ce" else None, pairs=pairs)
        opt = make_optimizer(distiller.trainable_parameters(), tcfg, 0.01)
        sched = make_scheduler(opt, tcfg, 0.01, 10_000)
        kw = dict(mean=mean, std=std, aug=AugmentConfig(), batch_size=bs, device=device)
        train_one_epoch(distiller, warm, opt, sched, seed=0, **kw)
        out = train_one_epoch(distiller, timed, opt, sched, seed=1, **kw)
        distiller.remove_taps()
        if method == "ce":
            teacher.eval().requires_grad_(False)
        results[f"{kind}_img_per_s"] = round(out["img_per_s"], 1)
    if args.json:
        print(json.dumps(results))
        return
    print(f"device: {results['device']}  teacher {args.teacher} -> mobilenet_v2 x{args.width_mult}  "
          f"{args.size}px  batch {bs}")
    for kind in ("teacher_ce", "kd", "atkd"):
        print(f"{kind:11s} {results[f'{kind}_img_per_s']:>10,.0f} img/s")


if __name__ == "__main__":
    main()
