"""Reading real-world image files and turning them into OFER's two face crops.

:func:`read_image` accepts what people actually have (JPEG, PNG, WebP, BMP, TIFF, GIF; EXIF
rotation; grayscale, palette, CMYK, RGBA, 16-bit) and returns an ``(H, W, 3)`` uint8 RGB array,
or raises :class:`~ofer.errors.ImageError` with a one-line reason (missing, not an image,
truncated, too small, too large).

:func:`prepare_face` finds the 5 facial keypoints (a sidecar file, pre-aligned input, or a
detector) and makes the ArcFace input and the FaRL crop (:class:`PreparedFace`). Every
failure is an ``ImageError``, so a batch loop can record the reason and go on.

Keypoint sources, in order:

1. ``kps=`` given by the caller;
2. ``aligned=True``: the image is a square ArcFace-aligned crop whose side is a multiple of
   112 (``norm_crop`` output: 112, 224, ...); its keypoints are the template scaled to it;
3. a sidecar next to the image: ``photo.kps.txt`` (5 lines ``x y`` per face) or
   ``photo.kps.npy`` (``(5, 2)`` or ``(K, 5, 2)`` float), in pixels of the image as displayed
   (after EXIF rotation), in insightface order (image-left eye, image-right eye, nose,
   image-left mouth corner, image-right mouth corner);
4. the detector (``detect`` interface of insightface's SCRFD; :mod:`ofer.data.detect`), run
   on a copy whose long side is at most ``detect_max_side``.

Which face (:func:`ofer.data.align.choose_faces`): among the faces of a reasonable size (box
side at least half the largest face's), the one whose box centre is closest to the image
centre (``which="center"``), the largest (``"largest"``), or every face from left to right
(``"all"``, :func:`prepare_faces`). Several sidecar faces are chosen among the same way.

Without a detector box (cases 1-3), the face box for the FaRL crop is
:func:`ofer.data.align.box_from_kps`.

:func:`write_face_crops` writes a prepared face as the two files of the ``arcface_input``
layout that the datasets read, ``<stem>.jpg`` (224 crop) and ``<stem>.npy`` (ArcFace input);
the preprocessing step and the synthetic world both write through it.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageError
from ..geometry import umeyama as similarity_fit
from .align import (
    ARCFACE_TEMPLATE,
    MIN_RELATIVE_SIZE,
    WARP_GRIDS,
    Detector,
    arcface_blob,
    box_from_kps,
    choose_faces,
    estimate_norm,
    farl_crop_matrix,
    warp_affine,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "PreparedFace",
    "read_image",
    "read_sidecar_kps",
    "read_sidecar_faces",
    "write_sidecar_kps",
    "sidecar_paths",
    "iter_images",
    "UNSUPPORTED_IMAGE_EXTENSIONS",
    "prepare_face",
    "prepare_face_array",
    "prepare_faces",
    "prepare_faces_array",
    "check_keypoints",
    "keypoint_residual",
    "file_notes",
    "jpeg_round_trip",
    "CROP_JPEG_QUALITY",
    "crop_file_paths",
    "write_face_crops",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pnm")

#: Images with more pixels than this are refused (a decompression bomb guard; 250 MP).
MAX_PIXELS = 250_000_000

#: Given keypoints (sidecars) are refused when their similarity fit to the 5-point ArcFace
#: template leaves an RMS residual above this, in pixels of the 112 px crop: real detections
#: fit within about 7.5 px, left/right or x/y swaps leave about 20 px, collinear points about 15.
MAX_KPS_RESIDUAL = 12.0


@dataclass
class PreparedFace:
    """The two network inputs made from one image.

    Attributes:
        arcface: ``(3, 112, 112)`` float32 in [-1, 1], channels in ``channel_order``.
        farl_crop: ``(224, 224, 3)`` uint8 RGB (OFER's 1.6x face-box crop).
        kps: ``(5, 2)`` float32 keypoints in pixels of the (EXIF-rotated) image.
        box: ``(4,)`` float32 face box ``(left, top, right, bottom)`` in the same pixels.
        score: detector score, or ``None`` when the keypoints came from elsewhere.
        source: ``"detector"``, ``"sidecar"``, ``"aligned"`` or ``"given"``.
        n_faces: faces found by the detector or in the sidecar (1 for the other sources).
        image_size: ``(height, width)`` of the image.
        channel_order: ``"bgr"`` or ``"rgb"``, the order of ``arcface``'s channels.
        path: the file, when read from one.
        notes: remarks for the user (several faces, keypoints outside the image).
        detector: what found the keypoints (the detector's ``description``), ``None`` otherwise.
        face_index: position among the faces :func:`prepare_faces` returned (left to right).
    """

    arcface: np.ndarray
    farl_crop: np.ndarray
    kps: np.ndarray
    box: np.ndarray
    score: float | None
    source: str
    n_faces: int
    image_size: tuple[int, int]
    channel_order: str
    path: Path | None = None
    notes: list[str] = field(default_factory=list)
    detector: str | None = None
    face_index: int = 0


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _to_uint8_rgb(img: Any) -> np.ndarray:
    """PIL image of any mode -> (H, W, 3) uint8 RGB."""
    from PIL import Image

    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        # 16-bit data (PNG/TIFF) spans 0..65535; 32-bit 'I' with small values is treated as 8-bit.
        peak = 65535.0 if (mode.startswith("I;16") or arr.max(initial=0) > 255) else 255.0
        gray = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        finite = arr[np.isfinite(arr)]
        peak = 1.0 if finite.size and finite.max() <= 1.0 else 255.0
        gray = np.clip(np.rint(np.nan_to_num(arr) * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def read_image(path: str | os.PathLike, min_side: int = 1) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB, with EXIF orientation applied.

    16-bit images are scaled to 8 bits (``/257``), transparent images are composited on
    white, animated files give their first frame.

    Raises:
        ImageError: one line: file missing, not an image, truncated / corrupt, smaller than
            ``min_side`` pixels, or larger than :data:`MAX_PIXELS`.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise ImageError(f"{p}: file not found")
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_PIXELS:
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow's own guard (89.5 MP) would refuse earlier
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise ImageError(f"{p}: image too large ({w}x{h} px; at most {MAX_PIXELS:,} px)")
                img.seek(0)
                img.load()
                try:
                    img = ImageOps.exif_transpose(img)
                except Exception:  # broken EXIF: keep the stored orientation
                    pass
                arr = _to_uint8_rgb(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{p}: not an image file (or an unsupported format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{p}: image too large ({_first_line(exc)})") from None
    except PermissionError as exc:
        raise ImageError(f"{p}: cannot read the file ({exc.strerror})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{p}: truncated or corrupt image ({_first_line(exc)})") from None
    if min(arr.shape[:2]) < min_side:
        raise ImageError(f"{p}: image too small ({arr.shape[1]}x{arr.shape[0]} px; at least {min_side} px needed)")
    return arr


def file_notes(path: str | os.PathLike) -> list[str]:
    """What a user should know about an image file that still decodes: data after the end of a
    JPEG (a damaged or concatenated file), or a JPEG without its end marker."""
    p = Path(path)
    if p.suffix.lower() not in (".jpg", ".jpeg"):
        return []
    try:
        data = p.read_bytes()
    except OSError:
        return []
    if not data.startswith(b"\xff\xd8"):
        return []
    end = data.rfind(b"\xff\xd9")
    if end < 0:
        return ["the JPEG data has no end marker: the file may be truncated"]
    extra = len(data) - (end + 2)
    return [f"{extra} bytes after the end of the JPEG data (ignored): the file may be damaged"] if extra else []


def keypoint_residual(kps: np.ndarray) -> float:
    """RMS distance, in pixels of the 112 px ArcFace crop, between ``kps (5, 2)`` mapped by its
    best similarity onto the template and the template (:data:`ARCFACE_TEMPLATE`)."""
    s, r, t = similarity_fit(np.asarray(kps, np.float64), ARCFACE_TEMPLATE)
    mapped = s * kps @ r.T + t
    return float(np.sqrt(np.mean(np.sum((mapped - ARCFACE_TEMPLATE) ** 2, axis=1))))


def check_keypoints(kps: np.ndarray, image_shape: tuple[int, ...], name: str,
                    max_residual: float | None = MAX_KPS_RESIDUAL) -> None:
    """Refuse given keypoints that cannot be a face of this image (one-line :class:`ImageError`).

    They must be finite, lie in the image (widened by half the face's size, for a face cut by
    the border) and, unless ``max_residual`` is None, fit the 5-point template within
    ``max_residual`` px (:func:`keypoint_residual`; catches left/right or x/y swaps).
    """
    h, w = image_shape[:2]
    for k, face in enumerate(np.asarray(kps, np.float64).reshape(-1, 5, 2)):
        which = f"face {k + 1}: " if len(kps) > 1 else ""
        if not np.all(np.isfinite(face)):
            raise ImageError(f"{name}: {which}the keypoints hold NaN or infinite coordinates")
        span = float(np.ptp(face, axis=0).max())
        lo, hi = face.min(axis=0), face.max(axis=0)
        if lo[0] < -span / 2 or lo[1] < -span / 2 or hi[0] > w + span / 2 or hi[1] > h + span / 2:
            raise ImageError(f"{name}: {which}the keypoints lie outside the {w}x{h} image")
        if max_residual is not None:
            res = keypoint_residual(face)
            if not res <= max_residual:
                raise ImageError(f"{name}: {which}the keypoints do not fit a face (left/right or x/y swapped, "
                                 f"or not 5 distinct points?): template residual {res:.1f} px at 112 px, at most "
                                 f"{max_residual:g} (config key 'max_kps_residual' relaxes it)")


def sidecar_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``photo.jpg`` -> ``(photo.kps.txt, photo.kps.npy)``."""
    p = Path(path)
    return p.with_suffix(".kps.txt"), p.with_suffix(".kps.npy")


def read_sidecar_faces(path: str | os.PathLike) -> np.ndarray | None:
    """All faces of the image's sidecar file, ``(K, 5, 2)``, or ``None`` when there is none.

    A ``.kps.txt`` holds 5 lines ``x y`` per face (blank lines and ``#`` comments are
    skipped); a ``.kps.npy`` a ``(5, 2)`` or ``(K, 5, 2)`` array.

    Raises:
        ImageError: the sidecar exists but is not 5 finite ``x y`` pairs per face.
    """
    txt, npy = sidecar_paths(path)
    if txt.is_file():
        src = txt
        try:
            rows = [line.replace(",", " ").split() for line in txt.read_text().splitlines()]
            rows = [r for r in rows if r and not r[0].startswith("#")]
            kps = np.array([[float(v) for v in r] for r in rows], dtype=np.float64)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ImageError(f"{txt}: expected 5 lines 'x y' ({_first_line(exc)})") from None
    elif npy.is_file():
        src = npy
        try:
            kps = np.asarray(np.load(npy, allow_pickle=False), dtype=np.float64)
        except (ValueError, OSError) as exc:
            raise ImageError(f"{npy}: not a (5, 2) float array ({_first_line(exc)})") from None
    else:
        return None
    ok = kps.ndim in (2, 3) and kps.shape[-1] == 2 and kps.size and (kps.size // 2) % 5 == 0
    if not ok:
        raise ImageError(f"{src}: expected 5 keypoints (5 rows of 'x y') per face, got shape {kps.shape}")
    if not np.all(np.isfinite(kps)):
        raise ImageError(f"{src}: the keypoints hold NaN or infinite coordinates")
    return kps.reshape(-1, 5, 2)


def read_sidecar_kps(path: str | os.PathLike) -> np.ndarray | None:
    """The 5 keypoints ``(5, 2)`` of the image's one-face sidecar file, or ``None`` when there is none.

    Raises:
        ImageError: the sidecar is malformed or holds several faces.
    """
    faces = read_sidecar_faces(path)
    if faces is None:
        return None
    if len(faces) != 1:
        raise ImageError(f"{sidecar_paths(path)[0]}: holds {len(faces)} faces, expected one")
    return faces[0]


def write_sidecar_kps(path: str | os.PathLike, kps: np.ndarray, comment: str | None = None) -> Path:
    """Write ``photo.kps.txt`` next to image ``path``: 5 lines ``x y`` per face, faces
    separated by a blank line, ``comment`` as ``#`` lines on top. Returns the sidecar's path."""
    from ..io import atomic_write_bytes

    faces = np.asarray(kps, dtype=np.float64).reshape(-1, 5, 2)
    lines = [f"# {c}" for c in (comment.splitlines() if comment else [])]
    for k, face in enumerate(faces):
        if k:
            lines.append("")
        lines += [f"{x:.2f} {y:.2f}" for x, y in face]
    out = sidecar_paths(path)[0]
    atomic_write_bytes(out, ("\n".join(lines) + "\n").encode())
    return out


#: Image formats the reader cannot take: :func:`iter_images` reports them instead of leaving them out.
UNSUPPORTED_IMAGE_EXTENSIONS = (".heic", ".heif", ".avif", ".jxl", ".jp2", ".dng", ".cr2", ".cr3", ".nef", ".arw",
                                ".raw", ".svg", ".psd")


def iter_images(root: str | os.PathLike, exclude: str | os.PathLike | None = None,
                skipped: list[tuple[Path, str]] | None = None) -> Iterator[Path]:
    """Image files under ``root`` (by extension, case-insensitive), sorted, skipping ``exclude``.

    With a ``skipped`` list, files of an unsupported image format
    (:data:`UNSUPPORTED_IMAGE_EXTENSIONS`) and folders that cannot be read are appended to it
    as ``(path, reason)``.
    """
    root = Path(root)
    if root.is_file():
        yield root
        return
    ex = Path(exclude).resolve() if exclude is not None else None

    def unreadable(err: OSError) -> None:
        if skipped is not None:
            skipped.append((Path(err.filename), f"cannot read folder: {err.strerror}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        d = Path(dirpath)
        dirnames.sort()
        if ex is not None:
            dirnames[:] = [n for n in dirnames if (d / n).resolve() != ex]
        for name in sorted(filenames):
            low = name.lower()
            if name.startswith("."):
                continue
            if low.endswith(IMAGE_EXTENSIONS):
                yield d / name
            elif skipped is not None and low.endswith(UNSUPPORTED_IMAGE_EXTENSIONS):
                skipped.append((d / name, f"unsupported image format {Path(low).suffix} (convert it to JPEG or PNG)"))


# --------------------------------------------------------------------------------------
# Cropping
# --------------------------------------------------------------------------------------
def _reduce_for_warp(image: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Box-filter ``image`` by an integer factor when ``m`` shrinks it more than 2x.

    Returns the (possibly) reduced image and the matrix adjusted to it. Bilinear sampling
    alone would alias (as ``cv2.warpAffine`` does) when a large face is warped to 112 px.
    """
    from PIL import Image

    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    k = int(1.0 / scale) if scale > 0 else 1
    if k < 2:
        return image, m
    small = np.asarray(Image.fromarray(image).reduce(k))
    # reduced pixel i covers original pixels k*i .. k*i+k-1, centred at k*i + (k-1)/2
    s = np.array([[k, 0.0, (k - 1) / 2.0], [0.0, k, (k - 1) / 2.0], [0.0, 0.0, 1.0]])
    return small, (np.vstack([m, [0, 0, 1]]) @ s)[:2]


def warp_crop(image: np.ndarray, m: np.ndarray, size: int, antialias: bool, grid: str = "float") -> np.ndarray:
    """The ``size`` x ``size`` crop of ``image`` under the 2x3 matrix ``m`` (image -> crop pixels),
    box-filtered first when ``antialias`` and the crop shrinks the image more than 2x."""
    if antialias:
        image, m = _reduce_for_warp(image, m)
    return warp_affine(image, m, size, grid=grid)


def jpeg_round_trip(crop: np.ndarray, quality: int) -> np.ndarray:
    """``crop`` ``(H, W, 3)`` uint8 RGB as it reads back from a JPEG of ``quality`` (Pillow's
    encoder, 4:2:0 chroma): what a model sees when the crop went through a file."""
    from PIL import Image

    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(crop)).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as img:
        return np.array(img.convert("RGB"), dtype=np.uint8)


def _detect(detector: Detector, image: np.ndarray, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    h, w = image.shape[:2]
    det_img = image
    if max(h, w) > max_side:
        factor = max_side / float(max(h, w))
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        det_img = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))
    boxes, kpss = detector.detect(np.ascontiguousarray(det_img[..., ::-1]), max_num=0, metric="default")
    boxes = np.zeros((0, 5)) if boxes is None else np.asarray(boxes, dtype=np.float64)
    boxes = boxes.reshape(-1, boxes.shape[-1]) if boxes.size else np.zeros((0, 5))
    if boxes.shape[0] and kpss is None:
        raise ImageError("the detector returned boxes without 5-point keypoints (use an SCRFD *_kps model)")
    kpss = np.zeros((0, 5, 2)) if kpss is None else np.asarray(kpss, dtype=np.float64).reshape(-1, 5, 2)
    if det_img is not image:
        # PIL's resize maps pixel centres: x_full = (x_small + 0.5) / f - 0.5 (box edges: x_small / f)
        f = np.array([det_img.shape[1] / float(w), det_img.shape[0] / float(h)])
        boxes = boxes.copy()
        boxes[:, 0:4] /= np.tile(f, 2)
        kpss = (kpss + 0.5) / f - 0.5
    return boxes, kpss


_CHOICE_NOTES = {"center": "used the one nearest the image centre", "largest": "used the largest"}


def _one_face(image: np.ndarray, kps: np.ndarray, box: np.ndarray | None, name: str, channel_order: str,
              antialias: bool, warp: str = "float",
              farl_jpeg_quality: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(arcface blob, FaRL crop, kps, box, notes) of one face."""
    h, w = image.shape[:2]
    kps = np.asarray(kps, dtype=np.float64)
    if kps.shape != (5, 2) or not np.all(np.isfinite(kps)):
        raise ImageError(f"{name}: keypoints must be a finite (5, 2) array, got {kps.shape}")
    try:
        m112 = estimate_norm(kps, 112)
        if box is None:
            box = box_from_kps(kps)
        m224 = farl_crop_matrix(box, 224)
    except ValueError as exc:
        raise ImageError(f"{name}: unusable keypoints ({_first_line(exc)})") from None
    notes = []
    inside = (kps[:, 0] >= -0.5) & (kps[:, 0] <= w - 0.5) & (kps[:, 1] >= -0.5) & (kps[:, 1] <= h - 0.5)
    if not inside.all():
        if not inside.any():
            raise ImageError(f"{name}: all 5 keypoints lie outside the {w}x{h} image")
        notes.append("some keypoints lie outside the image")
    blob = arcface_blob(warp_crop(image, m112, 112, antialias, warp), channel_order)
    crop = warp_crop(image, m224, 224, antialias)
    if farl_jpeg_quality:
        crop = jpeg_round_trip(crop, farl_jpeg_quality)
    return blob, crop, kps, np.asarray(box, dtype=np.float64), notes


def prepare_faces_array(
    image: np.ndarray,
    detector: Detector | None = None,
    *,
    kps: np.ndarray | None = None,
    aligned: bool = False,
    which: str = "all",
    channel_order: str = "bgr",
    detect_max_side: int = 1600,
    antialias: bool = True,
    warp: str = "float",
    farl_jpeg_quality: int | None = None,
    name: str = "image",
    source_hint: str | None = None,
    min_relative_size: float = MIN_RELATIVE_SIZE,
    max_kps_residual: float | None = MAX_KPS_RESIDUAL,
) -> list[PreparedFace]:
    """The chosen faces of an ``(H, W, 3)`` uint8 RGB array (``name`` is used in errors).

    ``kps`` is ``(5, 2)`` or, for several faces, ``(K, 5, 2)``; given keypoints are checked by
    :func:`check_keypoints` (``max_kps_residual`` None skips the template fit). ``which`` is
    ``"center"``, ``"largest"`` or ``"all"`` (see the module docstring). Never empty: no face
    is an :class:`ImageError`. ``antialias``, ``warp``, ``farl_jpeg_quality``: as
    :func:`prepare_faces`.
    """
    if warp not in WARP_GRIDS:
        raise ValueError(f"warp must be one of {WARP_GRIDS}, got {warp!r}")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"{name}: expected an (H, W, 3) uint8 RGB array, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    scores: np.ndarray | None = None
    boxes: np.ndarray | None = None
    det_name = None
    if kps is not None:
        kpss = np.asarray(kps, dtype=np.float64)
        kpss = kpss[None] if kpss.ndim == 2 else kpss
        if kpss.ndim != 3 or kpss.shape[1:] != (5, 2) or len(kpss) == 0:
            raise ImageError(f"{name}: keypoints must be a finite (5, 2) array, got {np.shape(kps)}")
        check_keypoints(kpss, image.shape, name, max_kps_residual)
        source = source_hint or "given"
    elif aligned:
        if h != w or h % 112:
            raise ImageError(
                f"{name}: an aligned input must be square with a side that is a multiple of 112 "
                f"(112, 224, ...), got {w}x{h}"
            )
        kpss = (ARCFACE_TEMPLATE * (h / 112.0))[None]
        source = "aligned"
    elif detector is not None:
        if min(h, w) < 16:
            raise ImageError(f"{name}: image too small for face detection ({w}x{h} px)")
        found, kpss = _detect(detector, image, detect_max_side)
        if found.shape[0] == 0:
            raise ImageError(f"{name}: no face found")
        boxes = found[:, :4]
        scores = found[:, 4] if found.shape[1] > 4 else None
        source = "detector"
        det_name = str(getattr(detector, "description", None) or getattr(detector, "name", type(detector).__name__))
    else:
        raise ImageError(
            f"{name}: no keypoints: give a detector (built-in: the 'blazeface' extra; or SCRFD), "
            f"a .kps.txt / .kps.npy sidecar, or mark the input as aligned"
        )
    n_faces = len(kpss)
    if n_faces == 1:
        chosen = [0]
    else:
        if boxes is None:
            try:
                boxes = np.array([box_from_kps(k) for k in kpss])
            except ValueError as exc:
                raise ImageError(f"{name}: unusable keypoints ({_first_line(exc)})") from None
        chosen = choose_faces(boxes, image.shape, which, min_relative_size)
    out = []
    for k, i in enumerate(chosen):
        blob, crop, kp, box, notes = _one_face(image, kpss[i], None if boxes is None else boxes[i], name,
                                               channel_order, antialias, warp, farl_jpeg_quality)
        if n_faces > 1:
            notes.append(f"{n_faces} faces found; " + _CHOICE_NOTES.get(which, f"face {k + 1} of {len(chosen)} used, "
                                                                         f"numbered from the left"))
        out.append(PreparedFace(
            arcface=blob, farl_crop=crop, kps=kp.astype(np.float32), box=box.astype(np.float32),
            score=None if scores is None else float(scores[i]), source=source, n_faces=n_faces,
            image_size=(h, w), channel_order=channel_order, notes=notes, detector=det_name, face_index=k,
        ))
    return out


def prepare_face_array(image: np.ndarray, detector: Detector | None = None, *, which: str = "center",
                       **kwargs: Any) -> PreparedFace:
    """:func:`prepare_face` for an ``(H, W, 3)`` uint8 RGB array: one face, ``which`` is
    ``"center"`` or ``"largest"`` (other arguments as :func:`prepare_faces_array`)."""
    if which not in _CHOICE_NOTES:
        raise ValueError(f"which must be 'center' or 'largest' for one face, got {which!r}")
    return prepare_faces_array(image, detector, which=which, **kwargs)[0]


def prepare_faces(
    path: str | os.PathLike,
    detector: Detector | None = None,
    *,
    kps: np.ndarray | None = None,
    aligned: bool = False,
    use_sidecar: bool = True,
    which: str = "all",
    channel_order: str = "bgr",
    detect_max_side: int = 1600,
    antialias: bool = True,
    warp: str = "float",
    farl_jpeg_quality: int | None = None,
    min_side: int = 32,
    min_relative_size: float = MIN_RELATIVE_SIZE,
    max_kps_residual: float | None = MAX_KPS_RESIDUAL,
) -> list[PreparedFace]:
    """Read one image and make the ArcFace input and FaRL crop of each chosen face.

    Args:
        path: image file.
        detector: object with insightface's ``detect(img_bgr, max_num, metric)``
            (:class:`ofer.data.detect.BlazeFaceDetector`, :class:`ofer.data.detect.SCRFDDetector`);
            used when no keypoints are known.
        kps: ``(5, 2)`` (or ``(K, 5, 2)``) keypoints in image pixels (overrides everything else).
        aligned: the file is an ArcFace-aligned square crop (side 112, 224, ...).
        use_sidecar: look for ``<stem>.kps.txt`` / ``<stem>.kps.npy`` next to the file.
        which: ``"center"``, ``"largest"`` or ``"all"`` (see the module docstring).
        channel_order: channel order of the ArcFace blob: ``"bgr"`` (OFER checkpoints) or
            ``"rgb"`` (MICA).
        detect_max_side: the detector sees a copy downscaled to this long side; crops are
            always taken from the full-resolution image.
        antialias: box-filter before warping when the face is shrunk more than 2x
            (``False`` reproduces OpenCV's aliased sampling).
        warp: how the ArcFace crop is sampled: ``"float"`` (exact bilinear) or ``"opencv"``
            (``cv2.warpAffine``'s 1/32 px grid, as the released ``norm_crop``); the FaRL crop is
            always sampled in floating point (the released scikit-image ``warp``).
        farl_jpeg_quality: pass the FaRL crop through a JPEG of this quality
            (:func:`jpeg_round_trip`; the released pipeline read it back from a quality-95
            file); ``None`` or 0: hand it over as sampled.
        min_side: smaller images are refused (aligned inputs are exempt).
        min_relative_size: faces smaller than this fraction of the largest are not candidates.
        max_kps_residual: the template-fit limit for given keypoints (:func:`check_keypoints`).

    Returns:
        the :class:`PreparedFace` of each chosen face (one unless ``which="all"``).

    Raises:
        ImageError: one-line reason (unreadable file, bad sidecar, no face, ...).
    """
    if channel_order not in ("rgb", "bgr"):
        raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
    p = Path(path)
    image = read_image(p, min_side=1 if aligned else min_side)
    hint = None
    if kps is None and not aligned and use_sidecar:
        kps = read_sidecar_faces(p)
        hint = "sidecar" if kps is not None else None
    faces = prepare_faces_array(
        image, detector, kps=kps, aligned=aligned, which=which, channel_order=channel_order,
        detect_max_side=detect_max_side, antialias=antialias, warp=warp, farl_jpeg_quality=farl_jpeg_quality,
        name=str(p), source_hint=hint,
        min_relative_size=min_relative_size, max_kps_residual=max_kps_residual,
    )
    notes = file_notes(p)
    for face in faces:
        face.path = p
        face.notes.extend(notes)
    return faces


def prepare_face(path: str | os.PathLike, detector: Detector | None = None, *, which: str = "center",
                 **kwargs: Any) -> PreparedFace:
    """Read one image and make its ArcFace input and FaRL crop: :func:`prepare_faces` for one
    face, ``which`` is ``"center"`` (default) or ``"largest"``.

    Raises:
        ImageError: one-line reason (unreadable file, bad sidecar, no face, ...).
    """
    if which not in _CHOICE_NOTES:
        raise ValueError(f"which must be 'center' or 'largest' for one face, got {which!r}")
    return prepare_faces(path, detector, which=which, **kwargs)[0]


# --------------------------------------------------------------------------------------
# Writing the crop files
# --------------------------------------------------------------------------------------

#: JPEG quality of the written 224 crops.
CROP_JPEG_QUALITY = 95


def crop_file_paths(base: str | os.PathLike) -> tuple[Path, Path]:
    """``(<base>.npy, <base>.jpg)``: the ArcFace input and the 224 crop of one image.

    ``base`` is the output path without extension (``<out>/<rel>/<stem>``); the suffixes are
    appended, so a stem with dots keeps them.
    """
    base = Path(base)
    return base.with_name(base.name + ".npy"), base.with_name(base.name + ".jpg")


def write_face_crops(
    face: PreparedFace,
    base: str | os.PathLike,
    *,
    jpeg_quality: int = CROP_JPEG_QUALITY,
    atomic: bool = True,
) -> tuple[Path, Path]:
    """Write the crop files of ``face``; returns ``(npy path, jpg path)`` (:func:`crop_file_paths`).

    ``<base>.jpg``: the 224 crop, RGB JPEG of ``jpeg_quality``; ``<base>.npy``: the ArcFace
    input as float32 (``np.save``; channels in ``face.channel_order``). The crop is written
    first. Folders are created. ``atomic``: each file goes through a temp file that is renamed,
    so an interrupted run leaves no torn file; ``False`` writes in place (for a folder that is
    renamed into place once complete).
    """
    from PIL import Image

    npy_path, jpg_path = crop_file_paths(base)
    jpg = io.BytesIO()
    Image.fromarray(face.farl_crop).save(jpg, format="JPEG", quality=int(jpeg_quality))
    npy = io.BytesIO()
    np.save(npy, np.asarray(face.arcface, dtype=np.float32))
    for path, buf in ((jpg_path, jpg), (npy_path, npy)):
        data = buf.getvalue()
        if atomic:
            from ..io import atomic_write_bytes

            atomic_write_bytes(path, lambda f, data=data: f.write(data))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return npy_path, jpg_path
