"""IdGen: FLAME identity (shape) coefficients from an ArcFace embedding by diffusion."""

from __future__ import annotations

from typing import Any, ClassVar

from .diffusion import RELEASED_DIFFUSION, ConditionalDiffusion

__all__ = ["IdGen"]


class IdGen(ConditionalDiffusion):
    """Conditional diffusion over the 300 FLAME shape coefficients (``shape_coeffs``).

    Condition: the L2-normalised ArcFace embedding (512). Architecture of the released
    model: ``dims = (300, 50, 10)``, 16 q/k/v projections, linear schedule
    (T = 1000, beta 1e-4 -> 1e-2), L1 epsilon loss. The released pipeline sampled it with
    ``method="legacy_ddim"``; ``"dpmpp_2m"`` with ~20 steps is the fast default.

    Example::

        idgen = IdGen()                                  # released architecture
        loss, stats = idgen.training_loss(shape_coeffs, arcface, generator=g)
        shapes = idgen.sample(arcface, n=100, seed=0)    # (B, 100, 300)
    """

    kind: ClassVar[str] = "idgen"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "param_dim": 300,
        "cond_dim": 512,
        "dims": (300, 50, 10),
        **RELEASED_DIFFUSION,
    }

    def __init__(self, param_dim: int = 300, cond_dim: int = 512, dims=(300, 50, 10),
                 num_qkv: int = 16, schedule: dict[str, Any] | None = None,
                 loss: str = "l1", normalize: dict[str, Any] | None = None,
                 prediction: str = "eps", cond_scale: float = 1.0) -> None:
        super().__init__(param_dim, cond_dim, dims, num_qkv, schedule, loss, normalize, prediction,
                         cond_scale)
