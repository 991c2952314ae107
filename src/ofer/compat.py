"""``python -m ofer.compat``: convert a released OFER ``.tar`` checkpoint into this package's format.

The import itself lives in :mod:`ofer.models.official` (strict key mapping, the q/k/v replay,
the report) and loading in :mod:`ofer.models.loading`; their public names are re-exported here.
"""

from __future__ import annotations

import argparse
import sys

from .errors import OferError
from .models.loading import export_checkpoint, load_checkpoint
from .models.official import QKV_REPLAYS, ImportReport, ImportResult, import_official, replay_qkv
from .models.spec import KINDS

__all__ = ["import_official", "load_checkpoint", "export_checkpoint", "replay_qkv", "ImportReport",
           "ImportResult", "KINDS", "main"]


def main(argv: list[str] | None = None) -> int:
    """``python -m ofer.compat --kind idgen IN.tar OUT.pt``: convert and print the report."""
    parser = argparse.ArgumentParser(
        prog="python -m ofer.compat",
        description="Convert an official OFER .tar checkpoint into this package's format.")
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("src", help="official checkpoint (.tar)")
    parser.add_argument("dst", help="output checkpoint (.pt)")
    parser.add_argument("--qkv", default="training", choices=QKV_REPLAYS,
                        help="whose draw of the untrained q/k/v projections to replay: the "
                             "training process's (default) or the released test script's")
    parser.add_argument("--qkv-seed", type=int, default=None,
                        help="torch seed of that process (default: 1 released, else 0)")
    parser.add_argument("--vertex-indices", default=None,
                        help="IdRank: frontindices.npy or a FLAME_masks.pkl-style file")
    args = parser.parse_args(argv)
    try:
        res = import_official(args.src, args.kind, qkv=args.qkv,
                              qkv_seed=args.qkv_seed, vertex_indices=args.vertex_indices)
        export_checkpoint(res.model, args.dst, encoders=res.encoders)
    except OferError as exc:
        report = getattr(exc, "report", None)
        if report is not None and (report.missing or report.unexpected or report.mis_shaped):
            print(report, file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the output cannot be written (folder under a file, disk full, ...)
        print(f"error: cannot write {args.dst}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(res.report)
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
