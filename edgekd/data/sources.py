"""Readers for the on-disk formats edgekd supports. No reader ever downloads anything.

- Fashion-MNIST: the four IDX files (``.gz`` or plain), as Debian's ``dataset-fashion-mnist``
  installs them or as torchvision stores them under ``ROOT/FashionMNIST/raw``.
- CIFAR-10/100: torchvision's ``cifar-10-batches-py`` / ``cifar-100-python`` folders. Those
  files are pickles, so they are read with an unpickler that only admits the few NumPy
  globals an array needs: a crafted file cannot run code.
- ImageFolder: ``ROOT/train/<class>/*.png|jpg`` and ``ROOT/val/<class>/...`` (or ``test``).
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgekd.errors import EdgekdError

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FMNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


@dataclass
class ArraySplits:
    """Whole train and test sets as uint8 NCHW images and int64 labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    class_names: list[str]


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzip-compressed or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise EdgekdError(f"{path}: cannot read IDX file ({e}); re-install or re-download it") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise EdgekdError(f"{path}: not an unsigned-byte IDX file; point --data at the Fashion-MNIST files")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise EdgekdError(f"{path}: IDX file is truncated ({body.size} of {int(np.prod(shape))} bytes)")
    return body.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_mnist_dirs(root: str | None) -> list[Path]:
    """Where Fashion-MNIST is looked for, in order."""
    if root:
        r = Path(root).expanduser()
        return [r, r / "FashionMNIST" / "raw"]
    return [DEBIAN_FASHION_MNIST, Path("data/FashionMNIST/raw")]


def load_fashion_mnist(root: str | None) -> ArraySplits:
    tried = fashion_mnist_dirs(root)
    for folder in tried:
        paths = {k: _find_idx(folder, v) for k, v in _FMNIST_FILES.items()}
        if all(paths.values()):
            arr = {k: read_idx(p) for k, p in paths.items()}  # type: ignore[arg-type]
            return ArraySplits(
                train_x=torch.from_numpy(arr["train_x"].copy()).unsqueeze(1),
                train_y=torch.from_numpy(arr["train_y"].astype(np.int64)),
                test_x=torch.from_numpy(arr["test_x"].copy()).unsqueeze(1),
                test_y=torch.from_numpy(arr["test_y"].astype(np.int64)),
                class_names=list(FASHION_MNIST_CLASSES),
            )
    where = ", ".join(str(t) for t in tried)
    raise EdgekdError(
        f"Fashion-MNIST not found in {where}: install it with 'apt-get install dataset-fashion-mnist' "
        "or pass --data DIR (a folder of the four IDX files, or a torchvision root)"
    )


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, bytes and NumPy arrays; refuses every other global."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle API
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a dataset file")


def _load_cifar_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayOnlyUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise EdgekdError(f"{path}: not a CIFAR batch file ({e}); re-download the dataset") from None
    if not isinstance(obj, dict):
        raise EdgekdError(f"{path}: not a CIFAR batch file (expected a dict)")
    return obj


def load_cifar(root: str | None, num_classes: int) -> ArraySplits:
    folder_name, train_files, test_files, meta_file, label_key, names_key = (
        ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
         "batches.meta", "labels", "label_names")
        if num_classes == 10
        else ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names")
    )
    base = Path(root or "data").expanduser()
    folder = base if base.name == folder_name else base / folder_name
    if not (folder / meta_file).is_file():
        raise EdgekdError(
            f"CIFAR-{num_classes} not found at {folder}: pass --data DIR holding '{folder_name}' "
            f"(torchvision's format, e.g. from torchvision.datasets.CIFAR{num_classes}(DIR, download=True))"
        )

    def read(files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for name in files:
            batch = _load_cifar_pickle(folder / name)
            try:
                xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(batch[label_key], dtype=np.int64))
            except (KeyError, ValueError) as e:
                raise EdgekdError(f"{folder / name}: malformed CIFAR batch ({e})") from None
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    train_x, train_y = read(train_files)
    test_x, test_y = read(test_files)
    meta = _load_cifar_pickle(folder / meta_file)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(names_key, [])]
    if len(names) != num_classes:
        names = [str(i) for i in range(num_classes)]
    return ArraySplits(train_x, train_y, test_x, test_y, names)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def imagefolder_dirs(root: str | None) -> tuple[Path, Path]:
    if not root:
        raise EdgekdError("imagefolder dataset needs a root: pass --data DIR with DIR/train/<class>/ and DIR/val/<class>/")
    base = Path(root).expanduser()
    train = base / "train"
    test = next((base / n for n in ("val", "test") if (base / n).is_dir()), None)
    if not train.is_dir() or test is None:
        raise EdgekdError(f"{base}: expected {base}/train/<class>/ and {base}/val/<class>/ (or test/); pass --data DIR")
    return train, test


def _unreadable(path: Path) -> str | None:
    """Why ``path`` is not a readable image (PIL cannot identify or verify it), else None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()  # reads the file through without decoding: catches truncated and foreign files
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file
        return f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else 'unreadable'}"
    return None


def list_imagefolder(folder: Path, classes: list[str] | None = None, skip_unreadable: bool = False,
                     ) -> tuple[list[tuple[Path, int]], list[str], list[str]]:
    """(path, label) pairs of an ImageFolder tree, the classes (sorted sub-folder names), and the
    files skipped as unreadable. Every file is checked once here, so a broken one is named now
    rather than failing a training epoch later."""
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    classes = classes or found
    if not classes:
        raise EdgekdError(f"{folder}: no class sub-folders; expected {folder}/<class>/<image>")
    if len(classes) < 2:
        raise EdgekdError(f"{folder}: only one class ('{classes[0]}'); a classifier needs at least 2 class folders")
    items, skipped = [], []
    for i, c in enumerate(classes):
        readable = 0
        for p in sorted((folder / c).rglob("*")):
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            why = _unreadable(p)
            if why is None:
                items.append((p, i))
                readable += 1
            elif skip_unreadable:
                skipped.append(str(p))
            else:
                raise EdgekdError(f"{p}: not a readable image ({why}); remove it, or set data.skip_unreadable: "
                                  "true to skip such files")
        if not readable:
            raise EdgekdError(f"{folder / c}: class '{c}' has no readable images ({', '.join(IMAGE_SUFFIXES)}); "
                              "add images or remove the folder")
    return items, classes, skipped


class ImageFileDataset(torch.utils.data.Dataset):
    """Decodes one image to a uint8 CHW tensor: shorter side resized to ``size``, centre crop."""

    def __init__(self, items: list[tuple[Path, int]], size: int, channels: int = 3) -> None:
        self.items, self.size, self.mode = items, size, "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.items[i]
        try:
            with Image.open(path) as im:
                im = im.convert(self.mode)
                w, h = im.size
                s = self.size / min(w, h)
                im = im.resize((max(self.size, round(w * s)), max(self.size, round(h * s))), Image.BILINEAR)
                w, h = im.size
                left, top = (w - self.size) // 2, (h - self.size) // 2
                im = im.crop((left, top, left + self.size, top + self.size))
                arr = np.asarray(im, dtype=np.uint8)
        except Exception as e:  # noqa: BLE001 - decoding found what verify() could not
            raise EdgekdError(f"{path}: cannot decode image ({type(e).__name__}); remove or replace the file") from None
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return torch.from_numpy(arr.copy()), label
