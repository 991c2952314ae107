"""OFER: occluded face expression reconstruction.

From one (possibly occluded) face image, IdGen samples FLAME identity shapes with a
conditional diffusion model, IdRank picks the best, and ExpGen samples expressions on
that identity. See README.md for installation and usage.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import OferError  # noqa: F401


def load_checkpoint(path, kind=None, map_location="cpu"):
    """Load an OFER checkpoint: our own format or an official OFER ``.tar`` file.

    Thin forwarder to :func:`ofer.models.loading.load_checkpoint` (imported lazily so that
    ``import ofer`` stays cheap).
    """
    from .models.loading import load_checkpoint as _load

    return _load(path, kind=kind, map_location=map_location)
