"""Mesh and landmark writers: units, formats, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from ofer.io import write_landmarks, write_mesh, write_npz


@pytest.mark.parametrize("suffix", [".ply", ".obj"])
@pytest.mark.parametrize("unit,scale", [("mm", 1000.0), ("m", 1.0)])
def test_mesh_round_trip_in_stated_unit(tmp_path, suffix, unit, scale):
    v = torch.tensor([[0.0, 0.0, 0.0], [0.01, 0.0, 0.0], [0.0, 0.02, 0.0], [0.0, 0.0, 0.03]])
    f = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    path = write_mesh(tmp_path / f"m{suffix}", v, f, unit=unit)
    mesh = trimesh.load(path, process=False)
    np.testing.assert_allclose(mesh.vertices, v.numpy() * scale, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(mesh.faces, f)
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


def test_mesh_writer_errors(tmp_path):
    with pytest.raises(ValueError, match="must end in .ply or .obj"):
        write_mesh(tmp_path / "m.stl", np.zeros((3, 3)), np.array([[0, 1, 2]]))
    with pytest.raises(ValueError, match="unit must be one of"):
        write_mesh(tmp_path / "m.ply", np.zeros((3, 3)), np.array([[0, 1, 2]]), unit="cm")


def test_landmarks_npy_and_txt(tmp_path):
    lm = np.arange(21, dtype=np.float64).reshape(7, 3) / 1000.0
    a = np.load(write_landmarks(tmp_path / "l.npy", lm))
    assert a.dtype == np.float32 and a.shape == (7, 3)
    np.testing.assert_allclose(a, lm * 1000, rtol=1e-6)
    b = np.loadtxt(write_landmarks(tmp_path / "l.txt", lm))
    np.testing.assert_allclose(b, lm * 1000, atol=1e-6)


def test_npz_has_no_pickles(tmp_path):
    path = write_npz(tmp_path / "x.npz", a=torch.ones(2), b=np.zeros(3))
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == {"a", "b"}
