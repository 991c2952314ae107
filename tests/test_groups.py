"""Photo sets (group.by): grouping, the aggregate rule and the outputs of a grouped run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ofer.errors import ConfigError
from ofer.sample import run
from ofer.sample.groups import (aggregate_scores, group_key, group_names, read_group_list, select_identity,
                                split_counts)

from tests.test_pipeline import N_SHAPE, _cfg, setup  # noqa: F401  (the tiny models and images)


def test_group_keys():
    assert group_key("sub/c", "folder") == "sub" and group_key("a", "folder") == "."
    assert group_key("sub/anna_01", "prefix") == "sub/anna" and group_key("bob-2", "prefix", "-") == "bob"
    assert group_key("x", "prefix") == "x" and group_key("sub/c", "none") == "sub/c"
    table = {"a.png": "p1", "sub/c": "p1", "d": "p2"}
    assert [group_key(r, "list", table=table) for r in ("a.png", "sub/c.png", "sub/d.png", "b.png")] == ["p1", "p1", "p2", "b.png"]
    assert group_names(["a", "sub/c", "b", "sub/d"], "folder") == {".": [0, 2], "sub": [1, 3]}
    with pytest.raises(ConfigError):
        group_key("a", "list")
    with pytest.raises(ConfigError):
        group_key("a", "cluster")


def test_group_list_file(tmp_path):
    f = tmp_path / "g.csv"
    f.write_text("# image,group\na.png,anna\nsub/c.png\tanna\n\nb bob  # comment\n")
    assert read_group_list(f) == {"a.png": "anna", "sub/c.png": "anna", "b": "bob"}
    f.write_text("a.png,anna,extra\n")
    with pytest.raises(ConfigError, match="line 1"):
        read_group_list(f)


def test_aggregate_rules_against_naive():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(3, 7))
    ls = s - np.log(np.exp(s).sum(1, keepdims=True))
    np.testing.assert_allclose(aggregate_scores(torch.from_numpy(s)).numpy(), ls.sum(0), rtol=1e-5)
    np.testing.assert_allclose(aggregate_scores(torch.from_numpy(s), "score").numpy(), s.sum(0), rtol=1e-5)
    ranks = np.array([[sorted(row).index(v) for v in row] for row in s])
    np.testing.assert_array_equal(aggregate_scores(torch.from_numpy(s), "borda").numpy(), ranks.sum(0))
    # one image with huge scores dominates the raw sum, not the log-softmax sum
    s2 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [100.0, 0.0, 0.0]])
    assert int(aggregate_scores(s2, "score").argmax()) == 0
    assert int(aggregate_scores(s2, "borda").argmax()) == 1
    with pytest.raises(ConfigError):
        aggregate_scores(s2, "vote")


def test_select_identity_on_a_constructed_score_matrix():
    rng = np.random.default_rng(1)
    shapes = torch.from_numpy(rng.normal(size=(8, 5)))
    # two images; hypotheses 6, 1, 3 lead under both (log-softmax sums 6 > 1 > 3 > the rest)
    s = np.zeros((2, 8))
    s[:, 6], s[:, 1], s[:, 3] = [5.0, 4.0], [3.0, 3.5], [2.0, 2.0]
    agg = aggregate_scores(torch.from_numpy(s))
    ident, chosen = select_identity(shapes, agg, "top_mean", 3)
    assert chosen.tolist() == [6, 1, 3]
    np.testing.assert_allclose(ident.numpy(), shapes.numpy()[[1, 3, 6]].mean(0), rtol=1e-12)
    ident, chosen = select_identity(shapes, agg, "best", 3)  # top_k is ignored by best
    assert chosen.tolist() == [6] and torch.equal(ident, shapes[6])
    ident, chosen = select_identity(shapes, agg, "top_mean", 1)
    assert chosen.tolist() == [6] and torch.equal(ident, shapes[6])
    # more than H: all of them; ties keep the lower index first
    ident, chosen = select_identity(shapes, torch.zeros(8), "top_mean", 50)
    assert chosen.tolist() == list(range(8))
    np.testing.assert_allclose(ident.numpy(), shapes.numpy().mean(0), rtol=1e-12)
    assert select_identity(shapes, torch.tensor([0.0, 2, 1, 2, 0, 0, 0, 0]), "top_mean", 2)[1].tolist() == [1, 3]
    with pytest.raises(ConfigError, match="group.select"):
        select_identity(shapes, agg, "median")
    with pytest.raises(ConfigError, match="group.top_k"):
        select_identity(shapes, agg, "top_mean", 0)


def test_split_counts():
    assert split_counts(6, 3, True) == [6, 6, 6]
    assert split_counts(7, 3, False) == [3, 2, 2]
    assert split_counts(2, 3, False) == [1, 1, 1]


def test_grouped_run_shares_one_identity(setup, tmp_path):  # noqa: F811
    root, images, ov = setup
    out, single = tmp_path / "out", tmp_path / "single"
    files = [images / n for n in ("a.png", "b.png", "sub/c.png", "sub/d.png")]
    sub = tmp_path / "in"
    for f in files:  # only the good images
        d = sub / f.relative_to(images)
        d.parent.mkdir(parents=True, exist_ok=True)
        d.write_bytes(f.read_bytes())
        d.with_suffix(".kps.txt").write_bytes(f.with_suffix(".kps.txt").read_bytes())
    summary = run(_cfg(ov, "group.by=folder", "group.select=best", "preview=false"), sub, out, log=lambda *a: None)
    assert summary["ok"] == 4 and summary["failed"] == 0
    run(_cfg(ov, "preview=false"), sub / "a.png", single, log=lambda *a: None)
    for gname, members in (("_top", ("a", "b")), ("sub", ("sub/c", "sub/d"))):
        g = out / "groups" / gname
        z = np.load(g / "identity.npz")
        assert z["shape_coeffs"].shape == (12, N_SHAPE) and z["scores"].shape == (2, 12)
        np.testing.assert_array_equal(z["source_image"], [0] * 6 + [1] * 6)
        ls = z["scores"] - np.log(np.exp(z["scores"].astype(np.float64)).sum(1, keepdims=True))
        assert z["chosen"].tolist() == [int(np.argmax(ls.sum(0)))]
        np.testing.assert_array_equal(z["shape"], z["shape_coeffs"][z["chosen"][0]])
        for i in range(2):
            assert int(z["per_image_best"][i]) == 6 * i + int(np.argmax(z["scores"][i, 6 * i:6 * i + 6]))
        meta = json.loads((g / "group.json").read_text())
        assert meta["images"] == [m + ".png" for m in members] and meta["chosen"] == z["chosen"].tolist()
        assert meta["select"] == "best" and meta["top_k"] == 1
        for i, m in enumerate(members):
            s = np.load(out / m / "samples.npz")
            assert int(s["ranked_index"]) == int(z["chosen"][0]) and "identity_shape" not in s
            np.testing.assert_array_equal(s["scores"], z["scores"][i])
            assert s["exp_coeffs"].shape == (5, 10)
            assert json.loads((out / m / "result.json").read_text())["group"] == meta["group"]
        ids = [(out / m / "identity.ply").read_bytes() for m in members]
        assert ids[0] == ids[1] == (g / "identity.ply").read_bytes()
    # an image's hypotheses in the pool are those it draws alone (same seed streams)
    alone = np.load(single / "a" / "samples.npz")
    np.testing.assert_allclose(np.load(out / "groups" / "_top" / "identity.npz")["shape_coeffs"][:6],
                               alone["shape_coeffs"], atol=1e-5)
    # a second run finds every group done
    again = run(_cfg(ov, "group.by=folder", "group.select=best", "preview=false"), sub, out, log=lambda *a: None)
    assert again["done_before"] == 4 and again["ok"] == 0


def test_grouped_run_top_mean(setup, tmp_path, synthetic_flame_paths):  # noqa: F811
    """group.select=top_mean: the identity is FLAME's mesh of the mean coefficients of the top_k
    hypotheses by the aggregate, the same in every output."""
    import trimesh

    from ofer.eval.now_submission import load_shape_coeffs
    from ofer.flame import FLAME

    root, images, ov = setup
    sub, out = tmp_path / "in", tmp_path / "out"
    for n in ("sub/c", "sub/d"):
        for ext in (".png", ".kps.txt"):
            d = sub / (n + ext)
            d.parent.mkdir(parents=True, exist_ok=True)
            d.write_bytes((images / (n + ext)).read_bytes())
    cfg = _cfg(ov, "group.by=folder", "group.top_k=4", "preview=false", "export=[flame]")  # top_mean: the default
    summary = run(cfg, sub, out, log=lambda *a: None)
    assert summary["ok"] == 2
    g = out / "groups" / "sub"
    z = np.load(g / "identity.npz")
    ls = z["scores"] - np.log(np.exp(z["scores"].astype(np.float64)).sum(1, keepdims=True))
    np.testing.assert_allclose(z["aggregate"], ls.sum(0), rtol=1e-6)
    # the order of the stored aggregate (the tiny ranker's scores nearly tie in float32)
    top = [int(i) for i in np.argsort(-z["aggregate"], kind="stable")[:4]]
    assert z["chosen"].tolist() == top
    np.testing.assert_allclose(z["shape"], z["shape_coeffs"][top].mean(0), atol=1e-6)
    meta = json.loads((g / "group.json").read_text())
    assert meta["select"] == "top_mean" and meta["top_k"] == 4 and meta["chosen"] == top
    assert meta["chosen_from_image"] == [("sub/c.png", "sub/d.png")[int(z["source_image"][i])] for i in top]
    # the neutral mesh is affine in the shape coefficients: the mean coefficients' mesh is the
    # mean of the four hypotheses' meshes
    flame = FLAME(synthetic_flame_paths.model, synthetic_flame_paths.landmarks, n_shape=N_SHAPE, n_exp=10)
    hyp = flame(shape_coeffs=torch.from_numpy(z["shape_coeffs"][top])).vertices.numpy()
    mesh = trimesh.load(g / "identity.ply", process=False)
    np.testing.assert_allclose(mesh.vertices, hyp.mean(0) * 1000, atol=1e-3)
    for i, m in enumerate(("sub/c", "sub/d")):
        s = np.load(out / m / "samples.npz")
        assert int(s["ranked_index"]) == top[0] and s["ranked_top"].tolist() == top
        np.testing.assert_array_equal(s["identity_shape"], z["shape"])
        np.testing.assert_array_equal(load_shape_coeffs(out / m / "samples.npz"), z["shape"])
        res = json.loads((out / m / "result.json").read_text())
        assert res["ranked_index"] == top[0] and res["ranked_top"] == top
        assert (out / m / "identity.ply").read_bytes() == (g / "identity.ply").read_bytes()
        np.testing.assert_array_equal(np.load(out / m / "export" / "flame_params.npz")["shape"][0], z["shape"])
    # the consumers of an image's samples.npz take the mean identity, not shape_coeffs[ranked_index]
    from ofer.eval.co545 import _flame_vertices, _load_npz
    from ofer.sample.export import export_run

    c = out / "sub" / "c"
    (c / "export" / "flame_params.npz").unlink()
    assert export_run(out, ["flame"], cfg, log=lambda *a: None) == 2
    np.testing.assert_array_equal(np.load(c / "export" / "flame_params.npz")["shape"][0], z["shape"])
    s = _load_npz(c / "samples.npz")
    ref = flame(shape_coeffs=torch.from_numpy(z["shape"])[None].expand(2, -1),
                exp_coeffs=torch.from_numpy(s["exp_coeffs"][:2]), jaw_pose=torch.from_numpy(s["jaw_pose"][:2])).vertices
    got = _flame_vertices({k: s[k] for k in ("shape_coeffs", "identity_shape", "ranked_index")}
                          | {"exp_coeffs": s["exp_coeffs"][:2], "jaw_pose": s["jaw_pose"][:2]}, flame, c)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-6)


def test_group_config_errors(setup):  # noqa: F811
    root, images, ov = setup
    with pytest.raises(ConfigError, match="detector.faces"):
        _cfg(ov, "group.by=folder", "detector.faces=all")
    with pytest.raises(ConfigError, match="group.list"):
        _cfg(ov, "group.by=list")
    with pytest.raises(ConfigError, match="group.by"):
        _cfg(ov, "group.by=people")
    with pytest.raises(ConfigError, match="group.select"):
        _cfg(ov, "group.by=folder", "group.select=median")
    with pytest.raises(ConfigError, match="group.top_k"):
        _cfg(ov, "group.by=folder", "group.select=top_mean", "group.top_k=0")
    assert _cfg(ov, "group.select=top_mean", "group.top_k=1").group.top_k == 1
