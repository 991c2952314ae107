"""ExpGen: FLAME expression and jaw coefficients from [FaRL || ArcFace] by diffusion."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import ConfigError
from .diffusion import RELEASED_DIFFUSION, ConditionalDiffusion

__all__ = ["ExpGen"]


class ExpGen(ConditionalDiffusion):
    """Conditional diffusion over ``[exp_coeffs (n_exp) || jaw_pose (3)]``.

    Condition: ``cat([FaRL (512, not normalised), normalize(ArcFace) (512)])`` = 1024,
    FaRL first. Architecture of the released model: 53 = 50 expression + 3 jaw
    (axis-angle), ``dims = (53, 25, 10)``, linear schedule, L1 loss; sampled there with
    ``method="ddpm"``. Training targets are *unscaled*; :meth:`split` applies
    ``jaw_scale`` (0.5 in the released pipeline) to sampled jaw poses.
    """

    kind: ClassVar[str] = "expgen"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "param_dim": 53,
        "cond_dim": 1024,
        "dims": (53, 25, 10),
        **RELEASED_DIFFUSION,
        "jaw_scale": 0.5,
    }

    def __init__(self, param_dim: int = 53, cond_dim: int = 1024, dims=(53, 25, 10),
                 num_qkv: int = 16, schedule: dict[str, Any] | None = None,
                 loss: str = "l1", jaw_scale: float = 0.5,
                 normalize: dict[str, Any] | None = None, prediction: str = "eps",
                 cond_scale: float = 1.0) -> None:
        if param_dim <= 3:
            raise ConfigError(f"ExpGen param_dim must be n_exp + 3 > 3, got {param_dim}")
        super().__init__(param_dim, cond_dim, dims, num_qkv, schedule, loss, normalize, prediction,
                         cond_scale)
        self.jaw_scale = float(jaw_scale)

    @property
    def n_exp(self) -> int:
        """Number of expression coefficients (``param_dim - 3``)."""
        return self.param_dim - 3

    @property
    def config(self) -> dict[str, Any]:
        return {**super().config, "jaw_scale": self.jaw_scale}

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Split sampled vectors (..., n_exp + 3) into ``exp_coeffs (..., n_exp)`` and
        ``jaw_pose (..., 3)``, the jaw multiplied by ``jaw_scale``."""
        if x.shape[-1] != self.param_dim:
            raise ValueError(f"expected (..., {self.param_dim}), got {tuple(x.shape)}")
        return x[..., : self.n_exp], x[..., self.n_exp :] * self.jaw_scale

    @staticmethod
    def join(exp_coeffs: Tensor, jaw_pose: Tensor) -> Tensor:
        """Training target ``[exp_coeffs || jaw_pose]`` (no jaw scaling), (..., n_exp + 3)."""
        return torch.cat([exp_coeffs, jaw_pose], dim=-1)
