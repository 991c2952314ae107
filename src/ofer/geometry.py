"""Point-set geometry shared by the data and evaluation code (NumPy only).

Points are rows of ``(N, D)`` arrays; a rotation ``R`` acts on a point ``p`` as ``p @ R.T``.
This module sits below every subpackage: it imports nothing from ``ofer``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["umeyama"]


def umeyama(src: np.ndarray, dst: np.ndarray, with_scale: bool = True,
            weights: np.ndarray | None = None) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity ``dst ≈ s R src + t`` with a proper rotation (Umeyama, 1991).

    Minimises ``Σ_i p_i ‖y_i − (s R x_i + t)‖²`` over ``s``, ``R ∈ SO(D)`` and ``t``, with
    ``x = src``, ``y = dst`` and ``p`` the weights normalised to sum 1 (uniform by default).
    In the paper's terms: with the weighted means ``μ_x, μ_y``, the source variance
    ``σ_x² = Σ p_i ‖x_i − μ_x‖²`` and the cross-covariance
    ``Σ_xy = Σ p_i (y_i − μ_y)(x_i − μ_x)ᵀ = U diag(d) Vᵀ`` (SVD), the optimum is
    ``R = U S Vᵀ``, ``s = tr(diag(d) S) / σ_x²``, ``t = μ_y − s R μ_x``, where
    ``S = diag(1, …, 1, det(U) det(V))`` turns the best orthogonal map into the best
    rotation when it would be a reflection. (The paper chooses ``S`` from the sign of
    ``det Σ_xy`` when ``Σ_xy`` has full rank; ``det Σ_xy = det U · Π d · det V`` has the
    same sign, and the ``det(U) det(V)`` rule also covers rank ``D − 1``.)

    Args:
        src: ``(N, D)`` source points ``x``. dst: ``(N, D)`` destination points ``y``.
        with_scale: fit ``s``; otherwise ``s = 1`` (rigid fit).
        weights: optional ``(N,)`` non-negative point weights.

    Returns:
        ``(s, R, t)`` in float64, ``dst ≈ s * src @ R.T + t``; ``det R = +1``. Source points
        without spread (``σ_x² = 0``) give ``s = 1``.
    """
    x = np.asarray(src, dtype=np.float64)
    y = np.asarray(dst, dtype=np.float64)
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"umeyama needs two (N, D) arrays of the same shape, got {x.shape} and {y.shape}")
    n, dim = x.shape
    p = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    p = p / p.sum()

    mu_x, mu_y = p @ x, p @ y
    xc, yc = x - mu_x, y - mu_y
    cross_cov = (p[:, None] * yc).T @ xc  # Σ_xy, (D, D)
    U, d, Vt = np.linalg.svd(cross_cov)
    S = np.ones(dim)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        S[-1] = -1.0
    R = (U * S) @ Vt  # U diag(S) Vᵀ

    var_x = float(p @ np.einsum("ij,ij->i", xc, xc))
    s = float(d @ S) / var_x if with_scale and var_x > 0 else 1.0
    t = mu_y - s * (R @ mu_x)
    return s, R, t
