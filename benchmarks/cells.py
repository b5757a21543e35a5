"""A resumable table of benchmark cells: each finished cell is kept in a JSON file (written
atomically), so a killed benchmark continues where it stopped. Shared by methods.py and hard.py."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from edgekd.checkpoint import write_json
from edgekd.distill.stage import distill
from edgekd.recipe import Recipe


class Cells:
    def __init__(self, json_path: Path) -> None:
        self.path = json_path
        self.data: dict[str, Any] = json.loads(json_path.read_text()) if json_path.is_file() else {"cells": {}}

    @property
    def cells(self) -> dict[str, dict[str, Any]]:
        return self.data["cells"]

    def run(self, key: str, recipe: Recipe, run_dir: Path, row: Callable[[dict[str, Any]], dict[str, Any]],
            ) -> dict[str, Any]:
        """Distil ``recipe`` into ``run_dir`` (resuming a killed cell) unless ``key`` is done;
        keep ``row(metrics)`` plus the wall time under ``key``."""
        if key not in self.cells:
            t0 = time.perf_counter()
            metrics = distill(recipe, run_dir, resume=run_dir.exists()).metrics
            self.cells[key] = {**row(metrics), "wall_s": time.perf_counter() - t0}
            write_json(self.path, self.data)
            print(f"{key}: {json.dumps({k: v for k, v in self.cells[key].items() if isinstance(v, (int, float))})}",
                  flush=True)
        return self.cells[key]


def mean_std(values: list[float]) -> str:
    """``mean ± sample std`` of ``values`` (std 0 for one value)."""
    if not values:
        return ""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {std:.2f}"
