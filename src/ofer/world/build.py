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

from ..data.occlusion import OcclusionConfig
from ..errors import ConfigError, OferError
from .prior import N_EXP, N_SHAPE, HeadPrior, check_range
from .scene import FaceRenderer, FaceSample, SceneConfig

__all__ = [
    "WorldConfig",
    "TEST_VARIANTS",
    "build_world",
    "make_crops",
    "save_npz_deterministic",
    "main",
]

WORLD_FORMAT_VERSION = 1
ID_NAME = "WORLDID"
EXP_NAME = "WORLDEXP"
#: channel order of the world's ArcFace blobs: RGB, as MICA's files (the layout's convention)
ARCFACE_CHANNEL_ORDER = "rgb"


# --------------------------------------------------------------------------- configuration


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
        area = check_range("world.test_occlusion_area", self.test_occlusion_area, 0.0, 1.0)
        if area[0] <= 0:
            raise ConfigError(f"world.test_occlusion_area must be above 0, got {self.test_occlusion_area!r}")
        object.__setattr__(self, "test_occlusion_area", area)


#: The variants every test scene is written in: no occluder, a random occluder (the scene's
#: kinds, ``WorldConfig.test_occlusion_area``), a face mask over nose tip, mouth and chin.
TEST_VARIANTS: tuple[str, ...] = ("clean", "occluded", "mouth")


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


def write_file(path: Path, data: bytes) -> None:
    # the whole world is built in a staging folder that is renamed at the end, so single
    # files need no temp-and-rename of their own
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def png_bytes(img: np.ndarray) -> bytes:
    """PNG file bytes of an ``(H, W, 3)`` uint8 image."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def kps_text(kps: np.ndarray) -> bytes:
    """A ``.kps.txt`` sidecar's bytes: one ``x y`` line per keypoint."""
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
    write_file(base.with_name(base.name + ".png"), png_bytes(s.image))
    write_file(base.with_name(base.name + ".kps.txt"), kps_text(s.kps))
    write_file(base.with_name(base.name + "_mask.png"), png_bytes((s.occluder_mask * 255).astype(np.uint8)))


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
    preprocessing step's face preparation and crop writer
    (:func:`ofer.data.images.prepare_face_array`, the alignment from the keypoints, no
    detector; :func:`ofer.data.images.write_face_crops`; what ``python -m ofer.preprocess``
    does with the ``.kps.txt`` sidecars) on the in-memory renders, with the MICA conventions of
    this layout: **RGB** ArcFace blob (:data:`ARCFACE_CHANNEL_ORDER`), JPEG quality 95.
    """
    from ..data.images import prepare_face_array, write_face_crops

    for rel, img, kps in items:
        face = prepare_face_array(img, kps=np.asarray(kps, np.float64), name=rel, source_hint="sidecar",
                                  max_kps_residual=None,
                                  channel_order=ARCFACE_CHANNEL_ORDER)
        # the world is written in a staging folder renamed into place at the end: no temp files
        write_face_crops(face, output_dir / rel, atomic=False)


# --------------------------------------------------------------------------- the world


def item_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """Independent generator per (stream, item): adding identities never changes existing ones."""
    return np.random.default_rng([int(seed), int(stream), int(index)])


_S_ID, _S_IDIMG, _S_EXP, _S_TEST = 1, 2, 3, 4


def _split(actors: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    n_val = 0 if len(actors) < 2 else max(1, int(round(val_fraction * len(actors)))) if val_fraction > 0 else 0
    n_val = min(n_val, len(actors) - 1)
    return actors[: len(actors) - n_val], actors[len(actors) - n_val:]


def load_world_flame(flame_dir: Path):
    """The FLAME layer of a world's synthetic head (``<world>/flame``)."""
    from ..flame import FLAME

    return FLAME(flame_dir / "generic_model.pkl", flame_dir / "landmark_embedding.npy", n_shape=N_SHAPE, n_exp=N_EXP)


def load_world_masks(path: Path) -> dict:
    """A world's FLAME_masks.pkl-style region dict."""
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
    flame = load_world_flame(flame_dir)
    _WORKER["fr"] = FaceRenderer(flame, cfg.scene, load_world_masks(flame_dir / "FLAME_masks.pkl"))
    _WORKER["root"] = Path(root)
    _WORKER["cfg"] = cfg


def _identity(cfg: WorldConfig, fr: FaceRenderer, i: int) -> tuple[np.ndarray, np.ndarray]:
    g = item_rng(cfg.seed, _S_ID, i)
    return cfg.prior.sample_identity(g), fr.sample_albedo(g)


def _write_renders(folder: Path, prefix: str, samples: Sequence[FaceSample], crops: list) -> list[str]:
    """Write ``<folder>/<prefix>/<j>`` renders, queue their crops; the index's image names."""
    rels = []
    for j, smp in enumerate(samples):
        rel = f"{prefix}/{j:03d}"
        _write_render(folder, rel, smp)
        crops.append((rel, smp.image, smp.kps))
        rels.append(rel + ".jpg")
    return rels


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
        g = item_rng(cfg.seed, _S_IDIMG, i)
        M = cfg.images_per_identity
        exps, jaws = zip(*(prior.sample_expression(g, cfg.id_expression_scale) for _ in range(M)))
        samples = fr.render_batch(g, np.tile(shape, (M, 1)), np.stack(exps), np.stack(jaws), albedo)
        rels = _write_renders(root / "renders" / ID_NAME, actor, samples, crops)
        write_file(root / ID_NAME / "FLAME_parameters" / actor / f"{actor}.npz", _params(shape))
        result["entries"][actor] = (rels, f"{actor}/{actor}.npz")
        name = ID_NAME
    elif part == "exp":
        actor = f"id{i:04d}"
        shape, albedo = _identity(cfg, fr, i)
        g = item_rng(cfg.seed, _S_EXP, i)
        P = cfg.images_per_frame
        for k in range(cfg.expression_frames):
            exp, jaw = prior.sample_expression(g)
            samples = fr.render_batch(g, np.tile(shape, (P, 1)), np.tile(exp, (P, 1)), np.tile(jaw, (P, 1)), albedo)
            frame = f"{actor}__e{k:02d}__000"
            rels = _write_renders(root / "renders" / EXP_NAME, frame, samples, crops)
            write_file(root / EXP_NAME / "FLAME_parameters" / frame / f"{frame}.npz", _params(shape, exp, jaw))
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
    g = item_rng(cfg.seed, _S_TEST, i)
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
            write_file(root / "test" / "images" / f"{tid}.png", png_bytes(smp.image))
            write_file(root / "test" / "images" / f"{tid}.kps.txt", kps_text(smp.kps))
            write_file(root / "test" / "gt" / f"{tid}_mask.png",
                   png_bytes((smp.occluder_mask * 255).astype(np.uint8)))
            cam = smp.camera
            write_file(root / "test" / "gt" / f"{tid}.npz", _npz_bytes(
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
        fr = FaceRenderer(load_world_flame(root / "flame"), cfg.scene, load_world_masks(root / "flame" / "FLAME_masks.pkl"))

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
        write_file(root / "image_paths" / f"{name}.npy", _list_bytes(d))
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
    write_file(root / "world.json", (json.dumps(info, indent=1, sort_keys=True) + "\n").encode())
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
