"""Synthetic occluders for face images (the synthetic world and training augmentation).

An occluder is a shape (its boolean mask) filled with a texture and pasted over the image:

* ``polygon``     random star-shaped polygon;
* ``ellipse``     rotated ellipse;
* ``hand``        palm plus four finger capsules and a thumb, in a skin tone;
* ``object``      smooth random blob or rounded rectangle (cup, phone, microphone...);
* ``facemask``    surgical-mask silhouette over nose tip, mouth and chin;
* ``sunglasses``  two lenses and a bridge over the eyes;
* ``cutout``      a random shape whose content is cut from another image (``source``), or, without
                  one, from another place of the same image.

Textures for the generic shapes: ``flat``, ``noise`` (smooth value noise between two colours) and
``stripes``. Placement uses the five insightface keypoints when given (image-left eye,
image-right eye, nose, image-left mouth corner, image-right mouth corner, pixels); otherwise a
frontal face filling the image is assumed (the ArcFace template scaled to the image).

Area: the fraction ``mask.sum() / reference_area`` is drawn uniformly from ``config.area`` and
reached by bisection on the shape's scale, then measured. The reference area is the face box
around the keypoints (see :func:`face_box`) when keypoints are given, otherwise the whole image.
Every occlusion that is applied satisfies ``area[0] <= fraction <= area[1]``; if a kind cannot
reach the drawn area (a face mask is only so large) another shape is drawn, and after
``max_tries`` a polygon (which can reach any area) is used.

Everything is driven by a ``numpy.random.Generator``: same generator state, same output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..errors import ConfigError
from .align import box_from_kps, farl_crop_matrix, transform_points

__all__ = [
    "VALID_KINDS",
    "VALID_TEXTURES",
    "ARCFACE_TEMPLATE",
    "OcclusionConfig",
    "OcclusionResult",
    "Occluder",
    "occlude",
    "occlude_with_info",
    "face_box",
    "default_kps",
    "crop_kps",
    "make_occluder",
]

VALID_KINDS: tuple[str, ...] = ("polygon", "ellipse", "hand", "object", "facemask", "sunglasses", "cutout")
VALID_TEXTURES: tuple[str, ...] = ("flat", "noise", "stripes")

#: insightface ArcFace 112x112 alignment template (x, y)
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)

_SKIN_TONES = np.array(
    [[255, 224, 196], [241, 194, 160], [224, 172, 135], [198, 134, 96], [161, 102, 69], [111, 70, 46], [80, 51, 36]],
    dtype=np.float64,
)


@dataclass(frozen=True)
class OcclusionConfig:
    """Occluder settings.

    prob: probability that an image gets an occluder at all.
    area: (min, max) fraction of the reference area (face box, or image without keypoints).
    kinds: shapes to draw from (uniformly); see :data:`VALID_KINDS`.
    textures: fills for the generic shapes; see :data:`VALID_TEXTURES`.
    max_tries: shapes drawn before falling back to a polygon when the area cannot be met.
    """

    prob: float = 0.5
    area: tuple[float, float] = (0.05, 0.4)
    kinds: tuple[str, ...] = VALID_KINDS
    textures: tuple[str, ...] = VALID_TEXTURES
    max_tries: int = 6

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "textures", tuple(self.textures))
        object.__setattr__(self, "area", tuple(float(a) for a in self.area))
        if not (0.0 <= float(self.prob) <= 1.0):
            raise ConfigError(f"occlusion.prob must be in [0, 1], got {self.prob!r}")
        if len(self.area) != 2 or not (0.0 < self.area[0] <= self.area[1] <= 1.0):
            raise ConfigError(f"occlusion.area must be (min, max) with 0 < min <= max <= 1, got {self.area!r}")
        if not self.kinds:
            raise ConfigError(f"occlusion.kinds is empty; valid kinds: {', '.join(VALID_KINDS)}")
        bad = [k for k in self.kinds if k not in VALID_KINDS]
        if bad:
            raise ConfigError(f"occlusion.kinds: unknown kind {bad[0]!r}; valid kinds: {', '.join(VALID_KINDS)}")
        if not self.textures:
            raise ConfigError(f"occlusion.textures is empty; valid textures: {', '.join(VALID_TEXTURES)}")
        badt = [t for t in self.textures if t not in VALID_TEXTURES]
        if badt:
            raise ConfigError(
                f"occlusion.textures: unknown texture {badt[0]!r}; valid textures: {', '.join(VALID_TEXTURES)}"
            )
        if int(self.max_tries) < 1:
            raise ConfigError(f"occlusion.max_tries must be >= 1, got {self.max_tries!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "OcclusionConfig":
        """Build from a plain dict (YAML); unknown keys raise :class:`ConfigError`."""
        valid = {"prob", "area", "kinds", "textures", "max_tries"}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ConfigError(f"occlusion: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(valid))}")
        return cls(**d)


@dataclass
class OcclusionResult:
    """image (H,W,3) uint8 after occlusion; mask (H,W) bool of occluded pixels; kind (None when
    no occluder was applied); area_fraction = mask.sum() / reference area."""

    image: np.ndarray
    mask: np.ndarray
    kind: str | None
    area_fraction: float
    reference_area: float = field(default=0.0)


# --------------------------------------------------------------------------- geometry utilities


def default_kps(height: int, width: int) -> np.ndarray:
    """The ArcFace template scaled to a centred square of side min(height, width): (5,2) float64."""
    s = min(height, width) / 112.0
    off = np.array([(width - min(height, width)) / 2.0, (height - min(height, width)) / 2.0])
    return (ARCFACE_TEMPLATE + 0.5) * s - 0.5 + off


def _face_frame(kps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Local face frame: origin (eye midpoint), unit x (image-left to image-right eye), unit y
    (towards the mouth), inter-ocular distance d and eye-to-mouth distance h."""
    kps = np.asarray(kps, dtype=np.float64).reshape(5, 2)
    eye_mid = (kps[0] + kps[1]) / 2.0
    mouth_mid = (kps[3] + kps[4]) / 2.0
    ex = kps[1] - kps[0]
    d = float(np.linalg.norm(ex))
    if d < 1e-6:
        ex = np.array([1.0, 0.0])
        d = 1e-6
    ex = ex / np.linalg.norm(ex)
    ey = np.array([-ex[1], ex[0]])
    if np.dot(mouth_mid - eye_mid, ey) < 0:
        ey = -ey
    h = float(max(abs(np.dot(mouth_mid - eye_mid, ey)), 0.3 * d))
    return eye_mid, ex, ey, d, h


def _local_to_image(frame, uv: np.ndarray) -> np.ndarray:
    """Local face coordinates ``(u, v)`` in units of (d, h) to image pixels."""
    o, ex, ey, d, h = frame
    uv = np.asarray(uv, dtype=np.float64)
    return o + uv[..., :1] * d * ex + uv[..., 1:2] * h * ey


def face_box(kps: np.ndarray) -> tuple[np.ndarray, float]:
    """Face box implied by five keypoints: its 4 corners (4,2) in pixels and its area (pixels^2).

    In the face frame (u across in inter-ocular distances d, v down in eye-to-mouth distances h,
    origin between the eyes) the box spans u in [-1.1, 1.1] and v in [-1.0, 1.7]: about forehead
    to chin and ear to ear, as in the ArcFace crop.
    """
    frame = _face_frame(kps)
    corners = _local_to_image(frame, np.array([[-1.1, -1.0], [1.1, -1.0], [1.1, 1.7], [-1.1, 1.7]]))
    return corners, 2.2 * frame[3] * 2.7 * frame[4]


# --------------------------------------------------------------------------- drawing


def _draw(height: int, width: int, polys: Sequence[np.ndarray] = (),
          capsules: Sequence[tuple[np.ndarray, np.ndarray, float]] = ()) -> np.ndarray:
    """Rasterise filled polygons ((N,2) pixel arrays) and capsules (p0, p1, radius) to a bool mask."""
    from PIL import Image, ImageDraw

    im = Image.new("L", (width, height), 0)
    dr = ImageDraw.Draw(im)
    for p in polys:
        pts = [(float(x), float(y)) for x, y in np.asarray(p)]
        if len(pts) >= 3:
            dr.polygon(pts, fill=255)
    for p0, p1, r in capsules:
        poly = _capsule_polygon(np.asarray(p0, float), np.asarray(p1, float), float(r))
        dr.polygon([(float(x), float(y)) for x, y in poly], fill=255)
    return np.asarray(im) > 127


def _capsule_polygon(p0: np.ndarray, p1: np.ndarray, r: float, n: int = 10) -> np.ndarray:
    d = p1 - p0
    ang = math.atan2(d[1], d[0])
    a1 = ang + np.linspace(-math.pi / 2, math.pi / 2, n)
    a0 = ang + np.linspace(math.pi / 2, 3 * math.pi / 2, n)
    return np.concatenate([p1 + r * np.stack([np.cos(a1), np.sin(a1)], 1),
                           p0 + r * np.stack([np.cos(a0), np.sin(a0)], 1)])


def _rot(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]])


# Shape builders: each draws its random parameters once and returns f(scale) -> mask.
ShapeFn = Callable[[float], np.ndarray]


def _shape_polygon(rng: np.random.Generator, H: int, W: int, center: np.ndarray) -> ShapeFn:
    n = int(rng.integers(3, 9))
    ang = np.sort(rng.uniform(0, 2 * math.pi, n))
    rad = rng.uniform(0.5, 1.0, n)
    unit = np.stack([np.cos(ang) * rad, np.sin(ang) * rad], 1)
    return lambda s: _draw(H, W, polys=[center + s * unit])


def _ellipse_unit(rng: np.random.Generator, n: int = 48) -> np.ndarray:
    a, b = 1.0, rng.uniform(0.35, 1.0)
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    pts = np.stack([a * np.cos(t), b * np.sin(t)], 1)
    return pts @ _rot(rng.uniform(0, math.pi)).T


def _shape_ellipse(rng: np.random.Generator, H: int, W: int, center: np.ndarray) -> ShapeFn:
    unit = _ellipse_unit(rng)
    return lambda s: _draw(H, W, polys=[center + s * unit])


def _shape_object(rng: np.random.Generator, H: int, W: int, center: np.ndarray) -> ShapeFn:
    if rng.random() < 0.5:  # smooth blob
        t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        r = np.ones_like(t)
        for k in (2, 3, 4):
            r += rng.uniform(0.0, 0.18) * np.cos(k * t + rng.uniform(0, 2 * math.pi))
        unit = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    else:  # rounded rectangle (phone, cup, book)
        w, h = 1.0, rng.uniform(0.3, 0.8)
        rr = rng.uniform(0.05, 0.25) * h
        pts = []
        for cx, cy, a0 in ((w - rr, h - rr, 0.0), (-w + rr, h - rr, 0.5 * math.pi),
                           (-w + rr, -h + rr, math.pi), (w - rr, -h + rr, 1.5 * math.pi)):
            a = a0 + np.linspace(0, math.pi / 2, 6)
            pts.append(np.stack([cx + rr * np.cos(a), cy + rr * np.sin(a)], 1))
        unit = np.concatenate(pts)
    unit = unit @ _rot(rng.uniform(0, 2 * math.pi)).T
    return lambda s: _draw(H, W, polys=[center + s * unit])


def _shape_hand(rng: np.random.Generator, H: int, W: int, center: np.ndarray) -> ShapeFn:
    R = _rot(rng.uniform(0, 2 * math.pi))
    t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    palm = np.stack([0.48 * np.cos(t), 0.55 * np.sin(t)], 1)
    spread = rng.uniform(0.08, 0.3)
    fingers = []
    for i, base_u in enumerate((-0.33, -0.11, 0.11, 0.33)):
        ang = -math.pi / 2 + (i - 1.5) * spread + rng.normal(0, 0.05)
        length = rng.uniform(0.55, 0.85) * (0.8 if i in (0, 3) else 1.0)
        p0 = np.array([base_u, -0.35])
        p1 = p0 + length * np.array([math.cos(ang), math.sin(ang)])
        fingers.append((p0, p1, 0.1))
    side = 1.0 if rng.random() < 0.5 else -1.0
    t0 = np.array([side * 0.4, 0.05])
    tang = math.atan2(-0.6, side * 0.8) + rng.normal(0, 0.2)
    fingers.append((t0, t0 + 0.55 * np.array([math.cos(tang), math.sin(tang)]), 0.11))
    # the wrist/forearm leaves the shape towards the image border
    fingers.append((np.array([0.0, 0.3]), np.array([0.0, 2.5]), 0.4))

    def f(s: float) -> np.ndarray:
        caps = [(center + s * (R @ p0), center + s * (R @ p1), s * r) for p0, p1, r in fingers]
        return _draw(H, W, polys=[center + s * (palm @ R.T)], capsules=caps)

    return f


def _shape_facemask(rng: np.random.Generator, H: int, W: int, frame) -> ShapeFn:
    top = rng.uniform(0.35, 0.6)  # v of the upper edge (nose bridge to tip)
    bottom = rng.uniform(1.45, 1.75)
    half_w = rng.uniform(0.95, 1.15)
    u = np.linspace(-1, 1, 13)

    def f(s: float) -> np.ndarray:
        # anchored at the mouth (v = 1); the scale stretches it up towards the nose and down the chin
        upper = np.stack([u * half_w * s, 1.0 - (1.0 - top) * s + 0.15 * u**2], 1)
        lower = np.stack([u[::-1] * half_w * s * 0.9, 1.0 + (bottom - 1.0) * s - 0.35 * u[::-1] ** 2], 1)
        return _draw(H, W, polys=[_local_to_image(frame, np.concatenate([upper, lower]))])

    return f


def _shape_sunglasses(rng: np.random.Generator, H: int, W: int, frame) -> ShapeFn:
    rx, ry = rng.uniform(0.36, 0.48), rng.uniform(0.22, 0.32)  # units of d
    t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
    d, h = frame[3], frame[4]
    k = d / h  # convert a length in units of d to units of h along v

    def f(s: float) -> np.ndarray:
        lenses = []
        for cu in (-0.5, 0.5):
            uv = np.stack([cu + s * rx * np.cos(t), 0.02 + s * ry * k * np.sin(t)], 1)
            lenses.append(_local_to_image(frame, uv))
        bridge = (_local_to_image(frame, np.array([-0.2, -0.02])), _local_to_image(frame, np.array([0.2, -0.02])),
                  0.05 * d * s)
        arms = [(_local_to_image(frame, np.array([side * (0.5 + s * rx * 0.9), 0.0])),
                 _local_to_image(frame, np.array([side * 1.15, 0.05])), 0.04 * d * s) for side in (-1, 1)]
        return _draw(H, W, polys=lenses, capsules=[bridge, *arms])

    return f


# --------------------------------------------------------------------------- textures


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3)


def _texture(rng: np.random.Generator, kind: str, h: int, w: int, base: np.ndarray | None = None) -> np.ndarray:
    """(h,w,3) float64 texture in [0,255]."""
    from PIL import Image

    c0 = _random_color(rng) if base is None else base
    if kind == "flat":
        tex = np.broadcast_to(c0, (h, w, 3)).astype(np.float64)
    elif kind == "noise":
        c1 = _random_color(rng) if base is None else base * rng.uniform(0.6, 0.9)
        gh, gw = int(rng.integers(2, 7)), int(rng.integers(2, 7))
        grid = rng.random((gh, gw)).astype(np.float32)
        n = np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.BILINEAR), dtype=np.float64)
        n = n + 0.15 * rng.random((h, w))
        n = (n - n.min()) / max(n.max() - n.min(), 1e-6)
        tex = c0 * (1 - n[..., None]) + c1 * n[..., None]
    elif kind == "stripes":
        c1 = _random_color(rng) if base is None else base * 0.6
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(0.08, 0.3) * max(min(h, w), 8)
        yy, xx = np.mgrid[0:h, 0:w]
        phase = (xx * math.cos(theta) + yy * math.sin(theta)) / period
        sel = (np.floor(phase) % 2 == 0)[..., None]
        tex = np.where(sel, c0, c1).astype(np.float64)
    else:  # pragma: no cover - validated by the config
        raise ValueError(kind)
    # a gentle linear shading so objects do not look like stickers
    g = rng.uniform(-0.15, 0.15, 2)
    yy, xx = np.mgrid[0:h, 0:w]
    shade = 1.0 + g[0] * (xx / max(w - 1, 1) - 0.5) * 2 + g[1] * (yy / max(h - 1, 1) - 0.5) * 2
    return np.clip(tex * shade[..., None], 0, 255)


# --------------------------------------------------------------------------- main entry points


def _fit_scale(shape: ShapeFn, target_px: float, lo: float, hi: float, iters: int = 16) -> tuple[np.ndarray, float]:
    """Bisection on the scale so that the mask area approaches ``target_px``; returns (mask, scale)."""
    best_mask, best_s, best_err = None, lo, math.inf
    for _ in range(iters):
        s = 0.5 * (lo + hi)
        m = shape(s)
        a = float(m.sum())
        err = abs(a - target_px)
        if err < best_err:
            best_mask, best_s, best_err = m, s, err
        if err <= 0.02 * target_px:
            break
        if a < target_px:
            lo = s
        else:
            hi = s
    assert best_mask is not None
    return best_mask, best_s


def occlude_with_info(
    image: np.ndarray,
    rng: np.random.Generator,
    config: OcclusionConfig | None = None,
    kps: np.ndarray | None = None,
    source: np.ndarray | None = None,
    force: bool = False,
    reference: str = "auto",
) -> OcclusionResult:
    """Apply a random occluder; see the module docstring.

    image: (H,W,3) uint8. kps: optional (5,2) insightface keypoints in pixels. source: optional
    (h,w,3) uint8 image for ``cutout``. force: ignore ``config.prob`` and always occlude.
    reference: what ``config.area`` is a fraction of: ``"auto"`` (the face box when ``kps`` are
    given, else the image), ``"face"`` or ``"image"``.
    Returns an :class:`OcclusionResult`; the input is not modified.
    """
    if reference not in ("auto", "face", "image"):
        raise ValueError(f"reference must be 'auto', 'face' or 'image', got {reference!r}")
    cfg = config if config is not None else OcclusionConfig()
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"occlude expects an (H,W,3) uint8 image, got {img.shape} {img.dtype}")
    H, W = img.shape[:2]
    apply = force or (rng.random() < cfg.prob)
    kps_arr = default_kps(H, W) if kps is None else np.asarray(kps, dtype=np.float64).reshape(5, 2)
    if reference == "face" or (reference == "auto" and kps is not None):
        ref_area = min(face_box(kps_arr)[1], float(H * W))
    else:
        ref_area = float(H * W)
    if not apply:
        return OcclusionResult(img.copy(), np.zeros((H, W), bool), None, 0.0, ref_area)

    frame = _face_frame(kps_arr)
    corners, _ = face_box(kps_arr)
    lo_a, hi_a = cfg.area
    mask = None
    kind = None
    for attempt in range(int(cfg.max_tries) + 1):
        last = attempt == int(cfg.max_tries)
        kind = "polygon" if last else cfg.kinds[int(rng.integers(len(cfg.kinds)))]
        target = rng.uniform(lo_a, hi_a) * ref_area
        # occluder centre: a random point of the face box (face parts for the hand), kept in the image
        wts = rng.dirichlet(np.ones(4))
        center = np.clip(wts @ corners, [0, 0], [W - 1, H - 1])
        if kind in ("facemask", "sunglasses"):
            shape = (_shape_facemask if kind == "facemask" else _shape_sunglasses)(rng, H, W, frame)
            s_lo, s_hi = 0.6, 1.5
            a_lo, a_hi = float(shape(s_lo).sum()), float(shape(s_hi).sum())
            reach_lo, reach_hi = max(a_lo, lo_a * ref_area), min(a_hi, hi_a * ref_area)
            if reach_lo > reach_hi:
                continue
            target = rng.uniform(reach_lo, reach_hi)
        else:
            builder = {"polygon": _shape_polygon, "ellipse": _shape_ellipse, "hand": _shape_hand,
                       "object": _shape_object, "cutout": _shape_polygon if rng.random() < 0.5 else _shape_ellipse}[kind]
            shape = builder(rng, H, W, center)
            s_lo, s_hi = 0.0, 2.0 * math.hypot(H, W)
        m, _ = _fit_scale(shape, target, s_lo, s_hi)
        frac = float(m.sum()) / ref_area
        if lo_a <= frac <= hi_a:
            mask = m
            break
    if mask is None:  # even the polygon missed (tiny images): give up cleanly
        return OcclusionResult(img.copy(), np.zeros((H, W), bool), None, 0.0, ref_area)

    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    bh, bw = y1 - y0, x1 - x0
    if kind == "cutout":
        src = _cutout_source(rng, img, source)
        dy, dx = int(rng.integers(0, H)), int(rng.integers(0, W))
        if source is None:  # another place of the same image: shift by at least a third
            dy, dx = (dy // 2 + H // 3) % H, (dx // 2 + W // 3) % W
        patch = np.roll(src, (dy, dx), axis=(0, 1))[y0:y1, x0:x1].astype(np.float64)
    elif kind == "hand":
        base = _SKIN_TONES[int(rng.integers(len(_SKIN_TONES)))] * rng.uniform(0.85, 1.1)
        patch = _texture(rng, "noise", bh, bw, base=np.clip(base, 0, 255))
    elif kind == "sunglasses":
        base = rng.uniform(5, 60, 3)
        patch = _texture(rng, "flat", bh, bw, base=base)
    elif kind == "facemask":
        palette = np.array([[150, 200, 230], [235, 235, 235], [30, 30, 35], [120, 170, 140], [230, 180, 200]], float)
        base = palette[int(rng.integers(len(palette)))]
        tex = cfg.textures[int(rng.integers(len(cfg.textures)))]
        patch = _texture(rng, tex, bh, bw, base=base)
    else:
        tex = cfg.textures[int(rng.integers(len(cfg.textures)))]
        patch = _texture(rng, tex, bh, bw)
    out = img.copy()
    region = out[y0:y1, x0:x1]
    msub = mask[y0:y1, x0:x1]
    region[msub] = np.clip(np.rint(patch[msub]), 0, 255).astype(np.uint8)
    return OcclusionResult(out, mask, kind, float(mask.sum()) / ref_area, ref_area)


def _cutout_source(rng: np.random.Generator, img: np.ndarray, source: np.ndarray | None) -> np.ndarray:
    H, W = img.shape[:2]
    if source is None:
        return img
    src = np.asarray(source)
    if src.ndim == 2:
        src = np.repeat(src[..., None], 3, axis=2)
    src = src[..., :3].astype(np.uint8)
    if src.shape[:2] != (H, W):
        from PIL import Image

        src = np.asarray(Image.fromarray(src).resize((W, H), Image.BILINEAR))
    return src


def occlude(
    image: np.ndarray,
    rng: np.random.Generator,
    config: OcclusionConfig | None = None,
    kps: np.ndarray | None = None,
    source: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply a random occluder with probability ``config.prob``.

    image: (H,W,3) uint8; kps: optional (5,2) keypoints in pixels; source: optional image for cutouts.
    Returns ``(occluded image (H,W,3) uint8, mask (H,W) bool)``; the mask is all False when no
    occluder was drawn.
    """
    r = occlude_with_info(image, rng, config, kps=kps, source=source)
    return r.image, r.mask


def crop_kps(size: int = 224, crop: str = "farl") -> np.ndarray:
    """Where the five keypoints of a frontal face land in a preprocessed crop, (5,2) float64.

    crop: ``"farl"`` for the 224 FaRL crop written by the preprocessing step (the square of 1.6x
    the face box around its centre, the box derived from the keypoints), ``"arcface"`` for the
    ArcFace-aligned crop (the template scaled to ``size``).
    """
    if crop == "arcface":
        return default_kps(size, size)
    if crop != "farl":
        raise ValueError(f"crop must be 'farl' or 'arcface', got {crop!r}")

    m = farl_crop_matrix(box_from_kps(ARCFACE_TEMPLATE), size)
    return transform_points(m, ARCFACE_TEMPLATE)


class _ChwOccluder:
    """Dataset-side wrapper: ``(image (3,H,W) float in [0,1], rng) -> (image, mask (H,W) float32)``."""

    def __init__(self, config: OcclusionConfig, crop: str) -> None:
        self.config = config
        self.crop = crop
        self._kps: dict[tuple[int, int], np.ndarray] = {}

    def _kps_for(self, h: int, w: int) -> np.ndarray | None:
        if h != w:
            return None
        if (h, w) not in self._kps:
            self._kps[(h, w)] = crop_kps(h, self.crop)
        return self._kps[(h, w)]

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        img = np.asarray(image, dtype=np.float32)
        _, h, w = img.shape
        u8 = np.clip(np.rint(img.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)
        r = occlude_with_info(u8, rng, self.config, kps=self._kps_for(h, w), force=True, reference="image")
        m = r.mask.astype(np.float32)
        occ = r.image.transpose(2, 0, 1).astype(np.float32) / 255.0
        out = img * (1.0 - m) + occ * m
        return out.astype(np.float32), m


def make_occluder(area: Sequence[float] = (0.05, 0.4), kinds: Sequence[str] = VALID_KINDS,
                  textures: Sequence[str] = VALID_TEXTURES, crop: str = "farl"):
    """Occluder for the training datasets (the caller decides *whether* to occlude).

    Returns ``f(image (3,H,W) float32 in [0,1], rng) -> (occluded image (3,H,W) float32,
    mask (H,W) float32, 1 = occluded)``; ``area`` is a fraction of the image. Square crops are
    assumed to be the preprocessing step's ``crop`` (``"farl"`` or ``"arcface"``), so that
    occluders are centred on the face and face masks and sunglasses sit where they belong.
    """
    cfg = OcclusionConfig(prob=1.0, area=tuple(area), kinds=tuple(kinds), textures=tuple(textures))
    return _ChwOccluder(cfg, crop)


class Occluder:
    """Callable wrapper holding a config: ``Occluder(cfg)(image, rng, kps=None, source=None)``."""

    def __init__(self, config: OcclusionConfig | None = None) -> None:
        self.config = config if config is not None else OcclusionConfig()

    def __call__(self, image: np.ndarray, rng: np.random.Generator, kps: np.ndarray | None = None,
                 source: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        return occlude(image, rng, self.config, kps=kps, source=source)
