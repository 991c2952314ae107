"""The preprocessing CLI: layout, resume, failure list, detector-missing message."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ofer.data.align import ARCFACE_TEMPLATE, transform_points
from ofer.data.images import prepare_face, write_face_crops
from ofer.preprocess import main, preprocess_folder


def _face(tmp, rel, scale=2.0, sidecar=True):
    m = np.array([[scale, 0.0, 60.0], [0.0, scale, 30.0]])
    img = np.full((300, 360, 3), 90, np.uint8)
    kps = np.round(transform_points(m, ARCFACE_TEMPLATE), 2)
    for x, y in kps:
        img[int(y) - 3:int(y) + 4, int(x) - 3:int(x) + 4] = (255, 40, 40)
    p = tmp / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(p)
    if sidecar:
        p.with_suffix(".kps.txt").write_text("".join(f"{x} {y}\n" for x, y in kps))
    return p, kps


@pytest.fixture
def tree(tmp_path, monkeypatch):
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path / "no_insightface_home"))
    src = tmp_path / "in"
    _face(src, "actor1/a.png")
    _face(src, "actor1/b.jpg")
    _face(src, "actor2/c.png", scale=1.5)
    _face(src, "actor2/needs_detector.png", sidecar=False)
    (src / "actor2").joinpath("fake.jpg").write_text("not an image")
    t = src / "actor2" / "cut.jpg"
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(t)
    t.write_bytes(t.read_bytes()[:200])
    _face(src, "actor1/a.jpg")  # same stem as a.png -> collision
    return src, tmp_path / "out"


def test_cli_layout_failures_and_resume(tree, capsys):
    src, out = tree
    assert main(["--input", str(src), "--output", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "3 written, 0 already done, 4 failed" in text
    for rel in ["actor1/a", "actor1/b", "actor2/c"]:
        arr = np.load(out / f"{rel}.npy")
        assert arr.shape == (3, 112, 112) and arr.dtype == np.float32
        assert Image.open(out / f"{rel}.jpg").size == (224, 224)
    # the .npy equals the library result (BGR by default)
    ref = prepare_face(src / "actor1" / "b.jpg")
    np.testing.assert_array_equal(np.load(out / "actor1/b.npy"), ref.arcface)
    fails = dict(line.split("\t") for line in (out / "failures.txt").read_text().splitlines())
    assert set(fails) == {"actor1/a.png", "actor2/fake.jpg", "actor2/cut.jpg", "actor2/needs_detector.png"} or \
        set(fails) == {"actor1/a.jpg", "actor2/fake.jpg", "actor2/cut.jpg", "actor2/needs_detector.png"}
    assert "not an image file" in fails["actor2/fake.jpg"]
    assert "truncated or corrupt" in fails["actor2/cut.jpg"]
    assert "no SCRFD detector" in fails["actor2/needs_detector.png"]
    assert "antelopev2.zip" in fails["actor2/needs_detector.png"]
    assert any("collides" in v for v in fails.values())

    # second run: everything done is skipped
    mtime = (out / "actor1/b.npy").stat().st_mtime_ns
    assert main(["-i", str(src), "-o", str(out), "--no-progress"]) == 0
    assert "0 written, 3 already done, 4 failed" in capsys.readouterr().out
    assert (out / "actor1/b.npy").stat().st_mtime_ns == mtime


def test_fake_detector_and_rgb(tree):
    src, out = tree

    class OneFace:
        def detect(self, img, max_num=0, metric="default"):
            h, w = img.shape[:2]
            kps = transform_points(np.array([[2.0, 0, 60.0], [0, 2.0, 30.0]]), ARCFACE_TEMPLATE)
            return np.array([[60, 40, 240, 260, 0.95]], np.float32), kps[None].astype(np.float32)

    res = preprocess_folder(src, out, detector=OneFace(), channel_order="rgb", progress=False)
    assert "actor2/needs_detector.png" in res["done"]
    arr = np.load(out / "actor2/needs_detector.npy")
    x, y = np.round(ARCFACE_TEMPLATE[0]).astype(int)
    assert arr[0, y, x] > 0.9 and arr[2, y, x] < -0.5  # red in channel 0: RGB order


def test_all_failed_exit_code_and_help(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "x.png").write_text("nope")
    assert main(["-i", str(src), "-o", str(tmp_path / "o"), "--no-progress"]) == 1
    assert main(["-i", str(tmp_path / "missing"), "-o", str(tmp_path / "o")]) == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        main(["--help"])
    assert ei.value.code == 0
    helptext = capsys.readouterr().out
    for flag in ("--input", "--output", "--aligned", "--channel-order", "--detector-dir", "failures.txt"):
        assert flag in helptext


def test_output_inside_input_is_not_reprocessed(tmp_path):
    src = tmp_path / "in"
    _face(src, "a.png")
    res = preprocess_folder(src, src / "processed", progress=False)
    assert res["done"] == ["a.png"]
    res2 = preprocess_folder(src, src / "processed", progress=False)
    assert res2["skipped"] == ["a.png"] and not res2["failed"]  # processed/a.jpg is not an input


def test_crop_writer_round_trip_names_and_modes(tmp_path):
    p, _ = _face(tmp_path / "in", "a.png")
    face = prepare_face(p)
    npy, jpg = write_face_crops(face, tmp_path / "x" / "sub" / "s.1")  # a stem with a dot keeps it
    assert (npy.name, jpg.name) == ("s.1.npy", "s.1.jpg")
    assert sorted(f.name for f in npy.parent.iterdir()) == ["s.1.jpg", "s.1.npy"]  # no temp file left
    blob = np.load(npy)
    assert blob.dtype == np.float32
    np.testing.assert_array_equal(blob, face.arcface)
    with Image.open(jpg) as im:
        assert im.format == "JPEG" and im.size == (224, 224)
        px = np.asarray(im.convert("RGB")).astype(int)
    assert np.abs(px - face.farl_crop.astype(int)).mean() < 3.0  # JPEG at quality 95
    # writing in place gives the same bytes as the atomic writer
    npy2, jpg2 = write_face_crops(face, tmp_path / "y" / "s.1", atomic=False)
    assert npy2.read_bytes() == npy.read_bytes() and jpg2.read_bytes() == jpg.read_bytes()
