"""The three OFER models, their table of kinds, the conditioned model and checkpoint loading.

* heads: :class:`IdGen`, :class:`ExpGen` (conditional diffusion) and :class:`IdRank` (ranker);
* :data:`SPECS`: what each kind is (encoders, condition layout, dataset mode, training schema);
* :class:`ConditionedModel`: encoders + head, the one place a condition is built;
* :func:`load_model`: any checkpoint (ours or released) -> a conditioned model, one read.
"""

from __future__ import annotations

from .conditioned import ConditionedModel, build_model
from .expgen import ExpGen
from .idgen import IdGen
from .idrank import IdRank
from .loading import export_checkpoint, load_checkpoint, load_model, load_trained_model
from .spec import KINDS, SPECS, ModelSpec

__all__ = [
    "IdGen",
    "ExpGen",
    "IdRank",
    "SPECS",
    "KINDS",
    "ModelSpec",
    "ConditionedModel",
    "build_model",
    "load_model",
    "load_trained_model",
    "load_checkpoint",
    "export_checkpoint",
]
