#!/usr/bin/env python
"""Train ExpGen: [FaRL | ArcFace]-conditioned diffusion over 50 expression + 3 jaw values.

    python trainExpGen.py --config configs/expgen.yaml [key.sub=value ...] [--dry-run]

The same as ``python -m ofer.train expgen ...`` (:func:`ofer.train.entry.train_expgen`).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # run from a checkout

from ofer.config import ExpGenTrainConfig  # noqa: E402
from ofer.train.entry import train_expgen as main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    from ofer.train.cli import run_cli

    sys.exit(run_cli("expgen", ExpGenTrainConfig, main, prog="trainExpGen.py"))
