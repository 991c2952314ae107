"""Safe loading of FLAME pickles and landmark embeddings; synthetic assets; mesh writers."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from ofer.errors import AssetError, UnsafePickleError
from ofer.flame import FLAME, load_flame_model, load_landmark_embedding
from ofer.flame.assets import export_flame_npz, safe_load_pickle
from ofer.world.head import build_synthetic_flame, fake_chumpy, write_flame_pickle


@pytest.fixture(scope="module")
def model():
    return build_synthetic_flame(n_vertices=300, seed=1)


def test_pickle_has_the_flame2020_structure(synthetic_flame_paths):
    raw = open(synthetic_flame_paths.model, "rb").read()
    assert raw[:2] == b"\x80\x02"  # protocol 2, as the Python-2 era files
    assert b"chumpy.ch\nCh" in raw and b"scipy.sparse" in raw and b"csc_matrix" in raw
    with pytest.raises(ModuleNotFoundError, match="chumpy"):
        pickle.loads(raw)  # what a plain loader does without chumpy


def test_model_round_trip(tmp_path, model):
    path = write_flame_pickle(tmp_path / "m.pkl", model)
    data = load_flame_model(path)
    for key in ("v_template", "shapedirs", "posedirs", "weights", "kintree_table"):
        np.testing.assert_array_equal(np.asarray(data[key]), np.asarray(model[key]))
    np.testing.assert_array_equal(data["f"], model["f"])
    assert data["f"].dtype == np.uint32
    np.testing.assert_array_equal(data["J_regressor"].toarray(), model["J_regressor"].toarray())
    assert data["bs_style"] == "lbs"


def test_plain_pickle_flame2023_style_and_npz_export_give_same_model(tmp_path, model):
    chumpy_pkl = write_flame_pickle(tmp_path / "a.pkl", model)
    plain_pkl = write_flame_pickle(tmp_path / "b.pkl", model, chumpy_keys=())
    npz = export_flame_npz(chumpy_pkl, tmp_path / "c.npz")
    shape = torch.randn(2, 300, generator=torch.Generator().manual_seed(0))
    outs = [FLAME(p)(shape_coeffs=shape, jaw_pose=torch.full((2, 3), 0.1)).vertices for p in (chumpy_pkl, plain_pkl, npz)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_old_scipy_module_name_is_remapped(tmp_path, model):
    path = write_flame_pickle(tmp_path / "m.pkl", model)
    raw = path.read_bytes()
    old = raw.replace(b"scipy.sparse._csc\n", b"scipy.sparse.csc\n")
    assert old != raw
    (tmp_path / "old.pkl").write_bytes(old)
    data = load_flame_model(tmp_path / "old.pkl")
    np.testing.assert_array_equal(data["J_regressor"].toarray(), model["J_regressor"].toarray())


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"v_template": _Evil()}, protocol=2))
    with pytest.raises(UnsafePickleError, match=r"refused to load pickled object posix\.system"):
        load_flame_model(path)
    assert not (tmp_path / "pwned_by_pickle").exists()
    lm = tmp_path / "evil.npy"
    arr = np.empty((), dtype=object)
    arr[()] = {"x": _Evil()}
    np.save(lm, arr, allow_pickle=True)
    with pytest.raises(UnsafePickleError):
        load_landmark_embedding(lm)
    assert not (tmp_path / "pwned_by_pickle").exists()


@pytest.mark.parametrize("target", ["builtins\neval", "subprocess\nPopen", "torch\nload"])
def test_other_globals_are_refused(tmp_path, target):
    mod, name = target.split("\n")
    payload = b"\x80\x02c" + mod.encode() + b"\n" + name.encode() + b"\nq\x00."
    (tmp_path / "x.pkl").write_bytes(payload)
    with pytest.raises(UnsafePickleError, match=f"{mod}.{name}"):
        safe_load_pickle(tmp_path / "x.pkl")


def test_derived_chumpy_expression_is_refused_with_key(tmp_path, model):
    keys = ("v_template", "f", "posedirs", "J_regressor", "kintree_table", "weights")
    with fake_chumpy() as make:
        data = {k: model[k] for k in keys}
        a = make("ch", "Ch", {"x": model["shapedirs"]})
        data["shapedirs"] = make("ch_ops", "multiply", {"a": a, "b": 2.0})
        with open(tmp_path / "derived.pkl", "wb") as f:
            pickle.dump(data, f, protocol=2)
    with pytest.raises(AssetError, match=r"key 'shapedirs' is a derived chumpy expression \(chumpy\.ch_ops\.multiply\)"):
        load_flame_model(tmp_path / "derived.pkl")


def test_missing_files_name_path_and_readme(tmp_path):
    with pytest.raises(AssetError, match=r"FLAME model not found: .*nope\.pkl \(see data/README\.md"):
        FLAME(tmp_path / "nope.pkl")
    with pytest.raises(AssetError, match=r"landmark embedding not found: .*nolmk\.npy"):
        load_landmark_embedding(tmp_path / "nolmk.npy")
    with pytest.raises(AssetError, match="no path given for the FLAME model"):
        load_flame_model(None)


def test_wrong_content_is_a_clear_error(tmp_path):
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(AssetError, match="expected a pickled dict"):
        load_flame_model(tmp_path / "list.pkl")
    (tmp_path / "partial.pkl").write_bytes(pickle.dumps({"v_template": np.zeros((3, 3))}, protocol=2))
    with pytest.raises(AssetError, match=r"not a FLAME model, missing keys \['f', 'shapedirs'"):
        load_flame_model(tmp_path / "partial.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(AssetError, match="cannot read pickle"):
        load_flame_model(tmp_path / "junk.pkl")


def test_landmark_embedding_round_trip_without_torch_unpickling(synthetic_flame_paths, model):
    raw = open(synthetic_flame_paths.landmarks, "rb").read()
    assert b"_rebuild_tensor_v2" in raw and b"_load_from_bytes" in raw  # real torch tensors inside
    ours = load_landmark_embedding(synthetic_flame_paths.landmarks)
    ref = np.load(synthetic_flame_paths.landmarks, allow_pickle=True, encoding="latin1")[()]
    for k, v in ref.items():
        v = v.numpy() if isinstance(v, torch.Tensor) else v
        assert ours[k].dtype == v.dtype, k
        np.testing.assert_array_equal(ours[k], v)
    assert ours["dynamic_lmk_faces_idx"].shape == (79, 17)
    assert ours["dynamic_lmk_bary_coords"].dtype == np.float32
    assert ours["full_lmk_faces_idx"].shape == (1, 68)


def test_landmark_embedding_strided_tensor(tmp_path):
    # non-contiguous views: a permutation with an offset, and a transposed slice
    t = torch.arange(2 * 3 * 17 * 79, dtype=torch.float32).reshape(2, 3, 17, 79)[1].permute(2, 1, 0)
    idx = torch.arange(17 * 160).reshape(17, 160)[:, 1::2].t()[:79]
    lmk = {"static_lmk_faces_idx": np.zeros(51, np.int64), "static_lmk_bary_coords": np.zeros((51, 3)),
           "full_lmk_faces_idx": np.zeros((1, 68), np.int64), "full_lmk_bary_coords": np.zeros((1, 68, 3)),
           "dynamic_lmk_faces_idx": idx, "dynamic_lmk_bary_coords": t}
    assert not t.is_contiguous() and t.storage_offset() > 0 and not idx.is_contiguous()
    arr = np.empty((), dtype=object)
    arr[()] = lmk
    np.save(tmp_path / "l.npy", arr, allow_pickle=True)
    got = load_landmark_embedding(tmp_path / "l.npy")
    np.testing.assert_array_equal(got["dynamic_lmk_bary_coords"], t.numpy())
    np.testing.assert_array_equal(got["dynamic_lmk_faces_idx"], idx.numpy())


def test_synthetic_model_is_head_like(model):
    v = model["v_template"]
    extent = v.max(0) - v.min(0)
    assert 0.12 < extent[0] < 0.2 and 0.2 < extent[1] < 0.26  # metres: head width and height
    lm = load_shape_independent_landmarks(model)
    assert lm[30, 2] > lm[36, 2]  # nose tip in front of the eye corner
    assert lm[36, 0] < 0 < lm[45, 0]  # subject's right eye at -x
    assert lm[8, 1] < lm[57, 1] < lm[33, 1] < lm[27, 1]  # chin < lower lip < nose base < bridge
    w = model["weights"]
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)
    assert (w[:, 2] > 0.5).sum() > 10  # a jaw region exists
    np.testing.assert_allclose(np.asarray(model["J_regressor"].sum(1)).ravel(), 1.0)


def load_shape_independent_landmarks(model):
    f = model["f"].astype(np.int64)
    faces = model["landmarks"]["full_lmk_faces_idx"][0]
    bary = model["landmarks"]["full_lmk_bary_coords"][0].astype(np.float64)
    return np.einsum("lk,lkd->ld", bary, model["v_template"][f[faces]])


def test_synthetic_faces_are_outward_and_closed(model):
    import trimesh

    mesh = trimesh.Trimesh(model["v_template"], model["f"].astype(np.int64), process=False)
    assert mesh.is_watertight
    assert mesh.volume > 0  # consistently outward-facing triangles


def test_synthetic_writer_is_deterministic(tmp_path):
    from ofer.world.head import write_synthetic_flame

    a = write_synthetic_flame(tmp_path / "a", n_vertices=300, seed=3)
    b = write_synthetic_flame(tmp_path / "b", n_vertices=300, seed=3)
    assert a.model.read_bytes() == b.model.read_bytes()
    la, lb = load_landmark_embedding(a.landmarks), load_landmark_embedding(b.landmarks)
    for k in la:  # torch's storage keys inside the pickle differ run to run; the data may not
        np.testing.assert_array_equal(la[k], lb[k])
    masks = safe_load_pickle(a.masks)
    assert {"face", "lips", "nose", "left_eyeball"} <= set(masks)
    assert masks["face"].dtype == np.int64 and masks["face"].size > 20


# ------------------------------------------------------------------ values the loaders refuse
@pytest.mark.parametrize("key,bad", [("v_template", np.nan), ("shapedirs", np.inf), ("posedirs", -np.inf),
                                     ("weights", np.nan), ("J_regressor", np.inf)])
def test_non_finite_flame_bases_are_refused_with_file_and_key(tmp_path, model, key, bad):
    import scipy.sparse as sp

    value = model[key].copy()
    if sp.issparse(value):
        value.data[3] = bad
    else:
        value.reshape(-1)[5] = bad
    path = write_flame_pickle(tmp_path / "m.pkl", {**model, key: value})
    for p in (path, export_npz_unchecked(tmp_path / "m.npz", {**model, key: value})):
        with pytest.raises(AssetError, match=f"'{key}' holds NaN or infinite") as excinfo:
            FLAME(p)
        assert str(p) in str(excinfo.value) and "\n" not in str(excinfo.value)


def export_npz_unchecked(path, model):
    import scipy.sparse as sp

    np.savez(path, **{k: (v.toarray() if sp.issparse(v) else v) for k, v in model.items()
                      if k in ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "kintree_table",
                               "weights")})
    return path


def test_faces_and_kinematic_tree_out_of_range_are_one_line_errors(tmp_path, model):
    n_v = model["v_template"].shape[0]
    f = model["f"].astype(np.int64)
    tree = np.asarray(model["kintree_table"]).copy()
    tree_bad = tree.copy()
    tree_bad[0, 2] = 4  # joint 2's parent after it: not a tree in topological order
    cases = {"f": [np.where(f == f.max(), n_v, f), f - 1, f[:, :2], f + 0.5],
             "kintree_table": [tree_bad, tree[:1]]}
    for key, values in cases.items():
        for i, value in enumerate(values):
            path = write_flame_pickle(tmp_path / f"{key}{i}.pkl", {**model, key: value})
            with pytest.raises(AssetError, match=f"'{key}'") as excinfo:
                FLAME(path)
            assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize("key,change", [
    ("dynamic_lmk_faces_idx", lambda a: a[:78]),
    ("dynamic_lmk_bary_coords", lambda a: a[..., :2]),
    ("static_lmk_faces_idx", lambda a: a.reshape(-1)[:50]),
    ("full_lmk_bary_coords", lambda a: a.reshape(68, 3)[None, None, :, :2]),
    ("full_lmk_faces_idx", lambda a: a.astype(np.float64) + 0.25),
    ("static_lmk_bary_coords", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 4, np.nan, a)),
    ("dynamic_lmk_faces_idx", lambda a: np.full(np.shape(a), "x")),
])
def test_landmark_embedding_of_wrong_shapes_or_values_is_a_one_line_error(tmp_path, model, key, change):
    from ofer.world.head import write_landmark_embedding

    lmk = {k: np.asarray(v) for k, v in model["landmarks"].items()}
    good = write_landmark_embedding(tmp_path / "good.npy", lmk)
    bad = write_landmark_embedding(tmp_path / "bad.npy", {**lmk, key: change(lmk[key])})
    mpath = write_flame_pickle(tmp_path / "m.pkl", model)
    assert FLAME(mpath, good).has_landmarks
    with pytest.raises(AssetError, match=f"'{key}'") as excinfo:
        FLAME(mpath, bad)
    assert str(bad) in str(excinfo.value) and "\n" not in str(excinfo.value)
