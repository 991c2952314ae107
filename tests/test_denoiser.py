"""Denoiser: golden outputs of the original network, the fused attention against a
per-projection loop, batch size one, key names and the original's initialisation order.

Golden numbers (tests/golden/denoiser.json) were produced by running the original OFER
``Unet`` class (prathebaselva/OFER @1ea5756, flameAttnNetwork.py, copied to a scratch
folder outside this repository, CUDA calls removed) on CPU: ``torch.manual_seed(1234)``,
build the network, then feed ``x = randn(4, D)``, ``cond = randn(4, C)`` drawn from
``torch.Generator().manual_seed(99)`` and ``t = [0, 999, 417, -1]``. Our
``Denoiser.reset_parameters(torch.Generator().manual_seed(1234))`` replays the same draws.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ofer.nets import Denoiser
from ofer.nets.unet1d import QKVAttention

GOLDEN = json.loads((Path(__file__).parent / "golden" / "denoiser.json").read_text())
CONFIGS = {"idgen": (300, 512, (300, 50, 10)), "expgen": (53, 1024, (53, 25, 10))}
ATTN_PREFIXES = ["downs.0.2", "downs.1.2", "mid_attn", "ups.0.3", "ups.1.3", "finals.0.1"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These networks are tiny per call; one intra-op thread avoids thread-pool stalls on a
    busy 2-core machine (it does not change any result)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def seeded(name: str, seed: int = 1234) -> Denoiser:
    D, C, dims = CONFIGS[name]
    net = Denoiser(D, C, dims)
    net.reset_parameters(torch.Generator().manual_seed(seed))
    return net.eval()


def golden_inputs(name: str):
    gold = GOLDEN["configs"][name]
    g = torch.Generator().manual_seed(GOLDEN["input_seed"])
    x = torch.randn(4, gold["D"], generator=g)
    c = torch.randn(4, gold["C"], generator=g)
    return x, torch.tensor(gold["t"]), c


def assert_close(actual, expected, atol, rtol=0.0, what=""):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = (actual - expected).abs()
    tol = atol + rtol * expected.abs()
    worst = int((err - tol).argmax())
    assert bool((err <= tol).all()), (
        f"{what}: max abs err {err.max().item():.3g} at flat index {worst} "
        f"({actual.flatten()[worst].item()} vs {expected.flatten()[worst].item()})"
    )


@pytest.mark.parametrize("name", ["idgen", "expgen"])
def test_replayed_init_matches_original_draws(name):
    gold = GOLDEN["configs"][name]
    net = seeded(name)
    sd = net.state_dict()
    official = {k: v for k, v in sd.items() if ".to_qkv." not in k}
    qkv = {k: v for k, v in sd.items() if ".to_qkv." in k}
    assert len(official) == 174 and len(qkv) == 6 * 16
    assert_close(sum(v.double().sum() for v in official.values()), gold["param_sum"], 1e-6)
    assert_close(sum(v.double().abs().sum() for v in official.values()), gold["param_abs_sum"], 1e-5)
    assert_close(sum(v.double().abs().sum() for v in qkv.values()), gold["qkv_abs_sum"], 1e-5)
    assert_close(sd["downs.0.2.fn.fn.to_qkv.0.weight"].flatten()[:4], gold["qkv_block0_proj0_first4"], 0)
    assert_close(sd["downs.0.2.fn.fn.to_qkv.15.weight"].flatten()[:4], gold["qkv_block0_proj15_first4"], 0)
    n_registered = sum(v.numel() for v in official.values())
    assert n_registered == gold["n_params"]


def test_parameter_counts_match_reference():
    # §3.4 of the reference notes: IdGen 6,246,954, ExpGen 1,815,673 registered parameters
    for name, expected in [("idgen", 6_246_954), ("expgen", 1_815_673)]:
        net = Denoiser(*CONFIGS[name])
        n = sum(v.numel() for k, v in net.state_dict().items() if ".to_qkv." not in k)
        assert n == expected


@pytest.mark.parametrize("name", ["idgen", "expgen"])
def test_outputs_match_original_network(name):
    gold = GOLDEN["configs"][name]
    net = seeded(name)
    x, t, c = golden_inputs(name)
    with torch.no_grad():
        out = net(x, t, c).double()
    assert_close(out[:, :16], gold["out_first16"], atol=2e-5, rtol=2e-5, what="first16")
    assert_close(out.sum(1), gold["out_row_sum"], atol=2e-4, rtol=1e-5, what="row sum")
    assert_close(out.abs().sum(1), gold["out_row_abs_sum"], atol=2e-4, rtol=1e-5, what="abs sum")


def test_key_names_and_shapes():
    net = Denoiser(*CONFIGS["idgen"])
    sd = net.state_dict()
    official = [k for k in sd if ".to_qkv." not in k]
    assert official[:6] == [
        "init_conv.weight", "init_conv.bias", "time_mlp.1.weight", "time_mlp.1.bias",
        "time_mlp.3.weight", "time_mlp.3.bias",
    ]
    assert official[-1] == "mid_block2.block2.norm.bias"
    assert sd["downs.0.0.mlp.1.weight"].shape == (600, 1024)
    assert sd["ups.1.2.res_conv.weight"].shape == (300, 600, 1)
    assert sd["mid_attn.fn.norm.g"].shape == (1, 10, 1)
    for prefix, width in zip(ATTN_PREFIXES, [300, 50, 10, 50, 300, 300]):
        for i in range(16):
            assert sd[f"{prefix}.fn.fn.to_qkv.{i}.weight"].shape == (384, width, 1)
    # the projections are real, trainable parameters
    names = {n for n, _ in net.named_parameters()}
    assert "finals.0.1.fn.fn.to_qkv.15.weight" in names
    assert sorted(p for p, _ in net.attention_blocks()) == sorted(ATTN_PREFIXES)


def naive_attention(attn: QKVAttention, x: torch.Tensor) -> torch.Tensor:
    """Per-projection loop in the original layout: (B, c, 1) tensors and Conv1d calls."""
    x3 = x.unsqueeze(-1)
    qs, ks, vs = [], [], []
    for conv in attn.to_qkv:
        q, k, v = F.conv1d(x3, conv.weight).chunk(3, dim=1)  # each (B, 128, 1)
        b = x.shape[0]
        qs.append(q.reshape(b, attn.heads, attn.dim_head, 1))
        ks.append(k.reshape(b, attn.heads, attn.dim_head, 1))
        vs.append(v.reshape(b, attn.heads, attn.dim_head, 1))
    q = torch.stack(qs, dim=-2).squeeze(-1) * attn.scale  # (B, h, d, n)
    k = torch.stack(ks, dim=-2).squeeze(-1)
    v = torch.stack(vs, dim=-2).squeeze(-1)
    sim = torch.einsum("bhdi,bhdj->bhij", q, k)
    out = torch.einsum("bhij,bhdj->bhid", sim.softmax(dim=-1), v)  # (B, h, n, d)
    out = out.permute(0, 1, 3, 2).reshape(x.shape[0], -1, attn.num_qkv)  # b (h d) n
    out = F.conv1d(out, attn.to_out.weight, attn.to_out.bias)
    return attn.to_out_linear(out).squeeze(-1)


@pytest.mark.parametrize("width,num_qkv", [(300, 16), (10, 16), (7, 3)])
def test_fused_attention_matches_per_projection_loop(width, num_qkv):
    torch.manual_seed(0)
    attn = QKVAttention(width, num_qkv=num_qkv)
    x = torch.randn(5, width)
    with torch.no_grad():
        fused = attn(x)
        ref = naive_attention(attn, x)
    assert_close(fused, ref, atol=1e-5, rtol=1e-5, what="fused vs loop")
    # gradients agree too
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    w = torch.randn(5, width)
    (attn(x1) * w).sum().backward()
    g_fused = [p.grad.clone() for p in attn.parameters()]
    attn.zero_grad()
    (naive_attention(attn, x2) * w).sum().backward()
    g_ref = [p.grad.clone() for p in attn.parameters()]
    assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4, what="dx")
    for a, b in zip(g_fused, g_ref):
        assert_close(a, b, atol=1e-5, rtol=1e-4, what="dparam")


def test_fused_cache_follows_weight_updates():
    torch.manual_seed(0)
    attn = QKVAttention(12)
    x = torch.randn(3, 12)
    with torch.no_grad():
        before = attn(x)
        attn.to_qkv[3].weight.mul_(2.0)  # in-place change must invalidate the cache
        after = attn(x)
        ref = naive_attention(attn, x)
    assert not torch.allclose(before, after)
    assert_close(after, ref, atol=1e-5, rtol=1e-5)
    attn.load_state_dict({k: torch.zeros_like(v) if "to_qkv.0." in k else v
                          for k, v in attn.state_dict().items()})
    with torch.no_grad():
        assert_close(attn(x), naive_attention(attn, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["idgen", "expgen"])
def test_batch_of_one_and_rows_independent(name):
    net = seeded(name, seed=3)
    x, t, c = golden_inputs(name)
    with torch.no_grad():
        full = net(x, t, c)
        ones = torch.cat([net(x[i : i + 1], t[i : i + 1], c[i : i + 1]) for i in range(4)])
    assert full.shape == (4, CONFIGS[name][0])
    assert_close(ones, full, atol=1e-5, rtol=1e-5)


def test_input_errors():
    net = Denoiser(*CONFIGS["expgen"])
    with pytest.raises(ValueError, match="cond must have shape"):
        net(torch.zeros(2, 53), torch.zeros(2, dtype=torch.long), torch.zeros(2, 512))
    with pytest.raises(ValueError, match="dims\\[0\\] must equal param_dim"):
        Denoiser(53, 1024, (50, 25, 10))


def test_precomputed_condition_film_and_shared_t_give_the_same_output():
    net = seeded("expgen", seed=5)
    x, _, c = golden_inputs("expgen")
    t = torch.full((4,), 321)
    with torch.no_grad():
        plain = net(x, t, c)
        pre = net(x, t, c, cond_film=net.cond_film(c))
        # per-row path (distinct t) against the shared-t path for equal values
        rows = torch.cat([net(x[i : i + 1], t[i : i + 1], c[i : i + 1]) for i in range(4)])
    assert torch.equal(plain, pre)
    assert_close(rows, plain, atol=1e-5, rtol=1e-5)
