#!/usr/bin/env python
"""Train IdGen: ArcFace-conditioned diffusion over FLAME shape coefficients.

    python trainIdGen.py --config configs/idgen.yaml [key.sub=value ...] [--dry-run]
    torchrun --nproc_per_node=4 trainIdGen.py --config configs/idgen.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # run from a checkout

import torch  # noqa: E402

from ofer.config import IdGenTrainConfig  # noqa: E402
from ofer.models import build_model, load_trained_model  # noqa: E402,F401
from ofer.train import build  # noqa: E402
from ofer.device import cleanup, init_distributed  # noqa: E402
from ofer.train.loop import TrainResult, run_training  # noqa: E402
from ofer.train.tasks import IdGenTask  # noqa: E402


def main(cfg: IdGenTrainConfig) -> TrainResult:
    # One seed for the model initialisation; everything later is seeded per step.
    torch.manual_seed(cfg.seed)
    dist = init_distributed(cfg.train.device)
    try:
        # Optional IdRank for the ranked-identity validation error (val.idrank_checkpoint);
        # with a FaRL in its condition, the held-out set carries the face crops.
        ranker = build.load_val_ranker(cfg)
        train_set, val_set = build.build_datasets(
            cfg, "idgen", report_dir=Path(cfg.run_dir),
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


if __name__ == "__main__":
    from ofer.train.cli import run_cli

    sys.exit(run_cli("idgen", IdGenTrainConfig, main, prog="trainIdGen.py"))
