"""Shared conditional-diffusion wrapper for IdGen and ExpGen."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..diffusion import NoiseSchedule, row_generators, sample
from ..diffusion.noise import fresh_generator
from ..errors import ConfigError
from ..nets.unet1d import Denoiser

LOSSES = ("l1", "mse")
PREDICTIONS = ("eps", "x0")
DEFAULT_SCHEDULE = {"kind": "linear", "num_steps": 1000, "beta_1": 1e-4, "beta_T": 1e-2}
#: Settings every released diffusion head shares (its subclasses add their widths).
RELEASED_DIFFUSION = {"num_qkv": 16, "schedule": DEFAULT_SCHEDULE, "loss": "l1", "normalize": None,
                      "prediction": "eps", "cond_scale": 1.0}


def check_config_keys(cls_name: str, config: dict[str, Any], allowed: Sequence[str]) -> None:
    if not isinstance(config, dict):
        raise ConfigError(f"{cls_name} config must be a dict, got {type(config).__name__}")
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown {cls_name} config keys {unknown}; expected some of {list(allowed)}"
        )


def _check_normalize(cls_name: str, normalize: Any, dim: int) -> tuple[list[float], list[float]] | None:
    """``{"mean": [D floats], "std": [D floats > 0]}`` -> (mean, std); None stays None."""
    if normalize is None:
        return None
    where = f"{cls_name} normalize"
    if not isinstance(normalize, dict) or set(normalize) != {"mean", "std"}:
        raise ConfigError(f"{where} must be None or a dict with keys 'mean' and 'std', got {normalize!r}")
    out = []
    for key in ("mean", "std"):
        v = normalize[key]
        try:
            vals = [float(x) for x in v]
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.{key} must be a list of {dim} numbers, got {v!r}") from None
        if len(vals) != dim:
            raise ConfigError(f"{where}.{key} must have {dim} entries (param_dim), got {len(vals)}")
        if not all(math.isfinite(x) for x in vals):
            raise ConfigError(f"{where}.{key} must be finite")
        out.append(vals)
    if min(out[1]) <= 0:
        raise ConfigError(f"{where}.std must be > 0 everywhere, got min {min(out[1])}")
    return out[0], out[1]


class _EpsDenoiser(nn.Module):
    """The samplers' view of a head: ``(x_t, t, cond) -> eps`` whatever the head predicts.

    Scales the condition by ``cond_scale`` and, for an x0-predicting net, turns its output
    into ``eps = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)``. Keeps the denoiser's
    ``cond_film`` fast path.
    """

    def __init__(self, net: Denoiser, alphas_cumprod: Tensor, prediction: str, cond_scale: float) -> None:
        super().__init__()
        self.net, self.prediction, self.cond_scale = net, prediction, float(cond_scale)
        self.abar = alphas_cumprod

    def _cond(self, cond: Tensor) -> Tensor:
        return cond if self.cond_scale == 1.0 else cond * self.cond_scale

    def cond_film(self, cond: Tensor) -> Tensor | None:
        prep = getattr(self.net, "cond_film", None)
        return prep(self._cond(cond)) if callable(prep) else None

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor, cond_film: Tensor | None = None) -> Tensor:
        cond = self._cond(cond)
        out = self.net(x_t, t, cond) if cond_film is None else self.net(x_t, t, cond, cond_film=cond_film)
        if self.prediction == "eps":
            return out
        if bool((t < 0).any()):
            raise ValueError("an x0-predicting head needs time steps >= 0")
        ab = self.abar.to(device=out.device, dtype=torch.float64)[t.reshape(-1).long()][:, None]
        eps = (x_t.double() - ab.sqrt() * out.double()) / (1.0 - ab).sqrt()
        return eps.to(out.dtype)


class ConditionalDiffusion(nn.Module):
    """Denoiser ``net`` + schedule ``var_sched`` + epsilon loss + sampling.

    The ``state_dict`` is laid out like the original ``diffusion`` checkpoint entry:
    ``net.<Denoiser key>`` and ``var_sched.<17 schedule buffers>``.

    ``normalize`` (optional, not in the released models): per-coefficient ``mean`` and
    ``std`` of the training targets. The diffusion then runs on ``(x - mean) / std``:
    :meth:`training_loss` takes raw targets and :meth:`sample` returns raw coefficients.
    It gives every coefficient unit scale (the jaw's few hundredths of a radian next to
    unit-variance expression coefficients), so that a short run is calibrated on all of
    them. It lives in :attr:`config` (non-persistent buffers): the ``state_dict`` keys do
    not change.

    ``prediction`` (``"eps"``, the released models, or ``"x0"``): what the net is trained
    to output; samplers always see epsilon. ``cond_scale`` multiplies the condition before
    the net (1 in the released models; an L2-normalised 512-d embedding has entries of
    about 0.04, which the net's condition weights must otherwise grow to read).
    """

    kind: ClassVar[str] = "diffusion"
    DEFAULTS: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        param_dim: int,
        cond_dim: int,
        dims: Sequence[int],
        num_qkv: int = 16,
        schedule: dict[str, Any] | None = None,
        loss: str = "l1",
        normalize: dict[str, Sequence[float]] | None = None,
        prediction: str = "eps",
        cond_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ConfigError(f"{type(self).__name__} loss must be one of {LOSSES}, got {loss!r}")
        if prediction not in PREDICTIONS:
            raise ConfigError(f"{type(self).__name__} prediction must be one of {PREDICTIONS}, "
                              f"got {prediction!r}")
        if not (isinstance(cond_scale, (int, float)) and math.isfinite(cond_scale) and cond_scale > 0):
            raise ConfigError(f"{type(self).__name__} cond_scale must be a number > 0, got {cond_scale!r}")
        self.prediction, self.cond_scale = prediction, float(cond_scale)
        self.net = Denoiser(param_dim, cond_dim, dims, num_qkv)
        try:
            self.var_sched = NoiseSchedule.from_config(dict(schedule or DEFAULT_SCHEDULE))
        except ValueError as exc:
            raise ConfigError(f"{type(self).__name__} schedule: {exc}") from exc
        self.loss_type = loss
        stats = _check_normalize(type(self).__name__, normalize, int(param_dim))
        self.normalize = None if stats is None else {"mean": stats[0], "std": stats[1]}
        mean, std = stats if stats is not None else ([0.0] * int(param_dim), [1.0] * int(param_dim))
        self.register_buffer("param_mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("param_std", torch.tensor(std, dtype=torch.float32), persistent=False)

    # ----------------------------------------------------------------- config
    @property
    def param_dim(self) -> int:
        return self.net.param_dim

    @property
    def cond_dim(self) -> int:
        return self.net.cond_dim

    @property
    def config(self) -> dict[str, Any]:
        """Plain dict of the architecture; ``type(self).from_config(config)`` rebuilds it."""
        return {
            "param_dim": self.net.param_dim,
            "cond_dim": self.net.cond_dim,
            "dims": list(self.net.dims),
            "num_qkv": self.net.num_qkv,
            "schedule": dict(self.var_sched.config),
            "loss": self.loss_type,
            "normalize": None if self.normalize is None else {k: list(v) for k, v in self.normalize.items()},
            "prediction": self.prediction,
            "cond_scale": self.cond_scale,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ConditionalDiffusion":
        """Build from :attr:`config` (missing keys take the class defaults)."""
        check_config_keys(cls.__name__, config, list(cls.DEFAULTS))
        merged = {**cls.DEFAULTS, **config}
        return cls(**merged)

    # ---------------------------------------------------------------- training
    def eps_denoiser(self) -> nn.Module:
        """``(x_t, t, cond) -> eps``: the net as the samplers need it (the net itself for
        the released setting, eps prediction and ``cond_scale`` 1)."""
        if self.prediction == "eps" and self.cond_scale == 1.0:
            return self.net
        return _EpsDenoiser(self.net, self.var_sched.alphas_cumprod, self.prediction, self.cond_scale)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Predicted epsilon (B, D) for x_t (B, D), t (B,) int64, cond (B, C)."""
        return self.eps_denoiser()(x_t, t, cond)

    def training_loss(
        self, x0: Tensor, cond: Tensor, generator: torch.Generator | None = None,
        noise_samples: int = 1,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Epsilon-prediction loss at uniformly drawn time steps.

        Args:
            x0: (B, D) clean parameters. cond: (B, C) conditions.
            generator: draws ``t ~ U{0..T-1}`` and ``eps ~ N(0, I)`` (on its device);
                None = a fresh non-deterministic generator.
            noise_samples: K draws of ``(t, eps)`` per example (rows ``i * K + k``). The
                expected loss is the same; its variance is lower, for the price of K
                denoiser passes (cheap next to the image encoders that made ``cond``).

        Returns:
            ``(loss, stats)``: the scalar mean loss and ``{"loss": (B * K,) per-row loss
            (detached), "t": (B * K,) int64}``. The loss is ``mean |eps_hat - eps|`` ("l1", the
            original) or ``mean (eps_hat - eps)^2`` ("mse"), against ``x0`` instead of
            ``eps`` with ``prediction="x0"``; with ``normalize``, ``x0`` is standardised first.
        """
        if int(noise_samples) != noise_samples or noise_samples < 1:
            raise ValueError(f"noise_samples must be an integer >= 1, got {noise_samples}")
        if noise_samples > 1:
            x0 = x0.repeat_interleave(int(noise_samples), dim=0)
            cond = cond.repeat_interleave(int(noise_samples), dim=0)
        g = generator if generator is not None else fresh_generator()
        b = x0.shape[0]
        t = torch.randint(0, self.var_sched.num_steps, (b,), generator=g, device=g.device)
        eps = torch.randn(x0.shape, generator=g, device=g.device, dtype=x0.dtype)
        t, eps = t.to(x0.device), eps.to(x0.device)
        if self.normalize is not None:
            x0 = (x0 - self.param_mean.to(x0)) / self.param_std.to(x0)
        x_t = self.var_sched.add_noise(x0, t, eps)
        if self.cond_scale != 1.0:
            cond = cond * self.cond_scale
        pred = self.net(x_t, t, cond)
        diff = pred - (eps if self.prediction == "eps" else x0)
        per = diff.abs().mean(dim=1) if self.loss_type == "l1" else diff.pow(2).mean(dim=1)
        return per.mean(), {"loss": per.detach(), "t": t}

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self,
        cond: Tensor,
        n: int,
        method: str = "dpmpp_2m",
        steps: int | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        x_T: Tensor | None = None,
        image_indices: Sequence[int] | None = None,
        eta: float = 0.0,
        noise: Tensor | Callable[[int], Tensor] | None = None,
    ) -> Tensor:
        """Draw ``n`` hypotheses per condition in one batched loop of ``B * n`` rows.

        Args:
            cond: (B, C) conditions.
            n: hypotheses per condition.
            method, steps, eta: see :func:`ofer.diffusion.sample` (``"legacy_ddim"`` is
                the released IdGen sampler, ``"ddpm"`` the released ExpGen sampler).
            seed: hypothesis ``k`` of image ``i`` is drawn from ``(seed, image_indices[i], k)``
                only, whatever the batch size.
            generator: used only to draw a base seed when ``seed`` is None.
            x_T: (B, n, D) or (B * n, D) initial noise (then no seed is needed for
                deterministic methods); with ``normalize`` it lives in the standardised space.
            image_indices: global index of each image (default ``0..B-1``).
            noise: per-step noise of the stochastic samplers, ``(K, B * n, D)`` or a callable
                ``k -> (B * n, D)`` (:func:`ofer.diffusion.sample`); with ``x_T`` a run is replayed.

        Returns:
            (B, n, D) float32 (raw coefficients: ``normalize`` is undone).
        """
        b = cond.shape[0]
        rows = cond.repeat_interleave(n, dim=0)
        if image_indices is None:
            image_indices = range(b)
        elif len(image_indices) != b:
            raise ValueError(f"image_indices has {len(image_indices)} entries for {b} conditions")
        if seed is None:
            g = generator if generator is not None else fresh_generator()
            seed = int(torch.randint(0, 2**62, (1,), generator=g, device=g.device).item())
        gens = row_generators(seed, n, list(image_indices))
        if x_T is not None:
            x_T = x_T.reshape(b * n, self.param_dim)
        if method == "legacy_ddim" and self.prediction != "eps":
            raise ValueError("legacy_ddim samples the released epsilon models only; "
                             f"this head predicts {self.prediction}")
        out = sample(self.eps_denoiser(), rows, self.var_sched, method, steps=steps, x_T=x_T,
                     generator=gens, eta=eta, param_dim=self.param_dim, noise=noise)
        out = out.float().reshape(b, n, self.param_dim)
        if self.normalize is not None:
            out = out * self.param_std.to(out) + self.param_mean.to(out)
        return out
