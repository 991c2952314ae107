"""CO-545-style metrics: analytic cases, naive references, alignment choices, file layer."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from ofer.eval.co545 import Co545Error, aggregate, co545_metrics, evaluate_co545, main
from ofer.eval.geometry import rodrigues
from ofer.world.now_scans import head_mesh


@pytest.fixture(scope="module")
def mesh():
    V, F = head_mesh(12, 24)
    vis = V[:, 1] > 0  # upper half visible, lower half occluded
    return V / 1000.0, F, vis


def test_identical_samples_have_zero_diversity_and_gt_gives_zero_error(mesh):
    V, F, vis = mesh
    X = np.repeat(V[None], 5, axis=0)
    m = co545_metrics(X, V, vis, faces=F, unit_scale=1000)
    for k in ("std_visible", "std_occluded", "asd_visible", "asd_occluded", "apd_visible", "max_asd_occluded"):
        assert m[k] == pytest.approx(0.0, abs=1e-9)
    for k in ("cse", "cse_visible", "cse_occluded", "se_ranked", "se_mean"):
        assert m[k] == pytest.approx(0.0, abs=1e-9)
    assert m["n_visible"] + m["n_occluded"] == len(V) and m["n_samples"] == 5
    assert co545_metrics(X, V, vis, faces=F, distance="p2s", unit_scale=1000)["cse"] == pytest.approx(0, abs=1e-9)


def test_shift_gives_exact_distances(mesh):
    V, F, vis = mesh
    t = np.array([0.0, 0.003, 0.004])  # 5 mm
    X = np.stack([V, V + t])
    m = co545_metrics(X, V, vis, align="none", unit_scale=1000)
    assert m["asd_occluded"] == pytest.approx(5.0) and m["apd_visible"] == pytest.approx(5.0)
    assert m["max_asd_visible"] == pytest.approx(5.0)
    assert m["std_visible"] == pytest.approx(2.5)
    assert m["cse"] == pytest.approx(0.0, abs=1e-9) and m["cse_index"] == 0
    assert m["se_mean"] == pytest.approx(2.5)
    m1 = co545_metrics(X, V, vis, align="none", selected=1, unit_scale=1000)
    assert m1["se_ranked"] == pytest.approx(5.0)


def test_diversity_matches_naive_loops(mesh):
    V, F, vis = mesh
    rng = np.random.default_rng(0)
    X = V[None] + rng.normal(0, 0.002, (6,) + V.shape)
    m = co545_metrics(X, V, vis, unit_scale=1000)
    occ = np.where(~vis)[0]
    Xo = X[:, occ] * 1000
    D = np.array([[math.sqrt(np.mean(np.sum((Xo[i] - Xo[j]) ** 2, axis=1))) for j in range(6)] for i in range(6)])
    assert m["asd_occluded"] == pytest.approx(np.mean([min(D[i, j] for j in range(6) if j != i) for i in range(6)]))
    assert m["max_asd_occluded"] == pytest.approx(np.mean([max(D[i, j] for j in range(6) if j != i) for i in range(6)]))
    assert m["apd_occluded"] == pytest.approx(np.mean([D[i, j] for i in range(6) for j in range(i + 1, 6)]))
    mu = Xo.mean(0)
    assert m["std_occluded"] == pytest.approx(np.mean([math.sqrt(np.mean([np.sum((Xo[i, v] - mu[v]) ** 2)
                                                                           for i in range(6)]))
                                                        for v in range(len(occ))]))


def test_alignment_choices(mesh):
    V, F, vis = mesh
    R = rodrigues(np.array([0.2, -0.1, 0.3]))
    sim = 1.1 * V @ R.T + [0.01, 0.02, -0.03]
    rig = V @ R.T + [0.01, 0.02, -0.03]
    assert co545_metrics(sim[None], V, vis, unit_scale=1000)["cse"] == pytest.approx(0, abs=1e-8)
    assert co545_metrics(rig[None], V, vis, align="rigid", unit_scale=1000)["cse"] == pytest.approx(0, abs=1e-8)
    assert co545_metrics(sim[None], V, vis, align="rigid", unit_scale=1000)["cse"] > 1.0
    assert co545_metrics(rig[None], V, vis, align="none", unit_scale=1000)["cse"] > 1.0


def test_alignment_fitted_on_visible_ignores_occluded_deformation(mesh):
    V, F, vis = mesh
    Y = V.copy()
    Y[~vis] += [0.0, 0.0, 0.004]  # occluded region pushed 4 mm
    Y = Y @ rodrigues(np.array([0, 0.3, 0])).T
    m = co545_metrics(Y[None], V, vis, unit_scale=1000)
    assert m["cse_visible"] == pytest.approx(0, abs=1e-8)
    assert m["cse_occluded"] == pytest.approx(4.0, rel=1e-6)
    m_all = co545_metrics(Y[None], V, vis, align_on="all", unit_scale=1000)
    assert m_all["cse_visible"] > 0.1  # fitting on everything spreads the error


def test_region_and_exclude(mesh):
    V, F, vis = mesh
    region = np.arange(0, len(V), 2)
    excl = np.where(~vis)[0][:5]
    m = co545_metrics(np.repeat(V[None], 2, 0), V, vis, region=region, exclude=excl)
    assert m["n_visible"] == int(vis[region].sum())
    assert m["n_occluded"] == int((~vis[region]).sum()) - len(np.intersect1d(excl, region))


def test_errors_are_one_line(mesh):
    V, F, vis = mesh
    with pytest.raises(Co545Error, match="same V") as e:
        co545_metrics(V[None, :10], V, vis)
    assert "\n" not in str(e.value)
    with pytest.raises(Co545Error, match="one entry per vertex"):
        co545_metrics(V[None], V, vis[:5])
    with pytest.raises(Co545Error, match="needs the mesh faces"):
        co545_metrics(V[None], V, vis, distance="p2s")
    with pytest.raises(Co545Error, match="out of range"):
        co545_metrics(V[None], V, vis, selected=3)


def test_single_sample_gives_nan_asd_and_aggregate_skips_it(mesh):
    V, F, vis = mesh
    m = co545_metrics(V[None], V, vis)
    assert math.isnan(m["asd_visible"]) and m["std_visible"] == 0
    agg = aggregate([m, {**m, "cse": 2.0}])
    assert agg["asd_visible"]["n"] == 0 and agg["cse"]["mean"] == pytest.approx(1.0)


def test_file_layer_and_cli(tmp_path, mesh, capsys):
    V, F, vis = mesh
    rng = np.random.default_rng(1)
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    (gt / "a").mkdir(parents=True)
    (pred / "a" / "img1").mkdir(parents=True)
    for name in ("img1", "img2", "img3"):
        np.savez(gt / "a" / f"{name}.npz", vertices=V, occluded=~vis, faces=F)
    X = V[None] + rng.normal(0, 0.001, (4,) + V.shape)
    np.savez(pred / "a" / "img1" / "samples.npz", vertices=X, selected=2)
    np.savez(pred / "a" / "img2.npz", vertices=X[:2])
    s = evaluate_co545(pred, gt, tmp_path / "out")
    assert s["num_evaluated"] == 2 and s["missing"] == ["a/img3"]
    direct = co545_metrics(X, V, vis, selected=2, unit_scale=1000)
    row = s["per_image"][0]
    assert row["image"] == "a/img1" and row["se_ranked"] == pytest.approx(direct["se_ranked"])
    with open(tmp_path / "out" / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and float(rows[0]["cse"]) == pytest.approx(direct["cse"], abs=1e-6)
    js = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert js["aggregate"]["cse"]["n"] == 2 and js["settings"]["align"] == "similarity"
    with pytest.raises(Co545Error, match="1 of 3 images have no prediction"):
        evaluate_co545(pred, gt, tmp_path / "out", strict=True)
    with pytest.raises(Co545Error, match="pass --flame"):
        np.savez(pred / "a" / "img3.npz", something=X)
        evaluate_co545(pred, gt, tmp_path / "out")
    (pred / "a" / "img3.npz").unlink()
    np.save(tmp_path / "region.npy", np.arange(50))
    assert main(["--pred", str(pred), "--gt", str(gt), "--out", str(tmp_path / "o2"), "--region",
                 str(tmp_path / "region.npy"), "--align", "rigid", "--max-samples", "3"]) == 0
    assert "cse" in capsys.readouterr().out
    js = json.loads((tmp_path / "o2" / "summary.json").read_text())
    assert js["settings"]["region_size"] == 50 and js["per_image"][0]["n_samples"] == 3
    assert main(["--pred", str(tmp_path / "nope"), "--gt", str(gt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prediction folder not found" in err[0]
