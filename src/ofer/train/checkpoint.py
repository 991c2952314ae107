"""Checkpoint files: atomic writes and safe (``weights_only``) reads.

Our checkpoints hold tensors and plain containers only, so ``torch.load(path,
weights_only=True)`` reads them. Layout::

    {"model": state_dict, "ema": state_dict | None, "optimizer": state_dict | None,
     "step": int, "config": dict, "kind": str, "version": int, ...}

Training checkpoints add the loop state (RNG, ``best_metric`` and the
``best_metric_name`` that selected ``best.pt``); see :mod:`ofer.train.loop`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

FORMAT_VERSION = 1


def atomic_write_bytes(path: str | os.PathLike, writer) -> None:
    """Write a file atomically: ``writer(fileobj)`` fills a temp file that is then renamed.

    A crash at any moment leaves either the old file or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


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
