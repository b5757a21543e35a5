"""Where a QAT student's int8 TFLite file drifts from the graph it was trained as, op by op.

    python benchmarks/qat_drift.py benchmarks/quantization_runs/timm_mobilenetv3_small_100_seed0_atkd
    python benchmarks/qat_drift.py RUN --images 50

RUN holds ``student_best.pt`` and ``student_qat_best.pt`` (a run distilled with ``distill.qat``).
The int8 file is converted again from the trained fake-quant graph, as export does. Both run on
the run's first test images:
- the converted PyTorch graph (quantize/dequantize pairs with the trained scales), which agrees
  with the fake-quant model it comes from;
- the file in LiteRT's built-in kernels (no XNNPACK, so every intermediate tensor is kept).

Each int8 op output of the file is matched to the PyTorch quantize node with the same scale, zero
point and shape, and compared in int8 steps (LSB). It prints a line per op, how far the logits
differ, the conv biases that the int32 bias grid may round by more than half an output step,
and the top-1 agreement of the two logits. The int8 kernels round each op within a step of the
graph in every family; how far that travels to the logits is the student's own.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgekd.checkpoint import load_checkpoint
from edgekd.data import gather, load_dataset
from edgekd.models import build_from_checkpoint
from edgekd.qat import export_int8, int8_graph, prepare_qat
from edgekd.recipe import recipe_from_dict
from edgekd.runner import dequantize, quantize
from edgekd.train import prepare_batch


def _torch_int8(graph: torch.fx.GraphModule, x: torch.Tensor) -> tuple[dict[str, tuple], np.ndarray]:
    """Every per-tensor quantize node's (scale, zero point, int8 output on ``x``), by node name,
    one image at a time as the file runs; and the logits."""
    nodes = {n for n in graph.graph.nodes if n.op == "call_function" and str(n.target).endswith(
        "quantize_per_tensor.default") and "dequantize" not in str(n.target)}
    seen: dict[str, list[np.ndarray]] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> object:
            out = super().run_node(n)
            if n in nodes:
                seen.setdefault(n.name, []).append(out.numpy().astype(np.int32))
            return out

    def value(a: object) -> float:
        return float(graph.get_buffer(a.target) if isinstance(a, torch.fx.Node) else a)

    with torch.no_grad():
        logits = np.concatenate([Recorder(graph).run(x[i:i + 1]).numpy() for i in range(len(x))])
    return {n.name: (value(n.args[1]), int(value(n.args[2])), np.concatenate(seen[n.name])) for n in nodes}, logits


def _coarse_biases(it: object, tensors: dict[int, dict]) -> list[str]:
    """Conv channels whose int32 bias grid (input scale x weight scale) is coarser than one output
    step: their bias may be rounded by more than half a step (a nearly dead BatchNorm channel; or,
    harmless, a channel that a ReLU after it always zeroes, whose output scale is tiny)."""
    found = []
    for o in it._get_ops_details():
        if o["op_name"] not in ("CONV_2D", "DEPTHWISE_CONV_2D") or len(o["inputs"]) < 3 or o["inputs"][2] < 0:
            continue
        step = tensors[o["inputs"][2]]["quantization_parameters"]["scales"] / tensors[o["outputs"][0]]["quantization"][0]
        found += [f"op {o['index']} ({o['op_name']}) channel {c}: bias step {step[c]:.2f} output LSB"
                  for c in np.flatnonzero(step > 1.0)]
    return found


def _file_int8(path: Path, x: np.ndarray) -> tuple[list[dict], np.ndarray, list[str]]:
    """Every int8 op output of the file on ``x`` (NCHW), the dequantised logits, and the coarse biases."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                     experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    ops = [o for o in it._get_ops_details() if tensors[o["outputs"][0]]["dtype"] == np.int8]
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    outs: dict[int, list[np.ndarray]] = {o["index"]: [] for o in ops}
    logits = []
    for i in range(len(x)):
        image = x[i:i + 1].transpose(0, 2, 3, 1) if len(inp["shape"]) == 4 and inp["shape"][-1] == x.shape[1] else x[i:i + 1]
        it.set_tensor(inp["index"], quantize(image, inp["dtype"], inp["quantization"]))
        it.invoke()
        for o in ops:
            outs[o["index"]].append(it.get_tensor(o["outputs"][0]).astype(np.int32))
        logits.append(dequantize(it.get_tensor(out["index"]), out["quantization"]))
    rows = [{"index": o["index"], "op": o["op_name"], "quantization": tensors[o["outputs"][0]]["quantization"],
             "values": np.concatenate(outs[o["index"]])} for o in ops]
    return rows, np.concatenate(logits), _coarse_biases(it, tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--images", type=int, default=20, help="test images compared (default 20)")
    args = ap.parse_args()
    ckpt = load_checkpoint(args.run / "student_best.pt")
    state = load_checkpoint(args.run / "student_qat_best.pt")
    recipe = recipe_from_dict(state["recipe"])
    x_u8, _ = gather(load_dataset(recipe.data, recipe.seed).test)
    x = prepare_batch(x_u8[: args.images], torch.tensor(ckpt["mean"]), torch.tensor(ckpt["std"]))
    info = state["qat"]
    student = prepare_qat(build_from_checkpoint(ckpt, args.run / "student_best.pt"), info["taps"], x[:1],
                          freeze_bn_step=info["freeze_bn_step"], freeze_observer_step=info["freeze_observer_step"])
    student.load_state_dict(state["state_dict"])
    graph = int8_graph(student)
    reference, torch_logits = _torch_int8(graph, x)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "qat.tflite"
        export_int8(student, x[:1], path)
        rows, file_logits, coarse = _file_int8(path, x.numpy())
    last = None
    print(f"{'op':>4} {'kind':<18} {'max |d| LSB':>11} {'% > 1 LSB':>9} {'mean |d|':>8}")
    for row in rows:
        scale, zero = row["quantization"]
        got = row["values"]
        got = got.transpose(0, 3, 1, 2) if got.ndim == 4 else got
        same = [v[2] for v in reference.values() if v[1] == zero and abs(v[0] - scale) <= 1e-6 * scale
                and v[2].shape == got.shape]
        if not same:
            continue
        # a quantize whose scale another shares (an op that keeps its input's): the closer one
        d = min((np.abs(got - v) for v in same), key=lambda d: float(d.mean()))
        over = 100.0 * float((d > 1).mean())
        print(f"{row['index']:>4} {row['op']:<18} {int(d.max()):>11} {over:>9.2f} {float(d.mean()):>8.3f}")
        last = (row, d)
    if last is not None:
        print(f"logits (op {last[0]['index']}, {last[0]['op']}): file - graph |d| mean {float(last[1].mean()):.2f}, "
              f"max {int(last[1].max())} LSB")
    print("conv biases rounded by more than half an output step:", *(coarse or ["none"]), sep="\n  ")
    print(f"top-1 agreement, file vs converted graph: "
          f"{100.0 * float((file_logits.argmax(1) == torch_logits.argmax(1)).mean()):.2f} % of {len(x)} images")


if __name__ == "__main__":
    from edgekd.errors import EdgekdError

    try:
        main()
    except EdgekdError as e:  # a missing or foreign checkpoint: one line
        print(f"qat_drift: {e}", file=sys.stderr)
        raise SystemExit(2) from None
