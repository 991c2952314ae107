"""Every file the package writes goes through here.

* :func:`atomic_write_bytes`: the one atomic writer. Data goes to a hidden temp file beside the
  target, is flushed to disk and renamed over it, so a crash leaves the old file or the new one,
  never a torn one. The temp file is removed when writing fails, and the final file gets the
  permissions a plain ``open(path, "w")`` would give under the current umask (``mkstemp`` creates
  its files 0600, which would otherwise survive the rename).
* :func:`write_mesh`: the one mesh writer (PLY binary or ASCII, OBJ), with the unit in the header
  and optional per-vertex colours.
* :func:`write_glb`: a binary glTF 2.0 mesh with morph targets (glTF's unit: metres).
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
from typing import Any, Callable, Literal, Optional, Sequence, Union

import numpy as np

__all__ = [
    "atomic_write_bytes",
    "write_mesh",
    "write_glb",
    "write_landmarks",
    "write_npz",
    "identity_coefficients",
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


def _mesh_bytes(fmt: str, v: np.ndarray, f: Optional[np.ndarray], unit: str, binary: bool,
                rgb: Optional[np.ndarray] = None, comments: Sequence[str] = ()) -> bytes:
    """Serialise (V,3) float coordinates, optional (F,3) 0-based faces and (V,3) uint8 colours."""
    notes = [f"units: {_UNIT_WORD[unit]}", *comments]
    if fmt == "obj":
        out = io.StringIO()
        out.write("".join(f"# {n}\n" for n in notes))
        if rgb is None:
            np.savetxt(out, v, fmt="v %.6f %.6f %.6f")
        else:  # the common "v x y z r g b" extension, colours in [0, 1]
            np.savetxt(out, np.hstack([v, rgb / 255.0]), fmt="v %.6f %.6f %.6f %.4f %.4f %.4f")
        if f is not None and len(f):
            np.savetxt(out, f + 1, fmt="f %d %d %d")
        return out.getvalue().encode("ascii")
    n_faces = 0 if f is None else len(f)
    head = ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0",
            *(f"comment {n}" for n in notes),
            f"element vertex {len(v)}", "property float x", "property float y", "property float z"]
    if rgb is not None:
        head += ["property uchar red", "property uchar green", "property uchar blue"]
    if f is not None:
        head += [f"element face {n_faces}", "property list uchar int vertex_indices"]
    header = ("\n".join(head + ["end_header"]) + "\n").encode("ascii")
    if binary:
        if rgb is None:
            body = np.ascontiguousarray(v, dtype="<f4").tobytes()
        else:
            rows = np.empty(len(v), dtype=np.dtype([("p", "<f4", (3,)), ("c", "u1", (3,))]))
            rows["p"] = v
            rows["c"] = rgb
            body = rows.tobytes()
        if f is not None:
            rows = np.empty(n_faces, dtype=np.dtype([("n", "u1"), ("i", "<i4", (3,))]))
            rows["n"] = 3
            rows["i"] = f
            body += rows.tobytes()
        return header + body
    out = io.StringIO()
    if rgb is None:
        np.savetxt(out, v.astype(np.float32), fmt="%.6g")
    else:
        for p, c in zip(v.astype(np.float32), rgb):
            out.write(f"{p[0]:.6g} {p[1]:.6g} {p[2]:.6g} {c[0]} {c[1]} {c[2]}\n")
    if f is not None and n_faces:
        np.savetxt(out, f, fmt="3 %d %d %d")
    return header + out.getvalue().encode("ascii")


def _colors_uint8(colors, n: int) -> np.ndarray:
    """(n, 3) uint8 sRGB from uint8 or float [0, 1] colours (an alpha column is dropped)."""
    c = _as_numpy(colors)
    if c.ndim != 2 or c.shape[0] != n or c.shape[1] not in (3, 4):
        raise ValueError(f"expected colours (V, 3) or (V, 4) for {n} vertices, got {c.shape}")
    c = c[:, :3]
    if c.dtype == np.uint8:
        return np.ascontiguousarray(c)
    c = c.astype(np.float64)
    if not np.isfinite(c).all() or c.min() < 0 or c.max() > 1:
        raise ValueError("float colours must lie in [0, 1] (or pass uint8)")
    return np.rint(c * 255.0).astype(np.uint8)


def _check_faces(faces, n: int) -> Optional[np.ndarray]:
    if faces is None:
        return None
    f = _as_numpy(faces).astype(np.int64)
    if f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"expected faces (F, 3), got {f.shape}")
    if f.size and (f.min() < 0 or f.max() >= n):
        raise ValueError(f"face indices out of range [0, {n})")
    return f


def write_mesh(path: str | os.PathLike, vertices, faces=None, unit: Unit = "mm", *,
               source_unit: Unit = "m", binary: bool = True, colors=None,
               comments: Sequence[str] = ()) -> Path:
    """Write a triangle mesh (or a point cloud, ``faces=None``) as PLY or OBJ, by the suffix.

    Args:
        path: ``.ply`` or ``.obj`` target.
        vertices: (V, 3), numpy or torch, in ``source_unit`` (FLAME's metres by default).
        faces: (F, 3) 0-based vertex indices, or None.
        unit: the unit written (``"mm"``, NoW's, by default, or ``"m"``); named in the header.
        source_unit: the unit ``vertices`` are in.
        binary: PLY only: binary little-endian (default) or ASCII.
        colors: optional per-vertex sRGB colours (V, 3), uint8 or float in [0, 1]: PLY
            ``red green blue`` uchar properties, OBJ ``v x y z r g b`` lines (r g b in [0, 1]).
        comments: extra header lines (e.g. what the colours mean and their scale).
    """
    path = Path(path)
    fmt = path.suffix.lower()[1:]
    if fmt not in ("ply", "obj"):
        raise ValueError(f"mesh files must end in .ply or .obj, got {path.name!r}")
    v = _as_numpy(vertices).astype(np.float64) * (_scale(unit) / _scale(source_unit))
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"expected vertices (V, 3), got {v.shape}")
    f = _check_faces(faces, len(v))
    rgb = None if colors is None else _colors_uint8(colors, len(v))
    comments = [str(c) for c in comments]
    if any("\n" in c or "\r" in c for c in comments):
        raise ValueError("mesh header comments must be single lines")
    return atomic_write_bytes(path, _mesh_bytes(fmt, v, f, unit, binary, rgb, comments))


# glTF 2.0 constants: component types and buffer-view targets
_GL_FLOAT, _GL_UINT = 5126, 5125
_GL_ARRAY_BUFFER, _GL_ELEMENT_ARRAY_BUFFER = 34962, 34963


def _srgb_to_linear(c: np.ndarray) -> np.ndarray:
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def write_glb(path: str | os.PathLike, vertices, faces, *, targets=None, target_names: Sequence[str] = (),
              normals=None, target_normals=None, colors=None, source_unit: Unit = "m",
              name: str = "mesh", extras: Optional[dict] = None) -> Path:
    """Write one triangle mesh with optional morph targets as binary glTF 2.0 (``.glb``).

    glTF's unit is the metre and its up axis +y (FLAME's frame as is). Each morph target is
    stored as the displacement of every vertex from the base mesh; all target weights start
    at 0, and their names are in the mesh's ``extras.targetNames`` (the convention Blender
    and three.js read).

    Args:
        vertices: (V, 3) base mesh in ``source_unit``; faces: (F, 3) 0-based indices.
        targets: (T, V, 3) full vertex positions of the T morph targets (same unit), or None.
        target_names: T names.
        normals: optional (V, 3) unit vertex normals of the base; target_normals: optional
            (T, V, 3) normals of the targets (stored as differences; needs ``normals``).
        colors: optional (V, 3) sRGB colours (uint8 or float [0, 1]); written as linear
            ``COLOR_0`` as glTF requires.
        extras: JSON-ready metadata stored as the asset's ``extras``.
    """
    s = 1.0 / _scale(source_unit)
    v = (_as_numpy(vertices).astype(np.float64) * s).astype(np.float32)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"expected vertices (V, 3), got {v.shape}")
    n = len(v)
    f = _check_faces(faces, n)
    if f is None or not len(f):
        raise ValueError("write_glb needs faces")
    tgt = None
    if targets is not None:
        tgt = (_as_numpy(targets).astype(np.float64) * s).astype(np.float32)
        if tgt.ndim != 3 or tgt.shape[1:] != (n, 3):
            raise ValueError(f"expected targets (T, {n}, 3), got {tgt.shape}")
        if len(target_names) != len(tgt):
            raise ValueError(f"got {len(target_names)} target names for {len(tgt)} targets")
    nrm = None if normals is None else _as_numpy(normals).astype(np.float32)
    tnrm = None if target_normals is None else _as_numpy(target_normals).astype(np.float32)
    if tnrm is not None and (nrm is None or tgt is None or tnrm.shape != tgt.shape):
        raise ValueError("target_normals need normals and targets of the same shape")

    blob = io.BytesIO()
    views: list[dict] = []
    accessors: list[dict] = []

    def add(arr: np.ndarray, kind: str, comp: int, target: int, minmax: bool = False) -> int:
        off = blob.tell()
        data = np.ascontiguousarray(arr).tobytes()
        blob.write(data)
        blob.write(b"\0" * (-len(data) % 4))
        views.append({"buffer": 0, "byteOffset": off, "byteLength": len(data), "target": target})
        acc = {"bufferView": len(views) - 1, "componentType": comp, "count": int(arr.shape[0]), "type": kind}
        if minmax:
            acc["min"] = [float(x) for x in arr.min(0)]
            acc["max"] = [float(x) for x in arr.max(0)]
        accessors.append(acc)
        return len(accessors) - 1

    attrs = {"POSITION": add(v, "VEC3", _GL_FLOAT, _GL_ARRAY_BUFFER, minmax=True)}
    if nrm is not None:
        attrs["NORMAL"] = add(nrm, "VEC3", _GL_FLOAT, _GL_ARRAY_BUFFER)
    if colors is not None:
        lin = _srgb_to_linear(_colors_uint8(colors, n) / 255.0).astype(np.float32)
        attrs["COLOR_0"] = add(lin, "VEC3", _GL_FLOAT, _GL_ARRAY_BUFFER)
    prim: dict[str, Any] = {"attributes": attrs, "mode": 4, "material": 0,
                            "indices": add(f.astype(np.uint32).reshape(-1, 1), "SCALAR", _GL_UINT,
                                           _GL_ELEMENT_ARRAY_BUFFER)}
    mesh: dict[str, Any] = {"name": name, "primitives": [prim]}
    if tgt is not None and len(tgt):
        prim["targets"] = []
        for t in range(len(tgt)):
            entry = {"POSITION": add(tgt[t] - v, "VEC3", _GL_FLOAT, _GL_ARRAY_BUFFER, minmax=True)}
            if tnrm is not None:
                entry["NORMAL"] = add(tnrm[t] - nrm, "VEC3", _GL_FLOAT, _GL_ARRAY_BUFFER)
            prim["targets"].append(entry)
        mesh["weights"] = [0.0] * len(tgt)
        mesh["extras"] = {"targetNames": [str(x) for x in target_names]}
    binary = blob.getvalue()
    gltf = {
        "asset": {"version": "2.0", "generator": "ofer"},
        "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0, "name": name}],
        "meshes": [mesh],
        "materials": [{"name": "clay", "doubleSided": True, "pbrMetallicRoughness": {
            "baseColorFactor": [0.8, 0.8, 0.8, 1.0] if colors is None else [1.0, 1.0, 1.0, 1.0],
            "metallicFactor": 0.0, "roughnessFactor": 0.8}}],
        "buffers": [{"byteLength": len(binary)}], "bufferViews": views, "accessors": accessors,
    }
    if extras:
        gltf["asset"]["extras"] = extras
    js = json.dumps(gltf, separators=(",", ":"), allow_nan=False).encode("utf-8")
    js += b" " * (-len(js) % 4)
    chunks = (len(js).to_bytes(4, "little") + b"JSON" + js
              + len(binary).to_bytes(4, "little") + b"BIN\0" + binary)
    head = b"glTF" + (2).to_bytes(4, "little") + (12 + len(chunks)).to_bytes(4, "little")
    return atomic_write_bytes(path, head + chunks)


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


def identity_coefficients(arrays: Any, key: str = "shape_coeffs") -> np.ndarray:
    """The identity a sample file records, ``(n,)``: ``identity_shape`` when present (a photo
    set's mean identity, which is none of the hypotheses), else ``arrays[key]``: an ``(n,)`` or
    ``(1, n)`` vector as it is, or the ``ranked_index`` row of ``(N, n)`` hypotheses.

    ``arrays``: an opened ``.npz`` or a dict of arrays.

    Raises:
        ValueError: neither array, several hypotheses without a valid ``ranked_index``, or an
            identity that is not a finite vector (the message names the array).
    """
    names = list(arrays.files) if hasattr(arrays, "files") else list(arrays)
    what = "identity_shape" if "identity_shape" in names and key == "shape_coeffs" else key
    if what not in names:
        raise ValueError(f"no {key!r} array (keys: {', '.join(names) or 'none'})")
    S = np.asarray(arrays[what])
    if S.ndim == 2 and S.shape[0] == 1:
        S = S[0]
    if S.ndim == 2:
        if "ranked_index" not in names:
            raise ValueError(f"{what!r} holds {S.shape[0]} identity samples but no 'ranked_index' to pick one")
        i = int(np.asarray(arrays["ranked_index"]).reshape(-1)[0])
        if not 0 <= i < S.shape[0]:
            raise ValueError(f"'ranked_index' {i} is outside the {S.shape[0]} identity samples of {what!r}")
        S = S[i]
    if S.ndim != 1 or not np.all(np.isfinite(S)):
        raise ValueError(f"{what!r} must be a finite (n,) vector, got shape {S.shape}")
    return S


def write_npz(path: str | os.PathLike, **arrays) -> Path:
    """Write arrays to an ``.npz`` atomically (no pickled objects)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: _as_numpy(v) for k, v in arrays.items()})
    return atomic_write_bytes(path, buf.getvalue())
