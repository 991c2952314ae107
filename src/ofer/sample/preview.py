"""The per-image preview (``preview.png``): one row that shows what the method did.

Left to right: the input with its 5 keypoints, the face crop the networks saw, the ranked
identity, the identity spread over the N hypotheses, a few expression hypotheses chosen far
apart, the expression spread over the M hypotheses and the colour scale of the two maps.
Every mesh is rendered with one camera framed on the face, from slightly to the side, so that
differences between the cells are differences between the meshes.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..uncertainty import colorize, nice_ceiling

__all__ = ["method_preview", "color_scale", "spread_scale", "CELL"]

#: side of one preview cell in pixels
CELL = 256
#: colour of the 5 keypoints (eyes, nose, mouth corners)
_KPS_COLORS = ((230, 60, 60), (60, 160, 230), (250, 200, 40), (160, 80, 220), (60, 200, 110))
#: the view of the meshes: from the front, a little from the subject's left and above
_VIEW = (0.32, 0.12, 1.0)


def spread_scale(spread: np.ndarray, fixed: Optional[float] = None) -> float:
    """Top of a spread map's colour scale (mm): ``fixed``, or a round number above the 99th percentile."""
    if fixed is not None:
        return float(fixed)
    return nice_ceiling(float(np.percentile(np.asarray(spread, np.float64), 99)))


def _fit(img: np.ndarray, size: int) -> np.ndarray:
    """``img`` scaled to fit a ``size`` square, centred on white."""
    from PIL import Image

    h, w = img.shape[:2]
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    small = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    out = np.full((size, size, 3), 255, np.uint8)
    y, x = (size - nh) // 2, (size - nw) // 2
    out[y:y + nh, x:x + nw] = small
    return out


def _with_keypoints(image: np.ndarray, kps: np.ndarray, size: int) -> np.ndarray:
    """The input image fitted into a cell, its 5 keypoints drawn as coloured dots."""
    from PIL import Image, ImageDraw

    h, w = image.shape[:2]
    s = size / max(h, w)
    cell = Image.fromarray(_fit(image, size))
    draw = ImageDraw.Draw(cell)
    ox, oy = (size - round(w * s)) // 2, (size - round(h * s)) // 2
    r = max(2, size // 70)
    for (x, y), c in zip(np.asarray(kps, np.float64), _KPS_COLORS):
        cx, cy = ox + (x + 0.5) * s - 0.5, oy + (y + 0.5) * s - 0.5
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=c, outline=(255, 255, 255))
    return np.asarray(cell)


def color_scale(scales: Sequence[tuple[str, float]], size: int = CELL) -> np.ndarray:
    """A cell with one vertical colour bar per ``(name, top in mm)``, ticks at 0, half and top."""
    from PIL import Image, ImageDraw

    cell = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(cell)
    n = max(1, len(scales))
    top, bottom = 44, size - 12
    bar_w = max(12, size // (6 * n))
    grad = colorize(np.linspace(1.0, 0.0, bottom - top), 1.0)  # top of the bar = top of the scale
    draw.text((8, 6), "spread, mm", fill=(0, 0, 0))
    for i, (name, vmax) in enumerate(scales):
        x0 = 16 + i * (size - 16) // n
        cell.paste(Image.fromarray(np.repeat(grad[:, None], bar_w, axis=1)), (x0, top))
        draw.rectangle((x0 - 1, top - 1, x0 + bar_w, bottom), outline=(90, 90, 90))
        draw.text((x0 - 4, 26), name, fill=(0, 0, 0))
        for frac in (0.0, 0.5, 1.0):
            y = round(bottom - 1 - frac * (bottom - top - 1))
            draw.line((x0 + bar_w, y, x0 + bar_w + 4, y), fill=(0, 0, 0))
            draw.text((x0 + bar_w + 7, y - 6), f"{frac * vmax:g}", fill=(0, 0, 0))
    return np.asarray(cell)


def _frame_box(vertices: np.ndarray, landmarks: Optional[np.ndarray] = None) -> tuple[np.ndarray, float]:
    """Centre and extent of the face: the box of the 68 landmarks (brows to chin, jaw line to
    jaw line) grown by a fifth, or without them the front of the head (FLAME faces +z)."""
    if landmarks is not None:
        lm = np.asarray(landmarks, np.float64)
        if np.isfinite(lm).all() and np.ptp(lm[:, :2], axis=0).min() > 0:
            lo, hi = lm.min(0), lm.max(0)
            return (lo + hi) / 2.0, 1.2 * float(np.max(hi[:2] - lo[:2]))
    v = np.asarray(vertices, np.float64)
    front = v[v[:, 2] >= np.quantile(v[:, 2], 0.55)]
    if len(front) < 3:
        front = v
    lo, hi = front.min(0), front.max(0)
    return (lo + hi) / 2.0, float(np.max(hi[:2] - lo[:2]))


def _render_cells(meshes: np.ndarray, faces: np.ndarray, colors: np.ndarray, size: int,
                  landmarks: Optional[np.ndarray] = None, supersample: int = 1) -> list[np.ndarray]:
    """Render (n, V, 3) meshes with (n, V, 3) float colours, one camera framed on the first."""
    from ..render import Camera, render

    center, extent = _frame_box(meshes[0], landmarks)
    s = max(1, int(supersample))
    cam = Camera.framing(center, extent, size * s, fov_deg=12.0, fill=0.8, direction=_VIEW)
    light = np.asarray(_VIEW) + np.array([-0.5, 0.6, 0.2])
    # one thread: the rasteriser works on many small tensors, where a second thread costs more
    # than it brings (and competes with the sampling for the cores)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = render(meshes, faces, cam, colors=colors, light_dir=light, ambient=0.32, diffuse=0.72,
                     background=np.ones(3))
    finally:
        torch.set_num_threads(threads)
    img = out.image
    if s > 1:
        img = img.reshape(len(meshes), size, s, size, s, 3).mean(axis=(2, 4))
    return list(np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8))


def _tint(rgb: np.ndarray, amount: float = 0.55) -> np.ndarray:
    """Colours blended into the clay colour: the hypotheses stay recognisable as shapes."""
    return (1.0 - amount) * np.array([0.80, 0.78, 0.76]) + amount * rgb


def method_preview(res, faces: np.ndarray, crop: np.ndarray, image: Optional[np.ndarray] = None,
                   kps: Optional[np.ndarray] = None, *, size: int = CELL, scale_mm: Optional[float] = None,
                   title: Optional[str] = None) -> np.ndarray:
    """The preview row of one :class:`~ofer.sample.reconstructor.ImageResult` as (H, W, 3) uint8.

    Args:
        faces: (F, 3) FLAME triangles; crop: the (224, 224, 3) face crop; image / kps: the
            input image and its (5, 2) keypoints in its pixels (the first cell is left out
            without them).
        scale_mm: top of both colour scales (None: each map's own, :func:`spread_scale`).
        title: written before the first label (e.g. the image name).
    """
    from ..render import image_grid

    cells, labels = [], []
    if image is not None and kps is not None:
        cells.append(_with_keypoints(image, kps, size))
        labels.append("input, 5 points")
    cells.append(_fit(np.asarray(crop), size))
    labels.append("face crop")
    clay = np.array([0.80, 0.78, 0.76])
    meshes = [res.identity_vertices]
    colors = [np.tile(clay, (res.identity_vertices.shape[0], 1))]
    labels.append(f"ranked identity #{res.ranked_index}" if not res.ranked_top
                  else f"mean of the top {len(res.ranked_top)} identities")
    id_max = exp_max = None
    if res.identity_spread is not None:
        id_max = spread_scale(res.identity_spread.numpy(), scale_mm)
        meshes.append(res.identity_vertices)
        colors.append(colorize(res.identity_spread.numpy(), id_max) / 255.0)
        labels.append(f"identity spread, N={res.uncertainty['n_identities']}" if res.uncertainty
                      else "identity spread")
    chosen = res.chosen_vertices if res.chosen_vertices is not None else res.expression_vertices[:4]
    idx = res.chosen_index if res.chosen_index is not None else list(range(len(chosen)))
    if res.expression_spread is not None:
        exp_max = spread_scale(res.expression_spread.numpy(), scale_mm)
    for k, v in zip(idx, chosen):
        meshes.append(v)
        if res.expression_mean is not None and exp_max is not None:
            # where this hypothesis departs from the mean of the M, on the expression scale
            dist = torch.linalg.vector_norm(torch.as_tensor(v).double() - res.expression_mean.double(), dim=-1)
            colors.append(_tint(colorize(dist.numpy() * 1000.0, exp_max) / 255.0))
            labels.append(f"expression #{k}, off the mean")
        else:
            colors.append(colors[0])
            labels.append(f"expression #{k}")
    if exp_max is not None:
        meshes.append(res.identity_vertices)
        colors.append(colorize(res.expression_spread.numpy(), exp_max) / 255.0)
        labels.append(f"expression spread, M={res.uncertainty['n_expressions']}" if res.uncertainty
                      else "expression spread")
    stack = np.stack([torch.as_tensor(m).float().numpy() for m in meshes])
    lm = None if res.landmarks68 is None else torch.as_tensor(res.landmarks68).double().numpy()
    cells += _render_cells(stack, faces, np.stack(colors).astype(np.float32), size, lm)
    if id_max is not None or exp_max is not None:
        scales = [(n, m) for n, m in (("identity", id_max), ("expression", exp_max)) if m is not None]
        if len(scales) == 2 and scales[0][1] == scales[1][1]:
            scales = [("both", scales[0][1])]
        cells.append(color_scale(scales, size))
        labels.append("colour scale")
    if title:
        labels[0] = f"{title}: {labels[0]}"
    return image_grid(cells, ncols=len(cells), labels=labels, label_height=16)
