"""Scenes of the synthetic world: image formation, and the renderer that turns FLAME heads into
photos with their keypoints, landmarks, visibility and occluders.

:class:`SceneConfig` sets the camera, head pose, light, albedo, background and occluders;
:class:`FaceRenderer` draws them from a generator and renders with :mod:`ofer.render`;
each image is a :class:`FaceSample`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..data.align import kps_from_landmarks68
from ..data.occlusion import OcclusionConfig, occlude_with_info
from ..errors import ConfigError
from ..render import Camera, render
from .prior import N_SHAPE, check_range

__all__ = ["SceneConfig", "FaceSample", "FaceRenderer"]

#: iBUG-68 mouth landmarks (the mouth's occlusion)
_MOUTH = list(range(48, 68))


@dataclass(frozen=True)
class SceneConfig:
    """Image formation: camera, head pose, light, albedo, background and occluders.

    size: square image side (pixels). fov_deg: horizontal field of view. fill: fraction of the
    image width spanned by the head diameter. yaw/pitch/roll: head rotation ranges (degrees,
    applied as FLAME ``global_pose``). shift: random image-plane shift (fraction of the head size).
    ambient/diffuse: ranges of the Lambert terms. occlusion: occluders of the training images
    (the ``occluded`` test variant always gets one, of the same kinds; its area is the world's
    ``test_occlusion_area``).
    """

    size: int = 256
    fov_deg: float = 14.0
    fill: float = 0.8
    yaw: tuple[float, float] = (-35.0, 35.0)
    pitch: tuple[float, float] = (-15.0, 15.0)
    roll: tuple[float, float] = (-12.0, 12.0)
    shift: float = 0.06
    ambient: tuple[float, float] = (0.25, 0.45)
    diffuse: tuple[float, float] = (0.5, 0.8)
    occlusion: OcclusionConfig = field(default_factory=lambda: OcclusionConfig(prob=0.5))

    def __post_init__(self) -> None:
        if int(self.size) < 32:
            raise ConfigError(f"scene.size must be >= 32 pixels, got {self.size!r}")
        for name in ("yaw", "pitch", "roll"):
            object.__setattr__(self, name, check_range(f"scene.{name}", getattr(self, name), -90.0, 90.0))
        for name in ("ambient", "diffuse"):
            object.__setattr__(self, name, check_range(f"scene.{name}", getattr(self, name), 0.0, 2.0))
        if not (0.0 < self.fov_deg < 120.0):
            raise ConfigError(f"scene.fov_deg must be in (0, 120), got {self.fov_deg!r}")
        if not (0.05 <= self.fill <= 1.5):
            raise ConfigError(f"scene.fill must be in [0.05, 1.5], got {self.fill!r}")


@dataclass
class FaceSample:
    """One rendered (and possibly occluded) face.

    image: (H,W,3) uint8 final image; clean: (H,W,3) uint8 before the occluder;
    occluder_mask: (H,W) bool; face_mask: (H,W) bool pixels of the head;
    kps: (5,2) float32 insightface keypoints (pixels); landmarks2d: (68,2) float32;
    vertex_in_render: (V,) bool, the vertex belongs to a triangle seen in the clean render (at
    least one pixel of the face-id buffer) and projects into the image;
    vertex_visible: (V,) bool, in_render and the pixel it projects to is not under the occluder;
    occluded_fraction: share of the face-region pixels covered by the occluder;
    mouth_occluded: at least half of the 20 mouth landmarks lie under the occluder;
    occluder: kind of occluder or None; camera: the camera; vertices: (V,3) float32 as rendered;
    face_id: (H,W) int triangle index per pixel (-1 = background), to re-occlude the clean image.
    """

    image: np.ndarray
    clean: np.ndarray
    occluder_mask: np.ndarray
    face_mask: np.ndarray
    kps: np.ndarray
    landmarks2d: np.ndarray
    vertex_in_render: np.ndarray
    vertex_visible: np.ndarray
    occluded_fraction: float
    mouth_occluded: bool
    occluder: str | None
    camera: Camera
    vertices: np.ndarray
    global_pose: np.ndarray
    face_id: np.ndarray | None = None


class FaceRenderer:
    """Renders FLAME heads as photos of the synthetic world.

    flame: an ``ofer.flame.FLAME`` layer; masks: the FLAME_masks dict (optional; used to paint
    lips, brows, eyes and hair and to define the face region); scene: :class:`SceneConfig`.
    """

    def __init__(self, flame: Any, scene: SceneConfig, masks: dict | None = None) -> None:
        self.flame = flame
        self.scene = scene
        self.faces = np.asarray(flame.faces.cpu().numpy() if torch.is_tensor(flame.faces) else flame.faces,
                                dtype=np.int64)
        with torch.no_grad():
            out = flame(shape_coeffs=torch.zeros(1, N_SHAPE))
        self.template = out.vertices[0].double().numpy()
        self.template_lmk = out.landmarks68[0].double().numpy()
        V = self.template.shape[0]
        self.n_vertices = V
        lo, hi = self.template.min(0), self.template.max(0)
        self.center = (lo + hi) / 2.0
        self.extent = float(np.max(hi - lo))
        self.masks = {k: np.asarray(v, dtype=np.int64) for k, v in (masks or {}).items()}
        face_idx = self.masks.get("face")
        self.face_vertex = np.zeros(V, bool)
        if face_idx is not None and len(face_idx):
            self.face_vertex[face_idx] = True
        else:
            self.face_vertex[:] = True
        self.face_tri = self.face_vertex[self.faces].any(1)
        self._paint_regions()
        # back faces can be skipped when the head is closed and wound outwards (FLAME's is not
        # closed at the neck, so this is checked rather than assumed)
        self.cull = _outward_closed(self.template, self.faces)
        half = math.tan(math.radians(scene.fov_deg) / 2.0)
        self.distance = 0.5 * self.extent / (scene.fill * half)

    # ---- albedo
    def _paint_regions(self) -> None:
        """Template-space regions (weights in [0,1] per vertex) for lips, brows, eyes, pupils, hair."""
        v, lm = self.template, self.template_lmk
        front = v[:, 2] > np.percentile(v[:, 2], 40)

        def near(points: np.ndarray, radius: float) -> np.ndarray:
            d = np.linalg.norm(v[:, None, :2] - points[None, :, :2], axis=-1).min(1)
            return np.clip(1.5 - d / radius, 0.0, 1.0) * front

        eye_w = np.linalg.norm(lm[39, :2] - lm[36, :2])
        self.w_lips = near(np.concatenate([lm[48:60], (lm[48:60] + lm[[51, 57]].mean(0)) / 2]), 0.12 * eye_w * 2)
        self.w_brows = near(lm[17:27], 0.18 * eye_w)
        eyes = kps_from_landmarks68(lm)[:2]  # image-left, image-right eye
        self.w_eyes = near(eyes, 0.3 * eye_w)
        self.w_pupil = near(eyes, 0.12 * eye_w)
        hair = np.zeros(len(v))
        if "scalp" in self.masks and len(self.masks["scalp"]):
            hair[self.masks["scalp"]] = 1.0
        self.w_hair = hair

    def sample_albedo(self, rng: np.random.Generator) -> np.ndarray:
        """Per-vertex albedo (V,3) float32 in [0,1]: skin tone, smooth noise, lips, brows, eyes, hair."""
        tones = np.array([[0.96, 0.84, 0.74], [0.90, 0.72, 0.60], [0.80, 0.60, 0.46],
                          [0.62, 0.43, 0.30], [0.42, 0.28, 0.19]])
        t = rng.uniform(0, len(tones) - 1)
        i = int(t)
        skin = tones[i] * (1 - (t - i)) + tones[min(i + 1, len(tones) - 1)] * (t - i)
        v = self.template / max(self.extent, 1e-9)
        noise = np.zeros(len(v))
        for _ in range(4):
            k = rng.normal(0.0, 6.0, 3)
            noise += rng.uniform(0.02, 0.05) * np.sin(v @ k + rng.uniform(0, 2 * math.pi))
        col = skin[None] * (1.0 + noise[:, None])
        lip = skin * np.array([0.85, 0.55, 0.55]) * rng.uniform(0.8, 1.0)
        col = col * (1 - self.w_lips[:, None]) + lip * self.w_lips[:, None]
        hair_col = np.array([0.12, 0.08, 0.05]) * rng.uniform(0.5, 4.0)
        brow = np.clip(hair_col, 0, 1)
        col = col * (1 - 0.8 * self.w_brows[:, None]) + brow * 0.8 * self.w_brows[:, None]
        if rng.random() < 0.8:
            col = col * (1 - self.w_hair[:, None]) + np.clip(hair_col, 0, 1) * self.w_hair[:, None]
        sclera = np.array([0.92, 0.9, 0.88])
        col = col * (1 - self.w_eyes[:, None]) + sclera * self.w_eyes[:, None]
        iris = rng.uniform(0.05, 0.4, 3)
        col = col * (1 - self.w_pupil[:, None]) + iris * self.w_pupil[:, None]
        return np.clip(col, 0, 1).astype(np.float32)

    # ---- scene
    def sample_background(self, rng: np.random.Generator) -> np.ndarray:
        """(S,S,3) uint8: a linear gradient between two random colours plus smooth noise."""
        from PIL import Image

        S = self.scene.size
        c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
        ang = rng.uniform(0, 2 * math.pi)
        r = np.linspace(-0.5, 0.5, S, dtype=np.float32)
        g = r[None, :] * np.float32(math.cos(ang)) + r[:, None] * np.float32(math.sin(ang))
        g = (g - g.min()) / max(float(g.max() - g.min()), 1e-9)
        gs = int(rng.integers(3, 9))
        grid = rng.uniform(-1, 1, (gs, gs)).astype(np.float32)
        n = np.asarray(Image.fromarray(grid, mode="F").resize((S, S), Image.BILINEAR))
        n = n * np.float32(rng.uniform(10, 40))
        img = c0 + (c1 - c0) * g[..., None] + n[..., None]
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)

    def sample_pose(self, rng: np.random.Generator) -> np.ndarray:
        """Head rotation as FLAME ``global_pose`` axis-angle (3,) float32 from yaw/pitch/roll ranges."""
        from scipy.spatial.transform import Rotation

        sc = self.scene
        yaw, pitch, roll = rng.uniform(*sc.yaw), rng.uniform(*sc.pitch), rng.uniform(*sc.roll)
        R = Rotation.from_euler("YXZ", [yaw, pitch, roll], degrees=True)
        return R.as_rotvec().astype(np.float32)

    def sample_camera(self, rng: np.random.Generator) -> Camera:
        """Frontal camera at the framing distance, aimed at a slightly shifted head centre."""
        sc = self.scene
        shift = rng.uniform(-sc.shift, sc.shift, 2) * self.extent
        target = self.center + np.array([shift[0], shift[1], 0.0])
        eye = target + np.array([0.0, 0.0, self.distance])
        return Camera.from_fov(sc.fov_deg, sc.size, sc.size, eye=eye, target=target)

    # ---- the whole image
    def render_batch(
        self,
        rng: np.random.Generator,
        shape_coeffs: np.ndarray,
        exp_coeffs: np.ndarray,
        jaw_pose: np.ndarray,
        albedo: np.ndarray,
        occlusion: OcclusionConfig | None = None,
        force_occlusion: bool = False,
        global_pose: np.ndarray | None = None,
    ) -> list[FaceSample]:
        """Render B faces (one identity or several): shape (B,300), exp (B,100), jaw (B,3),
        albedo (V,3) or (B,V,3). Pose, camera, light, background and occluders are drawn from
        ``rng`` in a fixed order (per image: pose, camera, light, background, occluder)."""
        B = shape_coeffs.shape[0]
        poses, cams, lights, bgs, amb, dif = [], [], [], [], [], []
        for b in range(B):
            poses.append(self.sample_pose(rng) if global_pose is None else np.asarray(global_pose[b], np.float32))
            cams.append(self.sample_camera(rng))
            ld = np.array([rng.uniform(-1, 1), rng.uniform(-0.5, 1), 1.0])
            lights.append(ld / np.linalg.norm(ld))
            amb.append(rng.uniform(*self.scene.ambient))
            dif.append(rng.uniform(*self.scene.diffuse))
            bgs.append(self.sample_background(rng))
        with torch.no_grad():
            out = self.flame(
                shape_coeffs=torch.as_tensor(shape_coeffs, dtype=torch.float32),
                exp_coeffs=torch.as_tensor(exp_coeffs, dtype=torch.float32),
                jaw_pose=torch.as_tensor(jaw_pose, dtype=torch.float32),
                global_pose=torch.as_tensor(np.stack(poses), dtype=torch.float32),
            )
        verts = out.vertices.numpy()
        lmk = out.landmarks68.numpy()
        samples = []
        occ_cfg = occlusion if occlusion is not None else self.scene.occlusion
        r = render(verts, self.faces, cams, colors=albedo, light_dir=np.stack(lights), ambient=amb,
                   diffuse=dif, background=np.stack(bgs), cull_backfaces=self.cull)
        images = r.image_uint8()
        lm2s = r.project(lmk)
        for b in range(B):
            clean = images[b]
            kps = kps_from_landmarks68(lm2s[b])
            occ = occlude_with_info(clean, rng, occ_cfg, kps=kps, force=force_occlusion)
            samples.append(self._finish(r.face_id[b], clean, occ, lm2s[b], kps, verts[b], cams[b], poses[b]))
        return samples

    def reocclude(self, sample: FaceSample, rng: np.random.Generator,
                  occlusion: OcclusionConfig | None) -> FaceSample:
        """The same render with another occluder (``None``: none), drawn from ``rng``."""
        if sample.face_id is None:
            raise ValueError("reocclude needs a sample from render_batch (it carries the face-id buffer)")
        if occlusion is None:
            occlusion, force = OcclusionConfig(prob=0.0), False
        else:
            force = True
        occ = occlude_with_info(sample.clean, rng, occlusion, kps=sample.kps, force=force)
        return self._finish(sample.face_id, sample.clean, occ, sample.landmarks2d, sample.kps,
                            sample.vertices, sample.camera, sample.global_pose)

    def _finish(self, fid, clean, occ, lm2, kps, verts, cam, pose) -> FaceSample:
        head = fid >= 0
        mask = occ.mask
        V = self.n_vertices
        S = self.scene.size
        F = self.faces.shape[0]
        seen = np.zeros(F, bool)
        seen[fid[head]] = True
        in_render = np.zeros(V, bool)
        in_render[self.faces[seen].reshape(-1)] = True
        # a seen vertex is hidden when the occluder covers the pixel it projects to
        px = np.rint(cam.project(verts)).astype(np.int64)
        inside = (px[:, 0] >= 0) & (px[:, 0] < S) & (px[:, 1] >= 0) & (px[:, 1] < S)
        in_render &= inside
        pc = np.clip(px, 0, S - 1)
        visible = in_render & ~mask[pc[:, 1], pc[:, 0]]
        face_px = head.copy()
        face_px[head] = self.face_tri[fid[head]]
        n_face = int(face_px.sum())
        occ_frac = float((face_px & mask).sum()) / n_face if n_face else 0.0
        mpx = np.clip(np.rint(lm2[_MOUTH]).astype(int), 0, S - 1)
        mouth_occ = bool(mask[mpx[:, 1], mpx[:, 0]].mean() >= 0.5)
        return FaceSample(
            image=occ.image, clean=clean, occluder_mask=mask, face_mask=head, kps=kps.astype(np.float32),
            landmarks2d=lm2.astype(np.float32), vertex_in_render=in_render, vertex_visible=visible,
            occluded_fraction=occ_frac, mouth_occluded=mouth_occ, occluder=occ.kind, camera=cam,
            vertices=verts.astype(np.float32), global_pose=np.asarray(pose, np.float32), face_id=fid,
        )


def _outward_closed(vertices: np.ndarray, faces: np.ndarray) -> bool:
    """True when every edge is shared by exactly two triangles in opposite directions (closed,
    consistently wound) and the signed volume is positive (normals point outwards)."""
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    V = int(vertices.shape[0])
    fwd = e[:, 0] * V + e[:, 1]
    rev = e[:, 1] * V + e[:, 0]
    if len(np.unique(fwd)) != len(fwd) or not np.array_equal(np.sort(fwd), np.sort(rev)):
        return False
    t = vertices[faces]
    vol = np.einsum("ij,ij->i", t[:, 0], np.cross(t[:, 1], t[:, 2])).sum() / 6.0
    return bool(vol > 0)
