"""The ToMe part of the export stage: which ToMe-patched files to write (``--tome-r`` /
``--tome-sweep``), the ``--tome-r auto`` choice timed on this host, and why a ToMe file was
refused. The merging itself is the model library's (``edgekd.tome``)."""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from edgekd import artifacts
from edgekd.data import gather
from edgekd.errors import EdgekdError
from edgekd.export.convert import convert_model, zero_dead_channels
from edgekd.export.score import ONNX_MAX_REL_DIFF, TOME_MIN_AGREEMENT, tflite_runner
from edgekd.models import build_from_checkpoint
from edgekd.runner import time_invokes
from edgekd.train import prepare_batch


def litert_interleaved_ms(paths: list[Path], runs: int = 200, threads: int = 1) -> list[float]:
    """Median ms of bare LiteRT ``invoke()`` calls per file, the files interleaved in blocks."""
    from ai_edge_litert.interpreter import Interpreter

    calls = []
    for p in paths:
        it = Interpreter(model_path=str(p), num_threads=threads)
        it.allocate_tensors()
        inp = it.get_input_details()[0]
        it.set_tensor(inp["index"], np.zeros(inp["shape"], inp["dtype"]))
        time_invokes(it.invoke, 10, 0)
        calls.append(it.invoke)
    times: list[list[float]] = [[] for _ in paths]
    for _ in range(10):
        for i, call in enumerate(calls):
            times[i] += time_invokes(call, 0, max(1, runs // 10))
    return [statistics.median(t) for t in times]


def check_tome_threads(threads: int) -> None:
    """``--tome-threads`` must be a thread count this host can time."""
    # a ToMe file adds many small ops: at 2 threads it ran slower than at 1 on a 2-core host while
    # r = 0 got faster (benchmarks/tome.md), so the choice is timed with the deployment's threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not 1 <= threads <= cores:
        raise EdgekdError(f"--tome-threads {threads}: this host can time 1 to {cores} threads; for a "
                          "target with more cores choose on the board: edgekd bench EXPORT_DIR --device "
                          "rpi4 --host pi@board --tome-sweep auto")


def auto_role(ckpt: dict[str, Any], path: Path, data: Any, converter: str, calib_x: torch.Tensor | None,
              out_dir: Path, max_drop: float, threads: int,
              timer: Callable[[list[Path]], list[float]] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--tome-r auto``: the choice for export.json, and the role to export ({} when r = 0 stays fastest)."""
    if ckpt["arch"] != "vit":
        raise EdgekdError(f"--tome-r auto needs a vit student; {path} holds a {ckpt['arch']}")
    choice = _choose_tome(ckpt, path, data, ckpt["mean"], ckpt["std"], converter, calib_x, out_dir, max_drop,
                          timer or functools.partial(litert_interleaved_ms, threads=threads))
    role = {"student-tome-auto-exact": {"r": choice.schedule, "schedule": choice.schedule, "matcher": "exact",
                                        "auto": True}} if choice.merges else {}
    return {**choice.as_dict(), "threads": threads}, role


def refusal(name: str, parity: dict[str, float]) -> str:
    """Why a ToMe file that fails its parity rule is not written, and the fix."""
    return (f"{name} merges other tokens than PyTorch on too many images (top-1 agreement "
            f"{parity['top1_agreement']:.2f} % of {parity['images']}, median |dlogit| "
            f"{parity['median_rel_logit_diff']:.1e} of the logit scale; the rule is >= "
            f"{TOME_MIN_AGREEMENT:g} % and <= {ONNX_MAX_REL_DIFF:g}); not written: use the exact "
            "matcher, or more --tome-bits for lsh (a hash bit flips where a projection is near 0)")


def _choose_tome(ckpt: dict[str, Any], path: Path, data: Any, mean: list[float], std: list[float], converter: str,
                 calib_x: torch.Tensor | None, out_dir: Path, max_drop: float,
                 timer: Callable[[list[Path]], list[float]]) -> Any:
    """``--tome-r auto``: int8 files of r = 0 and the candidate schedules, timed by ``timer`` and
    scored on the validation split in LiteRT (the deployable's own numbers)."""
    from edgekd.tome import apply_tome
    from edgekd.tome.auto import candidate_schedules, choose_schedule

    if calib_x is None:
        raise EdgekdError("--tome-r auto times the int8 files: drop --no-int8")
    if len(data.val) == 0:
        raise EdgekdError("--tome-r auto chooses on the validation split, and this run has none: set "
                          "data.val_fraction > 0 and distil again")
    kw = ckpt.get("model_kwargs", {})
    depth, tokens = int(kw.get("depth", 4)), (ckpt["image_size"] // kw.get("patch_size", 4)) ** 2 + 1
    val_u8, val_y = gather(data.val)
    val_x = prepare_batch(val_u8, torch.tensor(mean), torch.tensor(std)).numpy()
    files: dict[tuple[int, ...], Path] = {}
    with tempfile.TemporaryDirectory(prefix=".tome-auto-", dir=out_dir) as work:
        def int8_file(schedule: list[int]) -> Path:
            if tuple(schedule) not in files:
                model = apply_tome(build_from_checkpoint(ckpt, path).eval(), schedule)
                zero_dead_channels(model)
                made = convert_model("student", model, torch.from_numpy(val_x[:1].copy()), calib_x, mean, std,
                                Path(work) / f"r{'-'.join(map(str, schedule))}", onnx=False, dynamic_batch=False,
                                tflite=["int8"], converter=converter, sample_images=torch.from_numpy(val_x[:20].copy()))
                files[tuple(schedule)] = made[artifacts.tflite_file("student", "int8")][0]
            return files[tuple(schedule)]

        def val_top1(schedule: list[int]) -> float:
            logits = tflite_runner(int8_file(schedule))(val_x)
            return 100.0 * float((logits.argmax(1) == val_y.numpy()).mean())

        return choose_schedule(candidate_schedules(tokens, depth), depth,
                               lambda schedules: timer([int8_file(s) for s in schedules]), val_top1, max_drop)


def trained_tome(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The ToMe setting a ViT student was trained (and is exported) with, else None."""
    if ckpt["arch"] != "vit":
        return None
    return {"r": int(ckpt.get("model_kwargs", {}).get("tome_r", 0)), "matcher": "exact"}


def tome_roles(ckpt: dict[str, Any], path: Path, rs: tuple[int, ...], matchers: tuple[str, ...],
                bits: int, tflite: bool = True) -> dict[str, dict[str, Any]]:
    """The ToMe variants to export: role name → {r, matcher, bits}. Checked before any conversion."""
    if not rs:
        return {}
    if ckpt["arch"] != "vit":
        raise EdgekdError(f"--tome-r/--tome-sweep need a vit student; {path} holds a {ckpt['arch']} "
                          "(distil with student.arch: vit, e.g. recipes/fashion_mnist_vit.yaml)")
    from edgekd.tome import MATCHERS, check_r
    from edgekd.tome.merge import BUCKET_SIZE

    for m in matchers:
        if m not in MATCHERS:
            raise EdgekdError(f"unknown ToMe matcher '{m}'; choose from {', '.join(MATCHERS)}")
    if set(matchers) - {"exact"} and bits < 1:
        raise EdgekdError("--tome-bits must be at least 1")
    if "bucketed" in matchers and tflite:
        # its sort lowers to a TFLite comparator on int64 that the converter refuses, and XNNPACK
        # would not run a TopK in its place: in LiteRT it could only be slower than exact matching
        raise EdgekdError("the bucketed ToMe matcher exports to ONNX only (its hash sort does not convert to "
                          "TFLite); export it with --formats onnx --no-int8, or use exact or lsh for TFLite")
    kw = ckpt.get("model_kwargs", {})
    tokens = (ckpt["image_size"] // kw.get("patch_size", 4)) ** 2 + 1
    trained = trained_tome(ckpt)
    roles = {}
    for r in sorted(set(rs)):
        schedule = check_r(r, tokens, int(kw.get("depth", 4)))  # what each block merges (later ones clamped)
        for m in matchers:
            if trained and r == trained["r"] and m == trained["matcher"]:
                continue  # that is the student's own file
            if r == 0 and m != matchers[0]:
                continue  # r = 0 merges nothing: one unpatched file is enough
            roles[f"student-tome-r{r}-{m if r else 'none'}"] = {"r": r, "schedule": schedule,
                                                               "matcher": m if r else "none",
                                                               **({"bits": bits} if m != "exact" and r else {}),
                                                               **({"bucket_size": BUCKET_SIZE} if m == "bucketed" and r
                                                                  else {})}
    return roles

