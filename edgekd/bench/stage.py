"""``bench(export_dir, device, hosts) -> BenchResult``: latency, memory and accuracy of the
student against the teacher, measured on the board by edgekd's standalone runner
(``edgekd/runner.py``, pushed with the models over SSH; ``device="local"`` runs it in a
subprocess here through the same code path minus SSH). Several hosts run concurrently, one
thread each; one failing host does not stop the others.
"""

from __future__ import annotations

import sys
import tempfile
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekd import artifacts
from edgekd.bench.bundle import make_bundle
from edgekd.bench.profiles import PROFILES, DeviceProfile
from edgekd.bench.report import build_report, write_report
from edgekd.bench.ssh import SSHOptions, Target, run_bundle
from edgekd.bench.tome import choose_tome, tome_auto_files, tome_models
from edgekd.errors import EdgekdError
from edgekd.recipe import BenchConfig

_DEFAULTS = BenchConfig()  # the recipe's bench: section is the one source of these defaults


@dataclass
class BenchResult:
    path: Path
    report: dict[str, Any]
    files: list[Path] = field(default_factory=list)


def bench(export_dir: str | Path, device: str = _DEFAULTS.device, hosts: tuple[str, ...] = (), *,
          ssh: SSHOptions | None = None, python: str | None = None, threads: int | None = None,
          runs: int = _DEFAULTS.runs, warmup: int = _DEFAULTS.warmup, samples: int = _DEFAULTS.samples,
          timeout: float = _DEFAULTS.timeout, remote_tmp: str = "/tmp",
          models: tuple[str, ...] = artifacts.BENCH_MODELS, tome_sweep: tuple[int, ...] = (),
          tome_auto: bool = False, tome_max_drop: float = 0.5) -> BenchResult:
    """Run the student int8 and fp32 and the teacher fp32 on each target; write bench.json and report.md.
    ``tome_sweep``: also the ViT student's ToMe files for each r (written by ``edgekd export
    --tome-sweep``), every matcher exported, in a ToMe table and an accuracy-vs-latency PNG.
    ``tome_auto``: time every int8 ToMe schedule the export dir has on each target and pick, per
    target, the fastest within ``tome_max_drop`` validation points of r = 0 that beats r = 0."""
    export_dir = Path(export_dir)
    profile = check_target(device, hosts, runs, samples, warmup, ssh)
    auto_files = tome_auto_files(export_dir) if tome_auto else {}
    present = _models_present(export_dir, models, tome_sweep, tuple(auto_files))
    threads = threads or profile.threads
    targets = [Target(h, ssh or SSHOptions()) for h in hosts] if profile.remote else [Target("local", None)]
    python = python or (sys.executable if not profile.remote else "python3")
    tmp = remote_tmp if profile.remote else tempfile.gettempdir()
    bundle, n_samples = make_bundle(export_dir, present, samples)
    outcomes, errors = _run_all(targets, bundle, present, python, threads, warmup, runs, timeout, tmp)
    report = build_report(export_dir, profile, outcomes, errors, threads, runs, warmup, n_samples)
    if tome_auto:
        report["tome_auto"] = {host: choose_tome(auto_files, models_run, tome_max_drop)
                               for host, models_run in outcomes.items()}
    files = write_report(export_dir, report)
    bench_json = export_dir / artifacts.BENCH_REPORT
    if errors:
        raise EdgekdError(f"bench failed on {', '.join(errors)} ({'; '.join(errors.values())}); the other hosts' "
                          f"results are in {bench_json}")
    return BenchResult(bench_json, report, files)


def check_target(device: str, hosts: tuple[str, ...], runs: int, samples: int, warmup: int,
                  ssh: SSHOptions | None) -> DeviceProfile:
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
    if ssh and ssh.identity and not Path(ssh.identity).is_file():
        raise EdgekdError(f"--identity {ssh.identity}: no such key file")
    return profile


def check_reachable(device: str, hosts: tuple[str, ...], runs: int, samples: int, warmup: int,
                    ssh: SSHOptions | None) -> None:
    """The bench's flags are valid and every host answers over SSH: ``edgekd run`` asks before it
    distils, so a mistyped host, a refused key or a board that is off costs seconds, not a run."""
    if check_target(device, hosts, runs, samples, warmup, ssh).remote:
        for h in hosts:
            target = Target(h, ssh or SSHOptions())
            proc = target.run(["true"], timeout=target.ssh.connect_timeout + 20)
            if proc.returncode != 0:
                raise EdgekdError(f"{h}: connecting failed: {target.explain(proc)} (checked before training; to "
                                  "train without the board: edgekd distill, then edgekd export)")


def _models_present(export_dir: Path, models: tuple[str, ...], tome_sweep: tuple[int, ...],
                    auto_files: tuple[str, ...]) -> tuple[str, ...]:
    """The model files to time that the export dir holds (the ToMe ones added), at least one student."""
    if not (export_dir / artifacts.EXPORT_REPORT).is_file():
        raise EdgekdError(f"{export_dir}: no {artifacts.EXPORT_REPORT}; run 'edgekd export RUN --int8' first")
    if tome_sweep:
        models = tuple(dict.fromkeys(models + tome_models(export_dir, tome_sweep)))
    models = tuple(dict.fromkeys(models + auto_files))
    present = tuple(m for m in models if (export_dir / m).is_file())
    if not any(m.startswith("student") for m in present):
        raise EdgekdError(f"{export_dir}: none of {', '.join(models)} is there; run 'edgekd export RUN --int8'")
    return present


def _run_all(targets: list[Target], bundle: bytes, models: tuple[str, ...], python: str, threads: int,
             warmup: int, runs: int, timeout: float, tmp: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Every target at once, one thread each: host -> results, and host -> why it failed."""
    outcomes: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    pool = ThreadPoolExecutor(max_workers=len(targets))
    try:  # from here on, an interrupt at any moment stops every target and waits for its cleanup
        futures = {pool.submit(run_bundle, t, bundle, models, python, threads, warmup, runs, timeout, tmp): t
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
    return outcomes, errors
