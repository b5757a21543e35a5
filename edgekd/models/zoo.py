"""Models by name from the zoos users already use: ``timm/<name>`` and ``torchvision/<name>``.

Any classifier either library builds, with the run's class count and input channels, never with
downloaded weights unless the recipe asks (``pretrained: true``; offline that is one clear line).
Feature taps come from the model's own description: timm's ``feature_info`` (the modules it names
as feature stages, kept where their output has the channels it promises, so NHWC stages are
skipped), and for torchvision the modules at most two levels down whose outputs are NCHW maps,
in the order they run; ``pair_stages`` then keeps the last one at each spatial size.
"""

from __future__ import annotations

import difflib
from functools import lru_cache

import torch
import torch.nn as nn

from edgekd.errors import EdgekdError
from edgekd.models.convertible import make_convertible

ZOOS = ("timm", "torchvision")


def is_zoo_name(arch: str) -> bool:
    return arch.split("/", 1)[0] in ZOOS and "/" in arch


def _timm():
    try:
        import timm
    except ImportError:
        raise EdgekdError("timm/ models need timm: pip install 'edgekd[timm]'") from None
    return timm


@lru_cache(maxsize=None)
def zoo_names(zoo: str) -> tuple[str, ...]:
    """Every classifier architecture the zoo can build (no weights are fetched to list them)."""
    if zoo == "timm":
        return tuple(_timm().list_models())
    if zoo == "torchvision":
        import torchvision

        return tuple(torchvision.models.list_models(module=torchvision.models))
    raise EdgekdError(f"unknown zoo '{zoo}'; choose one of {', '.join(ZOOS)}")


def list_models(zoo: str | None = None, text: str = "") -> list[str]:
    """``zoo/name`` of every model of ``zoo`` (both when None) whose name contains ``text``."""
    zoos = [zoo] if zoo else list(ZOOS)
    return [f"{z}/{n}" for z in zoos for n in zoo_names(z) if text.lower() in n.lower()]


def check_zoo_name(arch: str) -> None:
    """One line naming the closest names when ``arch`` is no model of its zoo."""
    zoo, name = arch.split("/", 1)
    names = zoo_names(zoo)
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    if not close:  # a shared prefix is the next best hint (mobilenetv3 -> mobilenetv3_small_100)
        close = [n for n in names if n.startswith(name[: max(4, len(name) // 2)])][:3]
    hint = f"did you mean {', '.join(f'{zoo}/{c}' for c in close)}? " if close else ""
    raise EdgekdError(f"unknown {zoo} model '{name}'; {hint}list them with `edgekd models --zoo {zoo} "
                      f"--filter TEXT`")


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    return None


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def adapt_input_channels(model: nn.Module, in_channels: int) -> None:
    """Give the first convolution ``in_channels`` inputs. Its weights are kept the way a
    pretrained RGB network means them: on 1 channel, the sum over RGB (exactly what the RGB
    network computes on a gray image repeated three times); from 1 to 3, repeated and divided by 3."""
    found = _first_conv(model)
    if found is None or found[1].in_channels == in_channels:
        return
    name, conv = found
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        new.weight.copy_(adapt_conv_weight(conv.weight, in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    _set_module(model, name, new)


def adapt_conv_weight(w: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A first-conv weight (O, C, k, k) for ``in_channels`` inputs (see adapt_input_channels)."""
    if w.shape[1] == in_channels:
        return w
    if in_channels == 1:
        return w.sum(dim=1, keepdim=True)
    if w.shape[1] == 1:
        return w.repeat(1, in_channels, 1, 1) / in_channels
    raise EdgekdError(f"cannot adapt a first convolution of {w.shape[1]} input channels to {in_channels}")


def replace_head(model: nn.Module, num_classes: int) -> None:
    """A new last linear layer with ``num_classes`` outputs (torchvision's pretrained builders
    take only their own class count)."""
    last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not last:
        raise EdgekdError("this model has no linear classifier head to resize; pick another architecture")
    name, head = last[-1]
    if head.out_features != num_classes:
        _set_module(model, name, nn.Linear(head.in_features, num_classes, bias=head.bias is not None))


def use_pytorch_defaults_for_mnasnet(model: nn.Module, reset_head: bool = True) -> None:
    """torchvision's MNASNet is set up for ImageNet's 1,000 classes and 350 epochs: its head is
    kaiming-uniform over fan_out = the class count, so with 10 classes the logits start near ±34 and
    the first loss at 13.7 (gradient norm ~1,800, measured; MobileNetV2: 2.3 and 11) and SGD at
    lr 0.1 never recovers. It gets nn.Linear's own init (not over a pretrained head)."""
    if reset_head:
        [m for m in model.modules() if isinstance(m, nn.Linear)][-1].reset_parameters()


def use_pytorch_batchnorm_momentum(model: nn.Module) -> None:
    """torchvision's MNASNet (1 − 0.9997) and MobileNetV3 (0.01) keep TensorFlow's BatchNorm momentum,
    set for hundreds of ImageNet epochs: after the few hundred steps of an edgekd run the running
    statistics still lag the weights, and eval top-1 sits far below train top-1 (MobileNetV3-small,
    225 KD steps on Fashion-MNIST: 72 % train, 30.6 % val; with momentum 0.1 the same steps give
    76.6 % val, measured). Every BatchNorm slower than PyTorch's default gets it: 0.1."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None and m.momentum < 0.1:
            m.momentum = 0.1


def build_zoo_model(arch: str, num_classes: int, in_channels: int, image_size: int, pretrained: bool = False,
                    **_: object) -> nn.Module:
    """``timm/<name>`` or ``torchvision/<name>`` for ``num_classes`` classes and ``in_channels``."""
    check_zoo_name(arch)
    zoo, name = arch.split("/", 1)
    try:
        if zoo == "timm":
            kw = dict(pretrained=pretrained, num_classes=num_classes, in_chans=in_channels)
            try:  # transformers and hybrids are built for the run's image size; CNNs take any size
                model = _timm().create_model(name, img_size=image_size, **kw)
            except TypeError:
                model = _timm().create_model(name, **kw)
            make_convertible(model)
        else:
            import torchvision

            if pretrained:
                model = torchvision.models.get_model(name, weights="DEFAULT")
                replace_head(model, num_classes)
            else:
                model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
            adapt_input_channels(model, in_channels)
            if name.startswith("mnasnet"):
                use_pytorch_defaults_for_mnasnet(model, reset_head=not pretrained)
            use_pytorch_batchnorm_momentum(model)
    except EdgekdError:
        raise
    except Exception as e:  # noqa: BLE001 - a hub download offline, or a builder refusing its arguments
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        if pretrained:
            raise EdgekdError(f"cannot get pretrained weights for {arch} ({type(e).__name__}): connect to the "
                              "internet once, or set pretrained: false, or give your own weights file") from None
        raise EdgekdError(f"cannot build {arch}: {first}") from None
    return model


@torch.no_grad()
def zoo_tap_candidates(arch: str, model: nn.Module, in_channels: int, image_size: int) -> list[str]:
    """Feature-map modules of a zoo model in the order they run (see the module docstring)."""
    modules = dict(model.named_modules())
    if arch.startswith("timm/") and getattr(model, "feature_info", None):
        promised = {fi["module"]: fi["num_chs"] for fi in model.feature_info if fi.get("module") in modules}
    else:
        promised = {n: None for n in modules if n and n.count(".") <= 1}
    fired: list[str] = []

    def hook(name: str):
        def record(_m: nn.Module, _i: object, out: object) -> None:
            if (isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-1] * out.shape[-2] > 1
                    and promised[name] in (None, out.shape[1]) and name not in fired):
                fired.append(name)
        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in promised]
    was_training = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        model(torch.zeros(1, in_channels, image_size, image_size, device=dev))
    except Exception as e:  # noqa: BLE001 - e.g. a fixed-size model at another size
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise EdgekdError(f"{arch} cannot take {in_channels}x{image_size}x{image_size} inputs ({first}); set "
                          "data.image_size to a size it takes") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return fired
