"""Synthetic NoW-style data for tests and benchmarks: a bumpy ellipsoid "head", its 7 landmarks, scans.

Units are millimetres; the face looks along +z, +y is up, the subject's right is -x (so the
subject's right eye appears on the image left in a frontal view).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..eval.geometry import rodrigues
from ..io import write_mesh

__all__ = ["head_mesh", "head_landmarks", "sample_surface", "make_scan", "write_pp", "write_now_dataset"]

_RADII = np.array([75.0, 95.0, 85.0])


def _surface(theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Bumpy ellipsoid: polar angle ``theta`` from +y, azimuth ``phi`` from +z towards +x."""
    d = np.stack([np.sin(theta) * np.sin(phi), np.cos(theta), np.sin(theta) * np.cos(phi)], axis=-1)
    bump = 1.0 + 0.04 * np.sin(3 * theta) * np.cos(2 * phi) + 0.02 * np.cos(5 * phi) * np.sin(2 * theta)
    return d * _RADII * bump[..., None]


def head_mesh(n_lat: int = 50, n_lon: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """A closed bumpy-ellipsoid mesh (UV sphere topology).

    ``n_lat=50, n_lon=100`` gives 4902 vertices and 9800 faces (FLAME: 5023 / 9976).
    Returns ``V (N,3) float64`` mm and ``F (M,3) int64``.
    """
    th = np.linspace(0, np.pi, n_lat + 1)[1:-1]
    ph = np.linspace(-np.pi, np.pi, n_lon, endpoint=False)
    T, P = np.meshgrid(th, ph, indexing="ij")
    V = _surface(T, P).reshape(-1, 3)
    top = len(V)
    bot = top + 1
    V = np.concatenate([V, _surface(np.array([0.0]), np.array([0.0])), _surface(np.array([np.pi]), np.array([0.0]))])
    F = []
    idx = lambda i, j: i * n_lon + (j % n_lon)  # noqa: E731
    for i in range(n_lat - 2):
        for j in range(n_lon):
            a, b, c, d = idx(i, j), idx(i, j + 1), idx(i + 1, j), idx(i + 1, j + 1)
            F += [(a, c, b), (b, c, d)]
    for j in range(n_lon):
        F.append((top, idx(0, j), idx(0, j + 1)))
        F.append((bot, idx(n_lat - 2, j + 1), idx(n_lat - 2, j)))
    return V, np.asarray(F, dtype=np.int64)


def head_landmarks(V: np.ndarray, F: np.ndarray) -> np.ndarray:
    """The 7 NoW landmarks on the head mesh surface, ``(7, 3) float64`` mm, NoW order.

    R-eye outer, R-eye inner, L-eye inner, L-eye outer, nose bottom, R-mouth, L-mouth.
    """
    from ..eval.geometry import MeshDistance

    # (theta, phi) of the landmark directions; subject's right = -x = negative phi
    ang = np.array([[1.25, -0.55], [1.25, -0.18], [1.25, 0.18], [1.25, 0.55],
                    [1.72, 0.0], [2.05, -0.35], [2.05, 0.35]])
    pts = _surface(ang[:, 0], ang[:, 1])
    return MeshDistance(V, F).query(pts)[2]


def sample_surface(V: np.ndarray, F: np.ndarray, n: int, rng: np.random.Generator,
                   front_only: bool = False) -> np.ndarray:
    """``n`` area-uniform random points on the mesh surface, ``(n, 3) float64``.

    ``front_only`` keeps faces whose centroid has z > 0 (a scan sees the front of the head).
    """
    a, b, c = V[F[:, 0]], V[F[:, 1]], V[F[:, 2]]
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    if front_only:
        area = area * (((a + b + c) / 3)[:, 2] > 0)
    f = rng.choice(len(F), size=n, p=area / area.sum())
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    return a[f] + u[:, None] * (b[f] - a[f]) + v[:, None] * (c[f] - a[f])


def make_scan(V: np.ndarray, F: np.ndarray, n: int, rng: np.random.Generator, scale: float = 1.0,
              rotvec: np.ndarray | None = None, trans: np.ndarray | None = None,
              noise: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A synthetic "scan" of the mesh under a known similarity plus Gaussian noise.

    Points are sampled on the front surface of ``(V, F)``, mapped by ``x -> scale R x + t``
    and perturbed by isotropic ``N(0, noise²)`` per coordinate. Returns ``(scan_v (n,3),
    scan_lmk (7,3) float32, transform (4,4))``; the scan landmarks are the mapped mesh
    landmarks (exact, no noise).
    """
    R = rodrigues(np.zeros(3) if rotvec is None else rotvec)
    t = np.zeros(3) if trans is None else np.asarray(trans, dtype=np.float64)
    pts = sample_surface(V, F, n, rng, front_only=True)
    scan = scale * pts @ R.T + t + rng.normal(0.0, noise, pts.shape) if noise > 0 else scale * pts @ R.T + t
    lmk = scale * head_landmarks(V, F) @ R.T + t
    T = np.eye(4)
    T[:3, :3] = scale * R
    T[:3, 3] = t
    return scan, lmk.astype(np.float32), T


def write_pp(path: str | os.PathLike, lmk: np.ndarray) -> None:
    """Write 7 landmarks as a MeshLab PickedPoints file with NoW's 8-line header."""
    lines = ["<!DOCTYPE PickedPoints>", "<PickedPoints>", " <DocumentData>",
             '  <DateTime time="00:00:00" date="2020-01-01"/>', '  <User name="synthetic"/>',
             '  <DataFileName name="scan.obj"/>', '  <templateName name=""/>', " </DocumentData>"]
    for i, p in enumerate(np.asarray(lmk, dtype=np.float64)):
        lines.append(f' <point x="{p[0]:.6f}" y="{p[1]:.6f}" z="{p[2]:.6f}" name="{i + 1}" active="1"/>')
    lines.append("</PickedPoints>")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_now_dataset(root: str | os.PathLike, subjects: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Write a NoW-layout ground-truth folder: ``scans/<s>/scan.obj`` and ``scans_lmks_onlypp/<s>/scan_picked_points.pp``.

    ``subjects`` maps a subject name to ``(scan_vertices (N,3), scan_landmarks (7,3))``; scans
    are written as point-only OBJ files (NoW's distances use scan vertices only).
    """
    root = Path(root)
    for s, (v, lmk) in subjects.items():
        write_mesh(root / "scans" / s / "scan.obj", v, None, source_unit="mm")
        write_pp(root / "scans_lmks_onlypp" / s / "scan_picked_points.pp", lmk)
