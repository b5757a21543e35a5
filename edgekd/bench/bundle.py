"""The bundle ``edgekd bench`` sends to a board: the runner, the models, their sidecars and
the first N test images of the export dir. It reads nothing outside the export dir, so a
copied export dir benches on its own."""

from __future__ import annotations

import io
import tarfile
from importlib import resources
from pathlib import Path

import numpy as np

from edgekd import artifacts
from edgekd.bench.ssh import RUNNER_NAME
from edgekd.errors import EdgekdError


def runner_source() -> bytes:
    """The runner as the package ships it (``edgekd/runner.py``): from a checkout, a wheel or a zip."""
    return resources.files("edgekd").joinpath("runner.py").read_bytes()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_bundle(export_dir: Path, models: tuple[str, ...], samples: int) -> tuple[bytes, int]:
    """A tar of the runner, the models, their sidecars and the first ``samples`` test images of
    the export dir's ``samples.npz``; also the number of images it holds. Reads nothing outside
    ``export_dir``, so a copied export dir benches on its own."""
    path = export_dir / artifacts.SAMPLES
    if not path.is_file():
        raise EdgekdError(f"{export_dir}: no {artifacts.SAMPLES} (the test images the board scores); "
                          "run 'edgekd export RUN' again to write it")
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz["images"][:samples], npz["labels"][:samples]
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise EdgekdError(f"{path}: not a samples file written by edgekd export ({type(e).__name__}); "
                          "run 'edgekd export RUN' again") from None
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels) or len(images) == 0:
        raise EdgekdError(f"{path}: expected uint8 N x C x H x W images with N labels; run 'edgekd export RUN' again")
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=labels.astype(np.int64))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        _add_bytes(tar, RUNNER_NAME, runner_source())
        for name in models:
            tar.add(export_dir / name, arcname=name)
        for role in sorted({artifacts.role_of(m) for m in models}):
            tar.add(export_dir / artifacts.sidecar(role), arcname=artifacts.sidecar(role))
        _add_bytes(tar, artifacts.SAMPLES, buf.getvalue())
    return out.getvalue(), len(images)

