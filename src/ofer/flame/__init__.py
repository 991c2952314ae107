"""FLAME head model: safe asset loading, linear blend skinning and the ``FLAME`` layer."""

from .assets import load_flame_model, load_landmark_embedding, safe_load_pickle
from .layer import FLAME, NOW_LANDMARK_INDICES, FLAMEOutput

__all__ = [
    "FLAME",
    "FLAMEOutput",
    "NOW_LANDMARK_INDICES",
    "load_flame_model",
    "load_landmark_embedding",
    "safe_load_pickle",
]
