"""Synthetic occluders: determinism, mask/area consistency, placement, config errors."""

from __future__ import annotations

import numpy as np
import pytest

from ofer.data.occlusion import (
    VALID_KINDS,
    Occluder,
    OcclusionConfig,
    default_kps,
    face_box,
    occlude,
    occlude_with_info,
)
from ofer.errors import ConfigError


def _image(h: int = 96, w: int = 96, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("kind", VALID_KINDS)
def test_each_kind_is_deterministic_and_area_in_range(kind):
    img = _image()
    cfg = OcclusionConfig(prob=1.0, area=(0.05, 0.4), kinds=(kind,))
    kps = default_kps(96, 96)
    for seed in range(4):
        a = occlude_with_info(img, np.random.default_rng(seed), cfg, kps=kps)
        b = occlude_with_info(img, np.random.default_rng(seed), cfg, kps=kps)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.kind is not None
        # area measured independently from the mask and the face box
        _, ref = face_box(kps)
        frac = a.mask.sum() / min(ref, 96 * 96)
        assert frac == pytest.approx(a.area_fraction)
        assert 0.05 <= frac <= 0.4
        # pixels outside the mask are untouched
        np.testing.assert_array_equal(a.image[~a.mask], img[~a.mask])


def test_mask_covers_exactly_the_changed_pixels_for_flat_fill():
    img = np.full((64, 80, 3), 7, np.uint8)
    cfg = OcclusionConfig(prob=1.0, kinds=("polygon", "ellipse"), textures=("flat",))
    for seed in range(5):
        out, mask = occlude(img, np.random.default_rng(seed), cfg)
        changed = (out != img).any(-1)
        # a flat colour may coincide with the background in a channel, never in all three here
        assert (changed <= mask).all()
        assert changed.sum() >= 0.95 * mask.sum()
        # without keypoints the reference area is the whole image
        assert 0.05 <= mask.sum() / (64 * 80) <= 0.4


def test_area_range_is_respected_for_narrow_ranges():
    img = _image(128, 128)
    for lo, hi in ((0.1, 0.12), (0.3, 0.32)):
        cfg = OcclusionConfig(prob=1.0, area=(lo, hi))
        for seed in range(6):
            _, mask = occlude(img, np.random.default_rng(seed), cfg)
            assert lo <= mask.sum() / 128**2 <= hi


def test_probability_zero_and_one():
    img = _image()
    out, mask = occlude(img, np.random.default_rng(0), OcclusionConfig(prob=0.0))
    np.testing.assert_array_equal(out, img)
    assert not mask.any()
    hits = sum(occlude(img, np.random.default_rng(s), OcclusionConfig(prob=1.0))[1].any() for s in range(5))
    assert hits == 5
    # prob 0.5: some but not all, over a fixed sequence of draws
    rng = np.random.default_rng(3)
    n = sum(occlude(img, rng, OcclusionConfig(prob=0.5))[1].any() for _ in range(20))
    assert 3 <= n <= 17


def test_sunglasses_cover_the_eyes_and_facemask_the_mouth():
    H = W = 160
    img = _image(H, W)
    kps = np.array([[60.0, 70.0], [100.0, 71.0], [80.0, 92.0], [64.0, 112.0], [96.0, 113.0]])
    seen = {"sunglasses": 0, "facemask": 0}
    for seed in range(4):
        r = occlude_with_info(img, np.random.default_rng(seed), OcclusionConfig(prob=1.0, kinds=("sunglasses",)), kps=kps)
        if r.kind == "sunglasses":
            seen["sunglasses"] += 1
            for x, y in kps[:2]:
                assert r.mask[int(round(y)), int(round(x))]
            assert not r.mask[int(kps[3, 1]), int(kps[3, 0])]
        r = occlude_with_info(img, np.random.default_rng(seed), OcclusionConfig(prob=1.0, kinds=("facemask",)), kps=kps)
        if r.kind == "facemask":
            seen["facemask"] += 1
            mouth = (kps[3] + kps[4]) / 2
            assert r.mask[int(round(mouth[1])), int(round(mouth[0]))]
            assert not r.mask[int(kps[0, 1]), int(kps[0, 0])]
    # the silhouettes fit the default area range, so the polygon fallback is rare
    assert seen["sunglasses"] >= 3 and seen["facemask"] >= 3


def test_cutout_copies_pixels_from_the_source():
    img = np.zeros((64, 64, 3), np.uint8)
    src = np.full((32, 32, 3), 200, np.uint8)  # resized to the image size
    cfg = OcclusionConfig(prob=1.0, kinds=("cutout",))
    out, mask = occlude(img, np.random.default_rng(0), cfg, source=src)
    assert mask.any()
    assert (out[mask] == 200).all() and (out[~mask] == 0).all()


def test_full_image_with_small_face():
    img = _image(240, 320)
    kps = np.array([[200.0, 60.0], [220.0, 60.0], [210.0, 70.0], [202.0, 80.0], [218.0, 80.0]])
    _, ref = face_box(kps)
    cfg = OcclusionConfig(prob=1.0)
    for seed in range(6):
        r = occlude_with_info(img, np.random.default_rng(seed), cfg, kps=kps)
        assert 0.05 <= r.mask.sum() / ref <= 0.4
        # the occluder lies on or near the face, not somewhere else in the image
        ys, xs = np.nonzero(r.mask)
        assert np.hypot(xs.mean() - 210, ys.mean() - 72) < 60


def test_occluder_class_matches_function():
    img = _image()
    cfg = OcclusionConfig(prob=1.0)
    a = Occluder(cfg)(img, np.random.default_rng(5))
    b = occlude(img, np.random.default_rng(5), cfg)
    np.testing.assert_array_equal(a[0], b[0])


def test_config_errors():
    with pytest.raises(ConfigError, match="valid kinds: polygon, ellipse, hand"):
        OcclusionConfig(kinds=("polygon", "scarf"))
    with pytest.raises(ConfigError, match="'scarf'"):
        OcclusionConfig(kinds=("scarf",))
    with pytest.raises(ConfigError, match="occlusion.prob"):
        OcclusionConfig(prob=1.5)
    with pytest.raises(ConfigError, match="occlusion.area"):
        OcclusionConfig(area=(0.5, 0.2))
    with pytest.raises(ConfigError, match="valid textures"):
        OcclusionConfig(textures=("plaid",))
    with pytest.raises(ConfigError, match="unknown key 'probability'"):
        OcclusionConfig.from_dict({"probability": 0.2})
    assert OcclusionConfig.from_dict({"prob": 0.2, "kinds": ["hand"]}).kinds == ("hand",)
    with pytest.raises(ValueError, match="uint8"):
        occlude(np.zeros((8, 8, 3), np.float32), np.random.default_rng(0))


def test_dataset_occluder_on_chw_floats():
    from ofer.data.occlusion import crop_kps, make_occluder

    f = make_occluder(area=(0.1, 0.3))
    img = np.random.default_rng(0).random((3, 224, 224)).astype(np.float32)
    for seed in range(8):
        out, mask = f(img, np.random.default_rng(seed))
        assert out.shape == img.shape and out.dtype == np.float32 and mask.dtype == np.float32
        assert set(np.unique(mask)) <= {0.0, 1.0} and mask.any()
        np.testing.assert_array_equal(out[:, mask == 0], img[:, mask == 0])  # exact outside
        assert 0.1 <= mask.sum() / 224**2 <= 0.3  # a fraction of the image, as the datasets expect
    # face-placed kinds: sunglasses cover the crop's eyes
    g = make_occluder(area=(0.05, 0.4), kinds=("sunglasses",))
    hits = 0
    for seed in range(4):
        _, mask = g(img, np.random.default_rng(seed))
        k = crop_kps(224)
        hits += int(all(mask[int(round(y)), int(round(x))] for x, y in k[:2]))
    assert hits >= 3


def test_crop_kps_match_the_preprocessing_crop():
    from ofer.data.align import farl_crop_matrix, transform_points
    from ofer.data.images import prepare_face_array
    from ofer.data.occlusion import ARCFACE_TEMPLATE, crop_kps

    # a frontal face somewhere in a larger image: the template scaled, rotated and shifted
    a = np.deg2rad(8.0)
    R = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) * 1.7
    kps = ARCFACE_TEMPLATE @ R.T + [60.0, 40.0]
    face = prepare_face_array(np.zeros((300, 320, 3), np.uint8), kps=kps)
    got = transform_points(farl_crop_matrix(face.box, 224), kps)
    # the crop box is axis-aligned, so an in-plane rotation moves the points a little
    np.testing.assert_allclose(got, crop_kps(224), atol=12.0)
    straight = ARCFACE_TEMPLATE * 1.7 + [60.0, 40.0]
    face = prepare_face_array(np.zeros((300, 320, 3), np.uint8), kps=straight)
    np.testing.assert_allclose(transform_points(farl_crop_matrix(face.box, 224), straight), crop_kps(224), atol=1.0)
