"""The shared Umeyama similarity estimate against closed-form cases."""

from __future__ import annotations

import numpy as np
import pytest

from ofer.geometry import umeyama


def _axis_rotation(axis, angle):
    """Rotation about a unit axis, ``cos a I + sin a [k]x + (1 - cos a) k kᵀ``."""
    k = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.cos(angle) * np.eye(3) + np.sin(angle) * kx + (1 - np.cos(angle)) * np.outer(k, k)


# six points ±a e1, ±b e2, ±c e3 (centroid 0, spreads a > b > c)
A, B, C = 3.0, 2.0, 0.5
CROSS = np.array([[A, 0, 0], [-A, 0, 0], [0, B, 0], [0, -B, 0], [0, 0, C], [0, 0, -C]])


@pytest.mark.parametrize("with_scale", [True, False])
def test_recovers_a_known_similarity(with_scale):
    rng = np.random.default_rng(0)
    src = rng.normal(size=(9, 3)) * 20 + 5
    R0 = _axis_rotation([1.0, -2.0, 0.5], 2.2)
    s0 = 1.7 if with_scale else 1.0
    t0 = np.array([10.0, -3.0, 42.0])
    s, R, t = umeyama(src, s0 * src @ R0.T + t0, with_scale=with_scale)
    assert s == pytest.approx(s0, rel=1e-12)
    np.testing.assert_allclose(R, R0, atol=1e-12)
    np.testing.assert_allclose(t, t0, atol=1e-10)


def test_weights_ignore_a_zero_weight_outlier():
    rng = np.random.default_rng(1)
    src = rng.normal(size=(8, 3))
    R0 = _axis_rotation([0.0, 0.0, 1.0], -0.4)
    dst = 0.3 * src @ R0.T + 1.0
    dst[3] += 50.0  # outlier
    w = np.ones(8)
    w[3] = 0.0
    s, R, t = umeyama(src, dst, weights=w)
    assert s == pytest.approx(0.3, rel=1e-12)
    np.testing.assert_allclose(R, R0, atol=1e-12)
    np.testing.assert_allclose(t, [1.0, 1.0, 1.0], atol=1e-12)


@pytest.mark.parametrize("mirror_axis,R_best", [
    (2, np.eye(3)),                  # mirrored in the least-spread axis: keep the orientation
    (0, np.diag([-1.0, 1.0, -1.0])),  # mirrored in the widest axis: half-turn about y
])
def test_mirror_image_gives_the_best_proper_rotation(mirror_axis, R_best):
    # dst = s0 R0 M src + t0 with M a mirror. The cross-covariance is s0 R0 M diag(a², b², c²)/3,
    # whose best orthogonal factor R0 M has det -1; flipping the least singular direction gives
    # R = R0 R_best and s = s0 (a² + b² - c²) / (a² + b² + c²).
    M = np.eye(3)
    M[mirror_axis, mirror_axis] = -1.0
    R0 = _axis_rotation([0.3, 1.0, -0.2], 0.9)
    s0, t0 = 2.5, np.array([-1.0, 4.0, 0.25])
    s, R, t = umeyama(CROSS, s0 * CROSS @ M @ R0.T + t0)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)
    np.testing.assert_allclose(R, R0 @ R_best, atol=1e-12)
    assert s == pytest.approx(s0 * (A**2 + B**2 - C**2) / (A**2 + B**2 + C**2), rel=1e-12)
    np.testing.assert_allclose(t, t0, atol=1e-12)


def test_planar_case_and_errors():
    th = 0.7
    R0 = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    src = np.array([[0.0, 0.0], [4.0, 1.0], [1.0, 3.0], [-2.0, 2.0]])
    s, R, t = umeyama(src, 0.5 * src @ R0.T + [7.0, -1.0])
    assert s == pytest.approx(0.5, rel=1e-12)
    np.testing.assert_allclose(R, R0, atol=1e-12)
    np.testing.assert_allclose(t, [7.0, -1.0], atol=1e-12)
    # a mirrored square: equal singular values, so after the sign flip tr(diag(d) S) = 0 and the
    # best proper similarity collapses everything onto the centroid (s = 0), still with det R = +1
    square = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    s, R, _ = umeyama(square, square * [-1.0, 1.0])
    assert np.linalg.det(R) == pytest.approx(1.0) and s == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="same shape"):
        umeyama(np.zeros((4, 3)), np.zeros((5, 3)))
