"""5-point alignment, warping, crops and which detected face is used."""

from __future__ import annotations

import numpy as np
import pytest

from ofer.data import align
from ofer.data.align import (
    ARCFACE_TEMPLATE,
    arcface_blob,
    box_from_kps,
    estimate_norm,
    farl_crop,
    farl_crop_matrix,
    kps_from_landmarks68,
    norm_crop,
    select_center_face,
    transform_points,
    umeyama,
    warp_affine,
)


def _similarity(scale, angle, tx, ty):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


@pytest.mark.parametrize("scale,angle,tx,ty", [(1.0, 0.0, 0.0, 0.0), (3.7, 0.4, 120.0, -35.0),
                                               (0.25, -2.9, 7.5, 800.0)])
def test_umeyama_recovers_known_similarity(scale, angle, tx, ty):
    m = _similarity(scale, angle, tx, ty)
    src = ARCFACE_TEMPLATE
    dst = transform_points(m, src)
    np.testing.assert_allclose(umeyama(src, dst)[:2], m, atol=1e-9)
    # estimate_norm inverts it: the image keypoints dst map back onto the template
    np.testing.assert_allclose(estimate_norm(dst, 112), np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2], atol=1e-9)


def _linear_lsq_similarity(src, dst):
    # independent reference: x' = a x - b y + tx, y' = b x + a y + ty, solved by linear least squares
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def test_umeyama_noisy_equals_linear_least_squares():
    rng = np.random.default_rng(0)
    for _ in range(5):
        src = rng.uniform(0, 500, (5, 2))
        dst = transform_points(_similarity(rng.uniform(0.1, 3), rng.uniform(-3, 3), *rng.uniform(-50, 50, 2)), src)
        dst += rng.normal(0, 3.0, dst.shape)
        np.testing.assert_allclose(umeyama(src, dst)[:2], _linear_lsq_similarity(src, dst), atol=1e-8)


def test_umeyama_never_reflects():
    src = ARCFACE_TEMPLATE
    mirrored = src * np.array([-1.0, 1.0])
    m = umeyama(src, mirrored)[:2]
    assert np.linalg.det(m[:, :2]) > 0


def test_estimate_norm_errors():
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        estimate_norm(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="multiple of 112"):
        estimate_norm(ARCFACE_TEMPLATE, 100)
    with pytest.raises(ValueError, match="degenerate"):
        estimate_norm(np.ones((5, 2)))


def _naive_warp(img, m, size):
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))
    h, w = img.shape[:2]
    out = np.zeros((size, size) + img.shape[2:], dtype=np.float64)

    def px(y, x):
        return img[y, x].astype(np.float64) if 0 <= y < h and 0 <= x < w else 0.0

    for y in range(size):
        for x in range(size):
            sx, sy, _ = inv @ [x, y, 1.0]
            x0, y0 = int(np.floor(sx)), int(np.floor(sy))
            fx, fy = sx - x0, sy - y0
            out[y, x] = (px(y0, x0) * (1 - fx) * (1 - fy) + px(y0, x0 + 1) * fx * (1 - fy)
                         + px(y0 + 1, x0) * (1 - fx) * fy + px(y0 + 1, x0 + 1) * fx * fy)
    return out


def test_warp_affine_matches_naive_bilinear_with_zero_border():
    rng = np.random.default_rng(1)
    img = rng.uniform(0, 255, (13, 17, 3)).astype(np.float32)
    m = _similarity(1.3, 0.7, 4.2, -3.1)
    np.testing.assert_allclose(warp_affine(img, m, 20), _naive_warp(img, m, 20), atol=1e-3)
    # uint8: rounded; far outside = border
    u8 = img.astype(np.uint8)
    ref = np.clip(np.rint(_naive_warp(u8, m, 20)), 0, 255)
    assert np.abs(warp_affine(u8, m, 20).astype(np.float64) - ref).max() <= 1
    far = warp_affine(u8, _similarity(1.0, 0.0, 1000.0, 1000.0), 8)
    assert far.shape == (8, 8, 3) and not far.any()


def test_warp_affine_identity_shift_and_edge():
    img = np.arange(5 * 6, dtype=np.float32).reshape(5, 6)
    np.testing.assert_array_equal(warp_affine(img, np.eye(3)[:2], (6, 5)), img)
    shifted = warp_affine(img, np.array([[1.0, 0, 2], [0, 1.0, 1]]), (6, 5))
    np.testing.assert_array_equal(shifted[1:, 2:], img[:-1, :-2])
    assert not shifted[0].any() and not shifted[:, :2].any()
    # half a pixel outside the image blends with the zero border
    half = warp_affine(np.full((4, 4), 100.0, np.float32), np.array([[1.0, 0, 0.5], [0, 1.0, 0]]), (4, 4))
    assert half[0, 0] == pytest.approx(50.0)
    assert half[0, 1] == pytest.approx(100.0)


def test_norm_crop_puts_keypoints_on_template():
    # draw a bright dot at each keypoint of an image of a "face" under a known similarity
    m = _similarity(2.5, 0.3, 200.0, 80.0)
    kps = transform_points(m, ARCFACE_TEMPLATE)
    img = np.zeros((480, 640, 3), np.uint8)
    for x, y in kps:
        img[int(round(y)) - 3:int(round(y)) + 4, int(round(x)) - 3:int(round(x)) + 4] = 255
    crop = norm_crop(img, kps, 112)
    assert crop.shape == (112, 112, 3)
    for x, y in ARCFACE_TEMPLATE:
        assert crop[int(round(y)), int(round(x))].min() > 200
    crop224 = norm_crop(img, kps, 224)
    for x, y in ARCFACE_TEMPLATE * 2:
        assert crop224[int(round(y)), int(round(x))].min() > 200


def test_arcface_blob_channel_order():
    crop = np.zeros((112, 112, 3), np.uint8)
    crop[..., 0] = 255  # pure red
    rgb = arcface_blob(crop, "rgb")
    bgr = arcface_blob(crop, "bgr")
    assert rgb.shape == (3, 112, 112) and rgb.dtype == np.float32
    assert rgb[0].min() == 1.0 and rgb[2].max() == -1.0
    np.testing.assert_array_equal(bgr, rgb[::-1])
    with pytest.raises(ValueError, match="channel_order"):
        arcface_blob(crop, "gbr")


def test_farl_crop_matches_original_formula():
    box = (100.0, 50.0, 180.0, 150.0)  # w 80, h 100 -> size int(90 * 1.6) = 144, centre (140, 100)
    m = farl_crop_matrix(box)
    corners = transform_points(m, [[140 - 72, 100 - 72], [140 - 72, 100 + 72], [140 + 72, 100 - 72]])
    np.testing.assert_allclose(corners, [[0, 0], [0, 223], [223, 0]], atol=1e-9)
    img = np.full((300, 400, 3), 77, np.uint8)
    crop = farl_crop(img, box)
    assert crop.shape == (224, 224, 3) and (crop == 77).all()
    with pytest.raises(ValueError, match="empty"):
        farl_crop_matrix((10, 10, 10, 10))


def test_box_from_kps_equivariant():
    base = box_from_kps(ARCFACE_TEMPLATE)
    np.testing.assert_allclose(base, align.CANONICAL_BOX, atol=1e-9)
    m = _similarity(3.0, 0.0, 50.0, 20.0)
    np.testing.assert_allclose(box_from_kps(transform_points(m, ARCFACE_TEMPLATE)),
                               align.CANONICAL_BOX * 3.0 + [50, 20, 50, 20], atol=1e-9)
    # a rolled face keeps the box size (no inflation by rotation)
    b = box_from_kps(transform_points(_similarity(3.0, 0.5, 50.0, 20.0), ARCFACE_TEMPLATE))
    np.testing.assert_allclose(b[2:] - b[:2], (align.CANONICAL_BOX[2:] - align.CANONICAL_BOX[:2]) * 3.0)


def test_kps_from_landmarks68_groups_and_order():
    lmk = np.random.default_rng(0).normal(size=(2, 68, 3))
    kps = kps_from_landmarks68(lmk)
    ref = [lmk[:, 36:42].mean(1), lmk[:, 42:48].mean(1), lmk[:, 30], lmk[:, 48], lmk[:, 54]]
    assert kps.shape == (2, 5, 3)
    np.testing.assert_allclose(kps, np.stack(ref, axis=1), atol=1e-15)
    np.testing.assert_allclose(kps_from_landmarks68(lmk[0, :, :2]), kps[0, :, :2], atol=1e-15)


def test_select_center_face_uses_x_and_y_correctly():
    # a wide image 400 (W) x 100 (H): centre (200, 50)
    boxes = np.array([[0, 0, 20, 20, 0.9],      # centre (10, 10)
                      [190, 40, 210, 60, 0.8],  # centre (200, 50): the right one
                      [40, 190, 60, 210, 0.99]])  # centre (50, 200): nearest to the swapped centre (50, 200)
    assert select_center_face(boxes, (100, 400, 3)) == 1
    with pytest.raises(ValueError):
        select_center_face(np.zeros((0, 5)), (10, 10))


def test_choose_faces_center_largest_all():
    from ofer.data.align import choose_faces

    shape = (400, 600, 3)  # centre (300, 200)
    boxes = np.array([
        [10, 10, 210, 250, 0.99],    # 0: the largest, far from the centre
        [280, 180, 320, 220, 0.95],  # 1: tiny, exactly at the centre (side 40 < 0.5 * 219)
        [330, 150, 450, 290, 0.80],  # 2: reasonable size, nearest the centre among those
        [480, 10, 580, 110, 0.70],   # 3: side 100 < 0.5 * 219
    ])
    assert choose_faces(boxes, shape, "center") == [2]
    assert choose_faces(boxes, shape, "center", min_relative_size=0.0) == [1]
    assert choose_faces(boxes, shape, "center", min_relative_size=1.0) == [0]
    assert choose_faces(boxes, shape, "largest") == [0]
    assert choose_faces(boxes, shape, "all") == [0, 1, 2, 3]  # left to right
    assert choose_faces(boxes[[3, 1, 0]], shape, "all") == [2, 1, 0]
    assert choose_faces(np.zeros((0, 5)), shape, "center") == []
    with pytest.raises(ValueError, match="which must be one of"):
        choose_faces(boxes, shape, "first")
