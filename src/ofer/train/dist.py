"""Process-group setup for ``torchrun`` (DistributedDataParallel), and the single-process default.

``torchrun --nproc_per_node=K trainIdGen.py ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them and
starts NCCL on GPUs or gloo on CPU. Without them everything runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from ..errors import ConfigError

__all__ = ["DistInfo", "init_distributed", "cleanup", "all_reduce_mean", "any_flag", "barrier"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"config key 'train.device' is {device!r} but no CUDA device is available")
        if device == "cuda":
            return torch.device("cuda", local_rank)
    return torch.device(device)


def init_distributed(device: str = "auto") -> DistInfo:
    """Start the process group when launched by ``torchrun``; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if world > 1 and not tdist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        tdist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over processes (identity in one process)."""
    if tdist.is_available() and tdist.is_initialized():
        x = x.clone()
        tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
        x /= tdist.get_world_size()
    return x


def any_flag(flag: bool, device: torch.device) -> bool:
    """True on every process when ``flag`` is True on any of them."""
    if tdist.is_available() and tdist.is_initialized():
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item() > 0)
    return flag
