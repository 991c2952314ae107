"""Devices and ``torchrun`` process groups, shared by training and sampling.

``torchrun --nproc_per_node=K trainIdGen.py ...`` (or ``sample.py``) sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed`
reads them and starts NCCL on GPUs or gloo on CPU. Without them everything runs in one process.

Device names (config key ``device`` / ``train.device``): ``auto`` (this process's GPU when CUDA
is available, else the CPU), ``cpu``, ``cuda`` (this process's GPU: ``cuda:LOCAL_RANK``) or
``cuda:N`` (that GPU, in every process).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from .errors import ConfigError

__all__ = ["DistInfo", "dist_env", "resolve_device", "init_distributed", "cleanup", "all_reduce_mean", "any_flag",
           "barrier"]


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


def dist_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` as ``torchrun`` sets them; ``(0, 1, 0)`` without it."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(spec: str, key: str = "device") -> torch.device:
    """The device named by ``spec`` for this process (see the module docstring).

    Raises:
        ConfigError: a malformed name, or CUDA asked for where there is none (naming ``key``).
    """
    local_rank = dist_env()[2]
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"config key '{key}' must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"config key '{key}' is {spec!r} but no CUDA device is available")
        if dev.index is None:
            return torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(f"config key '{key}' is {spec!r} but there are only "
                              f"{torch.cuda.device_count()} CUDA devices")
    elif dev.type != "cpu":
        raise ConfigError(f"config key '{key}' must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
    return dev


def init_distributed(device: str = "auto", key: str = "train.device") -> DistInfo:
    """Start the process group when launched by ``torchrun``; pick this process's device."""
    rank, world, local_rank = dist_env()
    dev = resolve_device(device, key)
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
