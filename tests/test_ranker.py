"""IdRank scorer, features and ListNet loss against the original code.

tests/golden/ranker.json holds outputs of the original ``RankMLPNet`` (built after
``torch.manual_seed(321)``, which ``RankMLP.reset_parameters(Generator(321))`` replays) on
small seeded inputs, plus the original feature layout and loss; see its "about" field.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ofer.errors import AssetError, UnsafePickleError
from ofer.nets import RankMLP
from ofer.nets.rank_mlp import listnet_loss, load_vertex_indices, rank_features, vertex_errors_mm

GOLD = json.loads((Path(__file__).parent / "golden" / "ranker.json").read_text())


def small_ranker():
    net = RankMLP(in_dim=30, cond_dim=16)
    net.reset_parameters(torch.Generator().manual_seed(GOLD["weight_seed"]))
    return net.eval()


def inputs(B, N):
    g = torch.Generator().manual_seed(GOLD["input_seed"])
    verts = 0.01 * torch.randn(B, N, 40, 3, generator=g)
    gt = 0.01 * torch.randn(B, 40, 3, generator=g)
    cond = torch.randn(B, 16, generator=g)
    return verts, gt, cond


def test_keys_and_default_shapes():
    net = RankMLP()
    sd = net.state_dict()
    assert list(sd) == GOLD["keys"] and len(sd) == 33
    assert sd["ranklayers.0.mlp.weight"].shape == (4096, 10710)
    assert sd["ranklayers.4.shift.weight"].shape == (1, 1024)
    assert "ranklayers.4.gn.weight" not in sd and "ranklayers.0.shift.bias" not in sd
    assert sum(v.numel() for v in sd.values()) == 59_505_986


def test_replayed_init_matches_original():
    sd = small_ranker().state_dict()
    total = sum(v.double().sum() for v in sd.values()).item()
    assert total == pytest.approx(GOLD["param_sum"], abs=1e-9)


@pytest.mark.parametrize("case", ["2x5", "1x1", "1x3"])
def test_features_scores_loss_match_original(case):
    gold = GOLD["cases"][case]
    B, N = gold["B"], gold["N"]
    verts, gt, cond = inputs(B, N)
    feats = rank_features(verts, GOLD["indices"])
    assert feats.shape == (B, N, 30)
    assert feats.double().sum().item() == pytest.approx(gold["features_sum"], rel=1e-5, abs=1e-4)
    torch.testing.assert_close(feats[0, 0, :6].double(), torch.tensor(gold["features_first6"],
                               dtype=torch.float64), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(feats[0, 0, 15:18].double(),
                               torch.tensor(gold["features_resid_first3"], dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        scores = small_ranker()(feats, cond)
    torch.testing.assert_close(scores.double(), torch.tensor(gold["scores"], dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    err = vertex_errors_mm(verts, gt, GOLD["indices"])
    torch.testing.assert_close(err.double(), torch.tensor(gold["errors_mm"], dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)
    loss = listnet_loss(scores, err)
    assert loss.item() == pytest.approx(gold["loss"], abs=1e-6)


def test_groupnorm_skipped_only_for_a_single_row():
    net = small_ranker()
    verts, _, cond = inputs(1, 3)
    feats = rank_features(verts, GOLD["indices"])
    with torch.no_grad():
        one = net(feats[:, :1], cond)
        gn = net.ranklayers[0]
        h = torch.nn.functional.selu(gn.mlp(feats[:, :1]))
        normed = gn.gn(h.reshape(1, -1))
    assert one.shape == (1, 1)
    assert not torch.allclose(h.reshape(1, -1), normed)  # GN would have changed it


def test_conditions_are_per_image():
    net = small_ranker()
    verts, _, cond = inputs(2, 5)
    feats = rank_features(verts, GOLD["indices"])
    with torch.no_grad():
        both = net(feats, cond)
        second = net(feats[1:], cond[1:])
    torch.testing.assert_close(both[1:], second, rtol=1e-5, atol=1e-6)


def test_listnet_loss_matches_cross_entropy_with_soft_targets_and_has_gradient():
    scores = torch.randn(3, 7, requires_grad=True)
    err = torch.rand(3, 7) * 5
    loss = listnet_loss(scores, err)
    ref = torch.nn.functional.cross_entropy(scores, torch.softmax(-err, dim=-1))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(scores.grad).all() and scores.grad.abs().sum() > 0


def test_listnet_loss_per_example():
    g = torch.Generator().manual_seed(4)
    scores, err = torch.randn(4, 6, generator=g), torch.rand(4, 6, generator=g) * 5
    per = listnet_loss(scores, err, temperature=2.0, reduction="none")
    # naive float64 reference: each row's cross-entropy against softmax(-e / T)
    s, e = scores.double().numpy(), err.double().numpy()
    target = np.exp(-e / 2.0) / np.exp(-e / 2.0).sum(1, keepdims=True)
    log_p = s - np.log(np.exp(s).sum(1, keepdims=True))
    np.testing.assert_allclose(per.numpy(), -(target * log_p).sum(1), rtol=1e-5)
    assert per.shape == (4,)
    assert torch.equal(per.mean(), listnet_loss(scores, err, temperature=2.0))
    with pytest.raises(ValueError, match="reduction"):
        listnet_loss(scores, err, reduction="sum")


def test_vertex_index_sources(tmp_path):
    idx = np.array([3, 1, 7], dtype=np.int64)
    np.save(tmp_path / "front.npy", idx)
    assert np.array_equal(load_vertex_indices(tmp_path / "front.npy"), idx)
    masks = {"face": idx, "forehead": np.array([0])}
    with open(tmp_path / "FLAME_masks.pkl", "wb") as f:
        pickle.dump(masks, f)
    assert np.array_equal(load_vertex_indices(tmp_path / "FLAME_masks.pkl"), idx)
    assert np.array_equal(load_vertex_indices(masks), idx)
    assert np.array_equal(load_vertex_indices([3, 1, 7]), idx)
    with pytest.raises(AssetError, match="no 'face' entry"):
        load_vertex_indices({"nose": idx})
    with pytest.raises(AssetError, match="not found"):
        load_vertex_indices(tmp_path / "missing.npy")
    with pytest.raises(AssetError, match="1-D integer"):
        load_vertex_indices(np.zeros((2, 2)))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"face": Evil()}, f)
    with pytest.raises(UnsafePickleError, match="builtins.print"):
        load_vertex_indices(tmp_path / "evil.pkl")


def test_shape_errors():
    net = small_ranker()
    with pytest.raises(ValueError, match="features must have shape"):
        net(torch.zeros(2, 30), torch.zeros(2, 16))
    with pytest.raises(ValueError, match="cond must have shape"):
        net(torch.zeros(2, 3, 30), torch.zeros(1, 16))


def test_mean_scale_weights_only_the_mean_half():
    torch.manual_seed(0)
    verts = 0.1 * torch.randn(2, 5, 9, 3)
    idx = [1, 4, 7]
    plain, scaled = rank_features(verts, idx), rank_features(verts, idx, mean_scale=0.05)
    pts = 1e3 * verts[:, :, idx]
    mean = pts.mean(1, keepdim=True)
    torch.testing.assert_close(scaled[..., :9], (0.05 * mean).expand_as(pts).flatten(2))
    torch.testing.assert_close(scaled[..., 9:], (pts - mean).flatten(2))
    torch.testing.assert_close(scaled[..., 9:], plain[..., 9:])
