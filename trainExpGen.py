#!/usr/bin/env python
"""Train ExpGen: [FaRL | ArcFace]-conditioned diffusion over 50 expression + 3 jaw values.

    python trainExpGen.py --config configs/expgen.yaml [key.sub=value ...] [--dry-run]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # run from a checkout

import torch  # noqa: E402

from ofer.config import ExpGenTrainConfig  # noqa: E402
from ofer.models import build_model, load_trained_model  # noqa: E402,F401
from ofer.train import build  # noqa: E402
from ofer.device import cleanup, init_distributed  # noqa: E402
from ofer.train.loop import TrainResult, run_training  # noqa: E402
from ofer.train.tasks import ExpGenTask  # noqa: E402


def main(cfg: ExpGenTrainConfig) -> TrainResult:
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


if __name__ == "__main__":
    from ofer.train.cli import run_cli

    sys.exit(run_cli("expgen", ExpGenTrainConfig, main, prog="trainExpGen.py"))
