"""Renderer against analytic cases and naive per-pixel references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import trimesh

from ofer.render import Camera, image_grid, look_at, render, render_mesh_preview, vertex_normals


def _pixel_camera(w: int, h: int, f: float = 1.0) -> Camera:
    """Camera at the origin looking along +z; pixel = f * (X/Z, Y/Z)."""
    K = np.array([[f, 0, 0], [0, f, 0], [0, 0, 1.0]])
    return Camera(K=K, R=np.eye(3), t=np.zeros(3), width=w, height=h)


def _naive_triangle(tri: np.ndarray, cam: Camera):
    """Per-pixel ray/plane intersection: coverage mask and depth (independent reference)."""
    Kinv = np.linalg.inv(cam.K)
    a, b, c = tri
    n = np.cross(b - a, c - a)
    cover = np.zeros((cam.height, cam.width), bool)
    depth = np.full((cam.height, cam.width), np.inf)
    for i in range(cam.height):
        for j in range(cam.width):
            d = Kinv @ np.array([j, i, 1.0])  # ray through the pixel centre, d_z = 1
            s = np.dot(n, a) / np.dot(n, d)
            p = s * d
            # barycentrics in 3D
            v0, v1, v2 = b - a, c - a, p - a
            d00, d01, d11 = v0 @ v0, v0 @ v1, v1 @ v1
            d20, d21 = v2 @ v0, v2 @ v1
            den = d00 * d11 - d01 * d01
            l1 = (d11 * d20 - d01 * d21) / den
            l2 = (d00 * d21 - d01 * d20) / den
            l0 = 1 - l1 - l2
            if min(l0, l1, l2) >= 1e-9:
                cover[i, j] = True
                depth[i, j] = p[2]
    return cover, depth


def test_single_triangle_coverage_and_depth_match_ray_casting():
    cam = _pixel_camera(40, 30, f=20.0)
    # a slanted triangle: depths 1.0 .. 2.0
    tri = np.array([[-0.913, -0.607, 1.0], [1.711, -0.298, 1.5], [0.2031, 1.3057, 2.0]])
    out = render(tri, np.array([[0, 1, 2]]), cam)
    cover, depth = _naive_triangle(tri, cam)
    got = out.face_id[0] == 0
    # no pixel centre lies exactly on an edge with these coordinates (either answer would be right)
    assert got.sum() > 100
    np.testing.assert_array_equal(got, cover)
    np.testing.assert_allclose(out.depth[0][cover], depth[cover], rtol=1e-5)
    assert np.isinf(out.depth[0][~cover]).all()
    # barycentrics reproduce the 3D point
    bc = out.bary[0][cover]
    pts = bc @ tri
    np.testing.assert_allclose(pts[:, 2], depth[cover], rtol=1e-5)
    np.testing.assert_allclose(bc.sum(-1), 1.0, atol=1e-5)


def test_sphere_silhouette_area_is_pi_r_squared():
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=1.0)
    size, fov = 200, 30.0
    cam = Camera.from_fov(fov, size, eye=(0, 0, 10.0))
    out = render(sphere.vertices, sphere.faces, cam)
    f = cam.K[0, 0]
    # perspective silhouette of a centred sphere: a disc of angular radius asin(r/D)
    rho = f * math.tan(math.asin(1.0 / 10.0))
    expected = math.pi * rho**2
    assert abs(out.mask[0].sum() - expected) / expected < 0.02
    # the visible depth at the centre is D - r
    c = (size - 1) / 2
    i = int(round(c))
    assert abs(out.depth[0, i, i] - 9.0) < 0.01


def test_lambert_shading_value():
    cam = Camera.from_fov(40.0, 32, eye=(0, 0, 5.0))
    quad = np.array([[-3, -3, 0], [3, -3, 0], [3, 3, 0], [-3, 3, 0]], float)
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    light = np.array([0.0, 0.6, 0.8])  # n . l = 0.8 for n = +z
    albedo = np.array([0.5, 0.25, 1.0])
    out = render(quad, faces, cam, colors=np.tile(albedo, (4, 1)), light_dir=light,
                 ambient=0.2, diffuse=0.7, smooth=False)
    expected = np.clip(albedo * (0.2 + 0.7 * 0.8), 0, 1)
    assert out.mask[0].all()
    np.testing.assert_allclose(out.image[0].reshape(-1, 3), np.tile(expected, (32 * 32, 1)), atol=1e-6)
    # light from behind: ambient only (normals are turned to the viewer, light clamps at 0)
    out2 = render(quad, faces, cam, colors=np.tile(albedo, (4, 1)), light_dir=(0, 0, -1.0),
                  ambient=0.2, diffuse=0.7, smooth=False)
    np.testing.assert_allclose(out2.image[0, 5, 5], albedo * 0.2, atol=1e-6)


@pytest.mark.parametrize("near_first", [True, False])
def test_z_order_of_overlapping_triangles(near_first):
    cam = _pixel_camera(24, 24, f=10.0)
    near = np.array([[0.013, 0.021, 1.0], [2.017, 0.0, 1.0], [0.0, 2.031, 1.0]])
    far = np.array([[0.21, 0.23, 2.0], [4.61, 0.19, 2.0], [0.17, 4.63, 2.0]])  # same pixels, larger
    verts = np.concatenate([near, far] if near_first else [far, near])
    faces = np.array([[0, 1, 2], [3, 4, 5]])
    near_id = 0 if near_first else 1
    out = render(verts, faces, cam)
    cov_near, _ = _naive_triangle(near, cam)
    cov_far, _ = _naive_triangle(far, cam)
    both = cov_near & cov_far
    assert both.sum() > 20 and (cov_far & ~cov_near).sum() > 20
    assert (out.face_id[0][both] == near_id).all()
    np.testing.assert_allclose(out.depth[0][both], 1.0, rtol=1e-6)
    assert (out.face_id[0][cov_far & ~cov_near] == 1 - near_id).all()


def test_backface_culling_and_projection():
    cam = Camera.from_fov(40.0, 64, eye=(0, 0, 3.0))
    ccw = np.array([[-1, -1, 0], [1, -1, 0], [0, 1, 0]], float)  # counter-clockwise seen from +z
    f = np.array([[0, 1, 2]])
    assert render(ccw, f, cam, cull_backfaces=True).mask.sum() > 100
    assert render(ccw, f[:, ::-1].copy(), cam, cull_backfaces=True).mask.sum() == 0
    assert render(ccw, f[:, ::-1].copy(), cam).mask.sum() > 100
    out = render(ccw, f, cam)
    px = out.project(ccw)[0]
    # look_at from +z: world +x is image right, world +y is image up
    assert px[1, 0] > px[0, 0] and px[2, 1] < px[0, 1]
    # the projection is the pinhole formula
    pc = ccw @ cam.R.T + cam.t
    np.testing.assert_allclose(px[:, 0], cam.K[0, 0] * pc[:, 0] / pc[:, 2] + cam.K[0, 2])
    np.testing.assert_allclose(px[:, 1], cam.K[1, 1] * pc[:, 1] / pc[:, 2] + cam.K[1, 2])


def test_look_at_is_a_rotation():
    R, t = look_at((0.3, -0.2, 2.0), (0.0, 0.1, 0.0))
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(R) == pytest.approx(1.0)
    # the target lies on the optical axis
    pc = R @ np.array([0.0, 0.1, 0.0]) + t
    np.testing.assert_allclose(pc[:2], 0.0, atol=1e-12)
    assert pc[2] > 0


def test_batch_equals_single_renders_and_background():
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    v = np.stack([sphere.vertices, sphere.vertices * 0.7 + [0.2, 0, 0]])
    cams = [Camera.from_fov(30, 48, eye=(0, 0, 4.0)), Camera.from_fov(30, 48, eye=(1.0, 0.5, 4.0))]
    bg = np.zeros((48, 48, 3), np.uint8)
    bg[:, :, 1] = 200
    out = render(v, sphere.faces, cams, background=bg, light_dir=[(0, 0, 1.0), (1.0, 0, 1.0)][0])
    for b in range(2):
        single = render(v[b], sphere.faces, cams[b], background=bg)
        np.testing.assert_array_equal(out.face_id[b], single.face_id[0])
        np.testing.assert_allclose(out.image[b], single.image[0], atol=1e-6)
    empty = ~out.mask[0]
    np.testing.assert_allclose(out.image[0][empty], np.tile([0, 200 / 255, 0], (empty.sum(), 1)), atol=1e-6)
    assert out.image_uint8().dtype == np.uint8


def test_vertex_normals_of_sphere_point_outwards():
    s = trimesh.creation.icosphere(subdivisions=2)
    n = vertex_normals(s.vertices, s.faces).numpy()
    np.testing.assert_allclose(np.einsum("vi,vi->v", n, s.vertices / np.linalg.norm(s.vertices, axis=1, keepdims=True)),
                               1.0, atol=0.02)


def test_preview_and_grid():
    s = trimesh.creation.icosphere(subdivisions=3, radius=0.1)
    img = render_mesh_preview(s.vertices, s.faces, size=64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert (img[0, 0] == 255).all()  # white background
    assert img[32, 32].max() < 250  # the clay sphere in the middle
    grid = image_grid([img, img[:32, :32], img], ncols=2)
    assert grid.shape == (2 * (64 + 2) + 2, 2 * (64 + 2) + 2, 3)
    labelled = image_grid([img, img], ncols=2, labels=["a", "b"])
    assert labelled.shape[0] == 64 + 14 + 4
    # text was drawn into the label strip
    assert (labelled[2:16] < 128).any()
    with pytest.raises(ValueError):
        image_grid([img], ncols=1, labels=["a", "b"])
