"""Geometry for evaluation: exact distances vs a naive oracle, mesh I/O, Procrustes, dogleg refinement."""

from __future__ import annotations

import numpy as np
import pytest

from ofer.eval.geometry import (MeshDistance, MeshError, brute_force_point_mesh_distance,
                                closest_point_on_triangle, procrustes_now, read_mesh, refine_similarity_dogleg,
                                rodrigues, rotation_jacobian, umeyama, validate_mesh)
from ofer.io import write_mesh
from ofer.eval.geometry import _ScanToMesh
from ofer.world.now_scans import head_mesh, sample_surface


@pytest.fixture(scope="module")
def small_head():
    return head_mesh(16, 32)


# ---------------------------------------------------------------- distances


def test_closest_point_analytic_cases():
    a, b, c = np.array([0.0, 0, 0]), np.array([2.0, 0, 0]), np.array([0.0, 2, 0])
    # interior point -> itself
    np.testing.assert_allclose(closest_point_on_triangle(np.array([0.5, 0.5, 0]), a, b, c), [0.5, 0.5, 0])
    # above the plane inside the prism -> plane projection
    np.testing.assert_allclose(closest_point_on_triangle(np.array([0.5, 0.7, 3.0]), a, b, c), [0.5, 0.7, 0])
    # outside edge AB -> projection onto AB
    np.testing.assert_allclose(closest_point_on_triangle(np.array([1.0, -1.0, 1.0]), a, b, c), [1.0, 0, 0])
    # outside hypotenuse BC -> its midpoint region
    np.testing.assert_allclose(closest_point_on_triangle(np.array([2.0, 2.0, 0.0]), a, b, c), [1.0, 1.0, 0])
    # vertex regions
    np.testing.assert_allclose(closest_point_on_triangle(np.array([-1.0, -1.0, 5.0]), a, b, c), a)
    np.testing.assert_allclose(closest_point_on_triangle(np.array([3.0, -0.5, 0.0]), a, b, c), b)
    np.testing.assert_allclose(closest_point_on_triangle(np.array([-0.5, 3.0, 0.0]), a, b, c), c)
    # degenerate (collinear) triangle behaves like a segment
    q = closest_point_on_triangle(np.array([1.0, 1.0, 0.0]), a, b, np.array([1.0, 0, 0]))
    np.testing.assert_allclose(q, [1.0, 0, 0])


def test_oracle_matches_dense_triangle_sampling():
    rng = np.random.default_rng(1)
    tri = rng.normal(size=(3, 3))
    u, v = np.meshgrid(np.linspace(0, 1, 401), np.linspace(0, 1, 401))
    keep = u + v <= 1
    dense = tri[0] + u[keep, None] * (tri[1] - tri[0]) + v[keep, None] * (tri[2] - tri[0])
    for p in rng.normal(size=(20, 3)) * 2:
        q = closest_point_on_triangle(p, *tri)
        d_oracle = np.linalg.norm(p - q)
        d_dense = np.min(np.linalg.norm(dense - p, axis=1))
        assert d_oracle <= d_dense + 1e-12
        assert d_dense - d_oracle < 1e-2  # grid spacing bound


def test_aabb_distance_matches_bruteforce_oracle(small_head):
    V, F = small_head
    rng = np.random.default_rng(0)
    near = sample_surface(V, F, 300, rng) + rng.normal(0, 2.0, (300, 3))
    far = rng.uniform(-150, 150, (200, 3))
    P = np.concatenate([near, far, V[:20]])
    d = MeshDistance(V, F).query(P)[0]
    d_ref = brute_force_point_mesh_distance(P, V, F)
    assert np.max(np.abs(d - d_ref)) < 1e-6  # mm
    assert np.all(d[-20:] < 1e-9)  # mesh vertices are on the mesh


def test_distance_ignores_unreferenced_vertices():
    V = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [5, 5, 5]])
    F = np.array([[0, 1, 2]])
    d = MeshDistance(V, F).query(np.array([[5.0, 5, 5]]))[0]
    assert d[0] == pytest.approx(np.sqrt(4.5 ** 2 + 4.5 ** 2 + 25))  # closest: hypotenuse midpoint, not vertex 3


# ---------------------------------------------------------------- mesh I/O


def test_obj_reader_colours_quads_and_indices(tmp_path):
    p = tmp_path / "m.obj"
    p.write_text(
        "# comment\n"
        "v 0 0 0 1.0 0.0 0.0\n"
        "v 1 0 0 0.5 0.5 0.5\n"
        "v 1 1 0 0 0 1\n"
        "v 0 1 0 0 0 1\n"
        "vt 0 0\nvn 0 0 1\n"
        "f 1/1/1 2/1/1 3/1/1 4/1/1\n"
        "f -4 -3 -1\n"
    )
    V, F = read_mesh(p)
    assert V.shape == (4, 3) and V.dtype == np.float64
    np.testing.assert_array_equal(V[2], [1, 1, 0])
    np.testing.assert_array_equal(F, [[0, 1, 3], [0, 1, 2], [0, 2, 3]])


def test_ply_reader_ascii_quads_extra_props(tmp_path):
    p = tmp_path / "m.ply"
    p.write_text(
        "ply\nformat ascii 1.0\nelement vertex 4\nproperty float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        "element face 1\nproperty list uchar int vertex_indices\nend_header\n"
        "0 0 0 255 0 0\n1 0 0 0 255 0\n1 1 0 0 0 255\n0 1 0 1 2 3\n4 0 1 2 3\n"
    )
    V, F = read_mesh(p)
    np.testing.assert_array_equal(V, [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]])
    np.testing.assert_array_equal(F, [[0, 1, 2], [0, 2, 3]])


def test_obj_ply_round_trip(tmp_path, small_head):
    V, F = small_head
    write_mesh(tmp_path / "a.obj", V, F, source_unit="mm")
    write_mesh(tmp_path / "a.ply", V, F, source_unit="mm")
    V1, F1 = read_mesh(tmp_path / "a.obj")
    V2, F2 = read_mesh(tmp_path / "a.ply")
    np.testing.assert_array_equal(F1, F)
    np.testing.assert_array_equal(F2, F)
    np.testing.assert_allclose(V1, V, atol=1e-6)
    np.testing.assert_allclose(V2, V, rtol=1e-6, atol=1e-5)


def test_mesh_errors_are_one_line(tmp_path):
    with pytest.raises(MeshError, match="not found") as e:
        read_mesh(tmp_path / "nope.obj")
    assert "\n" not in str(e.value)
    (tmp_path / "x.stl").write_text("solid")
    with pytest.raises(MeshError, match="unsupported mesh extension"):
        read_mesh(tmp_path / "x.stl")
    (tmp_path / "bad.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 x\n")
    with pytest.raises(MeshError, match="bad face index"):
        read_mesh(tmp_path / "bad.obj")
    (tmp_path / "empty.obj").write_text("# nothing\n")
    V, F = read_mesh(tmp_path / "empty.obj")
    with pytest.raises(MeshError, match="no vertices") as e:
        validate_mesh(V, F, "empty.obj")
    assert "\n" not in str(e.value)
    with pytest.raises(MeshError, match="no triangle faces"):
        validate_mesh(np.zeros((3, 3)), np.zeros((0, 3), dtype=np.int64), "pts.obj")
    with pytest.raises(MeshError, match="out of range"):
        validate_mesh(np.zeros((3, 3)), np.array([[0, 1, 3]]), "oob.obj")
    with pytest.raises(MeshError, match="NaN"):
        validate_mesh(np.full((3, 3), np.nan), np.array([[0, 1, 2]]), "nan.obj")


def test_non_manifold_mesh_gives_warning(capsys):
    V = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1]])
    F = np.array([[0, 1, 2], [0, 1, 3], [0, 1, 4]])  # edge 0-1 shared by 3 faces
    w = validate_mesh(V, F, "nm.obj")
    assert len(w) == 1 and "non-manifold" in w[0] and "nm.obj" in w[0]
    assert "non-manifold" in capsys.readouterr().err
    assert validate_mesh(V, F[:2], "ok.obj", warn=False) == []


# ---------------------------------------------------------------- Procrustes


def _rand_rot(rng):
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


def test_procrustes_recovers_similarity_float32():
    rng = np.random.default_rng(3)
    X = (rng.normal(size=(7, 3)) * 40).astype(np.float32)
    Q = _rand_rot(rng)
    a, t = 0.0123, np.array([1.0, -2.0, 0.5])
    Y = (a * X.astype(np.float64) @ Q + t).astype(np.float32)
    pr = procrustes_now(X, Y)
    assert pr.rotation.dtype == np.float32  # computed in float32 like the original
    assert pr.scale == pytest.approx(1 / a, rel=1e-4)
    np.testing.assert_allclose(pr.rotation, Q.T, atol=1e-4)
    mapped = pr.scale * (Y.astype(np.float64) @ pr.rotation) + pr.translation
    np.testing.assert_allclose(mapped, X, atol=5e-3)
    assert not pr.is_reflection and pr.disparity < 1e-5


def test_procrustes_keeps_reflection_like_original():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(7, 3)).astype(np.float32)
    Y = X.copy()
    Y[:, 0] *= -1  # mirror image
    pr = procrustes_now(X, Y)
    assert np.linalg.det(pr.rotation.astype(np.float64)) == pytest.approx(-1, abs=1e-5)
    assert pr.is_reflection and pr.disparity < 1e-5


def test_procrustes_float64_matches_umeyama():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(7, 3))
    Y = X @ _rand_rot(rng) * 3 + rng.normal(size=(7, 3)) * 0.05
    pr = procrustes_now(X, Y)
    s, R, t = umeyama(Y, X)
    np.testing.assert_allclose(pr.scale * Y @ pr.rotation + pr.translation, s * Y @ R.T + t, atol=1e-10)


# ---------------------------------------------------------------- rotation / Jacobian / dogleg


def test_rotation_jacobian_finite_differences():
    rng = np.random.default_rng(6)
    for r in [np.zeros(3), rng.normal(size=3) * 0.3, rng.normal(size=3) * 2.0]:
        u = rng.normal(size=3)
        R = rodrigues(r)
        analytic = -R @ np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]]) @ rotation_jacobian(r)
        num = np.zeros((3, 3))
        h = 1e-6
        for k in range(3):
            e = np.zeros(3)
            e[k] = h
            num[:, k] = (rodrigues(r + e) @ u - rodrigues(r - e) @ u) / (2 * h)
        np.testing.assert_allclose(analytic, num, atol=1e-7)
    np.testing.assert_allclose(rodrigues(np.array([0, 0, np.pi / 2])) @ [1, 0, 0], [0, 1, 0], atol=1e-12)


def test_residual_jacobian_finite_differences(small_head):
    V, F = small_head
    rng = np.random.default_rng(7)
    scan = sample_surface(V, F, 400, rng) + rng.normal(0, 1.0, (400, 3))
    for fix in (False, True):
        obj = _ScanToMesh(scan, V, F, fix_scale=fix)
        p = np.array([1.05, 0.02, -0.03, 0.01, 1.0, 2.0, -1.0])
        p = p[1:] if fix else p
        r, cache = obj.residuals(p)
        J = obj.jacobian(cache)
        num = np.zeros_like(J)
        h = 1e-6
        for k in range(len(p)):
            e = np.zeros(len(p))
            e[k] = h
            num[:, k] = (obj.residuals(p + e)[0] - obj.residuals(p - e)[0]) / (2 * h)
        assert np.max(np.abs(J - num)) < 1e-5 * max(1.0, np.abs(J).max())


def test_dogleg_recovers_known_similarity(small_head):
    V, F = small_head
    rng = np.random.default_rng(8)
    R0 = rodrigues(np.array([0.04, -0.03, 0.05]))
    s0, t0 = 1.02, np.array([1.5, -2.0, 1.0])
    scan = s0 * sample_surface(V, F, 3000, rng, front_only=True) @ R0.T + t0
    res = refine_similarity_dogleg(scan, V, F)
    assert res.s == pytest.approx(s0, abs=1e-6)
    np.testing.assert_allclose(res.R, R0, atol=1e-6)
    np.testing.assert_allclose(res.t, t0, atol=1e-4)
    # metrical variant: scale stays exactly 1
    scan_r = sample_surface(V, F, 3000, rng, front_only=True) @ R0.T + t0
    res_m = refine_similarity_dogleg(scan_r, V, F, fix_scale=True)
    assert res_m.s == 1.0
    np.testing.assert_allclose(res_m.R, R0, atol=1e-6)
    np.testing.assert_allclose(res_m.t, t0, atol=1e-4)


def test_dogleg_stops_on_relative_improvement_and_does_not_increase_cost(small_head):
    V, F = small_head
    rng = np.random.default_rng(9)
    scan = sample_surface(V, F, 2000, rng, front_only=True) + rng.normal(0, 0.5, (2000, 3)) + [0.5, 0, 0]
    d0 = MeshDistance(V, F).query(scan)[0]
    res = refine_similarity_dogleg(scan, V, F)
    d1 = MeshDistance(res.apply(V), F).query(scan)[0]
    assert res.cost == pytest.approx(np.sum(d1 ** 2) + (100 * (abs(res.s) - res.s)) ** 2, rel=1e-9)
    assert np.sum(d1 ** 2) < np.sum(d0 ** 2)
    assert res.stop in ("relative improvement < e_3", "gradient", "small step", "trust region too small")
    assert res.iterations <= 200


def test_obj_keywords_followed_by_tabs_or_several_spaces(tmp_path):
    from ofer.eval.geometry import read_mesh

    text = "# tabs and runs of spaces\nv\t0 0 0\nv   1 0 0\nv \t0 1 0\nvt 0.5 0.5\nvn 0 0 1\nf\t1 2 3\nf  3 2 1\n"
    (tmp_path / "t.obj").write_text(text)
    V, F = read_mesh(tmp_path / "t.obj")
    np.testing.assert_array_equal(V, [[0, 0, 0], [1, 0, 0], [0, 1, 0]])
    np.testing.assert_array_equal(F, [[0, 1, 2], [2, 1, 0]])
