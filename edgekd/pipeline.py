"""``run(recipe, out_dir) -> RunResult``: the whole chain, distil → export → bench → gate.

Finished stages are not redone: a run directory with metrics.json skips distillation (a
started one resumes), an export.json made from the same student checkpoint skips the export,
and a bench.json newer than export.json skips the bench. The gate always runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekd import artifacts
from edgekd.bench import SSHOptions, bench, check_reachable
from edgekd.distill.context import Progress
from edgekd.distill.resume import resume_difference
from edgekd.distill.stage import distill
from edgekd.errors import EdgekdError
from edgekd.export import check_imports, export, resolve_converter
from edgekd.gate import GateResult, gate
from edgekd.recipe import BenchConfig, ExportConfig, GateConfig, Recipe, recipe_from_dict

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


def run(recipe: Recipe, out_dir: str | Path, *, hosts: tuple[str, ...] = (), ssh: SSHOptions | None = None,
        gate_overrides: GateConfig | None = None, progress: Progress | None = None) -> RunResult:
    """Run every stage of ``recipe`` into ``out_dir``; ``hosts`` overrides the recipe's bench hosts."""
    run_dir = Path(out_dir)
    stages: dict[str, str] = {}
    e, b = recipe.export, recipe.bench
    device, hosts = _bench_target(b, hosts)
    ssh = ssh or SSHOptions(port=b.port)
    # what would stop a later stage stops the run now, not after its distillation: a missing
    # converter (for a run not yet exported), a host that does not answer (for one not yet benched)
    if not (run_dir / artifacts.EXPORT_DIR / artifacts.EXPORT_REPORT).is_file():
        check_imports(tuple(e.formats), e.int8, resolve_converter(e.converter, recipe.student.arch))
    if artifacts.current_bench(run_dir / artifacts.EXPORT_DIR, set(hosts) or {"local"}) is None:
        check_reachable(device, hosts, b.runs, b.samples, b.warmup, ssh)
    metrics, stages["distill"] = ensure_distilled(recipe, run_dir, progress)
    export_report, stages["export"] = ensure_exported(e, run_dir, recipe.student.arch)
    drop = export_report.get("int8_drop_top1")
    exceeded = drop is not None and drop > e.max_int8_drop
    bench_report = _bench(b, run_dir / artifacts.EXPORT_DIR, device, hosts, ssh, stages)
    thresholds = recipe.gate.model_copy(update={k: v for k, v in (gate_overrides or GateConfig()).model_dump().items()
                                                if v is not None})
    gate_result = None
    if any(v is not None for v in thresholds.model_dump().values()):
        gate_result = gate(run_dir / artifacts.EXPORT_DIR / artifacts.BENCH_REPORT, thresholds)
        stages["gate"] = "pass" if gate_result.passed else "FAIL"
    else:
        stages["gate"] = "skipped (no thresholds in the recipe's gate: section or flags)"
    return RunResult(run_dir, stages, metrics, export_report, bench_report, gate_result, exceeded)


def ensure_distilled(recipe: Recipe, run_dir: Path, progress: Progress | None = None) -> tuple[dict[str, Any], str]:
    """metrics.json of the run: a finished one is kept (when it was distilled with this recipe), a
    started one resumes; and what was done."""
    metrics = artifacts.read_json(run_dir / artifacts.METRICS)
    if metrics is not None and (run_dir / artifacts.best_checkpoint("student")).is_file():
        done = recipe_from_dict(metrics.get("recipe", {}))
        diff = resume_difference(done, recipe)
        if diff:
            raise EdgekdError(f"{run_dir} was distilled with another recipe (key '{diff[0]}': {diff[1]!r} -> "
                              f"{diff[2]!r}); use the same recipe or pick a new --out")
        if done.distill.qat.epochs > 0 or recipe.distill.qat.epochs == 0:
            return metrics, "skipped (metrics.json exists)"
        return distill(recipe, run_dir, resume=True, progress=progress).metrics, "resumed (QAT added)"
    started = any((run_dir / artifacts.last_checkpoint(r)).exists() for r in ("teacher", "student"))
    metrics = distill(recipe, run_dir, resume=started, progress=progress).metrics
    return metrics, "resumed" if started else "ran"


def ensure_exported(e: ExportConfig, run_dir: Path, student_arch: str, *,
                    val: bool = False) -> tuple[dict[str, Any], str]:
    """export.json: the current one when it was made from this student_best.pt with these settings
    (and scored on validation images, with ``val``), else a new export; and what was done."""
    report = artifacts.current_export(run_dir, e.formats, e.int8, resolve_converter(e.converter, student_arch))
    if report is not None and (not val or all("val_top1" in a for n, a in report["artifacts"].items()
                                               if n.startswith("student"))):
        return report, "skipped (export.json matches student_best.pt and the export: section)"
    return export(run_dir, formats=tuple(e.formats), int8=e.int8, calib=e.calib, max_int8_drop=e.max_int8_drop,
                  converter=e.converter, samples=e.samples, val=val).report, "ran"


def _bench_target(b: BenchConfig, hosts: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """The device profile and hosts a run benches on: ``hosts`` (the CLI's) else the recipe's; hosts
    with a local device bench as generic-arm64, no hosts bench here."""
    hosts = hosts or tuple(b.hosts)
    device = b.device if hosts or b.device == "local" else "local"
    return ("generic-arm64" if hosts and device == "local" else device), hosts


def _bench(b: BenchConfig, export_dir: Path, device: str, hosts: tuple[str, ...], ssh: SSHOptions,
           stages: dict[str, str]) -> dict[str, Any]:
    """bench.json: the current one when it is newer than export.json and every host finished."""
    report = artifacts.current_bench(export_dir, set(hosts) or {"local"})
    if report is not None:
        stages["bench"] = "skipped (bench.json is newer than export.json)"
        return report
    stages["bench"] = f"ran on {', '.join(hosts) or 'local'}"
    return bench(export_dir, device, hosts, ssh=ssh, python=b.python, threads=b.threads,
                 runs=b.runs, warmup=b.warmup, samples=b.samples, timeout=b.timeout).report
