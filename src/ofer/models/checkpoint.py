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
from typing import Any, Iterator, Mapping, Optional

import torch

from ..errors import CheckpointError
from ..io import atomic_write_bytes

__all__ = ["FORMAT_VERSION", "save_checkpoint", "read_checkpoint", "first_non_finite", "require_finite"]

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


def _tensors(tree: Any, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        yield name, tree
    elif isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _tensors(v, f"{name}.{k}" if name else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{name}[{i}]")


def first_non_finite(entries: Mapping[str, Any]) -> Optional[str]:
    """Name (``entry/key``) of the first floating tensor holding NaN or inf in ``entries``, or None.

    ``entries`` maps entry names (``"model"``, ``"ema"``, ``"net"``, ...) to state dicts or
    nested containers of tensors; integer and boolean tensors are always finite.
    """
    for entry, tree in entries.items():
        for key, t in _tensors(tree, ""):
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
                return f"{entry}/{key}" if key else str(entry)
    return None


def require_finite(entries: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Refuse weights with NaN or inf: the check every loader runs on what it loads.

    Raises:
        CheckpointError: naming the file and the tensor (``entry/key``).
    """
    bad = first_non_finite(entries)
    if bad is not None:
        raise CheckpointError(f"checkpoint {path}: tensor '{bad}' holds NaN or infinite values; "
                              "these weights cannot give results")
