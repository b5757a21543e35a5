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
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
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
    board: str | None = None  # expected substring of the runner's machine["board"]
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
    """Where the runner runs. ``run`` takes an argument list; SSH joins it with shlex.join.

    Every child (ssh, or the local runner) starts in its own process group, so a terminal's
    Ctrl-C reaches edgekd alone and edgekd decides what stops: ``cancel()`` kills every
    running child's group and any child started afterwards, under one lock, so no child can
    slip in between. Cleanup commands pass ``cancellable=False`` and still run after it.
    """

    def __init__(self, name: str, ssh: SSHOptions | None):
        self.name, self.ssh = name, ssh
        self.procs: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.cancelled = False

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

    def run(self, remote_argv: list[str], stdin: bytes | None = None, timeout: float = 60,
            cancellable: bool = True) -> subprocess.CompletedProcess:
        with self.lock:
            if cancellable and self.cancelled:
                raise _Cancelled
            proc = subprocess.Popen(self.argv(remote_argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
            if cancellable:
                self.procs.add(proc)
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            return subprocess.CompletedProcess(proc.args, 124, out, err)
        except BaseException:
            _kill_group(proc)  # never leave a child behind, whatever stopped us
            proc.wait()
            raise
        finally:
            with self.lock:
                self.procs.discard(proc)
        if cancellable and self.cancelled:
            raise _Cancelled
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            for proc in self.procs:
                _kill_group(proc)

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


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def board_name(machine: dict[str, Any]) -> str:
    """The board's identity as the runner reported it (one source: ``machine['board']``), else its CPU."""
    return machine.get("board") or machine.get("cpu") or "unknown machine"


def _role(model: str) -> str:
    """'student_int8.tflite' -> 'student': the sidecar is <role>.model.json."""
    return model.split("_")[0].split(".")[0]


SAMPLES_FILE = "samples.npz"


def _bundle(export_dir: Path, models: tuple[str, ...], samples: int) -> tuple[bytes, int]:
    """A tar of the runner, the models, their sidecars and the first ``samples`` test images of
    the export dir's ``samples.npz``; also the number of images it holds. Reads nothing outside
    ``export_dir``, so a copied export dir benches on its own."""
    path = export_dir / SAMPLES_FILE
    if not path.is_file():
        raise EdgekdError(f"{export_dir}: no {SAMPLES_FILE} (the test images the board scores); "
                          "run 'edgekd export RUN' again to write it")
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz["images"][:samples], npz["labels"][:samples]
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise EdgekdError(f"{path}: not a samples file written by edgekd export ({type(e).__name__}); "
                          "run 'edgekd export RUN' again") from None
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels) or len(images) == 0:
        raise EdgekdError(f"{path}: expected uint8 N x C x H x W images with N labels; run 'edgekd export RUN' again")
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=labels.astype(np.int64))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        tar.add(RUNNER, arcname="edgekd_runner.py")
        for name in models:
            tar.add(export_dir / name, arcname=name)
        for role in sorted({_role(m) for m in models}):
            tar.add(export_dir / f"{role}.model.json", arcname=f"{role}.model.json")
        info = tarfile.TarInfo(SAMPLES_FILE)
        info.size = buf.getbuffer().nbytes
        buf.seek(0)
        tar.addfile(info, buf)
    return out.getvalue(), len(images)


def _sidecar_tome(export_dir: Path, role: str) -> dict[str, Any] | None:
    path = export_dir / f"{role}.model.json"
    return json.loads(path.read_text()).get("tome") if path.is_file() else None


def tome_models(export_dir: Path, sweep: tuple[int, ...]) -> tuple[str, ...]:
    """The fp32 and int8 TFLite files of the ViT student for each r of ``sweep`` (any matcher):
    the student's own files for the r it was trained with, and ``student-tome-r{r}-*``."""
    own = _sidecar_tome(export_dir, "student")
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
            report = export_dir / "export.json"
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
    own = _sidecar_tome(export_dir, "student")
    if own is None:
        raise EdgekdError(f"--tome-sweep auto needs a ViT student; {export_dir} holds another model")
    arts = json.loads((export_dir / "export.json").read_text())["artifacts"]
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
        # Cleanup must run even after Ctrl-C, so it is not cancellable.
        stop = "" if finished else '[ -f "$1/runner.pid" ] && kill "$(cat "$1/runner.pid")" 2>/dev/null; '
        gone = target.run(["sh", "-c", stop + 'rm -rf -- "$1"', "sh", remote_dir], timeout=60, cancellable=False)
        if gone.returncode != 0:
            log.warning("%s: could not remove %s: %s", target.name, remote_dir, target.explain(gone))
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
        warnings.append(f"profile {profile.name} expects a '{profile.board}' but the board is "
                        f"{machine.get('board') or 'unnamed (no /proc/device-tree/model, no Model in /proc/cpuinfo)'}")
    if machine.get("throttled") not in (None, "0x0"):
        warnings.append(f"the board reports throttling {machine['throttled']} (power or heat); latencies may be high")
    return warnings


def bench(export_dir: str | Path, device: str = "local", hosts: tuple[str, ...] = (), *,
          ssh: SSHOptions | None = None, python: str | None = None, threads: int | None = None, runs: int = 200,
          warmup: int = 20, samples: int = 500, timeout: float = 300, remote_tmp: str = "/tmp",
          models: tuple[str, ...] = MODELS, tome_sweep: tuple[int, ...] = (), tome_auto: bool = False,
          tome_max_drop: float = 0.5) -> BenchResult:
    """Run the student int8 and fp32 and the teacher fp32 on each target; write bench.json and report.md.
    ``tome_sweep``: also the ViT student's ToMe files for each r (written by ``edgekd export
    --tome-sweep``), every matcher exported, in a ToMe table and an accuracy-vs-latency PNG.
    ``tome_auto``: time every int8 ToMe schedule the export dir has on each target and pick, per
    target, the fastest within ``tome_max_drop`` validation points of r = 0 that beats r = 0."""
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
    if tome_sweep:
        models = tuple(dict.fromkeys(models + tome_models(export_dir, tome_sweep)))
    auto_files = tome_auto_files(export_dir) if tome_auto else {}
    models = tuple(dict.fromkeys(models + tuple(auto_files)))
    present = tuple(m for m in models if (export_dir / m).is_file())
    if not any(m.startswith("student") for m in present):
        raise EdgekdError(f"{export_dir}: none of {', '.join(models)} is there; run 'edgekd export RUN --int8'")
    if ssh and ssh.identity and not Path(ssh.identity).is_file():
        raise EdgekdError(f"--identity {ssh.identity}: no such key file")
    threads = threads or profile.threads
    targets = [Target(h, ssh or SSHOptions()) for h in hosts] if profile.remote else [Target("local", None)]
    python = python or (sys.executable if not profile.remote else "python3")
    tmp = remote_tmp if profile.remote else tempfile.gettempdir()
    outcomes: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    pool = ThreadPoolExecutor(max_workers=len(targets))
    try:  # from here on, an interrupt at any moment stops every target and waits for its cleanup
        bundle, n_samples = _bundle(export_dir, present, samples)
        futures = {pool.submit(_bench_target, t, bundle, present, python, threads, warmup, runs, timeout, tmp): t
                   for t in targets}
        pending = set(futures)
        while pending:  # short waits: Ctrl-C is handled promptly whichever thread the signal hit
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            for fut in done:
                name = futures[fut].name
                try:
                    outcomes[name] = fut.result()
                except EdgekdError as e:  # one board failing does not stop the others
                    errors[name] = str(e)
    except BaseException:
        for t in targets:
            t.cancel()
        pool.shutdown(wait=True)  # each target removes its remote dir (bounded by its timeouts)
        raise
    pool.shutdown(wait=True)
    if not outcomes:
        raise EdgekdError(next(iter(errors.values())) if len(errors) == 1 else
                          "bench failed on every host: " + "; ".join(errors.values()))
    report = _report(export_dir, profile, outcomes, errors, threads, runs, warmup, n_samples)
    if tome_auto:
        report["tome_auto"] = {host: choose_tome(auto_files, models_run, tome_max_drop)
                               for host, models_run in outcomes.items()}
    files = _write(export_dir, report)
    if errors:
        raise EdgekdError(f"bench failed on {', '.join(errors)} ({'; '.join(errors.values())}); the other hosts' "
                          f"results are in {export_dir / 'bench.json'}")
    return BenchResult(export_dir / "bench.json", report, files)


def _report(export_dir: Path, profile: DeviceProfile, outcomes: dict[str, dict[str, Any]], errors: dict[str, str],
            threads: int, runs: int, warmup: int, samples: int) -> dict[str, Any]:
    hosts: dict[str, Any] = {}
    for host, models in outcomes.items():
        machine = next(iter(models.values()))["machine"]
        comparisons = {m: _ratios(r, models["teacher_fp32.tflite"]) for m, r in models.items()
                       if m.startswith("student") and "teacher_fp32.tflite" in models}
        student = "student_int8.tflite" if "student_int8.tflite" in models else next(
            m for m in models if m.startswith("student"))
        hosts[host] = {"status": "ok", "machine": machine, "warnings": _profile_warnings(profile, models),
                       "student": student, "comparison": comparisons.get(student), "comparisons": comparisons,
                       "models": models}
        for w in hosts[host]["warnings"]:
            log.info("%s: %s", host, w)  # the caller shows report warnings; logged for -v runs
    for host, error in errors.items():
        hosts[host] = {"status": "failed", "error": error}
    export = json.loads((export_dir / "export.json").read_text())
    tome = {}
    for host, models in outcomes.items():
        rows = []
        for name, r in models.items():
            t = _sidecar_tome(export_dir, _role(name)) if name.startswith("student") else None
            if t is not None:
                rows.append({"model": name, "r": t["r"], "matcher": t["matcher"] if t["r"] else "none",
                             "format": "int8" if "_int8" in name else "fp32", "p50_ms": r["latency_ms"]["p50"],
                             "accuracy": r["accuracy"]})
        if rows:
            tome[host] = sorted(rows, key=lambda row: (row["format"], row["r"] > 0, row["matcher"], row["r"]))
    return {"schema": BENCH_SCHEMA, "edgekd_version": __version__, "export_dir": str(export_dir),
            "device": profile.name, "threads": threads, "runs": runs, "warmup": warmup, "samples": samples,
            "export_test_top1": {k: v["test_top1"] for k, v in export["artifacts"].items()}, "hosts": hosts,
            **({"tome": tome} if tome else {})}


def ok_hosts(report: dict[str, Any]) -> dict[str, Any]:
    """The hosts of a bench report whose bench finished."""
    return {h: v for h, v in report["hosts"].items() if v.get("status", "ok") == "ok"}


def _write(export_dir: Path, report: dict[str, Any]) -> list[Path]:
    write_json(export_dir / "bench.json", report)
    png = export_dir / "bench_latency.png"
    _histogram(report, png)
    files = [export_dir / "bench.json", png, export_dir / "report.md"]
    if report.get("tome"):
        _tome_plot(report, export_dir / "bench_tome.png")
        files.append(export_dir / "bench_tome.png")
    write_text(export_dir / "report.md", render_markdown(report, png.name))
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

    from edgekd.checkpoint import atomic_path

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
        lines += ["", "![ToMe accuracy vs latency](bench_tome.png)", ""]
    for host, choice in report.get("tome_auto", {}).items():
        lines += [f"ToMe auto on {host}: **{choice['file']}** (schedule {choice['schedule']}): {choice['reason']}", ""]
    if png:
        lines += [f"![latency histogram]({png})", ""]
    return "\n".join(lines)
