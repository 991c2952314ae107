"""The three trainers, ``train_idgen`` / ``train_expgen`` / ``train_idrank`` (``cfg`` -> result),
and their command line::

    python -m ofer.train idgen  --config configs/idgen.yaml [key.sub=value ...] [--dry-run]
    python -m ofer.train expgen --config configs/expgen.yaml
    python -m ofer.train idrank --config configs/idrank.yaml idgen_checkpoint=...
    torchrun --nproc_per_node=4 -m ofer.train idgen --config configs/idgen.yaml

The root scripts ``trainIdGen.py``, ``trainExpGen.py`` and ``trainIdRank.py`` call the same
functions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..config import ExpGenTrainConfig, IdGenTrainConfig, IdRankTrainConfig, resolve_path
from ..device import cleanup, init_distributed
from ..models import SPECS, build_model, load_trained_model
from . import build
from .cli import run_cli
from .loop import TrainResult, run_training
from .tasks import ExpGenTask, IdGenTask, IdRankTask

__all__ = ["train_idgen", "train_expgen", "train_idrank", "TRAINERS", "main"]


def train_idgen(cfg: IdGenTrainConfig) -> TrainResult:
    """Train IdGen: ArcFace-conditioned diffusion over FLAME shape coefficients."""
    # One seed for the model initialisation; everything later is seeded per step.
    torch.manual_seed(cfg.seed)
    dist = init_distributed(cfg.train.device)
    try:
        # Optional IdRank for the ranked-identity validation error (val.idrank_checkpoint);
        # with a FaRL in its condition, the held-out set carries the face crops.
        ranker = build.load_val_ranker(cfg)
        train_set, val_set = build.build_datasets(cfg, "idgen", report_dir=Path(cfg.run_dir),
                                                  val_farl=ranker is not None and ranker.farl is not None)
        build.fill_target_stats(cfg, "idgen", train_set)  # diffusion.normalize only
        model = build_model("idgen", cfg)
        # FLAME is only needed for validation errors and sample meshes.
        need_flame = val_set is not None or cfg.train.sample_every > 0
        vertices, faces = build.build_flame(cfg) if need_flame else (None, None)
        task = IdGenTask(cfg, model, vertices, faces, ranker=ranker)
        return run_training(cfg, task, train_set, val_set, dist)
    finally:
        cleanup()


def train_expgen(cfg: ExpGenTrainConfig) -> TrainResult:
    """Train ExpGen: [FaRL | ArcFace]-conditioned diffusion over 50 expression + 3 jaw values."""
    torch.manual_seed(cfg.seed)
    dist = init_distributed(cfg.train.device)
    try:
        # Per-frame expression data: K views of one frame share exp/jaw/shape.
        train_set, val_set = build.build_datasets(cfg, "expgen", report_dir=Path(cfg.run_dir))
        build.fill_target_stats(cfg, "expgen", train_set)  # diffusion.normalize only
        model = build_model("expgen", cfg)
        need_flame = val_set is not None or cfg.train.sample_every > 0
        vertices, faces = build.build_flame(cfg) if need_flame else (None, None)
        task = ExpGenTask(cfg, model, vertices, faces)
        return run_training(cfg, task, train_set, val_set, dist)
    finally:
        cleanup()


def train_idrank(cfg: IdRankTrainConfig) -> TrainResult:
    """Train IdRank: score N samples of a frozen IdGen per image (ListNet loss)."""
    torch.manual_seed(cfg.seed)
    dist = init_distributed(cfg.train.device)
    try:
        train_set, val_set = build.build_datasets(cfg, "idrank", report_dir=Path(cfg.run_dir))
        # The frozen IdGen that proposes the hypotheses (EMA weights by default).
        idgen, idgen_cfg = load_trained_model(
            resolve_path(cfg.data_root, cfg.idgen_checkpoint),
            "idgen", cfg.idgen_use_ema)
        vertices, _ = build.build_flame(cfg)
        # The ranker's input is [mean | residual] over the K vertices of ranker.vertex_indices.
        model = build_model("idrank", cfg)
        # As in OFER, the ranker's ArcFace starts from the IdGen's fine-tuned ArcFace
        # when no ArcFace weights are configured (and the architectures agree).
        if cfg.arcface.weights is None and idgen_cfg.arcface.layers == cfg.arcface.layers \
                and idgen_cfg.arcface.width == cfg.arcface.width:
            model.arcface.load_state_dict(idgen.arcface.state_dict())
        task = IdRankTask(cfg, model, idgen, vertices)
        return run_training(cfg, task, train_set, val_set, dist)
    finally:
        cleanup()


#: kind -> trainer (the config schemas are in :data:`ofer.models.SPECS`)
TRAINERS: dict[str, Callable[[Any], TrainResult]] = {
    "idgen": train_idgen,
    "expgen": train_expgen,
    "idrank": train_idrank,
}


def main(argv: Sequence[str] | None = None, prog: str = "python -m ofer.train") -> int:
    """``<kind> --config FILE [--dry-run] [key.sub=value ...]``; the exit status of :func:`run_cli`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(
        prog=prog, usage="%(prog)s {expgen,idgen,idrank} --config FILE [--dry-run] [key.sub=value ...]",
        description="Train IdGen, ExpGen or IdRank from a YAML config.",
        epilog=f"The options of each kind: {prog} KIND --help.")
    ap.add_argument("kind", choices=sorted(TRAINERS), help="the model to train")
    kind = ap.parse_args(argv[:1]).kind  # the rest is the trainer's own command line
    return run_cli(kind, SPECS[kind].train_schema, TRAINERS[kind], argv[1:], prog=f"{prog} {kind}")
