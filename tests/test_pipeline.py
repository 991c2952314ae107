"""sample.py / ofer.sample end to end on synthetic assets and tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ofer.compat import export_checkpoint
from ofer.config import load_config
from ofer.flame.assets import safe_load_pickle
from ofer.models import ExpGen, IdGen, IdRank
from ofer.nets import FaRLEncoder, IResNet
from ofer.sample import Reconstructor, SampleConfig, image_seed_index, run

ROOT = Path(__file__).resolve().parents[1]
N_SHAPE, N_EXP, K = 20, 10, 48


def _tiny_models(flame_paths, seed=0):
    torch.manual_seed(seed)
    arc = lambda: IResNet(layers=(1, 1, 1, 1), width=8)  # noqa: E731
    farl = lambda: FaRLEncoder(image_size=32, patch_size=8, width=64, layers=1, heads=1, output_dim=16)  # noqa: E731
    face = safe_load_pickle(flame_paths.masks)["face"][:K]
    idgen = IdGen(param_dim=N_SHAPE, cond_dim=512, dims=(N_SHAPE, 10, 5), num_qkv=2)
    expgen = ExpGen(param_dim=N_EXP + 3, cond_dim=528, dims=(N_EXP + 3, 8, 4), num_qkv=2)
    idrank = IdRank(in_dim=6 * K, cond_dim=528, hidden=(32, 16, 8, 8), groups=8, vertex_indices=face)
    return {"idgen": (idgen, arc(), None), "expgen": (expgen, arc(), farl()), "idrank": (idrank, arc(), farl())}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, synthetic_flame_paths):
    root = tmp_path_factory.mktemp("sample")
    ck = root / "ck"
    for kind, (head, arc, farl) in _tiny_models(synthetic_flame_paths).items():
        enc = {"arcface": arc.state_dict()}
        if farl is not None:
            enc["farl"] = farl.state_dict()
        export_checkpoint(head, ck / f"{kind}.pt", encoders=enc)
    images = root / "images"
    rng = np.random.default_rng(0)
    kps = np.array([[44, 52], [84, 52], [64, 74], [48, 96], [80, 96]], dtype=float)
    for name in ("a", "b", "sub/c", "sub/d"):
        p = images / f"{name}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(p)
        np.savetxt(p.with_suffix(".kps.txt"), kps + rng.normal(0, 1, kps.shape))
    (images / "broken.jpg").write_text("not an image")
    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(images / "nokps.png")  # no sidecar, no detector
    overrides = [
        f"data_root={root}", f"flame.model_path={synthetic_flame_paths.model}",
        f"flame.landmark_embedding_path={synthetic_flame_paths.landmarks}",
        f"checkpoints.idgen={ck / 'idgen.pt'}", f"checkpoints.expgen={ck / 'expgen.pt'}",
        f"checkpoints.idrank={ck / 'idrank.pt'}", "checkpoints.ranker_vertex_indices=null",
        "n_identities=6", "n_expressions=5", "save_expressions=3", "idgen_steps=4", "expgen_steps=4",
        "detector.mode=none", "device=cpu", "progress=false",
    ]
    return root, images, overrides


def _cfg(overrides, *more):
    return load_config(SampleConfig, ROOT / "configs" / "sample.yaml", list(overrides) + list(more))


def test_end_to_end_outputs_and_bad_inputs(setup, tmp_path):
    root, images, ov = setup
    out = tmp_path / "out"
    summary = run(_cfg(ov, "batch_size=3"), images, out, log=lambda *a: None)
    assert summary["ok"] == 4 and summary["failed"] == 2
    reasons = {r["image"]: r.get("reason", "") for r in summary["records"] if r["status"] == "failed"}
    assert set(reasons) == {"broken.jpg", "nokps.png"}
    assert all(len(r.splitlines()) == 1 and r for r in reasons.values())
    d = out / "sub" / "c"
    for f in ("identity.ply", "samples.npz", "landmarks68.npy", "landmarks7.npy", "preview.png", "result.json"):
        assert (d / f).is_file(), f
    assert sorted(p.name for p in (d / "expressions").iterdir()) == [f"expression_00{k}.ply" for k in range(3)]
    z = np.load(d / "samples.npz")
    assert z["shape_coeffs"].shape == (6, N_SHAPE) and z["scores"].shape == (6,)
    assert z["exp_coeffs"].shape == (5, N_EXP) and z["jaw_pose"].shape == (5, 3)
    assert int(z["ranked_index"]) == int(np.argmax(z["scores"]))
    assert np.load(d / "landmarks7.npy").shape == (7, 3)
    preview = Image.open(d / "preview.png")
    assert preview.size[0] > 3 * 192 and np.asarray(preview).std() > 5  # not blank
    s = json.loads((out / "summary.json").read_text())
    assert s["images"] == 6 and set(s["stage_seconds"]) >= {"encoders", "idgen", "idrank", "expgen", "flame", "writing"}
    assert (out / "summary.csv").read_text().count("\n") == 7


def test_identity_mesh_matches_flame_of_ranked_coefficients(setup, tmp_path, synthetic_flame_paths):
    import trimesh

    from ofer.flame import FLAME

    root, images, ov = setup
    out = tmp_path / "out"
    run(_cfg(ov), images / "a.png", out, log=lambda *a: None)
    z = np.load(out / "a" / "samples.npz")
    flame = FLAME(synthetic_flame_paths.model, synthetic_flame_paths.landmarks, n_shape=N_SHAPE, n_exp=N_EXP)
    best = torch.from_numpy(z["shape_coeffs"][int(z["ranked_index"])])[None]
    ref = flame(shape_coeffs=best)
    mesh = trimesh.load(out / "a" / "identity.ply", process=False)
    np.testing.assert_allclose(mesh.vertices, ref.vertices[0].numpy() * 1000, atol=1e-3)  # mm
    np.testing.assert_allclose(np.load(out / "a" / "landmarks7.npy"), ref.landmarks7[0].numpy() * 1000, atol=1e-3)
    ex = flame(shape_coeffs=best, exp_coeffs=torch.from_numpy(z["exp_coeffs"][:1]),
               jaw_pose=torch.from_numpy(z["jaw_pose"][:1]))
    mesh = trimesh.load(out / "a" / "expressions" / "expression_000.ply", process=False)
    np.testing.assert_allclose(mesh.vertices, ex.vertices[0].numpy() * 1000, atol=1e-3)


def test_spread_outputs_exports_and_preview(setup, tmp_path, synthetic_flame_paths):
    """Spreads recomputed from the written coefficients with FLAME and plain numpy; regions from
    the masks; the coloured meshes, the exports and the one-row preview."""
    import trimesh

    from ofer.flame import FLAME
    from ofer.sample.export import main as export_main
    from ofer.uncertainty import colorize, select_far_apart

    root, images, ov = setup
    out = tmp_path / "out"
    cfg = _cfg(ov, f"uncertainty.masks_path={synthetic_flame_paths.masks}", "uncertainty.top_k=3",
               "chosen_expressions=3", "export=[flame,blender,glb]", "mesh_format=obj")
    assert run(cfg, images / "a.png", out, log=lambda *a: None)["ok"] == 1
    d = out / "a"
    z = np.load(d / "samples.npz")
    flame = FLAME(synthetic_flame_paths.model, None, n_shape=N_SHAPE, n_exp=N_EXP, dtype=torch.float64)
    t = lambda a: torch.from_numpy(np.asarray(a)).double()  # noqa: E731
    ids = flame(shape_coeffs=t(z["shape_coeffs"])).vertices.numpy()
    best = int(z["ranked_index"])
    exps = flame(shape_coeffs=t(z["shape_coeffs"][best])[None].expand(5, -1), exp_coeffs=t(z["exp_coeffs"]),
                 jaw_pose=t(z["jaw_pose"])).vertices.numpy()

    def spread_mm(h):  # RMS distance to the mean position, per vertex
        return np.sqrt(((h - h.mean(0)) ** 2).sum(-1).mean(0)) * 1000

    top = np.argsort(-z["scores"])[:3]
    V = ids.shape[1]
    for key, ref in (("identity_spread_mm", spread_mm(ids)), ("identity_top_k_spread_mm", spread_mm(ids[top])),
                     ("expression_spread_mm", spread_mm(exps))):
        assert z[key].shape == (V,) and z[key].dtype == np.float32
        np.testing.assert_allclose(z[key], ref, rtol=1e-4, atol=1e-3, err_msg=key)
    assert int(z["top_k"]) == 3 and z["chosen_index"].tolist() == select_far_apart(exps, 3)
    res = json.loads((d / "result.json").read_text())
    unc = res["uncertainty"]
    assert unc["units"] == "mm" and unc["top_k"] == 3 and unc["chosen_expressions"] == z["chosen_index"].tolist()
    masks = safe_load_pickle(synthetic_flame_paths.masks)
    assert set(unc["expression"]["regions"]) == {"face", "eyes", "nose", "mouth", "forehead", "cheeks"}
    assert unc["expression"]["regions"]["mouth"] == pytest.approx(
        z["expression_spread_mm"][np.unique(masks["lips"])].mean(), abs=2e-4)
    assert unc["identity"]["max"] == pytest.approx(float(z["identity_spread_mm"].max()), abs=2e-4)
    # the coloured meshes (the configured format) and their scale
    mesh = trimesh.load(d / unc["meshes"]["expression"], process=False)
    assert unc["meshes"]["expression"].endswith(".obj")
    np.testing.assert_allclose(mesh.vertices, ids[best] * 1000, atol=1e-3)
    vmax = unc["color_scale_mm"]["expression"]
    assert vmax >= np.percentile(z["expression_spread_mm"], 99)
    np.testing.assert_array_equal(mesh.visual.vertex_colors[:, :3], colorize(z["expression_spread_mm"], vmax))
    # exports, listed in result.json
    assert res["exports"] == ["export/flame_params.npz", "export/flame_blender.json",
                              "export/apply_in_blender.py", "export/hypotheses.glb"]
    fp = np.load(d / "export" / "flame_params.npz")
    np.testing.assert_array_equal(fp["exp"], z["exp_coeffs"][z["chosen_index"]])
    np.testing.assert_array_equal(fp["shape"][0], z["shape_coeffs"][best])
    # the export CLI redoes them from samples.npz alone
    first = {f.name: f.read_bytes() for f in (d / "export").iterdir()}
    for f in (d / "export").iterdir():
        f.unlink()
    assert export_main(["--samples", str(out), "--config", str(ROOT / "configs" / "sample.yaml"), *ov]) == 0
    again = {f.name: f.read_bytes() for f in (d / "export").iterdir()}
    assert set(again) == set(first)
    for name in ("flame_params.npz", "flame_blender.json", "apply_in_blender.py"):
        assert again[name] == first[name], name
    assert export_main(["--samples", str(out), "--formats", "fbx"]) == 2
    # preview: one row of 256-px cells: input + crop + identity + identity spread + 3 expressions
    # + expression spread + colour scale
    from PIL import Image

    w, h = Image.open(d / "preview.png").size
    assert (w, h) == (9 * (256 + 2) + 2, 256 + 16 + 2 + 2)


def test_results_independent_of_batch_size_and_order(setup, tmp_path):
    root, images, ov = setup
    a = run(_cfg(ov, "batch_size=1", "preview=false"), images, tmp_path / "a", log=lambda *x: None)
    b = run(_cfg(ov, "batch_size=4", "preview=false"), images, tmp_path / "b", log=lambda *x: None)
    assert a["ok"] == b["ok"] == 4
    for name in ("a", "b", "sub/c", "sub/d"):
        za, zb = np.load(tmp_path / "a" / name / "samples.npz"), np.load(tmp_path / "b" / name / "samples.npz")
        np.testing.assert_allclose(za["shape_coeffs"], zb["shape_coeffs"], atol=1e-4)
        np.testing.assert_allclose(za["exp_coeffs"], zb["exp_coeffs"], atol=1e-4)
        # float32 matmuls round differently with the batch size (~1e-6); an untrained ranker's
        # scores are near-ties, so compare the scores rather than their argmax
        np.testing.assert_allclose(za["scores"], zb["scores"], atol=2e-5)
    # a different seed gives different samples
    c = run(_cfg(ov, "seed=7", "preview=false"), images / "a.png", tmp_path / "c", log=lambda *x: None)
    assert c["ok"] == 1
    assert not np.allclose(np.load(tmp_path / "c" / "a" / "samples.npz")["shape_coeffs"],
                           np.load(tmp_path / "a" / "a" / "samples.npz")["shape_coeffs"])
    assert image_seed_index("sub/c") != image_seed_index("sub/d")


def test_resume_skips_finished_and_redoes_unfinished(setup, tmp_path):
    root, images, ov = setup
    out = tmp_path / "out"
    run(_cfg(ov, "preview=false"), images, out, log=lambda *x: None)
    (out / "b" / "result.json").unlink()  # as if killed before the last write of "b"
    before = (out / "a" / "samples.npz").stat().st_mtime_ns
    s = run(_cfg(ov, "preview=false"), images, out, log=lambda *x: None)
    assert s["ok"] == 1 and s["done_before"] == 3
    assert (out / "b" / "result.json").is_file()
    assert (out / "a" / "samples.npz").stat().st_mtime_ns == before
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_faithful_preset_runs_the_released_samplers(setup, tmp_path):
    root, images, ov = setup
    ov = [o for o in ov if not o.startswith(("idgen_steps", "expgen_steps"))]
    cfg = _cfg(ov, "preset=faithful", "preview=false")
    assert cfg.sampler("idgen") == ("legacy_ddim", None) and cfg.sampler("expgen") == ("ddpm", 1000)
    assert cfg.batch1_quirk
    # the released IdGen sampler end to end; ExpGen's 1000 DDPM steps are covered by the sampler tests
    cfg = _cfg(ov, "preset=faithful", "preview=false", "expgen_sampler=ddim", "expgen_steps=5")
    s = run(cfg, images / "a.png", tmp_path / "o", log=lambda *x: None)
    assert s["ok"] == 1


def test_encoders_with_equal_weights_run_once(setup, synthetic_flame_paths):
    from ofer.flame import FLAME
    from ofer.models import ConditionedModel

    models = _tiny_models(synthetic_flame_paths)
    shared_arc, shared_farl = models["expgen"][1], models["expgen"][2]
    calls = {"n": 0}
    shared_arc.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    import copy

    cm = {k: ConditionedModel(h, copy.deepcopy(shared_arc) if k != "expgen" else shared_arc,
                              None if f is None else shared_farl) for k, (h, a, f) in models.items()}
    cfg = _cfg(setup[2], "batch_size=2")
    flame = FLAME(synthetic_flame_paths.model, synthetic_flame_paths.landmarks, n_shape=N_SHAPE, n_exp=0)
    flame_e = FLAME(synthetic_flame_paths.model, None, n_shape=N_SHAPE, n_exp=N_EXP)
    rec = Reconstructor(cm["idgen"].eval(), cm["idrank"].eval(), cm["expgen"].eval(), flame, flame_e, cfg,
                        torch.device("cpu"))
    assert rec._arc_alias == {"idgen": "idgen", "idrank": "idgen", "expgen": "idgen"}
    res = rec.reconstruct(torch.zeros(2, 3, 112, 112), torch.zeros(2, 3, 224, 224), [1, 2])
    # the hook was deep-copied into all three ArcFace modules: one call in total means the
    # idrank and expgen encoders reused idgen's output
    assert len(res) == 2 and calls["n"] == 1


def test_config_and_checkpoint_errors(setup, tmp_path):
    root, images, ov = setup
    from ofer.errors import CheckpointError, ConfigError

    with pytest.raises(ConfigError, match="unknown config key 'n_identity'"):
        _cfg(ov, "n_identity=3")
    with pytest.raises(ConfigError, match="save_expressions"):
        _cfg(ov, "save_expressions=99")
    with pytest.raises(ConfigError, match="idgen_sampler"):
        _cfg(ov, "idgen_sampler=euler")
    with pytest.raises(ConfigError, match="'expgen_steps' must be null or 1000 for ddpm"):
        run(_cfg(ov, "expgen_sampler=ddpm", "expgen_steps=20"), images, tmp_path / "o0", log=lambda *x: None)
    with pytest.raises(CheckpointError, match="idgen checkpoint not found"):
        run(_cfg(ov, f"checkpoints.idgen={tmp_path / 'missing.pt'}"), images, tmp_path / "o", log=lambda *x: None)
    with pytest.raises(CheckpointError, match="expected idgen"):
        run(_cfg(ov, f"checkpoints.idgen={root / 'ck' / 'expgen.pt'}"), images, tmp_path / "o2", log=lambda *x: None)
    from ofer.errors import AssetError

    with pytest.raises(AssetError, match="FLAME model not found"):
        run(_cfg(ov, f"flame.model_path={tmp_path / 'nope.pkl'}"), images, tmp_path / "o3", log=lambda *x: None)


def _cli(args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=ROOT, timeout=300)


def test_cli_errors_are_one_line(setup, tmp_path):
    root, images, ov = setup
    r = _cli(["--input", str(images), "--output", str(tmp_path / "o"), "--config", "configs/sample.yaml",
              *ov, f"checkpoints.idrank={tmp_path / 'nope.tar'}"])
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "idrank checkpoint not found" in r.stderr


@pytest.mark.slow
def test_torchrun_two_processes_shard_without_duplicates(setup, tmp_path):
    root, images, ov = setup
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           str(ROOT / "sample.py"), "--input", str(images), "--output", str(out), "--config", "configs/sample.yaml",
           *ov]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1, r.stderr[-2000:]  # two of the images fail (exit status 1)
    s = json.loads((out / "summary.json").read_text())
    assert s["processes"] == 2 and s["ok"] == 4 and s["failed"] == 2
    images_seen = [rec["image"] for rec in s["records"]]
    assert len(images_seen) == len(set(images_seen)) == 6
    single = run(_cfg(ov), images, tmp_path / "single", log=lambda *x: None)
    assert single["ok"] == 4
    for name in ("a", "sub/d"):
        np.testing.assert_allclose(np.load(out / name / "samples.npz")["shape_coeffs"],
                                   np.load(tmp_path / "single" / name / "samples.npz")["shape_coeffs"], atol=1e-4)


def test_builtin_detector_every_face_and_result_json(setup, tmp_path):
    """No sidecars: the built-in detector finds both faces of a real two-person picture; one
    output per face (``<image>_face<k>``), each ``result.json`` naming the detector; a re-run
    skips both faces; the default takes the centre-most face."""
    pytest.importorskip("ai_edge_litert")
    skd = pytest.importorskip("skimage.data")
    cbook = pytest.importorskip("matplotlib.cbook")
    from ofer.data.detect import find_model_file
    from ofer.errors import AssetError

    try:
        find_model_file("face_landmark.tflite")
    except AssetError as exc:
        pytest.skip(str(exc))
    root, _, ov = setup
    hopper = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    canvas = np.full((560, 1100, 3), 200, np.uint8)  # astronaut (public domain) right, Hopper (public domain) left
    canvas[20:500, 20:430] = np.asarray(hopper.resize((410, 480), Image.Resampling.LANCZOS))
    canvas[20:532, 560:1072] = skd.astronaut()
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(canvas).save(images / "pair.png")
    out = tmp_path / "out"
    cfg = _cfg(ov, "detector.mode=blazeface", "detector.faces=all", "preview=false")
    rec = Reconstructor.from_config(cfg, torch.device("cpu"))
    s = run(cfg, images, out, reconstructor=rec, log=lambda *a: None)
    assert s["ok"] == 2 and [r["image"] for r in s["records"]] == ["pair.png#face0", "pair.png#face1"]
    metas = [json.loads((out / f"pair_face{k}" / "result.json").read_text()) for k in (0, 1)]
    for k, meta in enumerate(metas):
        assert meta["detector"].startswith("blazeface") and meta["face_source"] == "detector" and meta["n_faces"] == 2
        assert len(meta["kps"]) == 5
    assert metas[0]["kps"][0][0] < 430 < metas[1]["kps"][0][0]  # numbered from the left
    assert metas[0]["image_index"] != metas[1]["image_index"]
    again = run(cfg, images, out, reconstructor=rec, log=lambda *a: None)
    assert again["ok"] == 0 and again["done_before"] == 2
    one = run(_cfg(ov, "detector.mode=blazeface", "preview=false"), images, tmp_path / "one", reconstructor=rec,
              log=lambda *a: None)
    assert one["ok"] == 1
    meta = json.loads((tmp_path / "one" / "pair" / "result.json").read_text())
    assert meta["kps"][0][0] > 560 and "2 faces found; used the one nearest the image centre" in meta["notes"]
    # sidecar-only runs record no detector
    sc = run(_cfg(ov, "preview=false", "detector.mode=none"), setup[1] / "a.png", tmp_path / "sc", reconstructor=rec,
             log=lambda *a: None)
    assert sc["ok"] == 1 and json.loads((tmp_path / "sc" / "a" / "result.json").read_text())["detector"] is None


def test_faithful_config_and_qkv_key_with_our_checkpoints(setup):
    """Our checkpoints keep their q/k/v projections: the faithful config (qkv null: the preset's
    replay applies to official files only) loads them; asking them for a replay names the key."""
    from ofer.errors import CheckpointError

    _, _, ov = setup
    faithful = load_config(SampleConfig, ROOT / "configs" / "sample_faithful.yaml",
                           [o for o in ov if not o.startswith(("idgen_steps", "expgen_steps"))])
    assert faithful.official_qkv == "released" and faithful.qkv is None
    rec = Reconstructor.from_config(faithful, torch.device("cpu"))
    lines = rec.model_lines()
    assert sorted(ln.split(":")[0] for ln in lines) == ["expgen", "idgen", "idrank"]
    assert all("exported checkpoint" in ln and "q/k/v" not in ln for ln in lines)
    with pytest.raises(CheckpointError, match=r"^config key 'qkv': .*keeps its own projections"):
        Reconstructor.from_config(_cfg(ov, "qkv=released"), torch.device("cpu"))
