"""``--tome-r auto``: pick the ToMe schedule by *measured* latency on the target and validation top-1.

Token merging can make a small model slower, not faster (every ToMe file of the 50-token student
was, in benchmarks/tome_vit50.md; "Pruning One More Token is Enough", WACV 2025, reports 2-30 % slower
edge latency at small workloads). So the choice is measured, never assumed: r = 0 and a ladder of
uniform r values (each clamped per block as the reference does) are timed on the target and scored
on the validation split; among those within ``max_drop`` points of r = 0 on validation, the
fastest that is faster than r = 0 wins, else r = 0 (nothing merged) with the reason said.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

from edgekd.tome.patch import check_r


@dataclass
class Candidate:
    schedule: list[int]
    latency_ms: float
    val_top1: float


@dataclass
class AutoChoice:
    schedule: list[int]  # all zeros: no merging
    reason: str
    baseline: Candidate
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def merges(self) -> bool:
        return any(self.schedule)

    def as_dict(self) -> dict:
        return {"schedule": self.schedule, "reason": self.reason, "baseline": asdict(self.baseline),
                "candidates": [asdict(c) for c in self.candidates]}


def candidate_schedules(tokens: int, depth: int, class_token: bool = True) -> list[list[int]]:
    """Uniform r = 1, 2, 4, 8, … up to what the first block can merge, as effective (clamped)
    per-block schedules, without repeats."""
    most = (tokens - int(class_token)) // 2
    out: list[list[int]] = []
    r = 1
    while r <= most:
        s = check_r(r, tokens, depth, class_token)
        if s not in out:
            out.append(s)
        r *= 2
    return out


def choose_schedule(schedules: list[list[int]], depth: int,
                    latency_ms: Callable[[list[list[int]]], list[float]], val_top1: Callable[[list[int]], float],
                    max_drop: float = 0.5) -> AutoChoice:
    """Time r = 0 and every schedule together with ``latency_ms`` (on the target, one interleaved
    run, so a noisy neighbour hits all alike), score each with ``val_top1``; return the fastest
    schedule within ``max_drop`` validation points of r = 0 that beats r = 0."""
    zero = [0] * depth
    every = [zero] + [s for s in schedules if any(s)]
    ms = latency_ms(every)
    base, *cands = [Candidate(s, t, val_top1(s)) for s, t in zip(every, ms, strict=True)]
    accurate = [c for c in cands if base.val_top1 - c.val_top1 <= max_drop]
    faster = [c for c in accurate if c.latency_ms < base.latency_ms]
    if faster:
        best = min(faster, key=lambda c: c.latency_ms)
        return AutoChoice(best.schedule, f"fastest within {max_drop:g} pt of r = 0 on validation: "
                          f"{best.latency_ms:.3f} ms vs {base.latency_ms:.3f} ms", base, cands)
    why = ("no schedule is within " f"{max_drop:g} pt of r = 0 on validation" if not accurate else
           "no schedule within the accuracy bound is faster than r = 0 on the target")
    return AutoChoice(zero, f"{why}: exporting r = 0 (no merging)", base, cands)
