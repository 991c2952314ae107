"""Checkpoint files: atomic writes and safe (``weights_only``) reads.

Files are written through :func:`ofer.io.atomic_write_bytes`.

Our checkpoints hold tensors and plain containers only, so ``torch.load(path,
weights_only=True)`` reads them. Layout::

    {"model": state_dict, "ema": state_dict | None, "optimizer": state_dict | None,
     "step": int, "config": dict, "kind": str, "version": int, ...}

Training checkpoints add the loop state (RNG, ``best_metric`` and the
``best_metric_name`` that selected ``best.pt``); see :mod:`ofer.train.loop`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..io import atomic_write_bytes

__all__ = ["FORMAT_VERSION", "save_checkpoint", "read_checkpoint"]

FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Save ``payload`` (tensors and plain containers only) atomically with ``torch.save``."""
    payload = dict(payload)
    payload.setdefault("version", FORMAT_VERSION)
    atomic_write_bytes(path, lambda f: torch.save(payload, f))


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; one-line errors for missing or bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt / unsafe files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj
