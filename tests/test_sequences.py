"""The world's photo sets and clips: layout, determinism and ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from ofer.world.build import WorldConfig, build_world
from ofer.world.scene import SceneConfig
from ofer.world.sequences import SequenceConfig, _smooth_keys, build_sequences, format_measurements, paired_halves


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("seqworld") / "w"
    build_world(out, WorldConfig(identities=1, images_per_identity=1, expression_frames=0, test_identities=0,
                                 vertices=1200, crops=False, scene=SceneConfig(size=96)))
    return out


def test_photo_sets_and_clips(world, tmp_path):
    from ofer.flame import FLAME

    cfg = SequenceConfig(photo_sets=1, photo_set_size=3, clips=1, clip_frames=6, occluded_share=0.5)
    a, b = tmp_path / "a", tmp_path / "b"
    build_sequences(world, a, cfg)
    build_sequences(world, b, cfg)
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files if f != "sequences.json")
    assert {f for f in files if f.startswith("photosets/set000/")} == {
        f"photosets/set000/{k:02d}.{e}" for k in range(3) for e in ("png", "kps.txt")}
    assert len([f for f in files if f.startswith("clips/clip000/") and f.endswith(".png")]) == 6
    gt = np.load(a / "clips" / "gt" / "clip000.npz")
    assert gt["exp_coeffs"].shape == (6, 100) and gt["kps"].shape == (6, 5, 2) and gt["global_pose"].shape == (6, 3)
    occ = np.flatnonzero(gt["occluded"])
    assert 1 <= len(occ) <= 3 and np.all(np.diff(occ) == 1)  # one stretch of frames
    # the head turns: yaw grows monotonically; the identity is fixed
    assert np.all(np.diff(gt["global_pose"][:, 1]) > 0)
    ps = np.load(a / "photosets" / "gt" / "set000.npz")
    flame = FLAME(world / "flame" / "generic_model.pkl", None)
    import torch

    ref = flame(shape_coeffs=torch.from_numpy(ps["shape_coeffs"])[None]).vertices[0].numpy()
    np.testing.assert_allclose(ps["vertices_neutral"], ref, atol=1e-6)
    kps = np.loadtxt(a / "clips" / "clip000" / "0000.kps.txt")
    np.testing.assert_allclose(kps, gt["kps"][0], atol=1e-3)


def test_smooth_keys_passes_through_the_keys():
    keys = np.array([[0.0], [1.0], [3.0]])
    out = _smooth_keys(keys, 5)
    np.testing.assert_allclose(out[[0, 2, 4], 0], [0.0, 1.0, 3.0])
    assert np.all(np.diff(out[:, 0]) > 0)


def test_format_measurements():
    rep = {"photo_sets": {"1": {"group (log_softmax)": {"mean_mm": 2.0, "groups": 8}},
                          "2": {"group (log_softmax)": {"mean_mm": 1.5, "groups": 4}}},
           "clips": {"dp (smooth 1)": {"error_mm": 1.0, "error_occluded_frames_mm": 1.2, "jitter_mm": 0.3, "clips": 2},
                     "global pose (fit)": {"yaw_deg": 2.5, "pitch_deg": 1.25, "roll_deg": 0.5, "angle_deg": 3.0,
                                           "clips": 2}}}
    text = format_measurements(rep)
    assert "| group (log_softmax) | 2.000 | 1.500 |" in text and "| dp (smooth 1) | 1.000 | 1.200 | 0.300 |" in text
    assert "| global pose (fit) | 2.50 | 1.25 | 0.50 | 3.00 |" in text and "| global pose (fit) | 2.500 |" not in text


def test_paired_halves_against_hand_computed_differences():
    # groups of 2K: errors 1 and 3; their halves: (2, 2) and (1, 4) -> differences -1 and +0.5
    big, half = {"g": [1.0, 3.0], "odd": [1.0]}, {"g": [2.0, 2.0, 1.0, 4.0], "odd": [1.0, 2.0, 3.0]}
    d = paired_halves(big, half)
    assert set(d) == {"g"}  # a row whose halves do not pair up is left out
    assert d["g"]["wins"] == 1 and d["g"]["pairs"] == 2
    assert d["g"]["mean_diff_mm"] == pytest.approx(-0.25) and d["g"]["se_mm"] == pytest.approx(0.75)
    rep = {"photo_sets": {"1": {"g": {"mean_mm": 2.25, "groups": 4}}, "2": {"g": {"mean_mm": 2.0, "groups": 2}},
                          "paired": {"2 vs 1": d}}}
    text = format_measurements(rep)
    assert "| g | 2.250 | 2.000 |" in text and "K = paired" not in text
    assert "| g | -0.250 | 0.750 | 1 of 2 |" in text
    rep["photo_sets"]["vs_best"] = {"1": {"g2": {"mean_diff_mm": -0.5, "se_mm": 0.25, "wins": 3, "pairs": 4}},
                                     "2": {"g2": {"mean_diff_mm": 0.125, "se_mm": 0.5, "wins": 1, "pairs": 2}}}
    text = format_measurements(rep)
    assert "| g2 | -0.500 +- 0.250, 3/4 | +0.125 +- 0.500, 1/2 |" in text and "K = vs_best" not in text
