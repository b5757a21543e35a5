"""How bench reaches a board: the OpenSSH client, or a subprocess here for ``--device local``.

The bundle goes over SSH (so ``~/.ssh/config`` aliases, agents and jump hosts work) into a
fresh remote temp dir, which is removed afterwards, also on failure and Ctrl-C. Host keys are
checked against known_hosts; a new key is accepted only with ``accept_new_host_key``. Every
remote command is a list of arguments joined with ``shlex.join``, so no user string reaches
the remote shell unquoted.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekd import artifacts
from edgekd.errors import EdgekdError

log = logging.getLogger(__name__)
RUNNER_NAME = "edgekd_runner.py"  # the runner's file name on the board


@dataclass
class SSHOptions:
    port: int | None = None
    identity: Path | None = None
    known_hosts: Path | None = None  # default: OpenSSH's own (~/.ssh/known_hosts)
    accept_new_host_key: bool = False
    connect_timeout: int = 10


class Cancelled(Exception):
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
                raise Cancelled
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
            raise Cancelled
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


def run_bundle(target: Target, bundle: bytes, models: tuple[str, ...], python: str, threads: int, warmup: int,
               runs: int, timeout: float, remote_tmp: str) -> dict[str, Any]:
    """Unpack ``bundle`` into a fresh temp dir on ``target``, run the runner on each model, and
    remove the dir again (also after Ctrl-C or a failure); model -> the runner's JSON."""
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
            role = artifacts.role_of(model)
            # `sh -c` records the pid of `timeout` so cleanup can stop a runner that outlives its SSH
            # session (Ctrl-C, a dropped link); the script is constant, every path is a positional argument.
            argv = ["sh", "-c", 'echo $$ > "$1/runner.pid"; shift; exec "$@"', "sh", remote_dir,
                    "timeout", "-k", "5", str(int(timeout)), python, f"{remote_dir}/{RUNNER_NAME}",
                    "--model", f"{remote_dir}/{model}", "--meta", f"{remote_dir}/{artifacts.sidecar(role)}",
                    "--samples", f"{remote_dir}/{artifacts.SAMPLES}", "--threads", str(threads),
                    "--warmup", str(warmup), "--runs", str(runs)]
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
    if proc.returncode in (137, -9, 143, -15) or (proc.returncode == 255 and _died_on_the_board(target, proc)):
        raise EdgekdError(f"{target.name}: the runner was killed while timing {model} (exit {proc.returncode}; "
                          "out of memory or stopped by someone)")
    if proc.returncode == 127:
        raise EdgekdError(f"{target.name}: '{python}' or 'timeout' not found there; pass --python PATH")
    if proc.returncode != 0 or not isinstance(data, dict):
        raise EdgekdError(f"{target.name}: runner on {model} failed: {target.explain(proc)}")
    return data


def _died_on_the_board(target: Target, proc: subprocess.CompletedProcess) -> bool:
    """OpenSSH exits 255 for its own errors and also when the remote command died by a signal. Its
    own errors leave a line on stderr; the runner may have left one too (LiteRT's banner) before it
    was killed, so a board that still answers tells the two apart: the link held, the runner died."""
    return not proc.stderr.strip() or target.run(["true"], timeout=30).returncode == 0
