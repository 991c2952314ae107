"""Coloured meshes, glTF morph targets, FLAME-parameter and Blender exports: shapes, units, round trips."""

from __future__ import annotations

import json
import runpy
import struct
import sys
import types

import numpy as np
import pytest
import torch

from ofer.io import write_glb, write_mesh
from ofer.sample.export import (POSE_LAYOUT, export_image, flame_params, write_blender, write_flame_params,
                                write_hypotheses_glb, write_spread_meshes)
from ofer.uncertainty import colorize


def _mesh(n=40, seed=0):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, 3)) * 0.05  # metres
    f = np.stack([np.arange(n - 2), np.arange(1, n - 1), np.arange(2, n)], axis=1)
    return v, f, rng.integers(0, 256, (n, 3)).astype(np.uint8)


def _read_ply(path):
    """Header lines and the vertex/face records of a binary or ASCII PLY with optional colours."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    nv = int(next(h for h in header if h.startswith("element vertex")).split()[-1])
    nf = int(next(h for h in header if h.startswith("element face")).split()[-1])
    has_rgb = "property uchar red" in header
    if "format ascii 1.0" in header:
        rows = data[end:].decode().split("\n")
        vals = np.array([list(map(float, r.split())) for r in rows[:nv]])
        faces = np.array([list(map(int, r.split()))[1:] for r in rows[nv:nv + nf]])
        return header, vals[:, :3], (vals[:, 3:6].astype(np.uint8) if has_rgb else None), faces
    vdt = np.dtype([("p", "<f4", (3,))] + ([("c", "u1", (3,))] if has_rgb else []))
    vert = np.frombuffer(data, vdt, nv, end)
    faces = np.frombuffer(data, np.dtype([("n", "u1"), ("i", "<i4", (3,))]), nf, end + nv * vdt.itemsize)
    assert (faces["n"] == 3).all()
    return header, vert["p"].astype(float), (vert["c"] if has_rgb else None), faces["i"]


@pytest.mark.parametrize("binary", [True, False])
def test_ply_vertex_colours_round_trip(tmp_path, binary):
    import trimesh

    v, f, c = _mesh()
    p = write_mesh(tmp_path / "m.ply", v, f, colors=c, binary=binary, comments=["colour scale: 0 mm to 2 mm"])
    header, pv, pc, pf = _read_ply(p)
    assert "comment units: millimetres" in header and "comment colour scale: 0 mm to 2 mm" in header
    np.testing.assert_allclose(pv, v * 1000, atol=1e-3)
    np.testing.assert_array_equal(pc, c)
    np.testing.assert_array_equal(pf, f)
    tm = trimesh.load(p, process=False)
    np.testing.assert_array_equal(tm.visual.vertex_colors[:, :3], c)
    # float colours in [0, 1] are the same colours
    p2 = write_mesh(tmp_path / "f.ply", v, f, colors=c / 255.0, binary=binary)
    np.testing.assert_array_equal(_read_ply(p2)[2], c)
    # without colours the layout is unchanged (x y z only)
    assert "property uchar red" not in _read_ply(write_mesh(tmp_path / "n.ply", v, f))[0]


def test_obj_vertex_colours_round_trip(tmp_path):
    import trimesh

    v, f, c = _mesh()
    p = write_mesh(tmp_path / "m.obj", v, f, colors=c, comments=["what the colours are"])
    lines = p.read_text().splitlines()
    assert lines[0] == "# units: millimetres" and lines[1] == "# what the colours are"
    rows = np.array([list(map(float, ln.split()[1:])) for ln in lines if ln.startswith("v ")])
    np.testing.assert_allclose(rows[:, :3], v * 1000, atol=1e-5)
    np.testing.assert_array_equal(np.rint(rows[:, 3:] * 255).astype(np.uint8), c)
    tm = trimesh.load(p, process=False)
    np.testing.assert_allclose(tm.vertices, v * 1000, atol=1e-5)
    np.testing.assert_array_equal(tm.visual.vertex_colors[:, :3], c)


def test_mesh_colour_errors(tmp_path):
    v, f, c = _mesh()
    with pytest.raises(ValueError, match="colours"):
        write_mesh(tmp_path / "a.ply", v, f, colors=c[:5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        write_mesh(tmp_path / "a.ply", v, f, colors=c * 2.0)
    with pytest.raises(ValueError, match="single lines"):
        write_mesh(tmp_path / "a.ply", v, f, comments=["two\nlines"])
    assert not list(tmp_path.iterdir())


def read_glb(path):
    """(gltf json, accessor reader) of a .glb, parsed from the byte layout of the spec."""
    data = path.read_bytes()
    magic, version, length = struct.unpack_from("<4sII", data, 0)
    assert magic == b"glTF" and version == 2 and length == len(data)
    jlen, jtype = struct.unpack_from("<I4s", data, 12)
    assert jtype == b"JSON" and jlen % 4 == 0
    gltf = json.loads(data[20:20 + jlen])
    blen, btype = struct.unpack_from("<I4s", data, 20 + jlen)
    assert btype == b"BIN\0" and blen % 4 == 0
    binary = data[28 + jlen:28 + jlen + blen]
    assert gltf["buffers"][0]["byteLength"] <= blen

    def accessor(i):
        a = gltf["accessors"][i]
        bv = gltf["bufferViews"][a["bufferView"]]
        dt = {5126: "<f4", 5125: "<u4"}[a["componentType"]]
        n = {"SCALAR": 1, "VEC3": 3, "VEC4": 4}[a["type"]]
        assert bv["byteOffset"] % 4 == 0
        arr = np.frombuffer(binary, dt, a["count"] * n, bv["byteOffset"] + a.get("byteOffset", 0))
        return arr.reshape(a["count"], n) if n > 1 else arr

    return gltf, accessor


def test_glb_morph_targets_round_trip(tmp_path):
    import trimesh

    v, f, c = _mesh()
    rng = np.random.default_rng(5)
    targets = v[None] + rng.normal(size=(3, len(v), 3)) * 0.002
    p = write_glb(tmp_path / "h.glb", v * 1000, f, targets=targets * 1000, target_names=["a", "b", "c"],
                  source_unit="mm", colors=c)
    gltf, acc = read_glb(p)
    prim = gltf["meshes"][0]["primitives"][0]
    base = acc(prim["attributes"]["POSITION"])
    np.testing.assert_allclose(base, v, atol=1e-6)  # glTF: metres
    pa = gltf["accessors"][prim["attributes"]["POSITION"]]
    np.testing.assert_allclose(pa["min"], base.min(0)) and np.testing.assert_allclose(pa["max"], base.max(0))
    np.testing.assert_array_equal(acc(prim["indices"]).reshape(-1, 3), f)
    assert gltf["meshes"][0]["extras"]["targetNames"] == ["a", "b", "c"]
    assert gltf["meshes"][0]["weights"] == [0.0, 0.0, 0.0]
    for t, tgt in enumerate(prim["targets"]):
        np.testing.assert_allclose(base + acc(tgt["POSITION"]), targets[t], atol=1e-6)
        assert "min" in gltf["accessors"][tgt["POSITION"]]
    col = acc(prim["attributes"]["COLOR_0"])  # linear
    srgb = np.where(col <= 0.0031308, col * 12.92, 1.055 * col ** (1 / 2.4) - 0.055)
    np.testing.assert_allclose(srgb * 255, c, atol=0.01)
    scene = trimesh.load(p, process=False)
    geom = list(scene.geometry.values())[0]
    np.testing.assert_allclose(geom.vertices, v, atol=1e-6)
    np.testing.assert_array_equal(geom.faces, f)
    with pytest.raises(ValueError, match="names"):
        write_glb(tmp_path / "x.glb", v, f, targets=targets, target_names=["a"])


def test_glb_loads_in_pygltflib_when_installed(tmp_path):
    pygltflib = pytest.importorskip("pygltflib")
    v, f, _ = _mesh()
    p = write_glb(tmp_path / "h.glb", v, f, targets=v[None] + 0.001, target_names=["up"])
    g = pygltflib.GLTF2().load(str(p))
    assert g.meshes[0].primitives[0].targets and g.accessors[0].count == len(v)


def test_hypotheses_glb_from_flame(tmp_path, synthetic_flame):
    torch.manual_seed(0)
    shape = torch.randn(1, 300, dtype=torch.float64) * 0.5
    exp = torch.randn(3, 100, dtype=torch.float64) * 0.5
    jaw = torch.zeros(3, 3, dtype=torch.float64)
    jaw[:, 0] = torch.tensor([0.0, 0.1, 0.2])
    ident = synthetic_flame(shape_coeffs=shape).vertices[0]
    ex = synthetic_flame(shape_coeffs=shape.expand(3, -1), exp_coeffs=exp, jaw_pose=jaw).vertices
    faces = synthetic_flame.faces.numpy()
    gltf, acc = read_glb(write_hypotheses_glb(tmp_path / "h.glb", ident, faces, ex, [7, 2, 9]))
    prim = gltf["meshes"][0]["primitives"][0]
    assert gltf["meshes"][0]["extras"]["targetNames"] == ["expression_007", "expression_002", "expression_009"]
    base = acc(prim["attributes"]["POSITION"])
    np.testing.assert_allclose(base, ident.numpy(), atol=1e-6)
    for t in range(3):
        np.testing.assert_allclose(base + acc(prim["targets"][t]["POSITION"]), ex[t].numpy(), atol=1e-6)
        n = acc(prim["attributes"]["NORMAL"]) + acc(prim["targets"][t]["NORMAL"])
        np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1.0, atol=1e-5)


def test_flame_params_layout_and_round_trip(tmp_path, synthetic_flame):
    rng = np.random.default_rng(0)
    shape = rng.normal(size=300).astype(np.float32) * 0.5
    exp = rng.normal(size=(4, 100)).astype(np.float32) * 0.5
    jaw = rng.normal(size=(4, 3)).astype(np.float32) * 0.1
    p = write_flame_params(tmp_path / "flame_params.npz", shape, exp, jaw, [5, 1, 0, 3])
    z = np.load(p)
    assert z["shape"].shape == (4, 300) and z["exp"].shape == (4, 100) and z["pose"].shape == (4, 15)
    assert str(z["pose_layout"]) == "global neck jaw left_eye right_eye" == " ".join(POSE_LAYOUT)
    assert "radians" in str(z["units"]) and z["expression_index"].tolist() == [5, 1, 0, 3]
    np.testing.assert_array_equal(z["pose"][:, 6:9], jaw)
    assert not np.any(np.delete(z["pose"], [6, 7, 8], axis=1))
    # a FLAME evaluated from the file's keys (pose split by joint) gives the sampled meshes
    t = lambda a: torch.from_numpy(np.asarray(a)).double()  # noqa: E731
    ref = synthetic_flame(shape_coeffs=t(shape)[None].expand(4, -1), exp_coeffs=t(exp), jaw_pose=t(jaw)).vertices
    pose = t(z["pose"])
    got = synthetic_flame(shape_coeffs=t(z["shape"]), exp_coeffs=t(z["exp"]), global_pose=pose[:, 0:3],
                          neck_pose=pose[:, 3:6], jaw_pose=pose[:, 6:9], eye_pose=pose[:, 9:15]).vertices
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-6)
    with pytest.raises(ValueError):
        flame_params(shape, exp, jaw[:2], [0, 1])


class _Keyed:
    """Stand-in for a Blender datablock that records keyframes."""

    def __init__(self, **kw):
        self.__dict__.update(kw)
        self.keys = []

    def keyframe_insert(self, path, frame):
        self.keys.append((path, frame, getattr(self, path)))


def _fake_bpy(names, bones=("neck", "jaw", "left_eye", "right_eye"), op_fails=True):
    calls = []

    def update(*a):
        calls.append("update")
        if op_fails:
            raise RuntimeError("operator not registered")

    blocks = [_Keyed(name=n, value=0.0, slider_min=0.0, slider_max=1.0) for n in names]
    pose_bones = {b: _Keyed(rotation_mode="QUATERNION", rotation_axis_angle=(0, 0, 1, 0)) for b in bones}
    arm = types.SimpleNamespace(type="ARMATURE", pose=types.SimpleNamespace(bones=pose_bones))
    shape_keys = types.SimpleNamespace(key_blocks=blocks)
    obj = types.SimpleNamespace(type="MESH", data=types.SimpleNamespace(shape_keys=shape_keys), parent=arm)
    scene = types.SimpleNamespace(frame_start=1, frame_end=1, frame_set=lambda f: calls.append(("frame", f)))
    bpy = types.ModuleType("bpy")
    bpy.context = types.SimpleNamespace(active_object=obj, scene=scene, space_data=None)
    bpy.ops = types.SimpleNamespace(object=types.SimpleNamespace(flame_update_joint_locations=update))
    bpy.path = types.SimpleNamespace(abspath=lambda p: p)
    return bpy, blocks, pose_bones, scene, calls


def test_blender_export_applies_to_an_add_on_style_head(tmp_path, monkeypatch):
    """The script run against a stand-in of the add-on's head (shape keys Shape<i>/Exp<i>,
    jaw bone); Blender itself is not available to the tests."""
    rng = np.random.default_rng(1)
    shape = rng.normal(size=300).astype(np.float32)
    exp = rng.normal(size=(3, 50)).astype(np.float32)  # an ExpGen with 50 coefficients
    jaw = np.array([[0.1, 0.0, 0.0], [0.0, 0.0, 0.0], [0.25, 0.02, -0.01]], np.float32)
    write_blender(tmp_path, shape, exp, jaw, [4, 0, 2])
    data = json.loads((tmp_path / "flame_blender.json").read_text())
    assert len(data["shape"]) == 300 and [e["index"] for e in data["expressions"]] == [4, 0, 2]
    names = ["Basis"] + [f"Shape{i}" for i in range(1, 301)] + [f"Exp{i:03d}" for i in range(1, 101)] + ["Pose1"]
    bpy, blocks, bones, scene, calls = _fake_bpy(names)
    monkeypatch.setitem(sys.modules, "bpy", bpy)
    runpy.run_path(str(tmp_path / "apply_in_blender.py"), run_name="__main__")
    by = {b.name: b for b in blocks}
    np.testing.assert_allclose([by[f"Shape{i}"].value for i in range(1, 301)], np.clip(shape, -10, 10), atol=1e-5)
    assert by["Shape1"].slider_min == -10.0 and by["Basis"].value == 0.0 and by["Pose1"].value == 0.0
    # expression i keyed on frame 1 + i; the Exp keys beyond ExpGen's 50 are keyed at 0
    for i in range(3):
        keyed = {b.name: v for b in blocks for (_, fr, v) in b.keys if fr == 1 + i}
        np.testing.assert_allclose([keyed[f"Exp{k:03d}"] for k in range(1, 51)], exp[i], atol=1e-5)
        assert keyed["Exp051"] == 0.0 and keyed["Exp100"] == 0.0
        angle, *axis = [v for (_, fr, v) in bones["jaw"].keys if fr == 1 + i][0]
        np.testing.assert_allclose(angle * np.asarray(axis) if angle else 0.0, jaw[i], atol=1e-5)
    assert bones["jaw"].rotation_mode == "AXIS_ANGLE" and not bones["neck"].keys
    assert scene.frame_end == 3 and "update" in calls


def test_spread_meshes_and_scale_file(tmp_path):
    v, f, _ = _mesh()
    spreads = {"identity": np.linspace(0, 3, len(v)), "expression": np.linspace(5, 0, len(v))}
    files = write_spread_meshes(tmp_path, v, f, spreads, {"identity": 3.0, "expression": 4.0}, "ply")
    assert files == {"identity": "identity_spread.ply", "expression": "expression_spread.ply"}
    header, pv, pc, _ = _read_ply(tmp_path / "expression_spread.ply")
    assert any("0 mm to 4 mm" in h for h in header)
    np.testing.assert_array_equal(pc, colorize(spreads["expression"], 4.0))
    np.testing.assert_allclose(pv, v * 1000, atol=1e-3)
    scale = json.loads((tmp_path / "scale.json").read_text())
    assert scale["units"] == "mm" and scale["files"]["identity_spread.ply"]["vmax"] == 3.0
    assert scale["colormap"][0]["at"] == 0.0 and scale["colormap"][-1]["at"] == 1.0


def test_export_image_writes_each_format(tmp_path):
    v, f, _ = _mesh()
    rng = np.random.default_rng(2)
    ex = v[None] + rng.normal(size=(2, len(v), 3)) * 1e-3
    written = export_image(tmp_path, ["flame", "blender", "glb"], shape_coeffs=rng.normal(size=300),
                           exp_coeffs=rng.normal(size=(5, 50)), jaw_pose=np.zeros((5, 3)), chosen_index=[3, 1],
                           identity_vertices=v, chosen_vertices=ex, faces=f)
    assert written == ["flame_params.npz", "flame_blender.json", "apply_in_blender.py", "hypotheses.glb"]
    assert all((tmp_path / w).is_file() for w in written)
    assert np.load(tmp_path / "flame_params.npz")["expression_index"].tolist() == [3, 1]
    with pytest.raises(ValueError, match="unknown export"):
        export_image(tmp_path, ["fbx"], shape_coeffs=np.zeros(3), exp_coeffs=np.zeros((1, 2)),
                     jaw_pose=np.zeros((1, 3)), chosen_index=[0], identity_vertices=v, chosen_vertices=ex[:1],
                     faces=f)
