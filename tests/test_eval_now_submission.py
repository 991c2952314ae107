"""NoW submission writer and checker, with a linear FLAME-API stand-in (and the real synthetic FLAME if present)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ofer.eval.geometry import read_mesh
from ofer.eval.now import NowError, evaluate_now, load_landmarks
from ofer.eval.now_submission import (check_submission, load_shape_coeffs, main, neutral_meshes_mm,
                                      write_now_prediction, write_submission)
from ofer.world.now_scans import head_landmarks, head_mesh, make_scan, write_now_dataset

IMAGES = ["S01/multiview_neutral/IMG_0001.jpg", "S01/selfie/IMG_0002.jpg", "S02/multiview_occlusions/IMG_0003.jpg"]


class LinearFlame(torch.nn.Module):
    """Implements the FLAME call API used by the writer: metres out, landmarks7 on the surface."""

    def __init__(self, n_shape: int = 300, n_exp: int = 100) -> None:
        super().__init__()
        V, F = head_mesh(16, 32)
        g = torch.Generator().manual_seed(0)
        self.n_shape = n_shape
        self.register_buffer("template", torch.tensor(V / 1000.0, dtype=torch.float32))
        self.register_buffer("basis", torch.randn(len(V), 3, n_shape, generator=g) * 1e-4)
        self.faces = torch.tensor(F, dtype=torch.long)
        lmk = head_landmarks(V, F)
        self.lmk_ids = torch.tensor(np.argmin(np.linalg.norm(V[None] - lmk[:, None], axis=2), axis=1))
        self.calls = []

    def forward(self, shape_coeffs, exp_coeffs=None, jaw_pose=None, **kw):
        self.calls.append({"exp": exp_coeffs, "jaw": jaw_pose, **kw})
        v = self.template[None] + torch.einsum("vcn,bn->bvc", self.basis, shape_coeffs)
        return SimpleNamespace(vertices=v, landmarks7=v[:, self.lmk_ids])


@pytest.fixture()
def samples(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "samples"
    coeffs = {}
    for k, line in enumerate(IMAGES[:2]):
        s, c, img = line.split("/")
        d = root / s / c / img[:-4]
        d.mkdir(parents=True)
        if k == 0:  # ranked identity only
            coeffs[line] = rng.normal(size=300).astype(np.float32)
            np.savez(d / "samples.npz", shape_coeffs=coeffs[line][None], exp_coeffs=rng.normal(size=(5, 100)))
        else:  # all identity samples + ranked index
            allc = rng.normal(size=(4, 300)).astype(np.float32)
            coeffs[line] = allc[2]
            np.savez(d / "samples.npz", shape_coeffs=allc, ranked_index=np.int64(2))
    lst = tmp_path / "images.txt"
    lst.write_text("\n".join(IMAGES) + "\n")
    return root, lst, coeffs


def test_neutral_meshes_zero_expression_and_mm():
    flame = LinearFlame()
    S = np.random.default_rng(1).normal(size=(3, 300)).astype(np.float32)
    V, L = neutral_meshes_mm(flame, S, batch_size=2)
    assert V.dtype == np.float32 and L.shape == (3, 7, 3)
    ref = (flame.template[None] + torch.einsum("vcn,bn->bvc", flame.basis, torch.from_numpy(S))).numpy() * 1000
    np.testing.assert_allclose(V, ref, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(L, V[:, flame.lmk_ids.numpy()], atol=1e-6)
    # only shape_coeffs is passed: expression, jaw and all other poses are zero
    assert flame.calls and all(v is None for c in flame.calls for v in c.values())
    # shorter coefficient vectors are zero-padded; longer ones are an error
    V100, _ = neutral_meshes_mm(flame, S[:, :100])
    S0 = S.copy()
    S0[:, 100:] = 0
    np.testing.assert_allclose(V100, neutral_meshes_mm(flame, S0)[0], atol=1e-4)
    with pytest.raises(NowError, match="n_shape=300"):
        neutral_meshes_mm(flame, np.zeros((1, 400)))


def test_write_submission_layout_and_checker(tmp_path, samples):
    root, lst, coeffs = samples
    flame = LinearFlame()
    out = tmp_path / "sub"
    res = write_submission(root, lst, out, flame)
    assert res == {"written": 2, "missing": [IMAGES[2]]}
    for line, c in coeffs.items():
        base = out / line[:-4]
        V, F = read_mesh(str(base) + ".obj")
        Vref, Lref = neutral_meshes_mm(flame, c[None])
        np.testing.assert_allclose(V, Vref[0], atol=1e-5)
        np.testing.assert_array_equal(F, flame.faces.numpy())
        L = np.load(str(base) + ".npy")
        assert L.dtype == np.float32 and L.shape == (7, 3)
        np.testing.assert_allclose(L, Lref[0], atol=1e-5)
        np.testing.assert_array_equal(load_landmarks(str(base) + ".npy"), L)
    problems = check_submission(out, lst)
    assert problems == [f"{IMAGES[2]}: missing mesh and landmarks"]
    np.save(out / "S01/selfie/IMG_0002.npy", np.zeros((6, 3), dtype=np.float32))
    assert any("found (6, 3)" in p for p in check_submission(out, lst))


def test_ply_format_and_cli_check(tmp_path, samples, capsys):
    root, lst, _ = samples
    out = tmp_path / "sub"
    write_submission(root, lst, out, LinearFlame(), fmt="ply")
    assert (out / "S01/multiview_neutral/IMG_0001.ply").is_file()
    assert main(["check", "--out", str(out), "--images", str(lst)]) == 1
    assert "1 of 3 images incomplete" in capsys.readouterr().out
    full = tmp_path / "two.txt"
    full.write_text("\n".join(IMAGES[:2]))
    assert main(["check", "--out", str(out), "--images", str(full)]) == 0
    assert "all 2 images" in capsys.readouterr().out


def test_sample_file_errors(tmp_path, samples):
    root, lst, _ = samples
    f = root / "S01/selfie/IMG_0002/samples.npz"
    np.savez(f, shape_coeffs=np.zeros((4, 300)))
    with pytest.raises(NowError, match="4 identity samples but no 'ranked_index'") as e:
        load_shape_coeffs(f)
    assert "\n" not in str(e.value)
    np.savez(f, betas=np.zeros(300))
    with pytest.raises(NowError, match="no 'shape_coeffs' array"):
        load_shape_coeffs(f)
    assert load_shape_coeffs(f, key="betas").shape == (300,)
    np.savez(f, identity_shape=np.full(300, 0.5))  # a photo set's mean identity alone
    assert np.all(load_shape_coeffs(f) == 0.5)
    with pytest.raises(NowError, match="none of the 3 images"):
        write_submission(tmp_path / "empty", lst, tmp_path / "o", LinearFlame())
    with pytest.raises(NowError, match="landmarks must have shape"):
        write_now_prediction(tmp_path, IMAGES[0], np.zeros((3, 3)), np.array([[0, 1, 2]]), np.zeros((5, 3)))


def test_submission_round_trip_through_evaluator(tmp_path, samples):
    """Scans made from the written identities: NoW error of the submission equals the scan noise."""
    root, lst, coeffs = samples
    flame = LinearFlame()
    out = tmp_path / "sub"
    write_submission(root, lst, out, flame)
    rng = np.random.default_rng(3)
    line = IMAGES[0]
    V, _ = neutral_meshes_mm(flame, coeffs[line][None])
    sv, slmk, _ = make_scan(V[0].astype(np.float64), flame.faces.numpy(), 6000, rng, 1.0,
                            np.array([0.1, 0.2, 0.0]), np.array([5.0, 0, 0]), noise=0.2)
    gt = tmp_path / "now"
    write_now_dataset(gt, {"S01": (sv, slmk)})
    one = tmp_path / "one.txt"
    one.write_text(line + "\n")
    s = evaluate_now(out, gt, images=one, quiet=True)
    assert s["overall"]["median"] == pytest.approx(0.6745 * 0.2, rel=0.15)


def test_submission_with_synthetic_flame(tmp_path, samples, synthetic_flame_paths):
    from ofer.flame import FLAME

    flame = FLAME(synthetic_flame_paths.model, synthetic_flame_paths.landmarks, n_shape=300, n_exp=100)
    root, lst, coeffs = samples
    res = write_submission(root, lst, tmp_path / "sub", flame)
    assert res["written"] == 2
    line = IMAGES[0]
    with torch.no_grad():
        ref = flame(shape_coeffs=torch.from_numpy(coeffs[line][None]))
    L = np.load(tmp_path / "sub" / (line[:-4] + ".npy"))
    np.testing.assert_allclose(L, ref.landmarks7[0].numpy() * 1000, rtol=1e-5, atol=1e-4)
    V, F = read_mesh(tmp_path / "sub" / (line[:-4] + ".obj"))
    np.testing.assert_allclose(V, ref.vertices[0].numpy() * 1000, atol=1e-5)
