"""Data-parallel distillation on PyTorch's own engine: ``torchrun`` starts the processes and sets
RANK / WORLD_SIZE / LOCAL_RANK; edgekd joins the process group (NCCL on CUDA, gloo on CPU),
wraps what trains in ``DistributedDataParallel`` and gives each rank a disjoint shard of every
global batch. One process (no torchrun) is world size 1 and touches none of this.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from edgekd.errors import EdgekdError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Only the main rank writes checkpoints, logs, reports and plots."""
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of a global batch of ``n`` (``n`` divisible by the size)."""
        per = n // self.size
        return slice(self.rank * per, (self.rank + 1) * per)


def world_from_env() -> World:
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def init(device_type: str) -> World:
    """Join the process group torchrun set up (a no-op for one process)."""
    world = world_from_env()
    if world.size > 1 and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return world


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average tensors (e.g. gradients of something DDP does not wrap) across ranks, in place."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(dist.get_world_size())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def launch(nproc: int, argv: list[str]) -> int:
    """``edgekd ... --nproc N``: run the same command under torchrun on this machine, N processes."""
    if nproc < 1:
        raise EdgekdError("--nproc must be at least 1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "edgekd", *argv]
    return subprocess.run(cmd, check=False).returncode
