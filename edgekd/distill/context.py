"""What one distil run holds while it runs: the device and process group, the data, the run
dir with its recipe, and the progress it reports (``RunContext``); the meta every checkpoint carries."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml

from edgekd import __version__, artifacts
from edgekd.checkpoint import write_text
from edgekd.data import DataBundle, load_dataset
from edgekd.distributed import World, init
from edgekd.errors import EdgekdError
from edgekd.recipe import Recipe

log = logging.getLogger(__name__)


class Progress(Protocol):
    """What the trainer reports while it runs; the CLI draws it, tests may ignore it."""

    def start(self, label: str, total: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def end_epoch(self, role: str, row: dict[str, float]) -> None: ...


class NoProgress:
    def start(self, label: str, total: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def end_epoch(self, role: str, row: dict[str, float]) -> None: ...


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise EdgekdError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class RunContext:
    recipe: Recipe
    data: DataBundle
    device: torch.device
    run_dir: Path
    resume: bool
    progress: Progress
    mean: torch.Tensor
    std: torch.Tensor
    world: World = World()
    weights_loaded: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> LoadReport.as_dict()
    teacher_image_size: int | None = None  # a teacher checkpoint of another size than the data's

    def eval_kwargs(self) -> dict[str, Any]:
        return dict(mean=self.mean, std=self.std, batch_size=self.recipe.train.eval_batch_size, device=self.device)


def model_meta(ctx: RunContext, role: str, arch: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {
        "role": role, "arch": arch, "model_kwargs": kwargs, "num_classes": ctx.data.num_classes,
        "in_channels": ctx.data.channels, "image_size": ctx.data.image_size,
        "class_names": ctx.data.class_names, "mean": ctx.data.mean, "std": ctx.data.std,
        "recipe": ctx.recipe.model_dump(), "edgekd_version": __version__,
    }


def check_run_dir(run_dir: Path, resume: bool) -> str | None:
    """A run dir that already holds a run is continued only with ``resume``; what resume did."""
    if run_dir.exists() and not run_dir.is_dir():
        raise EdgekdError(f"--out {run_dir} is a file, not a folder; choose another --out")
    started = [p.name for p in (run_dir / artifacts.last_checkpoint("teacher"),
                                run_dir / artifacts.last_checkpoint("student"), run_dir / artifacts.METRICS)
               if p.exists()]
    if started and not resume:
        raise EdgekdError(f"{run_dir} already holds a run ({', '.join(started)}); pass --resume to continue it "
                          "or choose another --out")
    if not resume:
        return None
    if not started:
        log.warning("nothing to resume in %s: starting a new run", run_dir)
    return "continued" if started else "nothing to resume: started a new run"


def open_run(recipe: Recipe, run_dir: Path, resume: bool, progress: Progress | None) -> RunContext:
    """The device, the process group (DDP under torchrun), the data, and the run dir with its recipe."""
    device = resolve_device(recipe.train.device)
    world = init(device.type)
    if world.size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", world.local_rank)
        if recipe.train.batch_size % world.size:
            raise EdgekdError(f"train.batch_size {recipe.train.batch_size} is the global batch and must divide among "
                              f"{world.size} processes; pick a multiple of {world.size}")
    data = load_dataset(recipe.data, recipe.seed)
    if device.type == "cuda":
        data = data.to(device)  # small data sets live on the GPU; batches are index slices
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / artifacts.RECIPE, yaml.safe_dump(recipe.model_dump(), sort_keys=False))
    return RunContext(recipe, data, device, run_dir, resume, progress if progress and world.main else NoProgress(),
                torch.tensor(data.mean, device=device), torch.tensor(data.std, device=device), world)
