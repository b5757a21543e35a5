"""Measuring a candidate's int8 file on the search's target, through ``edgekd bench``.

The board serialises measurements itself (the runner's lock), so workers of one study never
time two files on it at once. A file already measured on a target (same SHA-256, same threads
and runs) is not measured again: the figures are kept in the study, which every worker shares.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgekd import artifacts
from edgekd.bench import PROFILES, SSHOptions, bench
from edgekd.recipe import BenchConfig
from edgekd.search.budget import figures

log = logging.getLogger(__name__)
INT8 = artifacts.tflite_file("student", "int8")


@dataclass(frozen=True)
class SearchTarget:
    """Where candidates are timed: this host (``local``) or one board over SSH."""

    device: str = "local"
    host: str | None = None
    ssh: SSHOptions | None = None
    bench: BenchConfig = field(default_factory=BenchConfig)

    @property
    def hosts(self) -> tuple[str, ...]:
        return (self.host,) if self.host else ()

    @property
    def id(self) -> str:
        """What a measurement depends on besides the file: the machine and how it is timed."""
        b = self.bench
        threads = b.threads or PROFILES[self.device].threads
        return f"{self.device}@{self.host or 'local'}|threads={threads}|runs={b.runs}|warmup={b.warmup}"


Cache = Callable[[str], dict[str, Any] | None]  # key -> cached figures (study user attrs)


def measure(export_dir: Path, target: SearchTarget, get: Cache, put: Callable[[str, dict[str, Any]], None],
            *, cached: bool = True) -> dict[str, Any]:
    """The budget's figures of ``export_dir``'s int8 student on ``target`` (+ ``sha256``, ``cached``)."""
    sha = artifacts.sha256(export_dir / INT8)
    key = f"bench:{target.id}:{sha}"
    hit = get(key) if cached else None
    if hit is not None:
        log.info("%s: measured before on %s (sha256 %s…)", export_dir, target.id, sha[:12])
        return {**hit, "cached": True}
    b = target.bench
    report = bench(export_dir, target.device, target.hosts, ssh=target.ssh or SSHOptions(port=b.port),
                   python=b.python, threads=b.threads, runs=b.runs, warmup=b.warmup, samples=b.samples,
                   timeout=b.timeout, models=(INT8,)).report
    host = target.host or "local"
    result = report["hosts"][host]["models"][INT8]
    out = {**figures(result), "sha256": sha, "board_accuracy": result["accuracy"],
           "lock_wait_ms": result.get("lock_wait_ms")}
    put(key, out)
    return {**out, "cached": False}
