"""Model wrappers: config round trips, training losses, batched sampling, IdRank glue."""

from __future__ import annotations

import pytest
import torch

from ofer.errors import ConfigError
from ofer.models import ExpGen, IdGen, IdRank


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_idgen(**kw):
    m = IdGen(param_dim=12, cond_dim=8, dims=(12, 6, 4), **kw)
    m.net.reset_parameters(torch.Generator().manual_seed(0))
    return m.eval()


def test_defaults_are_the_released_architectures():
    assert IdGen().config == {
        "param_dim": 300, "cond_dim": 512, "dims": [300, 50, 10], "num_qkv": 16,
        "schedule": {"kind": "linear", "num_steps": 1000, "beta_1": 1e-4, "beta_T": 1e-2},
        "loss": "l1", "normalize": None, "prediction": "eps", "cond_scale": 1.0}
    e = ExpGen()
    assert e.config["jaw_scale"] == 0.5 and e.config["dims"] == [53, 25, 10] and e.n_exp == 50
    r = IdRank()
    assert r.config["in_dim"] == 10710 and r.num_vertices == 1785 and r.config["mean_scale"] == 1.0


@pytest.mark.parametrize("cls,cfg", [
    (IdGen, {"param_dim": 12, "cond_dim": 8, "dims": [12, 6, 4], "num_qkv": 4, "loss": "mse",
             "schedule": {"kind": "cosine", "num_steps": 100, "s": 0.008, "max_beta": 0.999}}),
    (ExpGen, {"param_dim": 8, "cond_dim": 8, "dims": [8, 4], "jaw_scale": 1.0}),
    (IdRank, {"in_dim": 30, "cond_dim": 8, "hidden": [16, 8], "groups": 4, "temperature": 2.0}),
])
def test_config_round_trip(cls, cfg):
    m = cls.from_config(cfg)
    m2 = cls.from_config(m.config)
    assert m2.config == m.config
    for k, v in cfg.items():
        assert m.config[k] == v
    assert list(m.state_dict()) == list(m2.state_dict())
    assert all(m.state_dict()[k].shape == v.shape for k, v in m2.state_dict().items())


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown IdGen config keys \\['widths'\\]"):
        IdGen.from_config({"widths": [1]})
    with pytest.raises(ConfigError, match="loss must be one of"):
        IdGen.from_config({"loss": "huber"})
    with pytest.raises(ConfigError, match="schedule"):
        IdGen.from_config({"schedule": {"kind": "sigmoid"}})
    with pytest.raises(ConfigError, match="6 \\* \\(number of vertices\\)"):
        IdRank(in_dim=31)


def test_training_loss_l1_and_mse_match_manual_computation():
    for loss in ("l1", "mse"):
        m = tiny_idgen(loss=loss)
        x0, cond = torch.randn(5, 12), torch.randn(5, 8)
        total, stats = m.training_loss(x0, cond, generator=torch.Generator().manual_seed(3))
        assert stats["loss"].shape == (5,) and stats["t"].shape == (5,)
        assert stats["t"].dtype == torch.long and bool((stats["t"] < 1000).all())
        # recompute with the same draws
        g = torch.Generator().manual_seed(3)
        t = torch.randint(0, 1000, (5,), generator=g)
        eps = torch.randn(5, 12, generator=g)
        assert torch.equal(t, stats["t"])
        ac = m.var_sched.alphas_cumprod[t].view(-1, 1)
        pred = m.net(ac.sqrt() * x0 + (1 - ac).sqrt() * eps, t, cond)
        diff = pred - eps
        per = diff.abs().mean(1) if loss == "l1" else diff.pow(2).mean(1)
        torch.testing.assert_close(stats["loss"], per.detach())
        torch.testing.assert_close(total, per.mean())
        total.backward()
        assert m.net.downs[0][2].fn.fn.to_qkv[0].weight.grad is not None  # projections train


def test_sample_shapes_seeds_and_batch_independence():
    m = tiny_idgen()
    cond = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    a = m.sample(cond, 4, method="dpmpp_2m", steps=8, seed=5)
    assert a.shape == (3, 4, 12) and a.dtype == torch.float32
    b = m.sample(cond[1:2], 4, method="dpmpp_2m", steps=8, seed=5, image_indices=[1])
    # same noise; batched matmuls may round differently for another batch size
    torch.testing.assert_close(a[1:2], b, rtol=1e-4, atol=1e-4)
    c = m.sample(cond, 4, method="dpmpp_2m", steps=8, seed=6)
    assert not torch.allclose(a, c)
    # a generator draws the base seed: same generator state -> same samples
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(m.sample(cond, 2, steps=5, generator=g1), m.sample(cond, 2, steps=5, generator=g2))
    # legacy sampler through the wrapper, explicit x_T
    x_T = torch.randn(3, 2, 12, generator=torch.Generator().manual_seed(0))
    l1 = m.sample(cond, 2, method="legacy_ddim", x_T=x_T)
    l2 = m.sample(cond, 2, method="legacy_ddim", x_T=x_T.reshape(6, 12), seed=123)
    assert torch.equal(l1, l2) and l1.dtype == torch.float32
    with pytest.raises(ValueError, match="image_indices"):
        m.sample(cond, 2, seed=0, image_indices=[0])


def test_expgen_split_and_join():
    m = ExpGen(param_dim=8, cond_dim=8, dims=(8, 4), jaw_scale=0.5)
    x = torch.arange(16.0).reshape(2, 8)
    exp_coeffs, jaw_pose = m.split(x)
    assert exp_coeffs.shape == (2, 5) and jaw_pose.shape == (2, 3)
    assert torch.equal(jaw_pose, x[:, 5:] * 0.5) and torch.equal(exp_coeffs, x[:, :5])
    assert torch.equal(m.join(exp_coeffs, x[:, 5:]), x)
    with pytest.raises(ValueError, match="expected"):
        m.split(torch.zeros(2, 7))
    out = m.sample(torch.randn(2, 8), 3, steps=4, seed=0)
    e, j = m.split(out)
    assert e.shape == (2, 3, 5) and j.shape == (2, 3, 3)


def test_idrank_features_loss_select():
    r = IdRank(in_dim=18, cond_dim=8, hidden=(16, 8), groups=4, vertex_indices=[0, 5, 9])
    torch.manual_seed(0)
    verts = 0.01 * torch.randn(2, 6, 12, 3)
    gt = 0.01 * torch.randn(2, 12, 3)
    feats = r.features(verts)
    assert feats.shape == (2, 6, 18)
    scores = r(feats, torch.randn(2, 8))
    assert scores.shape == (2, 6)
    loss, stats = r.training_loss(scores, verts, gt)
    loss.backward()
    assert r.net.ranklayers[0].mlp.weight.grad is not None
    err = stats["errors_mm"]
    manual = (1e3 * (gt[:, None, [0, 5, 9]] - verts[:, :, [0, 5, 9]])).abs().mean((-2, -1))
    torch.testing.assert_close(err, manual)
    sel = r.select(scores)
    assert sel.shape == (2,) and torch.equal(sel, scores.argmax(1))
    torch.testing.assert_close(stats["picked_error_mm"], err[torch.arange(2), sel])
    assert bool((stats["best_error_mm"] <= stats["picked_error_mm"]).all())
    # indices are part of the state
    assert torch.equal(r.state_dict()["vertex_indices"], torch.tensor([0, 5, 9]))
    with pytest.raises(ConfigError, match="needs 3 vertex indices, got 2"):
        r.set_vertex_indices([1, 2])
    with pytest.raises(ConfigError, match="no vertex indices"):
        IdRank(in_dim=18, cond_dim=8, hidden=(16, 8), groups=4).features(verts)
    # mean_scale: in the config, applied to the set-mean half only; a config without it
    # (the released checkpoints) rebuilds the original features
    r2 = IdRank.from_config({**r.config, "mean_scale": 0.1}, vertex_indices=[0, 5, 9])
    assert r2.config["mean_scale"] == 0.1
    torch.testing.assert_close(r2.features(verts)[..., :9], 0.1 * feats[..., :9])
    torch.testing.assert_close(r2.features(verts)[..., 9:], feats[..., 9:])
    legacy = {k: v for k, v in r.config.items() if k != "mean_scale"}
    torch.testing.assert_close(IdRank.from_config(legacy, vertex_indices=[0, 5, 9]).features(verts), feats)
    with pytest.raises(ConfigError, match="mean_scale must be >= 0"):
        IdRank(in_dim=18, cond_dim=8, hidden=(16, 8), groups=4, mean_scale=-1.0)


def test_idrank_learns_to_prefer_low_error_hypotheses():
    # a tiny ranker, trained on synthetic sets where the error is visible in the features,
    # must pick a better-than-average hypothesis
    torch.manual_seed(0)
    r = IdRank(in_dim=12, cond_dim=4, hidden=(32, 16), groups=4, vertex_indices=[0, 1])
    opt = torch.optim.Adam(r.parameters(), lr=3e-3)

    def batch():
        gt = 0.01 * torch.randn(16, 2, 3)
        noise = 0.004 * torch.randn(16, 8, 2, 3) * torch.rand(16, 8, 1, 1)
        return gt[:, None] + noise, gt

    for _ in range(300):
        verts, gt = batch()
        cond = torch.zeros(16, 4)
        loss, _ = r.training_loss(r(r.features(verts), cond), verts, gt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    verts, gt = batch()
    with torch.no_grad():
        _, stats = r.training_loss(r(r.features(verts), torch.zeros(16, 4)), verts, gt)
    assert stats["picked_error_mm"].mean() < 0.8 * stats["errors_mm"].mean()


def _normalized_pair(cls=IdGen, d=12):
    """The same tiny model with and without per-coefficient normalisation (equal weights)."""
    g = torch.Generator().manual_seed(5)
    mean = (torch.randn(d, generator=g) * 3).tolist()
    std = (torch.rand(d, generator=g) * 2 + 0.01).tolist()
    kw = {"param_dim": d, "cond_dim": 8, "dims": (d, 6, 4)}
    if cls is ExpGen:
        kw["jaw_scale"] = 1.0
    plain = cls(**kw)
    plain.net.reset_parameters(torch.Generator().manual_seed(0))
    normed = cls(**kw, normalize={"mean": mean, "std": std})
    normed.load_state_dict(plain.state_dict())  # same keys: the statistics are not weights
    return plain.eval(), normed.eval(), torch.tensor(mean), torch.tensor(std)


@pytest.mark.parametrize("cls", [IdGen, ExpGen])
def test_normalize_standardises_targets_and_restores_samples(cls):
    plain, normed, mean, std = _normalized_pair(cls)
    assert list(plain.state_dict()) == list(normed.state_dict())
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 12, generator=g) * std + mean
    cond = torch.randn(5, 8, generator=g)
    # training: the loss of the normalised model on raw x0 is the plain loss on (x0 - mean) / std
    l_n, s_n = normed.training_loss(x0, cond, generator=torch.Generator().manual_seed(2))
    l_p, s_p = plain.training_loss((x0 - mean) / std, cond, generator=torch.Generator().manual_seed(2))
    assert torch.equal(s_n["t"], s_p["t"]) and torch.allclose(l_n, l_p, rtol=1e-6)
    # sampling: raw samples = standardised samples * std + mean (same noise, same denoiser)
    for method in ("ddim", "dpmpp_2m"):
        a = normed.sample(cond[:2], n=3, method=method, steps=5, seed=7)
        b = plain.sample(cond[:2], n=3, method=method, steps=5, seed=7)
        assert torch.allclose(a, b * std + mean, atol=1e-5)
    # the statistics travel in the config (a checkpoint rebuilds the same model)
    back = cls.from_config(normed.config)
    assert back.config == normed.config and torch.equal(back.param_std, std)
    assert plain.config["normalize"] is None


def test_normalize_config_errors():
    kw = {"param_dim": 4, "cond_dim": 8, "dims": (4, 2)}
    with pytest.raises(ConfigError, match="normalize.std must have 4 entries"):
        IdGen(**kw, normalize={"mean": [0.0] * 4, "std": [1.0] * 3})
    with pytest.raises(ConfigError, match="std must be > 0 everywhere"):
        IdGen(**kw, normalize={"mean": [0.0] * 4, "std": [1.0, 0.0, 1.0, 1.0]})
    with pytest.raises(ConfigError, match="keys 'mean' and 'std'"):
        IdGen(**kw, normalize={"mean": [0.0] * 4})
    with pytest.raises(ConfigError, match="normalize.mean must be a list of 4 numbers"):
        IdGen(**kw, normalize={"mean": "zero", "std": [1.0] * 4})


def test_noise_samples_repeat_rows_and_lower_the_loss_variance():
    m = tiny_idgen()
    g = torch.Generator().manual_seed(3)
    x0, cond = torch.randn(4, 12, generator=g), torch.randn(4, 8, generator=g)
    loss, stats = m.training_loss(x0, cond, generator=torch.Generator().manual_seed(4), noise_samples=3)
    ref, ref_stats = m.training_loss(x0.repeat_interleave(3, 0), cond.repeat_interleave(3, 0),
                                     generator=torch.Generator().manual_seed(4))
    assert stats["loss"].shape == stats["t"].shape == (12,)
    assert torch.equal(loss, ref) and torch.equal(stats["t"], ref_stats["t"])
    # same expected loss, variance over draws ~1/K
    with torch.no_grad():
        draws = {k: torch.stack([m.training_loss(x0, cond, generator=torch.Generator().manual_seed(s),
                                                 noise_samples=k)[0] for s in range(150)])
                 for k in (1, 8)}
    ratio = float(draws[8].std() / draws[1].std())
    assert 0.2 < ratio < 0.55, ratio  # 1/sqrt(8) = 0.35
    assert abs(float(draws[8].mean() - draws[1].mean())) < 3 * float(draws[1].std()) / 150 ** 0.5
    with pytest.raises(ValueError, match="noise_samples must be an integer >= 1"):
        m.training_loss(x0, cond, noise_samples=0)


class _ConstNet(torch.nn.Module):
    """A stand-in denoiser that outputs the same vector for every input."""

    def __init__(self, value):
        super().__init__()
        self.value, self.param_dim = value, value.shape[0]

    def forward(self, x_t, t, cond, cond_film=None):
        return self.value.to(x_t.dtype).expand(x_t.shape[0], -1).clone()


@pytest.mark.parametrize("method", ["ddim", "dpmpp_2m", "ddpm"])
def test_x0_prediction_samples_what_the_net_predicts(method):
    """A net that always predicts x0 = c makes every sampler end at c (analytic case)."""
    m = IdGen(param_dim=4, cond_dim=8, dims=(4, 2), prediction="x0",
              schedule={"kind": "linear", "num_steps": 50, "beta_1": 1e-3, "beta_T": 5e-2})
    c = torch.tensor([0.5, -1.0, 2.0, 0.0])
    m.net = _ConstNet(c)
    out = m.sample(torch.zeros(2, 8), n=3, method=method, steps=None if method == "ddpm" else 10, seed=0)
    # (ddpm: the posterior mean at t = 0 is x0_hat and the last step adds no noise)
    torch.testing.assert_close(out, c.expand(2, 3, 4), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="legacy_ddim samples the released epsilon models only"):
        m.sample(torch.zeros(1, 8), n=1, method="legacy_ddim", seed=0)


def test_x0_prediction_loss_and_eps_view():
    m = tiny_idgen(prediction="x0")
    g = torch.Generator().manual_seed(3)
    x0, cond = torch.randn(6, 12, generator=g), torch.randn(6, 8, generator=g)
    loss, stats = m.training_loss(x0, cond, generator=torch.Generator().manual_seed(4))
    # independent recomputation: same draws, MSE of the net output against x0 itself
    g2 = torch.Generator().manual_seed(4)
    t = torch.randint(0, m.var_sched.num_steps, (6,), generator=g2)
    eps = torch.randn(x0.shape, generator=g2)
    ab = m.var_sched.alphas_cumprod.double()[t][:, None]
    x_t = (ab.sqrt() * x0 + (1 - ab).sqrt() * eps).float()
    with torch.no_grad():
        pred = m.net(x_t, t, cond)
        torch.testing.assert_close(stats["loss"], (pred - x0).abs().mean(1), rtol=1e-5, atol=1e-6)
        # the samplers' view: x_t = sqrt(abar) x0_hat + sqrt(1 - abar) eps_hat
        eps_hat = m(x_t, t, cond)
        torch.testing.assert_close((ab.sqrt() * pred + (1 - ab).sqrt() * eps_hat).float(), x_t,
                                   atol=1e-5, rtol=0)
    assert torch.equal(stats["t"], t) and torch.isclose(loss, stats["loss"].mean())


def test_cond_scale_is_a_scaled_condition():
    plain, scaled = tiny_idgen(), tiny_idgen(cond_scale=4.0)
    scaled.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(1)
    x0, cond = torch.randn(3, 12, generator=g), torch.randn(3, 8, generator=g)
    a = scaled.training_loss(x0, cond, generator=torch.Generator().manual_seed(2))[0]
    b = plain.training_loss(x0, 4.0 * cond, generator=torch.Generator().manual_seed(2))[0]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(scaled.sample(cond, n=2, method="ddim", steps=5, seed=3),
                               plain.sample(4.0 * cond, n=2, method="ddim", steps=5, seed=3))
    assert IdGen.from_config(scaled.config).cond_scale == 4.0
    with pytest.raises(ConfigError, match="cond_scale must be a number > 0"):
        tiny_idgen(cond_scale=0.0)
    with pytest.raises(ConfigError, match="prediction must be one of"):
        tiny_idgen(prediction="v")
