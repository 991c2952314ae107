"""Datasets and FLAME from a training config; the ``--dry-run`` checks.

Models are built by :func:`ofer.models.build_model` and loaded by :func:`ofer.models.load_model`.

Every asset path is resolved against ``cfg.data_root``. A missing file is an
:class:`~ofer.errors.AssetError` naming the config key and the resolved path; random
initialisation happens only where the config says ``weights: null``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml

from ..config import asset_file, resolve_path
from ..errors import AssetError, CheckpointError
from ..models.checkpoint import read_checkpoint
from ..models.conditioned import ConditionedModel, build_model, load_rank_vertices
from ..models.loading import load_model, load_trained_model
from ..models.spec import get_spec
from ..weights import find_weights
from ..data.datasets import FaceDataset, check_index, load_index, load_params
from ..flame import FLAME
from .loop import latest_checkpoint

__all__ = [
    "build_datasets",
    "build_flame",
    "fill_target_stats",
    "target_stats",
    "load_val_ranker",
    "dry_run",
]


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

    spec = get_spec(kind, ValueError)
    if not spec.generative:
        raise ValueError(f"target_stats: {kind} has no diffusion targets")
    rows = []
    for e in dataset.entries:
        p = load_params(e, dataset.n_shape, dataset.n_exp, spec.data_mode)
        rows.append(p["shape_coeffs"][:n_coeffs] if spec.data_mode == "identity"
                    else np.concatenate([p["exp_coeffs"][:n_coeffs], p["jaw_pose"]]))
    if not rows:
        raise ConfigError("diffusion.normalize: the training set is empty")
    x = np.stack(rows).astype(np.float64)
    std = x.std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)
    return x.mean(axis=0).tolist(), std.tolist()


def _saved_config(run_dir: Path, ck: Path) -> dict:
    """The configuration a run was last started with: its ``config.yaml`` (written at every
    start, the config its checkpoints hold), else the checkpoint's (read whole)."""
    path = run_dir / "config.yaml"
    if path.is_file():
        try:
            saved = yaml.safe_load(path.read_text(encoding="utf-8"))
            if isinstance(saved, dict):
                return saved
        except (yaml.YAMLError, UnicodeDecodeError):
            pass
    return read_checkpoint(ck).get("config") or {}


def fill_target_stats(cfg: Any, kind: str, train_set: Any) -> None:
    """With ``diffusion.normalize``, fill ``diffusion.target_mean`` / ``target_std`` in place.

    Pinned values in the config are kept. On ``resume`` the statistics come from the run's
    saved configuration (the weights were trained with them; the checkpoint itself is read by
    the training loop alone), else from ``train_set``
    (:func:`target_stats`).
    """
    d = cfg.diffusion
    if not d.normalize or (d.target_mean is not None and d.target_std is not None):
        return

    ck = latest_checkpoint(cfg.run_dir) if cfg.resume else None
    if ck is not None:
        saved = _saved_config(Path(cfg.run_dir), ck).get("diffusion") or {}
        if saved.get("target_mean") is not None and saved.get("target_std") is not None:
            d.target_mean, d.target_std = list(saved["target_mean"]), list(saved["target_std"])
            return
    n = cfg.n_shape if get_spec(kind).data_mode == "identity" else cfg.n_exp
    d.target_mean, d.target_std = target_stats(train_set, kind, n)


def load_val_ranker(cfg: Any) -> Optional[ConditionedModel]:
    """The frozen IdRank of ``val.idrank_checkpoint`` (IdGen validation), or None when unset.

    Accepts our IdRank checkpoints (EMA weights when present; the feature vertices come from
    the checkpoint) and the released ``model_idrank.tar`` (with ``val.idrank_vertex_indices``).
    The file is read once. Returns a :class:`ConditionedModel` in eval mode with
    ``requires_grad`` off and ``load_info`` (format, step).

    Raises:
        AssetError: a missing file. CheckpointError: not an IdRank checkpoint, or weights
            that do not load (one line, naming the config key).
    """
    key = "val.idrank_checkpoint"
    path = asset_file(cfg, key, getattr(getattr(cfg, "val", None), "idrank_checkpoint", None))
    if path is None:
        return None
    vidx = asset_file(cfg, "val.idrank_vertex_indices", cfg.val.idrank_vertex_indices)
    try:
        model = load_model(path, "idrank", vertex_indices=vidx)
    except CheckpointError as exc:
        raise CheckpointError(f"config key '{key}': {exc}") from exc
    except AssetError as exc:
        raise AssetError(f"config key 'val.idrank_vertex_indices': {exc}") from exc
    return model.requires_grad_(False).eval()


def build_flame(cfg: Any):
    """(vertices_fn, faces) from ``flame.*``; vertices_fn(shape_coeffs=, exp_coeffs=, jaw_pose=) -> (B,V,3) m."""

    path = asset_file(cfg, "flame.model_path", cfg.flame.model_path)
    lmk = asset_file(cfg, "flame.landmark_embedding_path", cfg.flame.landmark_embedding_path)
    flame = FLAME(str(path), str(lmk) if lmk else None, n_shape=cfg.flame.n_shape, n_exp=cfg.flame.n_exp)
    flame.requires_grad_(False)
    faces = flame.faces.cpu().numpy()

    def vertices(**kw: torch.Tensor) -> torch.Tensor:
        dev = next(iter(kw.values())).device
        flame.to(dev)
        return flame(**kw).vertices

    return vertices, faces


def build_datasets(cfg: Any, kind: str, *, load_farl: Optional[bool] = None, val_farl: bool = False,
                   check: bool = True, report_dir: Optional[Path] = None):
    """(train_set, val_set or None) of a ``kind``'s training config, the index checked.

    The dataset mode is the kind's (:data:`~ofer.models.spec.SPECS`). ``load_farl`` (default:
    whether the kind's condition uses FaRL) adds the 224 px face crops ``farl`` (RGB in [0, 1];
    the model prepares them for its encoder); ``val_farl`` adds them to the held-out set alone
    (IdGen validation with an IdRank, whose condition includes FaRL).
    """

    spec = get_spec(kind)
    load_farl = spec.uses_farl if load_farl is None else load_farl
    root = resolve_path(cfg.data_root, cfg.data.root)
    d = cfg.data
    out = []
    for names, occl, farl in ((d.train, d.occlusion.prob, load_farl), (d.val, 0.0, load_farl or val_farl)):
        if not names:
            out.append(None)
            continue
        entries = load_index(root, names, d.layout)
        if check:
            check_index(entries, need_images=farl or occl > 0,
                        report_path=(report_dir / "missing_files.txt") if report_dir else None, mode=spec.data_mode)
        out.append(FaceDataset(entries, d.images_per_actor, mode=spec.data_mode, n_shape=cfg.flame.n_shape,
                               n_exp=getattr(cfg, "n_exp", 50), load_farl=farl,
                               occlusion_prob=occl, occlusion_area=d.occlusion.area))
    return out[0], out[1]


def _count(model: torch.nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n} parameters"


def dry_run(kind: str, cfg: Any) -> list[str]:
    """Everything a training run needs, checked without training; returns a report.

    Asset files exist, the encoder weights load, the checkpoints a run reads (IdRank's IdGen,
    IdGen's validation ranker) load (each read once), the dataset index is complete. With
    ``diffusion.normalize`` the target statistics are filled from the indexed training set
    (:func:`fill_target_stats`), so that the model can be built. Raises on the first problem.
    """
    spec = get_spec(kind)
    report = []
    root = f" (data_root={cfg.data_root!r})"
    for key, rel in (("arcface.weights", cfg.arcface.weights),
                     ("farl.weights", cfg.farl.weights if spec.uses_farl else None)):
        if rel is not None:  # a registered file may come from the weight cache (not downloaded here)
            report.append(f"{key}: {find_weights(resolve_path(cfg.data_root, rel), key, False, root)}")
    for key, rel in (("flame.model_path", cfg.flame.model_path),
                     ("flame.landmark_embedding_path", cfg.flame.landmark_embedding_path)):
        p = asset_file(cfg, key, rel)
        if p is not None:
            report.append(f"{key}: {p}")
    if hasattr(cfg, "idgen_checkpoint"):  # a ranker trains on a frozen IdGen's samples
        p = asset_file(cfg, "idgen_checkpoint", cfg.idgen_checkpoint)
        try:
            idgen, _ = load_trained_model(p, "idgen", cfg.idgen_use_ema)
        except CheckpointError as exc:
            raise CheckpointError(f"config key 'idgen_checkpoint': {exc}") from exc
        report.append(f"idgen_checkpoint: {p} (step {idgen.load_info.step}; {_count(idgen)})")
    if not spec.generative:
        idx = load_rank_vertices(cfg)
        report.append(f"ranker.vertex_indices: {len(idx)} vertices from "
                      f"{resolve_path(cfg.data_root, cfg.ranker.vertex_indices)}")
    ranker = load_val_ranker(cfg) if hasattr(cfg.val, "idrank_checkpoint") else None
    if ranker is not None:
        info = ranker.load_info
        ours = info.format != "official"
        report.append(f"val.idrank_checkpoint: {info.path} ({'ours' if ours else 'official'} IdRank"
                      + (f", step {info.step}" if ours else "") + ")")
        if cfg.val.idrank_vertex_indices is not None:
            report.append(f"val.idrank_vertex_indices: "
                          f"{resolve_path(cfg.data_root, cfg.val.idrank_vertex_indices)}")
        report.append(f"validation ranker: {_count(ranker)}, {ranker.head.num_vertices} vertices "
                      "(val/ranked_mm selects best.pt)")
    train, val = build_datasets(cfg, kind, val_farl=ranker is not None and ranker.farl is not None)
    report.append(f"data.train: {len(train)} items" + (f", data.val: {len(val)} items" if val else ""))
    if spec.generative and cfg.diffusion.normalize:
        fill_target_stats(cfg, kind, train)
        report.append(f"diffusion.normalize: target std {min(cfg.diffusion.target_std):.3g}.."
                      f"{max(cfg.diffusion.target_std):.3g} ({len(train)} training entries)")
    model = build_model(kind, cfg, load_weights=True)
    t = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report.append(f"model: {_count(model)}, {t} trainable")
    report.append(f"run_dir: {cfg.run_dir}")
    report.append("dry run OK")
    return report
