"""Mesh and landmark writers: units, formats, atomic writes."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
import trimesh

from ofer.io import atomic_write_bytes, write_json, write_landmarks, write_mesh, write_npz


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


def test_mesh_files_state_their_unit_and_ascii_ply_matches_binary(tmp_path):
    v = np.array([[0.0, 0.0, 0.0], [0.01, 0.0, 0.0], [0.0, 0.02, 0.0]])
    f = np.array([[0, 1, 2]])
    a = write_mesh(tmp_path / "a.ply", v, f, binary=False)
    b = write_mesh(tmp_path / "b.ply", v, f)
    o = write_mesh(tmp_path / "c.obj", v, f, unit="m")
    assert b"comment units: millimetres" in a.read_bytes()[:200]
    assert b"comment units: millimetres" in b.read_bytes()[:200]
    assert o.read_text().startswith("# units: metres")
    ma, mb = trimesh.load(a, process=False), trimesh.load(b, process=False)
    np.testing.assert_allclose(ma.vertices, mb.vertices, rtol=1e-6)
    np.testing.assert_allclose(ma.vertices, v * 1000, rtol=1e-6)
    np.testing.assert_array_equal(ma.faces, f)


def test_point_cloud_and_source_unit(tmp_path):
    v = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # already mm
    p = write_mesh(tmp_path / "pc.ply", v, None, source_unit="mm", binary=False)
    text = p.read_text()
    assert "element face" not in text
    rows = np.loadtxt(text.split("end_header\n")[1].splitlines())
    np.testing.assert_allclose(rows, v)
    with pytest.raises(ValueError, match="out of range"):
        write_mesh(tmp_path / "bad.ply", v, np.array([[0, 1, 2]]))


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        p = atomic_write_bytes(tmp_path / "sub" / "x.bin", b"abc")
        ref = tmp_path / "ref.bin"
        with open(ref, "wb") as fh:  # what a plain open() gives under this umask
            fh.write(b"abc")
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == stat.S_IMODE(ref.stat().st_mode) == 0o666 & ~umask
    assert p.read_bytes() == b"abc"


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    p = atomic_write_bytes(tmp_path / "x.json", b"old")

    def broken(fh):
        fh.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write_bytes(p, broken)
    assert p.read_bytes() == b"old"
    assert [q.name for q in tmp_path.iterdir()] == ["x.json"]


def test_json_refuses_non_finite_numbers(tmp_path):
    assert json.loads(write_json(tmp_path / "a.json", {"x": 1.5}).read_text()) == {"x": 1.5}
    with pytest.raises(ValueError):
        write_json(tmp_path / "b.json", {"x": float("nan")})
    assert not list(tmp_path.glob("*b.json*"))


_KILLED_WRITER = """
import sys, time
from ofer.io import atomic_write_bytes

def fill(f):
    f.write(b"x" * 4096)
    f.flush()
    print("writing", flush=True)
    time.sleep(120)

atomic_write_bytes(sys.argv[1], fill)
"""


def test_temp_files_of_killed_writes_are_removed_and_nothing_else(tmp_path):
    import signal
    import subprocess
    import sys

    from ofer.io import remove_stale_temps

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "latest.pt").write_bytes(b"old")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(folder / "latest.pt")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    left = [p for p in folder.iterdir() if p.name != "latest.pt"]
    assert len(left) == 1 and left[0].name.startswith(".latest.pt.") and left[0].suffix == ".tmp"
    assert (folder / "latest.pt").read_bytes() == b"old"
    # look-alikes that are not the writer's temp files, a folder and a link with the temp name
    keep = [".latest.pt.tmp", "latest.pt.abcd1234.tmp", ".latest.pt.ABCD1234.tmp", ".latest.pt.abc.tmp",
            ".latest.pt.abcd1234.tmp.bak", "notes.txt"]
    for name in keep:
        (folder / name).write_text("keep me")
    (folder / ".dir.abcd1234.tmp").mkdir()
    target = tmp_path / "elsewhere.txt"
    target.write_text("not in the folder")
    (folder / ".link.abcd1234.tmp").symlink_to(target)
    sub = folder / "sub"
    sub.mkdir()
    (sub / ".x.npz.k2m9_0aa.tmp").write_bytes(b"half")
    everything = sorted(p.name for p in folder.rglob("*"))

    assert remove_stale_temps(folder, older_than=3600) == []  # the killed write is a minute old at most
    old = 10_000
    for p in [left[0], sub / ".x.npz.k2m9_0aa.tmp"] + [folder / n for n in keep]:
        os.utime(p, (p.stat().st_atime - old, p.stat().st_mtime - old))
    assert remove_stale_temps(folder, older_than=3600) == [left[0]]
    assert remove_stale_temps(folder, older_than=3600, recursive=True) == [sub / ".x.npz.k2m9_0aa.tmp"]
    assert sorted(p.name for p in folder.rglob("*")) == sorted(
        set(everything) - {left[0].name, ".x.npz.k2m9_0aa.tmp"})
    assert target.read_text() == "not in the folder"
    assert remove_stale_temps(tmp_path / "missing") == []


def test_temp_file_being_written_by_this_process_is_kept(tmp_path):
    from ofer.io import remove_stale_temps

    seen = {}

    def fill(f):
        f.write(b"payload")
        seen["removed"] = remove_stale_temps(tmp_path, older_than=0)
        seen["temps"] = [p.name for p in tmp_path.iterdir()]

    atomic_write_bytes(tmp_path / "a.ply", fill)
    assert seen["removed"] == [] and len(seen["temps"]) == 1 and seen["temps"][0].startswith(".a.ply.")
    assert (tmp_path / "a.ply").read_bytes() == b"payload"
    assert [p.name for p in tmp_path.iterdir()] == ["a.ply"]


def test_identity_coefficients_of_a_sample_file(tmp_path):
    from ofer.io import identity_coefficients

    H = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.savez(tmp_path / "s.npz", shape_coeffs=H, ranked_index=np.int64(2))
    with np.load(tmp_path / "s.npz") as z:
        assert np.array_equal(identity_coefficients(z), H[2])
    mean = H[[2, 0]].mean(0)  # a photo set's mean identity wins over the ranked hypothesis
    assert np.array_equal(identity_coefficients({"shape_coeffs": H, "ranked_index": 2, "identity_shape": mean}), mean)
    assert np.array_equal(identity_coefficients({"identity_shape": mean}), mean)
    assert np.array_equal(identity_coefficients({"shape_coeffs": H[1:2]}), H[1])
    for bad, match in (({"shape_coeffs": H}, "no 'ranked_index'"),
                       ({"shape_coeffs": H, "ranked_index": 4}, "outside the 4"),
                       ({"shape_coeffs": H * np.nan, "ranked_index": 0}, "finite"),
                       ({"exp_coeffs": H}, "no 'shape_coeffs' array")):
        with pytest.raises(ValueError, match=match):
            identity_coefficients(bad)
