"""Global head pose of a clip: a scaled-orthographic camera fitted per frame to five keypoints.

Camera. A point ``X`` of the frame's head in FLAME's canonical frame (metres; the frame's
identity and expression, global pose zero: +x to the subject's left, +y up, +z out of the face)
lands on the pixel

    u = s * (R X)_x + t_x,        v = -s * (R X)_y + t_y

(``Pi(p) = (p_x, -p_y)``: image y points down, the camera looks along -z as the project's
renderer does). ``R`` is the head's rotation, written as FLAME ``global_pose`` (axis-angle);
``(s, t_x, t_y)`` is the frame's ``camera`` (pixels per metre, pixels). FLAME applies
``global_pose`` about its root joint ``J``, so a mesh ``V`` that FLAME returns with that
global pose lands on ``s * Pi(V + (R - I) J) + t``.

Fit. The five model points are the FLAME 68 landmarks grouped as the detector's keypoints
(:func:`ofer.data.align.kps_from_landmarks68`). With both point sets centred, the translation
drops out and ``M = s P R`` (``P``: the first two rows) is first fitted as a free 2x3 linear map
(least squares); its nearest scaled pair of orthonormal rows, completed by their cross product,
starts Gauss-Newton (Levenberg-Marquardt damping) on the rotation (a left-multiplied
axis-angle increment) and the scale.

The mirror ambiguity. For a flat point set, ``R`` and its depth reversal
``D R H`` (``D = diag(1, 1, -1)``, ``H`` the reflection in the points' best-fit plane) project
identically; a yaw of +a and -a differ only through the depth of the nose tip. The fit also
starts from the two exact solutions for the points flattened onto that plane, every start is
refined, and the one with the smaller residual is kept. Where the two residuals agree to
within ``mirror_tol`` of the keypoints' spread (the points do not decide), continuity does:
one frame takes the solution nearer the previous frame's rotation (none given: nearer
frontal); a clip propagates the choice outwards from its most decisive frame
(:func:`estimate_clip_pose`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy.spatial.transform import Rotation

from ..errors import OferError

__all__ = ["PoseFit", "fit_scaled_orthographic", "mirror_rotation", "rotation_angle", "smooth_rotations",
           "estimate_clip_pose", "project_scaled_orthographic"]

_FLIP = np.array([1.0, -1.0])


@dataclass
class PoseFit:
    """One frame's camera: ``R (3, 3)``, ``scale`` (px per model unit), ``t (2,)`` (px) and the
    RMS keypoint residual (px); ``mirror_rms``: the residual of the depth-reversed solution."""

    R: np.ndarray
    scale: float
    t: np.ndarray
    rms: float
    mirror_rms: float = math.nan


def project_scaled_orthographic(points: np.ndarray, R: np.ndarray, scale: float, t: np.ndarray) -> np.ndarray:
    """Pixels ``s * Pi(R X) + t`` of ``(..., 3)`` points (``Pi(p) = (p_x, -p_y)``)."""
    p = np.asarray(points, np.float64) @ np.asarray(R, np.float64).T
    return scale * p[..., :2] * _FLIP + np.asarray(t, np.float64)


def _translation(model: np.ndarray, kps: np.ndarray, R: np.ndarray, scale: float) -> np.ndarray:
    """The ``t`` (px) that matches the centroids: ``mean(kps) = s * Pi(R mean(model)) + t``."""
    centre = np.asarray(model, np.float64).mean(0)
    return np.asarray(kps, np.float64).mean(0) - project_scaled_orthographic(centre, R, scale, np.zeros(2))


def _best_scale(Xc: np.ndarray, qc: np.ndarray, R: np.ndarray) -> float:
    """The least-squares ``s`` of ``qc ~ s P R Xc`` (centred points, keypoints with y up)."""
    Y = (Xc @ R.T)[:, :2]
    return float((Y * qc).sum() / max((Y * Y).sum(), 1e-300))


def _skew(w: np.ndarray) -> np.ndarray:
    return np.array([[0.0, -w[2], w[1]], [w[2], 0.0, -w[0]], [-w[1], w[0], 0.0]])


def rotation_angle(R1: np.ndarray, R2: np.ndarray) -> float:
    """Geodesic angle (radians) between two rotations."""
    return float((Rotation.from_matrix(R1).inv() * Rotation.from_matrix(R2)).magnitude())


def _orthonormal_rows(M: np.ndarray) -> tuple[np.ndarray, float]:
    """Nearest ``s * [r1; r2]`` (orthonormal rows) to a 2x3 map, completed to a rotation."""
    U, sv, Vt = np.linalg.svd(M, full_matrices=False)
    rows = U @ Vt
    R = np.vstack([rows, np.cross(rows[0], rows[1])])
    return R, float(sv.mean())


def _planar_starts(Xc: np.ndarray, qc: np.ndarray) -> list[np.ndarray]:
    """The two exact rotations of a flat model: with the model's two principal axes ``B`` and
    normal ``n``, fit ``q ~ A (B X)`` (2x2) and complete ``[A | c]`` to rows of equal norm ``s``
    that are orthogonal (``c``: the out-of-plane column; ``c`` and ``-c`` are the mirror pair)."""
    G = np.linalg.svd(Xc)[2]  # rows: principal axes, the last one the normal
    A = np.linalg.lstsq(Xc @ G[:2].T, qc, rcond=None)[0].T
    a1, a2 = A[0] @ A[0], A[1] @ A[1]
    b = A[0] @ A[1]
    p = a1 + a2
    k = (p + math.sqrt(max(p * p - 4.0 * (a1 * a2 - b * b), 0.0))) / 2.0  # s^2
    c1 = math.sqrt(max(k - a1, 0.0))
    c2 = -b / c1 if c1 > 1e-12 * math.sqrt(k) else math.sqrt(max(k - a2, 0.0))
    out = []
    for sign in (1.0, -1.0):
        rows = np.column_stack([A, sign * np.array([c1, c2])]) / math.sqrt(k) @ G
        U, _, Vt = np.linalg.svd(np.vstack([rows, np.cross(rows[0], rows[1])]))
        out.append(U @ Vt)
    return out


def mirror_rotation(R: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """The depth reversal ``diag(1, 1, -1) R (I - 2 n n^T)`` of ``R`` for points in the plane with
    unit normal ``n``: the same first two rows on that plane, a proper rotation."""
    n = np.asarray(normal, np.float64)
    n = n / np.linalg.norm(n)
    return np.diag([1.0, 1.0, -1.0]) @ np.asarray(R, np.float64) @ (np.eye(3) - 2.0 * np.outer(n, n))


def _refine(X: np.ndarray, q: np.ndarray, R: np.ndarray, scale: float, iters: int = 50
            ) -> tuple[np.ndarray, float, float]:
    """Levenberg-Marquardt on ``sum |q_i - s P R X_i|^2`` (centred points, ``q`` with y up) over
    ``R <- exp([w]x) R`` and ``s``: ``(R, s, sum of squared residuals)``."""
    P = slice(0, 2)

    def cost(R_, s_):
        r = q - s_ * (X @ R_.T)[:, P]
        return float((r * r).sum())

    e = cost(R, scale)
    lam = 1e-3
    for _ in range(iters):
        Y = X @ R.T  # (N, 3) rotated points
        r = (q - scale * Y[:, P]).reshape(-1)
        # d(Y_i)/dw = -[Y_i]x ; the residual is q - s P Y
        J = np.empty((len(X), 2, 4))
        for i, y in enumerate(Y):
            J[i, :, :3] = scale * _skew(y)[P]
            J[i, :, 3] = -y[P]
        J = J.reshape(-1, 4)
        A, g = J.T @ J, J.T @ r
        improved = False
        for _ in range(20):
            step = np.linalg.solve(A + lam * np.diag(np.diag(A) + 1e-12), -g)
            R_new = Rotation.from_rotvec(step[:3]).as_matrix() @ R
            s_new = scale + step[3]
            e_new = cost(R_new, s_new)
            if s_new > 0 and e_new <= e:
                converged = e - e_new <= 1e-15 * max(e, 1e-300) or np.abs(step).max() < 1e-13
                R, scale, e = R_new, s_new, e_new
                lam = max(lam / 10.0, 1e-12)
                improved = True
                break
            lam *= 10.0
        if not improved or converged:
            break
    # re-orthonormalise against round-off
    U, _, Vt = np.linalg.svd(R)
    return U @ Vt, scale, e


def _candidates(model: np.ndarray, kps: np.ndarray, starts: Sequence[np.ndarray] = ()
                ) -> tuple[tuple, tuple | None, float]:
    """The refined fits of one frame: ``(best, other, keypoint spread)``, each fit
    ``(R, s, sum of squared residuals)``; ``other``: the best fit of a different rotation (the
    depth-reversed minimum) or None when every start ends at the same rotation."""
    X = np.asarray(model, np.float64)
    x = np.asarray(kps, np.float64)
    if X.ndim != 2 or X.shape[1] != 3 or x.shape != (X.shape[0], 2) or X.shape[0] < 4:
        raise OferError(f"pose fit: expected (N, 3) model points and (N, 2) keypoints with N >= 4, "
                        f"got {X.shape} and {x.shape}")
    if not (np.isfinite(X).all() and np.isfinite(x).all()):
        raise OferError("pose fit: the keypoints or model points are not finite")
    Xc = X - X.mean(0)
    qc = x * _FLIP
    qc = qc - qc.mean(0)
    sx = np.linalg.svd(Xc, compute_uv=False)
    sq = np.linalg.svd(qc, compute_uv=False)
    if sx[1] <= 1e-9 * max(sx[0], 1e-300) or sq[1] <= 1e-6 * max(sq[0], 1e-300):
        raise OferError("pose fit: degenerate points (the keypoints or the model points lie on a line "
                        "or coincide)")
    # the free linear map, then its nearest scaled rotation rows (a flat model: minimum-norm map)
    M = np.linalg.lstsq(Xc, qc, rcond=1e-9)[0].T
    R0, s0 = _orthonormal_rows(M)
    normal = np.linalg.svd(Xc)[2][2]
    cands = [R0, mirror_rotation(R0, normal), *_planar_starts(Xc, qc)]
    for S in starts:
        S = np.asarray(S, np.float64)
        cands += [S, mirror_rotation(S, normal)]
    fits = []
    for C in cands:
        # the best scale for this start, then the joint refinement
        fits.append(_refine(Xc, qc, C, max(_best_scale(Xc, qc, C), 1e-6 * s0)))
    fits.sort(key=lambda f: f[2])
    other = next((f for f in fits[1:] if rotation_angle(f[0], fits[0][0]) > 1e-4), None)
    return fits[0], other, float(np.sqrt((qc * qc).sum() / len(X)))


def _choose(best: tuple, other: tuple | None, spread: float, n: int, reference: np.ndarray,
            mirror_tol: float) -> tuple:
    if other is None or math.sqrt(other[2] / n) - math.sqrt(best[2] / n) > mirror_tol * spread:
        return best
    return min((best, other), key=lambda f: rotation_angle(f[0], reference))


def fit_scaled_orthographic(model: np.ndarray, kps: np.ndarray, previous: np.ndarray | None = None,
                            starts: Sequence[np.ndarray] = (), mirror_tol: float = 1e-3) -> PoseFit:
    """Rotation, scale and translation with ``kps ~ s * Pi(R model) + t`` (least squares).

    model: ``(N, 3)`` points (N >= 4, not all on one line); kps: ``(N, 2)`` pixels (y down).
    previous: the previous frame's rotation, which decides between the two depth-reversed
    solutions when their residuals tie (without it: the one nearer frontal; a model flat
    and facing the camera gives no preference either way: the better-fitting start wins);
    starts: further rotations to start from. Raises :class:`OferError` for non-finite or
    degenerate input (keypoints all on one line or one point, a model without two dimensions).
    """
    best, other, spread = _candidates(model, kps, starts)
    n = len(kps)
    ref = np.eye(3) if previous is None else np.asarray(previous, np.float64)
    R, s, e = choice = _choose(best, other, spread, n, ref, mirror_tol)
    mirror = other if choice is best else best
    return PoseFit(R=R, scale=s, t=_translation(model, kps, R, s), rms=math.sqrt(e / n),
                   mirror_rms=math.sqrt(mirror[2] / n) if mirror is not None else math.nan)


def smooth_rotations(R: np.ndarray, sigma: float, smooth: Callable[[np.ndarray, float], np.ndarray]) -> np.ndarray:
    """Gaussian smoothing of ``(F, 3, 3)`` rotations over time: unit quaternions, signs made
    continuous, smoothed component-wise by ``smooth`` and renormalised."""

    quat = Rotation.from_matrix(R).as_quat()
    for i in range(1, len(quat)):
        if quat[i] @ quat[i - 1] < 0:
            quat[i] = -quat[i]
    sm = smooth(quat, sigma)
    sm /= np.linalg.norm(sm, axis=1, keepdims=True)
    return Rotation.from_quat(sm).as_matrix()


def estimate_clip_pose(model: np.ndarray, kps: np.ndarray, sigma: float,
                       smooth: Callable[[np.ndarray, float], np.ndarray],
                       starts: np.ndarray | None = None, mirror_tol: float = 1e-3
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame head pose of a clip: ``(global_pose (F, 3) axis-angle, camera (F, 3): s, t_x,
    t_y, failed (F,) bool)``.

    model: ``(F, N, 3)`` each frame's model points; kps: ``(F, N, 2)`` pixels; starts:
    ``(F, 3)`` axis-angles to start from as well (e.g. the in-plane estimate). Where a frame's two
    depth-reversed solutions tie, continuity decides: starting from the frame whose keypoints
    separate them most, each frame takes the solution nearer its already chosen neighbour's.
    The rotations are then smoothed over time (:func:`smooth_rotations`), and the scale and
    translation refitted in closed form for the smoothed rotation and smoothed the same way.
    A frame whose fit fails (degenerate keypoints) takes the nearest fitted frame's rotation
    and interpolated scale and translation (``failed``); all frames failing is an error.
    """
    model = np.asarray(model, np.float64)
    kps = np.asarray(kps, np.float64)
    F, n = kps.shape[:2]
    cands: list = [None] * F
    for f in range(F):
        try:
            cands[f] = _candidates(model[f], kps[f], () if starts is None else [Rotation.from_rotvec(starts[f]).as_matrix()])
        except OferError:
            pass
    good = np.array([c is not None for c in cands])
    if not good.any():
        raise OferError("pose fit: no frame has usable keypoints")

    def gap(c):
        best, other, spread = c
        return math.inf if other is None else (math.sqrt(other[2] / n) - math.sqrt(best[2] / n)) / spread

    idx = np.flatnonzero(good)
    anchor = int(idx[np.argmax([gap(cands[f]) for f in idx])])
    Rs = np.full((F, 3, 3), np.nan)
    Rs[anchor] = _choose(*cands[anchor], n, np.eye(3), mirror_tol)[0]
    for order in (range(anchor + 1, F), range(anchor - 1, -1, -1)):
        ref = Rs[anchor]
        for f in order:
            if cands[f] is not None:
                Rs[f] = ref = _choose(*cands[f], n, ref, mirror_tol)[0]
    failed = ~good
    for f in np.flatnonzero(failed):  # the nearest fitted frame
        Rs[f] = Rs[idx[np.abs(idx - f).argmin()]]
    Rs = smooth_rotations(Rs, sigma, smooth)
    cam = np.full((F, 3), np.nan)
    for f in idx:
        q = kps[f] * _FLIP
        s = _best_scale(model[f] - model[f].mean(0), q - q.mean(0), Rs[f])
        cam[f] = [s, *_translation(model[f], kps[f], Rs[f], s)]
    if failed.any():
        t = np.arange(F)
        for c in range(3):
            cam[failed, c] = np.interp(t[failed], idx, cam[idx, c])
    cam = smooth(cam, sigma)
    return Rotation.from_matrix(Rs).as_rotvec(), cam, failed
