"""A user's own weights: a plain state dict (``.pt``/``.pth``, read with ``weights_only=True``),
a ``.safetensors`` file, or a checkpoint dict holding one under ``state_dict`` / ``model`` /
``model_state_dict`` / ``module`` (an edgekd checkpoint too) as the common trainers write them:
Lightning ``.ckpt`` files, timm's ``train.py`` and torchvision's reference scripts (whose
``argparse.Namespace`` of arguments is admitted as plain data), with DDP's ``module.`` and
``torch.compile``'s ``_orig_mod.`` prefixes stripped. An EMA copy (``state_dict_ema``,
``model_ema``) is used only when ``weights_key`` names it. When the keys fit the model after
removing one leading component that all of them share (``model.`` of a LightningModule,
``net.``, ``backbone.``, ``student.``), it is removed and recorded. TorchScript archives, whole
pickled models, ONNX, TFLite and Keras files are each one line saying what the file is.

What does not fit is one line: a head of another class count names both counts and the fix
(fine-tune a new head: ``epochs > 0``); missing or unexpected keys are named (the first few); an
RGB first convolution on 1-channel data is summed over RGB (and a 1-channel one repeated), the
same rule as ``zoo.adapt_input_channels``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from edgekd.checkpoint import safe_load, why_unloadable
from edgekd.errors import EdgekdError
from edgekd.models.zoo import adapt_conv_weight

_NESTED = ("state_dict", "model", "model_state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadReport:
    """What ``load_weights`` did, for metrics.json."""

    path: str
    tensors: int
    new_head: list[str] = field(default_factory=list)  # head keys left at their new initial values
    adapted_channels: list[str] = field(default_factory=list)
    key: str | None = None  # the checkpoint key the state dict was under (None: the file is one)
    prefix_stripped: str | None = None  # a leading component removed from every key, e.g. "model."
    ignored: int = 0  # tensors outside that prefix (a Lightning module's loss buffers, say)

    def as_dict(self) -> dict:
        return {"path": self.path, "tensors": self.tensors, "new_head": self.new_head,
                "adapted_channels": self.adapted_channels, "key": self.key, "prefix_stripped": self.prefix_stripped,
                "ignored_tensors": self.ignored}


def read_state_dict(path: str | Path, key: str | None = None) -> tuple[dict[str, torch.Tensor], str | None]:
    """The tensors of a weights file (see the module docstring) and the checkpoint key they were
    under; ``key`` picks one (``state_dict_ema``). Never unpickles objects."""
    path = Path(path)
    if not path.exists():
        raise EdgekdError(f"weights {path}: no such file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path), None
    try:
        obj = safe_load(path)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        why = why_unloadable(path, e, "tensors")
        raise EdgekdError(f"weights {path}: cannot load, {why}; save model.state_dict() with torch.save") from None
    sd, used = obj, None
    if key is not None:
        if not isinstance(obj, dict) or not isinstance(obj.get(key), dict):
            held = [k for k, v in obj.items() if isinstance(v, dict)] if isinstance(obj, dict) else []
            raise EdgekdError(f"weights {path}: no state dict under key '{key}'; the file holds "
                              f"{', '.join(held) or 'no nested dicts'}: set weights_key to one of them")
        sd, used = obj[key], key
    while isinstance(sd, dict) and not _is_state_dict(sd):
        inner = next((k for k in _NESTED if isinstance(sd.get(k), dict)), None)
        if inner is None:
            raise EdgekdError(f"weights {path}: no state dict found (expected tensors, or a dict holding them "
                              f"under {', '.join(_NESTED)}); save model.state_dict()")
        sd, used = sd[inner], inner if used is None else f"{used}.{inner}"
    if not isinstance(sd, dict):
        raise EdgekdError(f"weights {path}: holds a {type(sd).__name__}, not a state dict; save model.state_dict()")
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out, used


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise EdgekdError("reading .safetensors needs the safetensors package: pip install safetensors") from None
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad header
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise EdgekdError(f"weights {path}: not a readable .safetensors file ({first}); it is corrupt or "
                          "truncated: save it again") from None


def _by_prefix(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The file's tensors grouped by their first key component: 'model.conv1.weight' -> 'model.'."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        head, sep, rest = k.partition(".")
        if sep:
            groups.setdefault(head + ".", {})[rest] = v
    return groups


def _fit_keys(sd: dict[str, torch.Tensor], own: list[str], report: LoadReport, role: str, arch: str,
              path: str | Path) -> dict[str, torch.Tensor]:
    """``sd`` with the model's keys: as it is, or with the one leading component removed under
    which exactly the model's keys are; else one line naming the nearest fix."""
    if set(sd) == set(own):
        return sd
    groups = _by_prefix(sd)
    fits = [p for p, sub in groups.items() if set(sub) == set(own)]
    if len(fits) == 1:
        report.prefix_stripped, report.ignored = fits[0], len(sd) - len(groups[fits[0]])
        return groups[fits[0]]
    if len(fits) > 1:
        raise EdgekdError(f"{role}.weights {path}: the keys under {' and '.join(repr(p) for p in fits)} each fit "
                          f"{arch}; save the one you mean as its own state dict")
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in set(own)]
    overlap = {p: len(set(sub) & set(own)) for p, sub in groups.items()}
    nearest = max(overlap, key=overlap.get, default=None)
    if nearest and overlap[nearest] > len(set(sd) & set(own)) and overlap[nearest] >= len(own) // 2:
        sub = groups[nearest]
        gone = [k for k in own if k not in sub]
        raise EdgekdError(f"{role}.weights {path}: under the prefix '{nearest}' {overlap[nearest]} of {len(own)} keys "
                          f"of {arch} are there, but not {_few(gone)}; the file holds another model under "
                          f"'{nearest}': set {role}.arch (and its width) to that model's")
    parts = ([f"missing {_few(missing)}"] if missing else []) + ([f"unexpected {_few(unexpected)}"] if unexpected
                                                                 else [])
    raise EdgekdError(f"{role}.weights {path} does not fit {arch}: {'; '.join(parts)}; is it a state dict of "
                      f"{arch}? set {role}.arch to the model the file was saved from")


def _is_state_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def head_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of the model's classifier: its last linear layer (or 1x1 conv head)."""
    heads = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not heads:
        return []
    name, m = heads[-1]
    return [f"{name}.{p}" for p, _ in m.named_parameters(recurse=False)]


def load_weights(model: nn.Module, path: str | Path, *, role: str, arch: str, new_head_ok: bool,
                 key: str | None = None) -> LoadReport:
    """Load a user's weights file into ``model`` in place (see the module docstring). A head of
    another class count is left freshly initialised when ``new_head_ok`` (it will be trained);
    ``key`` picks the state dict of a checkpoint that holds several (``state_dict_ema``)."""
    sd, used = read_state_dict(path, key)
    own = model.state_dict()
    report = LoadReport(str(path), len(sd), key=used)
    sd = dict(_fit_keys(sd, list(own), report, role, arch, path))
    report.tensors = len(sd)
    head = head_keys(model)
    first_conv = next((k for k, v in own.items() if v.dim() == 4), None)
    for k, v in own.items():
        w = sd[k]
        if w.shape == v.shape:
            continue
        if k in head and w.shape[1:] == v.shape[1:]:
            if not new_head_ok:
                raise EdgekdError(f"{role}.weights {path} has a {w.shape[0]}-class head ({k}), the data has "
                                  f"{v.shape[0]} classes; set {role}.epochs > 0 to fine-tune a new head on this data")
            report.new_head.append(k)
            sd[k] = v  # the new head keeps its initial values
        elif k == first_conv and w.dim() == 4 and w.shape[0] == v.shape[0] and w.shape[2:] == v.shape[2:] and (
                1 in (w.shape[1], v.shape[1])):
            sd[k] = adapt_conv_weight(w, v.shape[1])
            report.adapted_channels.append(k)
        else:
            raise EdgekdError(f"{role}.weights {path} does not fit {arch}: {k} is {tuple(w.shape)} in the file, "
                              f"{tuple(v.shape)} in the model; set {role}.arch (and its width) to the saved model's")
    # a file carries no module versions (safetensors cannot; a stripped prefix drops them), and some
    # modules refuse a state dict without one (torchvision MNASNet): the tensors fit this model, so
    # they take its versions
    sd = OrderedDict(sd)
    sd._metadata = getattr(own, "_metadata", OrderedDict())  # type: ignore[attr-defined]
    model.load_state_dict(sd)
    return report
