"""Quantization-aware training (QAT) of a student as PT2E fake-quant graph, with the quantizer
the int8 converter uses (litert-torch's ``PT2EQuantizer``: per-channel symmetric int8 weights,
per-tensor int8 activations, its conv-BN fusions), so the fake quantisation trained is the one
deployed (Krishnamoorthi 2018, §3; PyTorch's QAT recipe: fine-tune the float model with
fake-quant, then freeze BatchNorm statistics and the observers for the last part).

``prepare_qat(model, taps, sample)`` exports the student in training mode with a dynamic batch,
its tapped feature maps as extra outputs (so the method's feature terms apply to the graph), and
returns a ``QATStudent``: an ``nn.Module`` whose ``forward`` gives the logits, whose
``feature_taps`` give the features the way ``FeatureTaps`` does, and whose ``state_dict`` holds
tensors only (weights, fake-quant scales, observer ranges, its step count), so a checkpoint
stays ``weights_only``-loadable and a rebuilt graph takes it back exactly. ``int8_graph`` turns
it into the converted graph litert-torch writes as a full-integer TFLite file at batch 1.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from typing import Any

import torch
import torch.nn as nn

from edgekd.artifacts import QAT_ROLE
from edgekd.errors import EdgekdError
from edgekd.models.taps import FeatureTaps


@functools.cache
def _patch_torchao_patterns() -> None:
    """torchao 0.18 hands its conv-BN pattern *functions* to ``torch.export.export``, which since
    torch 2.10 takes only an ``nn.Module`` ("Expected `mod` to be an instance of
    `torch.nn.Module`"): ``prepare_qat_pt2e`` fails while annotating. Wrapping each pattern in
    torchao's own ``WrapperModule`` is what the export needs; every module that imported the
    helper by name gets the wrapped one."""
    import litert_torch.quantize.pt2e_quantizer_utils as litert_utils
    import torchao.quantization.pt2e.qat_utils as qat_utils
    import torchao.quantization.pt2e.utils as utils
    from torchao.quantization.pt2e.export_utils import WrapperModule

    original = utils._get_aten_graph_module_for_pattern

    def as_module(pattern: Any, example_inputs: tuple[Any, ...], is_cuda: bool = False, **kwargs: Any) -> Any:
        if not isinstance(pattern, nn.Module):
            pattern = WrapperModule(pattern)
        return original(pattern, example_inputs, is_cuda, **kwargs)

    for module in (utils, qat_utils, litert_utils):
        module._get_aten_graph_module_for_pattern = as_module


def quantizer(qat: bool = True) -> Any:
    """litert-torch's PT2E quantizer as the int8 export configures it.

    For QAT its fused fake-quant (``FusedMovingAvgObsFakeQuantize``) is swapped for torchao's
    plain ``FakeQuantize`` over the same observers: the fused kernel picks its own scales
    (``ChooseQuantizationParams``: a per-channel weight of one sign gets an affine scale half the
    symmetric one), while ``convert_pt2e`` and so the int8 file take the observers'
    ``calculate_qparams``. The plain module fake-quantises with exactly those, so the graph
    trained is the graph deployed (top-1 agreement 97.4 % fused, 99.8 % plain, on a tiny
    MobileNetV2)."""
    import dataclasses

    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize
    from torchao.quantization.pt2e.observer import MovingAverageMinMaxObserver

    config = get_symmetric_quantization_config(is_per_channel=True, is_qat=qat)
    if qat:
        def plain(spec: Any) -> Any:
            kwargs = {"observer": MovingAverageMinMaxObserver, **spec.observer_or_fake_quant_ctr.p.keywords}
            return dataclasses.replace(spec, observer_or_fake_quant_ctr=FakeQuantize.with_args(**kwargs))

        activation = plain(config.input_activation)
        config = dataclasses.replace(config, input_activation=activation, output_activation=activation,
                                     weight=plain(config.weight))
    return _with_int8_hard_swish(PT2EQuantizer().set_global(config))


def _with_int8_hard_swish(quantizer: Any) -> Any:
    """``quantizer`` also annotating hard-swish (its input and output int8), which litert-torch's
    quantizer leaves out: unannotated, a MobileNetV3's HARD_SWISH ops (and the squeeze-excite MEANs
    that follow them) stay float32 in the int8 file; annotated, they become LiteRT's int8 kernels
    (whose output-scale limit export's ``fit_hard_swish_scales`` keeps)."""
    from litert_torch.quantize.pt2e_quantizer_utils import get_input_act_qspec, get_output_act_qspec
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    hard_swish = (torch.ops.aten.hardswish.default, torch.ops.aten.hardswish_.default)
    annotate_the_rest = quantizer.annotate

    def annotate(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        config = quantizer.global_config
        for node in model.graph.nodes:
            if node.op == "call_function" and node.target in hard_swish and isinstance(node.args[0], torch.fx.Node):
                node.meta["quantization_annotation"] = QuantizationAnnotation(
                    input_qspec_map={node.args[0]: get_input_act_qspec(config)},
                    output_qspec=get_output_act_qspec(config), _annotated=True)
        return annotate_the_rest(model)  # the rest, and the MEANs after them share their ranges

    quantizer.annotate = annotate
    return quantizer


class _HardSigmoidInInt8Ops(nn.Module):
    """``nn.Hardsigmoid`` as ``relu6(x + 3) / 6``, the same function in ops the quantizer annotates
    (an add, a clamp, a mul): LiteRT has no hard-sigmoid kernel, and litert-torch lowers an
    ``aten.hardsigmoid`` to a float32 ADD and MUL even between int8 tensors (a MobileNetV3's
    squeeze-excite gates: 9 of each in MobileNetV3-small)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.relu6(x + 3.0) * (1.0 / 6.0)


@contextlib.contextmanager
def _hard_sigmoids_in_int8_ops(model: nn.Module) -> Any:
    """``model`` with its ``nn.Hardsigmoid`` modules swapped for ``_HardSigmoidInInt8Ops`` while it
    is exported (the float model is given back as it was)."""
    swapped = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Hardsigmoid)]
    for parent, name, _ in swapped:
        setattr(parent, name, _HardSigmoidInInt8Ops())
    try:
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


class _WithFeatures(nn.Module):
    """The student returning (logits, *features of ``taps``): what gets exported."""

    def __init__(self, model: nn.Module, taps: list[str]) -> None:
        super().__init__()
        self.model, self.taps = model, FeatureTaps(model, taps) if taps else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.model(x)
        if self.taps is None:
            return (logits,)
        features = self.taps.features
        self.taps.clear()
        return (logits, *features)


class _GraphTaps:
    """``FeatureTaps``' interface over the features a ``QATStudent`` graph returns."""

    def __init__(self) -> None:
        self.features: list[torch.Tensor] = []

    def clear(self) -> None:
        self.features = []

    def remove(self) -> None:
        self.features = []


class QATStudent(nn.Module):
    """A student as PT2E fake-quant training graph (see the module docstring).

    BatchNorm statistics freeze (the graph moves to eval: running statistics, no dropout) after
    ``freeze_bn_step`` training steps and the observers after ``freeze_observer_step``; the step
    count is a buffer, so a resumed run freezes at the same step."""

    def __init__(self, graph: nn.Module, freeze_bn_step: int, freeze_observer_step: int) -> None:
        super().__init__()
        self.graph = graph
        self.feature_taps = _GraphTaps()
        self.freeze_bn_step, self.freeze_observer_step = freeze_bn_step, freeze_observer_step
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._graph_mode: bool | None = None
        self._observing: bool | None = None

    @property
    def bn_frozen(self) -> bool:
        return int(self.steps) >= self.freeze_bn_step

    def _sync(self, training_step: bool) -> None:
        """The graph's mode and observers as the step count says. Only a training step observes:
        an evaluation pass leaves the ranges (and so the deployed scales) as training made them."""
        from torchao.quantization.pt2e import (disable_observer, enable_observer, move_exported_model_to_eval,
                                               move_exported_model_to_train)

        train = self.training and not self.bn_frozen
        if self._graph_mode is not train:  # each move rewrites the graph's BN and dropout ops
            (move_exported_model_to_train if train else move_exported_model_to_eval)(self.graph)
            self._graph_mode = train
        observe = training_step and int(self.steps) < self.freeze_observer_step
        if self._observing is not observe:
            self.graph.apply(enable_observer if observe else disable_observer)
            self._observing = observe

    def train(self, mode: bool = True) -> "QATStudent":
        self.training = mode  # not the graph's own flag: an exported graph refuses .train()
        self._sync(training_step=False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training_step = self.training and torch.is_grad_enabled()
        self._sync(training_step)
        if training_step:
            self.steps += 1
        logits, *features = self.graph(x)
        self.feature_taps.features = features
        return logits

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        try:
            result = super().load_state_dict(*args, **kwargs)
        except RuntimeError as e:
            if "Missing key" not in str(e) and "Unexpected key" not in str(e):
                raise
            # an older edgekd's QAT graph of this model (before hard-swish was int8): other fake-quants
            raise EdgekdError("this QAT checkpoint holds another fake-quant graph than this edgekd builds for its "
                              f"model (an older edgekd's, for one); delete the run's {QAT_ROLE}_*.pt and add QAT again "
                              "(edgekd distill RECIPE --out DIR --resume)") from None
        self._sync(training_step=False)  # a resumed or finished run: as it was at that step
        return result


def prepare_qat(model: nn.Module, taps: list[str], sample: torch.Tensor, *, freeze_bn_step: int,
                freeze_observer_step: int) -> QATStudent:
    """``model`` (float, its weights as they are) as a fake-quant training graph; ``sample`` is
    one input image (1 x C x H x W) of the right size, on the model's device."""
    from torch.export import Dim
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    _patch_torchao_patterns()
    model.train()
    batch = sample.expand(2, *sample.shape[1:]).contiguous()  # a dynamic batch needs an example > 1
    with _hard_sigmoids_in_int8_ops(model):
        exported = torch.export.export(_WithFeatures(model, taps), (batch,), strict=True,
                                       dynamic_shapes=({0: Dim("batch", min=1, max=1 << 16)},)).module()
    graph = prepare_qat_pt2e(exported, quantizer(qat=True))
    return QATStudent(graph, freeze_bn_step, freeze_observer_step)


def _logits_only(graph: Any) -> Any:
    """The exported graph with its feature outputs dropped: one output, the logits (wrapping it
    in a module instead makes litert-torch's re-export lose the graph's attributes)."""
    from torch.utils._pytree import tree_flatten

    output = next(n for n in graph.graph.nodes if n.op == "output")
    output.args = ((output.args[0][0],),)
    codegen = graph.graph._codegen  # torch.export's pytree codegen: the output's structure too
    codegen.pytree_info = codegen.pytree_info._replace(out_spec=tree_flatten(torch.zeros(()))[1])
    graph.graph.eliminate_dead_code()
    graph.recompile()
    return graph


def int8_graph(student: QATStudent) -> nn.Module:
    """The trained fake-quant graph converted (quantize/dequantize pairs with the trained
    scales), in eval mode, returning logits: what litert-torch writes as the int8 file."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    student.eval()
    converted = convert_pt2e(copy.deepcopy(student.graph), fold_quantize=False)  # convert rewrites in place
    for module in converted.modules():  # captured in eval mode: only the flag says otherwise
        module.training = False
    return _logits_only(converted)


def export_int8(student: QATStudent, sample: torch.Tensor, path: Any) -> None:
    """The full-integer int8 TFLite file of a trained ``QATStudent`` at batch 1 (int8 input and output)."""
    import litert_torch
    from litert_torch.quantize.quant_config import QuantConfig

    from edgekd.checkpoint import atomic_path

    edge = litert_torch.convert(int8_graph(student), (sample,), quant_config=QuantConfig(pt2e_quantizer=quantizer()))
    with atomic_path(path) as tmp:
        edge.export(str(tmp))
