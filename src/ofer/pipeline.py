"""The OFER reconstruction pipeline: images -> ranked identity + expression hypotheses.

For every image: detect/align -> encoders -> IdGen draws N identity (shape) hypotheses ->
FLAME -> IdRank scores them -> the best identity -> ExpGen draws M expressions (50
expression coefficients + jaw) -> FLAME on that identity. Images are processed in
batches; all N (or M) hypotheses of all images of a batch go through one batched
sampling loop. Hypothesis k of an image depends only on (seed, the image's relative path,
k), never on the batch size, the order of the images or the number of processes.

:class:`SampleConfig` is the typed schema of ``configs/sample.yaml``; :class:`Reconstructor`
holds the three models and two FLAME layers; :func:`run` processes a folder with resume,
per-image outputs written atomically, a run summary and optional sharding across
processes (``torchrun``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from torch import nn

from .config import _check, config_to_dict, resolve_path
from .errors import AssetError, CheckpointError, ConfigError, OferError
from .train.checkpoint import atomic_write_bytes, read_checkpoint

__all__ = ["SampleConfig", "Reconstructor", "ImageResult", "run", "PRESETS", "image_seed_index"]

STAGES = ("prepare", "encoders", "idgen", "flame", "idrank", "expgen", "writing")

#: Sampler settings of the presets: (idgen method, idgen steps, expgen method, expgen steps).
PRESETS = {
    "fast": ("dpmpp_2m", 20, "dpmpp_2m", 20),
    # the released pipeline: strided legacy DDIM (251 evaluations) and ancestral DDPM (1000)
    "faithful": ("legacy_ddim", None, "ddpm", 1000),
}


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------
@dataclass
class FlameSection:
    """FLAME assets (relative to ``data_root``)."""

    model_path: str = "FLAME2020/generic_model.pkl"
    landmark_embedding_path: str = "FLAME2020/landmark_embedding.npy"


@dataclass
class CheckpointSection:
    """The three trained models: our ``.pt`` checkpoints or the official OFER ``.tar`` files."""

    idgen: str = "checkpoints/model_idgen_flame20.tar"
    expgen: str = "checkpoints/model_expgen_flame20.tar"
    idrank: str = "checkpoints/model_idrank.tar"
    #: Front-face vertex indices for an official IdRank file (ours carry them):
    #: the original ``frontindices.npy`` or a ``FLAME_masks.pkl``.
    ranker_vertex_indices: Optional[str] = "pretrained/frontindices.npy"


@dataclass
class DetectorSection:
    """Face detection. ``auto``: SCRFD when installed and its weights exist, else sidecars only."""

    mode: Literal["auto", "scrfd", "none"] = "auto"
    model_dir: Optional[str] = None
    name: str = "antelopev2"
    det_size: int = 640
    det_thresh: float = 0.5


@dataclass
class SampleConfig:
    """Sampling reconstructions for a folder of images (``sample.py``)."""

    data_root: str = "data"
    device: str = "auto"
    seed: int = 0
    preset: Literal["fast", "faithful"] = "fast"
    n_identities: int = 100
    n_expressions: int = 100
    save_expressions: int = 15
    idgen_sampler: Optional[str] = None  # None: the preset's
    idgen_steps: Optional[int] = None
    expgen_sampler: Optional[str] = None
    expgen_steps: Optional[int] = None
    jaw_scale: Optional[float] = None  # None: the ExpGen checkpoint's (0.5 released)
    #: reproduce the released ranker's ArcFace call on one image (its BatchNorm1d is skipped)
    ranker_batch1_quirk: Optional[bool] = None  # None: True for "faithful"
    batch_size: int = 8
    channel_order: Literal["bgr", "rgb"] = "bgr"
    aligned: bool = False
    use_sidecar: bool = True
    mesh_format: Literal["ply", "obj"] = "ply"
    preview: bool = True
    progress: bool = True
    flame: FlameSection = field(default_factory=FlameSection)
    checkpoints: CheckpointSection = field(default_factory=CheckpointSection)
    detector: DetectorSection = field(default_factory=DetectorSection)

    def validate(self, p: str) -> None:
        from .diffusion.samplers import METHODS

        _check(self.n_identities >= 1, p + "n_identities", f"must be >= 1, got {self.n_identities}")
        _check(self.n_expressions >= 1, p + "n_expressions", f"must be >= 1, got {self.n_expressions}")
        _check(0 <= self.save_expressions <= self.n_expressions, p + "save_expressions",
               f"must be in [0, n_expressions={self.n_expressions}], got {self.save_expressions}")
        _check(self.batch_size >= 1, p + "batch_size", f"must be >= 1, got {self.batch_size}")
        for key in ("idgen_sampler", "expgen_sampler"):
            v = getattr(self, key)
            _check(v is None or v in METHODS, p + key, f"must be one of {list(METHODS)}, got {v!r}")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               p + "device", f"must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")

    # resolved settings -------------------------------------------------------------
    def sampler(self, which: str) -> tuple[str, Optional[int]]:
        idm, ids, exm, exs = PRESETS[self.preset]
        if which == "idgen":
            return self.idgen_sampler or idm, self.idgen_steps if self.idgen_steps is not None else ids
        return self.expgen_sampler or exm, self.expgen_steps if self.expgen_steps is not None else exs

    @property
    def batch1_quirk(self) -> bool:
        return self.preset == "faithful" if self.ranker_batch1_quirk is None else self.ranker_batch1_quirk


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> the local rank's GPU when CUDA is available, else CPU."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device' is {spec!r} but CUDA is not available")
    return dev


def image_seed_index(relpath: str) -> int:
    """Stable per-image index for the noise streams: a hash of the image's relative path."""
    return int.from_bytes(hashlib.sha1(relpath.encode()).digest()[:4], "little") & 0x7FFFFFFF


# ----------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------
def _is_conditioned_checkpoint(ckpt: dict) -> bool:
    model = ckpt.get("model")
    return isinstance(model, dict) and any(str(k).startswith("head.") for k in model)


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)} or sd


def arcface_arch(sd: dict) -> dict:
    """IResNet constructor arguments read off an insightface-layout state dict."""
    sd = _strip(_strip(sd, "module."), "arcface.")
    try:
        layers = tuple(1 + max((int(k.split(".")[1]) for k in sd if k.startswith(f"layer{i}.")), default=-1)
                       for i in range(1, 5))
        width = int(sd["conv1.weight"].shape[0])
        num_features = int(sd["fc.weight"].shape[0])
        side = int(round((sd["fc.weight"].shape[1] / (8 * width)) ** 0.5))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"the arcface weights are not in the insightface IResNet layout ({exc})") from exc
    return {"layers": layers, "width": width, "num_features": num_features, "input_size": side * 16}


def farl_arch(sd: dict) -> dict:
    """FaRLEncoder constructor arguments read off a CLIP visual-tower state dict (heads = width / 64)."""
    sd = _strip(_strip(sd, "visual."), "farl.")
    try:
        width, _, patch, _ = sd["conv1.weight"].shape
        grid = int(round((sd["positional_embedding"].shape[0] - 1) ** 0.5))
        layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
        out = int(sd["proj"].shape[1])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"the farl weights are not in the CLIP visual-tower layout ({exc})") from exc
    return {"image_size": grid * int(patch), "patch_size": int(patch), "width": int(width), "layers": layers,
            "heads": max(1, int(width) // 64), "output_dim": out}


def load_model(path: Path, kind: str, vertex_indices: Optional[Path] = None) -> nn.Module:
    """Encoders + head of ``kind`` from our training checkpoint or an official/converted file.

    Returns a :class:`~ofer.train.tasks.ConditionedModel` in eval mode.
    """
    from .train.tasks import ConditionedModel

    if not path.is_file():
        raise CheckpointError(f"{kind} checkpoint not found: {path} (see data/README.md, 'OFER checkpoints')")
    ckpt = read_checkpoint(path)
    if _is_conditioned_checkpoint(ckpt):
        from .train.build import load_trained_model

        model, _ = load_trained_model(path, kind)
        return model.eval()
    del ckpt
    from .compat import load_checkpoint
    from .nets.arcface import IResNet, load_arcface_state_dict
    from .nets.farl import FaRLEncoder, load_farl_state_dict

    head = load_checkpoint(path, kind=kind)
    enc = getattr(head, "encoder_state_dicts", {}) or {}
    if "arcface" not in enc:
        raise CheckpointError(f"{path}: no 'arcface' encoder weights in this {kind} checkpoint")
    arcface = IResNet(**arcface_arch(enc["arcface"]))
    load_arcface_state_dict(arcface, enc["arcface"])
    farl = None
    if kind in ("expgen", "idrank"):
        if "farl" not in enc:
            raise CheckpointError(f"{path}: no 'farl' encoder weights in this {kind} checkpoint")
        farl = FaRLEncoder(**farl_arch(enc["farl"]))
        load_farl_state_dict(farl, enc["farl"])
    if kind == "idrank" and bool((head.vertex_indices < 0).any()):
        if vertex_indices is None or not vertex_indices.is_file():
            raise AssetError(f"the official IdRank checkpoint needs the front-face vertex list "
                             f"(config key 'checkpoints.ranker_vertex_indices'): {vertex_indices} not found")
        head.set_vertex_indices(str(vertex_indices))
    return ConditionedModel(head, arcface, farl).eval()


def _same_weights(a: nn.Module | None, b: nn.Module | None) -> bool:
    if a is None or b is None or type(a) is not type(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


@dataclass
class ImageResult:
    """Everything sampled for one image (tensors on the CPU, FLAME units: metres)."""

    shape_coeffs: torch.Tensor  # (N, n_shape)
    scores: torch.Tensor  # (N,)
    ranked_index: int
    identity_vertices: torch.Tensor  # (V, 3) the ranked identity, neutral
    worst_vertices: torch.Tensor  # (V, 3) the lowest-scored identity
    landmarks68: torch.Tensor  # (68, 3)
    landmarks7: torch.Tensor  # (7, 3)
    exp_coeffs: torch.Tensor  # (M, n_exp)
    jaw_pose: torch.Tensor  # (M, 3) after the jaw scale
    expression_vertices: torch.Tensor  # (S, V, 3) the first S expressions


class Reconstructor:
    """IdGen + IdRank + ExpGen + FLAME, batched over images and hypotheses.

    Args:
        idgen, idrank, expgen: :class:`~ofer.train.tasks.ConditionedModel` s.
        flame_id: FLAME layer for identities (``n_exp`` any).
        flame_exp: FLAME layer with ExpGen's ``n_exp`` expression coefficients.
        cfg: the sampling settings.
    """

    def __init__(self, idgen: nn.Module, idrank: nn.Module, expgen: nn.Module, flame_id: nn.Module,
                 flame_exp: nn.Module, cfg: SampleConfig, device: torch.device) -> None:
        self.idgen, self.idrank, self.expgen = idgen, idrank, expgen
        self.flame_id, self.flame_exp = flame_id, flame_exp
        self.cfg, self.device = cfg, device
        if cfg.jaw_scale is not None:
            expgen.head.jaw_scale = float(cfg.jaw_scale)
        # encoders that hold the same weights are evaluated once per batch
        self._arcface = {"idgen": idgen.arcface, "idrank": idrank.arcface, "expgen": expgen.arcface}
        self._farl = {"idrank": idrank.farl, "expgen": expgen.farl}
        self._arc_alias = self._aliases(self._arcface)
        self._farl_alias = self._aliases(self._farl)
        for which, model in (("idgen", idgen), ("expgen", expgen)):
            method, steps = cfg.sampler(which)
            T = model.head.var_sched.num_steps
            if method == "legacy_ddim" and steps is not None:
                raise ConfigError(f"config key '{which}_steps' must be null for legacy_ddim (fixed stride 4)")
            if method == "ddpm" and steps not in (None, T):
                raise ConfigError(f"config key '{which}_steps' must be null or {T} for ddpm "
                                  f"(use ddim or dpmpp_2m for fewer steps), got {steps}")
        if flame_id.num_vertices != flame_exp.num_vertices:
            raise AssetError("the identity and expression FLAME layers have different vertex counts")

    @staticmethod
    def _aliases(mods: dict[str, nn.Module | None]) -> dict[str, str]:
        names = list(mods)
        alias = {}
        for i, n in enumerate(names):
            alias[n] = next((m for m in names[:i] if alias.get(m) == m and _same_weights(mods[m], mods[n])), n)
        return alias

    @classmethod
    def from_config(cls, cfg: SampleConfig, device: torch.device | None = None) -> "Reconstructor":
        from .flame import FLAME

        device = device or resolve_device(cfg.device)
        root = cfg.data_root
        ck = cfg.checkpoints
        vidx = resolve_path(root, ck.ranker_vertex_indices)
        idgen = load_model(resolve_path(root, ck.idgen), "idgen")
        expgen = load_model(resolve_path(root, ck.expgen), "expgen")
        idrank = load_model(resolve_path(root, ck.idrank), "idrank", vertex_indices=vidx)
        for name, m, want in (("idgen", idgen, "idgen"), ("expgen", expgen, "expgen"), ("idrank", idrank, "idrank")):
            if getattr(m.head, "kind", None) != want:
                raise CheckpointError(f"checkpoints.{name} holds a {getattr(m.head, 'kind', '?')} model, expected {want}")
        model_path = resolve_path(root, cfg.flame.model_path)
        lmk_path = resolve_path(root, cfg.flame.landmark_embedding_path)
        n_shape = idgen.head.param_dim
        flame_id = FLAME(model_path, lmk_path, n_shape=n_shape, n_exp=0)
        flame_exp = FLAME(model_path, None, n_shape=n_shape, n_exp=expgen.head.n_exp)
        if cfg.batch1_quirk:
            idrank.arcface.skip_bn1d_for_batch1 = True
        mods = [m.to(device).eval() for m in (idgen, idrank, expgen, flame_id, flame_exp)]
        return cls(*mods[:3], *mods[3:], cfg=cfg, device=device)

    # ------------------------------------------------------------------------------
    def _encode(self, arcface_x: torch.Tensor, farl_x: torch.Tensor, timer: dict) -> dict[str, torch.Tensor]:
        """Condition vectors of the three models for a batch of images."""
        t0 = time.perf_counter()
        arc: dict[str, torch.Tensor] = {}
        for name, mod in self._arcface.items():
            src = self._arc_alias[name]
            if name == "idrank" and self.cfg.batch1_quirk:
                # the released ranker encoded each image alone (BatchNorm1d skipped at B = 1)
                arc[name] = torch.cat([mod(arcface_x[i:i + 1]) for i in range(arcface_x.shape[0])])
            elif src != name and src in arc and not (src == "idrank" and self.cfg.batch1_quirk):
                arc[name] = arc[src]
            else:
                arc[name] = mod(arcface_x)
        far: dict[str, torch.Tensor] = {}
        for name, mod in self._farl.items():
            src = self._farl_alias[name]
            if src != name and src in far:
                far[name] = far[src]
                continue
            x = farl_x
            size = getattr(mod, "image_size", x.shape[-1])
            if x.shape[-1] != size:  # a smaller (demo) FaRL: resize the 224 crop to its input
                x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True,
                                                    align_corners=False)
            far[name] = mod(x)
        norm = {k: torch.nn.functional.normalize(v.float(), dim=-1) for k, v in arc.items()}
        conds = {
            "idgen": norm["idgen"],
            "idrank": torch.cat([far["idrank"].float(), norm["idrank"]], dim=-1),
            "expgen": torch.cat([far["expgen"].float(), norm["expgen"]], dim=-1),
        }
        timer["encoders"] += time.perf_counter() - t0
        return conds

    @torch.inference_mode()
    def reconstruct(self, arcface_x: torch.Tensor, farl_x: torch.Tensor, image_indices: list[int],
                    timer: dict | None = None) -> list[ImageResult]:
        """Reconstruct a batch.

        Args:
            arcface_x: (B, 3, 112, 112) ArcFace inputs in [-1, 1].
            farl_x: (B, 3, 224, 224) CLIP-normalised FaRL inputs.
            image_indices: (B,) stable per-image indices (see :func:`image_seed_index`).
            timer: optional dict of per-stage seconds, accumulated.
        """
        cfg = self.cfg
        timer = timer if timer is not None else {s: 0.0 for s in STAGES}
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        arcface_x, farl_x = arcface_x.to(self.device), farl_x.to(self.device)
        B, N, M = arcface_x.shape[0], cfg.n_identities, cfg.n_expressions
        conds = self._encode(arcface_x, farl_x, timer)

        t0 = time.perf_counter()
        method, steps = cfg.sampler("idgen")
        shapes = self.idgen.head.sample(conds["idgen"], N, method=method, steps=steps, seed=cfg.seed,
                                        image_indices=image_indices)  # (B, N, n_shape)
        sync()
        timer["idgen"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        out = self.flame_id(shape_coeffs=shapes.reshape(B * N, -1))
        verts = out.vertices.reshape(B, N, -1, 3)
        sync()
        timer["flame"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        rank = self.idrank.head
        scores = rank(rank.features(verts), conds["idrank"])  # (B, N)
        best = rank.select(scores)
        worst = scores.argmin(dim=1)
        sync()
        timer["idrank"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        method, steps = cfg.sampler("expgen")
        x = self.expgen.head.sample(conds["expgen"], M, method=method, steps=steps, seed=cfg.seed + 1,
                                    image_indices=image_indices)  # (B, M, n_exp + 3)
        exp_coeffs, jaw = self.expgen.head.split(x)
        sync()
        timer["expgen"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        b_idx = torch.arange(B, device=self.device)
        best_shape = shapes[b_idx, best]  # (B, n_shape)
        S = cfg.save_expressions
        exp_verts = None
        if S:
            exp_verts = self.flame_exp(
                shape_coeffs=best_shape.repeat_interleave(S, dim=0),
                exp_coeffs=exp_coeffs[:, :S].reshape(B * S, -1),
                jaw_pose=jaw[:, :S].reshape(B * S, 3),
            ).vertices.reshape(B, S, -1, 3)
        sync()
        timer["flame"] += time.perf_counter() - t0

        results = []
        for i in range(B):
            results.append(ImageResult(
                shape_coeffs=shapes[i].cpu(), scores=scores[i].float().cpu(), ranked_index=int(best[i]),
                identity_vertices=verts[i, best[i]].cpu(), worst_vertices=verts[i, worst[i]].cpu(),
                landmarks68=out.landmarks68.reshape(B, N, 68, 3)[i, best[i]].cpu(),
                landmarks7=out.landmarks7.reshape(B, N, 7, 3)[i, best[i]].cpu(),
                exp_coeffs=exp_coeffs[i].cpu(), jaw_pose=jaw[i].cpu(),
                expression_vertices=(exp_verts[i].cpu() if exp_verts is not None
                                     else torch.zeros(0, verts.shape[2], 3)),
            ))
        return results


# ----------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------
RESULT_FILE = "result.json"


def write_image_outputs(out_dir: Path, res: ImageResult, faces: np.ndarray, cfg: SampleConfig,
                        crop: np.ndarray | None, meta: dict) -> None:
    """Write one image's folder; ``result.json`` goes last, so its presence marks completion."""
    from .io import write_landmarks, write_mesh, write_npz

    out_dir.mkdir(parents=True, exist_ok=True)
    ext = cfg.mesh_format
    write_mesh(out_dir / f"identity.{ext}", res.identity_vertices, faces, unit="mm")
    for k in range(res.expression_vertices.shape[0]):
        write_mesh(out_dir / "expressions" / f"expression_{k:03d}.{ext}", res.expression_vertices[k], faces, unit="mm")
    write_npz(out_dir / "samples.npz", shape_coeffs=res.shape_coeffs.numpy().astype(np.float32),
              scores=res.scores.numpy(), ranked_index=np.int64(res.ranked_index),
              exp_coeffs=res.exp_coeffs.numpy().astype(np.float32), jaw_pose=res.jaw_pose.numpy().astype(np.float32),
              seed=np.int64(cfg.seed), image_index=np.int64(meta["image_index"]))
    write_landmarks(out_dir / "landmarks68.npy", res.landmarks68, unit="mm")
    write_landmarks(out_dir / "landmarks7.npy", res.landmarks7, unit="mm")
    if cfg.preview and crop is not None:
        _write_preview(out_dir / "preview.png", res, faces, crop)
    text = json.dumps(meta, indent=1)
    atomic_write_bytes(out_dir / RESULT_FILE, lambda f: f.write(text.encode()))


def _write_preview(path: Path, res: ImageResult, faces: np.ndarray, crop: np.ndarray) -> None:
    """Input crop, best- and worst-ranked identities, then up to 8 expressions."""
    from PIL import Image

    from .render import image_grid, render_mesh_preview

    size = 192
    cells = [np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR))]
    labels = ["input"]
    meshes = [res.identity_vertices, res.worst_vertices]
    labels += [f"ranked #{res.ranked_index}", "lowest score"]
    for k in range(min(8, res.expression_vertices.shape[0])):
        meshes.append(res.expression_vertices[k])
        labels.append(f"expression {k}")
    # float32 and one thread: the rasteriser works on many small tensors, where a second
    # thread costs more than it brings (and competes with the sampling for the cores)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cells += [render_mesh_preview(m.float().numpy(), faces, size=size, supersample=1) for m in meshes]
    finally:
        torch.set_num_threads(threads)
    grid = image_grid(cells, ncols=min(len(cells), 6) if len(cells) > 3 else 3, labels=labels)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))


# ----------------------------------------------------------------------------------------
# Running over a folder
# ----------------------------------------------------------------------------------------
def list_inputs(input_path: Path) -> tuple[Path, list[Path]]:
    """(root, sorted image files) for a folder (recursive) or a single file."""
    from .data.images import iter_images

    if input_path.is_file():
        return input_path.parent, [input_path]
    if not input_path.is_dir():
        raise OferError(f"input not found: {input_path}")
    return input_path, sorted(iter_images(input_path))


def _make_detector(cfg: SampleConfig):
    mode = cfg.detector.mode
    if mode == "none" or cfg.aligned:
        return None, "no detector (sidecars or aligned crops)"
    from .data.align import SCRFDDetector

    d = cfg.detector
    try:
        det = SCRFDDetector(model_dir=d.model_dir, name=d.name, det_size=(d.det_size, d.det_size),
                            det_thresh=d.det_thresh)
        return det, f"SCRFD ({d.name})"
    except OferError as exc:
        if mode == "scrfd":
            raise
        return None, f"no detector ({exc}); images need .kps.txt sidecars"


def _dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def run(cfg: SampleConfig, input_path: str | os.PathLike, output: str | os.PathLike,
        reconstructor: Reconstructor | None = None, log=print) -> dict:
    """Reconstruct every image under ``input_path`` into ``output``; returns the summary.

    Per image ``<output>/<relative path without suffix>/``: ``identity.<ext>`` (ranked,
    neutral, mm), ``expressions/expression_XXX.<ext>`` (mm), ``samples.npz`` (all sampled
    coefficients, ranker scores, ``ranked_index``), ``landmarks68.npy`` / ``landmarks7.npy``
    (mm, NoW-ready), ``preview.png`` and ``result.json`` (written last). Images whose
    ``result.json`` exists are skipped. Bad images are reported and skipped. Under
    ``torchrun`` images are sharded by rank; rank 0 merges the summaries.
    """
    from .data.images import prepare_face
    from .nets.farl import clip_normalize

    input_path, output = Path(input_path), Path(output)
    rank, world = _dist_info()
    root, files = list_inputs(input_path)
    output.mkdir(parents=True, exist_ok=True)
    rels = [f.relative_to(root).with_suffix("").as_posix() for f in files]
    mine = [(f, r) for j, (f, r) in enumerate(zip(files, rels)) if j % world == rank]
    todo = [(f, r) for f, r in mine if not (output / r / RESULT_FILE).is_file()]
    records: list[dict] = [{"image": str(f.relative_to(root)), "status": "done-before"} for f, r in mine
                           if (output / r / RESULT_FILE).is_file()]
    rec = reconstructor
    if rec is None and todo:
        rec = Reconstructor.from_config(cfg, resolve_device(cfg.device))
    detector, det_msg = _make_detector(cfg) if todo else (None, "")
    if rank == 0:
        log(f"{len(files)} images, {len(todo)} to do on this process ({world} process(es)); {det_msg}")
    timer = {s: 0.0 for s in STAGES}
    faces = rec.flame_id.faces.cpu().numpy() if rec is not None else None
    from tqdm import tqdm

    bar = tqdm(total=len(todo), disable=not cfg.progress or rank != 0, unit="img")
    pending: list[tuple[Path, str, Any]] = []
    interrupted = False

    def flush() -> None:
        if not pending:
            return
        arc = torch.stack([torch.from_numpy(p.arcface) for _, _, p in pending])
        farl = clip_normalize(torch.stack([torch.from_numpy(p.farl_crop).permute(2, 0, 1) for _, _, p in pending]))
        idx = [image_seed_index(r) for _, r, _ in pending]
        t_batch = time.perf_counter()
        try:
            results = rec.reconstruct(arc, farl, idx, timer)
        except OferError as exc:  # a model-level failure hits the whole batch, not the run
            for f, _, _ in pending:
                records.append({"image": str(f.relative_to(root)), "status": "failed", "reason": str(exc)})
            pending.clear()
            return
        per_image = (time.perf_counter() - t_batch) / len(pending)
        for (f, r, face), res in zip(pending, results):
            t0 = time.perf_counter()
            meta = {"image": str(f.relative_to(root)), "status": "ok", "image_index": image_seed_index(r),
                    "ranked_index": res.ranked_index, "face_source": face.source, "notes": list(face.notes),
                    "preset": cfg.preset, "seed": cfg.seed, "n_identities": cfg.n_identities,
                    "n_expressions": cfg.n_expressions, "units": "mm"}
            write_image_outputs(output / r, res, faces, cfg, face.farl_crop, meta)
            dt = time.perf_counter() - t0
            timer["writing"] += dt
            records.append({**{k: meta[k] for k in ("image", "status", "ranked_index")},
                            "seconds": round(per_image + dt + face_time.get(r, 0.0), 4)})
        bar.update(len(pending))
        pending.clear()

    face_time: dict[str, float] = {}
    t_start = time.perf_counter()
    try:
        for f, r in todo:
            t0 = time.perf_counter()
            try:
                face = prepare_face(f, detector, aligned=cfg.aligned, use_sidecar=cfg.use_sidecar,
                                    channel_order=cfg.channel_order)
            except OferError as exc:
                records.append({"image": str(f.relative_to(root)), "status": "failed", "reason": str(exc)})
                bar.update(1)
                continue
            finally:
                timer["prepare"] += time.perf_counter() - t0
            face_time[r] = time.perf_counter() - t0
            pending.append((f, r, face))
            if len(pending) >= cfg.batch_size:
                flush()
        flush()
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: finished images are kept; re-run the same command to resume")
    finally:
        bar.close()
    wall = time.perf_counter() - t_start
    n_ok = sum(r["status"] == "ok" for r in records)
    part = {"rank": rank, "records": records, "stage_seconds": timer, "wall_seconds": wall, "ok": n_ok,
            "interrupted": interrupted}
    text = json.dumps(part, indent=1)
    atomic_write_bytes(output / f".summary.rank{rank}.json", lambda fh: fh.write(text.encode()))
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    summary = _merge_summaries(output, world, cfg) if rank == 0 else part
    if interrupted:
        raise KeyboardInterrupt
    return summary


def _merge_summaries(output: Path, world: int, cfg: SampleConfig) -> dict:
    parts = []
    for r in range(world):
        p = output / f".summary.rank{r}.json"
        if p.is_file():
            parts.append(json.loads(p.read_text()))
    records = sorted((rec for p in parts for rec in p["records"]), key=lambda x: x["image"])
    stage = {s: sum(p["stage_seconds"].get(s, 0.0) for p in parts) for s in STAGES}
    n_ok = sum(r["status"] == "ok" for r in records)
    summary = {
        "images": len(records),
        "ok": n_ok,
        "failed": sum(r["status"] == "failed" for r in records),
        "done_before": sum(r["status"] == "done-before" for r in records),
        "processes": world,
        "wall_seconds": max((p["wall_seconds"] for p in parts), default=0.0),
        "stage_seconds": stage,
        "stage_seconds_per_image": {s: (v / n_ok if n_ok else None) for s, v in stage.items()},
        "config": config_to_dict(cfg),
        "records": records,
    }
    text = json.dumps(summary, indent=1)
    atomic_write_bytes(output / "summary.json", lambda fh: fh.write(text.encode()))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image", "status", "seconds", "ranked_index", "reason"])
    for r in records:
        w.writerow([r["image"], r["status"], r.get("seconds", ""), r.get("ranked_index", ""), r.get("reason", "")])
    atomic_write_bytes(output / "summary.csv", lambda fh: fh.write(buf.getvalue().encode()))
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command line of ``sample.py``."""
    import argparse

    from .config import load_config

    ap = argparse.ArgumentParser(
        prog="sample.py",
        description="Reconstruct FLAME identities (IdGen + IdRank) and expressions (ExpGen) for images.")
    ap.add_argument("--input", "-i", required=True, help="image file or folder (searched recursively)")
    ap.add_argument("--output", "-o", required=True, help="output folder (re-running resumes)")
    ap.add_argument("--config", "-c", default=None, help="YAML config (e.g. configs/sample.yaml)")
    ap.add_argument("--seed", type=int, default=None, help="shorthand for seed=N")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = ap.parse_intermixed_args(argv)
    overrides = list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else [])
    rank, world = _dist_info()
    try:
        cfg = load_config(SampleConfig, args.config, overrides)
        if world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            torch.distributed.init_process_group(backend)
        summary = run(cfg, args.input, args.output)
        if rank == 0:
            per = summary["stage_seconds_per_image"]
            timing = ", ".join(f"{k} {v:.3f}s" for k, v in per.items() if v)
            print(f"{summary['ok']} reconstructed, {summary['failed']} failed, {summary['done_before']} done before; "
                  f"per image: {timing}; summary: {Path(args.output) / 'summary.json'}")
            for r in summary["records"]:
                if r["status"] == "failed":
                    print(f"  failed: {r['image']}: {r['reason']}")
        return 0 if summary.get("failed", 0) == 0 or summary.get("ok", 0) > 0 else 1
    except OferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
