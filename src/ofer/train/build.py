"""Build models, datasets and FLAME from a training config; the ``--dry-run`` checks.

Every asset path is resolved against ``cfg.data_root``. A missing file is an
:class:`~ofer.errors.AssetError` naming the config key and the resolved path; random
initialisation happens only where the config says ``weights: null``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..config import (
    ArcFaceConfig,
    ExpGenTrainConfig,
    FaRLConfig,
    IdGenTrainConfig,
    IdRankTrainConfig,
    config_from_dict,
    resolve_path,
)
from ..errors import AssetError, CheckpointError, ConfigError
from .checkpoint import read_checkpoint
from .tasks import ConditionedModel

__all__ = [
    "build_arcface",
    "build_farl",
    "build_head",
    "build_model",
    "build_datasets",
    "build_flame",
    "fill_target_stats",
    "target_stats",
    "load_trained_model",
    "load_val_ranker",
    "check_assets",
    "SCHEMAS",
]

SCHEMAS = {"idgen": IdGenTrainConfig, "expgen": ExpGenTrainConfig, "idrank": IdRankTrainConfig}


def _asset(cfg: Any, key: str, rel: Optional[str]) -> Optional[Path]:
    p = resolve_path(cfg.data_root, rel)
    if p is not None and not p.is_file():
        raise AssetError(f"config key '{key}': file not found: {p} (data_root={cfg.data_root!r})")
    return p


def build_arcface(c: ArcFaceConfig, weights: Optional[Path]) -> torch.nn.Module:
    """IResNet with the configured depth/width/freeze; loads ``weights`` when given."""
    from ..nets.arcface import IResNet, load_arcface_state_dict

    m = IResNet(layers=tuple(c.layers), width=c.width, freeze=None if c.freeze == "none" else c.freeze,
                input_size=c.input_size)
    if weights is not None:
        load_arcface_state_dict(m, weights)
    return m


def build_farl(c: FaRLConfig, weights: Optional[Path]) -> torch.nn.Module:
    """FaRL ViT with the configured size; loads ``weights`` when given; frozen unless trainable."""
    from ..nets.farl import FaRLEncoder, load_farl_state_dict

    m = FaRLEncoder(image_size=c.image_size, patch_size=c.patch_size, width=c.width, layers=c.layers,
                    heads=c.heads, output_dim=c.embed_dim)
    if weights is not None:
        load_farl_state_dict(m, weights)
    if not c.trainable:
        m.requires_grad_(False)
    return m


def schedule_config(cfg: Any) -> dict[str, Any]:
    """The ``schedule`` dict of ``ofer.models`` from ``cfg.diffusion``."""
    d = cfg.diffusion
    if d.schedule == "cosine":
        return {"kind": "cosine", "num_steps": d.num_steps, "s": d.cosine_s, "max_beta": d.max_beta}
    return {"kind": "linear", "num_steps": d.num_steps, "beta_1": d.beta_1, "beta_T": d.beta_T}


#: FaceDataset mode of each training kind.
DATA_MODES = {"idgen": "identity", "idrank": "identity", "expgen": "expression"}


def _normalize_config(cfg: Any) -> Optional[dict[str, list[float]]]:
    d = cfg.diffusion
    if not d.normalize:
        return None
    if d.target_mean is None or d.target_std is None:
        raise ConfigError("config key 'diffusion.normalize' is true but 'diffusion.target_mean' / "
                          "'target_std' are empty: the training scripts fill them from the training "
                          "set (ofer.train.build.fill_target_stats)")
    return {"mean": list(d.target_mean), "std": list(d.target_std)}


def target_stats(dataset: Any, kind: str, n_coeffs: int) -> tuple[list[float], list[float]]:
    """Per-coefficient mean and std of the diffusion targets of a training set.

    One value per entry of ``dataset`` (an actor for IdGen, a frame for ExpGen), read from
    the FLAME parameter files only (no image is loaded), like the training targets: IdGen
    the first ``n_coeffs`` shape coefficients; ExpGen ``[exp (n_coeffs) | jaw (3)]``. A
    coefficient that never varies gets std 1 (it is left as it is).

    Args:
        dataset: a :class:`~ofer.data.datasets.FaceDataset` (``entries``, ``n_shape``,
            ``n_exp``).
        kind: ``"idgen"`` or ``"expgen"``.
        n_coeffs: IdGen's ``n_shape`` or ExpGen's ``n_exp`` (of the training config).

    Returns:
        ``(mean, std)``: two lists of floats (float64 statistics).
    """
    from ..data.datasets import load_params

    if kind not in ("idgen", "expgen"):
        raise ValueError(f"target_stats: kind must be 'idgen' or 'expgen', got {kind!r}")
    mode = DATA_MODES[kind]
    rows = []
    for e in dataset.entries:
        p = load_params(e, dataset.n_shape, dataset.n_exp, mode)
        rows.append(p["shape_coeffs"][:n_coeffs] if kind == "idgen"
                    else np.concatenate([p["exp_coeffs"][:n_coeffs], p["jaw_pose"]]))
    if not rows:
        raise ConfigError("diffusion.normalize: the training set is empty")
    x = np.stack(rows).astype(np.float64)
    std = x.std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)
    return x.mean(axis=0).tolist(), std.tolist()


def fill_target_stats(cfg: Any, kind: str, train_set: Any) -> None:
    """With ``diffusion.normalize``, fill ``diffusion.target_mean`` / ``target_std`` in place.

    Pinned values in the config are kept. On ``resume`` the statistics come from the run's
    latest checkpoint (the weights were trained with them), else from ``train_set``
    (:func:`target_stats`).
    """
    d = cfg.diffusion
    if not d.normalize or (d.target_mean is not None and d.target_std is not None):
        return
    from .loop import latest_checkpoint

    ck = latest_checkpoint(cfg.run_dir) if cfg.resume else None
    if ck is not None:
        saved = (read_checkpoint(ck).get("config") or {}).get("diffusion") or {}
        if saved.get("target_mean") is not None and saved.get("target_std") is not None:
            d.target_mean, d.target_std = list(saved["target_mean"]), list(saved["target_std"])
            return
    d.target_mean, d.target_std = target_stats(train_set, kind, cfg.n_shape if kind == "idgen" else cfg.n_exp)


def head_config(kind: str, cfg: Any, num_vertices: Optional[int] = None) -> dict[str, Any]:
    """The plain-dict config handed to ``ofer.models.<Head>.from_config``.

    IdGen: ``param_dim = n_shape``, ``cond_dim = 512`` (ArcFace). ExpGen: ``param_dim =
    n_exp + 3`` (expression + jaw), ``cond_dim = farl.embed_dim + 512``. IdRank: ``in_dim =
    6 * num_vertices``, ``cond_dim = farl.embed_dim + 512``.
    """
    if kind == "idgen":
        return {"param_dim": cfg.n_shape, "cond_dim": 512, "dims": list(cfg.denoiser.dims),
                "num_qkv": cfg.denoiser.num_qkv, "schedule": schedule_config(cfg),
                "loss": cfg.diffusion.loss, "normalize": _normalize_config(cfg),
                "prediction": cfg.diffusion.prediction, "cond_scale": cfg.diffusion.cond_scale}
    if kind == "expgen":
        return {"param_dim": cfg.n_exp + 3, "cond_dim": 512 + cfg.farl.embed_dim,
                "dims": list(cfg.denoiser.dims), "num_qkv": cfg.denoiser.num_qkv,
                "schedule": schedule_config(cfg), "loss": cfg.diffusion.loss,
                "jaw_scale": cfg.jaw_scale, "normalize": _normalize_config(cfg),
                "prediction": cfg.diffusion.prediction, "cond_scale": cfg.diffusion.cond_scale}
    if kind == "idrank":
        if num_vertices is None:
            raise ValueError("the IdRank config needs num_vertices")
        r = cfg.ranker
        return {"in_dim": 6 * int(num_vertices), "cond_dim": 512 + cfg.farl.embed_dim,
                "hidden": list(r.hidden), "groups": r.groups, "temperature": r.temperature,
                "mean_scale": r.mean_scale}
    raise ValueError(kind)


def load_rank_vertices(cfg: Any) -> np.ndarray:
    """The (K,) int64 ranker vertices from ``ranker.vertex_indices`` (+ ``ranker.vertex_region``)."""
    from ..nets.rank_mlp import load_vertex_indices

    from ..flame.assets import safe_load_pickle

    path = _asset(cfg, "ranker.vertex_indices", cfg.ranker.vertex_indices)
    try:
        # .pkl masks go through the FLAME allow-list unpickler (Python 2 and 3 pickles).
        source = path if path.suffix == ".npy" else safe_load_pickle(path)
        return load_vertex_indices(source, key=cfg.ranker.vertex_region)
    except AssetError as exc:
        raise AssetError(f"config key 'ranker.vertex_indices': {exc}") from exc


def build_head(kind: str, cfg: Any, vertex_indices: Any = None,
               num_vertices: Optional[int] = None) -> torch.nn.Module:
    """IdGen / ExpGen / IdRank from ``ofer.models`` (the core networks).

    For IdRank give ``vertex_indices`` (K,) or, to fill them later from a state_dict,
    ``num_vertices`` K.
    """
    from .. import models

    if kind == "idrank":
        if vertex_indices is not None:
            num_vertices = len(vertex_indices)
        return models.IdRank.from_config(head_config(kind, cfg, num_vertices),
                                         vertex_indices=vertex_indices)
    cls = models.IdGen if kind == "idgen" else models.ExpGen
    return cls.from_config(head_config(kind, cfg))


def build_model(kind: str, cfg: Any, load_weights: bool = True, vertex_indices: Any = None,
                num_vertices: Optional[int] = None) -> ConditionedModel:
    """Encoders + head for ``kind``; pretrained encoder weights when ``load_weights``.

    IdRank: the vertices come from ``vertex_indices`` / ``num_vertices`` when given, else from
    ``ranker.vertex_indices`` of the config.
    """
    if kind == "idrank" and vertex_indices is None and num_vertices is None:
        vertex_indices = load_rank_vertices(cfg)
    head = build_head(kind, cfg, vertex_indices=vertex_indices, num_vertices=num_vertices)
    aw = _asset(cfg, "arcface.weights", cfg.arcface.weights) if load_weights else None
    arcface = build_arcface(cfg.arcface, aw)
    farl = None
    if kind in ("expgen", "idrank"):
        fw = _asset(cfg, "farl.weights", cfg.farl.weights) if load_weights else None
        farl = build_farl(cfg.farl, fw)
    return ConditionedModel(head, arcface, farl)


def load_trained_model(path: str | Path, kind: str, use_ema: bool = True,
                       map_location: str | torch.device = "cpu") -> tuple[ConditionedModel, Any]:
    """Rebuild a model of ours from its checkpoint (config inside), EMA weights by default.

    This is how sampling loads IdGen / ExpGen / IdRank checkpoints written by the training
    scripts. No asset file is read: encoder weights, the denoiser / ranker and (IdRank) the
    feature vertex indices all come from the checkpoint.

    Returns:
        ``(model, cfg)``: a :class:`ConditionedModel` in eval mode (``.head``, ``.arcface``,
        ``.farl``, ``.condition(arcface_x, farl_x)``) and the training config.

    Raises:
        CheckpointError: unreadable file, wrong kind, or weights that do not fit.
    """
    ck = read_checkpoint(path, map_location=map_location)
    if ck.get("kind") != kind:
        raise CheckpointError(f"checkpoint {path} is a {ck.get('kind')!r} checkpoint, expected {kind!r}")
    cfg = config_from_dict(SCHEMAS[kind], ck["config"])
    sd = ck["ema"] if use_ema and ck.get("ema") is not None else ck["model"]
    num_vertices = None
    if kind == "idrank":
        idx = sd.get("head.vertex_indices")
        if idx is None:
            raise CheckpointError(f"checkpoint {path} has no 'head.vertex_indices' (not an IdRank of ours)")
        num_vertices = int(idx.shape[0])
    model = build_model(kind, cfg, load_weights=False, num_vertices=num_vertices)
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path}: weights do not fit the {kind} model of its config "
                              f"({first})") from exc
    model.eval()
    return model, cfg


def _ranker_checkpoint(cfg: Any) -> tuple[Optional[Path], Optional[str], int]:
    """(path, "ours" | "official", step) of ``val.idrank_checkpoint``; (None, None, 0) if unset.

    Raises AssetError (missing file) or a one-line CheckpointError naming the key when the
    file is not an IdRank checkpoint (ours or the released ``.tar``)."""
    rel = getattr(getattr(cfg, "val", None), "idrank_checkpoint", None)
    if rel is None:
        return None, None, 0
    key = "val.idrank_checkpoint"
    path = _asset(cfg, key, rel)
    try:
        ck = read_checkpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(f"config key '{key}': {exc}") from exc
    if "model" in ck or "kind" in ck:
        found, origin = ck.get("kind"), "ours"
    else:
        from ..compat import _detect_kind

        found, origin = _detect_kind(ck), "official"
    if found != "idrank":
        raise CheckpointError(f"config key '{key}': {path} is a {found!r} checkpoint, expected 'idrank'")
    if origin == "official" and cfg.val.idrank_vertex_indices is None:
        raise AssetError(f"config key 'val.idrank_vertex_indices': the released IdRank checkpoint {path} "
                         "needs its front-face vertex list (frontindices.npy); set this key")
    return path, origin, int(ck.get("step", 0) or 0)


def load_val_ranker(cfg: Any) -> Optional[ConditionedModel]:
    """The frozen IdRank of ``val.idrank_checkpoint`` (IdGen validation), or None when unset.

    Accepts our IdRank checkpoints (EMA weights when present; the feature vertices come from
    the checkpoint) and the released ``model_idrank.tar`` (with ``val.idrank_vertex_indices``).
    Returns a :class:`ConditionedModel` in eval mode with ``requires_grad`` off.

    Raises:
        AssetError: a missing file. CheckpointError: not an IdRank checkpoint, or weights
            that do not load (one line, naming the config key).
    """
    path, _, _ = _ranker_checkpoint(cfg)
    if path is None:
        return None
    from ..pipeline import load_model

    vidx = _asset(cfg, "val.idrank_vertex_indices", cfg.val.idrank_vertex_indices)
    try:
        model = load_model(path, "idrank", vertex_indices=vidx)
    except CheckpointError as exc:
        raise CheckpointError(f"config key 'val.idrank_checkpoint': {exc}") from exc
    return model.requires_grad_(False).eval()


def build_flame(cfg: Any):
    """(vertices_fn, faces) from ``flame.*``; vertices_fn(shape_coeffs=, exp_coeffs=, jaw_pose=) -> (B,V,3) m."""
    from ..flame import FLAME

    path = _asset(cfg, "flame.model_path", cfg.flame.model_path)
    lmk = _asset(cfg, "flame.landmark_embedding_path", cfg.flame.landmark_embedding_path)
    flame = FLAME(str(path), str(lmk) if lmk else None, n_shape=cfg.flame.n_shape, n_exp=cfg.flame.n_exp)
    flame.requires_grad_(False)
    faces = getattr(flame, "faces", None)
    if faces is None:
        faces = getattr(flame, "faces_tensor", None)
    faces = None if faces is None else np.asarray(torch.as_tensor(faces).cpu())

    def vertices(**kw: torch.Tensor) -> torch.Tensor:
        dev = next(iter(kw.values())).device
        flame.to(dev)
        return flame(**kw).vertices

    return vertices, faces


def build_datasets(cfg: Any, mode: str, load_farl: bool, check: bool = True, report_dir: Optional[Path] = None,
                   val_farl_size: Optional[int] = None):
    """(train_set, val_set or None) as :class:`~ofer.data.datasets.FaceDataset`s, index checked.

    ``val_farl_size``: give the held-out set FaRL crops of this side even when ``load_farl``
    is False (IdGen validation with an IdRank, whose condition includes FaRL)."""
    from ..data.datasets import FaceDataset, check_index, load_index

    root = resolve_path(cfg.data_root, cfg.data.root)
    d = cfg.data
    n_exp = getattr(cfg, "n_exp", 50)
    farl_size = cfg.farl.image_size if load_farl else 224
    out = []
    for names, occl, is_val in ((d.train, d.occlusion.prob, False), (d.val, 0.0, True)):
        if not names:
            out.append(None)
            continue
        farl, size = load_farl, farl_size
        if is_val and val_farl_size is not None:
            farl, size = True, int(val_farl_size)
        entries = load_index(root, names, d.layout)
        if check:
            check_index(entries, need_images=farl or occl > 0,
                        report_path=(report_dir / "missing_files.txt") if report_dir else None, mode=mode)
        out.append(FaceDataset(entries, d.images_per_actor, mode=mode, n_shape=cfg.flame.n_shape,
                               n_exp=n_exp, load_farl=farl, farl_size=size,
                               occlusion_prob=occl, occlusion_area=d.occlusion.area))
    return out[0], out[1]


def check_assets(kind: str, cfg: Any) -> list[str]:
    """Everything ``--dry-run`` verifies; raises on the first broken asset, else returns a report.

    With ``diffusion.normalize`` it also fills the target statistics (:func:`fill_target_stats`)
    from the training set it has just indexed, so that the model can be built."""
    report = []
    for key, rel in (("arcface.weights", cfg.arcface.weights),
                     ("farl.weights", getattr(getattr(cfg, "farl", None), "weights", None)
                      if kind != "idgen" else None),
                     ("flame.model_path", cfg.flame.model_path),
                     ("flame.landmark_embedding_path", cfg.flame.landmark_embedding_path)):
        p = _asset(cfg, key, rel)
        if p is not None:
            report.append(f"{key}: {p}")
    if kind == "idrank":
        p = _asset(cfg, "idgen_checkpoint", cfg.idgen_checkpoint)
        ck = read_checkpoint(p)
        if ck.get("kind") != "idgen":
            raise CheckpointError(f"config key 'idgen_checkpoint': {p} is a {ck.get('kind')!r} "
                                  "checkpoint, expected 'idgen'")
        report.append(f"idgen_checkpoint: {p} (step {ck.get('step')})")
        idx = load_rank_vertices(cfg)
        report.append(f"ranker.vertex_indices: {len(idx)} vertices from "
                      f"{resolve_path(cfg.data_root, cfg.ranker.vertex_indices)}")
    if kind == "idgen":
        p, origin, step = _ranker_checkpoint(cfg)
        if p is not None:
            report.append(f"val.idrank_checkpoint: {p} ({origin} IdRank"
                          + (f", step {step})" if origin == "ours" else ")"))
            v = _asset(cfg, "val.idrank_vertex_indices", cfg.val.idrank_vertex_indices)
            if v is not None:
                report.append(f"val.idrank_vertex_indices: {v}")
    mode = DATA_MODES[kind]
    ranked_val = kind == "idgen" and getattr(cfg.val, "idrank_checkpoint", None) is not None
    # (the crop side only matters when items are read; the check needs the images to exist)
    train, val = build_datasets(cfg, mode, load_farl=kind != "idgen", check=True,
                                val_farl_size=224 if ranked_val else None)
    report.append(f"data.train: {len(train)} items" + (f", data.val: {len(val)} items" if val else ""))
    if kind in ("idgen", "expgen") and cfg.diffusion.normalize:
        fill_target_stats(cfg, kind, train)
        report.append(f"diffusion.normalize: target std {min(cfg.diffusion.target_std):.3g}.."
                      f"{max(cfg.diffusion.target_std):.3g} ({len(train)} training entries)")
    return report


def replace(cfg: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` re-exported for scripts."""
    return dataclasses.replace(cfg, **changes)


def dry_run(kind: str, cfg: Any) -> list[str]:
    """Validate assets, weights (by loading them) and the dataset index; return a report."""
    report = check_assets(kind, cfg)
    if kind == "idrank":
        idgen, _ = load_trained_model(resolve_path(cfg.data_root, cfg.idgen_checkpoint), "idgen",
                                      cfg.idgen_use_ema)
        report.append(f"idgen model: {sum(p.numel() for p in idgen.parameters())} parameters")
    if kind == "idgen":
        ranker = load_val_ranker(cfg)
        if ranker is not None:
            report.append(f"validation ranker: {sum(p.numel() for p in ranker.parameters())} parameters, "
                          f"{ranker.head.num_vertices} vertices (val/ranked_mm selects best.pt)")
    model = build_model(kind, cfg, load_weights=True)
    n = sum(p.numel() for p in model.parameters())
    t = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report.append(f"model: {n} parameters, {t} trainable")
    report.append(f"run_dir: {cfg.run_dir}")
    report.append("dry run OK")
    return report
