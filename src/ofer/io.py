"""Every file the package writes goes through here.

* :func:`atomic_write_bytes`: the one atomic writer. Data goes to a hidden temp file beside the
  target, is flushed to disk and renamed over it, so a crash leaves the old file or the new one,
  never a torn one. The temp file is removed when writing fails, and the final file gets the
  permissions a plain ``open(path, "w")`` would give under the current umask (``mkstemp`` creates
  its files 0600, which would otherwise survive the rename).
* :func:`write_mesh`: the one mesh writer (PLY binary or ASCII, OBJ), with the unit in the header.
* :func:`write_landmarks`, :func:`write_npz`, :func:`write_json`, :func:`write_text`.
* :func:`remove_stale_temps`: removes the temp files a killed writer left behind.

FLAME works in metres; files written for people and for NoW are in millimetres by default.
Every writer that takes coordinates says in which unit they come (``source_unit``) and in which
they are written (``unit``).
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import numpy as np

__all__ = [
    "atomic_write_bytes",
    "write_mesh",
    "write_landmarks",
    "write_npz",
    "write_json",
    "write_text",
    "remove_stale_temps",
    "UNIT_SCALE",
]

Unit = Literal["mm", "m"]
#: Length of one unit in metres' multiples: a coordinate in metres times ``UNIT_SCALE[u]`` is in ``u``.
UNIT_SCALE = {"mm": 1000.0, "m": 1.0}
_UNIT_WORD = {"mm": "millimetres", "m": "metres"}

Writer = Callable[[Any], Any]


def _umask() -> int:
    """The process umask (read from /proc where it exists: setting it to read it is not thread-safe)."""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: Name of the temp file of an unfinished :func:`atomic_write_bytes` of ``<name>``:
#: ``.<name>.<8 characters of mkstemp>.tmp``.
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")
_writing: set[str] = set()  # temp files this process is filling now
_writing_lock = threading.Lock()


def atomic_write_bytes(path: str | os.PathLike, data: Union[bytes, Writer]) -> Path:
    """Write ``path`` atomically; ``data`` is the bytes or a ``writer(fileobj)`` that fills the file.

    The parent folders are created. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with _writing_lock:
        _writing.add(os.path.abspath(tmp))
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        with _writing_lock:
            _writing.discard(os.path.abspath(tmp))
    return path


def remove_stale_temps(folder: str | os.PathLike, *, older_than: float = 600.0,
                       recursive: bool = False) -> list[Path]:
    """Remove the temp files that killed :func:`atomic_write_bytes` calls left in ``folder``.

    Only regular files named exactly like that writer's temp files (``.<name>.<8 characters>.tmp``)
    are candidates, and of those only the ones not modified for ``older_than`` seconds and not
    being written by this process; links, folders and every other name are never touched.

    Args:
        folder: where to look (a missing folder removes nothing).
        older_than: seconds since the last modification (a live writer keeps its file fresh).
        recursive: also look in the subfolders (links to folders are not followed).

    Returns:
        The paths removed.
    """
    removed: list[Path] = []
    now = time.time()
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in files:
            if not _TEMP_NAME.fullmatch(name):
                continue
            path = os.path.join(root, name)
            with _writing_lock:
                if os.path.abspath(path) in _writing:
                    continue
            try:
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode) and now - st.st_mtime >= older_than:
                    os.unlink(path)
                    removed.append(Path(path))
            except OSError:  # gone meanwhile, or not ours to remove
                continue
        if not recursive:
            break
    return removed


def write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text, atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int = 1, sort_keys: bool = False) -> Path:
    """JSON (UTF-8, trailing newline), atomically. Non-finite floats are refused."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n")


def _scale(unit: str) -> float:
    if unit not in UNIT_SCALE:
        raise ValueError(f"unit must be one of {sorted(UNIT_SCALE)}, got {unit!r}")
    return UNIT_SCALE[unit]


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _mesh_bytes(fmt: str, v: np.ndarray, f: Optional[np.ndarray], unit: str, binary: bool) -> bytes:
    """Serialise (V,3) float coordinates and optional (F,3) 0-based faces."""
    note = f"units: {_UNIT_WORD[unit]}"
    if fmt == "obj":
        out = io.StringIO()
        out.write(f"# {note}\n")
        np.savetxt(out, v, fmt="v %.6f %.6f %.6f")
        if f is not None and len(f):
            np.savetxt(out, f + 1, fmt="f %d %d %d")
        return out.getvalue().encode("ascii")
    n_faces = 0 if f is None else len(f)
    head = ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0", f"comment {note}",
            f"element vertex {len(v)}", "property float x", "property float y", "property float z"]
    if f is not None:
        head += [f"element face {n_faces}", "property list uchar int vertex_indices"]
    header = ("\n".join(head + ["end_header"]) + "\n").encode("ascii")
    if binary:
        body = np.ascontiguousarray(v, dtype="<f4").tobytes()
        if f is not None:
            rows = np.empty(n_faces, dtype=np.dtype([("n", "u1"), ("i", "<i4", (3,))]))
            rows["n"] = 3
            rows["i"] = f
            body += rows.tobytes()
        return header + body
    out = io.StringIO()
    np.savetxt(out, v.astype(np.float32), fmt="%.6g")
    if f is not None and n_faces:
        np.savetxt(out, f, fmt="3 %d %d %d")
    return header + out.getvalue().encode("ascii")


def write_mesh(path: str | os.PathLike, vertices, faces=None, unit: Unit = "mm", *,
               source_unit: Unit = "m", binary: bool = True) -> Path:
    """Write a triangle mesh (or a point cloud, ``faces=None``) as PLY or OBJ, by the suffix.

    Args:
        path: ``.ply`` or ``.obj`` target.
        vertices: (V, 3), numpy or torch, in ``source_unit`` (FLAME's metres by default).
        faces: (F, 3) 0-based vertex indices, or None.
        unit: the unit written (``"mm"``, NoW's, by default, or ``"m"``); named in the header.
        source_unit: the unit ``vertices`` are in.
        binary: PLY only: binary little-endian (default) or ASCII.
    """
    path = Path(path)
    fmt = path.suffix.lower()[1:]
    if fmt not in ("ply", "obj"):
        raise ValueError(f"mesh files must end in .ply or .obj, got {path.name!r}")
    v = _as_numpy(vertices).astype(np.float64) * (_scale(unit) / _scale(source_unit))
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"expected vertices (V, 3), got {v.shape}")
    f = None
    if faces is not None:
        f = _as_numpy(faces).astype(np.int64)
        if f.ndim != 2 or f.shape[1] != 3:
            raise ValueError(f"expected faces (F, 3), got {f.shape}")
        if f.size and (f.min() < 0 or f.max() >= len(v)):
            raise ValueError(f"face indices out of range [0, {len(v)})")
    return atomic_write_bytes(path, _mesh_bytes(fmt, v, f, unit, binary))


def write_landmarks(path: str | os.PathLike, landmarks, unit: Unit = "mm", *, source_unit: Unit = "m") -> Path:
    """Write (L, 3) landmarks as ``.npy`` (float32) or ``.txt`` (``x y z`` lines)."""
    path = Path(path)
    lm = _as_numpy(landmarks).astype(np.float64) * (_scale(unit) / _scale(source_unit))
    if lm.ndim != 2 or lm.shape[1] != 3:
        raise ValueError(f"landmarks must have shape (L, 3), got {lm.shape}")
    if path.suffix == ".npy":
        buf = io.BytesIO()
        np.save(buf, lm.astype(np.float32))
        return atomic_write_bytes(path, buf.getvalue())
    if path.suffix == ".txt":
        return write_text(path, "".join(f"{x:.6f} {y:.6f} {z:.6f}\n" for x, y, z in lm))
    raise ValueError(f"landmark files must end in .npy or .txt, got {path.name!r}")


def write_npz(path: str | os.PathLike, **arrays) -> Path:
    """Write arrays to an ``.npz`` atomically (no pickled objects)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: _as_numpy(v) for k, v in arrays.items()})
    return atomic_write_bytes(path, buf.getvalue())
