"""Keep a full-integer TFLite file inside the int8 kernels' own limits on scales.

LiteRT's int8 HARD_SWISH needs its output scale above 1/128 of its input scale: it rescales
``input_scale / 128 / output_scale`` as a fixed-point multiplier that must be below 1
(tflite/kernels/activations.cc, ``output_multiplier_exponent <= 0``), else the whole file fails
to load. A hard-swish whose inputs all lie far below -3 (a dead activation, as in seed 1 of timm
MobileNetV3-large in benchmarks/students.md) outputs ~0 everywhere, so calibration gives its
output a range of ~0 and a scale far below that limit. Raising that scale to the limit loses
nothing the tensor held (its values are ~0 and the zero point stays), and every consumer reads
the tensor's scale from the file; ops that pass a tensor through unchanged (their output kept the
input's scale and zero point) get the same scale so none of them reads a stale one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.checkpoint import atomic_path

log = logging.getLogger(__name__)

_MARGIN = 1.0 + 2.0**-10  # the multiplier must be strictly below 1 once rounded to fixed point


def fit_hard_swish_scales(path: Path) -> int:
    """Raise each int8 HARD_SWISH output scale of ``path`` that is below its kernel's limit (the
    file is rewritten in place, atomically); returns how many were raised."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as fb

    raw = Path(path).read_bytes()
    model = fb.ModelT.InitFromPackedBuf(raw, 0)
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    raised = 0
    for graph in model.subgraphs:
        for op in graph.operators:
            if codes[op.opcodeIndex] != fb.BuiltinOperator.HARD_SWISH:
                continue
            scale_in, scale_out = _scale(graph.tensors[op.inputs[0]]), _scale(graph.tensors[op.outputs[0]])
            if scale_in is None or scale_out is None or graph.tensors[op.inputs[0]].type != fb.TensorType.INT8:
                continue
            if scale_out < scale_in / 128.0:
                limit = scale_in / 128.0 * _MARGIN
                log.warning("%s: int8 HARD_SWISH output scale %.3g is below its kernel's limit %.3g (a dead "
                            "activation); raised to the limit", Path(path).name, scale_out, limit)
                _set_scale(graph, op.outputs[0], limit)
                raised += 1
    if raised:
        builder = flatbuffers.Builder(len(raw))
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        with atomic_path(path) as tmp:
            tmp.write_bytes(bytes(builder.Output()))
    return raised


def _scale(tensor: Any) -> float | None:
    """The per-tensor scale, or None (float, or per-channel)."""
    q = tensor.quantization
    if q is None or q.scale is None or len(q.scale) != 1:
        return None
    return float(q.scale[0])


def _set_scale(graph: Any, index: int, scale: float) -> None:
    """Give tensor ``index`` ``scale``, and through every consumer whose output had the same scale
    and zero point (a pass-through: reshape, pooling, ...), that output too."""
    tensor = graph.tensors[index]
    old = (float(tensor.quantization.scale[0]), int(tensor.quantization.zeroPoint[0]))
    tensor.quantization.scale = np.array([scale], np.float32)
    for op in graph.operators:
        if index not in list(op.inputs):
            continue
        for out in op.outputs:
            q = graph.tensors[out].quantization
            if (q is not None and q.scale is not None and len(q.scale) == 1
                    and (float(q.scale[0]), int(q.zeroPoint[0])) == old):
                _set_scale(graph, out, scale)
