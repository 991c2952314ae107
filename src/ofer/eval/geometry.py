"""Geometry for evaluation: mesh I/O, exact point-to-triangle distances, similarity alignment.

Everything here is float64 NumPy unless stated otherwise. Conventions:

* vertices ``V``: ``(N, 3) float64``; faces ``F``: ``(M, 3) int64`` (0-based, triangles);
* points are row vectors, a rotation ``R`` acts as ``p @ R.T`` (i.e. ``R p`` in column form).

Distances use libigl's AABB tree (``igl.AABB``, exact float64 closest point on each
triangle, edges and vertices included). :func:`brute_force_point_mesh_distance` is an
independent naive implementation (Ericson, *Real-Time Collision Detection*, 5.1.5) used as
the test oracle.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import OferError
from ..geometry import umeyama

__all__ = [
    "MeshError",
    "read_mesh",
    "validate_mesh",
    "MeshDistance",
    "point_mesh_distance",
    "closest_point_on_triangle",
    "brute_force_point_mesh_distance",
    "procrustes_now",
    "ProcrustesResult",
    "rodrigues",
    "rotation_jacobian",
    "RefineResult",
    "refine_similarity_dogleg",
    "umeyama",
]


class MeshError(OferError, ValueError):
    """A mesh file is missing, unreadable, empty or malformed."""


# ----------------------------------------------------------------------------------------
# Mesh reading / writing
# ----------------------------------------------------------------------------------------


def _fan(polys: list[list[int]]) -> np.ndarray:
    """Fan-triangulate polygons ``(0, i, i+1)``; returns ``(M, 3) int64``."""
    tris: list[tuple[int, int, int]] = []
    for poly in polys:
        for i in range(1, len(poly) - 1):
            tris.append((poly[0], poly[i], poly[i + 1]))
    if not tris:
        return np.zeros((0, 3), dtype=np.int64)
    return np.asarray(tris, dtype=np.int64)


def _read_obj(path: Path) -> tuple[np.ndarray, np.ndarray]:
    verts: list[tuple[float, float, float]] = []
    polys: list[list[int]] = []
    tri_fast: list[tuple[int, int, int]] = []
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            # a keyword and its values are separated by any whitespace ("v\t1 2 3", "f  1 2 3")
            tag = line[:1] if line[1:2].isspace() else ""
            if tag == "v":
                tok = line.split()
                if len(tok) < 4:
                    raise MeshError(f"{path}:{lineno}: vertex line has fewer than 3 coordinates")
                # Only x y z: trailing colour columns (v x y z r g b) or w are ignored.
                verts.append((float(tok[1]), float(tok[2]), float(tok[3])))
            elif tag == "f":
                tok = line.split()[1:]
                n_now = len(verts)
                idx = []
                for t in tok:
                    s = t.split("/", 1)[0]
                    try:
                        k = int(s)
                    except ValueError:
                        raise MeshError(f"{path}:{lineno}: bad face index {t!r}") from None
                    if k > 0:
                        idx.append(k - 1)
                    elif k < 0:  # relative index (OBJ spec): -1 = last vertex defined so far
                        idx.append(n_now + k)
                    else:
                        raise MeshError(f"{path}:{lineno}: face index 0 is invalid (OBJ is 1-based)")
                if len(idx) < 3:
                    raise MeshError(f"{path}:{lineno}: face with fewer than 3 vertices")
                if len(idx) == 3:
                    tri_fast.append((idx[0], idx[1], idx[2]))
                else:
                    polys.append(idx)
    V = np.asarray(verts, dtype=np.float64).reshape(-1, 3)
    F = np.asarray(tri_fast, dtype=np.int64).reshape(-1, 3)
    if polys:
        F = np.concatenate([F, _fan(polys)], axis=0)
    return V, F


_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


@dataclass
class _PlyElement:
    name: str
    count: int
    props: list[tuple] = field(default_factory=list)  # (name, dtype) or (name, count_dtype, item_dtype)


def _read_ply(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        data = f.read()
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise MeshError(f"{path}: not a PLY file (missing 'ply' magic or 'end_header')")
    nl = data.find(b"\n", end)
    header = data[:end].decode("ascii", errors="replace").splitlines()
    body = data[nl + 1:]
    fmt = None
    elements: list[_PlyElement] = []
    for line in header:
        tok = line.split()
        if not tok:
            continue
        if tok[0] == "format":
            fmt = tok[1]
        elif tok[0] == "element":
            elements.append(_PlyElement(tok[1], int(tok[2])))
        elif tok[0] == "property":
            if not elements:
                raise MeshError(f"{path}: PLY property before any element")
            if tok[1] == "list":
                if tok[2] not in _PLY_TYPES or tok[3] not in _PLY_TYPES:
                    raise MeshError(f"{path}: unsupported PLY list type {tok[2]}/{tok[3]}")
                elements[-1].props.append((tok[4], _PLY_TYPES[tok[2]], _PLY_TYPES[tok[3]]))
            else:
                if tok[1] not in _PLY_TYPES:
                    raise MeshError(f"{path}: unsupported PLY type {tok[1]}")
                elements[-1].props.append((tok[2], _PLY_TYPES[tok[1]]))
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise MeshError(f"{path}: unsupported PLY format {fmt!r}")
    V = None
    F = np.zeros((0, 3), dtype=np.int64)
    if fmt == "ascii":
        tokens = body.split()
        pos = 0
        for el in elements:
            rows = []
            faces_el: list[list[int]] = []
            for _ in range(el.count):
                row = {}
                for p in el.props:
                    if len(p) == 3:
                        n = int(float(tokens[pos]))
                        row[p[0]] = [int(float(x)) for x in tokens[pos + 1:pos + 1 + n]]
                        pos += 1 + n
                    else:
                        row[p[0]] = float(tokens[pos])
                        pos += 1
                rows.append(row)
            if el.name == "vertex":
                V = np.asarray([[r["x"], r["y"], r["z"]] for r in rows], dtype=np.float64).reshape(-1, 3)
            elif el.name == "face":
                key = _face_key(el, path)
                faces_el = [r[key] for r in rows]
                F = _fan(faces_el)
    else:
        bo = "<" if fmt == "binary_little_endian" else ">"
        off = 0
        for el in elements:
            has_list = any(len(p) == 3 for p in el.props)
            if not has_list:
                dt = np.dtype([(p[0], bo + p[1]) for p in el.props])
                arr = np.frombuffer(body, dtype=dt, count=el.count, offset=off)
                off += dt.itemsize * el.count
                if el.name == "vertex":
                    V = np.stack([arr["x"], arr["y"], arr["z"]], axis=1).astype(np.float64)
            else:
                # Fast path: a single list property whose length is constant (e.g. all triangles).
                if el.name == "face" and len(el.props) == 1 and el.count > 0:
                    _, cdt, idt = el.props[0]
                    cdt_ = np.dtype(bo + cdt)
                    idt_ = np.dtype(bo + idt)
                    n0 = int(np.frombuffer(body, dtype=cdt_, count=1, offset=off)[0])
                    dt = np.dtype([("n", cdt_), ("i", idt_, (n0,))])
                    if off + dt.itemsize * el.count <= len(body):
                        arr = np.frombuffer(body, dtype=dt, count=el.count, offset=off)
                        if np.all(arr["n"] == n0):
                            off += dt.itemsize * el.count
                            F = _fan(arr["i"].astype(np.int64).tolist()) if n0 != 3 else arr["i"].astype(np.int64)
                            continue
                polys = []
                for _ in range(el.count):
                    row = {}
                    for p in el.props:
                        if len(p) == 3:
                            cdt_ = np.dtype(bo + p[1])
                            idt_ = np.dtype(bo + p[2])
                            n = int(np.frombuffer(body, dtype=cdt_, count=1, offset=off)[0])
                            off += cdt_.itemsize
                            row[p[0]] = np.frombuffer(body, dtype=idt_, count=n, offset=off).astype(np.int64).tolist()
                            off += idt_.itemsize * n
                        else:
                            dt_ = np.dtype(bo + p[1])
                            row[p[0]] = np.frombuffer(body, dtype=dt_, count=1, offset=off)[0]
                            off += dt_.itemsize
                    if el.name == "face":
                        polys.append(row[_face_key(el, path)])
                if el.name == "face":
                    F = _fan(polys)
    if V is None:
        raise MeshError(f"{path}: PLY file has no 'vertex' element with x, y, z")
    return V, np.ascontiguousarray(F, dtype=np.int64)


def _face_key(el: _PlyElement, path: Path) -> str:
    for p in el.props:
        if len(p) == 3 and p[0] in ("vertex_indices", "vertex_index"):
            return p[0]
    raise MeshError(f"{path}: PLY face element has no 'vertex_indices' list")


def read_mesh(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read an ``.obj`` or ``.ply`` triangle mesh.

    Only ``x y z`` of each vertex are read (colour columns ``v x y z r g b`` are ignored),
    polygons are fan-triangulated ``(0, i, i+1)``, ``v/vt/vn`` face tokens and negative
    (relative) OBJ indices are handled.

    Returns:
        ``V (N, 3) float64`` and ``F (M, 3) int64`` (0-based).
    Raises:
        MeshError: missing file, unknown extension or malformed content (one line).
    """
    path = Path(path)
    if not path.is_file():
        raise MeshError(f"mesh file not found: {path}")
    ext = path.suffix.lower()
    try:
        if ext == ".obj":
            V, F = _read_obj(path)
        elif ext == ".ply":
            V, F = _read_ply(path)
        else:
            raise MeshError(f"{path}: unsupported mesh extension {ext!r} (expected .obj or .ply)")
    except MeshError:
        raise
    except (ValueError, IndexError, KeyError, UnicodeError) as exc:
        raise MeshError(f"{path}: cannot parse mesh ({type(exc).__name__}: {exc})") from exc
    return V, F


def validate_mesh(V: np.ndarray, F: np.ndarray, name: str, warn: bool = True) -> list[str]:
    """Check a mesh for use in distance computations.

    Raises :class:`MeshError` (one line naming ``name``) for an empty mesh, faces that index
    missing vertices, or non-finite coordinates. Returns a list of one-line warnings for
    non-manifold edges (shared by more than two faces) and degenerate faces, which do not
    prevent evaluation (distances are well defined on any triangle soup); printed to stderr
    when ``warn``.
    """
    V = np.asarray(V)
    F = np.asarray(F)
    if V.ndim != 2 or V.shape[1] != 3 or V.shape[0] == 0:
        raise MeshError(f"{name}: mesh has no vertices (expected an (N, 3) vertex array, got {V.shape})")
    if F.ndim != 2 or F.shape[1] != 3 or F.shape[0] == 0:
        raise MeshError(f"{name}: mesh has no triangle faces (got faces of shape {F.shape})")
    if F.min() < 0 or F.max() >= V.shape[0]:
        raise MeshError(f"{name}: face indices out of range [0, {V.shape[0]}) (min {F.min()}, max {F.max()})")
    if not np.all(np.isfinite(V)):
        raise MeshError(f"{name}: mesh has NaN or infinite vertex coordinates")
    warnings_: list[str] = []
    edges = np.sort(np.concatenate([F[:, [0, 1]], F[:, [1, 2]], F[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    n_nm = int(np.sum(counts > 2))
    if n_nm:
        warnings_.append(f"{name}: mesh is non-manifold ({n_nm} edges shared by more than two faces); "
                         "distances are still exact point-to-triangle distances")
    n_deg = int(np.sum((F[:, 0] == F[:, 1]) | (F[:, 1] == F[:, 2]) | (F[:, 0] == F[:, 2])))
    if n_deg:
        warnings_.append(f"{name}: mesh has {n_deg} degenerate faces (repeated vertex); they act as edges")
    if warn:
        for w in warnings_:
            print(f"warning: {w}", file=sys.stderr)
    return warnings_


# ----------------------------------------------------------------------------------------
# Point-to-triangle distance
# ----------------------------------------------------------------------------------------


class MeshDistance:
    """Exact unsigned point-to-mesh distance through an AABB tree built once (libigl).

    Args:
        V: ``(N, 3)`` vertices; F: ``(M, 3)`` triangle indices. Vertices used by no face are
            ignored (as in the NoW evaluation).
    """

    def __init__(self, V: np.ndarray, F: np.ndarray) -> None:
        import igl

        self.V = np.ascontiguousarray(V, dtype=np.float64)
        self.F = np.ascontiguousarray(F, dtype=np.int64)
        self._tree = igl.AABB()
        self._tree.init(self.V, self.F)

    def query(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Closest points on the mesh.

        Args:
            points: ``(P, 3)`` query points.
        Returns:
            ``dist (P,) float64`` (unsigned Euclidean), ``face (P,) int64`` (index of the
            closest triangle), ``closest (P, 3) float64`` (closest surface points).
        """
        P = np.ascontiguousarray(points, dtype=np.float64).reshape(-1, 3)
        if P.shape[0] == 0:
            return np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros((0, 3))
        sq, idx, C = self._tree.squared_distance(self.V, self.F, P)
        return np.sqrt(np.maximum(sq, 0.0)), np.asarray(idx, dtype=np.int64), np.asarray(C)


def point_mesh_distance(points: np.ndarray, V: np.ndarray, F: np.ndarray) -> np.ndarray:
    """Unsigned distance ``(P,) float64`` from each point to the triangle mesh ``(V, F)``."""
    return MeshDistance(V, F).query(points)[0]


def closest_point_on_triangle(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Closest point on triangle ``abc`` to each point ``p``.

    ``p`` is projected onto the triangle's plane, in the coordinates ``(s, t)`` of
    ``a + s (b - a) + t (c - a)`` (the normal equations of that least-squares fit). When
    ``s, t >= 0`` and ``s + t <= 1`` the projection lies in the triangle and is the answer;
    otherwise the closest point is on the boundary: the nearest of the three edges' closest
    points. A degenerate (zero-area) triangle has no plane and is all boundary.

    Vectorised over leading dimensions: ``p, a, b, c`` broadcast to ``(..., 3)`` float64.
    """
    p, a, b, c = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (p, a, b, c)))
    e1, e2, r = b - a, c - a, p - a
    g11, g12, g22 = (np.einsum("...i,...i->...", x, y) for x, y in ((e1, e1), (e1, e2), (e2, e2)))
    h1, h2 = np.einsum("...i,...i->...", e1, r), np.einsum("...i,...i->...", e2, r)
    det = g11 * g22 - g12 * g12
    with np.errstate(divide="ignore", invalid="ignore"):
        s = (g22 * h1 - g12 * h2) / det
        t = (g11 * h2 - g12 * h1) / det
        inside = (det > 1e-12 * g11 * g22) & (s >= 0) & (t >= 0) & (s + t <= 1)
    edges = np.stack([_closest_on_segment(p, x, y) for x, y in ((a, b), (b, c), (c, a))])
    nearest = np.argmin(np.sum((edges - p) ** 2, axis=-1), axis=0)
    out = np.take_along_axis(edges, nearest[None, ..., None], axis=0)[0]
    proj = a + np.where(inside, s, 0.0)[..., None] * e1 + np.where(inside, t, 0.0)[..., None] * e2
    return np.where(inside[..., None], proj, out)


def _closest_on_segment(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    den = np.sum(ab * ab, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.clip(np.sum((p - a) * ab, axis=-1) / den, 0.0, 1.0)
    t = np.where(den > 0, t, 0.0)
    return a + t[..., None] * ab


def brute_force_point_mesh_distance(points: np.ndarray, V: np.ndarray, F: np.ndarray,
                                    chunk: int = 64) -> np.ndarray:
    """Naive float64 oracle: distance from every point to every triangle, minimum taken.

    O(P·M) time; use for tests and small inputs only. Returns ``(P,) float64``.
    """
    P = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    V = np.asarray(V, dtype=np.float64)
    F = np.asarray(F, dtype=np.int64)
    a, b, c = V[F[:, 0]], V[F[:, 1]], V[F[:, 2]]
    out = np.empty(len(P))
    for i in range(0, len(P), chunk):
        p = P[i:i + chunk, None, :]
        q = closest_point_on_triangle(p, a[None], b[None], c[None])
        out[i:i + chunk] = np.sqrt(np.min(np.sum((p - q) ** 2, axis=-1), axis=1))
    return out


# ----------------------------------------------------------------------------------------
# Landmark similarity (NoW's MATLAB-style procrustes, faithful)
# ----------------------------------------------------------------------------------------


@dataclass
class ProcrustesResult:
    """Similarity mapping ``Y -> X`` in NoW's row-vector form ``y' = scale * (y @ rotation) + translation``.

    ``rotation`` is ``(3, 3)`` and may be a reflection (det -1) as in the original.
    ``disparity`` is MATLAB's standardised residual ``1 - trace(S)^2`` in [0, 1].
    """

    rotation: np.ndarray
    scale: float
    translation: np.ndarray
    disparity: float

    @property
    def is_reflection(self) -> bool:
        return bool(np.linalg.det(self.rotation.astype(np.float64)) < 0)


def _unit_centred(P: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centroid, Frobenius size of the centred set, and the centred set scaled to size 1."""
    centroid = P.mean(axis=0)
    centred = P - centroid
    size = np.sqrt(np.sum(centred * centred))
    return centroid, size, centred / size


def procrustes_now(X: np.ndarray, Y: np.ndarray) -> ProcrustesResult:
    """NoW's landmark Procrustes (``scaling=True, reflection='best'``), reproduced exactly.

    Both landmark sets are centred and scaled to unit Frobenius size, ``x̂ = (X − μ_X)/‖X − μ_X‖``
    and likewise ``ŷ``. With the SVD ``x̂ᵀ ŷ = U diag(σ) Vᵀ`` the best orthogonal map of ``ŷ``
    onto ``x̂`` is ``T = V Uᵀ`` (row form ``ŷ @ T``) with correlation ``Σσ``; undoing the
    normalisation gives ``scale = Σσ · ‖X − μ_X‖ / ‖Y − μ_Y‖``,
    ``translation = μ_X − scale · μ_Y @ T`` and ``disparity = 1 − (Σσ)²``.

    The computation runs in ``np.result_type(X, Y)`` (float32 for NoW's float32 ``.pp``
    landmarks and float32 predicted landmarks, including the SVD) and applies **no**
    determinant correction, so a reflection can be returned, as in the original.

    Args:
        X: ``(n, 3)`` target (ground-truth) landmarks. Y: ``(n, 3)`` source (predicted).
    """
    dt = np.result_type(np.asarray(X), np.asarray(Y))
    if not np.issubdtype(dt, np.floating):
        dt = np.float64
    mu_x, size_x, x_hat = _unit_centred(np.asarray(X, dtype=dt))
    mu_y, size_y, y_hat = _unit_centred(np.asarray(Y, dtype=dt))
    U, sigma, Vt = np.linalg.svd(x_hat.T @ y_hat)
    T = Vt.T @ U.T  # V Uᵀ: orthogonal, reflections allowed
    corr = sigma.sum()
    scale = corr * size_x / size_y
    translation = mu_x - scale * (mu_y @ T)
    return ProcrustesResult(rotation=T, scale=scale, translation=translation, disparity=float(1 - corr ** 2))


# ----------------------------------------------------------------------------------------
# Rotation helpers
# ----------------------------------------------------------------------------------------


def _skew(v: np.ndarray) -> np.ndarray:
    x, y, z = v
    return np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])


def rodrigues(r: np.ndarray) -> np.ndarray:
    """Axis-angle ``(3,)`` -> rotation matrix ``(3, 3)`` (as ``cv2.Rodrigues``)."""
    r = np.asarray(r, dtype=np.float64)
    th = float(np.linalg.norm(r))
    K = _skew(r)
    if th < 1e-12:
        return np.eye(3) + K + 0.5 * K @ K
    return np.eye(3) + (np.sin(th) / th) * K + ((1 - np.cos(th)) / th ** 2) * K @ K


def rotation_jacobian(r: np.ndarray) -> np.ndarray:
    """Right Jacobian ``J_r (3, 3)`` of SO(3): ``R(r + δ) ≈ R(r) exp([J_r δ]×)``.

    Hence ``∂(R(r) u)/∂r = -R(r) [u]× J_r``.
    """
    r = np.asarray(r, dtype=np.float64)
    th = float(np.linalg.norm(r))
    K = _skew(r)
    if th < 1e-6:
        return np.eye(3) - 0.5 * K + K @ K / 6.0
    return np.eye(3) - ((1 - np.cos(th)) / th ** 2) * K + ((th - np.sin(th)) / th ** 3) * K @ K


# ----------------------------------------------------------------------------------------
# Scan-to-mesh similarity refinement (chumpy dogleg as used by NoW, re-implemented)
# ----------------------------------------------------------------------------------------


@dataclass
class RefineResult:
    """Outcome of :func:`refine_similarity_dogleg`.

    The refined mesh is ``s * V @ R.T + t``. ``cost`` is Σ residual² at the solution,
    ``iterations`` the outer dogleg iterations, ``fevals`` the residual evaluations
    (closest-point queries), ``stop`` the stopping reason.
    """

    s: float
    R: np.ndarray
    t: np.ndarray
    r: np.ndarray
    cost: float
    iterations: int
    fevals: int
    stop: str

    def apply(self, V: np.ndarray) -> np.ndarray:
        return self.s * (np.asarray(V, dtype=np.float64) @ self.R.T) + self.t


class _ScanToMesh:
    """Residuals and Jacobian of NoW's objective for parameters p = [s, r(3), t(3)].

    The AABB tree is built once on the *fixed* mesh ``V``; the scan points are mapped into
    the mesh frame by the inverse similarity, which gives exactly the same distances:
    ``d(q, sR V + t) = s · d(Rᵀ(q − t)/s, V)`` for ``s > 0``.
    """

    def __init__(self, scan: np.ndarray, V: np.ndarray, F: np.ndarray, fix_scale: bool) -> None:
        self.q = np.ascontiguousarray(scan, dtype=np.float64)
        self.md = MeshDistance(V, F)
        self.fix_scale = fix_scale
        self.fevals = 0

    def unpack(self, p: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        if self.fix_scale:
            return 1.0, p[0:3], p[3:6]
        return float(p[0]), p[1:4], p[4:7]

    def residuals(self, p: np.ndarray) -> tuple[np.ndarray, dict]:
        """Residual vector ``(N [+1],)`` and a cache for :meth:`jacobian`."""
        s, r, t = self.unpack(p)
        R = rodrigues(r)
        self.fevals += 1
        if s > 0:
            local = ((self.q - t) @ R) / s  # R^T (q - t) / s as rows
            d_local, _, c_local = self.md.query(local)
            dist = s * d_local
        else:
            # s <= 0 only occurs transiently; transform the mesh explicitly (rebuild tree).
            md = MeshDistance(s * self.md.V @ R.T + t, self.md.F)
            dist, _, c_world = md.query(self.q)
            c_local = ((c_world - t) @ R) / s if s != 0 else np.zeros_like(c_world)
        res = dist if self.fix_scale else np.concatenate([dist, [100.0 * (abs(s) - s)]])
        return res, {"s": s, "r": r, "t": t, "R": R, "c_local": c_local, "dist": dist}

    def jacobian(self, cache: dict) -> np.ndarray:
        """Exact derivative of each distance with the closest feature held fixed.

        For ``d = ||q − c||`` with ``c = s R c' + t`` (``c'`` the closest point in the fixed
        mesh frame, barycentric weights held fixed) this is ``−nᵀ ∂c/∂p`` with
        ``n = (q − c)/d``; by the envelope theorem this equals psbody/sbody's derivative of
        the point-to-plane / line / point squared distance chained through √·. Points with
        ``d = 0`` get a zero row (the original would produce a non-finite one).
        """
        s, R, t, cl, dist = cache["s"], cache["R"], cache["t"], cache["c_local"], cache["dist"]
        Rc = cl @ R.T  # (N,3) R c'
        c = s * Rc + t
        with np.errstate(divide="ignore", invalid="ignore"):
            n = (self.q - c) / dist[:, None]
        n[~(dist > 0)] = 0.0
        # d c / d r = -s R [c']x J_r  -> row-wise: n^T (-s R [c']x J_r) = -s ((R^T n) x c')^T ... use identity
        # n^T R [c']x = (R^T n)^T [c']x = -(c' x R^T n)^T = ((R^T n) x c')^T
        Rtn = n @ R  # R^T n as rows
        Jr = rotation_jacobian(cache["r"])
        dr = -(s * np.cross(Rtn, cl)) @ Jr  # n^T dc/dr
        J_r = -dr
        J_t = -n
        if self.fix_scale:
            return np.concatenate([J_r, J_t], axis=1)
        J_s = -np.sum(n * Rc, axis=1, keepdims=True)
        J = np.concatenate([J_s, J_r, J_t], axis=1)
        reg = np.zeros((1, 7))
        reg[0, 0] = 100.0 * (np.sign(s) - 1.0)
        return np.concatenate([J, reg], axis=0)


def _cauchy_step(J: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Minimiser of the linearised cost along the descent direction ``g = -J^T r``."""
    curvature = float(np.sum((J @ g) ** 2))
    return (float(g @ g) / curvature) * g if curvature > 0 else np.zeros_like(g)


def _gauss_newton_step(A: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Solution of the normal equations ``A d = g`` (least squares when ``A`` is singular)."""
    try:
        return np.linalg.solve(A, g)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(A, g, rcond=None)[0]


def _dogleg_step(cauchy: np.ndarray, newton: np.ndarray | None, radius: float) -> np.ndarray:
    """Powell's dogleg inside a trust region of ``radius``.

    The Cauchy step cut to the radius when it reaches the boundary; else the Gauss-Newton
    step when it lies inside; else the point where the segment from the Cauchy to the
    Gauss-Newton step leaves the region: ``cauchy + beta (newton - cauchy)`` with
    ``|.| = radius``, the positive root of ``a beta^2 + 2 b beta + c = 0``, taken in the form
    ``-c / (b + sqrt(b^2 - a c))`` that does not cancel.
    """
    length = float(np.linalg.norm(cauchy))
    if length >= radius:
        return (radius / length) * cauchy
    if float(np.linalg.norm(newton)) <= radius:
        return newton
    towards = newton - cauchy
    a, b, c = float(towards @ towards), float(cauchy @ towards), length ** 2 - radius ** 2
    return cauchy + (-c / (b + np.sqrt(b * b - a * c))) * towards


def refine_similarity_dogleg(scan: np.ndarray, V: np.ndarray, F: np.ndarray, fix_scale: bool = False,
                             delta_0: float = 0.1, e_1: float = 1e-15, e_2: float = 1e-15,
                             e_3: float = 1e-4, maxiter: int = 200) -> RefineResult:
    """Minimise NoW's scan-to-mesh objective over a similarity, with Powell's dogleg.

    Objective: ``Σ_i d(q_i, s R V + t)² + (100 (|s| − s))²`` over ``p = [s, r, t]``
    (``s`` init 1, ``r`` axis-angle init 0, ``t`` init 0); with ``fix_scale`` (NoW's
    metrical variant) ``p = [r, t]``, ``s = 1`` and no scale regulariser.

    The iteration is chumpy's ``minimize_dogleg`` step for step, with NoW's options
    (``delta_0=0.1, e_3=1e-4``) and chumpy's defaults (``e_1=e_2=1e-15, maxiter=200``):
    Cauchy step, Gauss–Newton step (dense ``np.linalg.solve`` of the 7x7 normal equations;
    the original passes it to ``scipy.sparse.linalg.cg``, which agrees to its 1e-5
    relative tolerance), dogleg blend, gain ratio, trust-region update (×2.5 / ×0.25 at
    ρ > 0.9 / ρ < 0.05) and the stops: ``‖g‖∞ < e_1``; step ``≤ e_2‖p‖``; relative
    decrease of Σr² ``< e_3`` after an accepted step (the step is kept); trust radius
    ``≤ e_2‖p‖``; ``maxiter`` outer iterations. Closest points are recomputed at every
    residual evaluation.

    Args:
        scan: ``(N, 3)`` cropped scan vertices (mm). V, F: the mesh to move, ``(Nv, 3)``, ``(M, 3)``.
    """
    obj = _ScanToMesh(scan, V, F, fix_scale)
    p = np.zeros(6) if fix_scale else np.concatenate([[1.0], np.zeros(6)])
    r, cache = obj.residuals(p)
    J = obj.jacobian(cache)
    A = J.T @ J
    g = J.T @ (-r)
    delta = float(delta_0)
    stop = ""
    it = 0
    if np.linalg.norm(g, np.inf) < e_1:
        stop = "gradient"
    while not stop:
        it += 1
        cauchy, newton = _cauchy_step(J, g), None
        while True:
            if newton is None and np.linalg.norm(cauchy) < delta:
                newton = _gauss_newton_step(A, g)  # needed only when the Cauchy step fits
            d_dl = _dogleg_step(cauchy, newton, delta)
            step = float(np.linalg.norm(d_dl))
            if step <= e_2 * np.linalg.norm(p):
                stop = "small step"
                break
            trial = p + d_dl
            r_new, cache_new = obj.residuals(trial)
            actual = float(r @ r) - float(r_new @ r_new)  # decrease of the cost
            predicted = 2.0 * float(g @ d_dl) - float(d_dl @ A @ d_dl)  # ... of its linearisation
            gain = actual / predicted if actual > 0 else actual
            improved = gain > 0
            if improved:
                cost = float(r @ r)
                p, r, cache = trial, r_new, cache_new
                if e_3 > 0 and actual / cost < e_3:
                    stop = "relative improvement < e_3"
                else:
                    J = obj.jacobian(cache)
                    A = J.T @ J
                    g = J.T @ (-r)
                    if np.linalg.norm(g, np.inf) < e_1:
                        stop = "gradient"
            if gain > 0.9:  # the model is trusted: the region may grow
                delta = max(delta, 2.5 * step)
            elif gain < 0.05:
                delta *= 0.25
            if delta <= e_2 * np.linalg.norm(p):
                stop = stop or "trust region too small"
            if stop or improved:
                break
        if not stop and it >= maxiter:
            stop = "maxiter"
    s, rv, t = obj.unpack(p)
    return RefineResult(s=float(s), R=rodrigues(rv), t=np.array(t, dtype=np.float64), r=np.array(rv),
                        cost=float(np.dot(r, r)), iterations=it, fevals=obj.fevals, stop=stop)


