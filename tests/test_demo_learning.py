"""The demo's learning checks (``ofer.world.report``) on a tiny synthetic world.

The report's checks must be able to fail: samples built from the ground truth with known
quality pass or fail them as constructed, an uninformed ranker / the mean-shape baseline
do not pass the ranked-vs-mean check, and the error and diversity comparisons follow the
constructed data, also when every scene has its own large error (the checks pair the
variants of one scene).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ofer.world.build import WorldConfig, build_world
from ofer.world.report import ALPHA, paired_test, spearman, world_report
from ofer.world.scene import SceneConfig

N_SHAPE, N_EXP, N, M = 20, 50, 16, 8


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w") / "world"
    build_world(out, WorldConfig(identities=2, images_per_identity=1, expression_frames=0, test_identities=12,
                                 vertices=1200, seed=5, scene=SceneConfig(size=96)))
    return out


def _gt(world: Path) -> dict[str, dict]:
    return {p.stem: dict(np.load(p)) for p in sorted((world / "test" / "gt").glob("*.npz"))}


def _write(samples: Path, name: str, shapes: np.ndarray, ranked: int, exp: np.ndarray | None = None) -> None:
    d = samples / name
    d.mkdir(parents=True, exist_ok=True)
    exp = np.zeros((M, N_EXP), np.float32) if exp is None else exp
    np.savez(d / "samples.npz", shape_coeffs=shapes.astype(np.float32), exp_coeffs=exp.astype(np.float32),
             jaw_pose=np.zeros((M, 3), np.float32), ranked_index=np.int64(ranked))


def _hypotheses(gt_shape: np.ndarray, rng: np.random.Generator, spread: float = 1.0) -> np.ndarray:
    """N hypotheses: the truth plus noise of increasing size (index 0 is the closest)."""
    scales = np.linspace(0.1, 2.0, N) * spread
    return gt_shape[None, :N_SHAPE] + scales[:, None] * rng.standard_normal((N, N_SHAPE))


def test_good_ranker_passes_identity_checks(world, tmp_path):
    rng = np.random.default_rng(0)
    for name, gt in _gt(world).items():
        _write(tmp_path, name, _hypotheses(gt["shape_coeffs"], rng, 0.3), ranked=0)
    s = world_report(tmp_path, world)["summary"]
    assert s["images"] == 36 and s["scenes"] == 12  # every scene clean, occluded and masked
    assert s["ranked_error_mm"] < 0.5 * s["mean_sample_error_mm"]
    assert s["checks"]["ranked_below_mean_sample"] and s["checks"]["ranked_below_mean_shape"]
    assert s["best_sample_error_mm"] <= s["ranked_error_mm"] + 1e-9
    assert s["ranked_beats_mean_sample_fraction"] == 1.0


@pytest.mark.slow
def test_uninformed_ranker_and_baseline_do_not_pass_by_construction(world, tmp_path):
    rng = np.random.default_rng(1)
    # an untrained ranker: picks the worst hypothesis (the check must fail) ...
    worst, rand = tmp_path / "worst", tmp_path / "rand"
    for name, gt in _gt(world).items():
        h = _hypotheses(gt["shape_coeffs"], rng)
        _write(worst, name, h, ranked=N - 1)
        # ... or prior samples unrelated to the truth, ranked at random
        _write(rand, name, rng.standard_normal((N, N_SHAPE)), ranked=int(rng.integers(N)))
    s = world_report(worst, world)["summary"]
    assert not s["checks"]["ranked_below_mean_sample"]
    s = world_report(rand, world)["summary"]
    # unrelated prior samples are worse than the mean shape, whatever is picked
    assert not s["checks"]["ranked_below_mean_shape"]
    assert s["mean_sample_error_mm"] > s["mean_shape_error_mm"]
    # the mean shape itself as every hypothesis: ranked == mean == baseline, no strict win
    zero = tmp_path / "zero"
    for name in _gt(world):
        _write(zero, name, np.zeros((N, N_SHAPE)), ranked=3)
    s = world_report(zero, world)["summary"]
    assert s["ranked_error_mm"] == pytest.approx(s["mean_shape_error_mm"])
    assert not s["checks"]["ranked_below_mean_sample"]


@pytest.mark.slow
def test_occlusion_and_diversity_checks_follow_the_data(world, tmp_path):
    rng = np.random.default_rng(2)
    gts = _gt(world)
    occ = {k: float(g["occluded_fraction"]) for k, g in gts.items()}
    mouth = {k: bool(g["mouth_occluded"]) for k, g in gts.items()}
    for sign, folder in ((1, tmp_path / "grows"), (-1, tmp_path / "shrinks")):
        for name, gt in gts.items():
            # error of the ranked hypothesis proportional to (or falling with) the occluded share
            level = occ[name] if sign > 0 else 1.0 - occ[name]
            shapes = gt["shape_coeffs"][None, :N_SHAPE] + np.zeros((N, N_SHAPE))
            shapes[0] += 3.0 * level * np.ones(N_SHAPE) / np.sqrt(N_SHAPE)
            amp = (2.0 if mouth[name] else 0.5) if sign > 0 else (0.5 if mouth[name] else 2.0)
            exp = amp * rng.standard_normal((M, N_EXP))
            _write(folder, name, shapes, ranked=0, exp=exp)
        s = world_report(folder, world)["summary"]
        assert s["occlusion_pairs"] == 12 and s["mouth_pairs"] == 12
        assert s["checks"]["error_grows_with_occlusion"] is (sign > 0)
        assert (s["occlusion_error_increase_fraction"] == 1.0) is (sign > 0)
        # every pair positive: only the observed sign pattern reaches its mean, p = 2^-12
        assert (s["occlusion_p"] == pytest.approx(0.5 ** 12)) is (sign > 0)
        assert (s["spearman_occlusion_vs_ranked_error"] > 0.9) is (sign > 0)
        assert s["checks"]["more_expression_diversity_when_mouth_occluded"] is (sign > 0)


def test_paired_checks_see_through_scene_to_scene_spread(world, tmp_path):
    # every scene has its own large error and expression spread (identity, pose, ...); the
    # occluder adds a little on top. The pairs within a scene must show it.
    rng = np.random.default_rng(3)
    gts = _gt(world)
    base = {str(g["scene"]): rng.uniform(0.0, 4.0) for g in gts.values()}
    for name, gt in gts.items():
        level = base[str(gt["scene"])] + (0.3 if float(gt["occluded_fraction"]) > 0 else 0.0)
        shapes = gt["shape_coeffs"][None, :N_SHAPE] + np.zeros((N, N_SHAPE))
        shapes[0] += level * np.ones(N_SHAPE) / np.sqrt(N_SHAPE)
        amp = base[str(gt["scene"])] + (0.2 if bool(gt["mouth_occluded"]) else 0.0)
        _write(tmp_path, name, shapes, ranked=0, exp=amp * rng.standard_normal((M, N_EXP)))
    s = world_report(tmp_path, world)["summary"]
    assert s["checks"]["error_grows_with_occlusion"]
    assert s["occlusion_error_increase_fraction"] == 1.0


def test_paired_test_against_naive_enumeration():
    import itertools

    rng = np.random.default_rng(0)
    for n in (1, 5, 9):
        d = rng.normal(0.3, 1.0, n)
        means = [np.dot(signs, np.abs(d)) / n for signs in itertools.product((-1, 1), repeat=n)]
        naive = np.mean(np.array(means) >= d.mean() - 1e-12)  # flipping d's signs = flipping |d|'s
        assert paired_test(d) == pytest.approx(naive)
    assert paired_test(np.ones(10)) == pytest.approx(2.0 ** -10)
    assert paired_test(-np.ones(10)) == pytest.approx(1.0)
    assert np.isnan(paired_test(np.array([])))
    # n > 16: seeded Monte Carlo, close to the exact enumeration, and reproducible
    d = rng.normal(0.2, 1.0, 18)
    signs = 1.0 - 2.0 * ((np.arange(2 ** 18)[:, None] >> np.arange(18)) & 1)
    exact = np.mean(signs @ d / 18 >= d.mean() - 1e-12)
    assert paired_test(d) == pytest.approx(exact, abs=0.01)
    assert paired_test(d) == paired_test(d)


@pytest.mark.slow
def test_a_positive_margin_within_the_noise_does_not_hold(world, tmp_path):
    # the occluder changes the error by +0.30 or -0.25 mm, alternating between scenes: the mean
    # grows a little but a sign flip explains it, so the check must not hold
    gts = _gt(world)
    scenes = sorted({str(g["scene"]) for g in gts.values()})
    for name, gt in gts.items():
        k = scenes.index(str(gt["scene"]))
        level = 1.0 + ((0.30 if k % 2 else -0.25) if float(gt["occluded_fraction"]) > 0 else 0.0)
        shapes = gt["shape_coeffs"][None, :N_SHAPE] + np.zeros((N, N_SHAPE))
        shapes[0] += level * np.ones(N_SHAPE) / np.sqrt(N_SHAPE)
        _write(tmp_path, name, shapes, ranked=0)
    s = world_report(tmp_path, world)["summary"]
    assert s["occlusion_error_increase_mm"] > 0 and s["occlusion_p"] > ALPHA
    assert not s["checks"]["error_grows_with_occlusion"]
    # identical expression samples everywhere: no diversity effect, no check
    assert abs(s["lips_expression_std_increase_mm"]) < 1e-9 and not s["checks"]["more_expression_diversity_when_mouth_occluded"]


def test_spearman_against_naive():
    x = np.array([0.1, 0.5, 0.3, 0.9, 0.7])
    assert spearman(x, 2 * x + 1) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    y = np.array([1.0, 3.0, 2.0, 4.0, 5.0])
    # naive: Pearson of ranks, no ties
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    assert spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])


def test_demo_trains_side_by_side_and_reports_failures(tmp_path, monkeypatch):
    import os
    import sys

    import ofer.demo as demo

    def fake_cmd(kind, config, root):
        # records its thread setting and the runs finished when it started; 'bad' fails
        code = ("import os, pathlib, sys, time; p = pathlib.Path(sys.argv[1]); time.sleep(0.3); "
                "done = sorted(f.name for f in p.parent.glob('.*.done')); "
                "p.write_text(os.environ.get('OMP_NUM_THREADS', '-') + ' ' + ','.join(done) + ' '"
                " + str(os.nice(0) if hasattr(os, 'nice') else 0)); "
                "sys.exit(3 if 'bad' in p.name else 0)")
        return [sys.executable, "-c", code, str(root / f"{kind}.ran")]

    monkeypatch.setattr(demo, "_train_cmd", fake_cmd)
    base = os.nice(0) if hasattr(os, "nice") else 0
    demo._train([("idgen", "x.yaml"), ("expgen", "y.yaml"), ("idrank", "z.yaml", "idgen")], tmp_path, threads=1,
                nice={"idgen": 3})
    assert (tmp_path / "idgen.ran").read_text().startswith("1 ")
    assert (tmp_path / "expgen.ran").read_text().startswith("1 ")
    if hasattr(os, "nice"):  # the niceness increment reaches the run it names, and only it
        assert int((tmp_path / "idgen.ran").read_text().split()[-1]) == min(base + 3, 19)
        assert int((tmp_path / "expgen.ran").read_text().split()[-1]) == base
    # IdRank started only once IdGen was done
    assert ".idgen.done" in (tmp_path / "idrank.ran").read_text()
    assert all((tmp_path / f".{k}.done").is_file() for k in ("idgen", "expgen", "idrank"))
    # finished runs are skipped
    (tmp_path / "idgen.ran").unlink()
    demo._train([("idgen", "x.yaml")], tmp_path)
    assert not (tmp_path / "idgen.ran").exists()
    # a failing run stops the demo, names itself and its log, is not marked done, and what
    # needs it does not start; an unrelated run still finishes
    with pytest.raises(SystemExit, match=r"training failed: bad \(exit 3, see .*bad\.log\)"):
        demo._train([("bad", "z.yaml"), ("later", "w.yaml", "bad"), ("other", "v.yaml")], tmp_path)
    assert not (tmp_path / ".bad.done").exists() and not (tmp_path / "later.ran").exists()
    assert (tmp_path / ".other.done").is_file()
    with pytest.raises(SystemExit, match=r"orphan \(needs nothing_here, which is neither done nor in this list\)"):
        demo._train([("orphan", "w.yaml", "nothing_here")], tmp_path)


def test_demo_refuses_a_cached_world_of_another_size(tmp_path):
    import json

    from ofer.demo import main

    world = tmp_path / "world"
    world.mkdir()
    (world / "world.json").write_text(json.dumps({"config": {"identities": 600, "test_identities": 16}}))
    with pytest.raises(SystemExit, match="holds a world of 600 identities and 16 test scenes, not 1500 and 24: add --fresh"):
        main(["--root", str(tmp_path)])
    assert (world / "world.json").is_file()  # nothing was deleted


def test_occlusion_auc_reads_only_the_rendered_vertices():
    from ofer.world.report import occlusion_auc

    rng = np.random.default_rng(4)
    in_render = rng.random(300) < 0.7
    hidden = in_render & (rng.random(300) < 0.3)
    visible = in_render & ~hidden
    spread = hidden * 2.0 + rng.random(300)  # every hidden vertex above every visible one
    spread[~in_render] = 100.0  # not shown by the render: not counted either way
    assert occlusion_auc(spread, in_render, visible) == 1.0
    assert occlusion_auc(-spread, in_render, visible) == 0.0
    assert np.isnan(occlusion_auc(spread, in_render, in_render))  # nothing hidden


def test_spread_measures_follow_the_data(world, tmp_path):
    gts = _gt(world)
    rng = np.random.default_rng(6)
    # no expression spread at all: every vertex ties, the AUCs sit at chance and nothing is shown
    for name, gt in gts.items():
        _write(tmp_path / "flat", name, np.zeros((N, N_SHAPE)), ranked=0)
        amp = 2.0 if str(gt["variant"]) == "mouth" else 0.5  # the face mask widens the expressions
        _write(tmp_path / "mask", name, np.zeros((N, N_SHAPE)), ranked=0, exp=amp * rng.standard_normal((M, N_EXP)))
    s = world_report(tmp_path / "flat", world)["summary"]
    assert s["spread_auc_images"] == 24 and s["spread_auc_occluded"] == 0.5
    assert s["spread_increase_auc_occluded"] == 0.5 and s["spread_auc_p"] == 1.0
    assert s["lips_spread_face_mask_increase_mm"] == 0.0 and s["face_mask_p"] == 1.0
    s = world_report(tmp_path / "mask", world)["summary"]
    assert s["face_mask_pairs"] == 12 and s["lips_spread_face_mask_increase_fraction"] == 1.0
    assert s["lips_spread_face_mask_mm"] > s["lips_spread_clean_mm"] and s["face_mask_p"] == pytest.approx(0.5 ** 12)
    assert set(s["spread_auc_occluded_by_variant"]) == {"mouth", "occluded"}
