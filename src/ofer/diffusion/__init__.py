"""Diffusion: noise schedules, reproducible per-row noise and samplers."""

from __future__ import annotations

from .noise import derive_seed, row_generators
from .samplers import METHODS, sample, timesteps
from .schedule import NoiseSchedule

__all__ = ["NoiseSchedule", "sample", "METHODS", "timesteps", "derive_seed", "row_generators"]
