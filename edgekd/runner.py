#!/usr/bin/env python3
"""edgekd's on-device runner: one standalone file (stdlib + NumPy + one runtime).

Times one model and scores it on bundled samples, then prints one JSON object on stdout:

    python3 edgekd_runner.py --model student_int8.tflite --meta student.model.json \\
        --samples samples.npz --threads 4 --warmup 20 --runs 200

Runtimes, first found wins: ai_edge_litert, tflite_runtime, tensorflow.lite (.tflite files);
onnxruntime (.onnx). Works on Python 3.9-3.13, NumPy 1.x and 2.x, aarch64, armv7 and x86_64.
``samples.npz`` holds ``images`` (uint8, N x C x H x W) and ``labels`` (int, N); the sidecar
gives the normalisation ``(x / 255 - mean) / std``. Quantised inputs and outputs are handled
from the tensor details; NHWC files get transposed input.

Exit 0 with the result; exit 2 with ``{"error": ...}`` (one line) when something is missing.

One model is timed at a time on a board: each run holds an exclusive lock on ``--lock`` (default
``$TMPDIR/edgekd-board.lock``) from loading to its last invoke, so benches started by several
users or search workers wait for each other instead of sharing the cores (``lock_wait_ms``).

It ships inside the edgekd package (``edgekd/runner.py``), and ``edgekd bench`` pushes this very
file to the board as ``edgekd_runner.py``; on the host edgekd imports its int8 (de)quantisation
and its timing loop, so the board and the host measure the same way. It imports nothing of
edgekd: keep it so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

SCHEMA = "edgekd.runner/1"


class RunnerError(Exception):
    pass


def _status_kb(field: str) -> int | None:
    """A KiB field of /proc/self/status (Linux); None where there is none."""
    for line in _read("/proc/self/status").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _rss_kb() -> int:
    """Current resident set size in KiB (0 where the OS does not say)."""
    return _status_kb("VmRSS") or 0


def _peak_rss_kb() -> int:
    """High-water resident set size in KiB: VmHWM on Linux, else getrusage's ru_maxrss."""
    peak = _status_kb("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").strip("\x00 \n")
    except OSError:
        return ""


def machine_info() -> dict:
    """The machine, with one source of truth for the board's identity: ``board`` is
    /proc/device-tree/model, else the ``Model`` line of /proc/cpuinfo (Raspberry Pi OS puts it
    there too), else None; ``board_source`` says which. ``cpu`` is the processor only."""
    cpu, cpuinfo_model = "", ""
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "Model" and value:
            cpuinfo_model = value
        elif key in ("model name", "Hardware", "cpu model") and value and not cpu:
            cpu = value
    board, source = _read("/proc/device-tree/model"), "device-tree"
    if not board and cpuinfo_model:
        board, source = cpuinfo_model, "cpuinfo"
    info = {"arch": platform.machine(), "cpu": cpu or platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "board": board or None, "board_source": source if board else None,
            "os": platform.platform(), "python": platform.python_version(), "throttled": None}
    vcgencmd = shutil.which("vcgencmd")
    if vcgencmd:  # Raspberry Pi firmware: under-voltage / throttling flags (0x0 = never throttled)
        try:
            out = subprocess.run([vcgencmd, "get_throttled"], capture_output=True, text=True, timeout=5,
                                 check=False).stdout
            info["throttled"] = out.strip().partition("=")[2] or out.strip()
            temp = subprocess.run([vcgencmd, "measure_temp"], capture_output=True, text=True, timeout=5,
                                 check=False).stdout
            info["temp"] = temp.strip().partition("=")[2] or None
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def _tflite_interpreter(path: str, threads: int):
    errors = []
    for module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter", "tensorflow.lite"):
        try:
            mod = __import__(module, fromlist=["Interpreter"])
            interpreter_cls = mod.Interpreter
        except Exception as e:  # noqa: BLE001 - a broken runtime (e.g. built for NumPy 1.x) means: try the next
            errors.append(f"{module}: {type(e).__name__}")
            continue
        name = module.split(".")[0]
        version = getattr(sys.modules.get(name), "__version__", None)
        if version is None:
            try:
                from importlib import metadata

                version = metadata.version({"ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime"}
                                           .get(name, name))
            except Exception:  # noqa: BLE001
                version = "unknown"
        # LiteRT runs one thread unless told otherwise: always set it.
        return interpreter_cls(model_path=path, num_threads=threads), f"{name} {version}"
    raise RunnerError("no TFLite runtime: pip install ai-edge-litert (64-bit) or tflite-runtime with "
                      f"'numpy<2' (32-bit Pi OS) [{'; '.join(errors)}]")


class TFLiteModel:
    def __init__(self, path: str, threads: int, channels: int):
        import numpy as np

        self.it, self.runtime = _tflite_interpreter(path, threads)
        self.it.allocate_tensors()
        self.inp, self.out = self.it.get_input_details()[0], self.it.get_output_details()[0]
        shape = list(self.inp["shape"])
        self.nhwc = len(shape) == 4 and shape[1] != channels and shape[3] == channels
        self.layout = "NHWC" if self.nhwc else "NCHW"
        self.input_dtype = np.dtype(self.inp["dtype"]).name

    def set_input(self, x) -> None:  # x: float32 1xCxHxW, normalised
        if self.nhwc:
            x = x.transpose(0, 2, 3, 1)
        self.it.set_tensor(self.inp["index"], quantize(x, self.inp["dtype"], self.inp["quantization"]))

    def invoke(self) -> None:
        self.it.invoke()

    def output(self):
        return dequantize(self.it.get_tensor(self.out["index"]), self.out["quantization"])


class OnnxModel:
    def __init__(self, path: str, threads: int, channels: int):
        try:
            import onnxruntime as ort
        except ImportError:
            raise RunnerError("no ONNX runtime: pip install onnxruntime") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.name = self.sess.get_inputs()[0].name
        self.runtime, self.layout, self.input_dtype = f"onnxruntime {ort.__version__}", "NCHW", "float32"
        self.x, self.y = None, None

    def set_input(self, x) -> None:
        self.x = x

    def invoke(self) -> None:
        self.y = self.sess.run(None, {self.name: self.x})[0]

    def output(self):
        return self.y


def quantize(x, dtype, quantization):
    """A float tensor as a file's input takes it: unchanged for a float input, else
    ``round(x / scale + zero_point)`` clipped to the integer type (TFLite's affine int8 scheme)."""
    import numpy as np

    if np.dtype(dtype).kind == "f":
        return np.ascontiguousarray(x, dtype=dtype)
    scale, zero = quantization
    info = np.iinfo(dtype)
    return np.ascontiguousarray(np.clip(np.round(x / scale + zero), info.min, info.max), dtype=dtype)


def dequantize(y, quantization):
    """A file's output as float32: ``(q - zero_point) * scale`` for an integer output."""
    import numpy as np

    if y.dtype.kind == "f":
        return y.astype(np.float32, copy=False)
    scale, zero = quantization
    return (y.astype(np.float32) - zero) * scale


def normalised_samples(samples_path: str, meta_path: str):
    """The export's uint8 sample images (N x C x H x W) normalised as the model's sidecar says
    (``mean``/``std``, the run's own), as float32, and their labels."""
    import numpy as np

    with open(meta_path) as f:
        meta = json.load(f)
    with np.load(samples_path) as data:
        images, labels = data["images"], data["labels"]
    mean = np.asarray(meta["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(meta["std"], np.float32).reshape(1, -1, 1, 1)
    return ((images.astype(np.float32) / 255.0 - mean) / std).astype(np.float32), labels


def time_invokes(invoke, warmup: int, runs: int) -> list:
    """Milliseconds of ``runs`` calls of ``invoke`` after ``warmup`` untimed ones: the one timing
    loop of edgekd (the board, the export's ToMe choice and benchmarks/ all use it)."""
    for _ in range(warmup):
        invoke()
    times = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        invoke()
        times.append((time.perf_counter_ns() - start) / 1e6)
    return times


def _percentile(sorted_values: list, q: float) -> float:
    """Linear-interpolated percentile of an already sorted list (NumPy's default method)."""
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@contextmanager
def exclusive_lock(path: str):
    """Hold an exclusive lock on ``path`` (created if need be); '' holds nothing. Yields the wait, ms.
    The board's lock (``--lock``); edgekd's search takes its run dirs with it too."""
    if not path:
        yield 0.0
        return
    import fcntl  # POSIX; the boards are Linux

    t0 = time.perf_counter_ns()
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)  # read-only: another user's lock file works too
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield (time.perf_counter_ns() - t0) / 1e6
    finally:
        os.close(fd)  # releases the lock


def run(args: argparse.Namespace) -> dict:
    with exclusive_lock(args.lock) as waited_ms:
        result = _measure(args)
    result["lock_wait_ms"] = round(waited_ms, 1)
    return result


def _measure(args: argparse.Namespace) -> dict:
    try:
        import numpy as np
    except ImportError:
        raise RunnerError("NumPy is missing: pip install numpy") from None
    if not os.path.isfile(args.model):
        raise RunnerError(f"model file not found: {args.model}")
    samples, labels = normalised_samples(args.samples, args.meta)
    channels = int(samples.shape[1])

    rss_start = _rss_kb()
    t0 = time.perf_counter_ns()
    cls = OnnxModel if args.model.endswith(".onnx") else TFLiteModel
    # More interpreter threads than cores makes TFLite's spinning workers fight: tflite-runtime 2.14
    # ran a 0.2 ms model in 400 ms with 4 threads on 2 cores. Cap at the cores this process may use.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, min(args.threads, cores))
    model = cls(args.model, threads, channels)
    model.set_input(samples[:1])
    model.invoke()  # the first invoke allocates; count it as part of loading
    load_ms = (time.perf_counter_ns() - t0) / 1e6
    rss_loaded = _rss_kb()

    times = time_invokes(model.invoke, args.warmup, args.runs)
    rss_after_timing = _rss_kb()

    correct = 0
    for i in range(len(samples)):
        model.set_input(samples[i : i + 1])
        model.invoke()
        correct += int(np.argmax(model.output()) == int(labels[i]))
    ordered = sorted(times)
    mean_ms = sum(times) / len(times)
    return {
        "schema": SCHEMA, "model": os.path.basename(args.model), "size_bytes": os.path.getsize(args.model),
        "runtime": model.runtime, "threads": threads,
        "threads_requested": args.threads, "layout": model.layout, "input_dtype": model.input_dtype,
        "load_ms": round(load_ms, 3), "warmup": args.warmup, "runs": len(times),
        "latency_ms": {"p50": _percentile(ordered, 50), "p90": _percentile(ordered, 90),
                       "p99": _percentile(ordered, 99), "mean": mean_ms,
                       "std": (sum((t - mean_ms) ** 2 for t in times) / len(times)) ** 0.5,
                       "min": ordered[0], "max": ordered[-1]},
        "latencies_ms": [round(t, 4) for t in times],
        # The kernel's counters lag by a few pages; the peak is at least what was seen.
        "memory_kb": {"rss_start": rss_start, "rss_loaded": rss_loaded,
                      "peak_rss": max(_peak_rss_kb(), rss_loaded, rss_after_timing),
                      "rss_growth_while_timing": rss_after_timing - rss_loaded},
        "samples": len(samples), "accuracy": correct / len(samples) if len(samples) else None,
        "machine": machine_info(), "numpy": np.__version__,
    }


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(description="Time and score one model; print one JSON object.")
    ap.add_argument("--model", required=True)
    ap.add_argument("--meta", required=True, help="the model's sidecar .model.json (mean, std)")
    ap.add_argument("--samples", required=True, help=".npz with images (uint8 NCHW) and labels")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--lock", default=os.path.join(tempfile.gettempdir(), "edgekd-board.lock"),
                    help="one measurement at a time on this board: the lock file ('' = no lock)")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.threads < 1 or args.warmup < 0:
        print(json.dumps({"schema": SCHEMA, "error": "--runs and --threads must be >= 1, --warmup >= 0"}))
        return 2
    try:
        result = run(args)
    except RunnerError as e:
        print(json.dumps({"schema": SCHEMA, "error": str(e)}))
        return 2
    except (OSError, KeyError, ValueError) as e:
        print(json.dumps({"schema": SCHEMA, "error": f"{type(e).__name__}: {e}"}))
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
