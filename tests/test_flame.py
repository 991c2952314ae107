"""FLAME layer: blend shapes, skinning, landmarks, gradients, devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from ofer.flame import FLAME, NOW_LANDMARK_INDICES, load_flame_model, load_landmark_embedding


def _random_pose(B, gen, scale=0.3):
    return {
        "global_pose": torch.randn(B, 3, generator=gen, dtype=torch.float64) * scale,
        "neck_pose": torch.randn(B, 3, generator=gen, dtype=torch.float64) * scale,
        "jaw_pose": torch.randn(B, 3, generator=gen, dtype=torch.float64) * scale,
        "eye_pose": torch.randn(B, 6, generator=gen, dtype=torch.float64) * scale,
    }


def _naive_flame(data, shape_coeffs, exp_coeffs, full_pose):
    """Per-vertex FLAME in float64 numpy with scipy rotations: an independent reference."""
    v_t = np.asarray(data["v_template"], dtype=np.float64)
    S = np.asarray(data["shapedirs"], dtype=np.float64)
    betas = np.concatenate([shape_coeffs, np.zeros(300 - len(shape_coeffs)), exp_coeffs,
                            np.zeros(S.shape[2] - 300 - len(exp_coeffs))])
    P = np.asarray(data["posedirs"], dtype=np.float64)
    Jr = data["J_regressor"].toarray()
    W = np.asarray(data["weights"], dtype=np.float64)
    parents = [-1, 0, 1, 1, 1]
    v_shaped = v_t + np.tensordot(S, betas, axes=([2], [0]))
    J = Jr @ v_shaped
    R = [Rotation.from_rotvec(full_pose[3 * j:3 * j + 3]).as_matrix() for j in range(5)]
    feat = np.concatenate([(R[j] - np.eye(3)).reshape(-1) for j in range(1, 5)])
    v_posed = v_shaped + np.tensordot(P, feat, axes=([2], [0]))
    Rw, tw = [None] * 5, [None] * 5
    for j in range(5):  # world transform of joint j: x -> Rw x + tw (rest joint at J[j])
        if parents[j] < 0:
            Rw[j], tw[j] = R[j], J[j]
        else:
            p = parents[j]
            Rw[j] = Rw[p] @ R[j]
            tw[j] = Rw[p] @ (J[j] - J[p]) + tw[p]
    out = np.zeros_like(v_posed)
    for i in range(v_posed.shape[0]):
        for j in range(5):
            out[i] += W[i, j] * (Rw[j] @ (v_posed[i] - J[j]) + tw[j])
    return out


def test_zero_coefficients_give_template(synthetic_flame):
    out = synthetic_flame(batch_size=3)
    assert out.vertices.shape == (3, synthetic_flame.num_vertices, 3)
    assert torch.allclose(out.vertices, synthetic_flame.v_template.expand(3, -1, -1), atol=1e-7)


def test_float32_zero_pose_is_template_within_1e7(synthetic_flame_paths):
    flame = FLAME(synthetic_flame_paths.model, n_shape=300, n_exp=100)
    out = flame(batch_size=1)
    assert (out.vertices[0] - flame.v_template).abs().max() < 1e-7


def test_blend_shapes_are_linear(synthetic_flame):
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(2, 300, generator=g, dtype=torch.float64) for _ in range(2))
    ea, eb = (torch.randn(2, 100, generator=g, dtype=torch.float64) for _ in range(2))
    t = synthetic_flame.v_template
    va = synthetic_flame(shape_coeffs=a, exp_coeffs=ea).vertices - t
    vb = synthetic_flame(shape_coeffs=b, exp_coeffs=eb).vertices - t
    vab = synthetic_flame(shape_coeffs=2 * a - b, exp_coeffs=2 * ea - eb).vertices - t
    torch.testing.assert_close(vab, 2 * va - vb, atol=1e-12, rtol=0)


def test_lbs_matches_naive_per_vertex_reference(synthetic_flame, synthetic_flame_paths):
    data = load_flame_model(synthetic_flame_paths.model)
    g = torch.Generator().manual_seed(1)
    B = 2
    shape = torch.randn(B, 300, generator=g, dtype=torch.float64)
    exp = torch.randn(B, 100, generator=g, dtype=torch.float64)
    pose = _random_pose(B, g)
    out = synthetic_flame(shape_coeffs=shape, exp_coeffs=exp, **pose)
    for b in range(B):
        full = torch.cat([pose["global_pose"][b], pose["neck_pose"][b], pose["jaw_pose"][b], pose["eye_pose"][b]])
        ref = _naive_flame(data, shape[b].numpy(), exp[b].numpy(), full.numpy())
        # 1e-9 m: the reference Rodrigues uses ||r + 1e-8|| as the angle, a ~1e-8 perturbation
        np.testing.assert_allclose(out.vertices[b].numpy(), ref, atol=1e-9, rtol=0)


def test_lbs_gradients_match_naive_reference(synthetic_flame, synthetic_flame_paths):
    data = load_flame_model(synthetic_flame_paths.model)
    g = torch.Generator().manual_seed(2)
    shape = torch.randn(1, 300, generator=g, dtype=torch.float64)
    jaw = (torch.randn(1, 3, generator=g, dtype=torch.float64) * 0.3).requires_grad_(True)
    w = torch.randn(1, synthetic_flame.num_vertices, 3, generator=g, dtype=torch.float64)
    loss = (synthetic_flame(shape_coeffs=shape, jaw_pose=jaw).vertices * w).sum()
    (grad,) = torch.autograd.grad(loss, jaw)
    # central finite differences of the naive reference
    eps = 1e-6
    fd = np.zeros(3)
    for k in range(3):
        vals = []
        for s in (1, -1):
            j = jaw.detach().numpy()[0].copy()
            j[k] += s * eps
            full = np.concatenate([np.zeros(6), j, np.zeros(6)])
            vals.append((_naive_flame(data, shape[0].numpy(), np.zeros(100), full) * w[0].numpy()).sum())
        fd[k] = (vals[0] - vals[1]) / (2 * eps)
    np.testing.assert_allclose(grad[0].numpy(), fd, rtol=1e-5, atol=1e-8)


def test_gradients_flow_to_every_input_and_are_finite_at_zero_pose(synthetic_flame):
    inputs = {
        "shape_coeffs": torch.zeros(2, 300, dtype=torch.float64, requires_grad=True),
        "exp_coeffs": torch.zeros(2, 100, dtype=torch.float64, requires_grad=True),
        "global_pose": torch.zeros(2, 3, dtype=torch.float64, requires_grad=True),
        "jaw_pose": torch.zeros(2, 3, dtype=torch.float64, requires_grad=True),
    }
    out = synthetic_flame(**inputs)
    (out.vertices.sum() + out.landmarks7.pow(2).sum()).backward()
    for name, x in inputs.items():
        assert x.grad is not None and torch.isfinite(x.grad).all(), name
        assert x.grad.abs().sum() > 0, name


def test_jaw_moves_only_jaw_weighted_vertices(synthetic_flame_paths, synthetic_flame):
    data = load_flame_model(synthetic_flame_paths.model)
    jaw_w = np.asarray(data["weights"])[:, 2]
    jaw_correctives = np.abs(np.asarray(data["posedirs"])[:, :, 9:18]).sum(axis=(1, 2))
    out = synthetic_flame(jaw_pose=torch.tensor([[0.35, 0.0, 0.0]], dtype=torch.float64))
    moved = (out.vertices[0] - synthetic_flame.v_template).norm(dim=1).numpy() > 1e-10
    free = (jaw_w == 0) & (jaw_correctives == 0)
    assert moved.any()
    assert not moved[free].any()
    assert moved[jaw_w > 1e-3].all()


def test_pose_feature_layout_single_joint():
    from ofer.flame.lbs import batch_rodrigues

    R = batch_rodrigues(torch.tensor([[np.pi / 2, 0.0, 0.0]], dtype=torch.float64))[0]
    ref = Rotation.from_rotvec([np.pi / 2, 0, 0]).as_matrix()
    np.testing.assert_allclose(R.numpy(), ref, atol=1e-7)
    assert torch.equal(batch_rodrigues(torch.zeros(1, 3)), torch.eye(3)[None])


def test_landmarks_are_barycentric_interpolations(synthetic_flame, synthetic_flame_paths):
    lmk = load_landmark_embedding(synthetic_flame_paths.landmarks)
    g = torch.Generator().manual_seed(3)
    out = synthetic_flame(shape_coeffs=torch.randn(1, 300, generator=g, dtype=torch.float64))
    V = out.vertices[0].numpy()
    Fc = synthetic_flame.faces.numpy()
    faces = lmk["full_lmk_faces_idx"].reshape(-1)
    bary = lmk["full_lmk_bary_coords"].reshape(-1, 3).astype(np.float64)
    ref = np.stack([sum(bary[l, k] * V[Fc[faces[l], k]] for k in range(3)) for l in range(68)])
    np.testing.assert_allclose(out.landmarks68[0].numpy(), ref, atol=1e-12)
    np.testing.assert_allclose(out.landmarks7[0].numpy(), ref[list(NOW_LANDMARK_INDICES)], atol=1e-12)
    # with zero pose the dynamic set is row 0 of the contour table + the 51 static points
    dyn_f, dyn_b = lmk["dynamic_lmk_faces_idx"][0], lmk["dynamic_lmk_bary_coords"][0].astype(np.float64)
    ref_c = np.stack([sum(dyn_b[l, k] * V[Fc[dyn_f[l], k]] for k in range(3)) for l in range(17)])
    np.testing.assert_allclose(out.landmarks68_dynamic[0, :17].numpy(), ref_c, atol=1e-12)
    np.testing.assert_allclose(out.landmarks68_dynamic[0, 17:].numpy(), out.landmarks68[0, 17:].numpy(), atol=1e-6)
    # the same embedding on given meshes; a layer without one has none
    np.testing.assert_allclose(synthetic_flame.landmarks68_of(out.vertices)[0].numpy(), ref, atol=1e-12)
    assert FLAME(synthetic_flame_paths.model, None).landmarks68_of(out.vertices.float()) is None


@pytest.mark.parametrize("yaw_deg,row", [(0, 0), (10, 10), (39, 39), (45, 39), (-10, 49), (-39, 78), (-50, 78)])
def test_dynamic_contour_row_follows_yaw(synthetic_flame, yaw_deg, row):
    # yaw as DECA/smplx define it: the negated y-Euler angle of R_global @ R_neck
    pose = torch.tensor([[0.0, -np.deg2rad(yaw_deg), 0.0]], dtype=torch.float64)
    faces, bary = synthetic_flame._dynamic_contour(torch.cat([pose, torch.zeros(1, 12, dtype=torch.float64)], 1))
    assert torch.equal(faces[0], synthetic_flame.dynamic_lmk_faces_idx[row])
    # the same yaw split between global and neck rotations selects the same row
    half = pose / 2
    faces2, _ = synthetic_flame._dynamic_contour(torch.cat([half, half, torch.zeros(1, 9, dtype=torch.float64)], 1))
    assert torch.equal(faces2[0], synthetic_flame.dynamic_lmk_faces_idx[row])


def test_float32_matches_float64_within_1e6_m(synthetic_flame_paths, synthetic_flame):
    f32 = FLAME(synthetic_flame_paths.model, synthetic_flame_paths.landmarks)
    g = torch.Generator().manual_seed(4)
    shape = torch.randn(4, 300, generator=g, dtype=torch.float64)
    exp = torch.randn(4, 100, generator=g, dtype=torch.float64)
    pose = _random_pose(4, g)
    v64 = synthetic_flame(shape_coeffs=shape, exp_coeffs=exp, **pose).vertices
    v32 = f32(shape_coeffs=shape.float(), exp_coeffs=exp.float(), **{k: v.float() for k, v in pose.items()}).vertices
    assert v32.dtype == torch.float32
    assert (v32.double() - v64).abs().max() < 1e-6


def test_coefficient_slicing_and_padding(synthetic_flame_paths):
    small = FLAME(synthetic_flame_paths.model, n_shape=10, n_exp=50, dtype=torch.float64)
    full = FLAME(synthetic_flame_paths.model, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    s, e = torch.randn(2, 10, generator=g, dtype=torch.float64), torch.randn(2, 50, generator=g, dtype=torch.float64)
    torch.testing.assert_close(small(shape_coeffs=s, exp_coeffs=e).vertices, full(shape_coeffs=s, exp_coeffs=e).vertices)
    assert small.shapedirs.shape[-1] == 60
    with pytest.raises(ValueError, match="shape_coeffs has 11 columns but this FLAME layer uses 10"):
        small(shape_coeffs=torch.zeros(1, 11))
    with pytest.raises(ValueError, match=r"jaw_pose must have shape \(2, 3\)"):
        full(shape_coeffs=s, jaw_pose=torch.zeros(1, 3))


def test_buffers_are_not_persistent(synthetic_flame):
    assert synthetic_flame.state_dict() == {}


def test_batch_sizes_and_batch_independence(synthetic_flame):
    g = torch.Generator().manual_seed(6)
    shape = torch.randn(5, 300, generator=g, dtype=torch.float64)
    jaw = torch.randn(5, 3, generator=g, dtype=torch.float64) * 0.2
    all5 = synthetic_flame(shape_coeffs=shape, jaw_pose=jaw).vertices
    one = synthetic_flame(shape_coeffs=shape[3:4], jaw_pose=jaw[3:4]).vertices
    torch.testing.assert_close(all5[3:4], one, atol=1e-12, rtol=0)


@pytest.mark.gpu
def test_flame_on_gpu_matches_cpu(synthetic_flame_paths):
    cpu = FLAME(synthetic_flame_paths.model, synthetic_flame_paths.landmarks)
    gpu = FLAME(synthetic_flame_paths.model, synthetic_flame_paths.landmarks).cuda()
    shape = torch.randn(8, 300)
    out_c = cpu(shape_coeffs=shape)
    out_g = gpu(shape_coeffs=shape.cuda())
    torch.testing.assert_close(out_g.vertices.cpu(), out_c.vertices, atol=1e-6, rtol=0)
