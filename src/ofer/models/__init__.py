"""Model wrappers: encoder outputs in, training loss or samples out."""

from __future__ import annotations

from .expgen import ExpGen
from .idgen import IdGen
from .idrank import IdRank

MODELS = {"idgen": IdGen, "expgen": ExpGen, "idrank": IdRank}

__all__ = ["IdGen", "ExpGen", "IdRank", "MODELS"]
