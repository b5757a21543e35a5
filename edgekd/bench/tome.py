"""The ToMe part of the bench: which ToMe files to time (``--tome-sweep``), the per-target
choice among them (``--tome-sweep auto``), and the rows of the ToMe table. The merging itself
is the model library's (``edgekd.tome``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgekd import artifacts
from edgekd.errors import EdgekdError


def sidecar_tome(export_dir: Path, role: str) -> dict[str, Any] | None:
    """The ToMe setting a sidecar records (None: not a ViT file)."""
    path = export_dir / artifacts.sidecar(role)
    return json.loads(path.read_text()).get("tome") if path.is_file() else None


def tome_models(export_dir: Path, sweep: tuple[int, ...]) -> tuple[str, ...]:
    """The fp32 and int8 TFLite files of the ViT student for each r of ``sweep`` (any matcher):
    the student's own files for the r it was trained with, and ``student-tome-r{r}-*``."""
    own = sidecar_tome(export_dir, "student")
    if own is None:
        raise EdgekdError(f"--tome-sweep needs a ViT student; {export_dir} holds another model")
    found: list[str] = []
    for r in dict.fromkeys(sweep):
        if r < 0:
            raise EdgekdError(f"--tome-sweep: r must be 0 or more, got {r}")
        # at the r it was trained with, the student's own files are that r's own matcher; the other
        # matcher at the same r has its own files
        names = ["student_fp32.tflite", "student_int8.tflite"] if r == own["r"] else []
        names += sorted(p.name for p in export_dir.glob(f"student-tome-r{r}-*.tflite"))
        names = [n for n in names if (export_dir / n).is_file()]
        if not names:
            report = export_dir / artifacts.EXPORT_REPORT
            refused = json.loads(report.read_text()).get("refused", {}) if report.is_file() else {}
            why = [w for role, w in refused.items() if role.startswith(f"student-tome-r{r}-")]
            if why:
                raise EdgekdError(f"{export_dir} has no ToMe r={r} files: export refused them: {why[0]}")
            wanted = ",".join(str(v) for v in sweep)
            raise EdgekdError(f"{export_dir} has no ToMe r={r} files; run 'edgekd export RUN --int8 "
                              f"--tome-sweep {wanted} --tome-matcher exact,lsh' first")
        found += names
    return tuple(found)


def tome_auto_files(export_dir: Path) -> dict[str, dict[str, Any]]:
    """The int8 ToMe files ``bench --tome-sweep auto`` chooses among: file → {schedule, val_top1}.
    r = 0 (the unpatched student) and every exact-matcher schedule that ``edgekd export
    --tome-sweep`` or ``--tome-r auto`` wrote, each with the validation top-1 export measured."""
    own = sidecar_tome(export_dir, "student")
    if own is None:
        raise EdgekdError(f"--tome-sweep auto needs a ViT student; {export_dir} holds another model")
    arts = json.loads((export_dir / artifacts.EXPORT_REPORT).read_text())["artifacts"]
    found: dict[str, dict[str, Any]] = {}
    for name, a in arts.items():
        if not name.endswith("_int8.tflite") or not (export_dir / name).is_file() or "val_top1" not in a:
            continue
        tome = a.get("tome") or (own if name == "student_int8.tflite" and own["r"] == 0 else None)
        if tome is not None and (tome["r"] == 0 or tome.get("matcher") == "exact"):
            found[name] = {"schedule": list(tome.get("schedule") or []), "val_top1": a["val_top1"]}
    base = [n for n, f in found.items() if not any(f["schedule"])]
    if not base or len(found) < 2:
        raise EdgekdError(f"{export_dir} has no int8 ToMe files with validation scores to choose among; run "
                          "'edgekd export RUN --int8 --tome-sweep 0,2,4,8' first")
    depth = max(len(f["schedule"]) for f in found.values())
    for f in found.values():  # r = 0: no schedule recorded for the unpatched file
        f["schedule"] = f["schedule"] or [0] * depth
    return found


def choose_tome(candidates: dict[str, dict[str, Any]], models: dict[str, Any], max_drop: float) -> dict[str, Any]:
    """``--tome-sweep auto`` on one target: among ``candidates`` (``tome_auto_files``), the fastest
    int8 ToMe schedule by this target's p50 (``models``: its bench results) within ``max_drop``
    validation points of r = 0 that beats r = 0 (else r = 0); see edgekd.tome.auto."""
    from edgekd.tome.auto import choose_schedule

    files = {n: f for n, f in candidates.items() if n in models}
    by_schedule = {tuple(f["schedule"]): n for n, f in files.items()}
    depth = len(next(iter(files.values()))["schedule"])
    choice = choose_schedule([list(s) for s in by_schedule if any(s)], depth,
                             lambda every: [models[by_schedule[tuple(s)]]["latency_ms"]["p50"] for s in every],
                             lambda s: files[by_schedule[tuple(s)]]["val_top1"], max_drop)
    return {**choice.as_dict(), "file": by_schedule[tuple(choice.schedule)], "max_drop": max_drop}



def tome_rows(export_dir: Path, outcomes: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per host, a row for every ToMe-aware student file benched there (r, matcher, format, p50, accuracy)."""
    tome = {}
    for host, models in outcomes.items():
        rows = []
        for name, r in models.items():
            t = sidecar_tome(export_dir, artifacts.role_of(name)) if name.startswith("student") else None
            if t is not None:
                rows.append({"model": name, "r": t["r"], "matcher": t["matcher"] if t["r"] else "none",
                             "format": "int8" if "_int8" in name else "fp32", "p50_ms": r["latency_ms"]["p50"],
                             "accuracy": r["accuracy"]})
        if rows:
            tome[host] = sorted(rows, key=lambda row: (row["format"], row["r"] > 0, row["matcher"], row["r"]))
    return tome
