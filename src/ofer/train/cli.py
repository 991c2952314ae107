"""Command-line front end shared by the three training scripts."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence

from ..config import load_config
from ..errors import OferError
from .build import dry_run

__all__ = ["parse_cli", "run_cli"]


def parse_cli(schema: type, argv: Sequence[str] | None = None, prog: str | None = None) -> tuple[Any, bool]:
    """``--config FILE [--dry-run] [key.sub=value ...]`` -> (validated config, dry_run)."""
    ap = argparse.ArgumentParser(prog=prog, description=(schema.__doc__ or "").strip().splitlines()[0])
    ap.add_argument("--config", "-c", help="YAML config (keys missing there take the schema defaults)")
    ap.add_argument("--dry-run", action="store_true",
                    help="validate the config, assets, weights and the dataset index, then exit")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = ap.parse_intermixed_args(argv)
    return load_config(schema, args.config, args.overrides), args.dry_run


def run_cli(kind: str, schema: type, main: Callable[[Any], Any], argv: Sequence[str] | None = None,
            prog: str | None = None) -> int:
    """Parse, then ``--dry-run`` checks or ``main(cfg)``; OferErrors become one line + exit 2."""
    try:
        cfg, dry = parse_cli(schema, argv, prog)
        if dry:
            for line in dry_run(kind, cfg):
                print(line)
            return 0
        main(cfg)
        return 0
    except OferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
