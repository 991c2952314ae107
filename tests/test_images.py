"""Real-world inputs: formats, EXIF, modes, bit depths, sizes, broken files, sidecars, detectors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, features

from ofer.data.align import ARCFACE_TEMPLATE, arcface_blob, farl_crop_matrix, transform_points
from ofer.data.images import iter_images, prepare_face, read_image, read_sidecar_kps
from ofer.errors import ImageError


def _similarity(scale, angle, tx, ty):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


def _face_image(w, h, m, bg=40):
    """An image with a bright 5x5 (scaled) square at each keypoint of the template under ``m``."""
    img = np.full((h, w, 3), bg, np.uint8)
    kps = transform_points(m, ARCFACE_TEMPLATE)
    r = max(2, int(round(2.0 * np.sqrt(abs(np.linalg.det(m[:, :2]))))))
    for i, (x, y) in enumerate(kps):
        xi, yi = int(round(x)), int(round(y))
        img[yi - r:yi + r + 1, xi - r:xi + r + 1] = (250, 120 + 20 * i, 10)
    return img, kps


class FakeDetector:
    """Stands in for SCRFD: faces given in relative coordinates, answers in the pixels it is shown."""

    def __init__(self, faces_rel):
        self.faces_rel = faces_rel  # list of (box_rel (4,), kps_rel (5, 2), score)
        self.seen = []

    def detect(self, img, max_num=0, metric="default"):
        h, w = img.shape[:2]
        self.seen.append(img)
        if not self.faces_rel:
            return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
        scale = np.array([w, h])
        boxes = np.array([[*(np.asarray(b) * np.tile(scale, 2)), s] for b, _, s in self.faces_rel], np.float32)
        # keypoints: pixel centres, relative to the full extent
        kps = np.stack([(np.asarray(k) * scale) - 0.5 for _, k, _ in self.faces_rel]).astype(np.float32)
        return boxes, kps


def _rel_face(img_w, img_h, kps, box):
    return (np.asarray(box) / np.array([img_w, img_h, img_w, img_h]), (np.asarray(kps) + 0.5) / [img_w, img_h], 0.9)


# --------------------------------------------------------------------------------------
# read_image
# --------------------------------------------------------------------------------------
def test_truncated_jpeg(tmp_path):
    p = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt") as ei:
        read_image(p)
    assert "\n" not in str(ei.value) and str(p) in str(ei.value)


def test_text_file_named_jpg_and_missing(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("hello, I am not a JPEG\n")
    with pytest.raises(ImageError, match="not an image file"):
        read_image(p)
    with pytest.raises(ImageError, match="file not found"):
        read_image(tmp_path / "absent.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError):
        read_image(tmp_path / "empty.png")


def test_16bit_png_scaled_to_8bit(tmp_path):
    arr = np.array([[0, 257 * 128, 65535, 1000]], dtype=np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(arr).save(p)
    out = read_image(p)
    assert out.dtype == np.uint8 and out.shape == (1, 4, 3)
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255, 4])
    assert (out[..., 0] == out[..., 2]).all()


def test_rgba_composited_on_white_and_grayscale(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)    # opaque red
    rgba[0, 1] = (0, 0, 255, 0)      # fully transparent -> white
    rgba[1, 0] = (0, 0, 0, 128)      # half-transparent black -> mid grey
    p = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(p)
    out = read_image(p)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
    assert abs(int(out[1, 0, 0]) - 127) <= 1
    g = tmp_path / "gray.png"
    Image.fromarray(np.array([[0, 100, 200]], np.uint8), "L").save(g)
    np.testing.assert_array_equal(read_image(g)[0], [[0, 0, 0], [100, 100, 100], [200, 200, 200]])
    pal = tmp_path / "pal.bmp"
    Image.fromarray(np.array([[0, 100, 200]], np.uint8), "L").convert("P").save(pal)
    assert read_image(pal).shape == (1, 3, 3)


def test_exif_rotation_applied(tmp_path):
    arr = np.zeros((30, 60, 3), np.uint8)
    arr[:10, :10] = 255  # marker in the stored top-left corner
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    p = tmp_path / "rotated.jpg"
    img.save(p, exif=exif, quality=95)
    out = read_image(p)
    assert out.shape == (60, 30, 3)
    assert out[:10, -10:].mean() > 200 and out[-10:, :10].mean() < 50  # marker now top-right


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".webp", ".tif"])
def test_formats(tmp_path, ext):
    if ext == ".webp" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    arr = np.full((20, 30, 3), (200, 100, 50), np.uint8)
    p = tmp_path / f"x{ext}"
    Image.fromarray(arr).save(p, **({"quality": 100} if ext in (".jpg", ".webp") else {}))
    out = read_image(p)
    assert out.shape == (20, 30, 3)
    assert np.abs(out.astype(int) - arr).max() <= 3


def test_tiny_image_refused(tmp_path):
    p = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p)
    assert read_image(p).shape == (8, 8, 3)
    with pytest.raises(ImageError, match=r"too small \(8x8 px"):
        prepare_face(p, FakeDetector([]))


# --------------------------------------------------------------------------------------
# prepare_face
# --------------------------------------------------------------------------------------
def test_sidecar_txt_and_npy(tmp_path):
    m = _similarity(2.0, 0.2, 120.0, 40.0)
    img, kps = _face_image(400, 320, m)
    kps = np.round(kps, 2)  # exactly representable in both sidecar formats below
    p = tmp_path / "photo.png"
    Image.fromarray(img).save(p)
    (tmp_path / "photo.kps.txt").write_text("\n".join(f"{x:.4f} {y:.4f}" for x, y in kps) + "\n")
    face = prepare_face(p, channel_order="rgb")
    assert face.source == "sidecar" and face.n_faces == 1 and face.score is None
    np.testing.assert_allclose(face.kps, kps, atol=1e-3)
    assert face.arcface.shape == (3, 112, 112) and face.arcface.dtype == np.float32
    assert face.farl_crop.shape == (224, 224, 3) and face.farl_crop.dtype == np.uint8
    assert face.arcface.min() >= -1.0 and face.arcface.max() <= 1.0
    # keypoints land on the ArcFace template: red channel bright there (RGB order)
    for x, y in ARCFACE_TEMPLATE:
        assert face.arcface[0, int(round(y)), int(round(x))] > 0.9
    # in the FaRL crop the keypoints sit where the crop matrix says
    for x, y in transform_points(farl_crop_matrix(face.box), kps):
        assert face.farl_crop[int(round(y)), int(round(x)), 0] > 230
    # .npy sidecar, BGR blob = reversed channels
    (tmp_path / "photo.kps.txt").unlink()
    np.save(tmp_path / "photo.kps.npy", kps)
    face_bgr = prepare_face(p)
    assert face_bgr.channel_order == "bgr"
    np.testing.assert_array_equal(face_bgr.arcface, face.arcface[::-1])


def test_bad_sidecar(tmp_path):
    p = tmp_path / "photo.jpg"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(p)
    (tmp_path / "photo.kps.txt").write_text("1 2\n3 4\n")
    with pytest.raises(ImageError, match=r"photo.kps.txt: expected 5 keypoints"):
        prepare_face(p)
    (tmp_path / "photo.kps.txt").write_text("a b\n" * 5)
    with pytest.raises(ImageError, match="expected 5 lines"):
        read_sidecar_kps(p)


def test_no_detector_no_sidecar_message(tmp_path):
    p = tmp_path / "photo.jpg"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(p)
    with pytest.raises(ImageError, match="no keypoints: give a detector") as ei:
        prepare_face(p)
    assert "\n" not in str(ei.value)


def test_aligned_112_input_is_used_as_is(tmp_path):
    yy, xx = np.mgrid[0:112, 0:112] / 112.0
    arr = np.stack([128 + 100 * np.sin(3 * xx + c) * np.cos(2 * yy) for c in range(3)], -1).astype(np.uint8)
    p = tmp_path / "crop.png"
    Image.fromarray(arr).save(p)
    face = prepare_face(p, aligned=True, channel_order="rgb")
    assert face.source == "aligned"
    np.testing.assert_array_equal(face.arcface, arcface_blob(arr, "rgb"))
    big = tmp_path / "crop224.png"
    Image.fromarray(np.repeat(np.repeat(arr, 2, 0), 2, 1)).save(big)
    face2 = prepare_face(big, aligned=True, channel_order="rgb")
    # 2x2 upsampled copy: the same picture, up to the template's quarter-pixel offset at 224
    np.testing.assert_allclose(face2.arcface[:, 1:-1, 1:-1], face.arcface[:, 1:-1, 1:-1], atol=0.05)
    odd = tmp_path / "odd.png"
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(odd)
    with pytest.raises(ImageError, match="multiple of 112"):
        prepare_face(odd, aligned=True)


def test_detector_gets_bgr_and_centre_face_is_chosen(tmp_path):
    w, h = 640, 360
    m_centre = _similarity(1.5, 0.0, 320 - 56 * 1.5, 180 - 64 * 1.5)
    img, kps_c = _face_image(w, h, m_centre)
    kps_side = transform_points(_similarity(1.0, 0.0, 10.0, 10.0), ARCFACE_TEMPLATE)
    faces = [
        _rel_face(w, h, kps_side, (10, 10, 110, 130)),                # corner face, higher score
        _rel_face(w, h, kps_c, (260, 100, 380, 260)),                 # centre face
        _rel_face(w, h, kps_side + [0, 200], (10, 210, 110, 330)),    # nearest to the swapped centre (180, 320)
    ]
    faces[0] = (faces[0][0], faces[0][1], 0.99)
    det = FakeDetector(faces)
    p = tmp_path / "group.jpg"
    Image.fromarray(img).save(p, quality=95)
    face = prepare_face(p, det, channel_order="rgb")
    assert face.source == "detector" and face.n_faces == 3 and face.score == pytest.approx(0.9)
    np.testing.assert_allclose(face.kps, kps_c, atol=1e-3)
    np.testing.assert_allclose(face.box, (260, 100, 380, 260), atol=1e-3)
    assert any("3 faces" in n for n in face.notes)
    seen = det.seen[0]
    assert seen.shape == (h, w, 3)
    # the detector got BGR: the red dots are in channel 2
    x, y = np.round(kps_c[0]).astype(int)
    assert seen[y, x, 2] > 200 and seen[y, x, 0] < 60


def test_no_face(tmp_path):
    p = tmp_path / "wall.png"
    Image.fromarray(np.full((100, 120, 3), 128, np.uint8)).save(p)
    with pytest.raises(ImageError, match="no face found"):
        prepare_face(p, FakeDetector([]))


def test_huge_image_detects_downscaled_crops_full_resolution(tmp_path):
    w, h = 6000, 4000
    scale = 12.0  # eye distance ~420 px
    m = _similarity(scale, 0.1, 3000 - 56 * scale, 2000 - 64 * scale)
    img, kps = _face_image(w, h, m)
    p = tmp_path / "huge.jpg"
    Image.fromarray(img).save(p, quality=90)
    det = FakeDetector([_rel_face(w, h, kps, (2500, 1300, 3500, 2700))])
    face = prepare_face(p, det, channel_order="rgb")
    assert max(det.seen[0].shape[:2]) == 1600
    np.testing.assert_allclose(face.kps, kps, atol=0.05)
    np.testing.assert_allclose(face.box, (2500, 1300, 3500, 2700), atol=0.05)
    for x, y in ARCFACE_TEMPLATE:  # the keypoints land on the template in the full-resolution crop
        assert face.arcface[0, int(round(y)), int(round(x))] > 0.8
    # antialiasing: the background between dots stays flat (no aliasing speckle)
    assert np.abs(face.arcface[:, 5:30, 5:30] - face.arcface[:, 5:30, 5:30].mean()).max() < 0.05


def test_iter_images_sorted_and_filtered(tmp_path):
    for rel in ["b/2.JPG", "a/1.png", "a/notes.txt", "a/.hidden.png", "c.webp", "out/x.jpg"]:
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"")
    got = [q.relative_to(tmp_path).as_posix() for q in iter_images(tmp_path, exclude=tmp_path / "out")]
    assert got == ["c.webp", "a/1.png", "b/2.JPG"] or got == ["a/1.png", "b/2.JPG", "c.webp"]


def test_multi_face_sidecar_round_trip(tmp_path):
    from ofer.data.images import prepare_faces, read_sidecar_faces, write_sidecar_kps

    w, h = 640, 360
    left = transform_points(_similarity(1.0, 0.0, 40.0, 100.0), ARCFACE_TEMPLATE)
    right = transform_points(_similarity(1.5, 0.1, 420.0, 80.0), ARCFACE_TEMPLATE)
    centre = transform_points(_similarity(1.2, 0.0, 250.0, 90.0), ARCFACE_TEMPLATE)
    p = tmp_path / "group.png"
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(p)
    side = write_sidecar_kps(p, np.stack([right, left, centre]), comment="three faces\nby hand")
    assert side == tmp_path / "group.kps.txt" and side.read_text().startswith("# three faces\n# by hand\n")
    np.testing.assert_allclose(read_sidecar_faces(p), np.stack([right, left, centre]), atol=0.005)
    with pytest.raises(ImageError, match="holds 3 faces, expected one"):
        read_sidecar_kps(p)
    faces = prepare_faces(p)  # every face, left to right
    assert [f.face_index for f in faces] == [0, 1, 2] and all(f.n_faces == 3 for f in faces)
    for f, ref in zip(faces, (left, centre, right)):
        np.testing.assert_allclose(f.kps, ref, atol=0.005)
        assert f.source == "sidecar" and f.detector is None
    np.testing.assert_allclose(prepare_face(p).kps, centre, atol=0.005)
    np.testing.assert_allclose(prepare_face(p, which="largest").kps, right, atol=0.005)
    with pytest.raises(ValueError, match="for one face"):
        prepare_face(p, which="all")
    side.write_text("1 2\n" * 7)
    with pytest.raises(ImageError, match="expected 5 keypoints .* per face"):
        read_sidecar_faces(p)
