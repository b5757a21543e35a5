"""Shared fixtures: tiny recipes on a few hundred real Fashion-MNIST images."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

# Before torch loads OpenMP: under pytest -n 2 both workers run torch at 2 threads on 2 cores, and
# an idle thread that sleeps (instead of spinning) leaves its core to the other worker.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from edgekd.cli import app  # noqa: E402  (after OMP_WAIT_POLICY)


REPO = Path(__file__).resolve().parents[1]


def tiny_recipe_dict(**sections: Any) -> dict[str, Any]:
    """A recipe that trains in seconds: 16 px, narrow models, a few hundred images."""
    rec: dict[str, Any] = {
        "name": "tiny",
        "seed": 0,
        "data": {"dataset": "fashion_mnist", "image_size": 16, "train_subset": 400, "test_subset": 200,
                 "val_fraction": 0.25},
        "teacher": {"arch": "resnet18", "width": 8, "epochs": 1},
        "student": {"arch": "mobilenet_v2", "width_mult": 0.25, "epochs": 1},
        "distill": {"method": "atkd"},
        "train": {"batch_size": 50, "eval_batch_size": 200, "lr": 0.05, "device": "cpu"},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            rec.setdefault(name, {}).update(values)
        else:
            rec[name] = values
    return rec


def write_recipe(path: Path, **sections: Any) -> Path:
    path.write_text(yaml.safe_dump(tiny_recipe_dict(**sections)))
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The fast tier first: a broken loss, recipe or parser fails in the first minutes, before
    the end-to-end tests (marked ``e2e``) train, convert and bench. The sort is stable."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is not None)
    # a test that reads Fashion-MNIST while it is missing fails with the loader's own line:
    # "Fashion-MNIST not found ...: install it with 'apt-get install dataset-fashion-mnist'"


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher trained for 3 epochs on real images, shared by the distillation tests. At 2
    epochs its test top-1 was 33.5 % at 2 torch threads, 27.5 % at 1 and 27.5 % under pytest -n 2,
    against the 30 % floor of test_run_directory_and_metrics_schema; at 3: 41.0 % and 43.0 %."""
    from edgekd.distill.stage import distill
    from edgekd.recipe import load_recipe

    d = tmp_path_factory.mktemp("teacher")
    recipe = load_recipe(write_recipe(d / "r.yaml", distill={"method": "kd"}, teacher={"epochs": 3}))
    result = distill(recipe, d / "run")
    assert result.teacher_checkpoint is not None and result.teacher_checkpoint.is_file()
    return result.teacher_checkpoint


def sigkill_after(cmd: list[str], marker: Path, delay_s: float) -> None:
    """Start ``cmd``, wait until it has written ``marker`` (a finished epoch's checkpoint), let it
    run ``delay_s`` more (into the next epoch) and SIGKILL it."""
    import signal

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(delay_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def default_sigint() -> None:
    """``preexec_fn`` for a child the test will Ctrl-C: a process started from a shell without job
    control (``cmd &`` in a script, some CI runners) inherits SIGINT *ignored*, and Python then
    never installs its KeyboardInterrupt handler, so the child would sail through the test's
    SIGINT. Measured: a test suite launched that way failed all four Ctrl-C tests, twice."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def one_line_error(r: Any, code: int = 2) -> str:
    """The CLI's contract for bad input: exit ``code``, one 'error:' line on stderr, no traceback."""
    assert r.exit_code == code, r.output + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.output + r.stderr
    return lines[0]


def write_rgb_imagefolder(root: Path, classes: int = 3, train: int = 40, val: int = 12, size: int = 20) -> Path:
    """An ImageFolder tree of real RGB PNGs: Fashion-MNIST images, each class its own colour, so a
    3-channel model has something real to learn and the files are real image files."""
    from PIL import Image

    from edgekd.data.sources import load_fashion_mnist

    raw = load_fashion_mnist(None)
    tints = [(1.0, 0.4, 0.2), (0.2, 1.0, 0.4), (0.3, 0.5, 1.0), (1.0, 1.0, 0.2)]
    for split, n, source_x, source_y in (("train", train, raw.train_x, raw.train_y),
                                         ("val", val, raw.test_x, raw.test_y)):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            idx = (source_y == c).nonzero().flatten()[:n]
            for i, k in enumerate(idx.tolist()):
                gray = source_x[k, 0].numpy().astype(np.float32)
                rgb = np.stack([gray * t for t in tints[c]], -1).clip(0, 255).astype(np.uint8)
                Image.fromarray(rgb, "RGB").resize((size, size)).save(folder / f"{i}.png")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


class SSHD:
    def __init__(self, root: Path):
        self.root, self.port, self.user = root, _free_port(), getpass.getuser()
        self.host_pub = _keygen(root / "host_ed25519")
        client_pub = _keygen(root / "client_ed25519")
        self.key = root / "client_ed25519"
        (root / "authorized_keys").write_text(client_pub + "\n")
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text(self.known_line(self.host_pub))
        (root / "sshd_config").write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {root / 'host_ed25519'}",
            f"PidFile {root / 'sshd.pid'}", f"AuthorizedKeysFile {root / 'authorized_keys'}",
            "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no", "",
        ]))
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        self.log = open(root / "sshd.log", "wb")
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(root / "sshd_config")],
                                     stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("sshd did not start: " + (root / "sshd.log").read_text()[-2000:]) from None
                time.sleep(0.1)

    @property
    def host(self) -> str:
        return f"{self.user}@127.0.0.1"

    def known_line(self, pub: str) -> str:
        return f"[127.0.0.1]:{self.port} {' '.join(pub.split()[:2])}\n"

    def args(self, known_hosts: Path | None = None, key: Path | None = None) -> list[str]:
        return ["--host", self.host, "--port", str(self.port), "--identity", str(key or self.key),
                "--known-hosts", str(known_hosts or self.known_hosts)]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    if shutil.which("ssh") is None or not Path("/usr/sbin/sshd").is_file():
        pytest.fail("OpenSSH is missing: apt-get install openssh-server openssh-client (.ci/install does this)")
    server = SSHD(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def chain(tmp_path_factory):
    """``edgekd run`` on a tiny recipe: distil, export (onnx2tf), bench here, gate. Run once per session."""
    d = tmp_path_factory.mktemp("chain")
    # 2,000 images and a few epochs: a student that is right about half the time, so accuracy
    # checks on the board mean something.
    recipe = write_recipe(d / "tiny.yaml", data={"train_subset": 2000}, teacher={"epochs": 2},
                          student={"epochs": 3}, distill={"method": "kd"}, export={"formats": ["onnx", "tflite"], "calib": 32, "max_int8_drop": 100},
                          bench={"runs": 20, "warmup": 2, "samples": 200},
                          gate={"max_size_mb": 5, "min_accuracy": 0.3})
    run_dir = d / "run"
    r = CliRunner().invoke(app, ["run", str(recipe), "--out", str(run_dir)], env={"COLUMNS": "120"})
    assert r.exit_code == 0, r.output + r.stderr
    return recipe, run_dir, r.output


