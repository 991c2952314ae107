"""NoiseSchedule: the original's buffers (names, dtypes, float32 running product), cosine,
config and state_dict round trips.

Reference values of alphas_cumprod are those printed by the original
``VarianceScheduleMLP`` (float32 sequential cumulative product); we also checked
bit-equality of all 17 buffers against that class once, outside this repository.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ofer.diffusion import NoiseSchedule
from ofer.diffusion.schedule import BUFFER_NAMES

F64 = {"alphas_cumprod_prev", "posterior_variance", "posterior_log_variance_clipped",
       "posterior_mean_coeff1", "posterior_mean_coeff2"}


def test_buffer_names_order_and_dtypes():
    s = NoiseSchedule.linear()
    sd = s.state_dict()
    assert tuple(sd) == BUFFER_NAMES and len(sd) == 17
    for name, value in sd.items():
        assert value.shape == (1000,)
        assert value.dtype == (torch.float64 if name in F64 else torch.float32), name


def test_linear_reference_values():
    s = NoiseSchedule.linear(num_steps=1000, beta_1=1e-4, beta_T=1e-2)
    ac = s.alphas_cumprod
    ref = {0: 0.99989998, 1: 0.99979007, 2: 0.99967027, 249: 0.71624553, 499: 0.27570277,
           749: 0.05694630, 995: 0.00655985, 998: 0.00636540, 999: 0.00630175}
    for t, v in ref.items():
        assert abs(ac[t].item() - v) < 6e-9, (t, ac[t].item(), v)
    assert torch.equal(s.betas, torch.linspace(1e-4, 1e-2, 1000))
    # float32 sequential product, not float64: differs from the exact product, by < 1e-6
    exact = np.cumprod(1.0 - s.betas.double().numpy())
    diff = np.abs(ac.double().numpy() - exact)
    assert diff.max() < 1e-6 and diff.max() > 0
    # sequential accumulation in float32, step by step
    acc = np.float32(1.0)
    for t in range(1000):
        acc = np.float32(acc * np.float32(1.0 - s.betas[t].item()))
        if t in (0, 500, 999):
            assert acc == np.float32(ac[t].item())
    assert s.alphas_cumprod_prev[0].item() == 1.0
    assert s.alphas_cumprod_prev[1].item() == ac[0].item()


def test_derived_buffers_formulas():
    s = NoiseSchedule.linear()
    b, ac, acp = s.betas.double(), s.alphas_cumprod.double(), s.alphas_cumprod_prev
    torch.testing.assert_close(s.posterior_variance, b * (1 - acp) / (1 - ac))
    # computed in float32 like the original (so ~1e-4 relative off near t = 0)
    ac32 = s.alphas_cumprod.numpy()
    assert np.array_equal(s.sqrt_recip_minus_one_alpha_cumprod.numpy(), np.sqrt(1.0 / ac32 - 1))
    torch.testing.assert_close(s.sqrt_recip_minus_one_alpha_cumprod.double(), (1 / ac - 1).sqrt(),
                               rtol=2e-4, atol=0)
    torch.testing.assert_close(s.posterior_mean_coeff1, b * acp.sqrt() / (1 - ac))
    assert s.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(1e-20))


def test_cosine_schedule():
    s = NoiseSchedule.cosine(num_steps=1000)
    ac = s.alphas_cumprod.double()
    f = lambda t: math.cos(((t / 1000 + 0.008) / 1.008) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 300, 700):
        assert ac[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)
    assert s.betas.max().item() <= 0.999 + 1e-7
    assert bool((ac[1:] < ac[:-1]).all())


def test_config_and_state_dict_round_trip():
    for s in (NoiseSchedule.linear(500, 2e-4, 2e-2), NoiseSchedule.cosine(200, s=0.01)):
        s2 = NoiseSchedule.from_config(s.config)
        assert s2.config == s.config
        for k, v in s.state_dict().items():
            assert torch.equal(v, s2.state_dict()[k])
        blank = NoiseSchedule.linear(s.num_steps)
        blank.load_state_dict(s.state_dict(), strict=True)
        assert torch.equal(blank.alphas_cumprod, s.alphas_cumprod)


def test_errors():
    with pytest.raises(ValueError, match="unknown schedule kind 'quadratic'"):
        NoiseSchedule.from_config({"kind": "quadratic"})
    with pytest.raises(ValueError, match="unknown linear schedule keys \\['beta_end'\\]"):
        NoiseSchedule.from_config({"kind": "linear", "beta_end": 0.02})
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule(np.array([0.1, 0.0, 0.2]))


def test_add_noise():
    s = NoiseSchedule.linear()
    x0, eps = torch.randn(3, 4), torch.randn(3, 4)
    t = torch.tensor([0, 500, 999])
    xt = s.add_noise(x0, t, eps)
    ac = s.alphas_cumprod[t].view(-1, 1)
    torch.testing.assert_close(xt, ac.sqrt() * x0 + (1 - ac).sqrt() * eps)
