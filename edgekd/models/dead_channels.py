"""BatchNorm channels whose input never varied, made exact constants before int8.

Both int8 routes need it: post-training conversion (``edgekd.export``) and quantization-aware
fine-tuning (``edgekd.qat``), whose trained weights are what its int8 file deploys. Measured on
QAT files: an EfficientNet-Lite0 student with 94 such channels agreed with its own fake-quant
graph on 41.5 % of test images (the fake-quant keeps the bias in float; the file rounds it);
zeroed before fine-tuning, 96.9 %.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def zero_dead_channels(model: nn.Module, rel_var: float = 1e-6) -> int:
    """Make Conv→BatchNorm channels whose input never varied exact constants; returns how many.

    A channel whose pre-BN output was constant in training (running_var ≪ eps, e.g. fed only by
    dead ReLU6 units) outputs ``beta`` whatever its weights, but BN folding scales its weights by
    gamma/sqrt(eps) (~300×). Per-channel int8 then gives it a huge weight scale, the int32 bias
    (scale = input scale × weight scale) rounds ``beta`` to 0, and the error spreads through the
    network (measured: 86.7 % → 50 % top-1). Zeroing the weights and the running mean keeps the
    output ``beta`` and lets the bias be quantised finely. In place.
    """
    zeroed = 0
    for parent in model.modules():
        children = list(parent.children())
        for conv, bn in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.running_var is not None):
                continue
            dead = bn.running_var < rel_var * bn.eps
            if dead.any():
                with torch.no_grad():
                    conv.weight[dead] = 0
                    if conv.bias is not None:
                        conv.bias[dead] = 0
                    bn.running_mean[dead] = 0
                zeroed += int(dead.sum())
    return zeroed
