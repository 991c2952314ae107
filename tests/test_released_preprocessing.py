"""The released preprocessing choices against the libraries the original called.

The released ``arcface_process.py`` made the ArcFace input with ``cv2.warpAffine`` (bilinear,
OpenCV 4's 1/32 px fixed point) and the FaRL crop with scikit-image's ``warp`` (float
bilinear), without prefiltering, and wrote the crop as a quality-95 JPEG. Here both are made
by OpenCV and scikit-image themselves, on a small and a large face, and compared with
``prepare_faces_array(antialias=False, warp="opencv")``.
"""

from __future__ import annotations

import numpy as np
import pytest

from ofer.data.align import ARCFACE_TEMPLATE, warp_affine
from ofer.data.images import jpeg_round_trip, prepare_faces_array

cv2 = pytest.importorskip("cv2")
transform = pytest.importorskip("skimage.transform")

# OpenCV 5 samples warpAffine in floating point; the released pipeline ran OpenCV 4.
needs_cv4 = pytest.mark.skipif(int(cv2.__version__.split(".")[0]) >= 5,
                               reason="the released fixed-point warpAffine is OpenCV 4's")


def _photo(h: int = 800, w: int = 1000, seed: int = 0) -> np.ndarray:
    """A sharp textured test image: blurred noise with hard-edged bars."""
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur((rng.random((h, w, 3)) * 255).astype(np.uint8), (0, 0), 0.8)
    for k in range(0, w, 37):
        img[:, k:k + 3] = (k * 7) % 256
    return img


def _kps(eye_distance: float, centre=(520.0, 390.0), angle: float = 0.15) -> np.ndarray:
    t = (ARCFACE_TEMPLATE - ARCFACE_TEMPLATE.mean(0)) * eye_distance / 35.24
    c, s = np.cos(angle), np.sin(angle)
    return t @ np.array([[c, s], [-s, c]]) + np.array(centre)


def _reference_arcface(img: np.ndarray, kps: np.ndarray) -> np.ndarray:
    tf = transform.estimate_transform("similarity", kps, ARCFACE_TEMPLATE)
    aimg = cv2.warpAffine(img, tf.params[:2], (112, 112), borderValue=0.0)
    return ((aimg[..., ::-1].astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)


def _reference_farl(img: np.ndarray, box: np.ndarray) -> np.ndarray:
    l, t, r, b = box
    size = int((r - l + b - t) / 2 * 1.6)
    cx, cy = r - (r - l) / 2.0, b - (b - t) / 2.0
    src = np.array([[cx - size / 2, cy - size / 2], [cx - size / 2, cy + size / 2], [cx + size / 2, cy - size / 2]])
    dst = np.array([[0, 0], [0, 223], [223, 0]])
    tf = transform.estimate_transform("similarity", src, dst)
    out = transform.warp(img / 255.0, tf.inverse, output_shape=(224, 224))
    return np.clip(np.rint(out.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)


def _agree(a: np.ndarray, b: np.ndarray, step: float) -> float:
    """Fraction of values within one grey level (``step`` is one level in these units)."""
    return float(np.mean(np.abs(a.astype(np.float64) - b.astype(np.float64)) <= step * 1.001))


@needs_cv4
@pytest.mark.parametrize("eye_distance", [24.0, 260.0], ids=["small", "large"])
def test_released_crops_match_opencv_and_skimage(eye_distance):
    img = _photo()
    kps = _kps(eye_distance)
    face = prepare_faces_array(img, kps=kps, antialias=False, warp="opencv")[0]
    assert _agree(face.arcface, _reference_arcface(img, kps), 1 / 127.5) >= 0.99
    ref_crop = _reference_farl(img, face.box.astype(np.float64))
    assert _agree(face.farl_crop, ref_crop, 1) >= 0.99
    # the default (prefiltered, float) crops are a different choice on the large face
    fast = prepare_faces_array(img, kps=kps)[0]
    if eye_distance > 100:
        assert _agree(fast.arcface, _reference_arcface(img, kps), 1 / 127.5) < 0.9


@needs_cv4
def test_opencv_grid_is_warpaffine_exactly():
    img = _photo(300, 400, seed=1)
    for scale, angle in [(0.12, 0.1), (0.5, -0.2), (1.7, 0.3)]:
        c, s = np.cos(angle) * scale, np.sin(angle) * scale
        m = np.array([[c, -s, -150 * scale + 10.3], [s, c, -120 * scale + 5.7]])
        ref = cv2.warpAffine(img, m, (112, 96), borderValue=0.0)
        assert np.array_equal(warp_affine(img, m, (112, 96), grid="opencv"), ref)
        # the float grid differs on a share of the pixels, by at most a level or so
        assert not np.array_equal(warp_affine(img, m, (112, 96)), ref)


def test_farl_jpeg_matches_a_released_style_file():
    """The crop's JPEG round trip stays within a grey level or two of OpenCV's quality-95 file
    read back by PIL (the released ``cv2.imwrite`` then ``Image.open``)."""
    from PIL import Image
    import io

    img = _photo(400, 500)
    face = prepare_faces_array(img, kps=_kps(60.0, centre=(250.0, 200.0)), antialias=False, warp="opencv")[0]
    ok, enc = cv2.imencode(".jpg", np.ascontiguousarray(face.farl_crop[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    ref = np.asarray(Image.open(io.BytesIO(enc.tobytes())).convert("RGB"))
    ours = jpeg_round_trip(face.farl_crop, 95)
    assert np.mean(np.abs(ours.astype(int) - ref) <= 1) >= 0.99
    again = prepare_faces_array(img, kps=_kps(60.0, centre=(250.0, 200.0)), antialias=False, warp="opencv",
                                farl_jpeg_quality=95)[0]
    assert np.array_equal(again.farl_crop, ours)
    assert not np.array_equal(ours, face.farl_crop)


def test_bad_warp_and_quality_are_refused():
    img = _photo(200, 200)
    with pytest.raises(ValueError, match="warp"):
        prepare_faces_array(img, kps=_kps(40.0, centre=(100.0, 100.0)), warp="nearest")
    with pytest.raises(ValueError, match="quality"):
        jpeg_round_trip(img[:32, :32], 0)


def test_sample_config_crop_options():
    from pathlib import Path

    from ofer.config import ConfigError, load_config
    from ofer.sample.config import SampleConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    fast = load_config(SampleConfig, root / "sample.yaml", [])
    assert fast.crop_options() == {"antialias": True, "warp": "float", "farl_jpeg_quality": None}
    faithful = load_config(SampleConfig, root / "sample_faithful.yaml", [])
    assert faithful.crop_options() == {"antialias": False, "warp": "opencv", "farl_jpeg_quality": 95}
    # keys override the preset; 0 turns the JPEG off
    mixed = load_config(SampleConfig, root / "sample.yaml",
                        ["preset=faithful", "preprocess.farl_jpeg_quality=0", "preprocess.antialias=true"])
    assert mixed.crop_options() == {"antialias": True, "warp": "opencv", "farl_jpeg_quality": None}
    with pytest.raises(ConfigError, match="farl_jpeg_quality"):
        load_config(SampleConfig, root / "sample.yaml", ["preprocess.farl_jpeg_quality=101"])
    with pytest.raises(ConfigError):
        load_config(SampleConfig, root / "sample.yaml", ["preprocess.warp=cubic"])
