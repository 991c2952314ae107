"""Writers for meshes, coefficients and landmarks.

FLAME works in metres; files written for people and for NoW are in millimetres by
default. Every writer takes an explicit ``unit`` and writes atomically (a temp file that
is renamed), so an interrupted run never leaves a half-written file behind.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Literal

import numpy as np

from .train.checkpoint import atomic_write_bytes

__all__ = ["write_mesh", "write_landmarks", "write_npz", "UNIT_SCALE"]

Unit = Literal["mm", "m"]
#: Factor from FLAME metres to each output unit.
UNIT_SCALE = {"mm": 1000.0, "m": 1.0}


def _scale(unit: str) -> float:
    if unit not in UNIT_SCALE:
        raise ValueError(f"unit must be one of {sorted(UNIT_SCALE)}, got {unit!r}")
    return UNIT_SCALE[unit]


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def write_mesh(path: str | os.PathLike, vertices, faces, unit: Unit = "mm") -> Path:
    """Write a triangle mesh as PLY (binary) or OBJ, chosen by the file suffix.

    Args:
        path: ``.ply`` or ``.obj`` target.
        vertices: (V, 3) in metres (numpy or torch).
        faces: (F, 3) 0-based vertex indices.
        unit: ``"mm"`` (default; NoW's unit) or ``"m"``; vertices are scaled from metres.
    """
    import trimesh

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".ply", ".obj"):
        raise ValueError(f"mesh files must end in .ply or .obj, got {path.name!r}")
    v = _as_numpy(vertices).astype(np.float64) * _scale(unit)
    f = _as_numpy(faces).astype(np.int64)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"expected vertices (V, 3) and faces (F, 3), got {v.shape} and {f.shape}")
    mesh = trimesh.Trimesh(vertices=v.astype(np.float32), faces=f, process=False)
    data = mesh.export(file_type=suffix[1:])
    if isinstance(data, str):
        data = data.encode()
    atomic_write_bytes(path, lambda fh: fh.write(data))
    return path


def write_landmarks(path: str | os.PathLike, landmarks, unit: Unit = "mm") -> Path:
    """Write (L, 3) landmarks (metres in) as ``.npy`` (float32) or ``.txt`` (``x y z`` lines)."""
    path = Path(path)
    lm = _as_numpy(landmarks).astype(np.float64) * _scale(unit)
    if lm.ndim != 2 or lm.shape[1] != 3:
        raise ValueError(f"landmarks must have shape (L, 3), got {lm.shape}")
    if path.suffix == ".npy":
        buf = io.BytesIO()
        np.save(buf, lm.astype(np.float32))
        atomic_write_bytes(path, lambda fh: fh.write(buf.getvalue()))
    elif path.suffix == ".txt":
        text = "".join(f"{x:.6f} {y:.6f} {z:.6f}\n" for x, y, z in lm)
        atomic_write_bytes(path, lambda fh: fh.write(text.encode()))
    else:
        raise ValueError(f"landmark files must end in .npy or .txt, got {path.name!r}")
    return path


def write_npz(path: str | os.PathLike, **arrays) -> Path:
    """Write arrays to an ``.npz`` atomically (no pickled objects)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: _as_numpy(v) for k, v in arrays.items()})
    atomic_write_bytes(path, lambda fh: fh.write(buf.getvalue()))
    return Path(path)
