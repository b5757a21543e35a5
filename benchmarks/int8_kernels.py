"""How far an int8 TFLite file's outputs move between kernel sets, on an export dir's samples.

    python benchmarks/int8_kernels.py runs/quick/export
    python benchmarks/int8_kernels.py runs/quick/export --tflite-runtime-python ~/tflrt/bin/python

export scores int8 files on the host with ai-edge-litert, whose default XNNPACK delegate runs
int8 with its own rounding; a board may run LiteRT's builtin kernels or tflite-runtime 2.14.
For each kernel set this runs every image of ``samples.npz`` through the file (1 thread) and
compares the int8 outputs with LiteRT's builtin kernels: top-1 on the samples, how many top-1
predictions differ, and by how many int8 steps the outputs differ (max, mean). The builtin
kernels run twice: the first line is that control (0 differences, or the comparison means
nothing). With
``--tflite-runtime-python``, a Python that has tflite-runtime (and NumPy 1.x) runs the same
images through it. One JSON object per line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# the board's runner and the artifact names are stdlib + NumPy files: a tflite-runtime Python
# without edgekd installed imports them from the checkout
sys.path[:0] = [str(REPO / "edgekd"), str(REPO)]

from edgekd import artifacts  # noqa: E402
from runner import normalised_samples, quantize  # noqa: E402  (the runner's own samples and quantisation)


def outputs(interpreter, images: np.ndarray) -> np.ndarray:
    """The file's raw int8 outputs (N x classes) for normalised NCHW float images."""
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    nhwc = inp["shape"][1] != images.shape[1]
    rows = []
    for x in images:
        x = x[None].transpose(0, 2, 3, 1) if nhwc else x[None]
        interpreter.set_tensor(inp["index"], quantize(x, inp["dtype"], inp["quantization"]))
        interpreter.invoke()
        rows.append(interpreter.get_tensor(out["index"]).astype(np.int32)[0])
    return np.stack(rows)


def compare(name: str, got: np.ndarray, ref: np.ndarray, labels: np.ndarray) -> dict:
    steps = np.abs(got - ref)
    return {"kernels": name, "images": len(ref), "top1": round(100 * float((got.argmax(1) == labels).mean()), 2),
            "top1_differ": int((got.argmax(1) != ref.argmax(1)).sum()),
            "max_steps": int(steps.max()), "mean_steps": round(float(steps.mean()), 4)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("--file", default="student_int8.tflite")
    ap.add_argument("--tflite-runtime-python", help="a Python with tflite-runtime installed")
    ap.add_argument("--dump", type=Path, help=argparse.SUPPRESS)  # the tflite-runtime side: outputs to .npy
    args = ap.parse_args(argv)
    path = str(args.export_dir / args.file)
    images, labels = normalised_samples(str(args.export_dir / artifacts.SAMPLES),
                                        str(args.export_dir / artifacts.sidecar(artifacts.role_of(args.file))))
    if args.dump:
        from tflite_runtime.interpreter import Interpreter as TFLiteRuntime

        np.save(args.dump, outputs(TFLiteRuntime(model_path=path, num_threads=1), images))
        return
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    def litert(resolver: OpResolverType) -> np.ndarray:
        return outputs(Interpreter(model_path=path, num_threads=1, experimental_op_resolver_type=resolver), images)

    builtin = litert(OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    rows = [compare("litert builtin (again)", litert(OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES), builtin, labels),
            compare("litert xnnpack (export's)", litert(OpResolverType.AUTO), builtin, labels)]
    if args.tflite_runtime_python:
        with tempfile.TemporaryDirectory() as tmp:
            dump = Path(tmp) / "out.npy"
            subprocess.run([args.tflite_runtime_python, __file__, str(args.export_dir), "--file", args.file,
                            "--dump", str(dump)], check=True)
            rows.append(compare("tflite-runtime", np.load(dump), builtin, labels))
    for row in rows:
        print(json.dumps({"file": args.file, **row}))


if __name__ == "__main__":
    main()
