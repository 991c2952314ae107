#!/usr/bin/env python
"""Train IdRank: score N samples of a frozen IdGen per image (ListNet loss).

    python trainIdRank.py --config configs/idrank.yaml [key.sub=value ...] [--dry-run]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # run from a checkout

import torch  # noqa: E402

from ofer.config import IdRankTrainConfig, resolve_path  # noqa: E402
from ofer.models import build_model, load_trained_model  # noqa: E402,F401
from ofer.train import build  # noqa: E402
from ofer.device import cleanup, init_distributed  # noqa: E402
from ofer.train.loop import TrainResult, run_training  # noqa: E402
from ofer.train.tasks import IdRankTask  # noqa: E402


def main(cfg: IdRankTrainConfig) -> TrainResult:
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


if __name__ == "__main__":
    from ofer.train.cli import run_cli

    sys.exit(run_cli("idrank", IdRankTrainConfig, main, prog="trainIdRank.py"))
