"""A user's own weights: a plain state dict (``.pt``/``.pth``, read with ``weights_only=True``),
a ``.safetensors`` file, or a checkpoint dict holding one under ``state_dict`` / ``model`` /
``model_state_dict`` (an edgekd checkpoint too), with DDP's ``module.`` and ``torch.compile``'s
``_orig_mod.`` prefixes stripped.

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

from edgekd.checkpoint import why_unloadable
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

    def as_dict(self) -> dict:
        return {"path": self.path, "tensors": self.tensors, "new_head": self.new_head,
                "adapted_channels": self.adapted_channels}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (see the module docstring); never unpickles objects."""
    path = Path(path)
    if not path.is_file():
        raise EdgekdError(f"weights {path}: no such file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise EdgekdError("reading .safetensors needs the safetensors package: pip install safetensors") from None
        try:
            sd = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad header
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            raise EdgekdError(f"weights {path}: not a readable .safetensors file ({first}); it is corrupt or "
                              "truncated: save it again") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
            why = why_unloadable(path, e, "tensors")
            raise EdgekdError(f"weights {path}: cannot load, {why}; save model.state_dict() with torch.save") from None
        sd = obj
        while isinstance(sd, dict) and not _is_state_dict(sd):
            inner = next((sd[k] for k in _NESTED if isinstance(sd.get(k), dict)), None)
            if inner is None:
                raise EdgekdError(f"weights {path}: no state dict found (expected tensors, or a dict holding them "
                                  f"under {', '.join(_NESTED)}); save model.state_dict()")
            sd = inner
        if not isinstance(sd, dict):
            raise EdgekdError(f"weights {path}: holds a {type(sd).__name__}, not a state dict; save model.state_dict()")
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


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


def load_weights(model: nn.Module, path: str | Path, *, role: str, arch: str, new_head_ok: bool) -> LoadReport:
    """Load a user's weights file into ``model`` in place (see the module docstring). A head of
    another class count is left freshly initialised when ``new_head_ok`` (it will be trained)."""
    sd = read_state_dict(path)
    own = model.state_dict()
    report = LoadReport(str(path), len(sd))
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = ([f"missing {_few(missing)}"] if missing else []) + ([f"unexpected {_few(unexpected)}"] if unexpected
                                                                     else [])
        raise EdgekdError(f"{role}.weights {path} does not fit {arch}: {'; '.join(parts)}; is it a state dict of "
                          f"{arch}? set {role}.arch to the model the file was saved from")
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
