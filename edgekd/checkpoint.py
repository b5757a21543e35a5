"""Atomic writes and safe checkpoint loads.

Every file edgekd writes goes to a temporary name in the same folder, is flushed and fsynced,
and is renamed into place, so a killed process never leaves a half-written file that looks
finished. Checkpoints are loaded with ``weights_only=True``: a pickle payload is refused.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from edgekd.errors import EdgekdError

FORMAT = "edgekd-checkpoint"
VERSION = 1


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as e:  # disk full, a file size limit, a read-only folder: one line, nothing half-written
        raise EdgekdError(f"cannot write {path}: {e.strerror or e}; free disk space or choose another "
                          "output folder") from None
    finally:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)


def _json_safe(obj: Any) -> Any:
    """NaN/inf (e.g. top-1 of an empty validation split) become null: strict JSON has no NaN."""
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_json_safe(obj), indent=2, allow_nan=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        try:
            torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp)
        except RuntimeError as e:  # torch's writer reports a failed write (disk full) as RuntimeError
            raise OSError(getattr(e, "errno", None) or 28, f"write failed ({str(e).splitlines()[0][:80]})") from None


def why_unloadable(path: Path, e: Exception, holds: str) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in words: not a PyTorch zip (corrupt or
    cut short), a pickle payload refused for safety, or torch's own first line."""
    first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; this is not one (or is cut short)
        return "it is corrupt, truncated or not a PyTorch file"
    if "weights_only" in str(e) or "Unsupported global" in str(e):
        return f"it holds pickled objects, not just {holds}, and is refused for safety"
    return f"it is corrupt or not a PyTorch file ({first})"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load an edgekd checkpoint with ``weights_only=True``; one-line errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise EdgekdError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        why = why_unloadable(path, e, "weights")
        raise EdgekdError(f"checkpoint {path}: cannot load, {why}; use a checkpoint written by edgekd") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "state_dict" not in ckpt:
        raise EdgekdError(f"checkpoint {path}: not an edgekd checkpoint (no edgekd header); use one written by edgekd distill")
    return ckpt
