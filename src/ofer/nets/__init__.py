"""Networks: the 1-D U-Net denoiser, the IdRank MLP, ArcFace (IResNet) and FaRL (ViT-B/16).

Names are resolved lazily so that importing one network does not import the others.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Denoiser": ".unet1d",
    "RankMLP": ".rank_mlp",
    "IResNet": ".arcface",
    "FaRLEncoder": ".farl",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name], __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
