"""The bench and gate stages against a real OpenSSH server on 127.0.0.1, and ``edgekd run``.

The sshd fixture starts Debian's ``/usr/sbin/sshd`` at a free port with a temporary host key,
authorized key and config; the client is the real OpenSSH client. The models come from a tiny
run of the whole chain on real Fashion-MNIST (``edgekd run``), exported with the real converter.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import venv
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgekd.bench import SSHOptions, bench
from edgekd.bench.bundle import make_bundle as _bundle
from edgekd.cli import app
from edgekd.errors import EdgekdError

from conftest import REPO, _free_port, _keygen, default_sigint, one_line_error as _one_line_error  # noqa: E402

RUNNER = REPO / "edgekd" / "runner.py"
ODD = "it's a \"quoted\" dir $HOME;"  # spaces, quotes and shell syntax in file names


@pytest.fixture
def odd_export(chain, tmp_path):
    """The chain's run directory copied under a name with spaces, quotes and shell syntax."""
    run = tmp_path / ODD / "run"
    shutil.copytree(chain[1], run)
    (run / "export" / "bench.json").unlink()
    return run / "export"


@pytest.fixture
def remote_tmp(tmp_path):
    """The board's temp folder: also an odd name, and it must be empty again after every bench."""
    d = tmp_path / f"remote {ODD}"
    d.mkdir()
    return d


def _bench(export_dir: Path, *args: str) -> object:
    return CliRunner().invoke(app, ["bench", str(export_dir), "--runs", "10", "--warmup", "1", "--samples", "50",
                                    *args], env={"COLUMNS": "120"})


def _runner_pids(marker: str) -> list[int]:
    """Processes of the runner whose command line mentions ``marker`` (read from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "edgekd_runner.py" in cmd and marker in cmd and "sh\x00-c" not in cmd and "timeout\x00" not in cmd:
                pids.append(int(entry.name))
    return pids


@pytest.mark.e2e
def test_run_chains_all_stages_and_resumes(chain):
    recipe, run_dir, printed = chain
    for stage in ("distill ", "export ", "bench ", "gate "):
        assert stage in printed
    assert "pass" in printed and "ran on local" in printed
    for f in ("metrics.json", "student_best.pt", "export/export.json", "export/student_int8.tflite",
              "export/bench.json", "export/report.md", "export/bench_latency.png"):
        assert (run_dir / f).is_file(), f
    r = CliRunner().invoke(app, ["run", str(recipe), "--out", str(run_dir)], env={"COLUMNS": "120"})
    assert r.exit_code == 0, r.output + r.stderr
    assert r.output.count("skipped") == 3  # distill, export and bench are not redone
    r = CliRunner().invoke(app, ["run", str(recipe), "--out", str(run_dir), "--set", "student.epochs=5"])
    assert "another recipe" in _one_line_error(r)


@pytest.mark.e2e
def test_bench_over_ssh_end_to_end(chain, sshd, odd_export, remote_tmp):
    r = CliRunner().invoke(app, ["bench", str(odd_export), "--device", "rpi4", *sshd.args(), "--python",
                                 sys.executable, "--remote-tmp", str(remote_tmp), "--runs", "30", "--warmup", "2",
                                 "--samples", "200"], env={"COLUMNS": "120"})
    assert r.exit_code == 0, r.output + r.stderr
    assert "p50" in r.output and "ratio" in r.output and "the speed of teacher_fp32" in r.output
    assert "profile rpi4 expects" in r.stderr  # this x86 machine is not a Pi: warned, not refused
    report = json.loads((odd_export / "bench.json").read_text())
    assert report["schema"] == "edgekd.bench/1" and report["device"] == "rpi4" and report["threads"] == 4
    h = report["hosts"][sshd.host]
    assert set(h["models"]) == {"student_int8.tflite", "student_fp32.tflite", "teacher_fp32.tflite"}
    int8 = h["models"]["student_int8.tflite"]
    assert int8["schema"] == "edgekd.runner/1" and int8["runs"] == 30 and len(int8["latencies_ms"]) == 30
    assert int8["input_dtype"] == "int8" and int8["machine"]["arch"] == os.uname().machine
    # the rpi4 profile asks for 4 threads; the runner never runs more threads than the cores it has
    assert int8["threads_requested"] == 4 and int8["threads"] == min(4, len(os.sched_getaffinity(0)))
    lat = int8["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert int8["memory_kb"]["peak_rss"] >= int8["memory_kb"]["rss_loaded"] > 0
    # The same 200 test images scored on the "board" as by the export stage, in the same runtime.
    export = json.loads((odd_export / "export.json").read_text())
    for name, res in h["models"].items():
        assert abs(100 * res["accuracy"] - export["artifacts"][name]["test_top1"]) <= 1.0, name
    c = h["comparison"]
    teacher = h["models"]["teacher_fp32.tflite"]
    assert c["latency_p50_ratio"] == pytest.approx(lat["p50"] / teacher["latency_ms"]["p50"])
    assert c["size_ratio"] == pytest.approx(int8["size_bytes"] / teacher["size_bytes"])
    assert c["accuracy_diff"] == pytest.approx(int8["accuracy"] - teacher["accuracy"])
    assert all(k.endswith("_ratio") for k in c if k not in ("speedup", "accuracy_diff"))
    assert "latency histogram" in (odd_export / "report.md").read_text()
    assert list(remote_tmp.iterdir()) == []


@pytest.mark.e2e
def test_bench_local_runs_the_same_runner(chain):
    r = _bench(chain[1] / "export", "--device", "local", "--threads", "1")
    assert r.exit_code == 0, r.output + r.stderr
    report = json.loads((chain[1] / "export" / "bench.json").read_text())
    assert list(report["hosts"]) == ["local"] and report["threads"] == 1
    assert report["hosts"]["local"]["comparison"]["latency_p50_ratio"] > 0
    assert "student_int8" in r.output and "ratio" in r.output


@pytest.mark.e2e
def test_wrong_key_is_refused(chain, sshd, odd_export, remote_tmp, tmp_path):
    _keygen(tmp_path / "stranger")
    r = _bench(odd_export, "--device", "rpi4", *sshd.args(key=tmp_path / "stranger"))
    assert "permission denied" in _one_line_error(r)


@pytest.mark.e2e
def test_unknown_host_key_needs_opt_in(chain, sshd, odd_export, remote_tmp, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text("")
    args = ["--device", "rpi4", *sshd.args(known_hosts=known), "--python", sys.executable,
            "--remote-tmp", str(remote_tmp)]
    assert "not in known_hosts" in _one_line_error(_bench(odd_export, *args))
    assert known.read_text() == ""
    r = _bench(odd_export, *args, "--accept-new-host-key")
    assert r.exit_code == 0, r.output + r.stderr
    assert sshd.host_pub.split()[1] in known.read_text()  # recorded, so the next run verifies it
    assert list(remote_tmp.iterdir()) == []


@pytest.mark.e2e
def test_changed_host_key_is_refused_even_with_opt_in(chain, sshd, odd_export, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_line(_keygen(tmp_path / "old_host_key")))
    args = ["--device", "rpi4", *sshd.args(known_hosts=known), "--python", sys.executable]
    assert "CHANGED" in _one_line_error(_bench(odd_export, *args))
    assert "CHANGED" in _one_line_error(_bench(odd_export, *args, "--accept-new-host-key"))


@pytest.mark.e2e
def test_closed_port(chain, sshd, odd_export):
    args = sshd.args()
    args[args.index("--port") + 1] = str(_free_port())
    assert "connection refused" in _one_line_error(_bench(odd_export, "--device", "rpi5", *args))


@pytest.fixture(scope="module")
def numpy1_venv(tmp_path_factory):
    """A Python with NumPy 1.26 and no TFLite runtime, like a fresh 32-bit Pi OS."""
    d = tmp_path_factory.mktemp("venv") / "numpy1"
    venv.create(d, with_pip=True)
    subprocess.run([d / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "numpy==1.26.4"], check=True)
    return d / "bin" / "python"


@pytest.mark.e2e
def test_board_without_tflite_runtime(chain, sshd, odd_export, remote_tmp, numpy1_venv):
    r = _bench(odd_export, "--device", "rpi4", *sshd.args(), "--python", str(numpy1_venv),
               "--remote-tmp", str(remote_tmp))
    line = _one_line_error(r)
    assert "no TFLite runtime" in line and "tflite-runtime" in line and "numpy<2" in line
    assert list(remote_tmp.iterdir()) == []


@pytest.mark.e2e
def test_board_with_tflite_runtime_and_numpy1(chain, sshd, odd_export, remote_tmp, numpy1_venv, tmp_path):
    d = tmp_path / "tflrt"
    venv.create(d, with_pip=True)
    subprocess.run([d / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "numpy==1.26.4", "tflite-runtime==2.14.0"], check=True)
    r = _bench(odd_export, "--device", "rpi4", *sshd.args(), "--python", str(d / "bin" / "python"),
               "--remote-tmp", str(remote_tmp), "--samples", "200")
    assert r.exit_code == 0, r.output + r.stderr
    h = json.loads((odd_export / "bench.json").read_text())["hosts"][sshd.host]
    export = json.loads((odd_export / "export.json").read_text())
    for name, res in h["models"].items():
        assert res["runtime"] == "tflite_runtime 2.14.0" and res["numpy"] == "1.26.4"
        assert abs(100 * res["accuracy"] - export["artifacts"][name]["test_top1"]) <= 1.0, name
    assert list(remote_tmp.iterdir()) == []


@pytest.mark.e2e
def test_runner_killed_mid_run(chain, sshd, odd_export, remote_tmp):
    ssh = SSHOptions(port=sshd.port, identity=sshd.key, known_hosts=sshd.known_hosts)
    outcome: dict[str, object] = {}

    def work() -> None:
        try:
            bench(odd_export, "rpi4", (sshd.host,), ssh=ssh, python=sys.executable, runs=10**8, samples=10,
                  timeout=120, remote_tmp=str(remote_tmp))
        except EdgekdError as e:
            outcome["error"] = str(e)

    t = threading.Thread(target=work)
    t.start()
    pids = _wait_for_runner(str(remote_tmp))
    # kill it while it times, after LiteRT has mapped the file and printed its banner on stderr: ssh's
    # exit 255 then comes with a line on stderr, as an ssh error does (this raced under load once)
    deadline = time.monotonic() + 120
    while ".tflite" not in Path(f"/proc/{pids[0]}/maps").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    os.kill(pids[0], signal.SIGKILL)
    t.join(60)
    assert "killed while timing student_int8.tflite" in str(outcome.get("error")), outcome
    assert list(remote_tmp.iterdir()) == [] and _runner_pids(str(remote_tmp)) == []


def _wait_for_runner(marker: str) -> list[int]:
    deadline = time.monotonic() + 600  # generous: a loaded machine starts ssh and Python slowly
    while time.monotonic() < deadline:
        pids = _runner_pids(marker)
        if pids:
            return pids
        time.sleep(0.1)
    raise AssertionError("the runner never started on the board")


@pytest.mark.e2e
def test_ctrl_c_stops_the_board_and_cleans_up(chain, sshd, odd_export, remote_tmp):
    cmd = [sys.executable, "-m", "edgekd", "bench", str(odd_export), "--device", "rpi4", *sshd.args(),
           "--python", sys.executable, "--remote-tmp", str(remote_tmp), "--runs", str(10**8), "--samples", "10",
           "--timeout", "60"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=default_sigint)
    _wait_for_runner(str(remote_tmp))
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and len(err.strip().splitlines()) == 1, err
    deadline = time.monotonic() + 10  # the remote runner gets SIGTERM from the cleanup
    while _runner_pids(str(remote_tmp)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _runner_pids(str(remote_tmp)) == [] and list(remote_tmp.iterdir()) == []


@pytest.mark.e2e
def test_bench_bad_input(chain, tmp_path):
    export_dir = chain[1] / "export"
    assert "no export.json" in _one_line_error(_bench(tmp_path))
    assert "needs --host" in _one_line_error(_bench(export_dir, "--device", "rpi4"))
    assert "unknown device 'jetson'" in _one_line_error(_bench(export_dir, "--device", "jetson"))
    assert "not a host name" in _one_line_error(_bench(export_dir, "--device", "rpi4", "--host", "-oProxyCommand=x"))
    assert "no such key file" in _one_line_error(_bench(export_dir, "--device", "rpi4", "--host", "pi@b",
                                                        "--identity", str(tmp_path / "nokey")))


@pytest.mark.e2e
def test_runner_standalone_with_onnxruntime(chain, tmp_path):
    """The runner on its own: the ONNX path, and a corrupt model as one JSON error line."""
    export_dir = chain[1] / "export"
    with tarfile.open(fileobj=io.BytesIO(_bundle(export_dir, ("student_int8.tflite",), 20)[0])) as tar:
        tar.extractall(tmp_path, filter="data")
    with np.load(tmp_path / "samples.npz") as s:
        assert s["images"].dtype == np.uint8 and s["images"].shape == (20, 1, 16, 16) and len(s["labels"]) == 20
    base = [sys.executable, str(RUNNER), "--meta", str(export_dir / "student.model.json"),
            "--samples", str(tmp_path / "samples.npz"), "--runs", "5", "--warmup", "1"]
    out = subprocess.run([*base, "--model", str(export_dir / "student.onnx")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["runtime"].startswith("onnxruntime") and res["runs"] == 5 and 0 <= res["accuracy"] <= 1
    (tmp_path / "bad.tflite").write_bytes(b"not a model")
    out = subprocess.run([*base, "--model", str(tmp_path / "bad.tflite")], capture_output=True, text=True)
    assert out.returncode == 2 and "error" in json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.e2e
def test_gate_exit_codes_and_step_summary(chain, tmp_path):
    recipe, run_dir, _ = chain
    bench_json = run_dir / "export" / "bench.json"
    report = json.loads(bench_json.read_text())
    student = report["hosts"]["local"]["models"]["student_int8.tflite"]
    summary = tmp_path / "summary.md"
    env = {"GITHUB_STEP_SUMMARY": str(summary), "COLUMNS": "120"}
    ok = CliRunner().invoke(app, ["gate", str(bench_json), "--max-size-mb", "3", "--max-p90-ms", "1000",
                                  "--min-accuracy", "0.1", "--max-latency-ratio", "100", "--max-int8-drop", "100"],
                            env=env)
    assert ok.exit_code == 0, ok.output + ok.stderr
    assert "PASS" in ok.output and summary.read_text().count("| pass |") == 5
    too_small = student["size_bytes"] / 1e6 / 2
    bad = CliRunner().invoke(app, ["gate", str(bench_json), "--max-size-mb", str(too_small)], env=env)
    assert bad.exit_code == 1 and "FAIL" in bad.output
    assert summary.read_text().count("### edgekd gate") == 2 and "**FAIL**" in summary.read_text()  # appended
    from_recipe = CliRunner().invoke(app, ["gate", str(bench_json), "--recipe", str(recipe)])
    assert from_recipe.exit_code == 0 and "size MB" in from_recipe.output and "accuracy" in from_recipe.output
    assert "no thresholds" in _one_line_error(CliRunner().invoke(app, ["gate", str(bench_json)]))
    assert "a fraction" in _one_line_error(CliRunner().invoke(app, ["gate", str(bench_json), "--min-accuracy", "85"]))
    assert "no such file" in _one_line_error(CliRunner().invoke(app, ["gate", str(tmp_path / "x.json"),
                                                                      "--max-p50-ms", "1"]))
    (tmp_path / "junk.json").write_text("{not json")
    assert "not valid JSON" in _one_line_error(CliRunner().invoke(app, ["gate", str(tmp_path / "junk.json"),
                                                                        "--max-p50-ms", "1"]))


@pytest.mark.e2e
def test_one_failing_host_keeps_the_others_in_a_partial_bench_json(chain, sshd, odd_export, remote_tmp, tmp_path):
    """Two boards, one of which refuses us (its host key is unknown): the other's results are kept,
    each host has a status, the command still fails, and the gate fails on the partial report."""
    bad = f"{sshd.user}@localhost"  # the same sshd under a name known_hosts does not know
    args = ["--device", "rpi4", *sshd.args(), "--host", bad, "--python", sys.executable,
            "--remote-tmp", str(remote_tmp)]
    line = _one_line_error(_bench(odd_export, *args))
    assert "bench failed on " + bad in line and "bench.json" in line
    report = json.loads((odd_export / "bench.json").read_text())
    assert report["hosts"][sshd.host]["status"] == "ok" and report["hosts"][sshd.host]["models"]
    assert report["hosts"][bad]["status"] == "failed" and "known_hosts" in report["hosts"][bad]["error"]
    assert "bench failed" in (odd_export / "report.md").read_text()
    r = CliRunner().invoke(app, ["gate", str(odd_export), "--max-size-mb", "5"])
    assert r.exit_code == 1 and "FAIL" in r.output
    assert list(remote_tmp.iterdir()) == []


def test_board_identity_has_one_source(monkeypatch):
    """A Pi whose device tree is hidden (a container) still names its board from /proc/cpuinfo,
    and the report title and the profile check read the same field."""
    import importlib.util

    from edgekd.bench import PROFILES, board_name
    from edgekd.bench.profiles import profile_warnings as _profile_warnings

    spec = importlib.util.spec_from_file_location("edgekd_runner", RUNNER)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    files = {"/proc/cpuinfo": "processor\t: 0\nBogoMIPS\t: 108.00\nCPU part\t: 0xd08\n"
                              "Hardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n",
             "/proc/device-tree/model": ""}
    monkeypatch.setattr(runner, "_read", lambda path: files.get(path, ""))
    info = runner.machine_info()
    assert info["board"] == "Raspberry Pi 4 Model B Rev 1.4" and info["board_source"] == "cpuinfo"
    assert info["cpu"] == "BCM2835" and board_name(info) == info["board"]
    models = {"student_int8.tflite": {"machine": {**info, "arch": "aarch64"}, "threads": 4}}
    assert _profile_warnings(PROFILES["rpi4"], models) == []
    assert "Raspberry Pi 5" in _profile_warnings(PROFILES["rpi5"], models)[0]
    assert info["board"] in _profile_warnings(PROFILES["rpi5"], models)[0]
