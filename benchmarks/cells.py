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


RETRAIN_TOLERANCE = 0.5  # points of test top-1


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


    def teacher(self, key: str, recipe: Recipe, run_dir: Path, row: Callable[[dict[str, Any]], dict[str, Any]],
                ) -> tuple[dict[str, Any], str]:
        """Like ``run`` for a teacher that later cells load: the run dirs are not kept in git, so on a
        new machine a finished teacher cell whose checkpoint is gone is trained again (same seed and
        data) and must reproduce the recorded top-1 within ``RETRAIN_TOLERANCE`` points: CPU float
        reductions may differ in the last bits, which moved a teacher by one test image (0.05 pt).
        The retrained score is kept beside the recorded one. Returns (row, checkpoint)."""
        checkpoint = run_dir / "teacher_best.pt"
        if key in self.cells and not checkpoint.is_file():
            recorded = self.cells.pop(key)
            again = self.run(key, recipe, run_dir, row)
            if abs(again["test_top1"] - recorded["test_top1"]) > RETRAIN_TOLERANCE:
                raise SystemExit(f"{key}: the teacher trained again scores {again['test_top1']:.2f} %, not the "
                                 f"recorded {recorded['test_top1']:.2f} %: start a new table with --out")
            self.cells[key] = {**recorded, "retrained_test_top1": again["test_top1"]}
            write_json(self.path, self.data)
        return self.run(key, recipe, run_dir, row), str(checkpoint)


def mean_std(values: list[float]) -> str:
    """``mean ± sample std`` of ``values`` (std 0 for one value)."""
    if not values:
        return ""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {std:.2f}"
