"""Noise schedules with the buffers (names, dtypes, arithmetic) of the original OFER code.

The original computes its schedule with numpy: ``betas`` in float32, ``alphas_cumprod``
as a *sequential float32* running product, some derived buffers in float64. Those
rounding details change sampled shapes in the last digits, so :class:`NoiseSchedule`
reproduces them exactly and keeps the original 17 buffer names (the ``var_sched`` entry
of an official checkpoint loads with ``strict=True``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["NoiseSchedule", "BUFFER_NAMES", "SCHEDULE_KINDS"]

#: The 17 buffers of the original ``VarianceScheduleMLP``, in registration order.
BUFFER_NAMES = (
    "betas",
    "alphas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alpha_cumprod",
    "sqrt_alpha",
    "sqrt_recip_alpha",
    "sqrt_one_minus_alpha_cumprod",
    "log_one_minus_alpha_cumprod",
    "sqrt_recip_alpha_cumprod",
    "sqrt_recip_minus_one_alpha_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coeff1",
    "posterior_mean_coeff2",
    "posterior_mean_coeff3",
    "mean_coeff",
)

SCHEDULE_KINDS = ("linear", "cosine")


def _buffers_from_betas(betas: np.ndarray) -> dict[str, Tensor]:
    """All 17 buffers from float32 ``betas`` (T,), with the original's dtypes.

    float64: ``alphas_cumprod_prev``, ``posterior_variance``, ``posterior_log_variance_clipped``,
    ``posterior_mean_coeff1``, ``posterior_mean_coeff2``; every other buffer is float32.
    """
    betas = np.asarray(betas, dtype=np.float32)
    alphas = (1 - betas).astype(np.float32)
    ac = np.cumprod(alphas)  # float32, sequential accumulation (as the original)
    ac_prev = np.append(1.0, ac[:-1])  # float64
    pv = betas * (1.0 - ac_prev) / (1.0 - ac)  # float64
    one_minus_ac = torch.from_numpy((1.0 - ac).astype(np.float32))
    betas_t = torch.from_numpy(betas.copy())
    out = {
        "betas": betas_t,
        "alphas": torch.from_numpy(alphas),
        "alphas_cumprod": torch.from_numpy(ac),
        "alphas_cumprod_prev": torch.from_numpy(ac_prev),
        "sqrt_alpha_cumprod": torch.from_numpy(np.sqrt(ac)),
        "sqrt_alpha": torch.from_numpy(np.sqrt(alphas)),
        "sqrt_recip_alpha": torch.from_numpy(np.sqrt(1.0 / alphas)),
        "sqrt_one_minus_alpha_cumprod": torch.from_numpy(np.sqrt(1.0 - ac)),
        "log_one_minus_alpha_cumprod": torch.from_numpy(np.log(1.0 - ac)),
        "sqrt_recip_alpha_cumprod": torch.from_numpy(np.sqrt(1.0 / ac)),
        "sqrt_recip_minus_one_alpha_cumprod": torch.from_numpy(np.sqrt((1.0 / ac) - 1)),
        "posterior_variance": torch.from_numpy(pv),
        "posterior_log_variance_clipped": torch.from_numpy(np.log(np.maximum(pv, 1e-20))),
        "posterior_mean_coeff1": torch.from_numpy(betas * np.sqrt(ac_prev) / (1 - ac)),
        "posterior_mean_coeff2": torch.from_numpy((1.0 - ac_prev) * np.sqrt(alphas) / (1 - ac)),
        "posterior_mean_coeff3": torch.from_numpy(betas * np.sqrt(1.0 / (1 - ac))),
        "mean_coeff": one_minus_ac / betas_t,
    }
    return {k: v.contiguous() for k, v in out.items()}


class NoiseSchedule(nn.Module):
    """A discrete variance-preserving schedule ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``.

    Build it with :meth:`linear` or :meth:`cosine` (or :meth:`from_config`). Buffers (all
    (T,), see ``BUFFER_NAMES``) move with ``.to(device)``; ``state_dict()`` has exactly the
    17 names of the original ``var_sched``.

    Attributes:
        kind: ``"linear"`` or ``"cosine"``.
        params: the constructor arguments of that kind (plain dict).
    """

    betas: Tensor
    alphas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor

    def __init__(self, betas: np.ndarray | Tensor, kind: str = "linear", **params: Any) -> None:
        super().__init__()
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule kind {kind!r}; expected one of {SCHEDULE_KINDS}")
        betas = np.asarray(betas.detach().cpu() if isinstance(betas, Tensor) else betas)
        betas = betas.astype(np.float32)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        self.kind = kind
        self.params = dict(params)
        for name, value in _buffers_from_betas(betas).items():
            self.register_buffer(name, value)

    # ----------------------------------------------------------------- builders
    @classmethod
    def linear(
        cls, num_steps: int = 1000, beta_1: float = 1e-4, beta_T: float = 1e-2
    ) -> "NoiseSchedule":
        """``betas = torch.linspace(beta_1, beta_T, num_steps)`` in float32 (the original)."""
        betas = torch.linspace(beta_1, beta_T, steps=int(num_steps)).numpy()
        return cls(betas, "linear", num_steps=int(num_steps), beta_1=float(beta_1),
                   beta_T=float(beta_T))

    @classmethod
    def cosine(
        cls, num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999
    ) -> "NoiseSchedule":
        """Nichol & Dhariwal's cosine schedule, computed like the original's cosine mode.

        ``f(t) = cos(((t / T + s) / (1 + s)) * pi / 2) ** 2``, ``abar_t = f(t) / f(0)``,
        ``beta_i = min(1 - abar_{i+1} / abar_i, max_beta)`` (float64, then float32).
        """
        T = int(num_steps)
        ft = [math.cos(((t / T + s) / (1 + s)) * (math.pi / 2)) ** 2 for t in range(T + 1)]
        abar = [ft[t] / ft[0] for t in range(T + 1)]
        betas = np.array([min(1 - abar[i] / abar[i - 1], max_beta) for i in range(1, T + 1)])
        return cls(betas, "cosine", num_steps=T, s=float(s), max_beta=float(max_beta))

    @property
    def config(self) -> dict[str, Any]:
        """Plain dict that :meth:`from_config` turns back into this schedule."""
        return {"kind": self.kind, **self.params}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "NoiseSchedule":
        """Build from ``{"kind": "linear"|"cosine", **params}``; unknown keys raise ValueError."""
        config = dict(config)
        kind = config.pop("kind", "linear")
        if kind == "linear":
            allowed = ("num_steps", "beta_1", "beta_T")
        elif kind == "cosine":
            allowed = ("num_steps", "s", "max_beta")
        else:
            raise ValueError(f"unknown schedule kind {kind!r}; expected one of {SCHEDULE_KINDS}")
        unknown = sorted(set(config) - set(allowed))
        if unknown:
            raise ValueError(f"unknown {kind} schedule keys {unknown}; expected {list(allowed)}")
        return getattr(cls, kind)(**config)

    # ------------------------------------------------------------------- access
    @property
    def num_steps(self) -> int:
        """T, the number of diffusion steps."""
        return int(self.betas.shape[0])

    def alpha_bar64(self) -> Tensor:
        """``alphas_cumprod`` as float64 (T,) on the buffers' device."""
        return self.alphas_cumprod.double()

    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Forward process ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (float32 coefficients).

        Args:
            x0: (B, D) clean parameters. t: (B,) int64. noise: (B, D).

        Returns:
            (B, D) x_t in x0's dtype.
        """
        t = t.to(self.betas.device).long()
        a = self.sqrt_alpha_cumprod[t].to(x0.device, x0.dtype).view(-1, 1)
        b = self.sqrt_one_minus_alpha_cumprod[t].to(x0.device, x0.dtype).view(-1, 1)
        return a * x0 + b * noise

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())
