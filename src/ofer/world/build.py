"""The synthetic world: procedural FLAME-format heads rendered on the CPU, occluded, and written
in the training layout.

No licensed asset is needed. A world holds

* ``flame/``: the synthetic FLAME assets (``generic_model.pkl``, ``landmark_embedding.npy``,
  ``FLAME_masks.pkl``) that every parameter file of the world refers to;
* ``WORLDID`` (identity data for IdGen / IdRank, MICA layout): per identity ("actor") a set of
  renders under random head pose, light, albedo, background, mild expression and occluders, and
  one ``FLAME_parameters/<actor>/<actor>.npz`` with ``betas`` (400 = 300 shape + 100 expression,
  expression zero) and ``pose`` (15 = global, neck, jaw, eyes; zero);
* ``WORLDEXP`` (expression data for ExpGen): every "actor" ``<id>__e<k>__<frame>`` is one frame
  of a training identity with its own expression; ``betas`` = identity shape + expression
  coefficients (the prior draws at most the first 50), ``pose[6:9]`` the jaw;
* ``image_paths/<NAME>_TRAIN.npy`` / ``<NAME>_VAL.npy``: pickled dicts
  ``{actor: ([image relpaths], npz relpath)}`` as MICA's lists (split by identity);
* ``<NAME>/arcface_input/<actor>/<img>.jpg`` (224 crop) and ``.npy`` (ArcFace input), made by the
  preprocessing step from the renders and their keypoint sidecars;
* ``test/``: renders of held-out identities with expressions, each with a ground-truth
  ``gt/<id>.npz`` (coefficients, visibility, occlusion statistics) and ``gt/<id>_mask.png``.
  Every test scene (identity, expression, pose, camera, light, background) is written in
  :data:`TEST_VARIANTS`: ``clean`` (no occluder), ``occluded`` (a random occluder of
  ``test_occlusion_area``, by default 30-70% of the face box) and ``mouth`` (a face mask
  over nose tip, mouth and chin), ``test<i>_<j>_<variant>``; so the effect of an occluder
  can be measured on otherwise identical images;
* ``world.json``: seed, counts, splits, prior, scene and camera.

Everything is a pure function of the arguments: the same seed gives the same bytes.
Example::

    python -m ofer.world --output data/world --identities 40 --images-per-identity 8 \\
        --expression-frames 4 --test-identities 20
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ConfigError, OferError
from ..render import Camera, render
from ..data.occlusion import OcclusionConfig, occlude_with_info

__all__ = [
    "HeadPrior",
    "SceneConfig",
    "WorldConfig",
    "FaceSample",
    "FaceRenderer",
    "kps_from_landmarks68",
    "build_world",
    "make_crops",
    "save_npz_deterministic",
    "main",
]

WORLD_FORMAT_VERSION = 1
ID_NAME = "WORLDID"
EXP_NAME = "WORLDEXP"
N_SHAPE, N_EXP = 300, 100
#: channel order of the world's ArcFace blobs: RGB, as MICA's files (the layout's convention)
ARCFACE_CHANNEL_ORDER = "rgb"

#: iBUG-68 index groups used for the five insightface keypoints
_LEFT_EYE = list(range(36, 42))  # appears on the image left in a frontal view
_RIGHT_EYE = list(range(42, 48))
_NOSE_TIP = 30
_MOUTH_LEFT, _MOUTH_RIGHT = 48, 54
_MOUTH = list(range(48, 68))


def kps_from_landmarks68(lmk: np.ndarray) -> np.ndarray:
    """Five insightface keypoints from iBUG-68 landmarks (..., 68, D) -> (..., 5, D).

    Order: image-left eye (mean of 36..41), image-right eye (mean of 42..47), nose tip (30),
    image-left mouth corner (48), image-right mouth corner (54).
    """
    lmk = np.asarray(lmk)
    return np.stack([
        lmk[..., _LEFT_EYE, :].mean(-2), lmk[..., _RIGHT_EYE, :].mean(-2),
        lmk[..., _NOSE_TIP, :], lmk[..., _MOUTH_LEFT, :], lmk[..., _MOUTH_RIGHT, :],
    ], axis=-2)


# --------------------------------------------------------------------------- configuration


def _check_range(name: str, r: Sequence[float], lo: float = -math.inf, hi: float = math.inf) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in r)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a (min, max) pair of numbers, got {r!r}") from None
    if not (lo <= a <= b <= hi):
        raise ConfigError(f"{name} must satisfy {lo} <= min <= max <= {hi}, got {r!r}")
    return a, b


@dataclass(frozen=True)
class HeadPrior:
    """Prior over FLAME coefficients: N(0, sigma) on the first ``*_active`` coefficients, rest zero.

    shape_active / shape_sigma: identity (beta) coefficients drawn, and their std (one number,
    or one per active coefficient: a world can vary mostly what a camera sees).
    exp_active / exp_sigma: expression (psi) coefficients drawn (at most 50), and their std (one
    number, or one per active coefficient).
    jaw_open: range of the jaw opening (rotation about x, radians; positive opens the mouth).
    jaw_side: std of the small sideways jaw rotation (about y, radians).
    """

    shape_active: int = 20
    shape_sigma: float | tuple[float, ...] = 1.0
    exp_active: int = 10
    exp_sigma: float | tuple[float, ...] = 1.0
    jaw_open: tuple[float, float] = (0.0, 0.25)
    jaw_side: float = 0.02

    def __post_init__(self) -> None:
        if not (0 <= int(self.shape_active) <= N_SHAPE):
            raise ConfigError(f"prior.shape_active must be in [0, {N_SHAPE}], got {self.shape_active!r}")
        if not (0 <= int(self.exp_active) <= 50):
            raise ConfigError(f"prior.exp_active must be in [0, 50], got {self.exp_active!r}")
        sigmas = []
        for name in ("shape", "exp"):
            value, active = getattr(self, f"{name}_sigma"), int(getattr(self, f"{name}_active"))
            if isinstance(value, (int, float)):
                sig = [float(value)]
            else:
                sig = [float(v) for v in value]
                if len(sig) != active:
                    raise ConfigError(f"prior.{name}_sigma must be one number or {active} numbers "
                                      f"(one per active coefficient), got {len(sig)}")
                object.__setattr__(self, f"{name}_sigma", tuple(sig))
            sigmas += sig
        if min(sigmas, default=0.0) < 0 or self.jaw_side < 0:
            raise ConfigError("prior: standard deviations must be >= 0")
        object.__setattr__(self, "jaw_open", _check_range("prior.jaw_open", self.jaw_open, -0.5, 1.0))

    def sample_identity(self, rng: np.random.Generator) -> np.ndarray:
        """Identity coefficients ``shape_coeffs`` (300,) float32."""
        out = np.zeros(N_SHAPE, np.float32)
        sigma = np.asarray(self.shape_sigma, np.float64)
        out[: self.shape_active] = rng.normal(0.0, sigma, self.shape_active)
        return out

    def sample_expression(self, rng: np.random.Generator, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """``(exp_coeffs (100,), jaw_pose (3,))`` float32; ``scale`` shrinks the expression."""
        exp = np.zeros(N_EXP, np.float32)
        exp[: self.exp_active] = scale * rng.normal(0.0, np.asarray(self.exp_sigma, np.float64), self.exp_active)
        jaw = np.zeros(3, np.float32)
        jaw[0] = scale * rng.uniform(*self.jaw_open)
        jaw[1] = scale * rng.normal(0.0, self.jaw_side)
        return exp, jaw


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
            object.__setattr__(self, name, _check_range(f"scene.{name}", getattr(self, name), -90.0, 90.0))
        for name in ("ambient", "diffuse"):
            object.__setattr__(self, name, _check_range(f"scene.{name}", getattr(self, name), 0.0, 2.0))
        if not (0.0 < self.fov_deg < 120.0):
            raise ConfigError(f"scene.fov_deg must be in (0, 120), got {self.fov_deg!r}")
        if not (0.05 <= self.fill <= 1.5):
            raise ConfigError(f"scene.fill must be in [0.05, 1.5], got {self.fill!r}")


@dataclass(frozen=True)
class WorldConfig:
    """What :func:`build_world` writes (see the module docstring).

    identities / images_per_identity: WORLDID actors and renders each.
    expression_frames / images_per_frame: WORLDEXP frames per training identity, renders each.
    test_identities / test_images_per_identity: held-out identities and their test scenes
    (each written in the :data:`TEST_VARIANTS`). test_occlusion_area: (min, max) area of the
    ``occluded`` variant's occluder, a fraction of the face box (its kinds are the scene's).
    val_fraction: share of the identities listed in the ``_VAL`` files (at least one when
    there are two or more identities). id_expression_scale: the identity renders carry a
    random expression shrunk by this factor (0 = neutral faces). vertices: approximate vertex
    count of the synthetic head. flame_seed: seed of the head model itself (kept apart from
    ``seed`` so that worlds of different seeds share one head model). crops: also write the
    224 crops and ArcFace inputs (``<NAME>/arcface_input``).
    """

    identities: int = 40
    images_per_identity: int = 8
    expression_frames: int = 2
    images_per_frame: int = 2
    test_identities: int = 20
    test_images_per_identity: int = 1
    test_occlusion_area: tuple[float, float] = (0.3, 0.7)
    seed: int = 0
    vertices: int = 5023
    flame_seed: int = 0
    val_fraction: float = 0.1
    id_expression_scale: float = 0.5
    crops: bool = True
    prior: HeadPrior = field(default_factory=HeadPrior)
    scene: SceneConfig = field(default_factory=SceneConfig)

    def __post_init__(self) -> None:
        for name in ("identities", "images_per_identity", "images_per_frame"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"world.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("expression_frames", "test_identities", "test_images_per_identity"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"world.{name} must be >= 0, got {getattr(self, name)!r}")
        if not (0.0 <= self.val_fraction < 1.0):
            raise ConfigError(f"world.val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if int(self.vertices) < 500:
            raise ConfigError(f"world.vertices must be >= 500, got {self.vertices!r}")
        area = _check_range("world.test_occlusion_area", self.test_occlusion_area, 0.0, 1.0)
        if area[0] <= 0:
            raise ConfigError(f"world.test_occlusion_area must be above 0, got {self.test_occlusion_area!r}")
        object.__setattr__(self, "test_occlusion_area", area)


# --------------------------------------------------------------------------- rendering faces


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


#: The variants every test scene is written in: no occluder, a random occluder (the scene's
#: kinds, ``WorldConfig.test_occlusion_area``), a face mask over nose tip, mouth and chin.
TEST_VARIANTS: tuple[str, ...] = ("clean", "occluded", "mouth")


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
        eyes = np.stack([lm[_LEFT_EYE].mean(0), lm[_RIGHT_EYE].mean(0)])
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


# --------------------------------------------------------------------------- deterministic writers


def save_npz_deterministic(fileobj: Any, **arrays: np.ndarray) -> None:
    """Like ``np.savez`` but byte-for-byte reproducible (fixed zip timestamps, sorted order kept
    as given). Readable with ``np.load``; object arrays are refused."""
    with zipfile.ZipFile(fileobj, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            arr = np.asanyarray(arr)
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr, allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def _write(path: Path, data: bytes) -> None:
    # the whole world is built in a staging folder that is renamed at the end, so single
    # files need no temp-and-rename of their own
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _kps_text(kps: np.ndarray) -> bytes:
    return "".join(f"{x:.3f} {y:.3f}\n" for x, y in np.asarray(kps, np.float64)).encode()


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    save_npz_deterministic(buf, **arrays)
    return buf.getvalue()


def _list_bytes(d: dict) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array(d, dtype=object), allow_pickle=True)
    return buf.getvalue()


def _write_render(root: Path, rel: str, s: FaceSample) -> None:
    """``root/<rel>.png`` + ``.kps.txt`` + ``<rel>_mask.png``."""
    base = root / rel
    _write(base.with_name(base.name + ".png"), _png_bytes(s.image))
    _write(base.with_name(base.name + ".kps.txt"), _kps_text(s.kps))
    _write(base.with_name(base.name + "_mask.png"), _png_bytes((s.occluder_mask * 255).astype(np.uint8)))


def _params(shape: np.ndarray, exp: np.ndarray | None = None, jaw: np.ndarray | None = None) -> bytes:
    betas = np.zeros(N_SHAPE + N_EXP, np.float32)
    betas[:N_SHAPE] = shape
    if exp is not None:
        betas[N_SHAPE:] = exp
    pose = np.zeros(15, np.float32)
    if jaw is not None:
        pose[6:9] = jaw
    return _npz_bytes(betas=betas, pose=pose)


# --------------------------------------------------------------------------- crops


def make_crops(output_dir: Path, items: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """Write the 224 crop ``<output>/<rel>.jpg`` and ArcFace input ``<rel>.npy`` of each render.

    items: ``(relpath without extension, image (H,W,3) uint8, kps (5,2))``. Uses the
    preprocessing step's face preparation (:func:`ofer.data.images.prepare_face_array`, the
    alignment from the keypoints, no detector; what ``python -m ofer.preprocess`` does with the
    ``.kps.txt`` sidecars) on the in-memory renders, with the MICA conventions of this layout:
    **RGB** ArcFace blob, JPEG quality 95 (:data:`ARCFACE_CHANNEL_ORDER`).
    """
    from ..data.images import prepare_face_array
    from PIL import Image

    for rel, img, kps in items:
        face = prepare_face_array(img, kps=np.asarray(kps, np.float64), name=rel, source_hint="sidecar",
                                  channel_order=ARCFACE_CHANNEL_ORDER)
        buf = io.BytesIO()
        Image.fromarray(face.farl_crop).save(buf, format="JPEG", quality=95)
        base = output_dir / rel
        _write(base.with_name(base.name + ".jpg"), buf.getvalue())
        nb = io.BytesIO()
        np.save(nb, face.arcface.astype(np.float32))
        _write(base.with_name(base.name + ".npy"), nb.getvalue())


# --------------------------------------------------------------------------- the world


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """Independent generator per (stream, item): adding identities never changes existing ones."""
    return np.random.default_rng([int(seed), int(stream), int(index)])


_S_ID, _S_IDIMG, _S_EXP, _S_TEST = 1, 2, 3, 4


def _split(actors: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    n_val = 0 if len(actors) < 2 else max(1, int(round(val_fraction * len(actors)))) if val_fraction > 0 else 0
    n_val = min(n_val, len(actors) - 1)
    return actors[: len(actors) - n_val], actors[len(actors) - n_val:]


def _load_flame(flame_dir: Path):
    from ..flame import FLAME

    return FLAME(flame_dir / "generic_model.pkl", flame_dir / "landmark_embedding.npy", n_shape=N_SHAPE, n_exp=N_EXP)


def _load_masks(path: Path) -> dict:
    from ..flame import safe_load_pickle

    return dict(safe_load_pickle(path))


def build_world(output: str | os.PathLike, config: WorldConfig, *, overwrite: bool = False,
                progress: bool = False, workers: int | None = 1) -> dict:
    """Build a synthetic world in ``output`` (see the module docstring); returns world.json's dict.

    The world is assembled in a staging folder next to ``output`` and renamed into place at the
    end, so an interrupted run leaves no half-written world. An existing non-empty ``output``
    is an error unless ``overwrite``. ``workers`` processes render in parallel (``None``: one
    per CPU core, at most 4); the output is the same for any number of workers.
    """
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OferError(f"output folder {out} exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".building", dir=out.parent))
    t0 = time.time()
    threads = torch.get_num_threads()
    # the renderer works on many small tensors: one thread is faster than several, and far
    # faster than several competing with other processes for the cores
    torch.set_num_threads(1)
    try:
        if workers is None:
            workers = min(4, os.cpu_count() or 1)
        info = _build(stage, config, progress, int(workers))
        info["build_seconds"] = None  # kept out of the file: world.json must be reproducible
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(stage, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    info["build_seconds"] = round(time.time() - t0, 2)
    return info


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


# A world is built as independent jobs, one per identity and part ("id", "exp", "test"). Each
# job draws from its own generator and writes its own files, so the output does not depend on
# the order of the jobs or on how many processes run them.

_WORKER: dict[str, Any] = {}


def _worker_setup(root: str, cfg: WorldConfig) -> None:
    torch.set_num_threads(1)
    flame_dir = Path(root) / "flame"
    flame = _load_flame(flame_dir)
    _WORKER["fr"] = FaceRenderer(flame, cfg.scene, _load_masks(flame_dir / "FLAME_masks.pkl"))
    _WORKER["root"] = Path(root)
    _WORKER["cfg"] = cfg


def _identity(cfg: WorldConfig, fr: FaceRenderer, i: int) -> tuple[np.ndarray, np.ndarray]:
    g = _rng(cfg.seed, _S_ID, i)
    return cfg.prior.sample_identity(g), fr.sample_albedo(g)


def _run_job(job: tuple[str, int]) -> dict:
    """Render and write one job; returns its list entries (and nothing heavy)."""
    part, i = job
    fr: FaceRenderer = _WORKER["fr"]
    root: Path = _WORKER["root"]
    cfg: WorldConfig = _WORKER["cfg"]
    prior = cfg.prior
    result: dict[str, Any] = {"part": part, "index": i, "entries": {}}
    crops: list = []
    if part == "id":
        actor = f"id{i:04d}"
        shape, albedo = _identity(cfg, fr, i)
        g = _rng(cfg.seed, _S_IDIMG, i)
        M = cfg.images_per_identity
        exps, jaws = zip(*(prior.sample_expression(g, cfg.id_expression_scale) for _ in range(M)))
        samples = fr.render_batch(g, np.tile(shape, (M, 1)), np.stack(exps), np.stack(jaws), albedo)
        rels = []
        for j, smp in enumerate(samples):
            rel = f"{actor}/{j:03d}"
            _write_render(root / "renders" / ID_NAME, rel, smp)
            crops.append((rel, smp.image, smp.kps))
            rels.append(rel + ".jpg")
        _write(root / ID_NAME / "FLAME_parameters" / actor / f"{actor}.npz", _params(shape))
        result["entries"][actor] = (rels, f"{actor}/{actor}.npz")
        name = ID_NAME
    elif part == "exp":
        actor = f"id{i:04d}"
        shape, albedo = _identity(cfg, fr, i)
        g = _rng(cfg.seed, _S_EXP, i)
        P = cfg.images_per_frame
        for k in range(cfg.expression_frames):
            exp, jaw = prior.sample_expression(g)
            samples = fr.render_batch(g, np.tile(shape, (P, 1)), np.tile(exp, (P, 1)), np.tile(jaw, (P, 1)), albedo)
            frame = f"{actor}__e{k:02d}__000"
            rels = []
            for j, smp in enumerate(samples):
                rel = f"{frame}/{j:03d}"
                _write_render(root / "renders" / EXP_NAME, rel, smp)
                crops.append((rel, smp.image, smp.kps))
                rels.append(rel + ".jpg")
            _write(root / EXP_NAME / "FLAME_parameters" / frame / f"{frame}.npz", _params(shape, exp, jaw))
            result["entries"][frame] = (rels, f"{frame}/{frame}.npz")
        name = EXP_NAME
    elif part == "test":
        _run_test_job(root, cfg, fr, i, result)
        return result
    else:  # pragma: no cover
        raise ValueError(part)
    if cfg.crops:
        make_crops(root / name / "arcface_input", crops)
    return result


def _run_test_job(root: Path, cfg: WorldConfig, fr: FaceRenderer, i: int, result: dict) -> None:
    occ = cfg.scene.occlusion
    variants = {
        "clean": None,
        "occluded": OcclusionConfig(prob=1.0, area=cfg.test_occlusion_area, kinds=occ.kinds, textures=occ.textures),
        "mouth": OcclusionConfig(prob=1.0, area=(0.05, 1.0), kinds=("facemask",), textures=occ.textures),
    }
    g = _rng(cfg.seed, _S_TEST, i)
    shape = cfg.prior.sample_identity(g)
    albedo = fr.sample_albedo(g)
    T = cfg.test_images_per_identity
    exps, jaws = zip(*(cfg.prior.sample_expression(g) for _ in range(T)))
    exps_a, jaws_a = np.stack(exps), np.stack(jaws)
    scenes = fr.render_batch(g, np.tile(shape, (T, 1)), exps_a, jaws_a, albedo,
                             occlusion=OcclusionConfig(prob=0.0))
    with torch.no_grad():
        neutral = fr.flame(shape_coeffs=torch.as_tensor(shape[None])).vertices[0].numpy()
    ids = []
    for j, scene in enumerate(scenes):
        for variant in TEST_VARIANTS:
            smp = fr.reocclude(scene, g, variants[variant])
            tid = f"test{i:04d}_{j:02d}_{variant}"
            ids.append(tid)
            _write(root / "test" / "images" / f"{tid}.png", _png_bytes(smp.image))
            _write(root / "test" / "images" / f"{tid}.kps.txt", _kps_text(smp.kps))
            _write(root / "test" / "gt" / f"{tid}_mask.png",
                   _png_bytes((smp.occluder_mask * 255).astype(np.uint8)))
            cam = smp.camera
            _write(root / "test" / "gt" / f"{tid}.npz", _npz_bytes(
                shape_coeffs=shape.astype(np.float32), exp_coeffs=exps_a[j].astype(np.float32),
                jaw_pose=jaws_a[j].astype(np.float32), global_pose=smp.global_pose,
                neck_pose=np.zeros(3, np.float32), eye_pose=np.zeros(6, np.float32),
                vertex_visible=smp.vertex_visible, vertex_in_render=smp.vertex_in_render,
                occluded_fraction=np.float32(smp.occluded_fraction), mouth_occluded=np.bool_(smp.mouth_occluded),
                occluder=np.array(smp.occluder or ""), kps=smp.kps, landmarks2d=smp.landmarks2d,
                vertices=smp.vertices, vertices_neutral=neutral.astype(np.float32),
                camera_K=cam.K.astype(np.float32), camera_R=cam.R.astype(np.float32),
                camera_t=cam.t.astype(np.float32), scene=np.array(f"test{i:04d}_{j:02d}"),
                variant=np.array(variant),
            ))
    result["test_ids"] = ids


def _build(root: Path, cfg: WorldConfig, progress: bool, workers: int) -> dict:
    from .head import write_synthetic_flame

    write_synthetic_flame(root / "flame", n_vertices=int(cfg.vertices), seed=int(cfg.flame_seed))
    jobs = [("id", i) for i in range(cfg.identities)]
    if cfg.expression_frames > 0:
        jobs += [("exp", i) for i in range(cfg.identities)]
    if cfg.test_images_per_identity > 0:
        jobs += [("test", i) for i in range(cfg.test_identities)]
    results: list[dict] = []
    t0 = time.time()
    if workers <= 1:
        _worker_setup(str(root), cfg)
        try:
            for k, job in enumerate(jobs):
                results.append(_run_job(job))
                if progress and (k + 1) % 20 == 0:
                    _log(progress, f"world: {k + 1}/{len(jobs)} jobs ({time.time() - t0:.1f} s)")
            fr = _WORKER["fr"]
        finally:
            _WORKER.clear()
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # fork on Linux (as torch's DataLoader; no main-module guard needed), spawn elsewhere
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_setup,
                                 initargs=(str(root), cfg)) as ex:
            for k, res in enumerate(ex.map(_run_job, jobs, chunksize=1)):
                results.append(res)
                if progress and (k + 1) % 20 == 0:
                    _log(progress, f"world: {k + 1}/{len(jobs)} jobs ({time.time() - t0:.1f} s)")
        fr = FaceRenderer(_load_flame(root / "flame"), cfg.scene, _load_masks(root / "flame" / "FLAME_masks.pkl"))

    # ---- lists, split by identity (results are in job order whatever the worker count)
    ids = [f"id{i:04d}" for i in range(cfg.identities)]
    M = cfg.images_per_identity
    id_lists: dict[str, tuple[list[str], str]] = {}
    exp_lists: dict[str, tuple[list[str], str]] = {}
    test_ids: list[str] = []
    for res in results:
        if res["part"] == "id":
            id_lists.update(res["entries"])
        elif res["part"] == "exp":
            exp_lists.update(res["entries"])
        else:
            test_ids.extend(res["test_ids"])
    exp_of = {frame: frame.split("__")[0] for frame in exp_lists}
    train_ids, val_ids = _split(ids, cfg.val_fraction)
    val_set = set(val_ids)
    lists = {
        f"{ID_NAME}_TRAIN": {a: id_lists[a] for a in train_ids},
        f"{ID_NAME}_VAL": {a: id_lists[a] for a in val_ids},
    }
    if exp_lists:
        lists[f"{EXP_NAME}_TRAIN"] = {a: v for a, v in exp_lists.items() if exp_of[a] not in val_set}
        lists[f"{EXP_NAME}_VAL"] = {a: v for a, v in exp_lists.items() if exp_of[a] in val_set}
    for name, d in lists.items():
        _write(root / "image_paths" / f"{name}.npy", _list_bytes(d))
    _log(progress, f"world: {len(jobs)} jobs done in {time.time() - t0:.1f} s")

    info = {
        "format_version": WORLD_FORMAT_VERSION,
        "seed": cfg.seed,
        "config": _jsonable(asdict(cfg)),
        "flame": {"dir": "flame", "n_vertices": fr.n_vertices, "n_faces": int(fr.faces.shape[0]),
                  "flame_seed": cfg.flame_seed},
        "camera": {"model": "pinhole, principal point at the image centre, looking along -z at the head",
                   "size": cfg.scene.size, "fov_deg": cfg.scene.fov_deg,
                   "focal_px": 0.5 * cfg.scene.size / math.tan(math.radians(cfg.scene.fov_deg) / 2),
                   "distance_m": fr.distance, "head_center_m": fr.center.tolist()},
        "datasets": {
            ID_NAME: {"actors": len(ids), "images": len(ids) * M, "train": train_ids, "val": val_ids},
            EXP_NAME: {"actors": len(exp_lists), "images": len(exp_lists) * cfg.images_per_frame,
                       "train": sorted(lists.get(f"{EXP_NAME}_TRAIN", {})),
                       "val": sorted(lists.get(f"{EXP_NAME}_VAL", {}))},
        },
        "lists": sorted(f"image_paths/{n}.npy" for n in lists),
        "test": {"ids": test_ids, "images": "test/images", "gt": "test/gt"},
        "crops": bool(cfg.crops),
        "arcface_channel_order": ARCFACE_CHANNEL_ORDER,
        "crop": "224 FaRL crop (1.6x the face box from the keypoints) as written by ofer.preprocess",
    }
    _write(root / "world.json", (json.dumps(info, indent=1, sort_keys=True) + "\n").encode())
    return info


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ofer.world",
        description="Build a synthetic OFER world: procedural FLAME heads rendered on the CPU, occluded, "
                    "written in the MICA/OFER training layout plus held-out test images with ground truth.",
    )
    p.add_argument("--output", required=True, help="target folder (must be empty unless --overwrite)")
    p.add_argument("--identities", type=int, default=40, help="WORLDID actors (default 40)")
    p.add_argument("--images-per-identity", type=int, default=8, help="renders per actor (default 8)")
    p.add_argument("--expression-frames", type=int, default=2, help="WORLDEXP frames per identity (default 2)")
    p.add_argument("--images-per-frame", type=int, default=2, help="renders per expression frame (default 2)")
    p.add_argument("--test-identities", type=int, default=20, help="held-out identities (default 20)")
    p.add_argument("--test-images-per-identity", type=int, default=1,
                   help="test scenes each, written clean, occluded and with a face mask (default 1)")
    p.add_argument("--test-occlusion-area", type=_floats, default=(0.3, 0.7), metavar="MIN,MAX",
                   help="occluder area of the 'occluded' test variant, fraction of the face box (default 0.3,0.7)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    p.add_argument("--vertices", type=int, default=5023, help="approximate head vertex count (default 5023)")
    p.add_argument("--flame-seed", type=int, default=0, help="seed of the synthetic head model (default 0)")
    p.add_argument("--occlusion-prob", type=float, default=0.5, help="occluder probability of training images")
    p.add_argument("--shape-sigma", type=_floats, default=None, metavar="S[,S...]",
                   help="std of the identity coefficients: one value, or one per coefficient (that many are "
                        "drawn; default 20 coefficients of std 1)")
    p.add_argument("--exp-sigma", type=_floats, default=None, metavar="S[,S...]",
                   help="std of the expression coefficients: one value, or one per coefficient (that many are "
                        "drawn; default 10 coefficients of std 1)")
    p.add_argument("--jaw-open", type=_floats, default=None, metavar="MIN,MAX",
                   help="range of the jaw opening in radians (default 0,0.25)")
    p.add_argument("--pose", type=_floats, default=None, metavar="YAW,PITCH,ROLL",
                   help="head rotation ranges +- in degrees (default 35,15,12)")
    p.add_argument("--id-expression-scale", type=float, default=0.5,
                   help="expression strength of the identity renders (0 = neutral; default 0.5)")
    p.add_argument("--no-crops", action="store_true", help="skip the 224 crops / ArcFace inputs")
    p.add_argument("--workers", type=int, default=0,
                   help="parallel processes (default 0 = one per core, at most 4); the output does not depend on it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    return p


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        kw: dict = {}
        for name, sig in (("shape", args.shape_sigma), ("exp", args.exp_sigma)):
            if sig is not None:  # several values set the number of active coefficients too
                kw[f"{name}_sigma"] = sig if len(sig) > 1 else sig[0]
                if len(sig) > 1:
                    kw[f"{name}_active"] = len(sig)
        if args.jaw_open is not None:
            kw["jaw_open"] = args.jaw_open
        prior = HeadPrior(**kw)
        pose = {}
        if args.pose is not None:
            if len(args.pose) != 3:
                raise ConfigError(f"--pose expects YAW,PITCH,ROLL, got {len(args.pose)} numbers")
            pose = {k: (-abs(v), abs(v)) for k, v in zip(("yaw", "pitch", "roll"), args.pose)}
        cfg = WorldConfig(
            identities=args.identities, images_per_identity=args.images_per_identity,
            expression_frames=args.expression_frames, images_per_frame=args.images_per_frame,
            test_identities=args.test_identities, test_images_per_identity=args.test_images_per_identity,
            test_occlusion_area=args.test_occlusion_area,
            seed=args.seed, vertices=args.vertices, flame_seed=args.flame_seed, crops=not args.no_crops,
            id_expression_scale=args.id_expression_scale, prior=prior,
            scene=SceneConfig(size=args.size, occlusion=OcclusionConfig(prob=args.occlusion_prob), **pose),
        )
        info = build_world(args.output, cfg, overwrite=args.overwrite, progress=not args.quiet,
                           workers=None if args.workers <= 0 else args.workers)
    except OferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    d = info["datasets"]
    print(f"wrote {args.output}: {d[ID_NAME]['images']} identity images ({d[ID_NAME]['actors']} actors), "
          f"{d[EXP_NAME]['images']} expression images ({d[EXP_NAME]['actors']} frames), "
          f"{len(info['test']['ids'])} test images in {info['build_seconds']:.1f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
