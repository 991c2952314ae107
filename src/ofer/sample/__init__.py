"""Sampling reconstructions: the configuration, the reconstructor and the folder runner.

``python -m ofer.sample --input DIR --output OUT [--config FILE] [key=value ...]`` is ``sample.py``.
"""

from __future__ import annotations

from .config import PRESETS, SampleConfig
from .reconstructor import ImageResult, Reconstructor, image_seed_index
from .runner import main, run

__all__ = ["SampleConfig", "PRESETS", "Reconstructor", "ImageResult", "image_seed_index", "run", "main"]
