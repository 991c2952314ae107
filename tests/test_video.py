"""Clips: decoding, keypoint gaps and smoothing, the dynamic-programming path, a clip run's outputs."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from ofer.errors import OferError
from ofer.sample.video import (dp_path, fill_gaps, jitter_mm, read_frames, rms_distances, run_video,
                               smooth_keypoints)

from tests.test_pipeline import N_EXP, N_SHAPE, _cfg, setup  # noqa: F401  (the tiny models)

KPS = np.array([[44, 52], [84, 52], [64, 74], [48, 96], [80, 96]], dtype=float)


def test_dp_path_is_optimal_against_brute_force():
    rng = np.random.default_rng(1)
    for F, M, ws in ((4, 3, 1.0), (5, 3, 0.3), (3, 4, 5.0), (1, 4, 1.0)):
        data = rng.random((F, M))
        trans = [rng.random((M, M)) for _ in range(F - 1)]

        def cost(p):
            return 2.0 * sum(data[t, p[t]] for t in range(F)) + ws * sum(trans[t - 1][p[t - 1], p[t]]
                                                                        for t in range(1, F))
        best = min(itertools.product(range(M), repeat=F), key=cost)
        path, c = dp_path(data, trans, 2.0, ws)
        assert tuple(path) == best and c == pytest.approx(cost(best))


def test_dp_prefers_a_smooth_path_over_independent_minima():
    # frame 1's data minimum (hypothesis 1) lies far from both neighbours' choice (0)
    data = np.array([[0.0, 5.0], [1.0, 0.0], [0.0, 5.0]])
    far = np.array([[0.0, 10.0], [10.0, 0.0]])
    assert list(dp_path(data, [far, far])[0]) == [0, 0, 0]
    assert list(dp_path(data, [far, far], smooth_weight=0.0)[0]) == [0, 1, 0]


def test_fill_gaps_and_smoothing():
    k = np.stack([KPS + t for t in range(6)]).astype(float)
    holed = k.copy()
    holed[[0, 2, 3]] = np.nan
    filled, which = fill_gaps(holed)
    assert list(which) == [True, False, True, True, False, False]
    np.testing.assert_allclose(filled[1:], k[1:])  # linear motion: interpolation is exact
    np.testing.assert_allclose(filled[0], k[1])  # the end: the nearest frame
    with pytest.raises(OferError):
        fill_gaps(np.full((3, 5, 2), np.nan))
    still = np.repeat(KPS[None], 7, 0)
    np.testing.assert_allclose(smooth_keypoints(still, 2.0), still)
    noisy = still + np.random.default_rng(0).normal(0, 2, still.shape)
    assert np.abs(smooth_keypoints(noisy, 1.5) - still).mean() < np.abs(noisy - still).mean()
    np.testing.assert_allclose(smooth_keypoints(noisy, 0.0), noisy)


def test_jitter_and_distances():
    v = torch.zeros(4, 2, 3, dtype=torch.float64)
    v[:, :, 0] = torch.tensor([0.0, 0.001, 0.004, 0.009])[:, None]  # x = t^2 mm: acceleration 2 mm
    assert jitter_mm(v) == pytest.approx(2.0)
    a = torch.zeros(1, 4, 3, dtype=torch.float64)
    b = torch.zeros(2, 4, 3, dtype=torch.float64)
    b[1, :, 2] = 0.003
    np.testing.assert_allclose(rms_distances(a, b).numpy(), [[0.0, 3.0]])


class _StubDetector:
    """The same five points on every frame, none on dark frames."""

    def detect(self, img, max_num=0, metric="default"):
        if img.mean() < 20:
            return np.zeros((0, 5)), np.zeros((0, 5, 2))
        return np.array([[30.0, 30.0, 100.0, 110.0, 0.9]]), KPS[None].copy()


def _frames(n=6, dark=(2,)):
    rng = np.random.default_rng(0)
    fr = [rng.integers(60, 255, (128, 128, 3), dtype=np.uint8) for _ in range(n)]
    for t in dark:
        fr[t] = np.zeros_like(fr[t])
    return fr


def test_clip_round_trip_through_pyav(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "c.mp4"
    with av.open(str(path), mode="w") as box:
        s = box.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for fr in _frames(5, ()):
            for p in s.encode(av.VideoFrame.from_ndarray(fr[:48, :64], format="rgb24")):
                box.mux(p)
        for p in s.encode():
            box.mux(p)
    frames, fps, names = read_frames(path, frame_step=2)
    assert len(frames) == 3 and frames[0].shape == (48, 64, 3) and fps == pytest.approx(5.0)
    assert names == ["frame_000000", "frame_000002", "frame_000004"]
    assert len(read_frames(path, max_frames=2)[0]) == 2
    with pytest.raises(OferError):
        read_frames(tmp_path / "c.mp4.missing")


def test_clip_run_outputs(setup, tmp_path, synthetic_flame_paths):  # noqa: F811
    pytest.importorskip("av")
    from PIL import Image

    root, images, ov = setup
    clip = tmp_path / "frames"
    clip.mkdir()
    for t, fr in enumerate(_frames()):
        Image.fromarray(fr).save(clip / f"{t:03d}.png")
    out = tmp_path / "out"
    cfg = _cfg(ov, "batch_size=4", "video.identity_frames=3", "video.meshes=true", "video.preview_size=64")
    info = run_video(cfg, clip, out, detector=_StubDetector(), log=lambda *a: None)
    assert info["frames"] == 6 and info["filled_frames"] == ["002.png"]
    z = np.load(out / "motion.npz")
    assert z["shape"].shape == (N_SHAPE,) and z["exp"].shape == (6, N_EXP) and z["jaw_pose"].shape == (6, 3)
    assert z["global_pose"].shape == (6, 3) and z["camera"].shape == (6, 3)
    assert list(z["filled"]) == [False, False, True, False, False, False]
    assert z["chosen"].shape == (6,) and z["data_cost"].shape == (6, 5)
    assert list(z["identity_frames"]) == [0, 2, 5]
    assert sorted(p.name for p in (out / "frames").iterdir()) == [f"frame_{t:06d}.ply" for t in range(6)]
    frames, _, _ = read_frames(out / "preview.mp4")
    assert len(frames) == 6 and frames[0].shape == (64, 128, 3)
    assert json.loads((out / "video.json").read_text())["status"] == "ok"
    # the per-frame meshes are the chosen path's; independent choice: each frame's data minimum
    import trimesh

    meshes = [trimesh.load(out / "frames" / f"frame_{t:06d}.ply", process=False).vertices for t in range(6)]
    # global pose and camera: the fit of the written meshes' keypoint landmarks to the keypoints
    assert json.loads((out / "video.json").read_text())["global_pose"] == "scaled-orthographic"
    from ofer.flame import FLAME
    from ofer.sample.video import clip_global_pose

    flame = FLAME(synthetic_flame_paths.model, synthetic_flame_paths.landmarks, n_shape=N_SHAPE, n_exp=0,
                  dtype=torch.float64)
    pose, cam, _ = clip_global_pose(flame, torch.as_tensor(np.stack(meshes)) / 1000.0, z["kps"].astype(np.float64),
                                    cfg.video.smooth_sigma, log=lambda *a: None)
    np.testing.assert_allclose(z["global_pose"], pose, atol=1e-3)
    np.testing.assert_allclose(z["camera"], cam, rtol=1e-3)
    # the clip's identity (group.select=top_mean: a mean of coefficients) is FLAME's mesh of motion.npz's shape
    ident = flame(shape_coeffs=torch.from_numpy(z["shape"].astype(np.float64))[None]).vertices[0].numpy()
    np.testing.assert_allclose(trimesh.load(out / "identity.ply", process=False).vertices, ident * 1000, atol=1e-3)
    assert jitter_mm(np.stack(meshes) / 1000.0) == pytest.approx(info["jitter_mm"], rel=1e-3)
    ind = _cfg(ov, "batch_size=4", "video.identity_frames=3", "video.choice=independent", "video.preview=false")
    z2 = np.load(run_video(ind, clip, tmp_path / "ind", detector=_StubDetector(), log=lambda *a: None)
                 and tmp_path / "ind" / "motion.npz")
    np.testing.assert_array_equal(z2["chosen"], z["data_cost"].argmin(1))
    np.testing.assert_allclose(z2["shape"], z["shape"])


def test_cli_frame_folder_with_sidecars(setup, tmp_path):  # noqa: F811
    pytest.importorskip("av")
    from PIL import Image

    from ofer.sample.runner import main

    root, images, ov = setup
    clip = tmp_path / "frames"
    clip.mkdir()
    for t, fr in enumerate(_frames(4, ())):
        Image.fromarray(fr).save(clip / f"{t:03d}.png")
        if t != 1:  # frame 1 has no keypoints: filled from its neighbours
            np.savetxt(clip / f"{t:03d}.kps.txt", KPS + t)
    out = tmp_path / "out"
    from pathlib import Path

    cfg = Path(__file__).resolve().parents[1] / "configs" / "sample.yaml"
    rc = main(["--video", "-i", str(clip), "-o", str(out), "-c", str(cfg), *ov, "video.preview=false"])
    assert rc == 0
    z = np.load(out / "motion.npz")
    assert list(z["filled"]) == [False, True, False, False]
    np.testing.assert_allclose(z["kps"][:, 0, 0], 44 + np.arange(4), atol=0.6)  # filled, then smoothed
    assert json.loads((out / "video.json").read_text())["filled_frames"] == ["001.png"]
