"""Atomic writes and safe checkpoint loads.

Every file edgekd writes goes to a temporary name in the same folder, is flushed and fsynced,
and is renamed into place, so a killed process never leaves a half-written file that looks
finished. Checkpoints are loaded with ``weights_only=True``: a pickle payload is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
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
        tmp_path = _new_temp(path)
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


def _new_temp(path: Path) -> Path:
    """A new empty file beside ``path``, made exclusively (O_EXCL) with the mode open() would give:
    the kernel applies the umask (mkstemp's 0600 would hide a shared run dir's files from its
    group, and reading the umask means setting it, which races with other threads)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


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


# Plain-data classes that real trainers write beside the weights, admitted to the weights-only
# unpickler by name: timm's train.py and torchvision's reference scripts keep their
# ``argparse.Namespace`` under ``args``. Nothing else is ever unpickled.
SAFE_GLOBALS = (argparse.Namespace,)
# modules whose functions a pickle payload calls to run code; a file naming one is an attack or a bug
_CODE_MODULES = ("os", "posix", "nt", "subprocess", "sys", "socket", "shutil", "runpy", "importlib", "pty",
                 "webbrowser", "code", "pickle", "marshal", "ctypes")
_CODE_BUILTINS = ("eval", "exec", "compile", "__import__", "open", "getattr", "setattr", "delattr", "print", "input",
                  "breakpoint", "globals", "vars")


def _runs_code(name: str) -> bool:
    module, _, attr = name.rpartition(".")
    return module.split(".")[0] in _CODE_MODULES or (module in ("builtins", "__builtin__") and attr in _CODE_BUILTINS)


def safe_load(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with ``SAFE_GLOBALS`` admitted: tensors, plain
    containers and those classes; any other pickled object is refused before it is built."""
    foreign = foreign_format(Path(path))
    if foreign:  # before torch.load, which hands a TorchScript archive to torch.jit.load
        raise _ForeignFormat(foreign)
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        return torch.load(path, map_location=map_location, weights_only=True)


class _ForeignFormat(Exception):
    """A file that is not a torch.save file: the message says what it is."""


def pickled_globals(path: Path) -> list[str]:
    """The ``module.name`` globals a torch.save file's pickle would import, read with pickletools
    (which only decodes opcodes: nothing is imported or run)."""
    import pickletools

    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            data = z.read(name) if name else b""
    except (OSError, zipfile.BadZipFile):
        return []
    found, strings, memo = [], [], {}
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str) and "UNICODE" in op.name:
                strings.append(arg)
            elif op.name in ("BINPUT", "LONG_BINPUT", "MEMOIZE") and strings:
                memo[arg if arg is not None else len(memo)] = strings[-1]
            elif op.name in ("BINGET", "LONG_BINGET") and arg in memo:
                strings.append(memo[arg])
    except Exception:  # noqa: BLE001 - a cut-short pickle: what was read so far
        pass
    return list(dict.fromkeys(found))


def foreign_format(path: Path) -> str | None:
    """What a file given as PyTorch weights is instead, with how to get a state dict from it; None
    when it looks like a torch.save file. Read from the file's own bytes, never by loading it."""
    how = "load it where it was made and save model.state_dict() with torch.save"
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return f"it is a TensorFlow SavedModel folder, not PyTorch weights; {how} of a PyTorch model"
        return "it is a folder, not a weights file"
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return f"it is a Keras/HDF5 file (.h5), not PyTorch weights; port the model to PyTorch, then {how}"
    if head[4:8] == b"TFL3":
        return "it is a TFLite model, not PyTorch weights; edgekd distils from PyTorch weights of the model"
    if path.suffix == ".onnx" or (head[:1] == b"\x08" and not zipfile.is_zipfile(path)):
        return ("it is an ONNX model, not PyTorch weights; edgekd needs the trained PyTorch weights: "
                f"{how} (an ONNX graph cannot be fine-tuned or tapped for features)")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n.endswith("config.json") for n in names) and any(n.endswith(".weights.h5") for n in names):
            return f"it is a Keras 3 model (.keras), not PyTorch weights; port the model to PyTorch, then {how}"
        if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
            return ("it is a TorchScript archive (torch.jit.save), not a state dict; run "
                    "torch.save(torch.jit.load(FILE).state_dict(), 'weights.pt') and give that file")
    return None


def why_unloadable(path: Path, e: Exception, holds: str) -> str:
    """Why ``safe_load(path)`` failed, in words: another format, not a PyTorch zip (corrupt or cut
    short), a pickled whole model or a payload (refused for safety, never run), or torch's own line."""
    first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    if isinstance(e, _ForeignFormat):
        return str(e)
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; this is not one (or is cut short)
        return "it is corrupt, truncated or not a PyTorch file"
    if "weights_only" in str(e) or "Unsupported global" in str(e):
        globs = pickled_globals(path)
        code = [g for g in globs if _runs_code(g)]
        if code:
            return (f"it holds a pickle payload that would run code ({code[0]}) when loaded; refused for safety, "
                    "nothing in it was run")
        classes = [g for g in globs if not g.startswith(("torch.", "collections.", "builtins."))]
        if any(".nn.modules." in g or ".models." in g or g.startswith("__main__.") for g in globs):
            return (f"it is a whole pickled model (torch.save(model), class {(classes or globs)[0]}), not just {holds}; "
                    "refused for safety (unpickling a model runs its code): save model.state_dict() instead")
        return (f"it holds pickled objects ({', '.join(globs[:2]) or 'unknown classes'}), not just {holds}, and is "
                "refused for safety")
    return f"it is corrupt or not a PyTorch file ({first})"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load an edgekd checkpoint with ``weights_only=True``; one-line errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise EdgekdError(f"checkpoint {path}: no such file")
    try:
        ckpt = safe_load(path, map_location)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        why = why_unloadable(path, e, "weights")
        raise EdgekdError(f"checkpoint {path}: cannot load, {why}; use a checkpoint written by edgekd") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "state_dict" not in ckpt:
        raise EdgekdError(f"checkpoint {path}: not an edgekd checkpoint (no edgekd header); use one written by edgekd distill")
    return ckpt
