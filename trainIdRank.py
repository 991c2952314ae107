#!/usr/bin/env python
"""Train IdRank: score N samples of a frozen IdGen per image (ListNet loss).

    python trainIdRank.py --config configs/idrank.yaml [key.sub=value ...] [--dry-run]

The same as ``python -m ofer.train idrank ...`` (:func:`ofer.train.entry.train_idrank`).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # run from a checkout

from ofer.config import IdRankTrainConfig  # noqa: E402
from ofer.train.entry import train_idrank as main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    from ofer.train.cli import run_cli

    sys.exit(run_cli("idrank", IdRankTrainConfig, main, prog="trainIdRank.py"))
