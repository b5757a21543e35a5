"""Datasets as ``Split`` objects that yield uint8 batches on the training device.

Small datasets (Fashion-MNIST, CIFAR) live whole in one uint8 tensor, moved to the GPU when
training there; batches are index slices and augmentation happens on the device. ImageFolder
trees stream through a ``DataLoader`` with workers; the same device-side augmentation follows.
Batch order depends only on ``(seed, epoch)``, which is what lets a killed run resume exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch

from edgekd.data.augment import resize_uint8
from edgekd.data.sources import (
    ImageFileDataset,
    imagefolder_dirs,
    list_imagefolder,
    load_cifar,
    load_fashion_mnist,
)
from edgekd.errors import EdgekdError
from edgekd.recipe import DataConfig

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


class Split(Protocol):
    def __len__(self) -> int: ...

    def batches(self, batch_size: int, device: torch.device, seed: int | None = None) -> Iterator[Batch]:
        """uint8 NCHW images and int64 labels on ``device``; shuffled by ``seed`` when given."""
        ...


@dataclass
class TensorSplit:
    x: torch.Tensor  # uint8 N,C,H,W
    y: torch.Tensor  # int64 N

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device) -> "TensorSplit":
        return TensorSplit(self.x.to(device), self.y.to(device))

    def batches(self, batch_size: int, device: torch.device, seed: int | None = None) -> Iterator[Batch]:
        n = len(self.y)
        if seed is None:
            order = None
        else:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(self.x.device)
        # Drop a ragged last training batch: a batch of 1 breaks BatchNorm.
        stop = n - n % batch_size if seed is not None and n >= batch_size else n
        for i in range(0, stop, batch_size):
            idx = slice(i, i + batch_size) if order is None else order[i : i + batch_size]
            yield (
                self.x[idx].to(device, non_blocking=True),
                self.y[idx].to(device, non_blocking=True),
            )


@dataclass
class FileSplit:
    dataset: ImageFileDataset
    indices: list[int]
    num_workers: int = 2

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, batch_size: int, device: torch.device, seed: int | None = None) -> Iterator[Batch]:
        sub = torch.utils.data.Subset(self.dataset, self.indices)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        loader = torch.utils.data.DataLoader(
            sub, batch_size=batch_size, shuffle=seed is not None, generator=gen,
            num_workers=self.num_workers, drop_last=seed is not None and len(sub) >= batch_size,
            pin_memory=device.type == "cuda", persistent_workers=False,
        )
        batches = iter(loader)
        while True:
            try:
                x, y = next(batches)
            except StopIteration:
                return
            except EdgekdError as e:  # from a loader worker, wrapped in its traceback: keep the message
                last = str(e).strip().splitlines()[-1]
                raise EdgekdError(last.split("EdgekdError: ", 1)[-1]) from None
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@dataclass
class DataBundle:
    name: str
    train: Split
    val: Split
    test: Split
    class_names: list[str]
    mean: list[float]
    std: list[float]
    channels: int
    image_size: int
    sizes: dict[str, int] = field(default_factory=dict)
    skipped_unreadable: list[str] = field(default_factory=list)  # files left out (data.skip_unreadable)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to(self, device: torch.device) -> "DataBundle":
        """Move in-memory splits to ``device`` (keep the whole data set on the GPU)."""
        moved = {k: getattr(self, k) for k in ("train", "val", "test")}
        for k, s in moved.items():
            if isinstance(s, TensorSplit):
                moved[k] = s.to(device)
        return DataBundle(self.name, moved["train"], moved["val"], moved["test"], self.class_names,
                          self.mean, self.std, self.channels, self.image_size, self.sizes, self.skipped_unreadable)

    def describe(self) -> dict:
        return {
            "name": self.name, "class_names": self.class_names, "num_classes": self.num_classes,
            "channels": self.channels, "image_size": self.image_size, "mean": self.mean, "std": self.std,
            **{f"n_{k}": v for k, v in self.sizes.items()},
            "unreadable_skipped": len(self.skipped_unreadable), "unreadable_files": self.skipped_unreadable[:100],
        }


def gather(split: Split, limit: int | None = None, seed: int | None = None) -> Batch:
    """The first ``limit`` images of ``split`` (shuffled by ``seed`` when given) as CPU tensors."""
    xs, ys, n = [], [], 0
    for x, y in split.batches(256, torch.device("cpu"), seed=seed):
        xs.append(x)
        ys.append(y)
        n += len(y)
        if limit is not None and n >= limit:
            break
    if not xs:
        return torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    return torch.cat(xs)[:limit], torch.cat(ys)[:limit]


def _seeded_take(n: int, k: int | None, seed: int) -> torch.Tensor:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm if k is None else perm[: min(k, n)]


def _mean_std(x_uint8: torch.Tensor) -> tuple[list[float], list[float]]:
    x = x_uint8[:20000].float().div_(255.0)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


def load_dataset(cfg: DataConfig, seed: int) -> DataBundle:
    """Load a dataset by the recipe, with a seeded train/val split and the official test set."""
    if cfg.dataset == "imagefolder":
        return _load_imagefolder(cfg, seed)
    raw = load_fashion_mnist(cfg.root) if cfg.dataset == "fashion_mnist" else load_cifar(
        cfg.root, 10 if cfg.dataset == "cifar10" else 100
    )
    pool = _seeded_take(len(raw.train_y), cfg.train_subset, seed)
    n_val = int(round(len(pool) * cfg.val_fraction))
    val_idx, train_idx = pool[:n_val], pool[n_val:]
    test_idx = _seeded_take(len(raw.test_y), cfg.test_subset, seed + 1).sort().values
    train_x = resize_uint8(raw.train_x[train_idx], cfg.image_size)
    mean, std = _mean_std(train_x)
    bundle = DataBundle(
        name=cfg.dataset,
        train=TensorSplit(train_x, raw.train_y[train_idx]),
        val=TensorSplit(resize_uint8(raw.train_x[val_idx], cfg.image_size), raw.train_y[val_idx]),
        test=TensorSplit(resize_uint8(raw.test_x[test_idx], cfg.image_size), raw.test_y[test_idx]),
        class_names=raw.class_names, mean=mean, std=std,
        channels=raw.train_x.shape[1], image_size=cfg.image_size,
        sizes={"train": len(train_idx), "val": n_val, "test": len(test_idx)},
    )
    log.info("loaded %s: %s", cfg.dataset, bundle.sizes)
    return bundle


def _load_imagefolder(cfg: DataConfig, seed: int) -> DataBundle:
    train_dir, test_dir = imagefolder_dirs(cfg.root)
    train_items, classes, skipped = list_imagefolder(train_dir, skip_unreadable=cfg.skip_unreadable)
    test_items, _, test_skipped = list_imagefolder(test_dir, classes, skip_unreadable=cfg.skip_unreadable)
    skipped += test_skipped
    if skipped:
        log.warning("skipped %d unreadable image files (data.skip_unreadable), e.g. %s", len(skipped), skipped[0])
    train_ds = ImageFileDataset(train_items, cfg.image_size)
    test_ds = ImageFileDataset(test_items, cfg.image_size)
    pool = _seeded_take(len(train_items), cfg.train_subset, seed).tolist()
    n_val = int(round(len(pool) * cfg.val_fraction))
    test_idx = sorted(_seeded_take(len(test_items), cfg.test_subset, seed + 1).tolist())
    sample = torch.stack([train_ds[i][0] for i in pool[:512]])
    mean, std = _mean_std(sample)
    if len(pool) - n_val < 1:
        raise EdgekdError(f"{train_dir}: too few training images ({len(pool)}) for val_fraction {cfg.val_fraction}")
    return DataBundle(
        name="imagefolder",
        train=FileSplit(train_ds, pool[n_val:], cfg.num_workers),
        val=FileSplit(train_ds, pool[:n_val], cfg.num_workers),
        test=FileSplit(test_ds, test_idx, cfg.num_workers),
        class_names=classes, mean=mean, std=std, channels=3, image_size=cfg.image_size,
        sizes={"train": len(pool) - n_val, "val": n_val, "test": len(test_idx)}, skipped_unreadable=skipped,
    )
