"""CPU mesh renderer: a vectorised z-buffer rasteriser with a perspective camera.

No OpenGL. Every triangle of every mesh in the batch is expanded into the pixel
centres of its screen-space bounding box in one flat tensor, tested with
barycentric coordinates, and resolved with a ``scatter_reduce(amin)`` z-buffer.
There is no per-pixel or per-triangle Python loop.

Conventions
-----------
* Camera frame (OpenCV): x right, y down, z forward. A world point ``X`` maps to
  camera coordinates ``R @ X + t`` and to pixels ``K @ (R X + t)`` / z.
* Pixel ``(row i, column j)`` has its centre at continuous coordinate ``(x=j, y=i)``;
  :meth:`Camera.project` returns coordinates in that convention, so a projected
  point ``(x, y)`` lies in pixel ``(round(y), round(x))``.
* World units are whatever the mesh uses (FLAME: metres).
* Images are float32 RGB in [0, 1]; :meth:`RenderOutput.image_uint8` converts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

__all__ = [
    "Camera",
    "look_at",
    "RenderOutput",
    "render",
    "render_mesh_preview",
    "vertex_normals",
    "image_grid",
]

ArrayLike = np.ndarray | torch.Tensor


def _as_tensor(x: ArrayLike, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


# --------------------------------------------------------------------------- camera


def look_at(
    eye: Sequence[float], target: Sequence[float] = (0.0, 0.0, 0.0),
    up: Sequence[float] = (0.0, 1.0, 0.0),
) -> tuple[np.ndarray, np.ndarray]:
    """World-to-camera extrinsics ``(R (3,3), t (3,))`` of a camera at ``eye`` looking at ``target``.

    ``up`` is the world direction that appears upwards in the image (FLAME: +y).
    A camera at ``(0, 0, d)`` looking at the origin sees world +x on the image right.
    """
    eye_a = np.asarray(eye, dtype=np.float64)
    f = np.asarray(target, dtype=np.float64) - eye_a
    f /= np.linalg.norm(f)
    r = np.cross(f, np.asarray(up, dtype=np.float64))
    nr = np.linalg.norm(r)
    if nr < 1e-9:
        raise ValueError("look_at: 'up' is parallel to the viewing direction")
    r /= nr
    d = np.cross(f, r)
    R = np.stack([r, d, f], axis=0)
    t = -R @ eye_a
    return R, t


@dataclass
class Camera:
    """Pinhole camera: intrinsics ``K (3,3)`` and world-to-camera extrinsics ``R (3,3)``, ``t (3,)``.

    ``width``/``height`` are the image size in pixels.
    """

    K: np.ndarray
    R: np.ndarray = field(default_factory=lambda: np.eye(3))
    t: np.ndarray = field(default_factory=lambda: np.zeros(3))
    width: int = 256
    height: int = 256

    def __post_init__(self) -> None:
        self.K = np.asarray(self.K, dtype=np.float64).reshape(3, 3)
        self.R = np.asarray(self.R, dtype=np.float64).reshape(3, 3)
        self.t = np.asarray(self.t, dtype=np.float64).reshape(3)
        self.width = int(self.width)
        self.height = int(self.height)

    @classmethod
    def from_fov(
        cls, fov_deg: float, width: int, height: int | None = None,
        eye: Sequence[float] = (0.0, 0.0, 1.0), target: Sequence[float] = (0.0, 0.0, 0.0),
        up: Sequence[float] = (0.0, 1.0, 0.0),
    ) -> "Camera":
        """Camera with horizontal field of view ``fov_deg``, principal point at the image centre."""
        height = width if height is None else height
        f = 0.5 * width / math.tan(math.radians(fov_deg) / 2.0)
        K = np.array([[f, 0.0, (width - 1) / 2.0], [0.0, f, (height - 1) / 2.0], [0.0, 0.0, 1.0]])
        R, t = look_at(eye, target, up)
        return cls(K=K, R=R, t=t, width=width, height=height)

    @classmethod
    def framing(
        cls, center: Sequence[float], extent: float, size: int = 256, fov_deg: float = 12.0,
        fill: float = 0.75, direction: Sequence[float] = (0.0, 0.0, 1.0),
        up: Sequence[float] = (0.0, 1.0, 0.0),
    ) -> "Camera":
        """Camera looking at ``center`` from ``direction`` so that an object of diameter
        ``extent`` spans about ``fill`` of the image width (to look at a head)."""
        direction = np.asarray(direction, dtype=np.float64)
        direction = direction / np.linalg.norm(direction)
        half = math.tan(math.radians(fov_deg) / 2.0)
        dist = 0.5 * extent / (fill * half)
        eye = np.asarray(center, dtype=np.float64) + dist * direction
        return cls.from_fov(fov_deg, size, size, eye=eye, target=center, up=up)

    @property
    def position(self) -> np.ndarray:
        """Camera centre in world coordinates, (3,)."""
        return -self.R.T @ self.t

    def to_camera(self, points: ArrayLike) -> np.ndarray:
        """World points ``(..., 3)`` to camera coordinates ``(..., 3)`` (float64)."""
        p = np.asarray(points.detach().cpu().numpy() if isinstance(points, torch.Tensor) else points,
                       dtype=np.float64)
        return p @ self.R.T + self.t

    def project(self, points: ArrayLike) -> np.ndarray:
        """Project world points ``(..., 3)`` to pixel coordinates ``(..., 2)`` (x right, y down)."""
        pc = self.to_camera(points)
        z = pc[..., 2:3]
        uv = pc[..., :2] / z
        x = self.K[0, 0] * uv[..., 0] + self.K[0, 1] * uv[..., 1] + self.K[0, 2]
        y = self.K[1, 1] * uv[..., 1] + self.K[1, 2]
        return np.stack([x, y], axis=-1)


# --------------------------------------------------------------------------- geometry utilities


def vertex_normals(vertices: ArrayLike, faces: ArrayLike) -> torch.Tensor:
    """Area-weighted unit vertex normals.

    vertices: (B,V,3) or (V,3) float; faces: (F,3) int. Returns the vertices' shape, float32 for
    float32 tensors and float64 otherwise.
    """
    keep32 = isinstance(vertices, torch.Tensor) and vertices.dtype == torch.float32
    v = _as_tensor(vertices, torch.float32 if keep32 else torch.float64)
    squeeze = v.dim() == 2
    if squeeze:
        v = v[None]
    f = _as_tensor(faces, torch.long)
    tri = v[:, f]  # (B,F,3,3)
    fn = torch.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0], dim=-1)
    vn = torch.zeros_like(v)
    vn.index_add_(1, f.reshape(-1), fn.repeat_interleave(3, dim=1))
    vn = vn / vn.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return vn[0] if squeeze else vn


# --------------------------------------------------------------------------- rasteriser


@dataclass
class RenderOutput:
    """Result of :func:`render` for a batch of B meshes at H x W.

    image:   (B,H,W,3) float32 in [0,1], shaded mesh over the background.
    depth:   (B,H,W) float32 camera-space z of the visible surface; +inf where empty.
    face_id: (B,H,W) int64 index into ``faces`` of the visible triangle; -1 where empty.
    bary:    (B,H,W,3) float32 perspective-correct barycentric coordinates of the visible point.
    mask:    (B,H,W) bool, ``face_id >= 0``.
    cameras: the B cameras used.
    """

    image: np.ndarray
    depth: np.ndarray
    face_id: np.ndarray
    bary: np.ndarray
    mask: np.ndarray
    cameras: list[Camera]

    def image_uint8(self) -> np.ndarray:
        """(B,H,W,3) uint8 version of ``image``."""
        return np.clip(np.rint(self.image * 255.0), 0, 255).astype(np.uint8)

    def project(self, points: ArrayLike) -> np.ndarray:
        """Project world points (B,N,3) (or (N,3), same for every camera) to pixels (B,N,2)."""
        p = np.asarray(points.detach().cpu().numpy() if isinstance(points, torch.Tensor) else points)
        if p.ndim == 2:
            return np.stack([c.project(p) for c in self.cameras])
        return np.stack([c.project(p[b]) for b, c in enumerate(self.cameras)])

    @property
    def projector(self) -> Callable[[ArrayLike], np.ndarray]:
        """The projection function ``points (B,N,3) -> pixels (B,N,2)``."""
        return self.project


def _rasterize(
    verts_px: torch.Tensor, z: torch.Tensor, faces: torch.Tensor, height: int, width: int,
    cull_backfaces: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Z-buffer rasterisation of B meshes at once.

    verts_px: (B,V,2) float64 pixel coordinates; z: (B,V) camera depth (> 0 for visible vertices);
    faces: (F,3) long. Returns face_id (B,H,W) long (-1 empty), depth (B,H,W) float64 (+inf empty),
    bary (B,H,W,3) float32 perspective-correct barycentrics, and front (B,F) bool: the triangle is
    counter-clockwise as seen from the camera.

    Each triangle is written as three affine edge functions ``w_k(x, y) = a_k x + b_k y + c_k``
    (its barycentric coordinates); a pixel centre is covered when all three are >= 0.
    """
    B = verts_px.shape[0]
    F = faces.shape[0]
    HW = height * width
    if HW >= 2**24:
        raise ValueError(f"render: image of {width}x{height} pixels is too large (at most 2**24 pixels)")
    face_id = torch.full((B * HW,), -1, dtype=torch.long)
    depth = torch.full((B * HW,), math.inf, dtype=torch.float64)
    bary_out = torch.zeros((B * HW, 3), dtype=torch.float32)

    tri = verts_px[:, faces]  # (B,F,3,2)
    tz = z[:, faces]  # (B,F,3)
    xs, ys = tri[..., 0], tri[..., 1]  # (B,F,3)
    x0, x1, x2 = xs.unbind(-1)
    y0, y1, y2 = ys.unbind(-1)
    area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)  # twice the signed area
    valid = (tz > 1e-9).all(-1) & (area.abs() > 1e-12) & torch.isfinite(area)
    if cull_backfaces:
        # counter-clockwise seen from the camera is clockwise in y-down pixel coordinates
        valid &= area < 0
    xlo, xhi = xs.amin(-1), xs.amax(-1)
    ylo, yhi = ys.amin(-1), ys.amax(-1)
    valid &= (xhi >= 0) & (xlo <= width - 1) & (yhi >= 0) & (ylo <= height - 1)
    bidx, fidx = torch.nonzero(valid, as_tuple=True)
    if bidx.numel() == 0:
        return (face_id.view(B, height, width), depth.view(B, height, width),
                bary_out.view(B, height, width, 3), area < 0)

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t[bidx, fidx]

    X0, X1, X2, Y0, Y1, Y2, A = (pick(t) for t in (x0, x1, x2, y0, y1, y2, area))
    xmin = torch.ceil(pick(xlo)).clamp(0, width - 1)
    xmax = torch.floor(pick(xhi)).clamp(0, width - 1)
    ymin = torch.ceil(pick(ylo)).clamp(0, height - 1)
    ymax = torch.floor(pick(yhi)).clamp(0, height - 1)
    bw = (xmax - xmin + 1).long().clamp_min(0)
    bh = (ymax - ymin + 1).long().clamp_min(0)
    counts = bw * bh
    # per-triangle coefficients: edge functions (w0, w1) and 1/z at the vertices
    inv_z = 1.0 / pick(tz)  # (T,3)
    # edge functions relative to the bounding-box corner (xmin, ymin), evaluated in float64 so
    # that the float32 per-candidate stage only adds small local offsets
    a0, b0 = (Y1 - Y2) / A, (X2 - X1) / A
    a1, b1 = (Y2 - Y0) / A, (X0 - X2) / A
    c0 = (X1 * Y2 - X2 * Y1) / A + a0 * xmin + b0 * ymin
    c1 = (X2 * Y0 - X0 * Y2) / A + a1 * xmin + b1 * ymin
    coef = torch.stack([a0, b0, c0, a1, b1, c1, inv_z[:, 0], inv_z[:, 1], inv_z[:, 2], bw.double()],
                       dim=1).float()
    total = int(counts.sum())
    rep = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    starts = torch.cumsum(counts, 0) - counts
    # local index inside the box; float32 is exact here (indices < 2**24, see the comment below)
    local = (torch.arange(total) - starts[rep]).float()
    c = coef.index_select(0, rep)  # (N,10)
    # floor(local / bw) is exact in float32 while local < 2**24: a correctly rounded quotient of
    # k*bw - 1 by bw stays below k because 1/bw exceeds half an ulp of k
    dyf = torch.floor(local / c[:, 9])
    dxf = local - dyf * c[:, 9]
    w0 = c[:, 0] * dxf + c[:, 1] * dyf + c[:, 2]
    w1 = c[:, 3] * dxf + c[:, 4] * dyf + c[:, 5]
    w2 = 1.0 - w0 - w1
    eps = -1e-5
    inside = (w0 >= eps) & (w1 >= eps) & (w2 >= eps)
    idx = torch.nonzero(inside, as_tuple=True)[0]
    w = torch.stack([w0[idx], w1[idx], w2[idx]], -1).clamp_min(0.0)
    w = w / w.sum(-1, keepdim=True)
    c = c[idx]
    ti = rep[idx]
    wz = w * c[:, 6:9]  # barycentric / z
    inv = wz.sum(-1)
    zpix = (1.0 / inv).double()
    px = xmin.long()[ti] + dxf[idx].long()
    py = ymin.long()[ti] + dyf[idx].long()
    pix = bidx[ti] * HW + py * width + px
    cf = fidx[ti]

    depth.scatter_reduce_(0, pix, zpix, reduce="amin", include_self=True)
    winner = zpix <= depth[pix]
    # ties at equal depth: the lowest face index wins (deterministic)
    best = torch.full((B * HW,), F, dtype=torch.long)
    best.scatter_reduce_(0, pix[winner], cf[winner], reduce="amin", include_self=True)
    sel = winner & (cf == best[pix])
    face_id[pix[sel]] = cf[sel]
    bary_out[pix[sel]] = wz[sel] / inv[sel, None]
    return face_id.view(B, height, width), depth.view(B, height, width), bary_out.view(B, height, width, 3), area < 0


def _background_array(background, B: int, H: int, W: int) -> torch.Tensor:
    if background is None:
        return torch.zeros(B, H, W, 3, dtype=torch.float64)
    bg = _as_tensor(background)
    if isinstance(background, np.ndarray) and background.dtype == np.uint8 or (
        isinstance(background, torch.Tensor) and background.dtype == torch.uint8
    ):
        bg = bg / 255.0
    if bg.dim() == 1:  # colour
        return bg.view(1, 1, 1, 3).expand(B, H, W, 3)
    if bg.dim() == 3:  # one image
        if tuple(bg.shape) != (H, W, 3):
            raise ValueError(f"background image has shape {tuple(bg.shape)}, expected ({H}, {W}, 3)")
        return bg[None].expand(B, H, W, 3)
    if tuple(bg.shape) != (B, H, W, 3):
        raise ValueError(f"background has shape {tuple(bg.shape)}, expected ({B}, {H}, {W}, 3)")
    return bg


def render(
    vertices: ArrayLike,
    faces: ArrayLike,
    cameras: Camera | Sequence[Camera],
    *,
    colors: ArrayLike | None = None,
    light_dir: ArrayLike = (0.0, 0.0, 1.0),
    ambient: float | Sequence[float] = 0.35,
    diffuse: float | Sequence[float] = 0.65,
    background: ArrayLike | None = None,
    smooth: bool = True,
    cull_backfaces: bool = False,
) -> RenderOutput:
    """Rasterise and shade a batch of meshes sharing one topology.

    vertices: (B,V,3) or (V,3) world coordinates (float); faces: (F,3) int.
    cameras: one :class:`Camera` for all, or B cameras (same image size).
    colors: per-vertex albedo (V,3) or (B,V,3) in [0,1] (uint8 is scaled); default light grey.
    light_dir: direction *towards* the light in world coordinates, (3,) or (B,3).
    ambient, diffuse: scalars or one value per mesh (B,).
    Shading: ``albedo * (ambient + diffuse * max(0, n . l))``; the normal of a triangle seen
    from behind is reversed (two-sided lighting). ``smooth`` interpolates vertex normals,
    otherwise the flat face normal is used.
    background: None (black), an RGB colour (3,), an image (H,W,3) or (B,H,W,3); uint8 or [0,1].
    Returns a :class:`RenderOutput`.
    """
    v = _as_tensor(vertices)
    if v.dim() == 2:
        v = v[None]
    B, V, _ = v.shape
    f = _as_tensor(faces, torch.long)
    cams = [cameras] * B if isinstance(cameras, Camera) else list(cameras)
    if len(cams) != B:
        raise ValueError(f"got {len(cams)} cameras for {B} meshes")
    H, W = cams[0].height, cams[0].width
    if any(c.height != H or c.width != W for c in cams):
        raise ValueError("all cameras of a batch must have the same image size")

    Rs = torch.as_tensor(np.stack([c.R for c in cams]))
    ts = torch.as_tensor(np.stack([c.t for c in cams]))
    Ks = torch.as_tensor(np.stack([c.K for c in cams]))
    vc = torch.einsum("bij,bvj->bvi", Rs, v) + ts[:, None]
    z = vc[..., 2]
    zs = torch.where(z.abs() < 1e-12, torch.full_like(z, 1e-12), z)
    u = vc[..., 0] / zs
    w = vc[..., 1] / zs
    px = Ks[:, None, 0, 0] * u + Ks[:, None, 0, 1] * w + Ks[:, None, 0, 2]
    py = Ks[:, None, 1, 1] * w + Ks[:, None, 1, 2]
    vpx = torch.stack([px, py], -1)

    face_id, depth, bary, front = _rasterize(vpx, z, f, H, W, cull_backfaces)
    mask = face_id >= 0

    # ---- shading (only at covered pixels)
    image = _background_array(background, B, H, W).to(torch.float32).contiguous().clone()
    HW = H * W
    pix = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
    if pix.numel():
        bsel = torch.div(pix, HW, rounding_mode="floor")
        fid = face_id.reshape(-1)[pix]
        bc = bary.reshape(-1, 3)[pix].float()  # (N,3)
        vidx = f[fid] + bsel[:, None] * V  # (N,3) rows of the flattened (B*V, .) attributes

        def interp(attr: torch.Tensor) -> torch.Tensor:
            return torch.einsum("nk,nkc->nc", bc, attr.reshape(-1, 3)[vidx])

        vf = v.float()
        if smooth:
            n = interp(vertex_normals(vf, f))
        else:
            tri = vf.reshape(-1, 3)[vidx]
            n = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
        # two-sided lighting: a triangle seen from behind shades with its normal reversed
        sign = front.reshape(-1)[bsel * f.shape[0] + fid].float() * 2.0 - 1.0
        n = n * (sign / n.norm(dim=-1).clamp_min(1e-12))[:, None]
        L = _as_tensor(light_dir, torch.float32)
        L = L.view(1, 3).expand(B, 3) if L.dim() == 1 else L
        L = L / L.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        lam = (n * L[bsel]).sum(-1).clamp_min(0.0)
        amb = _as_tensor(ambient, torch.float32).reshape(-1).expand(B)[bsel]
        dif = _as_tensor(diffuse, torch.float32).reshape(-1).expand(B)[bsel]
        if colors is None:
            alb = torch.full((pix.numel(), 3), 0.8, dtype=torch.float32)
        else:
            col = _as_tensor(colors, torch.float32)
            if (isinstance(colors, np.ndarray) and colors.dtype == np.uint8) or (
                isinstance(colors, torch.Tensor) and colors.dtype == torch.uint8
            ):
                col = col / 255.0
            if col.dim() == 2:
                col = col[None].expand(B, V, 3)
            alb = interp(col.contiguous())
        shade = alb * (amb + dif * lam)[:, None]
        image.reshape(-1, 3)[pix] = shade.clamp(0.0, 1.0)

    return RenderOutput(
        image=image.float().numpy(),
        depth=depth.float().numpy(),
        face_id=face_id.numpy(),
        bary=bary.float().numpy(),
        mask=mask.numpy(),
        cameras=cams,
    )


# --------------------------------------------------------------------------- conveniences


def render_mesh_preview(
    vertices: ArrayLike, faces: ArrayLike, size: int = 256, *,
    color: Sequence[float] = (0.78, 0.76, 0.74), background: Sequence[float] = (1.0, 1.0, 1.0),
    fov_deg: float = 12.0, fill: float = 0.8, supersample: int = 2,
    direction: Sequence[float] = (0.0, 0.0, 1.0),
) -> np.ndarray:
    """Frontal grey-clay preview of one mesh, (size,size,3) uint8.

    vertices: (V,3) (FLAME: metres, face looking along +z, +y up); faces (F,3).
    The camera looks at the bounding-box centre from ``direction``; light comes from the
    upper front-left of the viewer. ``supersample`` renders at that factor and box-filters down.
    """
    v = _as_tensor(vertices)
    if v.dim() == 3:
        if v.shape[0] != 1:
            raise ValueError("render_mesh_preview renders one mesh; got a batch")
        v = v[0]
    lo, hi = v.min(0).values.numpy(), v.max(0).values.numpy()
    center = (lo + hi) / 2.0
    extent = float(np.max(hi - lo))
    s = max(1, int(supersample))
    cam = Camera.framing(center, extent, size * s, fov_deg=fov_deg, fill=fill, direction=direction)
    ld = np.asarray(direction, dtype=np.float64) + np.array([-0.4, 0.5, 0.0]) + 0.0
    out = render(v, faces, cam, colors=np.tile(np.asarray(color, dtype=np.float64), (v.shape[0], 1)),
                 light_dir=ld, ambient=0.3, diffuse=0.75, background=np.asarray(background, dtype=np.float64))
    img = out.image[0]
    if s > 1:
        img = img.reshape(size, s, size, s, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def image_grid(
    images: Sequence[np.ndarray], ncols: int, labels: Sequence[str] | None = None, *,
    pad: int = 2, pad_value: int = 255, label_height: int = 14,
) -> np.ndarray:
    """Tile HxWx3 uint8 images (sizes may differ; each cell gets the largest size) into a grid.

    labels: optional one string per image, drawn (PIL default font) in a strip above each cell.
    Returns (rows*(h+label)+pad.., cols*(w+pad)+pad, 3) uint8.
    """
    from PIL import Image, ImageDraw

    if not images:
        raise ValueError("image_grid needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"image_grid got {len(labels)} labels for {len(images)} images")
    ims = []
    for im in images:
        a = np.asarray(im)
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        if a.dtype != np.uint8:
            a = np.clip(np.rint(a.astype(np.float64) * (255.0 if a.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
        ims.append(a[..., :3])
    ncols = max(1, min(int(ncols), len(ims)))
    nrows = math.ceil(len(ims) / ncols)
    ch = max(a.shape[0] for a in ims)
    cw = max(a.shape[1] for a in ims)
    lh = label_height if labels is not None else 0
    H = nrows * (ch + lh + pad) + pad
    W = ncols * (cw + pad) + pad
    canvas = np.full((H, W, 3), pad_value, dtype=np.uint8)
    for k, a in enumerate(ims):
        r, c = divmod(k, ncols)
        y = pad + r * (ch + lh + pad) + lh
        x = pad + c * (cw + pad)
        canvas[y:y + a.shape[0], x:x + a.shape[1]] = a
    if labels is not None:
        pil = Image.fromarray(canvas)
        draw = ImageDraw.Draw(pil)
        for k, text in enumerate(labels):
            r, c = divmod(k, ncols)
            y = pad + r * (ch + lh + pad)
            x = pad + c * (cw + pad)
            draw.text((x + 1, y + 1), str(text), fill=(0, 0, 0))
        canvas = np.asarray(pil).copy()
    return canvas
