"""ofer.uncertainty: per-vertex spread, far-apart choice, regions, colour map, ROC AUC."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ofer.errors import AssetError
from ofer.flame.assets import safe_load_pickle
from ofer.uncertainty import (COLORMAP, colorize, load_regions, nice_ceiling, region_summary, roc_auc,
                              select_far_apart, summarize, vertex_spread)


def _naive_spread(h: np.ndarray) -> np.ndarray:
    """(K, V, 3) -> (V,) by explicit loops."""
    K, V, _ = h.shape
    out = np.zeros(V)
    for v in range(V):
        m = sum(h[k, v] for k in range(K)) / K
        out[v] = np.sqrt(sum(float(np.dot(h[k, v] - m, h[k, v] - m)) for k in range(K)) / K)
    return out


def test_spread_of_identical_hypotheses_is_zero():
    v = torch.randn(1, 50, 3).expand(7, 50, 3)
    assert torch.count_nonzero(vertex_spread(v)) == 0
    assert np.all(vertex_spread(np.random.default_rng(0).normal(size=(1, 9, 3))) == 0)  # one hypothesis


def test_spread_matches_loops_and_analytic_cases():
    rng = np.random.default_rng(1)
    h = rng.normal(size=(6, 20, 3))
    np.testing.assert_allclose(vertex_spread(h), _naive_spread(h), rtol=1e-12)
    # two hypotheses at +-d around any centre: the spread is |d|
    d = rng.normal(size=(20, 3))
    c = rng.normal(size=(20, 3))
    np.testing.assert_allclose(vertex_spread(np.stack([c + d, c - d])), np.linalg.norm(d, axis=1), rtol=1e-12)
    # batched (B, K, V, 3) and hypotheses on another axis
    hb = rng.normal(size=(3, 5, 20, 3))
    np.testing.assert_allclose(vertex_spread(hb)[1], _naive_spread(hb[1]), rtol=1e-12)
    np.testing.assert_allclose(vertex_spread(np.moveaxis(hb, 1, 0), dim=0)[2], _naive_spread(hb[2]), rtol=1e-12)
    with pytest.raises(ValueError):
        vertex_spread(np.zeros((4, 3)))


def test_spread_grows_with_the_spread_of_the_hypotheses():
    rng = np.random.default_rng(2)
    mean = rng.normal(size=(30, 3))
    off = rng.normal(size=(8, 30, 3))
    off -= off.mean(0)
    base = vertex_spread(mean + off)
    for s in (0.0, 0.5, 2.0, 10.0):
        np.testing.assert_allclose(vertex_spread(mean + s * off), s * base, rtol=1e-10, atol=1e-12)
    # moving one hypothesis further from the others increases the spread of every vertex it moves
    far = off.copy()
    far[0] *= 3.0
    assert np.all(vertex_spread(mean + far) > base)


def test_far_apart_choice():
    # hypotheses = translations along x of one mesh: 0, 1, 2, 3, 10
    xs = [0.0, 1.0, 2.0, 3.0, 10.0]
    h = np.stack([np.tile([x, 0.0, 0.0], (4, 1)) for x in xs])
    # mean x = 3.2: closest is 3; then the farthest from it (10), then from {3, 10}: 0, then 1 (ties -> lower)
    assert select_far_apart(h, 4) == [3, 4, 0, 1]
    assert select_far_apart(h, 0) == [] and sorted(select_far_apart(h, 9)) == [0, 1, 2, 3, 4]
    same = np.zeros((5, 4, 3))
    assert select_far_apart(same, 3) == [0, 1, 2]


def test_regions_from_flame_masks(synthetic_flame_paths):
    masks = safe_load_pickle(synthetic_flame_paths.masks)
    reg = load_regions(synthetic_flame_paths.masks, n_vertices=600)
    assert set(reg) == {"face", "eyes", "nose", "mouth", "forehead", "cheeks"}
    np.testing.assert_array_equal(reg["mouth"], np.unique(masks["lips"]))
    cheeks = set(reg["cheeks"].tolist())
    assert cheeks <= set(np.asarray(masks["face"]).tolist())
    for other in ("eye_region", "nose", "lips", "forehead"):
        assert not cheeks & set(np.asarray(masks[other]).tolist())
    spread = np.arange(600, dtype=float)
    s = region_summary(spread, reg)
    assert s["nose"] == pytest.approx(spread[np.unique(masks["nose"])].mean(), abs=1e-4)
    full = summarize(spread, reg)
    assert full["max"] == 599 and full["mean"] == pytest.approx(299.5) and set(full["regions"]) == set(reg)
    assert "regions" not in summarize(spread)
    partial = load_regions({"face": np.arange(10), "lips": np.arange(3)})
    assert set(partial) == {"face", "mouth", "cheeks"} and partial["cheeks"].tolist() == list(range(3, 10))
    with pytest.raises(AssetError, match="another mesh"):
        load_regions(synthetic_flame_paths.masks, n_vertices=100)


def test_colour_map_and_scale():
    c = colorize(np.array([0.0, 1.0, 2.0, -1.0]), vmax=2.0)
    assert c.dtype == np.uint8 and c.shape == (4, 3)
    lo, hi = (np.rint(np.array(COLORMAP[i][1]) * 255) for i in (0, -1))
    np.testing.assert_array_equal(c[0], lo)
    np.testing.assert_array_equal(c[2], hi)
    np.testing.assert_array_equal(c[3], lo)  # clipped
    assert nice_ceiling(0.83) == 1.0 and nice_ceiling(1.2) == 1.5 and nice_ceiling(7.0) == 8.0
    assert nice_ceiling(0.021) == 0.025 and nice_ceiling(30.0) == 30.0 and nice_ceiling(0.0) == 1.0


def _naive_auc(s, y):
    pos, neg = s[y], s[~y]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def test_roc_auc_against_pair_counting():
    rng = np.random.default_rng(3)
    s = rng.integers(0, 6, 80).astype(float)  # many ties
    y = rng.random(80) < 0.3
    assert roc_auc(s, y) == pytest.approx(_naive_auc(s, y), abs=1e-12)
    s2 = rng.normal(size=50) + 0.5 * (y2 := rng.random(50) < 0.5)
    assert roc_auc(s2, y2) == pytest.approx(_naive_auc(s2, y2), abs=1e-12)
    assert roc_auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0 and roc_auc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert roc_auc([1, 1, 1], [0, 1, 0]) == 0.5
    assert np.isnan(roc_auc([1, 2], [1, 1]))
    with pytest.raises(ValueError):
        roc_auc([1, 2, 3], [0, 1])
