"""The folder runner under faults: each ends in a clean record, a one-line error or a resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ofer.sample.runner as runner
from ofer.errors import ConfigError, OferError
from ofer.sample import run
from ofer.sample.runner import main

from test_pipeline import _cfg, setup  # noqa: F401 (fixture)


def _quiet(*a):
    pass


def _images(setup, tmp_path, names=("a", "b")):
    """A fresh input folder with some of the fixture's images and sidecars."""
    src = setup[1]
    dst = tmp_path / "in"
    for n in names:
        for suffix in (".png", ".kps.txt"):
            (dst / f"{n}{suffix}").parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / f"{n}{suffix}", dst / f"{n}{suffix}")
    return dst


def test_same_stem_gets_its_own_folder_and_noise(setup, tmp_path):
    root, images, ov = setup
    src = _images(setup, tmp_path, ["a"])
    Image.open(src / "a.png").convert("RGB").save(src / "a.jpg", quality=98)
    s = run(_cfg(ov, "preview=false"), src, tmp_path / "out", log=_quiet)
    assert s["ok"] == 2
    za = np.load(tmp_path / "out" / "a.png" / "samples.npz")
    zb = np.load(tmp_path / "out" / "a.jpg" / "samples.npz")
    assert int(za["image_index"]) != int(zb["image_index"])
    assert not np.allclose(za["shape_coeffs"], zb["shape_coeffs"])


def test_resuming_with_other_settings_is_refused_unless_overwrite(setup, tmp_path):
    root, images, ov = setup
    src = _images(setup, tmp_path)
    out = tmp_path / "out"
    run(_cfg(ov, "preview=false"), src, out, log=_quiet)
    before = np.load(out / "a" / "samples.npz")["shape_coeffs"]
    with pytest.raises(ConfigError, match=r"other settings \(n_identities, seed\).*overwrite=true"):
        run(_cfg(ov, "preview=false", "seed=5", "n_identities=4"), src, out, log=_quiet)
    np.testing.assert_array_equal(np.load(out / "a" / "samples.npz")["shape_coeffs"], before)
    s = run(_cfg(ov, "preview=false", "seed=5", "n_identities=4", "overwrite=true"), src, out, log=_quiet)
    assert s["ok"] == 2 and s["done_before"] == 0
    assert np.load(out / "a" / "samples.npz")["shape_coeffs"].shape[0] == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["seed"] == 5


def test_output_inside_the_input_is_not_read_back(setup, tmp_path):
    root, images, ov = setup
    src = _images(setup, tmp_path)
    out = src / "results"
    assert run(_cfg(ov), src, out, log=_quiet)["ok"] == 2
    s = run(_cfg(ov), src, out, log=_quiet)  # its preview.png files are not inputs
    assert s["images"] == 2 and s["done_before"] == 2 and s["failed"] == 0


def test_unsupported_files_are_reported_and_samplers_recorded(setup, tmp_path):
    root, images, ov = setup
    src = _images(setup, tmp_path, ["a"])
    (src / "phone.heic").write_bytes(b"\x00" * 64)
    (src / "notes.txt").write_text("not an image, not reported")
    s = run(_cfg(ov, "preview=false", "idgen_steps=3"), src, tmp_path / "out", log=_quiet)
    rec = {r["image"]: r for r in s["records"]}
    assert rec["phone.heic"]["status"] == "skipped" and "heic" in rec["phone.heic"]["reason"]
    assert "notes.txt" not in rec and s["skipped"] == 1 and s["ok"] == 1
    meta = json.loads((tmp_path / "out" / "a" / "result.json").read_text())
    assert meta["preset"] == "custom" and meta["samplers"]["idgen"] == ["dpmpp_2m", 3]


def test_a_model_error_fails_only_its_image(setup, tmp_path, monkeypatch):
    root, images, ov = setup
    src = _images(setup, tmp_path, ["a", "b", "sub/c"])
    bad = runner.image_seed_index("b")
    real = runner.Reconstructor.reconstruct

    def flaky(self, arc, farl, idx, timer=None):
        if bad in idx:
            raise RuntimeError("CUDA out of memory. Tried to allocate 82.00 GiB\nmore lines")
        return real(self, arc, farl, idx, timer)

    monkeypatch.setattr(runner.Reconstructor, "reconstruct", flaky)
    s = run(_cfg(ov, "batch_size=3", "preview=false"), src, tmp_path / "out", log=_quiet)
    rec = {r["image"]: r for r in s["records"]}
    assert s["ok"] == 2 and rec["b.png"]["status"] == "failed"
    assert rec["b.png"]["reason"] == "RuntimeError: CUDA out of memory. Tried to allocate 82.00 GiB"


def test_non_finite_results_are_failed_not_ok(setup, tmp_path, monkeypatch):
    root, images, ov = setup
    src = _images(setup, tmp_path)
    real = runner.Reconstructor.reconstruct

    def poisoned(self, *a, **k):
        res = real(self, *a, **k)
        v = res[0].identity_vertices.clone()
        v[0, 0] = float("nan")
        res[0].identity_vertices = v
        return res

    monkeypatch.setattr(runner.Reconstructor, "reconstruct", poisoned)
    s = run(_cfg(ov, "batch_size=2", "preview=false"), src, tmp_path / "out", log=_quiet)
    assert s["ok"] == 1 and s["failed"] == 1, s["records"]
    failed = next(r for r in s["records"] if r["status"] == "failed")
    assert "NaN" in failed["reason"] and not (tmp_path / "out" / Path(failed["image"]).stem / "result.json").exists()


def test_interrupt_and_write_errors_still_leave_a_summary(setup, tmp_path, monkeypatch):
    root, images, ov = setup
    src = _images(setup, tmp_path, ["a", "b", "sub/c"])
    real_write = runner.write_image_outputs

    def disk_full_for_b(out_dir, *a, **k):
        if out_dir.name == "b":
            raise OSError(28, "No space left on device")
        return real_write(out_dir, *a, **k)

    monkeypatch.setattr(runner, "write_image_outputs", disk_full_for_b)
    s = run(_cfg(ov, "batch_size=1", "preview=false"), src, tmp_path / "out", log=_quiet)
    rec = {r["image"]: r for r in s["records"]}
    assert rec["b.png"] == {"image": "b.png", "status": "failed",
                            "reason": "cannot write its outputs: No space left on device"}
    assert s["ok"] == 2

    real_prepare = runner.prepare
    calls = {"n": 0}

    def interrupt_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_prepare(*a, **k)

    monkeypatch.setattr(runner, "prepare", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(ov, "batch_size=1", "preview=false"), src, tmp_path / "out2", log=_quiet)
    summary = json.loads((tmp_path / "out2" / "summary.json").read_text())
    assert summary["interrupted"] and summary["ok"] == 1


def test_unusable_output_folders_are_one_line_errors(setup, tmp_path):
    root, images, ov = setup
    src = _images(setup, tmp_path, ["a"])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OferError, match="cannot create the output folder"):
        run(_cfg(ov), src, tmp_path / "afile" / "out", log=_quiet)


def test_exit_status(setup, tmp_path, capsys):
    root, images, ov = setup
    src = _images(setup, tmp_path, ["a"])
    args = ["--input", str(src), "--output", str(tmp_path / "o"), "--config", str(runner_config()), *ov,
            "preview=false"]
    assert main(args) == 0
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(src / "noface.png")  # no sidecar: fails
    assert main(args) == 1
    assert main(args + ["seed=9"]) == 2  # other settings: refused
    assert capsys.readouterr().err.count("error: ") == 1


def runner_config() -> Path:
    return Path(__file__).resolve().parents[1] / "configs" / "sample.yaml"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None,
                    reason="needs root to mount a tmpfs")
def test_a_full_disk_fails_images_and_keeps_the_run(setup, tmp_path):
    root, images, ov = setup
    src = _images(setup, tmp_path, ["a", "b"])
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        s = run(_cfg(ov), src, disk / "out", log=_quiet)
        assert s["ok"] + s["failed"] == 2 and s["failed"] >= 1
        assert all("No space left" in r["reason"] for r in s["records"] if r["status"] == "failed")
        assert not list((disk / "out").rglob("*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.parametrize("kind", ["swapped", "xy", "nan", "outside", "collinear"])
def test_implausible_sidecars_fail_their_image(setup, tmp_path, kind):
    root, images, ov = setup
    src = _images(setup, tmp_path, ["a"])
    kps = np.loadtxt(src / "a.kps.txt")
    bad = {"swapped": kps[[1, 0, 2, 4, 3]], "xy": kps[:, ::-1], "outside": kps + 500,
           "collinear": np.c_[np.linspace(30, 90, 5), np.full(5, 60.0)], "nan": np.where(np.eye(5, 2) > 0, np.nan, kps)}
    np.savetxt(src / "a.kps.txt", bad[kind])
    s = run(_cfg(ov, "preview=false"), src, tmp_path / "out", log=_quiet)
    reason = {"swapped": "do not fit a face", "xy": "do not fit a face", "collinear": "do not fit a face",
              "outside": "outside the", "nan": "NaN or infinite"}[kind]
    assert s["failed"] == 1 and reason in s["records"][0]["reason"], s["records"]
    if kind in ("swapped", "xy"):  # the key relaxes the template check
        s = run(_cfg(ov, "preview=false", "max_kps_residual=null"), src, tmp_path / "out2", log=_quiet)
        assert s["ok"] == 1


def test_odd_files_are_read_named_or_noted(setup, tmp_path):
    root, images, ov = setup
    src = _images(setup, tmp_path, ["a"])
    img = Image.open(src / "a.png").convert("RGB")
    img.save(src / "p.ppm")
    shutil.copy(src / "a.kps.txt", src / "p.kps.txt")
    img.save(src / "j.jpg", quality=95)
    (src / "j.jpg").write_bytes((src / "j.jpg").read_bytes() + os.urandom(200))  # trailing garbage
    shutil.copy(src / "a.kps.txt", src / "j.kps.txt")
    latin = os.fsdecode(b"caf\xe9")  # a file name that is not UTF-8
    shutil.copy(src / "a.png", src / f"{latin}.png")
    shutil.copy(src / "a.kps.txt", src / f"{latin}.kps.txt")
    s = run(_cfg(ov, "preview=false"), src, tmp_path / "out", log=_quiet)
    assert s["ok"] == 4 and s["failed"] == 0, s["records"]
    notes = json.loads((tmp_path / "out" / "j" / "result.json").read_text())["notes"]
    assert any("200 bytes after the end of the JPEG data" in n for n in notes)
    assert (tmp_path / "out" / latin / "result.json").is_file()
    assert "caf" in (tmp_path / "out" / "summary.csv").read_text(encoding="utf-8")


def test_temp_files_of_a_killed_run_are_cleared_on_resume(setup, tmp_path):
    root, images, ov = setup
    src = _images(setup, tmp_path, ["a"])
    out = tmp_path / "out"
    run(_cfg(ov, "preview=false"), src, out, log=_quiet)
    stale = out / "a" / ".identity.ply.k3j9x0q1.tmp"
    stale.write_bytes(b"half a mesh")
    os.utime(stale, (1_000_000_000, 1_000_000_000))
    keep = out / "a" / "notes.tmp"  # not a temp name of ours
    keep.write_text("x")
    run(_cfg(ov, "preview=false"), src, out, log=_quiet)
    assert not stale.exists() and keep.exists()


def _png_header(w: int, h: int) -> bytes:
    """A PNG that declares ``w`` x ``h`` pixels and holds no image data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_the_pixel_limit_is_ours_not_pillows(tmp_path):
    from ofer.data.images import MAX_PIXELS, read_image
    from ofer.errors import ImageError

    (tmp_path / "big.png").write_bytes(_png_header(12000, 9000))  # 108 MP: over Pillow's 89.5, under 250
    with pytest.raises(ImageError, match="truncated or corrupt"):  # refused for its data, not its size
        read_image(tmp_path / "big.png")
    (tmp_path / "huge.png").write_bytes(_png_header(20000, 20000))
    with pytest.raises(ImageError, match="too large"):
        read_image(tmp_path / "huge.png")
    assert 20000 * 20000 > MAX_PIXELS > 12000 * 9000


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads unreadable files")
def test_unreadable_files_and_folders_are_named(setup, tmp_path):
    root, images, ov = setup
    src = _images(setup, tmp_path, ["a", "b"])
    (src / "locked").mkdir()
    shutil.copy(src / "a.png", src / "locked" / "x.png")
    os.chmod(src / "locked", 0)
    os.chmod(src / "b.png", 0)
    try:
        s = run(_cfg(ov, "preview=false"), src, tmp_path / "out", log=_quiet)
    finally:
        os.chmod(src / "locked", 0o755)
        os.chmod(src / "b.png", 0o644)
    rec = {r["image"]: r for r in s["records"]}
    assert rec["locked/"]["status"] == "skipped" and "cannot read folder" in rec["locked/"]["reason"]
    assert rec["b.png"]["status"] == "failed" and "cannot read the file" in rec["b.png"]["reason"]
