"""Data readers on real Fashion-MNIST and on tiny files in CIFAR's and ImageFolder's formats."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from edgekd.data import TensorSplit, gather, load_dataset
from edgekd.data.augment import augment_batch, shift_batch
from edgekd.data.sources import FASHION_MNIST_CLASSES, load_cifar, read_idx
from edgekd.errors import EdgekdError
from edgekd.recipe import AugmentConfig, DataConfig


@pytest.mark.e2e
def test_fashion_mnist_subsets_are_seeded_and_real():
    cfg = DataConfig(train_subset=300, test_subset=100, val_fraction=0.2, image_size=28)
    a, b = load_dataset(cfg, seed=3), load_dataset(cfg, seed=3)
    assert a.sizes == {"train": 240, "val": 60, "test": 100}
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.val.y, b.val.y)
    assert a.train.x.dtype == torch.uint8 and a.train.x.shape[1:] == (1, 28, 28)
    assert a.class_names == FASHION_MNIST_CLASSES
    assert 0.2 < a.mean[0] < 0.4 and 0.25 < a.std[0] < 0.45  # Fashion-MNIST's known statistics
    c = load_dataset(cfg, seed=4)
    assert not torch.equal(a.train.y, c.train.y)
    # the full official test set when no subset is asked for
    full = load_dataset(DataConfig(train_subset=100, image_size=28), seed=0)
    assert full.sizes["test"] == 10_000


def test_resize_to_recipe_size():
    d = load_dataset(DataConfig(train_subset=50, test_subset=20, image_size=32), seed=0)
    assert d.train.x.shape[-2:] == (32, 32) and d.test.x.shape[-2:] == (32, 32)


def test_missing_fashion_mnist_names_the_package_and_flag(tmp_path):
    with pytest.raises(EdgekdError, match=r"apt-get install dataset-fashion-mnist.*--data DIR"):
        load_dataset(DataConfig(root=str(tmp_path / "nowhere")), seed=0)


def test_torchvision_root_layout_is_found(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in os.listdir("/usr/share/datasets/fashion-mnist"):
        if name.startswith("t10k"):
            os.symlink(f"/usr/share/datasets/fashion-mnist/{name}", raw / name)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        os.symlink(f"/usr/share/datasets/fashion-mnist/{name}", raw / name)
    d = load_dataset(DataConfig(root=str(tmp_path), train_subset=50, test_subset=20), seed=0)
    assert d.sizes["test"] == 20


def test_truncated_idx_is_a_clear_error(tmp_path):
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 5, 0, 0, 0, 2, 0, 0, 0, 2]) + b"\x00" * 7)
    with pytest.raises(EdgekdError, match="truncated"):
        read_idx(p)


def _write_cifar(root, num_classes, n_per_file=6):
    rng = np.random.default_rng(0)
    if num_classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for name in names:
            batch = {"data": rng.integers(0, 255, (n_per_file, 3072), dtype=np.uint8),
                     "labels": list(rng.integers(0, 10, n_per_file)), "batch_label": name}
            (folder / name).write_bytes(pickle.dumps(batch))
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for name in ("train", "test"):
            batch = {b"data": rng.integers(0, 255, (n_per_file, 3072), dtype=np.uint8),
                     b"fine_labels": list(rng.integers(0, 100, n_per_file))}
            (folder / name).write_bytes(pickle.dumps({k.decode(): v for k, v in batch.items()}))
        (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"f{i}" for i in range(100)]}))
    return folder


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_loader_reads_torchvisions_format(tmp_path, num_classes):
    _write_cifar(tmp_path, num_classes)
    raw = load_cifar(str(tmp_path), num_classes)
    n_train = 30 if num_classes == 10 else 6
    assert raw.train_x.shape == (n_train, 3, 32, 32) and raw.test_x.shape == (6, 3, 32, 32)
    assert len(raw.class_names) == num_classes and raw.class_names[1] in ("c1", "f1")
    d = load_dataset(DataConfig(dataset=f"cifar{num_classes}", root=str(tmp_path), image_size=32,
                                val_fraction=0.0 if num_classes == 100 else 0.2), seed=0)
    assert d.channels == 3 and d.num_classes == num_classes


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/edgekd-pwned",))


def test_cifar_pickle_with_code_is_refused(tmp_path):
    folder = _write_cifar(tmp_path, 10)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": _Boom(), "labels": [0]}))
    with pytest.raises(EdgekdError, match="not a CIFAR batch file"):
        load_cifar(str(tmp_path), 10)
    assert not os.path.exists("/tmp/edgekd-pwned")


def test_missing_cifar_says_where_and_how(tmp_path):
    with pytest.raises(EdgekdError, match="cifar-10-batches-py"):
        load_cifar(str(tmp_path), 10)


def test_imagefolder_tree(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 3)):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(d / f"{i}.png")
    data = load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=24, val_fraction=0.25,
                                   num_workers=0), seed=0)
    assert data.class_names == ["cat", "dog"] and data.sizes == {"train": 12, "val": 4, "test": 6}
    x, y = next(iter(data.train.batches(4, torch.device("cpu"), seed=1)))
    assert x.shape == (4, 3, 24, 24) and x.dtype == torch.uint8 and set(y.tolist()) <= {0, 1}


def test_imagefolder_without_val_is_a_clear_error(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(EdgekdError, match="val"):
        load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)), seed=0)


def test_augment_is_seeded_and_keeps_range():
    x = torch.rand(16, 1, 28, 28)
    cfg = AugmentConfig(crop_padding=3, rotation_deg=15, brightness=0.3)
    a = augment_batch(x.clone(), cfg, torch.Generator().manual_seed(0))
    b = augment_batch(x.clone(), cfg, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.allclose(a, x)
    off = AugmentConfig(crop_padding=0, hflip=False, rotation_deg=0, brightness=0)
    assert torch.allclose(augment_batch(x.clone(), off, torch.Generator()), x)


def test_shifted_images_are_smaller_and_moved():
    x = torch.zeros(8, 1, 28, 28, dtype=torch.uint8)
    x[:, :, 10:18, 10:18] = 255
    s = shift_batch(x, 2.0, torch.Generator().manual_seed(0))
    assert s.shape == x.shape and s.dtype == torch.uint8
    mass = s.float().sum(dim=(1, 2, 3))
    assert torch.all(mass < x.float().sum(dim=(1, 2, 3)) * 0.3)  # a quarter of the area
    assert len({tuple(torch.nonzero(s[i, 0] > 128).float().mean(0).round().tolist()) for i in range(8)}) > 1


def test_gather_takes_the_first_images_in_order_or_shuffled():
    split = TensorSplit((torch.arange(600) % 256).to(torch.uint8).view(600, 1, 1, 1), torch.arange(600))
    x, y = gather(split, 300)
    assert torch.equal(y, torch.arange(300))
    xs, ys = gather(split, 300, seed=0)
    assert len(ys) == 300 and not torch.equal(ys, torch.arange(300)) and len(set(ys.tolist())) == 300
    assert gather(TensorSplit(torch.zeros(0, 1, 2, 2, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)))[0].numel() == 0


def test_translate_shift_moves_without_scaling():
    x = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    x[:, :, 12:16, 12:16] = 200  # a small centred square: never leaves the frame at 25 % moves
    y = shift_batch(x, 1.5, torch.Generator().manual_seed(0), mode="translate")
    assert y.shape == x.shape and torch.equal((y > 0).sum((1, 2, 3)), (x > 0).sum((1, 2, 3)))  # same size
    centres = [(img[0] > 0).nonzero().float().mean(0) for img in y]
    offsets = torch.stack(centres) - 13.5
    assert offsets.abs().max() <= 7 and (offsets.abs().sum(1) > 0).float().mean() > 0.9  # moved, by ≤ 7 px
