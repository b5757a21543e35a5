"""``edgekd search``: the best int8 student for a board under its budgets, on Optuna.

One file per idea: ``budget`` (the limits, parsed strictly), ``space`` (the candidates and the
recipe of each), ``measure`` (timing a file on the target, cached by SHA-256), ``frontier`` (the
first trials: those that spend the most of the budget), ``trial`` (measure first, train second),
``report`` (search.json/md/png), ``stage`` (the study and its loop).
"""

from edgekd.search.budget import BUDGET_KEYS, parse_budget
from edgekd.search.measure import SearchTarget
from edgekd.search.space import Candidate, candidates, check_space
from edgekd.search.stage import SearchResult, search, study_name

__all__ = ["BUDGET_KEYS", "Candidate", "SearchResult", "SearchTarget", "candidates", "check_space", "parse_budget",
           "search", "study_name"]
