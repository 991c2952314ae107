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
from ..errors import AssetError, CheckpointError
from .checkpoint import read_checkpoint
from .tasks import ConditionedModel

__all__ = [
    "build_arcface",
    "build_farl",
    "build_head",
    "build_model",
    "build_datasets",
    "build_flame",
    "load_trained_model",
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

    m = IResNet(layers=tuple(c.layers), width=c.width, freeze=None if c.freeze == "none" else c.freeze)
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


def head_config(kind: str, cfg: Any) -> dict[str, Any]:
    """The plain-dict config handed to ``ofer.models.<Head>.from_config``."""
    if kind == "idgen":
        return {"param_dim": cfg.n_shape, "cond_dim": 512, "dims": list(cfg.denoiser.dims),
                "num_qkv": cfg.denoiser.num_qkv, "num_steps": cfg.diffusion.num_steps,
                "beta_1": cfg.diffusion.beta_1, "beta_T": cfg.diffusion.beta_T,
                "loss": cfg.diffusion.loss}
    if kind == "expgen":
        return {"n_exp": cfg.n_exp, "cond_dim": 512 + cfg.farl.embed_dim, "dims": list(cfg.denoiser.dims),
                "num_qkv": cfg.denoiser.num_qkv, "num_steps": cfg.diffusion.num_steps,
                "beta_1": cfg.diffusion.beta_1, "beta_T": cfg.diffusion.beta_T,
                "loss": cfg.diffusion.loss, "jaw_scale": cfg.jaw_scale}
    raise ValueError(kind)


def build_head(kind: str, cfg: Any, in_dim: Optional[int] = None) -> torch.nn.Module:
    """IdGen / ExpGen / IdRank from ``ofer.models`` (the core networks)."""
    from .. import models

    if kind == "idrank":
        return models.IdRank.from_config({"in_dim": in_dim, "cond_dim": 512 + cfg.farl.embed_dim})
    cls = models.IdGen if kind == "idgen" else models.ExpGen
    return cls.from_config(head_config(kind, cfg))


def build_model(kind: str, cfg: Any, load_weights: bool = True, in_dim: Optional[int] = None
                ) -> ConditionedModel:
    """Encoders + head for ``kind``; pretrained encoder weights when ``load_weights``."""
    aw = _asset(cfg, "arcface.weights", cfg.arcface.weights) if load_weights else None
    arcface = build_arcface(cfg.arcface, aw)
    farl = None
    if kind in ("expgen", "idrank"):
        fw = _asset(cfg, "farl.weights", cfg.farl.weights) if load_weights else None
        farl = build_farl(cfg.farl, fw)
    return ConditionedModel(build_head(kind, cfg, in_dim=in_dim), arcface, farl)


def load_trained_model(path: str | Path, kind: str, use_ema: bool = True) -> tuple[ConditionedModel, Any]:
    """Rebuild a model of ours from its checkpoint (config inside), EMA weights by default."""
    ck = read_checkpoint(path)
    if ck.get("kind") != kind:
        raise CheckpointError(f"checkpoint {path} is a {ck.get('kind')!r} checkpoint, expected {kind!r}")
    cfg = config_from_dict(SCHEMAS[kind], ck["config"])
    in_dim = None
    if kind == "idrank":
        w = ck["model"].get("head.net.ranklayers.0.mlp.weight")
        in_dim = int(w.shape[1]) if w is not None else None
    model = build_model(kind, cfg, load_weights=False, in_dim=in_dim)
    sd = ck["ema"] if use_ema and ck.get("ema") is not None else ck["model"]
    model.load_state_dict(sd)
    return model, cfg


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


def build_datasets(cfg: Any, mode: str, load_farl: bool, check: bool = True, report_dir: Optional[Path] = None):
    """(train_set, val_set or None) as :class:`~ofer.data.datasets.FaceDataset`s, index checked."""
    from ..data.datasets import FaceDataset, check_index, load_index

    root = resolve_path(cfg.data_root, cfg.data.root)
    d = cfg.data
    n_exp = getattr(cfg, "n_exp", 50)
    farl_size = cfg.farl.image_size if load_farl else 224
    out = []
    for names, occl in ((d.train, d.occlusion.prob), (d.val, 0.0)):
        if not names:
            out.append(None)
            continue
        entries = load_index(root, names, d.layout)
        if check:
            check_index(entries, need_images=load_farl or occl > 0,
                        report_path=(report_dir / "missing_files.txt") if report_dir else None, mode=mode)
        out.append(FaceDataset(entries, d.images_per_actor, mode=mode, n_shape=cfg.flame.n_shape,
                               n_exp=n_exp, load_farl=load_farl, farl_size=farl_size,
                               occlusion_prob=occl, occlusion_area=d.occlusion.area))
    return out[0], out[1]


def check_assets(kind: str, cfg: Any) -> list[str]:
    """Everything ``--dry-run`` verifies; raises on the first broken asset, else returns a report."""
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
        if cfg.ranker.front_indices:
            report.append(f"ranker.front_indices: {_asset(cfg, 'ranker.front_indices', cfg.ranker.front_indices)}")
    mode = "expression" if kind == "expgen" else "identity"
    train, val = build_datasets(cfg, mode, load_farl=kind != "idgen", check=True)
    report.append(f"data.train: {len(train)} items" + (f", data.val: {len(val)} items" if val else ""))
    return report


def replace(cfg: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` re-exported for scripts."""
    return dataclasses.replace(cfg, **changes)


def dry_run(kind: str, cfg: Any) -> list[str]:
    """Validate assets, weights (by loading them) and the dataset index; return a report."""
    report = check_assets(kind, cfg)
    in_dim = None
    if kind == "idrank":
        in_dim = 0  # the ranker width depends on FLAME; weights of the encoders are what we check
        idgen, _ = load_trained_model(resolve_path(cfg.data_root, cfg.idgen_checkpoint), "idgen",
                                      cfg.idgen_use_ema)
        report.append(f"idgen model: {sum(p.numel() for p in idgen.parameters())} parameters")
        aw = _asset(cfg, "arcface.weights", cfg.arcface.weights)
        fw = _asset(cfg, "farl.weights", cfg.farl.weights)
        build_arcface(cfg.arcface, aw)
        build_farl(cfg.farl, fw)
    else:
        model = build_model(kind, cfg, load_weights=True)
        n = sum(p.numel() for p in model.parameters())
        t = sum(p.numel() for p in model.parameters() if p.requires_grad)
        report.append(f"model: {n} parameters, {t} trainable")
    report.append(f"run_dir: {cfg.run_dir}")
    report.append("dry run OK")
    return report
