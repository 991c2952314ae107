"""Samplers for epsilon-predicting denoisers: DDPM, DDIM, DPM-Solver++(2M), legacy DDIM.

All samplers share one entry point, :func:`sample`. A denoiser is any callable
``denoiser(x_t (R, D) float32, t (R,) int64, cond (R, C)) -> eps (R, D)``. Rows are
independent: to draw N hypotheses for B conditions, repeat each condition N times and
pass one generator per row (see :mod:`ofer.diffusion.noise`), so the whole set is one
batched loop of B*N rows in which row (i, k) sees the same noise whatever B is.

* ``"ddpm"``: ancestral sampling over all T steps, posterior variance ``beta~_t``.
* ``"ddim"``: DDIM (Song et al. 2021) on ``steps`` time steps evenly spaced over
  ``[T-1, 0]``, ``eta`` in [0, 1] (0 = deterministic), last step to ``abar = 1``.
* ``"dpmpp_2m"``: DPM-Solver++(2M) (Lu et al. 2022), data prediction, second-order
  multistep, on a grid evenly spaced in log-SNR from ``T-1`` to 0; deterministic;
  10-25 steps are enough.
* ``"legacy_ddim"``: the released IdGen sampler, bit for bit (see :func:`legacy_ddim`).

The clean methods keep the trajectory in float64 and return float32; ``legacy_ddim``
returns float64 like the original.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .noise import GeneratorLike, GivenNoise, RowNoise
from .schedule import NoiseSchedule

__all__ = ["sample", "METHODS", "DEFAULT_STEPS", "timesteps", "legacy_ddim"]

Denoise = Callable[[Tensor, Tensor, Tensor], Tensor]

METHODS = ("ddpm", "ddim", "dpmpp_2m", "legacy_ddim")
#: Network evaluations when ``steps`` is None (None = fixed by the method).
DEFAULT_STEPS = {"ddpm": None, "ddim": 50, "dpmpp_2m": 20, "legacy_ddim": None}


def timesteps(num_steps: int, steps: int, alphas_cumprod: Tensor | None = None) -> list[int]:
    """``steps`` distinct integer time steps from ``T-1`` down to 0.

    Evenly spaced in t by default; with ``alphas_cumprod`` given, evenly spaced in
    log-SNR ``lambda = 0.5 log(abar / (1 - abar))`` instead (nearest integer step, then
    made strictly decreasing), which suits few-step solvers on this low-dimensional data.
    """
    if not 1 <= steps <= num_steps:
        raise ValueError(f"steps must be in [1, {num_steps}], got {steps}")
    if steps == 1:
        return [num_steps - 1]
    if alphas_cumprod is None:
        return [int(v) for v in np.linspace(num_steps - 1, 0, steps).round()]
    ab = alphas_cumprod.double().cpu().numpy()
    lam = 0.5 * np.log(ab / (1.0 - ab))
    targets = np.linspace(lam[-1], lam[0], steps)
    ts = [int(np.abs(lam - v).argmin()) for v in targets]
    ts[0], ts[-1] = num_steps - 1, 0
    for i in range(steps - 2, -1, -1):  # strictly decreasing, keeping t = 0 last
        ts[i] = max(ts[i], ts[i + 1] + 1)
    return ts


class _Prepared:
    """Calls the denoiser; for an :class:`~ofer.nets.Denoiser` the condition's FiLM
    projection (constant during sampling) is computed once."""

    def __init__(self, denoiser: Denoise, cond: Tensor) -> None:
        self.denoiser, self.cond = denoiser, cond
        prep = getattr(denoiser, "cond_film", None)
        self.film = prep(cond) if callable(prep) else None

    def __call__(self, x: Tensor, t: int) -> Tensor:
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        if self.film is None:
            return self.denoiser(x.float(), tt, self.cond)
        return self.denoiser(x.float(), tt, self.cond, cond_film=self.film)


def _eps(denoiser: "_Prepared", x: Tensor, t: int, cond: Tensor) -> Tensor:
    return denoiser(x, t)


@torch.no_grad()
def sample(
    denoiser: Denoise,
    cond: Tensor,
    schedule: NoiseSchedule,
    method: str,
    steps: int | None = None,
    x_T: Tensor | None = None,
    generator: GeneratorLike = None,
    *,
    eta: float = 0.0,
    param_dim: int | None = None,
    noise: Tensor | Callable[[int], Tensor] | None = None,
) -> Tensor:
    """Draw one sample per row of ``cond``.

    Args:
        denoiser: ``(x_t (R, D), t (R,) long, cond (R, C)) -> eps (R, D)``.
        cond: (R, C) condition per row (repeat it to draw several samples per condition).
        schedule: the training schedule (T steps).
        method: one of ``METHODS``.
        steps: network evaluations for ``ddim`` / ``dpmpp_2m`` (defaults 50 / 20); must be
            None or T for ``ddpm``; must be None for ``legacy_ddim`` (always 251 for T=1000).
        x_T: (R, D) initial noise; drawn from ``generator`` when None.
        generator: one ``torch.Generator`` for all rows, one per row (batch-size
            independent, recommended) or None (non-deterministic).
        eta: DDIM stochasticity (``ddim`` only).
        param_dim: D; taken from ``x_T`` or ``denoiser.param_dim`` when None.
        noise: the per-step noise instead of draws from ``generator``: ``(K, R, D)`` or a
            callable ``k -> (R, D)`` (:class:`~ofer.diffusion.noise.GivenNoise`); with
            ``x_T`` it makes every method a pure function of the inputs (to replay a run).

    Returns:
        (R, D) samples: float32, or float64 for ``legacy_ddim``.

    With ``x_T`` given and a deterministic method (``dpmpp_2m``, ``legacy_ddim``,
    ``ddim`` with ``eta=0``) the result is a pure function of the inputs.
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; expected one of {METHODS}")
    rows = cond.shape[0]
    if param_dim is None:
        param_dim = x_T.shape[1] if x_T is not None else getattr(denoiser, "param_dim", None)
    if param_dim is None:
        raise ValueError("cannot infer the sample width: pass x_T or param_dim")
    device = cond.device
    drawn = RowNoise(rows, int(param_dim), generator, device)
    if x_T is None:
        x_T = drawn.initial()
    elif x_T.shape != (rows, param_dim):
        raise ValueError(f"x_T must have shape ({rows}, {param_dim}), got {tuple(x_T.shape)}")
    x_T = x_T.to(device)
    noise = drawn if noise is None else GivenNoise(noise, rows, int(param_dim), device)
    T = schedule.num_steps
    denoiser = _Prepared(denoiser, cond)

    if method == "legacy_ddim":
        if steps is not None:
            raise ValueError("legacy_ddim has a fixed stride of 4; pass steps=None")
        return legacy_ddim(denoiser, cond, schedule, x_T)
    if method == "ddpm":
        if steps not in (None, T):
            raise ValueError(f"ddpm runs all {T} steps; use method='ddim' with eta=1 for fewer")
        return _ddpm(denoiser, cond, schedule, x_T, noise)
    steps = DEFAULT_STEPS[method] if steps is None else int(steps)
    if method == "ddim":
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        return _ddim(denoiser, cond, schedule, x_T, timesteps(T, steps), eta, noise)
    ts = timesteps(T, steps, schedule.alphas_cumprod)
    return _dpmpp_2m(denoiser, cond, schedule, x_T, ts)


def _ddpm(denoiser, cond, schedule, x_T, noise: RowNoise) -> Tensor:
    # x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sqrt(beta~_t) z
    betas = schedule.betas.double().tolist()
    ab = schedule.alphas_cumprod.double().tolist()
    x = x_T.double()
    for t in reversed(range(schedule.num_steps)):
        eps = _eps(denoiser, x, t, cond).double()
        x = (x - betas[t] / math.sqrt(1.0 - ab[t]) * eps) / math.sqrt(1.0 - betas[t])
        if t > 0:
            var = betas[t] * (1.0 - ab[t - 1]) / (1.0 - ab[t])
            x = x + math.sqrt(var) * noise.next().double()
    return x.float()


def _ddim(denoiser, cond, schedule, x_T, ts: list[int], eta: float, noise: RowNoise) -> Tensor:
    ab = schedule.alphas_cumprod.double().tolist()
    x = x_T.double()
    for i, t in enumerate(ts):
        a_t = ab[t]
        a_p = ab[ts[i + 1]] if i + 1 < len(ts) else 1.0
        eps = _eps(denoiser, x, t, cond).double()
        x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
        sigma = eta * math.sqrt((1.0 - a_p) / (1.0 - a_t) * (1.0 - a_t / a_p))
        x = math.sqrt(a_p) * x0 + math.sqrt(max(1.0 - a_p - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * noise.next().double()
    return x.float()


def _dpmpp_2m(denoiser, cond, schedule, x_T, ts: list[int]) -> Tensor:
    # DPM-Solver++(2M): with lambda = log(alpha / sigma), h = lambda_t - lambda_s,
    # x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) D,
    # D = (1 + 1/(2r)) x0_s - 1/(2r) x0_prev, r = h_prev / h (first order on the first step).
    ab = schedule.alphas_cumprod.double().tolist()
    alpha = [math.sqrt(ab[t]) for t in ts]
    sigma = [math.sqrt(1.0 - ab[t]) for t in ts]
    lam = [math.log(a) - math.log(s) for a, s in zip(alpha, sigma)]
    x = x_T.double()
    x0_prev: Tensor | None = None
    h_prev = 0.0
    for i, t in enumerate(ts):
        eps = _eps(denoiser, x, t, cond).double()
        x0 = (x - sigma[i] * eps) / alpha[i]
        if i + 1 == len(ts):  # last step: to the clean sample (sigma = 0)
            x = x0
            break
        h = lam[i + 1] - lam[i]
        if x0_prev is None:
            d = x0
        else:
            r = h_prev / h
            d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
        x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x.float()


def legacy_ddim(denoiser: Denoise, cond: Tensor, schedule: NoiseSchedule, x_T: Tensor) -> Tensor:
    """The sampler of the released IdGen pipeline, reproduced bit for bit.

    The visited time steps are ``reversed(range(-1, T, 4))`` = 999, 995, ..., 3, -1
    (251 network calls for T = 1000). At step ``t`` (all buffers indexed ``t mod T``, so
    ``t = -1`` reads index T-1 while the network gets time -1)::

        x0  = sqrt(1/abar_t) * x - sqrt(1/abar_t - 1) * eps          (float32)
        x  <- sqrt(abar_prev_t) * x0 + sqrt(1 - abar_prev_t) * eps     (float64)

    where ``abar_prev_t = abar_{t-1}`` is the *next single step*, not the next visited
    one. The network always sees ``x`` cast to float32; the returned trajectory value
    is float64. ``sigma = 0``, so no noise enters after ``x_T``.

    Args:
        x_T: (R, D) float32 start. Returns (R, D) float64.
    """
    T = schedule.num_steps
    device = x_T.device
    if not isinstance(denoiser, _Prepared):
        denoiser = _Prepared(denoiser, cond)
    srac = schedule.sqrt_recip_alpha_cumprod.to(device)
    srm1 = schedule.sqrt_recip_minus_one_alpha_cumprod.to(device)
    ac_prev = schedule.alphas_cumprod_prev.to(device)
    x = x_T
    for t in reversed(range(-1, T, 4)):
        i = t % T
        xf = x.float()
        eps = _eps(denoiser, xf, t, cond)
        x0 = srac[i].view(1, 1) * xf - srm1[i].view(1, 1) * eps
        coef = torch.sqrt(ac_prev[i]).view(1, 1)
        dir_coef = torch.sqrt(1 - ac_prev[i]).view(1, 1)
        x = coef * x0 + dir_coef * eps
    return x
