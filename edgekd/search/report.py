"""What a search writes: search.json (schema ``edgekd.search/1``), search.md (a row per trial)
and search.png (every trial, the Pareto front and the budget lines)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekd import __version__
from edgekd.checkpoint import atomic_path, write_json, write_text
from edgekd.search.budget import BUDGET_KEYS, format_budget

SEARCH_SCHEMA = "edgekd.search/1"
SEARCH_JSON, SEARCH_MD, SEARCH_PNG = "search.json", "search.md", "search.png"
TRAINED = ("complete", "over budget")  # the states of a trial that was distilled and measured


def trial_rows(study: Any, budget: dict[str, float]) -> list[dict[str, Any]]:
    """One row per trial of the study: its config, state, int8 validation top-1 and figures."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        measured = a.get("measured") or a.get("untrained") or {}
        if t.state == TrialState.COMPLETE:
            trained = "measured" in a
            inside = all(v <= 0 for v in t.constraints.values())
            state = "complete" if trained and inside else "over budget" if trained else "over budget (untrained)"
        elif t.state == TrialState.FAIL:
            state = "failed" if "error" in a else "worker died (retried)"
        elif "duplicate_of" in a:
            state = "duplicate"
        else:
            state = t.state.name.lower()
        rows.append({
            "number": t.number, "config": a.get("config", ""), "params": dict(t.params), "state": state,
            "val_top1": t.value if state in TRAINED else None, "fp32_val_top1": a.get("fp32_val_top1"),
            "quantization": a.get("quantization_used"),
            **{k: measured.get(k) for k in BUDGET_KEYS}, "constraints": dict(t.constraints),
            "measured_untrained": "measured" not in a and bool(measured),
            "reason": a.get("error") or a.get("over") or _pruned_reason(t) or _duplicate_reason(a) or "",
            "run_dir": a.get("run_dir"),
            "measured": measured or None,
            "wall_s": (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start else None,
        })
    return rows


def _duplicate_reason(attrs: dict[str, Any]) -> str:
    n = attrs.get("duplicate_of")
    return "" if n is None else f"the sampler's second pick of trial {n}'s candidate: not run again, not counted"


def _pruned_reason(t: Any) -> str:
    from optuna.trial import TrialState

    if t.state != TrialState.PRUNED or not t.intermediate_values:
        return ""
    step = max(t.intermediate_values)
    return f"pruned after epoch {step}: validation top-1 {t.intermediate_values[step]:.2f} %"


def pareto_front(rows: list[dict[str, Any]]) -> list[int]:
    """The trained trials no other trial beats on both validation top-1 (higher) and p90 (lower)."""
    pts = [r for r in rows if r["state"] in TRAINED and r["val_top1"] is not None and r["p90_ms"] is not None]
    front = []
    for r in pts:
        if not any(o["val_top1"] >= r["val_top1"] and o["p90_ms"] <= r["p90_ms"]
                   and (o["val_top1"] > r["val_top1"] or o["p90_ms"] < r["p90_ms"]) for o in pts):
            front.append(r["number"])
    return sorted(front, key=lambda n: next(r["p90_ms"] for r in pts if r["number"] == n))


def write_search_report(out: Path, recipe: Any, study_name: str, storage: str, budget: dict[str, float],
                        target: Any, rows: list[dict[str, Any]], front: list[int], finals: list[dict[str, Any]],
                        winner: dict[str, Any] | None) -> list[Path]:
    report = {"schema": SEARCH_SCHEMA, "edgekd_version": __version__, "recipe": recipe.name, "study": study_name,
              "storage": storage, "budget": budget, "target": target.id, "space": recipe.search.model_dump(),
              "trials": rows, "front": front, "finals": finals, "winner": winner}
    write_json(out / SEARCH_JSON, report)
    _plot(rows, front, budget, winner, out / SEARCH_PNG)
    write_text(out / SEARCH_MD, render_markdown(report))
    return [out / SEARCH_JSON, out / SEARCH_MD, out / SEARCH_PNG]


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def render_markdown(report: dict[str, Any]) -> str:
    budget = report["budget"]
    lines = [f"# edgekd search: {report['recipe']}", "",
             f"Study `{report['study']}` in `{report['storage']}`; target `{report['target']}`; "
             f"budget `{format_budget(budget)}`. Objective: the int8 file's validation top-1 (test images are "
             "scored for the winner alone). Figures of an untrained candidate (marked *) are of its file at initial "
             "weights: size, latency and memory do not depend on the weight values.", "",
             "| # | config | state | int8 val top-1 % | fp32 val % | p50 ms | p90 ms | size MB | RSS MB | front | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["trials"]:
        star = "*" if r["measured_untrained"] else ""
        lines.append(f"| {r['number']} | `{r['config']}` | {r['state']} | {_fmt(r['val_top1'])} | "
                     f"{_fmt(r['fp32_val_top1'])} | {_fmt(r['p50_ms'], '.3f')}{star} | {_fmt(r['p90_ms'], '.3f')}{star} | "
                     f"{_fmt(r['size_mb'], '.3f')}{star} | {_fmt(r['rss_mb'], '.1f')}{star} | "
                     f"{'yes' if r['number'] in report['front'] else ''} | {r['reason'][:120]} |")
    if report["finals"]:
        lines += ["", "## Retrained at the recipe's budget", "",
                  "| trial | config | int8 val top-1 % | p90 ms | size MB | within budget |", "|---|---|---|---|---|---|"]
        for f in report["finals"]:
            m = f.get("remeasured") or f["measured"]
            lines.append(f"| {f['trial']} | `{f['config']}` | {f['val_top1']:.2f} | {m['p90_ms']:.3f} | "
                         f"{m['size_mb']:.3f} | {'yes' if f['within_budget'] else 'no: ' + f.get('why_not', '')} |")
    w = report["winner"]
    lines += ["", "## Winner", ""]
    if w:
        lines.append(f"`{w['config']}`: int8 validation top-1 {w['val_top1']:.2f} %, test top-1 {w['test_top1']:.2f} %, "
                     f"p90 {w['remeasured']['p90_ms']:.3f} ms measured again (budget "
                     f"{_fmt(budget.get('p90_ms'), 'g')}), {w['remeasured']['size_mb']:.3f} MB. Export dir: "
                     f"`{w['export_dir']}`; `edgekd run best.yaml` reproduces it.")
    else:
        lines.append("None: no trained trial stayed inside the budgets. Loosen them, or add smaller students or "
                     "input sizes to the space.")
    lines += ["", "![every trial, the Pareto front and the budget](search.png)", ""]
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], front: list[int], budget: dict[str, float], winner: dict[str, Any] | None,
          path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    trained = [r for r in rows if r["state"] in TRAINED and r["p90_ms"] is not None]
    for state, marker, colour in (("complete", "o", "tab:blue"), ("over budget", "s", "tab:red")):
        pts = [r for r in trained if r["state"] == state]
        ax.scatter([r["p90_ms"] for r in pts], [r["val_top1"] for r in pts], marker=marker, c=colour,
                   label=f"{state} ({len(pts)})", zorder=3)
    untrained = [r for r in rows if r["state"] == "over budget (untrained)" and r["p90_ms"] is not None]
    if untrained:
        floor = min([r["val_top1"] for r in trained] or [0.0])
        ax.scatter([r["p90_ms"] for r in untrained], [floor] * len(untrained), marker="x", c="grey",
                   label=f"over budget, not trained ({len(untrained)})", zorder=2)
    line = sorted((r for r in trained if r["number"] in front), key=lambda r: r["p90_ms"])
    if line:
        ax.step([r["p90_ms"] for r in line], [r["val_top1"] for r in line], where="post", c="tab:green",
                label="Pareto front", zorder=1)
    if "p90_ms" in budget:
        ax.axvline(budget["p90_ms"], ls="--", c="k", lw=1, label=f"p90 budget {budget['p90_ms']:g} ms")
    if winner:
        ax.scatter([winner["remeasured"]["p90_ms"]], [winner["val_top1"]], marker="*", s=250, c="gold",
                   edgecolors="k", label="winner (retrained)" if not winner["proxy"] else "winner", zorder=4)
    ax.set_xlabel("int8 p90 latency on the target, ms")
    ax.set_ylabel("int8 validation top-1, %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
