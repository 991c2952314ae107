"""The synthetic world: determinism, layout, keypoints, visibility and ground truth."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ofer.data.align import kps_from_landmarks68
from ofer.data.occlusion import OcclusionConfig
from ofer.errors import ConfigError, OferError
from ofer.preprocess import preprocess_folder
from ofer.world.build import WorldConfig, build_world, main, save_npz_deterministic
from ofer.world.prior import HeadPrior
from ofer.world.scene import FaceRenderer, SceneConfig

TINY = dict(identities=3, images_per_identity=2, expression_frames=2, images_per_frame=2, test_identities=2,
            vertices=1200, scene=SceneConfig(size=96))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    build_world(out, WorldConfig(seed=3, **TINY))
    return out


@pytest.fixture(scope="module")
def renderer(world) -> FaceRenderer:
    from ofer.flame import FLAME
    from ofer.flame import safe_load_pickle

    flame = FLAME(world / "flame" / "generic_model.pkl", world / "flame" / "landmark_embedding.npy")
    return FaceRenderer(flame, SceneConfig(size=128), safe_load_pickle(world / "flame" / "FLAME_masks.pkl"))


def test_same_seed_gives_identical_bytes(world, tmp_path):
    other = tmp_path / "again"
    build_world(other, WorldConfig(seed=3, **TINY), workers=2)  # the worker count must not matter
    a, b = _files(world), _files(other)
    assert sorted(a) == sorted(b)
    # the FLAME landmark file holds pickled torch tensors whose serialisation is not byte-stable
    differ = [k for k in a if a[k] != b[k] and k != "flame/landmark_embedding.npy"]
    assert differ == []
    assert any(k.endswith(".npz") for k in a) and any(k.startswith("image_paths/") for k in a)


def test_other_seed_gives_other_params(world, tmp_path):
    other = tmp_path / "seed4"
    build_world(other, WorldConfig(seed=4, **{**TINY, "expression_frames": 0, "test_identities": 0}))
    p = "WORLDID/FLAME_parameters/id0000/id0000.npz"
    assert (world / p).read_bytes() != (other / p).read_bytes()
    assert not (other / "image_paths" / "WORLDEXP_TRAIN.npy").exists()


def test_layout_and_every_referenced_file_exists(world):
    info = json.loads((world / "world.json").read_text())
    assert info["seed"] == 3
    for name, base in (("WORLDID", "WORLDID"), ("WORLDEXP", "WORLDEXP")):
        actors = []
        for split in ("TRAIN", "VAL"):
            d = np.load(world / "image_paths" / f"{name}_{split}.npy", allow_pickle=True).item()
            assert isinstance(d, dict)
            for actor, value in d.items():
                assert isinstance(value, tuple) and len(value) == 2
                images, params = value
                assert params == f"{actor}/{actor}.npz"
                assert (world / base / "FLAME_parameters" / params).is_file()
                for rel in images:
                    assert rel.startswith(actor + "/") and rel.endswith(".jpg")
                    crop = world / base / "arcface_input" / rel
                    assert crop.is_file()
                    with Image.open(crop) as im:
                        assert im.size == (224, 224)
                    blob = np.load(crop.with_suffix(".npy"))
                    assert blob.shape == (3, 112, 112) and blob.dtype == np.float32
                    assert -1.0 <= blob.min() and blob.max() <= 1.0
                    stem = world / "renders" / base / rel[: -len(".jpg")]
                    for suffix in (".png", ".kps.txt", "_mask.png"):
                        assert Path(str(stem) + suffix).is_file()
            actors += list(d)
        assert sorted(actors) == sorted(info["datasets"][name]["train"] + info["datasets"][name]["val"])
    # identity split: no identity on both sides, in either dataset
    tr = set(info["datasets"]["WORLDID"]["train"])
    va = set(info["datasets"]["WORLDID"]["val"])
    assert tr and va and not tr & va
    for frame in info["datasets"]["WORLDEXP"]["val"]:
        assert frame.split("__")[0] in va
    assert len(tr | va) == 3
    for f in ("generic_model.pkl", "landmark_embedding.npy", "FLAME_masks.pkl"):
        assert (world / "flame" / f).is_file()


def test_crops_are_what_preprocessing_makes_of_the_renders(world, tmp_path):
    # python -m ofer.preprocess --channel-order rgb on the renders and their keypoint sidecars
    # (the sidecars round the keypoints to 1/1000 pixel, so the blobs agree closely, not exactly)
    src = tmp_path / "renders"
    for kps in sorted((world / "renders" / "WORLDID").rglob("*.kps.txt")):
        stem = kps.name[: -len(".kps.txt")]
        rel = kps.parent.relative_to(world / "renders" / "WORLDID")
        (src / rel).mkdir(parents=True, exist_ok=True)
        for name in (f"{stem}.png", kps.name):
            (src / rel / name).write_bytes((kps.parent / name).read_bytes())
    res = preprocess_folder(src, tmp_path / "pre", channel_order="rgb", progress=False)
    assert not res["failed"] and len(res["done"]) == 3 * 2
    for rel in res["done"]:
        stem = rel[: -len(".png")]
        ours = world / "WORLDID" / "arcface_input" / stem
        pre = tmp_path / "pre" / stem
        np.testing.assert_allclose(np.load(f"{pre}.npy"), np.load(f"{ours}.npy"), atol=0.02)
        with Image.open(f"{pre}.jpg") as a, Image.open(f"{ours}.jpg") as b:
            assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).mean() < 1.0


def test_params_follow_the_mica_convention(world):
    prior = HeadPrior()
    d = np.load(world / "WORLDID/FLAME_parameters/id0001/id0001.npz")
    assert sorted(d.files) == ["betas", "pose"]
    assert d["betas"].shape == (400,) and d["pose"].shape == (15,)
    assert np.count_nonzero(d["betas"][:300]) == prior.shape_active
    assert not d["betas"][prior.shape_active:].any() and not d["pose"].any()
    e = np.load(world / "WORLDEXP/FLAME_parameters/id0001__e01__000/id0001__e01__000.npz")
    np.testing.assert_array_equal(e["betas"][:300], d["betas"][:300])  # same identity
    assert np.count_nonzero(e["betas"][300:]) == prior.exp_active
    assert not e["betas"][350:].any()  # at most the first 50 expression coefficients
    assert e["pose"][6] >= 0 and not e["pose"][:6].any() and not e["pose"][9:].any()


def test_test_split_ground_truth(world):
    info = json.loads((world / "world.json").read_text())
    ids = info["test"]["ids"]
    assert ids == [f"test{i:04d}_00_{v}" for i in range(2) for v in ("clean", "occluded", "mouth")]
    imgs = {tid: np.asarray(Image.open(world / "test" / "images" / f"{tid}.png")) for tid in ids}
    for tid in ids:
        kps = np.loadtxt(world / "test" / "images" / f"{tid}.kps.txt")
        assert kps.shape == (5, 2)
        gt = np.load(world / "test" / "gt" / f"{tid}.npz")
        scene, variant = tid.rsplit("_", 1)
        assert str(gt["scene"]) == scene and str(gt["variant"]) == variant
        assert gt["shape_coeffs"].shape == (300,) and gt["exp_coeffs"].shape == (100,)
        assert gt["jaw_pose"].shape == (3,) and gt["global_pose"].shape == (3,)
        V = gt["vertices"].shape[0]
        assert gt["vertex_visible"].shape == (V,) and gt["vertex_visible"].dtype == bool
        assert (gt["vertex_visible"] <= gt["vertex_in_render"]).all()
        np.testing.assert_allclose(gt["kps"], kps, atol=1e-3)
        mask = np.asarray(Image.open(world / "test" / "gt" / f"{tid}_mask.png")) > 127
        assert 0.0 <= float(gt["occluded_fraction"]) <= 1.0
        # the variants of a scene are one render: identical outside the occluder, same geometry
        clean = np.load(world / "test" / "gt" / f"{scene}_clean.npz")
        np.testing.assert_array_equal(imgs[tid][~mask], imgs[f"{scene}_clean"][~mask])
        for key in ("vertices", "kps", "camera_R", "exp_coeffs", "jaw_pose", "vertex_in_render"):
            np.testing.assert_array_equal(gt[key], clean[key])
        if variant == "clean":
            assert not mask.any() and float(gt["occluded_fraction"]) == 0.0 and str(gt["occluder"]) == ""
            assert not bool(gt["mouth_occluded"])
            np.testing.assert_array_equal(gt["vertex_visible"], gt["vertex_in_render"])
        else:
            assert mask.any() and float(gt["occluded_fraction"]) > 0.0 and str(gt["occluder"]) != ""
        if variant == "mouth":
            assert str(gt["occluder"]) == "facemask" and bool(gt["mouth_occluded"])
        # the stored camera, vertices, mask and visibility agree with each other
        pc = gt["vertices"].astype(np.float64) @ gt["camera_R"].T.astype(np.float64) + gt["camera_t"]
        K = gt["camera_K"].astype(np.float64)
        u = np.rint(K[0, 0] * pc[:, 0] / pc[:, 2] + K[0, 2]).astype(int)
        v = np.rint(K[1, 1] * pc[:, 1] / pc[:, 2] + K[1, 2]).astype(int)
        seen = gt["vertex_in_render"]
        np.testing.assert_array_equal(gt["vertex_visible"], seen & ~mask[v.clip(0, 95), u.clip(0, 95)])
        # the neutral identity is different from the same identity of an id actor
        assert gt["vertices_neutral"].shape == (V, 3)
        # the test identity is held out: not equal to any training identity
        for a in ("id0000", "id0001", "id0002"):
            b = np.load(world / f"WORLDID/FLAME_parameters/{a}/{a}.npz")["betas"][:300]
            assert not np.allclose(b, gt["shape_coeffs"])


def test_kps_and_landmarks_project_onto_the_face(renderer):
    rng = np.random.default_rng(0)
    prior = HeadPrior()
    B = 4
    shape = np.stack([prior.sample_identity(rng) for _ in range(B)])
    exp, jaw = zip(*(prior.sample_expression(rng) for _ in range(B)))
    samples = renderer.render_batch(rng, shape, np.stack(exp), np.stack(jaw), renderer.sample_albedo(rng),
                                    occlusion=OcclusionConfig(prob=0.0))
    for s in samples:
        for x, y in s.kps[:2]:  # both eyes
            assert s.face_mask[int(round(y)), int(round(x))]
        # the 5 points are the documented combination of the 68 projected landmarks
        np.testing.assert_allclose(s.kps, kps_from_landmarks68(s.landmarks2d), atol=1e-4)
        # insightface order: image-left eye before image-right eye, mouth corners likewise
        assert s.kps[0, 0] < s.kps[1, 0] and s.kps[3, 0] < s.kps[4, 0]
        assert s.kps[2, 1] < s.kps[3, 1]  # nose above the mouth (|roll| <= 12 degrees)
        # no occluder: every vertex seen is visible
        np.testing.assert_array_equal(s.vertex_visible, s.vertex_in_render)
        assert 0.2 < s.vertex_in_render.mean() < 0.9
        assert not s.occluder_mask.any() and s.occluded_fraction == 0.0


def test_visibility_is_consistent_with_the_occluder(renderer):
    rng = np.random.default_rng(5)
    prior = HeadPrior()
    B = 4
    shape = np.tile(prior.sample_identity(rng), (B, 1))
    exp, jaw = zip(*(prior.sample_expression(rng) for _ in range(B)))
    samples = renderer.render_batch(rng, shape, np.stack(exp), np.stack(jaw), renderer.sample_albedo(rng),
                                    occlusion=OcclusionConfig(prob=1.0, area=(0.2, 0.4)), force_occlusion=True)
    S = renderer.scene.size
    for s in samples:
        m = s.occluder_mask
        assert m.any()
        hidden = s.vertex_in_render & ~s.vertex_visible
        assert hidden.any()
        # independent check: hidden = seen and projecting onto the occluder
        px = s.camera.project(s.vertices)
        ij = np.clip(np.rint(px).astype(int), 0, S - 1)
        np.testing.assert_array_equal(hidden, s.vertex_in_render & m[ij[:, 1], ij[:, 0]])
        # seen vertices lie on the visible surface: most project onto head pixels (the rest sit
        # on the silhouette and round to a background pixel)
        assert s.face_mask[ij[s.vertex_in_render, 1], ij[s.vertex_in_render, 0]].mean() > 0.85
        # occluded fraction matches the pixel count on the head
        assert 0.0 < s.occluded_fraction <= 1.0
        # the occluded image differs from the clean one only under the mask
        np.testing.assert_array_equal(s.image[~m], s.clean[~m])


def test_prior_and_config_validation():
    rng = np.random.default_rng(0)
    p = HeadPrior(shape_active=7, exp_active=3)
    s = p.sample_identity(rng)
    assert s.shape == (300,) and s.dtype == np.float32 and np.count_nonzero(s) == 7
    e, j = p.sample_expression(rng, scale=0.0)
    assert not e.any() and not j.any()
    with pytest.raises(ConfigError, match="exp_active"):
        HeadPrior(exp_active=60)
    with pytest.raises(ConfigError, match="scene.yaw"):
        SceneConfig(yaw=(30.0, -30.0))
    with pytest.raises(ConfigError, match="world.identities"):
        WorldConfig(identities=0)


def test_deterministic_npz_round_trip():
    a = {"x": np.arange(5, dtype=np.float32), "flag": np.bool_(True), "name": np.array("hand")}
    b1, b2 = io.BytesIO(), io.BytesIO()
    save_npz_deterministic(b1, **a)
    save_npz_deterministic(b2, **a)
    assert b1.getvalue() == b2.getvalue()
    d = np.load(io.BytesIO(b1.getvalue()))
    np.testing.assert_array_equal(d["x"], a["x"])
    assert bool(d["flag"]) and str(d["name"]) == "hand"


def test_cli_and_existing_output(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--output", str(out), "--identities", "2", "--images-per-identity", "1", "--expression-frames", "0",
            "--test-identities", "1", "--size", "64", "--vertices", "800", "--no-crops", "--workers", "1", "--quiet"]
    assert main(args) == 0
    assert (out / "world.json").is_file() and not (out / "WORLDID" / "arcface_input").exists()
    assert main(args) == 2  # refuses to overwrite
    assert "not empty" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    with pytest.raises(OferError, match="not empty"):
        build_world(out, WorldConfig(identities=1, images_per_identity=1))
    # no staging folders are left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]


def test_per_coefficient_identity_std():
    sig = (2.0, 0.0, 0.5)
    p = HeadPrior(shape_active=3, shape_sigma=sig)
    rng = np.random.default_rng(1)
    draws = np.stack([p.sample_identity(rng) for _ in range(4000)])
    assert not draws[:, 3:].any() and not draws[:, 1].any()
    np.testing.assert_allclose(draws[:, [0, 2]].std(0), [2.0, 0.5], rtol=0.05)
    # one number for all coefficients draws the same stream as that number repeated
    a = HeadPrior(shape_active=3, shape_sigma=1.5).sample_identity(np.random.default_rng(2))
    b = HeadPrior(shape_active=3, shape_sigma=(1.5, 1.5, 1.5)).sample_identity(np.random.default_rng(2))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="one per active coefficient"):
        HeadPrior(shape_active=4, shape_sigma=(1.0, 1.0))
    with pytest.raises(ConfigError, match=">= 0"):
        HeadPrior(shape_active=2, shape_sigma=(1.0, -1.0))


def test_per_coefficient_expression_std():
    p = HeadPrior(exp_active=3, exp_sigma=(2.0, 0.0, 0.5), jaw_open=(0.1, 0.3))
    rng = np.random.default_rng(4)
    exps, jaws = map(np.stack, zip(*(p.sample_expression(rng) for _ in range(4000))))
    assert not exps[:, 3:].any() and not exps[:, 1].any()
    np.testing.assert_allclose(exps[:, [0, 2]].std(0), [2.0, 0.5], rtol=0.05)
    assert 0.1 <= jaws[:, 0].min() and jaws[:, 0].max() <= 0.3
    with pytest.raises(ConfigError, match=r"prior.exp_sigma must be one number or 3 numbers"):
        HeadPrior(exp_active=3, exp_sigma=(1.0, 1.0))
    with pytest.raises(ConfigError, match=">= 0"):
        HeadPrior(exp_active=2, exp_sigma=(1.0, -1.0))


def test_cli_prior_and_pose_options(tmp_path, capsys):
    out = tmp_path / "opts"
    args = ["--output", str(out), "--identities", "2", "--images-per-identity", "1", "--expression-frames", "0",
            "--test-identities", "0", "--size", "64", "--vertices", "800", "--no-crops", "--workers", "1", "--quiet",
            "--shape-sigma", "2,0,1", "--pose", "10,5,0", "--id-expression-scale", "0"]
    assert main(args) == 0
    cfg = json.loads((out / "world.json").read_text())["config"]
    assert cfg["prior"]["shape_active"] == 3 and cfg["prior"]["shape_sigma"] == [2.0, 0.0, 1.0]
    assert cfg["scene"]["yaw"] == [-10.0, 10.0] and cfg["scene"]["roll"] == [-0.0, 0.0]
    assert cfg["id_expression_scale"] == 0.0
    betas = [np.load(p)["betas"] for p in sorted((out / "WORLDID" / "FLAME_parameters").rglob("*.npz"))]
    assert all(b[1] == 0 and not b[3:].any() and b[0] != 0 for b in betas)
    assert main(args[:-6] + ["--pose", "10,5", "--overwrite"]) == 2
    assert "--pose expects YAW,PITCH,ROLL" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args[:-6] + ["--shape-sigma", "a,b"])
    # expression prior: per-coefficient std (sets the count), jaw range
    assert main(args + ["--exp-sigma", "1.5,0,0.5,0.5", "--jaw-open", "0.1,0.2", "--expression-frames", "1",
                        "--test-occlusion-area", "0.4,0.6", "--overwrite"]) == 0
    cfg = json.loads((out / "world.json").read_text())["config"]
    assert cfg["prior"]["exp_active"] == 4 and cfg["prior"]["exp_sigma"] == [1.5, 0.0, 0.5, 0.5]
    assert cfg["prior"]["jaw_open"] == [0.1, 0.2] and cfg["test_occlusion_area"] == [0.4, 0.6]
    frames = [np.load(p) for p in sorted((out / "WORLDEXP" / "FLAME_parameters").rglob("*.npz"))]
    assert frames and all(f["betas"][300] != 0 and f["betas"][301] == 0 and not f["betas"][304:].any()
                          and 0.1 <= f["pose"][6] <= 0.2 for f in frames)
    assert main(args + ["--jaw-open", "0.3,0.1", "--overwrite"]) == 2
    assert "prior.jaw_open must satisfy" in capsys.readouterr().err
    assert main(args + ["--test-occlusion-area", "0,0.5", "--overwrite"]) == 2
    assert "world.test_occlusion_area must be above 0" in capsys.readouterr().err
