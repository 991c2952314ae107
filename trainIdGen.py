#!/usr/bin/env python
"""Train IdGen: ArcFace-conditioned diffusion over FLAME shape coefficients.

    python trainIdGen.py --config configs/idgen.yaml [key.sub=value ...] [--dry-run]
    torchrun --nproc_per_node=4 trainIdGen.py --config configs/idgen.yaml

The same as ``python -m ofer.train idgen ...`` (:func:`ofer.train.entry.train_idgen`).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # run from a checkout

from ofer.config import IdGenTrainConfig  # noqa: E402
from ofer.train.entry import train_idgen as main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    from ofer.train.cli import run_cli

    sys.exit(run_cli("idgen", IdGenTrainConfig, main, prog="trainIdGen.py"))
