"""A resumable table of benchmark cells: each finished cell is kept in a JSON file (written
atomically), so a killed benchmark continues where it stopped. Shared by methods.py, hard.py and
students.py. Several processes may fill one table (one per core): each write merges the cells the
others wrote, under a file lock, and ``claim`` keeps two of them off the same cell."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from edgekd.checkpoint import atomic_path, write_json
from edgekd.distill.stage import distill
from edgekd.recipe import Recipe


RETRAIN_TOLERANCE = 0.5  # points of test top-1


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def keep_file(source: Path, keep: Path) -> str:
    """Copy ``source`` to ``keep`` atomically (a teacher kept beside its table, small enough for git);
    returns the copy's SHA-256."""
    with atomic_path(keep) as tmp:
        shutil.copyfile(source, tmp)
    return sha256(keep)


class Cells:
    def __init__(self, json_path: Path) -> None:
        self.path = json_path
        self.data: dict[str, Any] = json.loads(json_path.read_text()) if json_path.is_file() else {"cells": {}}
        self.after: Callable[[], Any] | None = None  # called after each new cell (a report rewrite)
        self._mine: set[str] = set()  # the cells this process wrote: on disk, another's newer copy wins for the rest

    @property
    def cells(self) -> dict[str, dict[str, Any]]:
        return self.data["cells"]

    @contextlib.contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def save(self, **data: Any) -> None:
        """Write the table with ``data`` set at its top level, keeping every cell that another
        process has written or updated since this one read the file (a process writes back only
        the cells it wrote itself: its stale copy of a teacher cell that another process updated,
        e.g. with the kept file's SHA-256, must not undo that update)."""
        with self._locked(self.path.with_name(self.path.name + ".lock")):
            if self.path.is_file():  # in place: callers hold references to ``data`` and ``cells``
                on_disk = json.loads(self.path.read_text())
                for key, cell in on_disk.pop("cells", {}).items():
                    if key not in self._mine:
                        self.cells[key] = cell
                for key, value in on_disk.items():
                    self.data.setdefault(key, value)
            self.data.update(data)
            write_json(self.path, self.data)

    def keep(self, key: str, value: dict[str, Any]) -> None:
        """Record one finished cell (see ``save``)."""
        self.cells[key] = value
        self._mine.add(key)
        self.save()

    def update(self, key: str, **fields: Any) -> None:
        """Add ``fields`` to a finished cell; written back by the next ``save`` as this process's own."""
        self.cells[key].update(fields)
        self._mine.add(key)

    def refresh(self) -> None:
        """Read the cells other processes finished or updated since this one read the file (the
        cells this process wrote stay its own, as in ``save``)."""
        if self.path.is_file():
            self.cells.update({k: v for k, v in json.loads(self.path.read_text())["cells"].items()
                               if k not in self._mine})

    @contextlib.contextmanager
    def claim(self, run_dir: Path) -> Iterator[bool]:
        """True while this process holds ``run_dir`` (a non-blocking lock beside it), False when
        another process is running that cell."""
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(run_dir.with_name(run_dir.name + ".lock"), "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True

    def run(self, key: str, recipe: Recipe, run_dir: Path, row: Callable[[dict[str, Any]], dict[str, Any]],
            ) -> dict[str, Any]:
        """Distil ``recipe`` into ``run_dir`` (resuming a killed cell) unless ``key`` is done;
        keep ``row(metrics)`` plus the wall time under ``key``."""
        if key not in self.cells:
            t0 = time.perf_counter()
            metrics = distill(recipe, run_dir, resume=run_dir.exists()).metrics
            self.keep(key, {**row(metrics), "wall_s": time.perf_counter() - t0})
            print(f"{key}: {json.dumps({k: v for k, v in self.cells[key].items() if isinstance(v, (int, float))})}",
                  flush=True)
            if self.after is not None:
                self.after()
        return self.cells[key]


    def teacher(self, key: str, recipe: Recipe, run_dir: Path, row: Callable[[dict[str, Any]], dict[str, Any]],
                keep: Path | None = None) -> tuple[dict[str, Any], str]:
        """Like ``run`` for a teacher that later cells load. Returns (row, checkpoint).

        ``keep``: a copy of the teacher beside the table (the run dirs are not kept in git), recorded
        by its SHA-256, so another machine continues the table with the same teacher; a different
        file under that name is refused. Without that copy, a finished teacher cell whose run is gone
        or unfinished is trained again (same seed and data; an unfinished run resumed) and must
        reproduce the recorded top-1 within ``RETRAIN_TOLERANCE`` points: CPU float reductions may
        differ in the last bits, which moved a teacher by one test image (0.05 pt). The retrained
        score is kept beside the recorded one."""
        # one process trains a teacher; another that needs it waits here, then reads what the first recorded
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with self._locked(run_dir.with_name(run_dir.name + ".teacher.lock")):
            self.refresh()
            return self._teacher(key, recipe, run_dir, row, keep)

    def _teacher(self, key: str, recipe: Recipe, run_dir: Path, row: Callable[[dict[str, Any]], dict[str, Any]],
                 keep: Path | None) -> tuple[dict[str, Any], str]:
        if keep is not None and key in self.cells and keep.is_file():
            if "sha256" not in self.cells[key]:
                raise SystemExit(f"{key} records no SHA-256 for {keep}: delete {keep} to take the teacher from its "
                                 "run (or train it again), or start a new table with --out")
            if self.cells[key]["sha256"] != sha256(keep):
                raise SystemExit(f"{keep} is not the teacher that {key} recorded (SHA-256 differs): restore it "
                                 "(git checkout) or start a new table with --out")
            return self.cells[key], str(keep)
        checkpoint = run_dir / "teacher_best.pt"
        # a run dir holds a finished teacher once distill wrote metrics.json: a killed run already has a
        # teacher_best.pt (its best epoch so far), which is resumed here, never taken for the teacher
        if key in self.cells and not (checkpoint.is_file() and (run_dir / "metrics.json").is_file()):
            recorded = self.cells.pop(key)
            again = self.run(key, recipe, run_dir, row)
            if abs(again["test_top1"] - recorded["test_top1"]) > RETRAIN_TOLERANCE:
                raise SystemExit(f"{key}: the teacher trained again scores {again['test_top1']:.2f} %, not the "
                                 f"recorded {recorded['test_top1']:.2f} %: start a new table with --out")
            self.keep(key, {**recorded, "retrained_test_top1": again["test_top1"]})
        cell = self.run(key, recipe, run_dir, row)
        if keep is None:
            return cell, str(checkpoint)
        self.keep(key, {**cell, "sha256": keep_file(checkpoint, keep)})
        return self.cells[key], str(keep)


def mean_std(values: list[float]) -> str:
    """``mean ± sample std`` of ``values`` (std 0 for one value)."""
    if not values:
        return ""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {std:.2f}"


# Two-sided 95 % quantiles of Student's t, t_{0.975, df}, for df = 1..30 (beyond: the normal 1.96
# is within 2 % from df = 60 on; 30 < df < 60 uses df = 30's, a slightly wider interval).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (two-sided 95 %)."""
    if df < 1:
        raise ValueError("a t interval needs at least two paired values")
    return _T975[df - 1] if df <= 30 else (_T975[-1] if df < 60 else 1.96)


def paired_difference(a: dict[int, float], b: dict[int, float]) -> dict[str, float] | None:
    """Mean of ``a[s] - b[s]`` over the seeds both have, its sample std and the 95 % interval of
    the mean (t distribution with n - 1 degrees of freedom). None with fewer than two pairs."""
    diffs = [a[s] - b[s] for s in sorted(set(a) & set(b))]
    if len(diffs) < 2:
        return None
    mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
    half = t975(len(diffs) - 1) * std / len(diffs) ** 0.5
    return {"n": len(diffs), "mean": mean, "std": std, "lo": mean - half, "hi": mean + half}


def format_difference(d: dict[str, float] | None) -> str:
    """``+1.23 [+0.45, +2.01] (n=5)``; a star marks an interval that excludes 0."""
    if d is None:
        return ""
    star = " *" if d["lo"] > 0 or d["hi"] < 0 else ""
    return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] (n={d['n']}){star}"
