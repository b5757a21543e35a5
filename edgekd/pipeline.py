"""``run(recipe, out_dir) -> RunResult``: the whole chain, distil → export → bench → gate.

Finished stages are not redone: a run directory with metrics.json skips distillation (a
started one resumes), an export.json made from the same student checkpoint skips the export,
and a bench.json newer than export.json skips the bench. The gate always runs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekd.bench import SAMPLES_FILE, SSHOptions, bench, ok_hosts
from edgekd.distill.stage import Progress, _recipe_diff, distill
from edgekd.errors import EdgekdError
from edgekd.export import TFLITE_VARIANTS, _sha256, export, resolve_converter
from edgekd.gate import GateResult, gate
from edgekd.recipe import ExportConfig, GateConfig, Recipe, recipe_from_dict

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    stages: dict[str, str]  # stage -> "ran" | "skipped (...)"
    metrics: dict[str, Any]
    export_report: dict[str, Any]
    bench_report: dict[str, Any]
    gate_result: GateResult | None
    int8_drop_exceeded: bool = False


def _current_export(run_dir: Path, cfg: ExportConfig) -> dict[str, Any] | None:
    """export.json when it was made from this student_best.pt with the recipe's export settings, else None."""
    out = run_dir / "export"
    if not all((out / f).is_file() for f in ("export.json", "student.model.json", SAMPLES_FILE)):
        return None
    if json.loads((out / "student.model.json").read_text()).get("source_sha256") != _sha256(run_dir / "student_best.pt"):
        return None
    report = json.loads((out / "export.json").read_text())
    wanted = {"student.onnx" if f == "onnx" else f"student_{TFLITE_VARIANTS[f]}.tflite" for f in cfg.formats}
    wanted |= {"student_int8.tflite"} if cfg.int8 else set()
    arch = json.loads((out / "student.model.json").read_text()).get("arch", "")
    current = (report.get("converters", {}).get("tflite", "").startswith(resolve_converter(cfg.converter, arch))
               and wanted <= set(report.get("artifacts", {})))
    return report if current else None


def run(recipe: Recipe, out_dir: str | Path, *, hosts: tuple[str, ...] = (), ssh: SSHOptions | None = None,
        gate_overrides: GateConfig | None = None, progress: Progress | None = None) -> RunResult:
    """Run every stage of ``recipe`` into ``out_dir``; ``hosts`` overrides the recipe's bench hosts."""
    run_dir = Path(out_dir)
    stages: dict[str, str] = {}
    if (run_dir / "metrics.json").is_file() and (run_dir / "student_best.pt").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        diff = _recipe_diff(recipe_from_dict(metrics.get("recipe", {})).model_dump(), recipe.model_dump())
        if diff:
            raise EdgekdError(f"{run_dir} was distilled with another recipe (key '{diff[0]}': {diff[1]!r} -> "
                              f"{diff[2]!r}); use the same recipe or pick a new --out")
        stages["distill"] = "skipped (metrics.json exists)"
    else:
        started = any((run_dir / f).exists() for f in ("teacher_last.pt", "student_last.pt"))
        metrics = distill(recipe, run_dir, resume=started, progress=progress).metrics
        stages["distill"] = "resumed" if started else "ran"

    e = recipe.export
    export_report = _current_export(run_dir, e)
    if export_report is not None:
        stages["export"] = "skipped (export.json matches student_best.pt and the export: section)"
    else:
        result = export(run_dir, formats=tuple(e.formats), int8=e.int8, calib=e.calib,
                        max_int8_drop=e.max_int8_drop, converter=e.converter, samples=e.samples)
        export_report = result.report
        stages["export"] = "ran"
    drop = export_report.get("int8_drop_top1")
    exceeded = drop is not None and drop > e.max_int8_drop

    b = recipe.bench
    hosts = hosts or tuple(b.hosts)
    device = b.device if hosts or b.device == "local" else "local"
    if hosts and device == "local":
        device = "generic-arm64"
    export_dir = run_dir / "export"
    bench_json = export_dir / "bench.json"
    bench_report = None
    if bench_json.is_file() and bench_json.stat().st_mtime > (export_dir / "export.json").stat().st_mtime:
        bench_report = json.loads(bench_json.read_text())
        if set(ok_hosts(bench_report)) != (set(hosts) or {"local"}):
            bench_report = None  # benched elsewhere, or a host failed: bench again
    if bench_report is not None:
        stages["bench"] = "skipped (bench.json is newer than export.json)"
    else:
        ssh = ssh or SSHOptions(port=b.port)
        bench_report = bench(export_dir, device, hosts, ssh=ssh, python=b.python, threads=b.threads, runs=b.runs,
                             warmup=b.warmup, samples=b.samples, timeout=b.timeout).report
        stages["bench"] = f"ran on {', '.join(hosts) or 'local'}"

    thresholds = recipe.gate.model_copy(update={k: v for k, v in (gate_overrides or GateConfig()).model_dump().items()
                                                if v is not None})
    gate_result = None
    if any(v is not None for v in thresholds.model_dump().values()):
        gate_result = gate(bench_json, thresholds)
        stages["gate"] = "pass" if gate_result.passed else "FAIL"
    else:
        stages["gate"] = "skipped (no thresholds in the recipe's gate: section or flags)"
    return RunResult(run_dir, stages, metrics, export_report, bench_report, gate_result, exceeded)
