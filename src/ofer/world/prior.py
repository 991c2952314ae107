"""The head prior of the synthetic world: which FLAME coefficients a world draws, and how.

Identities and expressions are Gaussian on the first coefficients of FLAME's bases (the rest
zero); the jaw opens within a range. Every draw comes from a generator the caller passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import ConfigError

__all__ = ["HeadPrior", "N_SHAPE", "N_EXP"]

#: FLAME's identity and expression basis sizes (the layout of every parameter file)
N_SHAPE, N_EXP = 300, 100


def check_range(name: str, r: Sequence[float], lo: float = -math.inf, hi: float = math.inf) -> tuple[float, float]:
    """``(min, max)`` as floats, or a ConfigError naming ``name`` unless ``lo <= min <= max <= hi``."""
    try:
        a, b = (float(x) for x in r)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a (min, max) pair of numbers, got {r!r}") from None
    if not (lo <= a <= b <= hi):
        raise ConfigError(f"{name} must satisfy {lo} <= min <= max <= {hi}, got {r!r}")
    return a, b


@dataclass(frozen=True)
class HeadPrior:
    """Prior over FLAME coefficients: N(0, sigma) on the first ``*_active`` coefficients, rest zero.

    shape_active / shape_sigma: identity (beta) coefficients drawn, and their std (one number,
    or one per active coefficient: a world can vary mostly what a camera sees).
    exp_active / exp_sigma: expression (psi) coefficients drawn (at most 50), and their std (one
    number, or one per active coefficient).
    jaw_open: range of the jaw opening (rotation about x, radians; positive opens the mouth).
    jaw_side: std of the small sideways jaw rotation (about y, radians).
    """

    shape_active: int = 20
    shape_sigma: float | tuple[float, ...] = 1.0
    exp_active: int = 10
    exp_sigma: float | tuple[float, ...] = 1.0
    jaw_open: tuple[float, float] = (0.0, 0.25)
    jaw_side: float = 0.02

    def __post_init__(self) -> None:
        if not (0 <= int(self.shape_active) <= N_SHAPE):
            raise ConfigError(f"prior.shape_active must be in [0, {N_SHAPE}], got {self.shape_active!r}")
        if not (0 <= int(self.exp_active) <= 50):
            raise ConfigError(f"prior.exp_active must be in [0, 50], got {self.exp_active!r}")
        sigmas = []
        for name in ("shape", "exp"):
            value, active = getattr(self, f"{name}_sigma"), int(getattr(self, f"{name}_active"))
            if isinstance(value, (int, float)):
                sig = [float(value)]
            else:
                sig = [float(v) for v in value]
                if len(sig) != active:
                    raise ConfigError(f"prior.{name}_sigma must be one number or {active} numbers "
                                      f"(one per active coefficient), got {len(sig)}")
                object.__setattr__(self, f"{name}_sigma", tuple(sig))
            sigmas += sig
        if min(sigmas, default=0.0) < 0 or self.jaw_side < 0:
            raise ConfigError("prior: standard deviations must be >= 0")
        object.__setattr__(self, "jaw_open", check_range("prior.jaw_open", self.jaw_open, -0.5, 1.0))

    def sample_identity(self, rng: np.random.Generator) -> np.ndarray:
        """Identity coefficients ``shape_coeffs`` (300,) float32."""
        out = np.zeros(N_SHAPE, np.float32)
        sigma = np.asarray(self.shape_sigma, np.float64)
        out[: self.shape_active] = rng.normal(0.0, sigma, self.shape_active)
        return out

    def sample_expression(self, rng: np.random.Generator, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """``(exp_coeffs (100,), jaw_pose (3,))`` float32; ``scale`` shrinks the expression."""
        exp = np.zeros(N_EXP, np.float32)
        exp[: self.exp_active] = scale * rng.normal(0.0, np.asarray(self.exp_sigma, np.float64), self.exp_active)
        jaw = np.zeros(3, np.float32)
        jaw[0] = scale * rng.uniform(*self.jaw_open)
        jaw[1] = scale * rng.normal(0.0, self.jaw_side)
        return exp, jaw
