"""A procedural head in the FLAME file formats, for tests and the out-of-the-box demo.

The real FLAME model and its landmark embedding are licensed and cannot ship. This
module writes stand-ins **in the same formats**, so every test and the demo go through
the real loading path:

* ``generic_model.pkl``: a protocol-2 pickle of a dict with FLAME2020's keys and dtypes
  (``v_template``, ``f``, ``shapedirs`` as a ``chumpy.ch.Ch`` object, ``posedirs``,
  ``J_regressor`` as a ``scipy.sparse.csc_matrix``, ``kintree_table``, ``weights``,
  ``J``, ``bs_style``, ``bs_type``), written without chumpy being installed;
* ``landmark_embedding.npy``: a 0-d object array holding the DECA/MICA landmark dict,
  with the two dynamic entries as torch tensors, as in the real file;
* ``FLAME_masks.pkl``: a dict of vertex-index arrays named as FLAME's masks.

The head is a closed latitude/longitude surface shaped like a head (nose, brows, eye
sockets, lips, chin, cheeks, ears) with five FLAME joints (global, neck, jaw, eyes), a
jaw that opens the lower face, and smooth, localised identity (300) and expression (100)
bases whose column norms fall off like a PCA spectrum. The vertex
count is configurable (approximately; the exact count is ``rows * cols + 2``).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

__all__ = [
    "SyntheticFLAMEPaths",
    "build_synthetic_flame",
    "write_synthetic_flame",
    "write_flame_pickle",
    "write_landmark_embedding",
    "fake_chumpy",
    "LANDMARKS_68_PARAM",
]


# --------------------------------------------------------------------------------------
# Writing chumpy objects without chumpy
# --------------------------------------------------------------------------------------

class _ChumpyObject:
    """An object that pickles exactly like a chumpy node with the given state."""

    def __init__(self, state: dict) -> None:
        self._chumpy_state = state

    def __reduce_ex__(self, protocol):  # pickle as cls.__new__(cls) + BUILD(state)
        import copyreg

        return (copyreg.__newobj__, (type(self),), self._chumpy_state)


@contextlib.contextmanager
def fake_chumpy():
    """Temporarily install importable ``chumpy`` modules whose classes pickle by name.

    Yields a function ``make(module, name, state)`` returning an object that pickles as
    ``GLOBAL chumpy.<module> <name>`` + ``NEWOBJ`` + ``BUILD state``, which is how real
    chumpy objects appear in FLAME pickles. Used to write synthetic FLAME files and, in
    tests, derived chumpy expressions.
    """
    saved = {k: v for k, v in sys.modules.items() if k == "chumpy" or k.startswith("chumpy.")}
    created: dict[str, types.ModuleType] = {}

    def make(module: str, name: str, state: dict) -> _ChumpyObject:
        full = f"chumpy.{module}"
        for mod_name in ("chumpy", full):
            if mod_name not in created:
                created[mod_name] = types.ModuleType(mod_name)
                sys.modules[mod_name] = created[mod_name]
        mod = created[full]
        if not hasattr(mod, name):
            cls = type(name, (_ChumpyObject,), {"__module__": full, "__qualname__": name})
            setattr(mod, name, cls)
        return getattr(mod, name)(state)

    try:
        yield make
    finally:
        for k in created:
            sys.modules.pop(k, None)
        sys.modules.update(saved)


def _ch_state(x: np.ndarray) -> dict:
    """The ``__getstate__`` dict of a plain ``chumpy.ch.Ch`` holding ``x``."""
    return {
        "_depends_on_deps": {},
        "_dirty_vars": set(),
        "_itr": None,
        "_make_dense": [],
        "_make_sparse": [],
        "_status": "undefined",
        "x": x,
    }


# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------

_HALF_AXES = np.array([0.078, 0.115, 0.098])  # metres: half width, half height, half depth

#: (elevation, azimuth) in radians of the 68 iBUG landmarks on the synthetic head.
#: Azimuth 0 faces +z; negative azimuth is the subject's right (-x).
LANDMARKS_68_PARAM: np.ndarray


def _landmarks_param() -> np.ndarray:
    pts = []
    for k in range(17):  # jaw contour, subject's right ear to left ear
        s = k / 16.0
        pts.append((-0.12 - 0.5 * np.sin(np.pi * s), -1.15 + 2.3 * s))
    for k in range(5):  # right brow
        pts.append((0.29 + 0.04 * np.sin(np.pi * k / 4), -0.55 + 0.1 * k))
    for k in range(5):  # left brow
        pts.append((0.29 + 0.04 * np.sin(np.pi * k / 4), 0.15 + 0.1 * k))
    for k in range(4):  # nose bridge down to the tip
        pts.append((0.17 - 0.065 * k, 0.0))
    for k in range(5):  # nostrils; 33 is the subnasale
        pts.append((-0.11 + 0.02 * np.cos(np.pi * (k - 2) / 4) - 0.02, -0.09 + 0.045 * k))
    for sign in (-1, 1):  # right eye (36-41) then left eye (42-47)
        c = 0.325 * sign
        outer, inner = c + 0.11 * sign, c - 0.11 * sign
        if sign < 0:
            ring = [(0.12, outer), (0.15, c - 0.04 * sign), (0.15, c + 0.04 * sign), (0.12, inner),
                    (0.095, c + 0.04 * sign), (0.095, c - 0.04 * sign)]
        else:
            ring = [(0.12, inner), (0.15, c - 0.04 * sign), (0.15, c + 0.04 * sign), (0.12, outer),
                    (0.095, c + 0.04 * sign), (0.095, c - 0.04 * sign)]
        pts.extend(ring)
    mouth_outer = [(-0.30, -0.22), (-0.265, -0.14), (-0.25, -0.05), (-0.255, 0.0), (-0.25, 0.05),
                   (-0.265, 0.14), (-0.30, 0.22), (-0.345, 0.14), (-0.365, 0.05), (-0.37, 0.0),
                   (-0.365, -0.05), (-0.345, -0.14)]
    mouth_inner = [(-0.30, -0.16), (-0.285, -0.05), (-0.285, 0.0), (-0.285, 0.05), (-0.30, 0.16),
                   (-0.315, 0.05), (-0.315, 0.0), (-0.315, -0.05)]
    pts.extend(mouth_outer)
    pts.extend(mouth_inner)
    return np.asarray(pts, dtype=np.float64)


LANDMARKS_68_PARAM = _landmarks_param()


def _bump(el, az, el0, az0, s_el, s_az):
    return np.exp(-0.5 * (((el - el0) / s_el) ** 2 + ((az - az0) / s_az) ** 2))


def _radial_offset(el: np.ndarray, az: np.ndarray) -> np.ndarray:
    """Facial relief (metres, along the outward normal) as a function of (el, az)."""
    d = np.zeros_like(el)
    d += 0.024 * _bump(el, az, -0.02, 0.0, 0.13, 0.075)          # nose
    d += 0.010 * _bump(el, az, 0.12, 0.0, 0.12, 0.06)            # nose bridge
    for s in (-1, 1):
        d -= 0.010 * _bump(el, az, 0.12, 0.325 * s, 0.06, 0.11)   # eye sockets
        d += 0.005 * _bump(el, az, 0.27, 0.33 * s, 0.04, 0.16)    # brow ridge
        d += 0.005 * _bump(el, az, -0.12, 0.55 * s, 0.15, 0.15)   # cheeks
        d += 0.014 * _bump(el, az, 0.0, 1.5708 * s, 0.14, 0.05)   # ears
    d += 0.006 * _bump(el, az, -0.26, 0.0, 0.025, 0.14)          # upper lip
    d += 0.006 * _bump(el, az, -0.355, 0.0, 0.03, 0.13)          # lower lip
    d -= 0.003 * _bump(el, az, -0.31, 0.0, 0.012, 0.18)          # mouth line
    d += 0.010 * _bump(el, az, -0.56, 0.0, 0.09, 0.22)           # chin
    d -= 0.012 * _bump(el, az, -1.2, 0.0, 0.3, 10.0)             # narrower neck
    return d


@dataclass
class _Grid:
    rows: int
    cols: int
    el: np.ndarray  # (V,)
    az: np.ndarray  # (V,)
    faces: np.ndarray  # (F, 3)
    el_rows: np.ndarray  # (rows,)


def _make_grid(n_vertices: int) -> _Grid:
    rows = max(8, int(round(np.sqrt(max(n_vertices - 2, 32) / 2.0))))
    cols = 2 * rows
    el_rows = np.linspace(-np.pi / 2, np.pi / 2, rows + 2)[1:-1]
    az_cols = -np.pi + 2 * np.pi * np.arange(cols) / cols
    el = np.concatenate([[-np.pi / 2], np.repeat(el_rows, cols), [np.pi / 2]])
    az = np.concatenate([[0.0], np.tile(az_cols, rows), [0.0]])
    idx = lambda i, j: 1 + i * cols + (j % cols)  # noqa: E731
    faces = []
    for j in range(cols):  # bottom cap
        faces.append((0, idx(0, j + 1), idx(0, j)))
    for i in range(rows - 1):
        for j in range(cols):
            p00, p01, p10, p11 = idx(i, j), idx(i, j + 1), idx(i + 1, j), idx(i + 1, j + 1)
            faces.append((p00, p11, p10))
            faces.append((p00, p01, p11))
    top = 1 + rows * cols
    for j in range(cols):
        faces.append((top, idx(rows - 1, j), idx(rows - 1, j + 1)))
    return _Grid(rows, cols, el, az, np.asarray(faces, dtype=np.int64), el_rows)


def _surface(el: np.ndarray, az: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points and outward unit normals of the base ellipsoid."""
    a, b, c = _HALF_AXES
    p = np.stack([a * np.cos(el) * np.sin(az), b * np.sin(el), c * np.cos(el) * np.cos(az)], axis=-1)
    n = p / (_HALF_AXES ** 2)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    return p, n


def _locate(grid: _Grid, el: float, az: float) -> tuple[int, np.ndarray]:
    """Face index and barycentric coordinates of the surface point at (el, az)."""
    er = grid.el_rows
    i = int(np.clip(np.searchsorted(er, el) - 1, 0, grid.rows - 2))
    a = float(np.clip((el - er[i]) / (er[i + 1] - er[i]), 0.0, 1.0))
    u = (az + np.pi) / (2 * np.pi) * grid.cols
    j = int(np.floor(u)) % grid.cols
    bcol = float(u - np.floor(u))
    face_base = grid.cols + 2 * (i * grid.cols + j)  # after the bottom cap
    # quad (p00, p01, p10, p11); triangles (p00, p11, p10) and (p00, p01, p11)
    if a >= bcol:
        return face_base, np.array([1 - a, bcol, a - bcol])
    return face_base + 1, np.array([1 - bcol, bcol - a, a])


def _smooth_fields(el, az, normals, rng, count, centres_el, centres_az, widths, tangential=0.3):
    """``count`` smooth vector fields: Gaussian RBF bumps along normals plus a vertical part."""
    V = el.shape[0]
    up = np.array([0.0, 1.0, 0.0])
    fields = np.empty((V, 3, count))
    for k in range(count):
        e0 = rng.uniform(*centres_el)
        a0 = rng.uniform(*centres_az)
        w = widths(k)
        g = _bump(el, az, e0, a0, w, w * 1.3)
        g2 = _bump(el, az, rng.uniform(*centres_el), rng.uniform(*centres_az), w, w * 1.3)
        f = (g - 0.6 * g2)[:, None]
        fields[:, :, k] = f * normals + tangential * rng.normal() * f * up
    return fields


def _scaled_basis(fields: np.ndarray, peak: np.ndarray) -> np.ndarray:
    """Scale each (V, 3) field of ``fields`` (V, 3, K) to a largest displacement of ``peak[k]``.

    The fields are kept as they are (smooth and localised) rather than orthogonalised:
    Gram-Schmidt on overlapping bumps turns the later columns into high-frequency noise.
    Scaling by the peak (not the RMS) keeps small, local components from growing spikes.
    """
    mags = np.linalg.norm(fields, axis=1).max(axis=0)  # (K,)
    return fields / np.maximum(mags, 1e-12)[None, None, :] * peak[None, None, :]


def build_synthetic_flame(n_vertices: int = 5023, seed: int = 0, n_shape: int = 300, n_exp: int = 100) -> dict:
    """Build the arrays of a synthetic FLAME model.

    Returns:
        dict with the FLAME model keys (float64 arrays; ``f`` uint32; ``J_regressor``
        csc), plus ``landmarks`` (the landmark dict) and ``masks`` (vertex regions).
    """
    if n_vertices < 200:
        raise ValueError(f"n_vertices={n_vertices} is too small for a head (need >= 200)")
    rng = np.random.default_rng(seed)
    grid = _make_grid(n_vertices)
    el, az = grid.el, grid.az
    V = el.shape[0]
    base, normals = _surface(el, az)
    v_template = base + _radial_offset(el, az)[:, None] * normals

    front = 1.0 / (1.0 + np.exp((np.abs(az) - 1.2) / 0.08))
    # identity basis: first a few global proportions, then localised bumps, coarse to fine
    glob = np.stack([
        base * np.array([1.0, 0.0, 0.0]),  # width
        base * np.array([0.0, 1.0, 0.0]),  # height
        base * np.array([0.0, 0.0, 1.0]),  # depth
        (np.clip(-el, 0, None))[:, None] * normals,  # lower-face length
        (np.clip(el, 0, None))[:, None] * normals,  # cranium
    ], axis=-1)
    loc = _smooth_fields(el, az, normals, rng, n_shape - glob.shape[-1], (-0.7, 0.5), (-1.3, 1.3),
                         lambda k: 0.1 + 0.3 / (1.0 + k / 20.0), tangential=0.2)
    loc *= (0.3 + 0.7 * front)[:, None, None]
    shape_rms = 0.008 / (1.0 + np.arange(n_shape) / 4.0) ** 1.2
    shape_basis = _scaled_basis(np.concatenate([glob, loc], axis=-1), shape_rms)

    # expression basis: mouth, jaw, brows, eyes, cheeks first, then localised detail
    mouth = _bump(el, az, -0.31, 0.0, 0.08, 0.25)
    corners = sum(_bump(el, az, -0.30, 0.22 * s, 0.05, 0.06) * s for s in (-1, 1))
    brows = sum(_bump(el, az, 0.29, 0.33 * s, 0.05, 0.14) for s in (-1, 1))
    lids = sum(_bump(el, az, 0.135, 0.325 * s, 0.025, 0.09) for s in (-1, 1))
    up = np.array([0.0, 1.0, 0.0])
    side = np.array([1.0, 0.0, 0.0])
    semantic = np.stack([
        (np.abs(corners)[:, None] * (up * 0.8) + corners[:, None] * side * 0.5),  # smile
        (mouth[:, None] * normals * 0.5 - (el < -0.31)[:, None] * mouth[:, None] * up),  # lower lip down
        brows[:, None] * up,  # brow raise
        -lids[:, None] * up,  # eye closure
        mouth[:, None] * normals - np.abs(corners)[:, None] * side * np.sign(az)[:, None],  # pucker
    ], axis=-1)
    exp_loc = _smooth_fields(el, az, normals, rng, n_exp - semantic.shape[-1], (-0.6, 0.35), (-0.9, 0.9),
                             lambda k: 0.08 + 0.2 / (1.0 + k / 20.0), tangential=0.6)
    exp_loc *= front[:, None, None]
    exp_rms = 0.006 / (1.0 + np.arange(n_exp) / 3.0) ** 1.2
    exp_basis = _scaled_basis(np.concatenate([semantic, exp_loc], axis=-1), exp_rms)
    shapedirs = np.concatenate([shape_basis, exp_basis], axis=-1)
    if n_shape != 300 or n_exp != 100:  # keep FLAME's column layout: 300 identity, then expression
        full = np.zeros((V, 3, 300 + n_exp))
        full[:, :, :n_shape] = shape_basis
        full[:, :, 300:] = exp_basis
        shapedirs = full

    # joints: global, neck, jaw, left eye, right eye (parents -1, 0, 1, 1, 1)
    def ring(mask):
        idx = np.nonzero(mask)[0]
        return idx if idx.size else np.array([int(np.argmin(np.abs(el + 1.0)))])

    joint_sets = [
        ring(el < el.min() + 0.45),  # bottom cap -> global root
        ring((el > -1.05) & (el < -0.85)),  # neck ring
        ring((np.abs(np.abs(az) - np.pi / 2) < 0.25) & (np.abs(el + 0.18) < 0.12)),  # both jaw hinges
        ring(_bump(el, az, 0.12, 0.325, 0.05, 0.09) > 0.5),  # left eye (subject's left, +x)
        ring(_bump(el, az, 0.12, -0.325, 0.05, 0.09) > 0.5),  # right eye
    ]
    rows_, cols_, vals_ = [], [], []
    for j, idx in enumerate(joint_sets):
        rows_ += [j] * len(idx)
        cols_ += list(idx)
        vals_ += [1.0 / len(idx)] * len(idx)
    J_regressor = sp.csc_matrix((vals_, (rows_, cols_)), shape=(5, V))
    J = np.asarray(J_regressor @ v_template)

    jaw_w = front * (1.0 / (1.0 + np.exp((el + 0.31) / 0.025))) * (el > -1.0)
    neck_w = 1.0 / (1.0 + np.exp((el + 0.95) / 0.06))
    eye_w = [0.9 * _bump(el, az, 0.12, 0.325 * s, 0.03, 0.06) for s in (1, -1)]
    weights = np.stack([np.zeros(V), neck_w, jaw_w * (1 - neck_w), *eye_w], axis=1)
    weights[:, 1:] = np.clip(weights[:, 1:], 0.0, 1.0)
    over = weights[:, 1:].sum(1)
    weights[:, 1:] /= np.maximum(over, 1.0)[:, None]
    weights[:, 0] = 1.0 - weights[:, 1:].sum(1)

    # pose correctives: only the jaw rotation (feature entries 9..17) bulges the cheeks
    posedirs = np.zeros((V, 3, 36))
    cheek = sum(_bump(el, az, -0.25, 0.45 * s, 0.12, 0.12) for s in (-1, 1))
    for e in range(9, 18):
        posedirs[:, :, e] = 0.002 * rng.normal() * cheek[:, None] * normals

    # landmark embedding
    full_faces, full_bary = zip(*(_locate(grid, e, a) for e, a in LANDMARKS_68_PARAM))
    full_faces = np.asarray(full_faces, dtype=np.int64)
    full_bary = np.asarray(full_bary)
    dyn_faces = np.zeros((79, 17), dtype=np.int64)
    dyn_bary = np.zeros((79, 17, 3))
    for row in range(79):
        yaw = row if row <= 39 else -(row - 39)
        shift = -0.35 * np.deg2rad(yaw)
        for k in range(17):
            e, a = LANDMARKS_68_PARAM[k]
            a = float(np.clip(a + shift * (1 - abs(a) / 1.6), -1.4, 1.4))
            dyn_faces[row, k], dyn_bary[row, k] = _locate(grid, e, a)
    import torch  # the real file stores the dynamic tables as torch tensors

    landmarks = {
        "static_lmk_faces_idx": full_faces[17:].copy(),
        "static_lmk_bary_coords": full_bary[17:].astype(np.float64),
        "dynamic_lmk_faces_idx": torch.from_numpy(dyn_faces),
        "dynamic_lmk_bary_coords": torch.from_numpy(dyn_bary.astype(np.float32)),
        "full_lmk_faces_idx": full_faces[None].copy(),
        "full_lmk_bary_coords": full_bary[None].astype(np.float32),
    }

    def region(mask):
        return np.nonzero(mask)[0].astype(np.int64)

    masks = {
        "face": region((np.abs(az) < 0.95) & (el > -0.68) & (el < 0.42)),
        "lips": region(_bump(el, az, -0.31, 0.0, 0.06, 0.2) > 0.3),
        "nose": region(_bump(el, az, 0.0, 0.0, 0.15, 0.1) > 0.3),
        "forehead": region((el > 0.33) & (el < 0.7) & (np.abs(az) < 0.7)),
        "left_eye_region": region(_bump(el, az, 0.14, 0.325, 0.08, 0.15) > 0.3),
        "right_eye_region": region(_bump(el, az, 0.14, -0.325, 0.08, 0.15) > 0.3),
        "eye_region": region(sum(_bump(el, az, 0.14, 0.325 * s, 0.1, 0.2) for s in (-1, 1)) > 0.3),
        "left_ear": region(_bump(el, az, 0.0, np.pi / 2, 0.2, 0.12) > 0.3),
        "right_ear": region(_bump(el, az, 0.0, -np.pi / 2, 0.2, 0.12) > 0.3),
        "left_eyeball": np.zeros(0, dtype=np.int64),
        "right_eyeball": np.zeros(0, dtype=np.int64),
        "neck": region(el < -0.9),
        "scalp": region(el > 0.7),
        "boundary": region(np.abs(el + 1.1) < 0.05),
    }
    return {
        "v_template": v_template,
        "f": grid.faces.astype(np.uint32),
        "shapedirs": shapedirs,
        "posedirs": posedirs,
        "J_regressor": J_regressor,
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "weights": weights,
        "J": J,
        "bs_style": "lbs",
        "bs_type": "lrotmin",
        "landmarks": landmarks,
        "masks": masks,
    }


def write_flame_pickle(path: str | os.PathLike, model: dict, chumpy_keys=("shapedirs",)) -> Path:
    """Write a FLAME-format pickle (protocol 2) with ``chumpy_keys`` as chumpy ``Ch`` objects."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "kintree_table", "weights", "J", "bs_style", "bs_type")
    with fake_chumpy() as make:
        out = {k: (make("ch", "Ch", _ch_state(model[k])) if k in chumpy_keys else model[k]) for k in keys if k in model}
        with open(path, "wb") as f:
            pickle.dump(out, f, protocol=2)
    return path


def write_landmark_embedding(path: str | os.PathLike, landmarks: dict) -> Path:
    """Write a landmark dict the way the DECA/MICA file was written: ``np.save`` of a 0-d object."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.empty((), dtype=object)
    arr[()] = dict(landmarks)
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=True)
    return path


@dataclass
class SyntheticFLAMEPaths:
    """Files written by :func:`write_synthetic_flame`."""

    model: Path
    landmarks: Path
    masks: Path


def write_synthetic_flame(
    out_dir: str | os.PathLike, n_vertices: int = 5023, seed: int = 0, n_shape: int = 300, n_exp: int = 100
) -> SyntheticFLAMEPaths:
    """Write ``generic_model.pkl``, ``landmark_embedding.npy`` and ``FLAME_masks.pkl``.

    Args:
        out_dir: target folder (created).
        n_vertices: approximate vertex count.
        seed: seed of the random parts of the bases.
        n_shape, n_exp: basis sizes (FLAME: 300 and 100; the file layout stays 300 + n_exp).
    """
    out_dir = Path(out_dir)
    model = build_synthetic_flame(n_vertices=n_vertices, seed=seed, n_shape=n_shape, n_exp=n_exp)
    paths = SyntheticFLAMEPaths(
        model=write_flame_pickle(out_dir / "generic_model.pkl", model),
        landmarks=write_landmark_embedding(out_dir / "landmark_embedding.npy", model["landmarks"]),
        masks=out_dir / "FLAME_masks.pkl",
    )
    with open(paths.masks, "wb") as f:
        pickle.dump(model["masks"], f, protocol=2)
    return paths
