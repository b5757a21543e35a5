"""The budget frontier: the candidates that spend the most of the budget, trained first.

Within one student, method and quantisation, a wider or larger-input candidate costs more and, as
a rule, scores higher (Tan & Le 2019, "EfficientNet": accuracy grows with width and resolution).
Under a budget, the best candidate of such a family is then one that no other candidate inside the
budget costs more than, on every figure. An untrained file is measured in seconds and a trial
trains for minutes, so the search measures every candidate first and starts with these.
"""

from __future__ import annotations

from typing import Any

from edgekd.search.budget import over_budget
from edgekd.search.space import Candidate

COST_KEYS = ("size_mb", "p90_ms")  # what a file costs the board: bytes, and time


def budget_frontier(cands: list[Candidate], figures: dict[str, dict[str, Any]],
                    budget: dict[str, float]) -> list[Candidate]:
    """The candidates inside ``budget`` (by ``figures``, key -> measured untrained file) that no
    other inside it of the same student, method and quantisation costs more than on every key of
    ``COST_KEYS``; the ones that spend the most of the budget first, ties in the space's order."""
    inside = [c for c in cands if c.key in figures and not over_budget(figures[c.key], budget)]

    def family(c: Candidate) -> tuple[str, str, str]:
        return c.student, c.method, c.quantization

    def cost(c: Candidate) -> tuple[float, ...]:
        return tuple(float(figures[c.key][k]) for k in COST_KEYS)

    def costlier(a: Candidate, b: Candidate) -> bool:
        return family(a) == family(b) and cost(a) != cost(b) and all(x >= y for x, y in zip(cost(a), cost(b)))

    front = [c for c in inside if not any(costlier(o, c) for o in inside)]
    return sorted(front, key=lambda c: -max((figures[c.key][k] / v for k, v in budget.items()), default=0.0))
