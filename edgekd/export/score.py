"""Scoring an artifact in its own runtime: onnxruntime and LiteRT runners (float NCHW batches
in, float logits out), the PyTorch reference, and the parity rules a file must meet."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from edgekd.errors import EdgekdError
from edgekd.runner import TFLiteModel

# ONNX parity: the largest logit difference relative to the logits' own scale (the largest |logit|
# of the reference, at least 1). float32 reordering noise grows with that scale: an absolute 1e-3
# refused a correct 1-epoch quick export at 1.02e-3; a real conversion error is orders larger.
ONNX_MAX_REL_DIFF, ONNX_MIN_AGREEMENT = 1e-3, 99.9
TOME_MIN_AGREEMENT = 99.0


def onnx_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: np.concatenate([sess.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])



def tflite_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """LiteRT at one thread, through the board's own runner class: the same input quantisation,
    layout handling and output dequantisation as on the board."""
    model: TFLiteModel | None = None

    def run(x: np.ndarray) -> np.ndarray:
        nonlocal model
        model = model or TFLiteModel(str(path), 1, int(x.shape[1]))
        rows = []
        for i in range(len(x)):
            model.set_input(x[i : i + 1])
            model.invoke()
            rows.append(model.output())
        return np.concatenate(rows)

    return run


def _float_ops(it: Any) -> dict[str, int]:
    """Ops writing float32 in a TFLite file, by name ({} for a full-integer file): litert-torch's
    PT2E quantizer covers convs, linears and adds, so a hybrid's norms, activations and softmax
    stay float between QUANTIZE/DEQUANTIZE pairs. ``_get_ops_details`` is the interpreter's only
    op listing (private in LiteRT and tflite-runtime alike)."""
    tensors = {t["index"]: np.dtype(t["dtype"]).name for t in it.get_tensor_details()}
    counts: dict[str, int] = {}
    for op in getattr(it, "_get_ops_details", list)():
        if op["op_name"] not in ("DEQUANTIZE", "DELEGATE") and any(tensors.get(int(i)) == "float32" for i in op["outputs"]):
            counts[op["op_name"]] = counts.get(op["op_name"], 0) + 1
    return dict(sorted(counts.items()))


def tflite_io_details(path: Path) -> dict[str, Any]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    dtypes = sorted({np.dtype(t["dtype"]).name for t in it.get_tensor_details()})
    q = lambda d: {"scale": float(d["quantization"][0]), "zero_point": int(d["quantization"][1])}  # noqa: E731
    shape = [int(s) for s in inp["shape"]]
    return {"float_ops": _float_ops(it), "input_dtype": np.dtype(inp["dtype"]).name, "output_dtype": np.dtype(out["dtype"]).name,
            "input_shape": shape, "layout": "NHWC" if shape[-1] < shape[1] else "NCHW", "input_quantization": q(inp),
            "output_quantization": q(out), "tensor_dtypes": dtypes}


def parity(got: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Agreement of an artifact's logits with PyTorch's on the same (first) test images."""
    got = got[: len(reference)]
    diff = np.abs(got - reference).max(1)
    scale = max(1.0, float(np.abs(reference).max()))
    return {"images": int(len(got)), "max_abs_logit_diff": float(diff.max()),
            "median_abs_logit_diff": float(np.median(diff)), "logit_scale": scale,
            "max_rel_logit_diff": float(diff.max()) / scale, "median_rel_logit_diff": float(np.median(diff)) / scale,
            "top1_agreement": 100.0 * float((got.argmax(1) == reference.argmax(1)).mean())}


def tied_top1_agreement(got: np.ndarray, reference: np.ndarray, within: float = 0.0) -> float:
    """Percent of images whose top-1 in ``got`` is one of the reference's top classes: a class whose
    reference logit is at most ``within`` below the top one (0: ties only). A fake-quant reference
    gives int8 logits: two classes often share the top value (measured: every flip but one of a
    tiny QAT MobileNetV2 was such a tie, the other a 1-LSB margin), and both are then its answer;
    plain ``argmax`` would pick the lower index."""
    got = got[: len(reference)]
    top = reference.max(1, keepdims=True) - within * (1.0 + 1e-4)  # float logits of int8 steps: k * scale
    return 100.0 * float((np.take_along_axis(reference, got.argmax(1)[:, None], 1) >= top).mean())


def check_onnx_parity(name: str, parity: dict[str, float], tome: bool = False) -> None:
    """Refuse an ONNX file whose logits differ from PyTorch's by more than ``ONNX_MAX_REL_DIFF`` of
    the logits' scale, or whose top-1 disagrees on more than 0.1 % of images. ToMe's merge choices
    are discrete: a rounding difference at a near-tie (or an LSH projection near 0) merges another
    token in that image, so a ToMe file must match PyTorch on the median image and nearly always on
    top-1, not on every image."""
    worst = "median_rel_logit_diff" if tome else "max_rel_logit_diff"
    min_agreement = TOME_MIN_AGREEMENT if tome else ONNX_MIN_AGREEMENT
    if parity[worst] > ONNX_MAX_REL_DIFF or parity["top1_agreement"] < min_agreement:
        raise EdgekdError(f"{name} disagrees with PyTorch in onnxruntime (max |dlogit| {parity['max_abs_logit_diff']:.2e}"
                          f" = {parity['max_rel_logit_diff']:.1e} of the logit scale {parity['logit_scale']:.1f}, "
                          f"top-1 agreement {parity['top1_agreement']:.2f} %); this is a conversion error: "
                          "report it with the export.json")


def torch_logits(model: nn.Module, x: np.ndarray, batch: int = 250) -> np.ndarray:
    """PyTorch logits in batches (a 197-token ViT's attention over 2000 images at once is ~1 GB a block)."""
    with torch.no_grad():
        return torch.cat([model(torch.from_numpy(x[i:i + batch].copy())) for i in range(0, len(x), batch)]).numpy()

