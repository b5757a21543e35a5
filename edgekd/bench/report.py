"""What a bench writes: bench.json (schema ``edgekd.bench/1``), report.md and the plots."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from edgekd import __version__, artifacts
from edgekd.bench.profiles import DeviceProfile, profile_warnings
from edgekd.bench.tome import tome_rows
from edgekd.checkpoint import atomic_path, write_json, write_text

log = logging.getLogger(__name__)


def board_name(machine: dict[str, Any]) -> str:
    """The board's identity as the runner reported it (one source: ``machine['board']``), else its CPU."""
    return machine.get("board") or machine.get("cpu") or "unknown machine"


def _ratios(student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, float | None]:
    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    s, t = student, teacher
    return {
        "latency_p50_ratio": ratio(s["latency_ms"]["p50"], t["latency_ms"]["p50"]),
        "latency_p90_ratio": ratio(s["latency_ms"]["p90"], t["latency_ms"]["p90"]),
        "size_ratio": ratio(s["size_bytes"], t["size_bytes"]),
        "peak_rss_ratio": ratio(s["memory_kb"]["peak_rss"], t["memory_kb"]["peak_rss"]),
        "speedup": ratio(t["latency_ms"]["p50"], s["latency_ms"]["p50"]),
        "accuracy_diff": (s["accuracy"] - t["accuracy"]) if s["accuracy"] is not None and t["accuracy"] is not None
        else None,
    }


def build_report(export_dir: Path, profile: DeviceProfile, outcomes: dict[str, dict[str, Any]],
                 errors: dict[str, str], threads: int, runs: int, warmup: int, samples: int) -> dict[str, Any]:
    """bench.json's content: per host its machine, every model's figures and the student/teacher ratios."""
    teacher, int8 = artifacts.tflite_file("teacher", "fp32"), artifacts.tflite_file("student", "int8")
    hosts: dict[str, Any] = {}
    for host, models in outcomes.items():
        machine = next(iter(models.values()))["machine"]
        comparisons = {m: _ratios(r, models[teacher]) for m, r in models.items()
                       if m.startswith("student") and teacher in models}
        student = int8 if int8 in models else next(
            m for m in models if m.startswith("student"))
        hosts[host] = {"status": "ok", "machine": machine, "warnings": profile_warnings(profile, models),
                       "student": student, "comparison": comparisons.get(student), "comparisons": comparisons,
                       "models": models}
        for w in hosts[host]["warnings"]:
            log.info("%s: %s", host, w)  # the caller shows report warnings; logged for -v runs
    for host, error in errors.items():
        hosts[host] = {"status": "failed", "error": error}
    export = json.loads((export_dir / artifacts.EXPORT_REPORT).read_text())
    tome = tome_rows(export_dir, outcomes)
    return {"schema": artifacts.BENCH_SCHEMA, "edgekd_version": __version__, "export_dir": str(export_dir),
            "device": profile.name, "threads": threads, "runs": runs, "warmup": warmup, "samples": samples,
            "export_test_top1": {k: v["test_top1"] for k, v in export["artifacts"].items()}, "hosts": hosts,
            **({"tome": tome} if tome else {})}


ok_hosts = artifacts.finished_hosts  # the one rule of which hosts finished


def write_report(export_dir: Path, report: dict[str, Any]) -> list[Path]:
    write_json(export_dir / artifacts.BENCH_REPORT, report)
    png = export_dir / artifacts.BENCH_LATENCY_PNG
    _histogram(report, png)
    files = [export_dir / artifacts.BENCH_REPORT, png, export_dir / artifacts.BENCH_MARKDOWN]
    if report.get("tome"):
        _tome_plot(report, export_dir / artifacts.BENCH_TOME_PNG)
        files.append(export_dir / artifacts.BENCH_TOME_PNG)
    write_text(export_dir / artifacts.BENCH_MARKDOWN, render_markdown(report, png.name))
    return files


def _tome_plot(report: dict[str, Any], path: Path) -> None:
    """Accuracy against p50 latency for every r, one line per matcher and format, per host."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hosts = report["tome"]
    fig, axes = plt.subplots(1, len(hosts), figsize=(6.5 * len(hosts), 4.2), squeeze=False)
    for ax, (host, rows) in zip(axes[0], hosts.items(), strict=True):
        for fmt in ("fp32", "int8"):
            for matcher in ("exact", "lsh"):
                pts = sorted((row for row in rows if row["format"] == fmt and row["matcher"] in (matcher, "none")),
                             key=lambda row: row["r"])
                if len(pts) < 2 and not any(row["matcher"] == matcher for row in pts):
                    continue
                ax.plot([p["p50_ms"] for p in pts], [100 * p["accuracy"] for p in pts],
                        "-" if fmt == "fp32" else "--", marker="o" if matcher == "exact" else "s",
                        label=f"{matcher} {fmt}")
                for p in pts:
                    ax.annotate(f"r={p['r']}", (p["p50_ms"], 100 * p["accuracy"]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
        teacher = report["hosts"][host]["models"].get("teacher_fp32.tflite")
        if teacher:
            ax.scatter([teacher["latency_ms"]["p50"]], [100 * teacher["accuracy"]], marker="*", s=80,
                       label="teacher fp32")
        ax.set_xlabel("p50 latency, ms")
        ax.set_ylabel("accuracy on the bundled samples, %")
        ax.set_title(f"{host}: ToMe r sweep")
        ax.legend(fontsize=7)
    _save_png(fig, path)


def _save_png(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _histogram(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hosts = ok_hosts(report)
    fig, axes = plt.subplots(len(hosts), 1, figsize=(7, 2.8 * len(hosts)), squeeze=False)
    for ax, (host, h) in zip(axes[:, 0], hosts.items(), strict=True):
        for model, r in h["models"].items():
            ax.hist(r["latencies_ms"], bins=40, alpha=0.6, label=f"{model} (p50 {r['latency_ms']['p50']:.2f} ms)")
        ax.set_xscale("log")
        ax.set_xlabel("latency per invoke, ms (log scale)")
        ax.set_ylabel("runs")
        ax.set_title(f"{host}: {board_name(h['machine'])}, {report['threads']} threads")
        ax.legend(fontsize=8)
    _save_png(fig, path)


def render_markdown(report: dict[str, Any], png: str | None = None) -> str:
    lines = [f"# edgekd bench: {report['device']} ({report['threads']} threads, {report['runs']} timed runs)", ""]
    for host, h in report["hosts"].items():
        if h.get("status", "ok") != "ok":
            lines += [f"## {host}", "", f"**bench failed**: {h['error']}", ""]
            continue
        m = h["machine"]
        lines += [f"## {host}", "", f"{board_name(m)} · {m.get('arch')} · {m.get('cores')} cores · "
                  f"Python {m.get('python')} · throttled {m.get('throttled')}", ""]
        lines += ["| model | size KB | p50 ms | p90 ms | p99 ms | peak RSS MB | accuracy |", "|---|---|---|---|---|---|---|"]
        for name, r in h["models"].items():
            lat = r["latency_ms"]
            lines.append(f"| {name} | {r['size_bytes'] / 1024:,.0f} | {lat['p50']:.3f} | {lat['p90']:.3f} | "
                         f"{lat['p99']:.3f} | {r['memory_kb']['peak_rss'] / 1024:.1f} | {100 * r['accuracy']:.2f} % |")
        c = h["comparison"]
        if c:
            lines += ["", f"{h['student']} vs teacher_fp32.tflite: {c['speedup']:.2f}× the teacher's speed (p50 "
                      f"ratio {c['latency_p50_ratio']:.3f}), size ratio {c['size_ratio']:.3f}, peak RSS ratio "
                      f"{c['peak_rss_ratio']:.2f}, accuracy {100 * c['accuracy_diff']:+.2f} pt"]
        lines += [f"- warning: {w}" for w in h["warnings"]]
        lines.append("")
    for host, rows in report.get("tome", {}).items():
        base = {row["format"]: row["p50_ms"] for row in rows if row["r"] == 0}
        lines += [f"## ToMe on {host}", "", "| r | matcher | format | p50 ms | speed-up vs r=0 | accuracy |",
                  "|---|---|---|---|---|---|"]
        for row in rows:
            speed = f"{base[row['format']] / row['p50_ms']:.2f}×" if row["format"] in base else "–"
            lines.append(f"| {row['r']} | {row['matcher']} | {row['format']} | {row['p50_ms']:.3f} | {speed} | "
                         f"{100 * row['accuracy']:.2f} % |")
        lines += ["", f"![ToMe accuracy vs latency]({artifacts.BENCH_TOME_PNG})", ""]
    for host, choice in report.get("tome_auto", {}).items():
        lines += [f"ToMe auto on {host}: **{choice['file']}** (schedule {choice['schedule']}): {choice['reason']}", ""]
    if png:
        lines += [f"![latency histogram]({png})", ""]
    return "\n".join(lines)

