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


def _train_generator(cfg: Any, kind: str) -> TrainResult:
    """IdGen or ExpGen: datasets, target statistics, model, FLAME (validation and sample
    meshes only), then the loop. An IdGen config may name a frozen IdRank
    (``val.idrank_checkpoint``) for the ranked-identity validation error; with a FaRL in its
    condition, the held-out set carries the face crops."""
    # One seed for the model initialisation; everything later is seeded per step.
    torch.manual_seed(cfg.seed)
    dist = init_distributed(cfg.train.device)
    try:
        ranker = build.load_val_ranker(cfg) if hasattr(cfg.val, "idrank_checkpoint") else None
        train_set, val_set = build.build_datasets(cfg, kind, report_dir=Path(cfg.run_dir),
                                                  val_farl=ranker is not None and ranker.farl is not None)
        build.fill_target_stats(cfg, kind, train_set)  # diffusion.normalize only
        model = build_model(kind, cfg)
        need_flame = val_set is not None or cfg.train.sample_every > 0
        vertices, faces = build.build_flame(cfg) if need_flame else (None, None)
        extra = {"ranker": ranker} if ranker is not None else {}
        task = GENERATOR_TASKS[kind](cfg, model, vertices, faces, **extra)
        return run_training(cfg, task, train_set, val_set, dist)
    finally:
        cleanup()


#: the training task of each generator
GENERATOR_TASKS = {"idgen": IdGenTask, "expgen": ExpGenTask}


def train_idgen(cfg: IdGenTrainConfig) -> TrainResult:
    """Train IdGen: ArcFace-conditioned diffusion over FLAME shape coefficients."""
    return _train_generator(cfg, "idgen")


def train_expgen(cfg: ExpGenTrainConfig) -> TrainResult:
    """Train ExpGen: [FaRL | ArcFace]-conditioned diffusion over 50 expression + 3 jaw values."""
    return _train_generator(cfg, "expgen")


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
