"""5-point alignment, the two face crops, and which detected face to use.

Geometry only; reading files is :mod:`ofer.data.images`. All image arrays here are
``(H, W, 3)`` uint8 **RGB** unless a name says otherwise, and 2-D points are ``(x, y)`` in
pixels with integer coordinates at pixel centres (the OpenCV / scikit-image convention).

Two crops are made per face, as OFER's ``arcface_process.py`` does:

* **ArcFace input** (112x112): the least-squares similarity (Umeyama, no reflection) that maps
  the 5 keypoints onto insightface's ArcFace template, then bilinear warping with a zero
  border (``insightface.utils.face_align.norm_crop`` = skimage ``SimilarityTransform`` +
  ``cv2.warpAffine``). :func:`arcface_blob` turns it into ``(3, 112, 112)`` float32
  ``(pixel - 127.5) / 127.5`` in the requested channel order.
* **FaRL crop** (224x224): the square of side ``int(1.6 * (w + h) / 2)`` around the face-box
  centre, mapped onto ``(0, 0)-(223, 223)`` (bilinear, zero border).

Keypoint order (insightface): image-left eye, image-right eye, nose tip, image-left mouth
corner, image-right mouth corner.

Channel order of the ArcFace blob. MICA feeds **RGB** (``cv2.imread`` gives BGR and
``blobFromImages(swapRB=True)`` flips it). OFER's script reads with skimage (RGB) and then
flips with the same call, so the ``.npy`` files it ships and its checkpoints were made
with **BGR** blobs. Use ``channel_order="bgr"`` with OFER checkpoints (the default here) and
``"rgb"`` with MICA weights.

The warp is computed in floating point by default; OpenCV rounds sample positions to 1/32
pixel, which moves about one pixel in ten by a grey level or more on sharp images.
``grid="opencv"`` (:func:`warp_affine`) samples on OpenCV's grid instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from ..errors import AssetError, OferError
from ..geometry import umeyama as _similarity_fit

__all__ = [
    "ARCFACE_TEMPLATE",
    "kps_from_landmarks68",
    "FARL_SCALE",
    "CANONICAL_BOX",
    "Detector",
    "umeyama",
    "estimate_norm",
    "WARP_GRIDS",
    "warp_affine",
    "norm_crop",
    "arcface_blob",
    "farl_crop_matrix",
    "farl_crop",
    "box_from_kps",
    "select_center_face",
    "FACE_CHOICES",
    "choose_faces",
    "transform_points",
]

#: insightface ArcFace 5-point template for a 112x112 crop (x, y).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)

#: The FaRL crop side is this times the mean of the face box's width and height (OFER, MICA).
FARL_SCALE = 1.6

#: Face box (left, top, right, bottom) in ArcFace-template coordinates used when only the 5
#: points are known (sidecar files, pre-aligned crops). 74 px wide (2.1 eye distances) and
#: 94 px tall (brows to chin), centred on x = 56; chosen to approximate SCRFD boxes on
#: frontal faces, so that crops made from sidecars frame the face like detector crops.
CANONICAL_BOX = np.array([19.0, 20.0, 93.0, 114.0])

#: iBUG-68 indices grouped into the five keypoints (a group's points are averaged)
_KPS_GROUPS_68 = (tuple(range(36, 42)), tuple(range(42, 48)), (30,), (48,), (54,))


def kps_from_landmarks68(lmk: np.ndarray) -> np.ndarray:
    """The five keypoints of iBUG-68 landmarks ``(..., 68, D) -> (..., 5, D)`` (2-D or 3-D).

    Order as above: image-left eye (mean of 36..41, the subject's right eye), image-right eye
    (mean of 42..47), nose tip (30), image-left mouth corner (48), image-right mouth corner (54).
    """
    lmk = np.asarray(lmk)
    return np.stack([lmk[..., list(g), :].mean(-2) for g in _KPS_GROUPS_68], axis=-2)


# --------------------------------------------------------------------------------------
# Similarity transforms
# --------------------------------------------------------------------------------------
def umeyama(src: np.ndarray, dst: np.ndarray, estimate_scale: bool = True) -> np.ndarray:
    """Least-squares similarity ``dst ~ s R src + t`` without reflection, as a matrix.

    A thin wrapper of :func:`ofer.geometry.umeyama` (Umeyama 1991) in homogeneous form.

    Args:
        src: ``(N, D)`` source points.
        dst: ``(N, D)`` destination points.
        estimate_scale: fit ``s``; otherwise ``s = 1`` (rigid).

    Returns:
        ``(D + 1, D + 1)`` float64 homogeneous matrix mapping src to dst. Degenerate input
        (all source points, or all destination points, at one place) gives a matrix of NaNs.
    """
    s, R, t = _similarity_fit(src, dst, with_scale=estimate_scale)
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    dim = src.shape[1]
    if np.all(src == src[:1]) or np.all(dst == dst[:1]):
        return np.full((dim + 1, dim + 1), np.nan)
    m = np.eye(dim + 1)
    m[:dim, :dim] = s * R
    m[:dim, dim] = t
    return m


def estimate_norm(kps: np.ndarray, image_size: int = 112) -> np.ndarray:
    """``(2, 3)`` similarity mapping 5 keypoints onto the ArcFace template for ``image_size``.

    ``image_size`` must be a multiple of 112 (the template is scaled by ``image_size / 112``).
    """
    kps = np.asarray(kps, dtype=np.float64)
    if kps.shape != (5, 2):
        raise ValueError(f"expected 5 keypoints of shape (5, 2), got {kps.shape}")
    if image_size % 112:
        raise ValueError(f"ArcFace crops need a size that is a multiple of 112, got {image_size}")
    m = umeyama(kps, ARCFACE_TEMPLATE * (image_size / 112.0))
    if not np.all(np.isfinite(m)):
        raise ValueError("degenerate keypoints (all at one point): cannot align")
    return m[:2]


def transform_points(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply a ``(2, 3)`` affine matrix to ``(N, 2)`` points."""
    pts = np.asarray(pts, dtype=np.float64)
    return pts @ m[:, :2].T + m[:, 2]


def _invert_affine(m: np.ndarray) -> np.ndarray:
    full = np.vstack([np.asarray(m, dtype=np.float64), [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


# --------------------------------------------------------------------------------------
# Warping
# --------------------------------------------------------------------------------------
#: How :func:`warp_affine` places its samples: ``"float"`` (exact positions and weights) or
#: ``"opencv"`` (``cv2.warpAffine``'s fixed point, the released ArcFace crop).
WARP_GRIDS = ("float", "opencv")

#: ``cv2.warpAffine`` rounds sample positions to ``1 / 2**_CV_INTER_BITS`` px after summing
#: terms rounded to ``1 / 2**_CV_AB_BITS`` px.
_CV_INTER_BITS = 5
_CV_AB_BITS = 10


def _opencv_positions(inv: np.ndarray, out_w: int, out_h: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample positions of ``cv2.warpAffine`` (bilinear): the row term and the column term are
    each rounded to 1/1024 px (to nearest, ties to even), summed, and floored to 1/32 px after
    adding half a step."""
    ab = float(1 << _CV_AB_BITS)
    shift = _CV_AB_BITS - _CV_INTER_BITS
    half = 1 << (shift - 1)
    xs = np.arange(out_w, dtype=np.float64)
    ys = np.arange(out_h, dtype=np.float64)
    pos = []
    for r in range(2):
        col = np.rint(inv[r, 0] * xs * ab).astype(np.int64)
        row = np.rint((inv[r, 1] * ys + inv[r, 2]) * ab).astype(np.int64)
        fixed = (row[:, None] + col[None, :] + half) >> shift
        pos.append(fixed.astype(np.float64) / (1 << _CV_INTER_BITS))
    return pos[0], pos[1]


def warp_affine(image: np.ndarray, m: np.ndarray, size: int | tuple[int, int],
                border_value: float = 0.0, grid: str = "float") -> np.ndarray:
    """Bilinear affine warp with a constant border, the semantics of ``cv2.warpAffine``.

    Output pixel ``(x, y)`` takes the bilinear sample of ``image`` at ``M^-1 (x, y, 1)``;
    neighbours outside the image count as ``border_value``.

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` array (any numeric dtype).
        m: ``(2, 3)`` matrix mapping image coordinates to output coordinates.
        size: output side, or ``(width, height)``.
        border_value: value outside the image.
        grid: ``"float"``: positions and weights in floating point; ``"opencv"``: positions on
            OpenCV's 1/32 px grid with its rounding (weights are then multiples of 1/1024,
            exact in float, and integer outputs round halves up), which reproduces
            ``cv2.warpAffine(..., INTER_LINEAR)`` on uint8 images.

    Returns:
        Array of shape ``(h, w[, C])``, the dtype of ``image`` (integers rounded and clipped).
    """
    if grid not in WARP_GRIDS:
        raise ValueError(f"grid must be one of {WARP_GRIDS}, got {grid!r}")
    img = np.asarray(image)
    squeeze = img.ndim == 2
    if squeeze:
        img = img[..., None]
    if img.ndim != 3:
        raise ValueError(f"warp_affine expects (H, W) or (H, W, C), got {img.shape}")
    out_w, out_h = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    h, w, c = img.shape
    inv = _invert_affine(m)
    if grid == "opencv":
        sx, sy = _opencv_positions(inv, out_w, out_h)
    else:
        ys, xs = np.mgrid[0:out_h, 0:out_w].astype(np.float64)
        sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
        sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    wdt = np.float64 if grid == "opencv" else np.float32
    # Pad by two pixels of border and clamp the sample positions into the padded frame: a
    # far-away sample then lands on border pixels only, so every tap is a valid flat index.
    pad = np.full((h + 4, w + 4, c), border_value, dtype=wdt)
    pad[2:-2, 2:-2] = img
    flat = pad.reshape(-1, c)
    sx = np.clip(sx + 2.0, 0.0, w + 2.0)
    sy = np.clip(sy + 2.0, 0.0, h + 2.0)
    x0 = np.floor(sx)
    y0 = np.floor(sy)
    fx = (sx - x0).astype(wdt).reshape(-1, 1)
    fy = (sy - y0).astype(wdt).reshape(-1, 1)
    i00 = (y0.astype(np.int64) * (w + 4) + x0.astype(np.int64)).reshape(-1)
    top = flat[i00] * (1 - fx) + flat[i00 + 1] * fx
    bottom = flat[i00 + (w + 4)] * (1 - fx) + flat[i00 + (w + 5)] * fx
    out = (top * (1 - fy) + bottom * fy).reshape(out_h, out_w, c)
    if np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
        out = np.clip(np.floor(out + 0.5) if grid == "opencv" else np.rint(out), info.min, info.max)
    out = out.astype(img.dtype)
    return out[..., 0] if squeeze else out


def norm_crop(image: np.ndarray, kps: np.ndarray, image_size: int = 112, grid: str = "float") -> np.ndarray:
    """ArcFace-aligned crop ``(image_size, image_size, C)`` of ``image`` (same dtype; ``grid``
    as :func:`warp_affine`)."""
    return warp_affine(image, estimate_norm(kps, image_size), image_size, grid=grid)


def arcface_blob(aligned: np.ndarray, channel_order: str = "bgr") -> np.ndarray:
    """``(112, 112, 3)`` uint8 RGB crop -> ``(3, 112, 112)`` float32 ``(p - 127.5) / 127.5``.

    Args:
        aligned: the aligned crop in RGB.
        channel_order: ``"bgr"`` (OFER's shipped ``.npy`` files and checkpoints) or
            ``"rgb"`` (MICA, insightface).
    """
    if channel_order not in ("rgb", "bgr"):
        raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
    a = np.asarray(aligned)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"arcface_blob expects an (H, W, 3) RGB crop, got {a.shape}")
    if channel_order == "bgr":
        a = a[..., ::-1]
    return ((a.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1).copy()


def farl_crop_matrix(box: Sequence[float], out_size: int = 224, scale: float = FARL_SCALE) -> np.ndarray:
    """``(2, 3)`` matrix of OFER's FaRL crop for a face box ``(left, top, right, bottom)``.

    Side ``int(scale * ((r - l) + (b - t)) / 2)`` around the box centre, mapped so that the
    square's corners land on ``0`` and ``out_size - 1``.
    """
    l, t, r, b = (float(v) for v in box[:4])
    size = int(((r - l) + (b - t)) / 2.0 * scale)
    if size <= 0:
        raise ValueError(f"face box {tuple(box[:4])} is empty")
    cx, cy = r - (r - l) / 2.0, b - (b - t) / 2.0
    s = (out_size - 1) / float(size)
    return np.array([[s, 0.0, -(cx - size / 2.0) * s], [0.0, s, -(cy - size / 2.0) * s]])


def farl_crop(image: np.ndarray, box: Sequence[float], out_size: int = 224) -> np.ndarray:
    """The 224x224 FaRL crop (same dtype as ``image``) for a face box."""
    return warp_affine(image, farl_crop_matrix(box, out_size), out_size)


def box_from_kps(kps: np.ndarray) -> np.ndarray:
    """Face box ``(left, top, right, bottom)`` derived from 5 keypoints.

    The keypoints are aligned to the ArcFace template (similarity); :data:`CANONICAL_BOX` is
    mapped back to the image with the inverse transform, and the axis-aligned box with the
    mapped centre and side lengths ``(74, 94) / scale`` is returned (in-plane rotation does
    not inflate it).
    """
    m = estimate_norm(kps, 112)
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    centre_t = np.array([[(CANONICAL_BOX[0] + CANONICAL_BOX[2]) / 2, (CANONICAL_BOX[1] + CANONICAL_BOX[3]) / 2]])
    cx, cy = transform_points(_invert_affine(m), centre_t)[0]
    hw = (CANONICAL_BOX[2] - CANONICAL_BOX[0]) / 2 / scale
    hh = (CANONICAL_BOX[3] - CANONICAL_BOX[1]) / 2 / scale
    return np.array([cx - hw, cy - hh, cx + hw, cy + hh])


# --------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------
class Detector(Protocol):
    """What :func:`ofer.data.images.prepare_face` needs from a detector (insightface's interface).

    ``detect(img_bgr (H, W, 3) uint8, max_num=0, metric="default")`` returns
    ``(boxes (N, 5) [l, t, r, b, score], kps (N, 5, 2) or None)``.
    """

    def detect(self, img: np.ndarray, max_num: int = 0, metric: str = "default") -> tuple[Any, Any]: ...


def select_center_face(boxes: np.ndarray, image_shape: Sequence[int]) -> int:
    """Index of the box whose centre is closest to the image centre.

    ``image_shape`` is ``(H, W[, C])``. Compares ``(x, y)`` box centres with ``(W / 2, H / 2)``
    (the original compared them with ``(H / 2, W / 2)``, swapping the axes on non-square
    images). Ties go to the first box.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[0] == 0:
        raise ValueError("select_center_face needs at least one box")
    h, w = float(image_shape[0]), float(image_shape[1])
    cx = (boxes[:, 0] + boxes[:, 2]) / 2.0
    cy = (boxes[:, 1] + boxes[:, 3]) / 2.0
    return int(np.argmin((cx - w / 2.0) ** 2 + (cy - h / 2.0) ** 2))


#: Which detected faces :func:`choose_faces` returns.
FACE_CHOICES = ("center", "largest", "all")

#: Faces whose box side is below this fraction of the largest face's are not candidates.
MIN_RELATIVE_SIZE = 0.5


def choose_faces(boxes: np.ndarray, image_shape: Sequence[int], which: str = "center",
                 min_relative_size: float = MIN_RELATIVE_SIZE) -> list[int]:
    """Indices of the faces to use among a detector's boxes ``(N, 4+)`` (left, top, right, bottom).

    The detector has already dropped faces below its score threshold. ``"center"``: among the
    faces of a reasonable size (box side ``sqrt(width * height)`` at least
    ``min_relative_size`` times the largest face's, so that a small background face or false
    detection near the middle does not win), the one whose box centre is nearest the image
    centre (:func:`select_center_face`); ``"largest"``: the largest box; ``"all"``: every
    face, from left to right (box centres, ties by height). An empty list when there are no
    boxes.
    """
    if which not in FACE_CHOICES:
        raise ValueError(f"which must be one of {FACE_CHOICES}, got {which!r}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(len(boxes), -1) if len(boxes) else np.zeros((0, 4))
    if boxes.shape[0] == 0:
        return []
    side = np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None))
    if which == "largest":
        return [int(np.argmax(side))]
    if which == "center":
        cand = np.flatnonzero(side >= min_relative_size * side.max())
        return [int(cand[select_center_face(boxes[cand], image_shape)])]
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2.0, (boxes[:, 1] + boxes[:, 3]) / 2.0
    return [int(i) for i in np.lexsort((cy, cx))]
