"""``gate(bench_json, thresholds) -> GateResult``: a CI pass/fail on size, latency and accuracy.

Reads bench.json (and export.json beside it for the int8 drop). Every host in the bench must
pass every check that has a threshold. The student/teacher latency ratio is measured in the
same run on the same board, so it holds on noisy shared CI runners where absolute
milliseconds do not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekd.artifacts import BENCH_SCHEMA
from edgekd.errors import EdgekdError
from edgekd.recipe import GateConfig


@dataclass
class Check:
    name: str
    host: str
    value: float | None
    limit: float
    kind: str  # "max" or "min"

    @property
    def passed(self) -> bool:
        if self.value is None:
            return False
        return self.value <= self.limit if self.kind == "max" else self.value >= self.limit


@dataclass
class GateResult:
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def _load(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise EdgekdError(f"{path}: no such file; run 'edgekd {what}' first")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EdgekdError(f"{path}: not valid JSON; run 'edgekd {what}' again") from None
    if not isinstance(data, dict):
        raise EdgekdError(f"{path}: expected a JSON object")
    return data


def gate(bench_json: str | Path, thresholds: GateConfig) -> GateResult:
    """Check every host of ``bench_json`` against the thresholds that are set."""
    path = Path(bench_json)
    if path.is_dir():
        path = path / "bench.json"
    report = _load(path, "bench EXPORT_DIR")
    if report.get("schema") != BENCH_SCHEMA or not isinstance(report.get("hosts"), dict) or not report["hosts"]:
        raise EdgekdError(f"{path}: not an edgekd bench report (schema {BENCH_SCHEMA} with hosts)")
    t = thresholds
    if all(v is None for v in t.model_dump().values()):
        raise EdgekdError("no thresholds: pass e.g. --max-size-mb 3 --max-p90-ms 15, or a gate: section in the recipe")
    result = GateResult()
    try:
        for host, h in report["hosts"].items():
            if h.get("status", "ok") != "ok":  # a board whose bench failed fails the gate
                result.checks.append(Check(f"bench finished ({h.get('error', 'failed')})", host, None, 1, "min"))
                continue
            student = h["models"][h["student"]]
            lat = student["latency_ms"]
            if t.max_size_mb is not None:
                result.checks.append(Check(f"{h['student']} size MB", host, student["size_bytes"] / 1e6,
                                           t.max_size_mb, "max"))
            if t.max_p50_ms is not None:
                result.checks.append(Check(f"{h['student']} p50 ms", host, lat["p50"], t.max_p50_ms, "max"))
            if t.max_p90_ms is not None:
                result.checks.append(Check(f"{h['student']} p90 ms", host, lat["p90"], t.max_p90_ms, "max"))
            if t.min_accuracy is not None:
                result.checks.append(Check(f"{h['student']} accuracy", host, student["accuracy"], t.min_accuracy,
                                           "min"))
            if t.max_latency_ratio is not None:
                ratio = (h.get("comparison") or {}).get("latency_p50_ratio")
                result.checks.append(Check("student/teacher p50 ratio", host, ratio, t.max_latency_ratio, "max"))
    except (KeyError, TypeError) as e:
        raise EdgekdError(f"{path}: bench report is missing {e}; run 'edgekd bench' again") from None
    if t.max_int8_drop is not None:
        export = _load(path.parent / "export.json", "export RUN --int8")
        result.checks.append(Check("int8 vs fp32 top-1 drop, pt", "export", export.get("int8_drop_top1"),
                                   t.max_int8_drop, "max"))
    return result


def render_markdown(result: GateResult) -> str:
    lines = [f"### edgekd gate: {'PASS' if result.passed else 'FAIL'}", "",
             "| check | host | value | limit | result |", "|---|---|---|---|---|"]
    for c in result.checks:
        value = "missing" if c.value is None else f"{c.value:.4g}"
        lines.append(f"| {c.name} | {c.host} | {value} | {'≤' if c.kind == 'max' else '≥'} {c.limit:g} | "
                     f"{'pass' if c.passed else '**FAIL**'} |")
    return "\n".join(lines) + "\n"
