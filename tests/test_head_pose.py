"""Global head pose of clips: the scaled-orthographic fit, its mirror ambiguity, degenerate
keypoints, smoothing, and the estimate against the synthetic world's true pose."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from ofer.errors import OferError
from ofer.sample.head_pose import (estimate_clip_pose, fit_scaled_orthographic, mirror_rotation, rotation_angle,
                                   smooth_rotations)
from ofer.sample.video import clip_global_pose, in_plane_pose, smooth_keypoints

# five face-like points (metres): eyes, the nose tip out of the face plane, mouth corners
FACE = np.array([[-0.032, 0.035, 0.0], [0.032, 0.035, 0.0], [0.0, 0.0, 0.025], [-0.025, -0.03, 0.002],
                 [0.025, -0.03, 0.002]])
FLAT = FACE * [1.0, 1.0, 0.0]


def _rot(yaw, pitch=0.0, roll=0.0):
    return Rotation.from_euler("YXZ", [yaw, pitch, roll], degrees=True).as_matrix()


def _project(X, R, s, t):
    """The camera written out: u = s (R X)_x + t_x, v = -s (R X)_y + t_y."""
    P = X @ R.T
    return np.stack([s * P[:, 0] + t[0], -s * P[:, 1] + t[1]], axis=1)


@pytest.mark.parametrize("angles", [(0, 0, 0), (60, 0, 0), (-60, 10, 5), (30, -20, 15), (10, 40, -30), (75, 5, 5)])
def test_exact_keypoints_give_the_camera_back(angles):
    R, s, t = _rot(*angles), 1500.0, np.array([64.0, 70.0])
    fit = fit_scaled_orthographic(FACE, _project(FACE, R, s, t))
    assert rotation_angle(fit.R, R) < 1e-6
    assert fit.scale == pytest.approx(s, rel=1e-9) and np.allclose(fit.t, t, atol=1e-6) and fit.rms < 1e-6
    assert abs(np.linalg.det(fit.R) - 1) < 1e-12


def test_rotation_angle_against_scipy():
    rng = np.random.default_rng(3)
    for _ in range(20):
        a, b = Rotation.random(random_state=rng), Rotation.random(random_state=rng)
        assert rotation_angle(a.as_matrix(), b.as_matrix()) == pytest.approx((a.inv() * b).magnitude(), abs=1e-9)


def test_noisy_keypoints_give_a_bounded_error():
    rng = np.random.default_rng(0)
    errs = []
    for _ in range(100):
        R = _rot(*rng.uniform([-45, -20, -20], [45, 20, 20]))
        kps = _project(FACE, R, 1500.0, [64.0, 70.0]) + rng.normal(0, 0.5, (5, 2))  # eye distance 96 px
        errs.append(math.degrees(rotation_angle(fit_scaled_orthographic(FACE, kps).R, R)))
    assert np.mean(errs) < 1.5 and np.max(errs) < 5.0


def test_degenerate_keypoints_are_errors():
    kps = _project(FACE, _rot(10), 1500.0, [64.0, 70.0])
    line = np.stack([np.linspace(10, 50, 5), np.linspace(20, 40, 5)], axis=1)
    for bad in (line, np.full((5, 2), 30.0), np.where(np.arange(5)[:, None] == 2, np.nan, kps)):
        with pytest.raises(OferError):
            fit_scaled_orthographic(FACE, bad)
    with pytest.raises(OferError):
        fit_scaled_orthographic(np.zeros((5, 3)), kps)
    with pytest.raises(OferError):
        fit_scaled_orthographic(FACE[:3], kps[:3])
    # in a clip, a degenerate frame takes the nearest fitted frame's pose; none fitted: an error
    R = [_rot(a) for a in (-20, -10, 0, 10, 20)]
    clip = np.stack([_project(FACE, r, 1500.0, [64.0, 70.0]) for r in R])
    clip[2] = line
    pose, cam, failed = estimate_clip_pose(np.repeat(FACE[None], 5, 0), clip, 0.0, smooth_keypoints)
    assert list(failed) == [False, False, True, False, False]
    assert rotation_angle(Rotation.from_rotvec(pose[2]).as_matrix(), R[1]) < 1e-6
    np.testing.assert_allclose(cam[:, 0], 1500.0, rtol=1e-6)
    with pytest.raises(OferError):
        estimate_clip_pose(np.repeat(FACE[None], 2, 0), np.stack([line, line]), 0.0, smooth_keypoints)


def test_mirror_ambiguity():
    R, s, t = _rot(25, 5, 3), 1500.0, np.array([64.0, 70.0])
    M = mirror_rotation(R, [0.0, 0.0, 1.0])
    assert rotation_angle(M, _rot(-25, -5, 3)) < 1e-9  # the depth reversal flips yaw and pitch
    # a flat model: both project the same; the previous frame's rotation decides
    kps = _project(FLAT, R, s, t)
    np.testing.assert_allclose(_project(FLAT, M, s, t), kps, atol=1e-9)
    assert rotation_angle(fit_scaled_orthographic(FLAT, kps, previous=_rot(20)).R, R) < 1e-6
    assert rotation_angle(fit_scaled_orthographic(FLAT, kps, previous=_rot(-20)).R, M) < 1e-6
    # with the nose out of the plane the keypoints decide, whatever the previous frame
    kps = _project(FACE, R, s, t)
    fit = fit_scaled_orthographic(FACE, kps, previous=_rot(-20))
    assert rotation_angle(fit.R, R) < 1e-6 and not fit.mirror_rms < 1.0
    # a clip of flat frames takes the sign of its one decisive frame, before and after it
    yaws = [10, 14, 18, 22, 26, 30]
    model = np.stack([FACE if k == 3 else FLAT for k in range(6)])
    clip = np.stack([_project(model[k], _rot(y), s, t) for k, y in enumerate(yaws)])
    for m in (model, model[::-1]):
        c = clip if m is model else clip[::-1]
        pose, _, _ = estimate_clip_pose(m, c, 0.0, smooth_keypoints)
        got = Rotation.from_rotvec(pose).as_euler("YXZ", degrees=True)[:, 0]
        np.testing.assert_allclose(got, yaws if m is model else yaws[::-1], atol=1e-4)


def test_smoothing_keeps_a_steady_turn_and_a_still_head():
    axis = np.array([0.3, 1.0, 0.2]) / np.linalg.norm([0.3, 1.0, 0.2])
    R = Rotation.from_rotvec(np.radians(np.linspace(-40, 40, 9))[:, None] * axis).as_matrix()
    sm = smooth_rotations(R, 1.5, smooth_keypoints)
    # a constant-rate turn about one axis: symmetric neighbours average to the middle rotation
    assert rotation_angle(sm[4], R[4]) < 1e-9
    assert rotation_angle(sm[0], R[0]) > 1e-3  # the ends are pulled inwards
    still = np.repeat(_rot(170, 0, 10)[None], 5, 0)
    np.testing.assert_allclose(smooth_rotations(still, 2.0, smooth_keypoints), still, atol=1e-12)
    # quaternion signs: a turn through 180 degrees (q and -q describe one rotation) stays smooth
    turn = Rotation.from_rotvec(np.radians(np.linspace(150, 210, 7))[:, None] * [0.0, 1.0, 0.0]).as_matrix()
    sm = smooth_rotations(turn, 1.0, smooth_keypoints)
    assert rotation_angle(sm[3], turn[3]) < 1e-9 and max(rotation_angle(a, b) for a, b in zip(sm, turn)) < 0.1


def test_world_clip_pose_against_ground_truth(tmp_path):
    from ofer.world.build import WorldConfig, build_world, load_world_flame
    from ofer.world.scene import SceneConfig
    from ofer.world.sequences import SequenceConfig, build_sequences

    world = tmp_path / "w"
    build_world(world, WorldConfig(identities=1, images_per_identity=1, expression_frames=0, test_identities=0,
                                   vertices=1200, crops=False, scene=SceneConfig(size=96)))
    build_sequences(world, tmp_path / "seq", SequenceConfig(photo_sets=0, clips=1, clip_frames=10, occluded_share=0.0))
    gt = np.load(tmp_path / "seq" / "clips" / "gt" / "clip000.npz")
    flame = load_world_flame(world / "flame")
    T = len(gt["kps"])
    with torch.no_grad():  # the true head of every frame, canonical pose
        v = flame(shape_coeffs=torch.as_tensor(gt["shape_coeffs"])[None].expand(T, -1),
                  exp_coeffs=torch.as_tensor(gt["exp_coeffs"]), jaw_pose=torch.as_tensor(gt["jaw_pose"])).vertices
        posed = flame(shape_coeffs=torch.as_tensor(gt["shape_coeffs"])[None].expand(T, -1),
                      exp_coeffs=torch.as_tensor(gt["exp_coeffs"]), jaw_pose=torch.as_tensor(gt["jaw_pose"]),
                      global_pose=torch.as_tensor(gt["global_pose"]))
    kps = gt["kps"].astype(np.float64)
    pose, cam, method = clip_global_pose(flame, v, kps, 1.0, log=lambda *a: None)
    assert method == "scaled-orthographic" and pose.shape == (T, 3) and cam.shape == (T, 3)

    def err(p):
        return np.degrees([(Rotation.from_rotvec(a).inv() * Rotation.from_rotvec(b)).magnitude()
                           for a, b in zip(p, gt["global_pose"])])

    assert err(pose).mean() < 3.0 and err(pose).max() < 5.0  # the world's camera is a perspective one
    assert err(in_plane_pose(kps)).mean() > 10.0
    # the camera overlays the mesh: the posed landmarks land on the keypoints (within the
    # perspective's effect), via s * Pi(V + (R - I) J) + t with J FLAME's root joint
    from ofer.data.align import kps_from_landmarks68

    R = Rotation.from_rotvec(pose).as_matrix()
    J = posed.joints[:, 0].double().numpy()
    model = kps_from_landmarks68(posed.landmarks68.double().numpy())
    shifted = model + np.einsum("fij,fj->fi", R - np.eye(3), J)[:, None]
    proj = np.stack([_project(shifted[f], np.eye(3), cam[f, 0], cam[f, 1:]) for f in range(T)])
    eye = np.linalg.norm(kps[:, 1] - kps[:, 0], axis=1).mean()
    assert np.abs(proj - kps).max() < 0.1 * eye


def test_without_landmarks_the_in_plane_pose(synthetic_flame_paths):
    from ofer.flame import FLAME

    flame = FLAME(synthetic_flame_paths.model, None, n_shape=10, n_exp=5)
    kps = np.repeat(_project(FACE, _rot(0, 0, 10), 1500.0, [64.0, 70.0])[None], 3, 0)
    logged = []
    pose, cam, method = clip_global_pose(flame, flame(batch_size=3).vertices, kps, 1.0, log=logged.append)
    assert method == "in-plane" and cam is None and len(logged) == 1
    np.testing.assert_allclose(pose, in_plane_pose(kps))
