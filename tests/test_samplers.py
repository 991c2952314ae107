"""Samplers: legacy DDIM bit for bit against the original, DDPM against the original's noise
stream, agreement with an analytic Gaussian target, determinism, batch-size independence.

Golden numbers (tests/golden/samplers.json) come from the original
``FlameParamDiffusion.sample`` (prathebaselva/OFER @1ea5756, run on CPU outside this
repository) with ``torch.manual_seed(7)`` right before the call, which draws ``x_T`` (and,
for 'ddpm', every step's noise) from the same stream as ``torch.Generator().manual_seed(7)``.
The toy denoiser uses only elementwise IEEE operations, so its trajectory is reproducible
to the last bit on any CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ofer.diffusion import METHODS, NoiseSchedule, row_generators, sample
from ofer.nets import Denoiser

GOLD = json.loads((Path(__file__).parent / "golden" / "samplers.json").read_text())
SCHED = NoiseSchedule.linear()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These networks are tiny per call; one intra-op thread avoids thread-pool stalls on a
    busy 2-core machine (it does not change any result)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def toy_eps(x, t, cond):
    return 0.25 * x + 1e-3 * t.to(torch.float32)[:, None] + 0.5 * cond[:, : x.shape[1]]


def from_hex(rows):
    return torch.tensor([[float.fromhex(v) for v in row] for row in rows], dtype=torch.float64)


def toy_cond():
    return from_hex(GOLD["toy_cond"]).float()


def test_legacy_ddim_bit_for_bit():
    cond = toy_cond()
    x_T = torch.randn(3, 6, generator=torch.Generator().manual_seed(GOLD["x_seed"]))
    out = sample(toy_eps, cond, SCHED, "legacy_ddim", x_T=x_T)
    assert out.dtype == torch.float64
    assert torch.equal(out, from_hex(GOLD["toy_ddim"]))
    # the same start drawn by the sampler from a single generator
    out2 = sample(toy_eps, cond, SCHED, "legacy_ddim",
                  generator=torch.Generator().manual_seed(GOLD["x_seed"]), param_dim=6)
    assert torch.equal(out2, out)


def test_legacy_ddim_visits_251_steps_with_wraparound():
    seen = []

    def spy(x, t, cond):
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    sample(spy, torch.zeros(2, 3), SCHED, "legacy_ddim", x_T=torch.ones(2, 3))
    assert len(seen) == 251 and seen[:3] == [999, 995, 991] and seen[-2:] == [3, -1]
    # with eps = 0 the last (wrapped) step multiplies by sqrt(abar[998] / abar[999])
    x = torch.ones(1, 1, dtype=torch.float64)
    out = sample(lambda x, t, c: torch.zeros_like(x), torch.zeros(1, 3), SCHED, "legacy_ddim",
                 x_T=torch.ones(1, 1))
    assert out.item() != x.item()


def test_ddpm_matches_original_with_same_noise_stream():
    cond = toy_cond()
    out = sample(toy_eps, cond, SCHED, "ddpm",
                 generator=torch.Generator().manual_seed(GOLD["x_seed"]), param_dim=6)
    ref = from_hex(GOLD["toy_ddpm"])
    # float64 coefficients here vs float32 in the original: tiny differences only
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-5)


def test_legacy_ddim_with_seeded_idgen_network():
    gold = GOLD["idgen_legacy"]
    net = Denoiser(300, 512, (300, 50, 10))
    net.reset_parameters(torch.Generator().manual_seed(gold["weight_seed"]))
    net.eval()
    g = torch.Generator().manual_seed(11)
    cond = torch.nn.functional.normalize(torch.randn(2, 512, generator=g), dim=1)
    x_T = torch.randn(2, 300, generator=torch.Generator().manual_seed(GOLD["x_seed"]))
    out = sample(net, cond, SCHED, "legacy_ddim", x_T=x_T)
    expected = torch.tensor(gold["out_first16"], dtype=torch.float64)
    torch.testing.assert_close(out[:, :16], expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.sum(1), torch.tensor(gold["out_row_sum"], dtype=torch.float64),
                               atol=2e-3, rtol=1e-4)


class GaussianEps:
    """Optimal eps-predictor for x0 ~ N(mu, diag(s^2)): E[eps | x_t] in closed form."""

    def __init__(self, schedule, mu, s):
        self.ab = schedule.alphas_cumprod.double()
        self.mu, self.s = mu.double(), s.double()
        self.calls = 0

    def __call__(self, x, t, cond):
        self.calls += 1
        ab = self.ab[t].view(-1, 1)
        var = ab * self.s**2 + (1 - ab)
        return ((1 - ab).sqrt() * (x.double() - ab.sqrt() * self.mu) / var).float()


@pytest.mark.parametrize("method,steps,eta", [("ddpm", None, 0.0), ("ddim", 100, 0.0),
                                              ("ddim", 250, 1.0), ("dpmpp_2m", 20, 0.0),
                                              ("dpmpp_2m", 10, 0.0)])
def test_samplers_reach_analytic_gaussian(method, steps, eta):
    # x0 ~ N(mu, diag(s^2)). The linear schedule ends at abar_T = 0.0063, not 0, so x_T is
    # drawn from the exact marginal N(sqrt(abar_T) mu, abar_T s^2 + 1 - abar_T); then every
    # correct sampler must return N(mu, s^2) up to discretisation error.
    mu, s = torch.tensor([1.5, -0.5, 0.0]), torch.tensor([0.5, 2.0, 1.0])
    n = 4000
    ab_T = SCHED.alphas_cumprod[-1]
    z = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
    x_T = ab_T.sqrt() * mu + (ab_T * s**2 + 1 - ab_T).sqrt() * z
    eps = GaussianEps(SCHED, mu, s)
    out = sample(eps, torch.zeros(n, 1), SCHED, method, steps=steps, eta=eta, x_T=x_T,
                 generator=torch.Generator().manual_seed(1))
    assert eps.calls == (1000 if method == "ddpm" else steps)
    # sampling error of the mean: s / sqrt(n) ~ 0.016 s; of the std: s / sqrt(2n) ~ 0.011 s
    assert torch.all((out.mean(0) - mu).abs() <= 0.06 * s), (out.mean(0), mu)
    assert torch.all((out.std(0) / s - 1).abs() <= 0.05), (out.std(0), s)


def test_samplers_agree_with_each_other():
    # same x_T, deterministic methods: DDIM with many steps is the reference ODE solution
    mu, s = torch.tensor([1.0, -2.0]), torch.tensor([0.7, 1.5])
    eps = GaussianEps(SCHED, mu, s)
    x_T = torch.randn(500, 2, generator=torch.Generator().manual_seed(3))
    ref = sample(eps, torch.zeros(500, 1), SCHED, "ddim", steps=1000, x_T=x_T)
    fast = sample(eps, torch.zeros(500, 1), SCHED, "dpmpp_2m", steps=20, x_T=x_T)
    assert (fast - ref).abs().mean() < 0.03 * s.mean()


def test_timestep_grids():
    from ofer.diffusion.samplers import timesteps

    assert timesteps(1000, 5) == [999, 749, 500, 250, 0]
    for n in (2, 10, 20, 200, 1000):
        ts = timesteps(1000, n, SCHED.alphas_cumprod)
        assert len(ts) == n and ts[0] == 999 and ts[-1] == 0
        assert all(a > b for a, b in zip(ts, ts[1:]))


def test_deterministic_methods_are_pure_functions_of_x_T():
    cond = toy_cond()
    x_T = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    for method in ("legacy_ddim", "dpmpp_2m", "ddim"):
        a = sample(toy_eps, cond, SCHED, method, x_T=x_T, generator=torch.Generator().manual_seed(1))
        b = sample(toy_eps, cond, SCHED, method, x_T=x_T.clone(),
                   generator=torch.Generator().manual_seed(2))
        assert torch.equal(a, b), method


@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpmpp_2m", "legacy_ddim"])
def test_rows_independent_of_batch_size(method):
    n = 3
    cond_all = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(param_dim=6, steps=None if method in ("ddpm", "legacy_ddim") else 12,
              eta=1.0 if method == "ddim" else 0.0)
    big = sample(toy_eps, cond_all.repeat_interleave(n, 0), SCHED, method,
                 generator=row_generators(42, n, [0, 1, 2, 3]), **kw)
    # image 2 alone, with its global index
    small = sample(toy_eps, cond_all[2:3].repeat_interleave(n, 0), SCHED, method,
                   generator=row_generators(42, n, [2]), **kw)
    assert torch.equal(big[2 * n : 3 * n], small)
    # candidates differ from each other and between images
    assert not torch.equal(big[0], big[1]) and not torch.equal(big[0], big[n])


def test_errors():
    with pytest.raises(ValueError) as err:
        sample(toy_eps, torch.zeros(2, 8), SCHED, "euler", param_dim=6)
    assert "euler" in str(err.value) and all(m in str(err.value) for m in METHODS)
    with pytest.raises(ValueError, match="one per row"):
        sample(toy_eps, torch.zeros(2, 8), SCHED, "ddim", param_dim=6,
               generator=row_generators(0, 3, [0]))
    with pytest.raises(ValueError, match="legacy_ddim has a fixed stride"):
        sample(toy_eps, torch.zeros(2, 8), SCHED, "legacy_ddim", steps=50, param_dim=6)
    with pytest.raises(ValueError, match="x_T must have shape"):
        sample(toy_eps, torch.zeros(2, 8), SCHED, "ddim", x_T=torch.zeros(3, 6))
    with pytest.raises(ValueError, match="steps must be in"):
        sample(toy_eps, torch.zeros(2, 8), SCHED, "dpmpp_2m", steps=0, param_dim=6)
    assert math.isfinite(sample(toy_eps, torch.zeros(1, 8), SCHED, "ddim", steps=1,
                                param_dim=6).sum().item())


@pytest.mark.parametrize("method,eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_given_noise_replays_a_generator_run(method, eta):
    """x_T and the per-step noise of a seeded run, handed back as a tensor and as a callable,
    reproduce it exactly; a wrong shape or too few steps is an error."""
    from ofer.diffusion import NoiseSchedule, sample
    from ofer.diffusion.noise import RowNoise

    sched = NoiseSchedule.linear(40, 1e-4, 0.2)
    torch.manual_seed(0)
    net = torch.nn.Linear(4 + 1 + 3, 4)

    def den(x, t, c):
        return net(torch.cat([x, t[:, None].float() / 40, c], 1))

    cond = torch.randn(5, 3)
    ref = sample(den, cond, sched, method, steps=10 if method == "ddim" else None, eta=eta,
                 generator=torch.Generator().manual_seed(3), param_dim=4)
    draws = RowNoise(5, 4, torch.Generator().manual_seed(3), "cpu")
    x_T = draws.initial()
    steps = torch.stack([draws.next() for _ in range(40)])
    kw = dict(steps=10 if method == "ddim" else None, eta=eta, x_T=x_T)
    with torch.no_grad():
        a = sample(den, cond, sched, method, noise=steps, **kw)
        b = sample(den, cond, sched, method, noise=lambda k: steps[k], **kw)
    torch.testing.assert_close(a, ref, rtol=0, atol=0)
    torch.testing.assert_close(b, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs more"):
        sample(den, cond, sched, method, noise=steps[:2], **kw)
    with pytest.raises(ValueError, match="must have shape"):
        sample(den, cond, sched, method, noise=lambda k: torch.zeros(2, 4), **kw)
