"""``--budget "p90_ms<=20,size_mb<=2,rss_mb<=100"``: the board's limits, parsed strictly.

Each limit is ``key<=number``; the keys are the figures a bench measures of the int8 file. A
limit is a constraint of each trial: ``violations`` gives the values of Optuna's
``Trial.set_constraint`` (positive = over budget, by that much).
"""

from __future__ import annotations

import math
import re
from typing import Any

from edgekd.errors import EdgekdError

BUDGET_KEYS = {  # key -> what it limits (the int8 student file as the runner measured it)
    "p50_ms": "median latency, ms",
    "p90_ms": "p90 latency, ms",
    "p99_ms": "p99 latency, ms",
    "size_mb": "file size, MB (10^6 bytes)",
    "rss_mb": "peak resident memory of the runner process, MB (10^6 bytes)",
}
_LIMIT = re.compile(r"^\s*([a-z0-9_]+)\s*<=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*$")


def parse_budget(text: str | None) -> dict[str, float]:
    """``"p90_ms<=20,size_mb<=2"`` -> ``{"p90_ms": 20.0, "size_mb": 2.0}``; anything else is one line."""
    if text is None or not text.strip():
        return {}
    budget: dict[str, float] = {}
    for part in text.split(","):
        m = _LIMIT.match(part)
        if not m:
            raise EdgekdError(f"--budget: '{part.strip()}' is not KEY<=NUMBER; write e.g. "
                              f"'p90_ms<=20,size_mb<=2' (keys: {', '.join(BUDGET_KEYS)})")
        key, value = m.group(1), float(m.group(2))
        if key not in BUDGET_KEYS:
            raise EdgekdError(f"--budget: unknown key '{key}'; choose from {', '.join(BUDGET_KEYS)}")
        if key in budget:
            raise EdgekdError(f"--budget: '{key}' is given twice; keep one limit per key")
        if not math.isfinite(value) or value <= 0:
            raise EdgekdError(f"--budget: {key}<={m.group(2)} is no limit; give a positive number")
        budget[key] = value
    return budget


def format_budget(budget: dict[str, float]) -> str:
    return ",".join(f"{k}<={v:g}" for k, v in budget.items()) or "none"


def figures(result: dict[str, Any]) -> dict[str, float]:
    """The budget's figures of one runner result (``bench.json``'s per-model entry)."""
    return {"p50_ms": result["latency_ms"]["p50"], "p90_ms": result["latency_ms"]["p90"],
            "p99_ms": result["latency_ms"]["p99"], "size_mb": result["size_bytes"] / 1e6,
            "rss_mb": result["memory_kb"]["peak_rss"] * 1024 / 1e6}


def violations(measured: dict[str, float], budget: dict[str, float]) -> dict[str, float]:
    """``measured - limit`` per limit: feasible when every value is <= 0."""
    return {k: measured[k] - limit for k, limit in budget.items()}


def over_budget(measured: dict[str, float], budget: dict[str, float]) -> list[str]:
    """The limits ``measured`` breaks, as ``'p90_ms 23.1 > 20'``."""
    return [f"{k} {measured[k]:.3g} > {limit:g}" for k, limit in budget.items() if measured[k] > limit]
