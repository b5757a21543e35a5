"""The contract between the stages: what a run dir and an export dir hold, under which names
and schemas, and whether a stage's output is still current.

``distill`` writes a run dir, ``export`` reads it and writes ``RUN/export`` (the deployable:
it benches on its own once copied elsewhere), ``bench`` and ``gate`` read the export dir. Every
stage, the CLI, the bench and ``benchmarks/`` take file names from here, so a name changes in
one place. The JSON schemas are described in docs/reference/schemas.md.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

# schema names written into each report (a reader refuses another major version)
METRICS_SCHEMA = "edgekd.metrics/1"
EXPORT_SCHEMA = "edgekd.export/1"
BENCH_SCHEMA = "edgekd.bench/1"

# --- the run dir (distill) ---
METRICS = "metrics.json"
RECIPE = "recipe.yaml"
LOG = "log.csv"
EXPORT_DIR = "export"
QAT_ROLE = "student_qat"  # the QAT student's checkpoints: student_qat_best.pt, student_qat_last.pt


def best_checkpoint(role: str) -> str:
    """``student_best.pt``: the best-validation weights with everything needed to rebuild them."""
    return f"{role}_best.pt"


def last_checkpoint(role: str) -> str:
    """``student_last.pt``: the state after the last finished epoch, to resume from."""
    return f"{role}_last.pt"


# --- the export dir (export -> bench -> gate) ---
EXPORT_REPORT = "export.json"
SAMPLES = "samples.npz"  # test images with labels that the board scores
BENCH_REPORT = "bench.json"
BENCH_MARKDOWN = "report.md"
BENCH_LATENCY_PNG = "bench_latency.png"
BENCH_TOME_PNG = "bench_tome.png"
FORMATS = ("onnx", "tflite", "fp16", "dynamic")
TFLITE_VARIANTS = {"tflite": "fp32", "fp16": "fp16", "dynamic": "dynamic"}  # --formats name -> file variant
BENCH_MODELS = ("student_int8.tflite", "student_fp32.tflite", "teacher_fp32.tflite")  # what bench times


def onnx_file(role: str, dynamic_batch: bool = False) -> str:
    return f"{role}_dynamic.onnx" if dynamic_batch else f"{role}.onnx"


def tflite_file(role: str, variant: str) -> str:
    """``student_int8.tflite``; ``variant`` is fp32, fp16, dynamic or int8."""
    return f"{role}_{variant}.tflite"


def sidecar(role: str) -> str:
    """``student.model.json``: the normalisation, classes and int8 scales the board needs."""
    return f"{role}.model.json"


def role_of(model_file: str) -> str:
    """'student_int8.tflite' -> 'student', 'student-tome-r8-exact.onnx' -> 'student-tome-r8-exact'."""
    return model_file.split("_")[0].split(".")[0]


def wanted_files(formats: list[str] | tuple[str, ...], int8: bool, role: str = "student") -> set[str]:
    """The files of ``role`` that an export with these formats writes."""
    names = {onnx_file(role) if f == "onnx" else tflite_file(role, TFLITE_VARIANTS[f]) for f in formats}
    return names | ({tflite_file(role, "int8")} if int8 else set())


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: Path) -> dict[str, Any] | None:
    """A report, or None when it is missing or unreadable (then the stage runs again)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def current_export(run_dir: Path, formats: list[str] | tuple[str, ...], int8: bool,
                   converter: str) -> dict[str, Any] | None:
    """export.json when it was made from this run's ``student_best.pt`` with these settings
    (``converter`` as resolved for the student) and its int8 file from the QAT student when there
    is one, else None."""
    out = run_dir / EXPORT_DIR
    meta, report = read_json(out / sidecar("student")), read_json(out / EXPORT_REPORT)
    if meta is None or report is None or not (out / SAMPLES).is_file():
        return None
    if meta.get("source_sha256") != sha256(run_dir / best_checkpoint("student")):
        return None
    same_converter = report.get("converters", {}).get("tflite", "").startswith(converter)
    # a QAT student (student_qat_best.pt, e.g. QAT added to a finished run) makes the int8 file anew
    quantization = "qat" if (run_dir / best_checkpoint(QAT_ROLE)).is_file() else "ptq"
    int8_file = report.get("artifacts", {}).get(tflite_file("student", "int8"), {})
    if int8 and int8_file.get("quantization", "ptq") != quantization:
        return None
    return report if same_converter and wanted_files(formats, int8) <= set(report.get("artifacts", {})) else None


def current_bench(export_dir: Path, hosts: set[str]) -> dict[str, Any] | None:
    """bench.json when it is newer than export.json and every one of ``hosts`` finished, else None."""
    bench_json, export_json = export_dir / BENCH_REPORT, export_dir / EXPORT_REPORT
    if not bench_json.is_file() or not export_json.is_file():
        return None
    if bench_json.stat().st_mtime <= export_json.stat().st_mtime:
        return None
    report = read_json(bench_json)
    if report is None:
        return None
    return report if set(finished_hosts(report)) == hosts else None


def finished_hosts(report: dict[str, Any]) -> dict[str, Any]:
    """The hosts of a bench report whose bench finished."""
    return {h: v for h, v in report.get("hosts", {}).items() if v.get("status", "ok") == "ok"}


def contract_markdown() -> str:
    """docs/reference/contract.md, from the names above (``python -m edgekd.artifacts >
    docs/reference/contract.md``; a test keeps the file equal to this)."""
    student_files = sorted(wanted_files(FORMATS, True))
    rows = [
        ("run dir", best_checkpoint("student") + ", " + best_checkpoint("teacher"), "distill",
         "export, pipeline", "best-validation weights + recipe + classes + normalisation"),
        ("run dir", last_checkpoint("student") + ", " + last_checkpoint("teacher"), "distill", "distill --resume",
         "everything to resume after the last finished epoch"),
        ("run dir", METRICS, "distill", "pipeline, benchmarks/", f"the run's report, schema `{METRICS_SCHEMA}`"),
        ("run dir", f"{RECIPE}, {LOG}", "distill", "you", "the resolved recipe; one row per role and epoch"),
        ("export dir", ", ".join(student_files), "export", "bench, gate", "the student's files"),
        ("export dir", f"{onnx_file('teacher')}, {tflite_file('teacher', 'fp32')}", "export", "bench",
         "the reference the student is compared with"),
        ("export dir", sidecar("student") + ", " + sidecar("teacher"), "export", "bench (the board's runner)",
         "normalisation, classes, int8 scales, ToMe setting, source checkpoint SHA-256"),
        ("export dir", SAMPLES, "export", "bench", "test images with labels that the board scores"),
        ("export dir", EXPORT_REPORT, "export", "bench, gate, pipeline",
         f"every artifact's parity and scores, schema `{EXPORT_SCHEMA}`"),
        ("export dir", f"{BENCH_REPORT}, {BENCH_MARKDOWN}, {BENCH_LATENCY_PNG}", "bench", "gate, pipeline",
         f"latency, memory, accuracy per host, schema `{BENCH_SCHEMA}`"),
    ]
    lines = ["# The stage contract", "",
             "Generated from `edgekd/artifacts.py` by `python -m edgekd.artifacts > docs/reference/contract.md`;",
             "do not edit. Every stage, the CLI and `benchmarks/` take these names from that module.", "",
             "A stage's output is current when:", "",
             f"- export: `{EXPORT_REPORT}` was made from this `{best_checkpoint('student')}` (the sidecar's "
             "`source_sha256`) with the same converter and at least the files asked for;",
             f"- bench: `{BENCH_REPORT}` is newer than `{EXPORT_REPORT}` and every host asked for finished.", "",
             "| where | files | written by | read by | what |", "|---|---|---|---|---|"]
    lines += [f"| {w} | {', '.join(f'`{n.strip()}`' for n in files.split(','))} | {by} | {reader} | {what} |"
              for w, files, by, reader, what in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(contract_markdown())
