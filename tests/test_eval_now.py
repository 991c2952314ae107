"""NoW evaluator: synthetic scans under known transforms, invariances, file layer and error messages."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ofer.errors import OferError
from ofer.eval.geometry import rodrigues
from ofer.io import write_mesh
from ofer.eval.now import (NowError, compute_crop, crop_scan, cumulative_error_curve, evaluate_now, evaluate_scan,
                           load_landmarks, load_pp, main, pooled_stats, unit_warnings)
from ofer.world.now_scans import head_landmarks, head_mesh, make_scan, write_now_dataset, write_pp

NOISE = 0.25  # mm


@pytest.fixture(scope="module")
def head():
    V, F = head_mesh(24, 48)
    return V, F, head_landmarks(V, F)


@pytest.fixture(scope="module")
def scan(head):
    V, F, _ = head
    rng = np.random.default_rng(0)
    rv, s0, t0 = np.array([0.1, -0.2, 0.05]), 1.08, np.array([10.0, -5.0, 3.0])
    v, lmk, T = make_scan(V, F, 12000, rng, s0, rv, t0, noise=NOISE)
    return v, lmk, T


# ---------------------------------------------------------------- landmarks / crop


def test_pp_round_trip_and_errors(tmp_path):
    L = np.arange(21, dtype=np.float64).reshape(7, 3) * 1.5
    write_pp(tmp_path / "a.pp", L)
    got = load_pp(tmp_path / "a.pp")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, L.astype(np.float32))
    write_pp(tmp_path / "b.pp", L[:6])
    with pytest.raises(NowError, match="expected 7 picked points.*found 6") as e:
        load_pp(tmp_path / "b.pp")
    assert "\n" not in str(e.value)
    with pytest.raises(NowError, match="not found"):
        load_pp(tmp_path / "c.pp")


def test_landmark_files(tmp_path):
    L = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", L[None])
    np.testing.assert_array_equal(load_landmarks(tmp_path / "a.npy"), L)
    (tmp_path / "a.txt").write_text("\n".join(" ".join(f"{x:.8f}" for x in r) for r in L) + "\n")
    np.testing.assert_allclose(load_landmarks(tmp_path / "a.txt"), L, atol=1e-7)
    np.save(tmp_path / "b.npy", L[:5])
    with pytest.raises(NowError, match=r"expected 7 landmarks.*\(5, 3\)") as e:
        load_landmarks(tmp_path / "b.npy")
    assert "b.npy" in str(e.value) and "\n" not in str(e.value)
    bad = L.copy()
    bad[2, 1] = np.nan
    np.save(tmp_path / "c.npy", bad)
    with pytest.raises(NowError, match="NaN"):
        load_landmarks(tmp_path / "c.npy")
    with pytest.raises(NowError, match="not found"):
        load_landmarks(tmp_path / "d.npy")


def test_crop_formula_by_hand():
    L = np.zeros((7, 3), dtype=np.float32)
    L[0], L[3] = [-45, 30, 0], [45, 30, 0]  # outer eye distance 90
    L[1], L[2] = [-15, 30, 0], [15, 30, 0]  # bridge (0, 30, 0)
    L[4] = [0, -10, 0]  # nose length 40
    centre, radius = compute_crop(L)
    np.testing.assert_allclose(centre, [0, -10 + 0.3 * 40, 0], atol=1e-6)
    assert radius == pytest.approx(1.4 * (90 + 40) / 2)
    pts = np.array([[0, 2, 0], [0, 2 + 90.99, 0], [0, 2 + 91.01, 0]])
    np.testing.assert_array_equal(crop_scan(pts, L), [0, 1])


def test_crop_boundary_is_resolved_in_float64():
    # float32 .pp landmarks at scan-like coordinates (mm); float32 arithmetic would place the
    # sphere with ~1e-5 mm error, far more than the 1e-6 mm margins below
    L = np.array([[-47.31, 31.87, 1003.29], [-16.42, 29.53, 1011.77], [15.96, 30.11, 1012.08],
                  [46.83, 32.44, 1004.15], [0.37, -11.62, 1030.91], [-24.18, -41.07, 1012.66],
                  [23.55, -40.79, 1013.02]], dtype=np.float32)
    Ld = L.astype(np.float64)
    bridge = (Ld[1] + Ld[2]) / 2
    centre = Ld[4] + 0.3 * (bridge - Ld[4])
    radius = 1.4 * (np.sqrt(np.sum((Ld[0] - Ld[3]) ** 2)) + np.sqrt(np.sum((bridge - Ld[4]) ** 2))) / 2
    got_centre, got_radius = compute_crop(L)
    np.testing.assert_allclose(got_centre, centre, rtol=0, atol=1e-12)
    assert got_radius == pytest.approx(radius, rel=1e-14)
    dirs = np.concatenate([np.eye(3), -np.eye(3)])
    inside = centre + (radius - 1e-6) * dirs
    outside = centre + (radius + 1e-6) * dirs
    ids = crop_scan(np.concatenate([inside, outside]), L)
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, np.arange(6))  # every point 1e-6 mm outside is dropped


# ---------------------------------------------------------------- synthetic recovery


def test_recovers_transform_and_noise_level(head, scan):
    V, F, lmk = head
    sv, slmk, T = scan
    rng = np.random.default_rng(1)
    pred_lmk = (lmk + rng.normal(0, 2.0, lmk.shape)).astype(np.float32) / 1000.0  # noisy landmarks, metres
    ev = evaluate_scan(sv, slmk, V / 1000.0, F, pred_lmk)
    truth = V @ T[:3, :3].T + T[:3, 3]
    # refinement fixes the 2 mm landmark noise: aligned mesh within a few hundredths of a mm of the truth
    assert np.max(np.linalg.norm(ev.aligned_vertices - truth, axis=1)[np.linalg.norm(truth - slmk[4], axis=1) < 80]) < 0.1
    # errors are the noise: |N(0, s^2)| has median 0.674 s and mean 0.798 s (plus small tessellation error)
    assert np.median(ev.distances) == pytest.approx(0.6745 * NOISE, rel=0.08)
    assert np.mean(ev.distances) == pytest.approx(np.sqrt(2 / np.pi) * NOISE, rel=0.08)
    assert ev.distances.shape == (len(crop_scan(sv, slmk)),)
    assert ev.refine.iterations >= 1 and not ev.warnings


def test_error_invariant_to_similarity_of_prediction(head, scan):
    V, F, lmk = head
    sv, slmk, _ = scan
    rng = np.random.default_rng(2)
    pl = lmk + rng.normal(0, 1.0, lmk.shape)  # float64 landmarks -> float64 Procrustes
    base = evaluate_scan(sv, slmk, V, F, pl)
    R = rodrigues(np.array([0.7, -1.1, 2.0]))
    for s, t in [(0.001, np.zeros(3)), (3.7, np.array([100.0, -40, 7])), (1.0, np.array([0.0, 0, -500]))]:
        ev = evaluate_scan(sv, slmk, s * V @ R.T + t, F, s * pl @ R.T + t)
        np.testing.assert_allclose(ev.distances, base.distances, atol=1e-5)
    # float32 landmarks (NoW's usual case): same error to float32 precision of the Procrustes
    ev32 = evaluate_scan(sv, slmk, V @ R.T, F, (pl @ R.T).astype(np.float32))
    assert abs(np.median(ev32.distances) - np.median(base.distances)) < 1e-3


def test_metrical_fixes_scale(head, scan):
    V, F, lmk = head
    sv, slmk, T = scan
    # scan was made with scale 1.08: non-metrical absorbs it, metrical cannot
    non = evaluate_scan(sv, slmk, V, F, lmk.astype(np.float32))
    met_mm = evaluate_scan(sv, slmk, V, F, lmk.astype(np.float32), metrical=True, unit="mm")
    met_m = evaluate_scan(sv, slmk, V / 1000, F, (lmk / 1000).astype(np.float32), metrical=True, unit="m")
    assert met_mm.refine.s == 1.0
    assert np.median(met_mm.distances) > 5 * np.median(non.distances)
    np.testing.assert_allclose(np.median(met_m.distances), np.median(met_mm.distances), rtol=1e-3)
    # metrical with the correct physical size: as good as non-metrical
    Vs = 1.08 * V
    met_ok = evaluate_scan(sv, slmk, Vs, F, (1.08 * lmk).astype(np.float32), metrical=True, unit="mm")
    assert np.median(met_ok.distances) == pytest.approx(np.median(non.distances), rel=0.05)


def test_swapped_landmarks_warn(head, scan):
    V, F, lmk = head
    sv, slmk, _ = scan
    mirrored = lmk[[3, 2, 1, 0, 4, 6, 5]].astype(np.float32)  # left/right swapped
    ev = evaluate_scan(sv, slmk, V, F, mirrored, name="p.npy")
    assert ev.procrustes.is_reflection
    assert len(ev.warnings) == 1 and "reflection" in ev.warnings[0] and "swapped" in ev.warnings[0]
    eyes_mouth = lmk[[5, 1, 2, 6, 4, 0, 3]].astype(np.float32)  # outer eye corners <-> mouth corners
    ev2 = evaluate_scan(sv, slmk, V, F, eyes_mouth, name="q.npy")
    assert any("poorly" in w or "reflection" in w for w in ev2.warnings)


def test_pooled_stats_and_curve():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([10.0])
    st = pooled_stats([a, b])
    assert st == {"median": 2.5, "mean": 4.0, "std": pytest.approx(np.std([1, 2, 3, 10])), "n_images": 2,
                  "n_points": 4}
    x, y = cumulative_error_curve(np.array([0.0, 1.0, 1.0, 4.0]), bins=4)
    np.testing.assert_allclose(x, [0, 1, 2, 3])
    np.testing.assert_allclose(y, [25, 75, 75, 100])


# ---------------------------------------------------------------- dataset layer


def _dataset(tmp_path, head, n_img=2, fmt="obj"):
    """Two subjects; predictions for several challenges; one image left without a prediction."""
    V, F, lmk = head
    rng = np.random.default_rng(10)
    gt = tmp_path / "now"
    pred = tmp_path / "pred"
    subjects = {}
    lines = []
    for k, subj in enumerate(["S01", "S02"]):
        sv, slmk, _ = make_scan(V, F, 4000, rng, 1.0 + 0.05 * k, np.array([0.05 * k, 0.1, 0]), np.array([k, 2, 0.0]),
                                noise=0.2)
        subjects[subj] = (sv, slmk)
        for ch in ("multiview_neutral", "multiview_expressions", "multiview_occlusions", "selfie")[: 2 + 2 * k]:
            for i in range(n_img):
                lines.append(f"{subj}/{ch}/IMG_{i:04d}.jpg")
    write_now_dataset(gt, subjects)
    (gt / "imagepathsvalidation.txt").write_text("\n".join(lines) + "\n")
    for ln in lines[:-1]:  # last image missing
        subj, ch, img = ln.split("/")
        d = pred / subj / ch
        d.mkdir(parents=True, exist_ok=True)
        noise = rng.normal(0, 0.3, V.shape)
        write_mesh(d / (img[:-4] + "." + fmt), (V + noise) / 1000, F, unit="m")
        np.save(d / (img[:-4] + ".npy"), (lmk / 1000).astype(np.float32))
    return gt, pred, lines


def test_evaluate_now_end_to_end(tmp_path, head):
    gt, pred, lines = _dataset(tmp_path, head)
    s = evaluate_now(pred, gt, quiet=True)
    assert s["num_images"] == len(lines) and s["num_evaluated"] == len(lines) - 1 and s["num_missing_files"] == 1
    assert lines[-1] in s["missing"][0]
    # pooled statistics equal those recomputed from the per-image distances written to disk
    out = pred / "results"
    z = np.load(out / "distances.npz")
    arrays = [z["distances"][a:b] for a, b in zip(z["offsets"][:-1], z["offsets"][1:])]
    assert s["overall"] == pooled_stats(arrays)
    for ch, st in s["per_challenge"].items():
        sel = [a for a, c in zip(arrays, z["challenges"]) if c == ch]
        assert st == pooled_stats(sel)
    # image order and per-image values match a direct call of the core function
    V, F, lmk = head
    from ofer.eval.geometry import read_mesh
    sv, _ = read_mesh(gt / "scans" / "S01" / "scan.obj")
    slmk = load_pp(gt / "scans_lmks_onlypp" / "S01" / "scan_picked_points.pp")
    pv, pf = read_mesh(pred / lines[0].replace(".jpg", ".obj"))
    ev = evaluate_scan(sv, slmk, pv, pf, load_landmarks(pred / lines[0].replace(".jpg", ".npy")))
    np.testing.assert_allclose(arrays[0], ev.distances)
    # original-format outputs
    legacy = np.load(out / "RECON_computed_distances.npy", allow_pickle=True).item()
    assert legacy["num_missing_files"] == 1 and len(legacy["computed_distances"]) == len(lines) - 1
    med, mean = (float(x) for x in (out / "RECON_computed_distances.npy.meanmedian").read_text().split())
    assert med == pytest.approx(s["overall"]["median"]) and mean == pytest.approx(s["overall"]["mean"])
    curve = np.load(out / "cumulative_error.npz")
    assert curve["all_y"][-1] == pytest.approx(100.0) and np.all(np.diff(curve["all_y"]) >= 0)
    from PIL import Image
    with Image.open(out / "cumulative_error.png") as im:
        assert im.size == (640, 480)
    js = json.loads((out / "summary.json").read_text())
    assert js["overall"]["median"] == pytest.approx(s["overall"]["median"])
    assert 0.1 < s["overall"]["median"] < 0.4


def test_evaluate_now_single_challenge_and_ply(tmp_path, head):
    gt, pred, lines = _dataset(tmp_path, head, n_img=1, fmt="ply")
    s = evaluate_now(pred, gt, challenge="occlusion", out_dir=tmp_path / "o", quiet=True)
    assert s["num_images"] == 1 and s["num_evaluated"] == 1
    assert list(s["per_challenge"]) == ["multiview_occlusions"]
    with pytest.raises(NowError, match="none of the 1 images"):  # the only selfie is the missing image
        evaluate_now(pred, gt, challenge="selfie", out_dir=tmp_path / "o", quiet=True)
    s2 = evaluate_now(pred, gt, challenge="expression", out_dir=tmp_path / "o", quiet=True)
    assert s2["num_evaluated"] == 2 and s2["challenge"] == "multiview_expressions"
    assert (tmp_path / "o" / "RECON_computed_distances_multiview_expressions.npy").is_file()


def test_mismatched_file_lists(tmp_path, head, capsys):
    gt, pred, lines = _dataset(tmp_path, head, n_img=1)
    # image list that names images no prediction exists for
    other = tmp_path / "other.txt"
    other.write_text("X/multiview_neutral/IMG_9.jpg\n")
    with pytest.raises(NowError, match="none of the 1 images listed") as e:
        evaluate_now(pred, gt, images=other, quiet=True)
    assert "\n" not in str(e.value)
    # a prediction exists but the subject has no scan
    (pred / "X" / "multiview_neutral").mkdir(parents=True)
    write_mesh(pred / "X/multiview_neutral/IMG_9.obj", head[0], head[1], source_unit="mm")
    np.save(pred / "X/multiview_neutral/IMG_9.npy", head[2].astype(np.float32))
    with pytest.raises(NowError, match="no ground-truth scan for subject 'X'"):
        evaluate_now(pred, gt, images=other, quiet=True)
    # malformed list line / unknown challenge
    bad = tmp_path / "bad.txt"
    bad.write_text("IMG_1.jpg\n")
    with pytest.raises(NowError, match="expected '<subject>/<challenge>/<image>'"):
        evaluate_now(pred, gt, images=bad, quiet=True)
    bad.write_text("S01/smiling/IMG_1.jpg\n")
    with pytest.raises(NowError, match="unknown challenge folder 'smiling'"):
        evaluate_now(pred, gt, images=bad, quiet=True)
    # strict: the missing image is an error; extra predictions are reported
    with pytest.raises(NowError, match="1 of .* images have no prediction"):
        evaluate_now(pred, gt, strict=True, quiet=True)
    s = evaluate_now(pred, gt)
    assert any("not in the image list" in w for w in s["warnings"])
    assert "not in the image list" in capsys.readouterr().err


def test_bad_prediction_files_give_one_line_errors(tmp_path, head):
    gt, pred, lines = _dataset(tmp_path, head, n_img=1)
    first = pred / lines[0].replace(".jpg", ".obj")
    first.write_text("# empty\n")
    with pytest.raises(OferError, match="no vertices") as e:
        evaluate_now(pred, gt, quiet=True)
    assert str(first) in str(e.value)
    write_mesh(first, head[0], head[1], source_unit="mm")
    np.save(pred / lines[0].replace(".jpg", ".npy"), head[2][:6])
    with pytest.raises(NowError, match="expected 7 landmarks"):
        evaluate_now(pred, gt, quiet=True)


def test_cli(tmp_path, head, capsys):
    gt, pred, lines = _dataset(tmp_path, head, n_img=1)
    assert main(["--pred", str(pred), "--gt", str(gt), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "multiview_neutral" in out and "all" in out and "1 missing" in out
    assert main(["--pred", str(tmp_path / "none"), "--gt", str(gt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: prediction folder not found")
    assert main(["--pred", str(pred), "--gt", str(gt), "--challenge", "smile"]) == 2
    assert "unknown challenge" in capsys.readouterr().err


# ---------------------------------------------------------------- faults and unit mix-ups


def test_out_under_a_file_is_a_one_line_error(tmp_path, head, capsys):
    gt, pred, lines = _dataset(tmp_path, head, n_img=1)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder\n")
    for out in (blocker, blocker / "results", blocker / "a" / "b"):
        with pytest.raises(NowError, match="file") as e:
            evaluate_now(pred, gt, out_dir=out, quiet=True)
        assert "\n" not in str(e.value)
        assert main(["--pred", str(pred), "--gt", str(gt), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and str(blocker) in err[0]
    with pytest.raises(NowError, match="--check-alignment"):
        evaluate_now(pred, gt, out_dir=tmp_path / "ok", check_alignment_dir=blocker / "x", quiet=True)


def test_image_list_with_a_byte_order_mark(tmp_path, head):
    gt, pred, lines = _dataset(tmp_path, head, n_img=1)
    listing = gt / "imagepathsvalidation.txt"
    plain = evaluate_now(pred, gt, out_dir=tmp_path / "a", quiet=True)
    listing.write_bytes(b"\xef\xbb\xbf" + listing.read_bytes())
    bom = evaluate_now(pred, gt, out_dir=tmp_path / "b", quiet=True)
    assert bom["num_missing_files"] == plain["num_missing_files"] == 1
    assert bom["missing"] == plain["missing"] and bom["overall"] == plain["overall"]
    listing.write_bytes("S01/multiview_neutral/IMG_\xe9.jpg\n".encode("latin-1"))
    with pytest.raises(NowError, match="not UTF-8"):
        evaluate_now(pred, gt, out_dir=tmp_path / "c", quiet=True)


def _rewrite_landmarks(pred, lines, scale):
    for ln in lines[:-1]:
        p = pred / ln.replace(".jpg", ".npy")
        np.save(p, np.load(p) * np.float32(scale))


def test_landmarks_in_mm_beside_a_mesh_in_metres_warn(tmp_path, head, capsys):
    gt, pred, lines = _dataset(tmp_path, head, n_img=1)
    good = evaluate_now(pred, gt, out_dir=tmp_path / "a", quiet=True)
    assert not any("units" in w for w in good["warnings"])
    _rewrite_landmarks(pred, lines, 1000.0)  # landmarks now in mm, meshes still in metres
    mixed = evaluate_now(pred, gt, out_dir=tmp_path / "b")
    unit_lines = [w for w in mixed["warnings"] if "different units" in w]
    assert len(unit_lines) == mixed["num_evaluated"]
    assert all("about 1000: landmarks in mm" in w for w in unit_lines)
    assert "different units" in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["warnings"] == mixed["warnings"]
    V, _, lmk = head
    assert unit_warnings(V / 1000, lmk) and not unit_warnings(V, lmk) and unit_warnings(V, lmk / 1000)


def test_metrical_unit_that_does_not_fit_the_mesh_warns(tmp_path, head):
    gt, pred, lines = _dataset(tmp_path, head, n_img=1)  # meshes and landmarks in metres
    right = evaluate_now(pred, gt, metrical=True, unit="m", out_dir=tmp_path / "a", quiet=True)
    assert not any("--unit" in w for w in right["warnings"])
    wrong = evaluate_now(pred, gt, metrical=True, unit="mm", out_dir=tmp_path / "b", quiet=True)
    hits = [w for w in wrong["warnings"] if "--unit mm" in w]
    assert len(hits) == wrong["num_evaluated"] and "not a head's" in hits[0]
    assert wrong["overall"]["median"] > 10 * right["overall"]["median"]  # the reason for the warning
    # non-metrical: the unit is not used, no such warning
    assert not any("--unit" in w for w in evaluate_now(pred, gt, unit="mm", out_dir=tmp_path / "c",
                                                        quiet=True)["warnings"])


def test_identical_landmarks_are_an_error_not_a_reflection(head, scan):
    V, F, lmk = head
    sv, slmk, _ = scan
    for same in (np.repeat(lmk[4:5], 7, axis=0).astype(np.float32), np.zeros((7, 3), np.float32)):
        with pytest.raises(NowError, match="same point") as e:
            evaluate_scan(sv, slmk, V, F, same, name="same.npy")
        assert "reflection" not in str(e.value) and "same.npy" in str(e.value)
