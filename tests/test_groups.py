"""Photo sets (group.by): grouping, the aggregate rule and the outputs of a grouped run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ofer.errors import ConfigError
from ofer.sample import run
from ofer.sample.groups import aggregate_scores, group_key, group_names, read_group_list, split_counts

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
    summary = run(_cfg(ov, "group.by=folder", "preview=false"), sub, out, log=lambda *a: None)
    assert summary["ok"] == 4 and summary["failed"] == 0
    run(_cfg(ov, "preview=false"), sub / "a.png", single, log=lambda *a: None)
    for gname, members in (("_top", ("a", "b")), ("sub", ("sub/c", "sub/d"))):
        g = out / "groups" / gname
        z = np.load(g / "identity.npz")
        assert z["shape_coeffs"].shape == (12, N_SHAPE) and z["scores"].shape == (2, 12)
        np.testing.assert_array_equal(z["source_image"], [0] * 6 + [1] * 6)
        ls = z["scores"] - np.log(np.exp(z["scores"].astype(np.float64)).sum(1, keepdims=True))
        assert int(z["chosen"]) == int(np.argmax(ls.sum(0)))
        for i in range(2):
            assert int(z["per_image_best"][i]) == 6 * i + int(np.argmax(z["scores"][i, 6 * i:6 * i + 6]))
        meta = json.loads((g / "group.json").read_text())
        assert meta["images"] == [m + ".png" for m in members] and meta["chosen"] == int(z["chosen"])
        for i, m in enumerate(members):
            s = np.load(out / m / "samples.npz")
            assert int(s["ranked_index"]) == int(z["chosen"])
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
    again = run(_cfg(ov, "group.by=folder", "preview=false"), sub, out, log=lambda *a: None)
    assert again["done_before"] == 4 and again["ok"] == 0


def test_group_config_errors(setup):  # noqa: F811
    root, images, ov = setup
    with pytest.raises(ConfigError, match="detector.faces"):
        _cfg(ov, "group.by=folder", "detector.faces=all")
    with pytest.raises(ConfigError, match="group.list"):
        _cfg(ov, "group.by=list")
    with pytest.raises(ConfigError, match="group.by"):
        _cfg(ov, "group.by=people")
