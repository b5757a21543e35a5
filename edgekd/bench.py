"""``bench(export_dir, device, hosts) -> BenchResult``: latency, memory and accuracy of the
student against the teacher, measured on the board by ``deploy/edgekd_runner.py``.

The bundle (models, sidecars, the runner, N test samples) goes over SSH with the OpenSSH
client (so ``~/.ssh/config`` aliases, agents and jump hosts work) into a fresh remote temp
dir, which is removed afterwards, also on failure and Ctrl-C. Host keys are checked against
known_hosts; a new key is accepted only with ``accept_new_host_key``. Every remote command is
a list of arguments joined with ``shlex.join``, so no user string reaches the remote shell
unquoted. Several hosts run concurrently, one thread each. ``device="local"`` runs the same
runner in a subprocess here, through the same code path minus SSH.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekd import __version__
from edgekd.checkpoint import write_json, write_text
from edgekd.errors import EdgekdError

log = logging.getLogger(__name__)
BENCH_SCHEMA = "edgekd.bench/1"
RUNNER = Path(__file__).resolve().parents[1] / "deploy" / "edgekd_runner.py"
MODELS = ("student_int8.tflite", "student_fp32.tflite", "teacher_fp32.tflite")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    threads: int
    arch: tuple[str, ...] = ()  # expected `uname -m`; empty: any
    board: str | None = None  # expected substring of /proc/device-tree/model
    remote: bool = True


PROFILES = {
    "local": DeviceProfile("local", threads=min(4, os.cpu_count() or 1), remote=False),
    "rpi4": DeviceProfile("rpi4", threads=4, arch=("aarch64", "armv7l"), board="Raspberry Pi 4"),
    "rpi5": DeviceProfile("rpi5", threads=4, arch=("aarch64",), board="Raspberry Pi 5"),
    "generic-arm64": DeviceProfile("generic-arm64", threads=4, arch=("aarch64",)),
}


@dataclass
class SSHOptions:
    port: int | None = None
    identity: Path | None = None
    known_hosts: Path | None = None  # default: OpenSSH's own (~/.ssh/known_hosts)
    accept_new_host_key: bool = False
    connect_timeout: int = 10


@dataclass
class BenchResult:
    path: Path
    report: dict[str, Any]
    files: list[Path] = field(default_factory=list)


class _Cancelled(Exception):
    pass


class Target:
    """Where the runner runs. ``run`` takes an argument list; SSH joins it with shlex.join."""

    def __init__(self, name: str, ssh: SSHOptions | None, cancel: threading.Event):
        self.name, self.ssh, self.cancel = name, ssh, cancel
        self.procs: set[subprocess.Popen] = set()
        self.lock = threading.Lock()

    def argv(self, remote_argv: list[str]) -> list[str]:
        if self.ssh is None:
            return remote_argv
        o = self.ssh
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={o.connect_timeout}",
               "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
               "-o", f"StrictHostKeyChecking={'accept-new' if o.accept_new_host_key else 'yes'}"]
        if o.port:
            cmd += ["-p", str(o.port)]
        if o.identity:
            cmd += ["-i", str(o.identity), "-o", "IdentitiesOnly=yes"]
        if o.known_hosts:
            cmd += ["-o", f"UserKnownHostsFile={o.known_hosts}"]
        return [*cmd, "--", self.name, shlex.join(remote_argv)]

    def run(self, remote_argv: list[str], stdin: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        if self.cancel.is_set():
            raise _Cancelled
        proc = subprocess.Popen(self.argv(remote_argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        with self.lock:
            self.procs.add(proc)
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            return subprocess.CompletedProcess(proc.args, 124, out, err)
        finally:
            with self.lock:
                self.procs.discard(proc)
        if self.cancel.is_set():
            raise _Cancelled
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def kill_all(self) -> None:
        with self.lock:
            for proc in self.procs:
                proc.kill()

    def check(self, proc: subprocess.CompletedProcess, what: str) -> str:
        if proc.returncode == 0:
            return proc.stdout.decode()
        raise EdgekdError(f"{self.name}: {what} failed: {self.explain(proc)}")

    def explain(self, proc: subprocess.CompletedProcess) -> str:
        err = proc.stderr.decode(errors="replace")
        port = self.ssh.port if self.ssh and self.ssh.port else 22
        if self.ssh and proc.returncode == 255:
            if "REMOTE HOST IDENTIFICATION HAS CHANGED" in err or "Host key for" in err and "has changed" in err:
                return (f"the host key of {self.name} has CHANGED since it was recorded in known_hosts (a reinstalled "
                        f"board, or a man-in-the-middle); if you trust it: ssh-keygen -R '{self.name}'")
            if "Host key verification failed" in err or "No ED25519 host key is known" in err:
                return (f"the host key of {self.name} is not in known_hosts; verify it and connect once with ssh, "
                        "or pass --accept-new-host-key")
            if "Permission denied" in err:
                return f"{self.name} refused the login (permission denied); check the user, --identity or ssh-copy-id"
            if "Connection refused" in err:
                return f"connection refused on port {port}; is sshd running there, or is --port wrong?"
            if "Could not resolve hostname" in err:
                return f"cannot resolve host name of {self.name}"
            if "timed out" in err:
                return f"connection to port {port} timed out"
        lines = [ln.strip() for ln in err.splitlines() if ln.strip() and not ln.startswith("Warning: Permanently")]
        return lines[-1][:300] if lines else f"exit code {proc.returncode}"


def _role(model: str) -> str:
    """'student_int8.tflite' -> 'student': the sidecar is <role>.model.json."""
    return model.split("_")[0].split(".")[0]


def _bundle(export_dir: Path, models: tuple[str, ...], samples: int, seed: int) -> bytes:
    """A tar of the runner, the models, their sidecars and ``samples`` test images."""
    from edgekd.checkpoint import load_checkpoint
    from edgekd.data import gather, load_dataset
    from edgekd.recipe import recipe_from_dict

    ckpt = load_checkpoint(export_dir.parent / "student_best.pt")
    recipe = recipe_from_dict(ckpt["recipe"])
    images, labels = gather(load_dataset(recipe.data, recipe.seed).test, samples, seed=seed)
    buf = io.BytesIO()
    np.savez(buf, images=images.numpy().astype(np.uint8), labels=labels.numpy().astype(np.int64))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        tar.add(RUNNER, arcname="edgekd_runner.py")
        for name in models:
            tar.add(export_dir / name, arcname=name)
        for role in sorted({_role(m) for m in models}):
            tar.add(export_dir / f"{role}.model.json", arcname=f"{role}.model.json")
        info = tarfile.TarInfo("samples.npz")
        info.size = buf.getbuffer().nbytes
        buf.seek(0)
        tar.addfile(info, buf)
    return out.getvalue()


def _bench_target(target: Target, bundle: bytes, models: tuple[str, ...], python: str, threads: int, warmup: int,
                  runs: int, timeout: float, remote_tmp: str) -> dict[str, Any]:
    made = target.check(target.run(["mktemp", "-d", f"{remote_tmp.rstrip('/')}/edgekd.XXXXXXXX"]), "creating a temp dir")
    remote_dir = made.strip().splitlines()[-1] if made.strip() else ""
    if not remote_dir.startswith(remote_tmp.rstrip("/") + "/edgekd."):
        raise EdgekdError(f"{target.name}: mktemp gave an unexpected path {remote_dir!r}")
    results: dict[str, Any] = {}
    finished = False
    try:
        target.check(target.run(["tar", "-x", "-f", "-", "-C", remote_dir], stdin=bundle, timeout=timeout),
                     "copying the bundle")
        for model in models:
            role = _role(model)
            # `sh -c` records the pid of `timeout` so cleanup can stop a runner that outlives its SSH
            # session (Ctrl-C, a dropped link); the script is constant, every path is a positional argument.
            argv = ["sh", "-c", 'echo $$ > "$1/runner.pid"; shift; exec "$@"', "sh", remote_dir,
                    "timeout", "-k", "5", str(int(timeout)), python, f"{remote_dir}/edgekd_runner.py",
                    "--model", f"{remote_dir}/{model}", "--meta", f"{remote_dir}/{role}.model.json",
                    "--samples", f"{remote_dir}/samples.npz", "--threads", str(threads), "--warmup", str(warmup),
                    "--runs", str(runs)]
            proc = target.run(argv, timeout=timeout + 30)
            results[model] = _runner_json(target, proc, model, timeout, python)
            log.info("%s %s: p50 %.3f ms, accuracy %s", target.name, model, results[model]["latency_ms"]["p50"],
                     results[model]["accuracy"])
        finished = True
    finally:
        # Cleanup must run even after Ctrl-C, so it ignores the cancel flag.
        cancel, target.cancel = target.cancel, threading.Event()
        stop = "" if finished else '[ -f "$1/runner.pid" ] && kill "$(cat "$1/runner.pid")" 2>/dev/null; '
        try:
            gone = target.run(["sh", "-c", stop + 'rm -rf -- "$1"', "sh", remote_dir], timeout=60)
            if gone.returncode != 0:
                log.warning("%s: could not remove %s: %s", target.name, remote_dir, target.explain(gone))
        finally:
            target.cancel = cancel
    return results


def _runner_json(target: Target, proc: subprocess.CompletedProcess, model: str, timeout: float,
                 python: str) -> dict[str, Any]:
    text = proc.stdout.decode(errors="replace").strip().splitlines()
    try:
        data = json.loads(text[-1]) if text else None
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and "error" in data:
        raise EdgekdError(f"{target.name}: runner on {model}: {data['error']}")
    if proc.returncode == 124:
        raise EdgekdError(f"{target.name}: runner on {model} timed out after {timeout:.0f} s (raise --timeout)")
    if proc.returncode in (137, -9, 143, -15) or (proc.returncode == 255 and not proc.stderr.strip()):
        raise EdgekdError(f"{target.name}: the runner was killed while timing {model} (exit {proc.returncode}; "
                          "out of memory or stopped by someone)")
    if proc.returncode == 127:
        raise EdgekdError(f"{target.name}: '{python}' or 'timeout' not found there; pass --python PATH")
    if proc.returncode != 0 or not isinstance(data, dict):
        raise EdgekdError(f"{target.name}: runner on {model} failed: {target.explain(proc)}")
    return data


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


def _profile_warnings(profile: DeviceProfile, models: dict[str, Any]) -> list[str]:
    first = next(iter(models.values()))
    machine, warnings = first["machine"], []
    if first["threads"] < first.get("threads_requested", first["threads"]):
        warnings.append(f"asked for {first['threads_requested']} threads but the board gives this process "
                        f"{first['threads']} cores; ran with {first['threads']}")
    if profile.arch and machine.get("arch") not in profile.arch:
        warnings.append(f"profile {profile.name} expects {'/'.join(profile.arch)} but the board is "
                        f"{machine.get('arch')}")
    if profile.board and profile.board not in (machine.get("board") or ""):
        warnings.append(f"profile {profile.name} expects a '{profile.board}' but the board says "
                        f"{machine.get('board') or 'nothing in /proc/device-tree/model'}")
    if machine.get("throttled") not in (None, "0x0"):
        warnings.append(f"the board reports throttling {machine['throttled']} (power or heat); latencies may be high")
    return warnings


def bench(export_dir: str | Path, device: str = "local", hosts: tuple[str, ...] = (), *,
          ssh: SSHOptions | None = None, python: str | None = None, threads: int | None = None, runs: int = 200,
          warmup: int = 20, samples: int = 500, timeout: float = 300, remote_tmp: str = "/tmp",
          models: tuple[str, ...] = MODELS, seed: int = 0) -> BenchResult:
    """Run the student int8 and fp32 and the teacher fp32 on each target; write bench.json and report.md."""
    export_dir = Path(export_dir)
    if device not in PROFILES:
        raise EdgekdError(f"unknown device '{device}'; choose from {', '.join(PROFILES)}")
    profile = PROFILES[device]
    if profile.remote and not hosts:
        raise EdgekdError(f"--device {device} needs --host USER@BOARD (or --device local)")
    if not profile.remote and hosts:
        raise EdgekdError("--device local runs here; drop --host or pick a board profile such as rpi4")
    for h in hosts:
        if not h or h.startswith("-") or any(c.isspace() for c in h):
            raise EdgekdError(f"--host {h!r} is not a host name; use USER@HOST or an ~/.ssh/config alias")
    if runs < 1 or samples < 1 or warmup < 0:
        raise EdgekdError("--runs and --samples must be at least 1, --warmup at least 0")
    if not (export_dir / "export.json").is_file():
        raise EdgekdError(f"{export_dir}: no export.json; run 'edgekd export RUN --int8' first")
    present = tuple(m for m in models if (export_dir / m).is_file())
    if not any(m.startswith("student") for m in present):
        raise EdgekdError(f"{export_dir}: none of {', '.join(models)} is there; run 'edgekd export RUN --int8'")
    if ssh and ssh.identity and not Path(ssh.identity).is_file():
        raise EdgekdError(f"--identity {ssh.identity}: no such key file")
    bundle = _bundle(export_dir, present, samples, seed)
    threads = threads or profile.threads
    cancel = threading.Event()
    targets = ([Target(h, ssh or SSHOptions(), cancel) for h in hosts] if profile.remote
               else [Target("local", None, cancel)])
    python = python or (sys.executable if not profile.remote else "python3")
    with ThreadPoolExecutor(max_workers=len(targets)) as pool:
        futures = {t.name: pool.submit(_bench_target, t, bundle, present, python, threads, warmup, runs, timeout,
                                       remote_tmp if profile.remote else tempfile.gettempdir())
                   for t in targets}
        try:
            outcomes = {}
            for name, fut in futures.items():
                outcomes[name] = fut.result()
        except KeyboardInterrupt:
            cancel.set()
            for t in targets:
                t.kill_all()
            for fut in futures.values():  # let each target remove its remote dir
                try:
                    fut.result()
                except (_Cancelled, EdgekdError):
                    pass
            raise
        except _Cancelled:
            raise EdgekdError("interrupted") from None
        except EdgekdError:
            cancel.set()  # stop the other hosts early; their finally blocks clean up
            for t in targets:
                t.kill_all()
            raise
    report = _report(export_dir, profile, outcomes, threads, runs, warmup)
    files = _write(export_dir, report)
    return BenchResult(export_dir / "bench.json", report, files)


def _report(export_dir: Path, profile: DeviceProfile, outcomes: dict[str, dict[str, Any]], threads: int, runs: int,
            warmup: int) -> dict[str, Any]:
    hosts = {}
    for host, models in outcomes.items():
        machine = next(iter(models.values()))["machine"]
        comparisons = {m: _ratios(r, models["teacher_fp32.tflite"]) for m, r in models.items()
                       if m.startswith("student") and "teacher_fp32.tflite" in models}
        student = "student_int8.tflite" if "student_int8.tflite" in models else next(
            m for m in models if m.startswith("student"))
        hosts[host] = {"machine": machine, "warnings": _profile_warnings(profile, models), "student": student,
                       "comparison": comparisons.get(student), "comparisons": comparisons, "models": models}
        for w in hosts[host]["warnings"]:
            log.info("%s: %s", host, w)  # the caller shows report warnings; logged for -v runs
    export = json.loads((export_dir / "export.json").read_text())
    return {"schema": BENCH_SCHEMA, "edgekd_version": __version__, "export_dir": str(export_dir),
            "device": profile.name, "threads": threads, "runs": runs, "warmup": warmup,
            "export_test_top1": {k: v["test_top1"] for k, v in export["artifacts"].items()}, "hosts": hosts}


def _write(export_dir: Path, report: dict[str, Any]) -> list[Path]:
    write_json(export_dir / "bench.json", report)
    png = export_dir / "bench_latency.png"
    _histogram(report, png)
    write_text(export_dir / "report.md", render_markdown(report, png.name))
    return [export_dir / "bench.json", png, export_dir / "report.md"]


def _histogram(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgekd.checkpoint import atomic_path

    hosts = report["hosts"]
    fig, axes = plt.subplots(len(hosts), 1, figsize=(7, 2.8 * len(hosts)), squeeze=False)
    for ax, (host, h) in zip(axes[:, 0], hosts.items(), strict=True):
        for model, r in h["models"].items():
            ax.hist(r["latencies_ms"], bins=40, alpha=0.6, label=f"{model} (p50 {r['latency_ms']['p50']:.2f} ms)")
        ax.set_xscale("log")
        ax.set_xlabel("latency per invoke, ms (log scale)")
        ax.set_ylabel("runs")
        ax.set_title(f"{host}: {h['machine'].get('board') or h['machine'].get('cpu')}, {report['threads']} threads")
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def render_markdown(report: dict[str, Any], png: str | None = None) -> str:
    lines = [f"# edgekd bench: {report['device']} ({report['threads']} threads, {report['runs']} timed runs)", ""]
    for host, h in report["hosts"].items():
        m = h["machine"]
        lines += [f"## {host}", "", f"{m.get('board') or m.get('cpu')} · {m.get('arch')} · {m.get('cores')} cores · "
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
    if png:
        lines += [f"![latency histogram]({png})", ""]
    return "\n".join(lines)
