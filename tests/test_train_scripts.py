"""The three scripts' main(cfg) with the real models on a tiny on-disk world + synthetic FLAME."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ofer.world
import trainExpGen
import trainIdGen
import trainIdRank
from ofer.config import ExpGenTrainConfig, IdGenTrainConfig, IdRankTrainConfig, config_to_dict, load_config
from ofer.errors import CheckpointError, ConfigError
from ofer.models import SPECS, ExpGen, IdGen, IdRank, build_model, load_trained_model
from ofer.train import build
from ofer.models.checkpoint import read_checkpoint, save_checkpoint
from ofer.train.cli import run_cli
from ofer.train.loop import flatten_views, run_training
from ofer.train.tasks import ExpGenTask, IdGenTask

from _train_helpers import one_thread, write_flame, write_world  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
DEMO = Path(ofer.world.__file__).parent / "configs"  # the demo configs, package data

COMMON = ["data.root=.", "data.actors_per_batch=2", "data.images_per_actor=2", "data.num_workers=0",
          "arcface.layers=[1,1,1,1]", "arcface.width=8", "arcface.freeze=l2", "arcface.weights=null",
          "train.max_steps=4", "train.log_every=2", "train.val_every=2", "train.ckpt_every=2",
          "train.sample_every=4", "train.progress=false", "train.device=cpu", "val.num_samples=3",
          "val.steps=3", "val.max_items=2", "data.occlusion.prob=0.5", "train.tensorboard=false"]
FARL = ["farl.width=32", "farl.layers=1", "farl.heads=2", "farl.patch_size=32", "farl.embed_dim=16",
        "farl.weights=null"]
SMALL_DENOISER = ["denoiser.num_qkv=2", "diffusion.num_steps=100"]
SMALL_IDGEN = ["n_shape=20", "denoiser.dims=[20,10,5]"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_world(root, "WORLDID_TRAIN", n_actors=4, n_images=2, seed=1)
    write_world(root, "WORLDID_VAL", n_actors=2, n_images=2, seed=2)
    write_world(root, "WORLDEXP_TRAIN", n_actors=4, n_images=2, seed=3)
    write_world(root, "WORLDEXP_VAL", n_actors=2, n_images=2, seed=4)
    write_flame(root)
    return root


def _idgen_cfg(world, run, extra=()):
    return load_config(IdGenTrainConfig, DEMO / "idgen.yaml",
                       [f"data_root={world}", f"run_dir={run}", *COMMON, *SMALL_DENOISER, *SMALL_IDGEN, *extra])


def _idrank_cfg(world, run, extra=()):
    return load_config(IdRankTrainConfig, DEMO / "idrank.yaml",
                       [f"data_root={world}", f"run_dir={run}", *COMMON, *FARL, *extra])


@pytest.fixture(scope="module")
def ranker_ckpt(world):
    """A randomly initialised IdRank of ours (tiny encoders, the world's face vertices) saved
    as a training checkpoint: the validation ranker of the IdGen tests."""
    torch.manual_seed(3)
    cfg = _idrank_cfg(world, world / "rank_run")
    model = build_model("idrank", cfg, load_weights=False)
    path = world / "ranker.pt"
    save_checkpoint(path, {"model": model.state_dict(), "ema": None, "optimizer": None, "step": 0,
                           "config": config_to_dict(cfg), "kind": "idrank"})
    return path


@pytest.fixture(scope="module")
def idgen_run(world, ranker_ckpt, tmp_path_factory):
    """One real IdGen training (4 steps, validated with a ranker), shared by several tests."""
    run = tmp_path_factory.mktemp("idgen")
    res = trainIdGen.main(_idgen_cfg(world, run, ["train.tensorboard=true",
                                                  f"val.idrank_checkpoint={ranker_ckpt}"]))
    return run, res


def _flame_faces(world):
    from ofer.flame import FLAME

    return FLAME(str(world / "flame" / "generic_model.pkl")).faces.shape[0]


def test_trainidgen_main(world, idgen_run, tmp_path):
    run, res = idgen_run
    assert res.step == 4 and len(res.losses) == 4 and all(map(np.isfinite, res.losses))
    m = res.metrics
    assert {"val/mean_sample_mm", "val/sample_mm", "val/best_of_n_mm", "val/mean_shape_mm",
            "val/ranked_mm"} <= set(m)
    assert m["val/best_of_n_mm"] <= m["val/sample_mm"] and m["val/best_of_n_mm"] <= m["val/ranked_mm"]
    ck = read_checkpoint(run / "checkpoints" / "latest.pt")
    assert ck["kind"] == "idgen" and ck["step"] == 4
    # with a ranker, the ranked-identity error selects best.pt (validated at steps 2 and 4)
    best = read_checkpoint(run / "checkpoints" / "best.pt")
    assert ck["best_metric_name"] == best["best_metric_name"] == "val/ranked_mm"
    assert best["step"] in (2, 4) and best["best_metric"] == pytest.approx(res.best_metric)
    assert res.best_metric <= m["val/ranked_mm"] and (best["step"] == 2 or res.best_metric == m["val/ranked_mm"])
    # the real IdGen: the original denoiser keys under head.net., the schedule under head.var_sched.
    assert "head.var_sched.alphas_cumprod" in ck["model"] and "head.net.downs.0.2.fn.fn.to_qkv.1.weight" in ck["model"]
    assert ck["ema"]["head.var_sched.betas"].shape == (100,)
    groups = {g["name"]: g for g in ck["optimizer"]["param_groups"]}
    assert groups["diffusion"]["lr"] == 3e-3 and groups["arcface"]["lr"] == 1e-3  # demo config
    # freeze=l2: the stem and layer1 are excluded from the optimiser
    model = build_model("idgen", _idgen_cfg(world, tmp_path, ["diffusion.normalize=false"]),
                              load_weights=False)
    assert isinstance(model.head, IdGen) and model.head.config["schedule"]["num_steps"] == 100
    n_trainable = sum(1 for p in model.arcface.parameters() if p.requires_grad)
    assert len(groups["arcface"]["params"]) == n_trainable < sum(1 for _ in model.arcface.parameters())
    plys = sorted((run / "samples" / "0000004").glob("*.ply"))
    assert [p.name for p in plys] == ["gt.ply", "sample0.ply", "sample1.ply", "sample2.ply", "sample3.ply"]
    assert f"element face {_flame_faces(world)}" in plys[0].read_text()
    assert (run / "config.yaml").is_file() and (run / "tb").is_dir()


def test_trainexpgen_main(world, tmp_path):
    cfg = load_config(ExpGenTrainConfig, DEMO / "expgen.yaml",
                      [f"data_root={world}", f"run_dir={tmp_path}", *COMMON, *FARL, *SMALL_DENOISER,
                       "jaw_scale=0.5"])
    res = trainExpGen.main(cfg)
    assert res.step == 4 and np.isfinite(res.metrics["val/mean_sample_mm"])
    # the neutral-face baseline, recomputed from the held-out files with FLAME
    vertices, _ = build.build_flame(cfg)
    _, val = build.build_datasets(cfg, "expgen", load_farl=False)
    errs = []
    for e in val.entries[: cfg.val.max_items]:
        z = np.load(e.params)
        shape = torch.tensor(z["betas"][None, :300], dtype=torch.float32)
        gt = vertices(shape_coeffs=shape, exp_coeffs=torch.tensor(z["betas"][None, 300:350]),
                      jaw_pose=torch.tensor(z["pose"][None, 6:9]))
        errs.append(float((vertices(shape_coeffs=shape) - gt).norm(dim=-1).mean() * 1000))
    assert res.metrics["val/zero_expression_mm"] == pytest.approx(np.mean(errs), rel=1e-4)
    ck = read_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    assert [g["name"] for g in ck["optimizer"]["param_groups"]] == ["farl", "arcface", "diffusion"]
    assert any(k.startswith("farl.") for k in ck["model"])
    model, _ = load_trained_model(tmp_path / "checkpoints" / "latest.pt", "expgen")
    assert isinstance(model.head, ExpGen)
    assert model.head.param_dim == 53 and model.head.cond_dim == 512 + 16 and model.head.jaw_scale == 0.5
    x = torch.zeros(2, 53)
    x[:, 50:] = 1.0
    exp, jaw = model.head.split(x)
    assert exp.shape == (2, 50) and torch.equal(jaw, torch.full((2, 3), 0.5))


def test_expgen_target_is_raw_expression_and_jaw(world):
    cfg = load_config(ExpGenTrainConfig, DEMO / "expgen.yaml",
                      [f"data_root={world}", *COMMON, *FARL, "jaw_scale=0.5"])
    train, _ = build.build_datasets(cfg, "expgen")
    item = train[0]
    task = ExpGenTask(cfg, None)
    x0 = task.target(item)
    params = np.load(world / "WORLDEXP" / "FLAME_parameters" / "A00" / "A00.npz")
    np.testing.assert_array_equal(x0[0, :50].numpy(), params["betas"][300:350].astype(np.float32))
    np.testing.assert_array_equal(x0[0, 50:].numpy(), params["pose"][6:9].astype(np.float32))


def test_trainidrank_main(world, idgen_run, tmp_path):
    run, _ = idgen_run
    cfg = load_config(IdRankTrainConfig, DEMO / "idrank.yaml",
                      [f"data_root={world}", f"run_dir={tmp_path / 'rank'}", *COMMON, *FARL,
                       f"idgen_checkpoint={run / 'checkpoints' / 'latest.pt'}",
                       "num_samples=5", "sample_steps=3", "data.images_per_actor=1",
                       "train.sample_every=0", "ema.enabled=false"])
    res = trainIdRank.main(cfg)
    assert res.step == 4 and all(map(np.isfinite, res.losses))
    m = res.metrics
    assert 0.0 <= m["val/top1"] <= 1.0
    assert m["val/oracle_mm"] <= m["val/chosen_mm"] and m["val/oracle_mm"] <= m["val/sample_mm"]
    path = tmp_path / "rank" / "checkpoints" / "latest.pt"
    ck = read_checkpoint(path)
    # the demo ranker keeps its encoders (FaRL not trainable: no group; ArcFace lr 0)
    assert [g["name"] for g in ck["optimizer"]["param_groups"]] == ["arcface", "ranker"]
    assert ck["optimizer"]["param_groups"][0]["lr"] == 0.0
    assert ck["optimizer"]["param_groups"][1]["lr"] == 1e-3  # demo ranker lr
    with open(world / "flame" / "FLAME_masks.pkl", "rb") as f:
        face = np.asarray(pickle.load(f)["face"], dtype=np.int64)
    np.testing.assert_array_equal(ck["model"]["head.vertex_indices"].numpy(), face)
    # the checkpoint alone rebuilds the ranker, vertex indices included (no masks file needed)
    (world / "flame" / "FLAME_masks.pkl").rename(world / "flame" / "masks.bak")
    try:
        rank, rcfg = load_trained_model(path, "idrank")
    finally:
        (world / "flame" / "masks.bak").rename(world / "flame" / "FLAME_masks.pkl")
    assert isinstance(rank.head, IdRank) and rank.head.net.in_dim == 6 * len(face)
    np.testing.assert_array_equal(rank.head.vertex_indices.numpy(), face)
    for k, v in rank.state_dict().items():
        assert torch.equal(v, ck["model"][k]), k
    verts = torch.randn(1, 5, 400, 3)[:, :, : rank.head.vertex_indices.max() + 1] * 0.01
    cond = rank.condition(torch.randn(1, 3, 112, 112), torch.randn(1, 3, 224, 224))
    scores = rank.head(rank.head.features(verts), cond)
    assert scores.shape == (1, 5) and torch.isfinite(scores).all()


def test_checkpoint_round_trip_gives_identical_samples(world, idgen_run, tmp_path):
    cfg = _idgen_cfg(world, tmp_path, ["train.val_every=0", "train.sample_every=0", "train.max_steps=1",
                                       "ema.enabled=false", "data.occlusion.prob=0.0"])
    torch.manual_seed(0)
    train, _ = build.build_datasets(cfg, "idgen")
    build.fill_target_stats(cfg, "idgen", train)  # the demo config normalises, as trainIdGen does
    model = build_model("idgen", cfg)
    run_training(cfg, IdGenTask(cfg, model), train)
    loaded, _ = load_trained_model(tmp_path / "checkpoints" / "latest.pt", "idgen")
    x = torch.stack([train[i]["arcface"][0] for i in range(2)])
    model.eval()
    with torch.no_grad():
        ref = model.head.sample(model.condition(x), 4, method="ddim", steps=5, seed=7)
        out = loaded.head.sample(loaded.condition(x), 4, method="ddim", steps=5, seed=7)
    assert torch.equal(ref, out) and ref.shape == (2, 4, 20)
    # EMA weights are what load_trained_model returns by default (the shared 4-step run, EMA
    # decay 0.95 of the demo config)
    latest = idgen_run[0] / "checkpoints" / "latest.pt"
    ck = read_checkpoint(latest)
    with_ema, _ = load_trained_model(latest, "idgen")
    raw, _ = load_trained_model(latest, "idgen", use_ema=False)
    w = "head.net.downs.0.0.net.0.weight" if "head.net.downs.0.0.net.0.weight" in ck["model"] else \
        next(k for k in ck["model"] if k.startswith("head.net.") and k.endswith("weight"))
    assert torch.equal(with_ema.state_dict()[w], ck["ema"][w])
    assert torch.equal(raw.state_dict()[w], ck["model"][w])
    assert not torch.equal(ck["ema"][w], ck["model"][w])


def test_load_trained_model_wrong_kind(idgen_run):
    run, _ = idgen_run
    with pytest.raises(CheckpointError, match="holds an idgen checkpoint, expected idrank"):
        load_trained_model(run / "checkpoints" / "latest.pt", "idrank")


@pytest.mark.slow
def test_real_idgen_overfits_one_batch(world, tmp_path):
    """The real IdGen + ArcFace, trained on one batch of 4 actors: the epsilon loss on a fixed
    set of (t, eps) draws for those actors goes down."""
    cfg = _idgen_cfg(world, tmp_path, ["train.val_every=0", "train.sample_every=0", "train.ckpt_every=0",
                                       "train.max_steps=25", "data.actors_per_batch=4",
                                       "data.images_per_actor=2", "data.occlusion.prob=0.0",
                                       "diffusion.num_steps=1000",
                                       "diffusion.lr=1e-2", "ema.enabled=false"])
    torch.manual_seed(0)
    train, _ = build.build_datasets(cfg, "idgen")
    build.fill_target_stats(cfg, "idgen", train)  # the demo config normalises, as trainIdGen does
    model = build_model("idgen", cfg)
    batch = torch.utils.data.default_collate([train[i] for i in range(4)])
    x = batch["arcface"].flatten(0, 1)
    x0 = batch["shape_coeffs"].flatten(0, 1)[:, :20]

    def fixed_loss():
        with torch.no_grad():
            cond = model.condition(x)
            return float(model.head.training_loss(x0.repeat(16, 1), cond.repeat(16, 1),
                                                  generator=torch.Generator().manual_seed(99))[0])

    before = fixed_loss()
    res = run_training(cfg, IdGenTask(cfg, model), train)
    after = fixed_loss()
    assert len(res.losses) == 25 and after < 0.9 * before, (before, after)  # about 0.6 x


@pytest.mark.parametrize("kind,script", [("idgen", trainIdGen), ("expgen", trainExpGen),
                                         ("idrank", trainIdRank)])
def test_dry_run_demo_configs(world, idgen_run, ranker_ckpt, kind, script, capsys):
    run, _ = idgen_run
    schema = SPECS[kind].train_schema
    args = ["--config", str(DEMO / f"{kind}.yaml"), f"data_root={world}", "data.root=.", "--dry-run"]
    if kind == "idrank":
        args.append(f"idgen_checkpoint={run / 'checkpoints' / 'latest.pt'}")
    if kind == "idgen":
        args.append(f"val.idrank_checkpoint={ranker_ckpt}")
    rc = run_cli(kind, schema, script.main, args)
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    out = cap.out
    assert out.rstrip().endswith("dry run OK") and "data.train: 4 items, data.val: 2 items" in out
    assert "model: " in out and "trainable" in out
    if kind in ("idgen", "expgen"):  # the demo configs normalise: statistics of the 4 training entries
        assert "diffusion.normalize: target std " in out and "(4 training entries)" in out
    if kind == "idrank":
        assert "ranker.vertex_indices: 45 vertices" in out
    if kind == "idgen":
        assert f"val.idrank_checkpoint: {ranker_ckpt} (ours IdRank, step 0)" in out
        assert "validation ranker: " in out and "45 vertices (val/ranked_mm selects best.pt)" in out


def test_module_entry_runs_the_script_trainers(world, capsys):
    from ofer.train.entry import TRAINERS, main

    # python -m ofer.train <kind> and the root scripts run the same functions
    assert TRAINERS == {"idgen": trainIdGen.main, "expgen": trainExpGen.main, "idrank": trainIdRank.main}
    args = ["--config", str(DEMO / "expgen.yaml"), f"data_root={world}", "data.root=.", "--dry-run"]
    assert main(["expgen", *args]) == 0
    via_module = capsys.readouterr().out
    assert run_cli("expgen", ExpGenTrainConfig, trainExpGen.main, args) == 0
    assert capsys.readouterr().out == via_module and via_module.rstrip().endswith("dry run OK")
    with pytest.raises(SystemExit) as ei:
        main(["resnet", *args])
    assert ei.value.code == 2 and "invalid choice: 'resnet'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ei:
        main(["idgen", "--help"])
    assert ei.value.code == 0 and "python -m ofer.train idgen" in capsys.readouterr().out
    # the module runs as python -m ofer.train (the kind first)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(ofer.world.__file__).parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "ofer.train", "--help"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and "{expgen,idgen,idrank}" in r.stdout, r.stderr


def test_cli_errors_are_one_line(world, tmp_path, capsys):
    rc = run_cli("idgen", IdGenTrainConfig, trainIdGen.main,
                 ["--config", str(DEMO / "idgen.yaml"), "train.maxsteps=3"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("error: unknown config key 'train.maxsteps'; valid keys in 'train': max_steps,")
    rc = run_cli("idgen", IdGenTrainConfig, trainIdGen.main,
                 ["--config", str(REPO / "configs" / "idgen.yaml"), f"data_root={tmp_path}", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == (f"error: config key 'arcface.weights': file not found: "
                   f"{tmp_path}/pretrained/arcface/glint360_r100/backbone.pth (data_root='{tmp_path}')\n")
    rc = run_cli("idrank", IdRankTrainConfig, trainIdRank.main,
                 ["--config", str(DEMO / "idrank.yaml"), f"data_root={world}", "data.root=.",
                  "ranker.vertex_region=nose_tip", "idgen_checkpoint=nope.pt", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"error: config key 'idgen_checkpoint': file not found: {world}/nope.pt " \
                              f"(data_root='{world}')\n"


def test_dry_run_reports_missing_dataset_files(world, tmp_path, capsys):
    args = ["--config", str(DEMO / "idgen.yaml"), f"data_root={world}",
            "data.root=.", "flame.model_path=null_is_not_allowed", "--dry-run"]
    rc = run_cli("idgen", IdGenTrainConfig, trainIdGen.main, args)
    assert rc == 2 and "config key 'flame.model_path': file not found" in capsys.readouterr().err
    rc = run_cli("idgen", IdGenTrainConfig, trainIdGen.main,
                 args[:-2] + ["data.train=[WORLDID_TRAIN,NOPE]", "--dry-run"])
    assert rc == 2 and "no image list for dataset NOPE" in capsys.readouterr().err


def test_bad_vertex_region_is_one_line(world, idgen_run, capsys):
    run, _ = idgen_run
    rc = run_cli("idrank", IdRankTrainConfig, trainIdRank.main,
                 ["--config", str(DEMO / "idrank.yaml"), f"data_root={world}", "data.root=.",
                  "ranker.vertex_region=nose_tip", f"idgen_checkpoint={run / 'checkpoints' / 'latest.pt'}",
                  "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("error: config key 'ranker.vertex_indices': ") and "'nose_tip'" in err


# ----------------------------------------------------------------------------------------
# IdGen validation with a ranker: val/ranked_mm
# ----------------------------------------------------------------------------------------
def _val_setup(world, extra=()):
    cfg = _idgen_cfg(world, world / "unused_run", ["diffusion.normalize=false", *extra])
    torch.manual_seed(0)
    model = build_model("idgen", cfg, load_weights=False).eval()
    ranker = build.load_val_ranker(cfg)
    _, val = build.build_datasets(cfg, "idgen", val_farl=ranker is not None)
    vertices, _ = build.build_flame(cfg)
    return cfg, model, ranker, val, vertices


def test_ranked_error_is_the_error_of_the_top_scored_sample(world, ranker_ckpt, monkeypatch):
    cfg, model, ranker, val, vertices = _val_setup(world, [f"val.idrank_checkpoint={ranker_ckpt}"])
    task = IdGenTask(cfg, model, vertices, ranker=ranker)
    assert task.metric_name == "val/ranked_mm"
    with torch.no_grad():
        m = task.validate(model, val, torch.Generator().manual_seed(5))

    # Independent reference: the same IdGen samples (same generator; one chunk of 2 items x 2
    # views), scored by the ranker directly; errors in float64 numpy.
    b = flatten_views(torch.utils.data.default_collate([val[i] for i in range(cfg.val.max_items)]))
    assert b["farl"].shape[-1] == ranker.farl.image_size
    with torch.no_grad():
        s = model.head.sample(model.condition(b["arcface"]), cfg.val.num_samples, method=cfg.val.method,
                              steps=cfg.val.steps, generator=torch.Generator().manual_seed(5))
        B, n, D = s.shape
        pad = lambda x: torch.nn.functional.pad(x, (0, cfg.flame.n_shape - D))  # noqa: E731
        vs = vertices(shape_coeffs=pad(s.reshape(B * n, D))).view(B, n, -1, 3)
        gt = vertices(shape_coeffs=pad(b["shape_coeffs"][:, :D]))
        scores = ranker.head(ranker.head.features(vs), ranker.condition(b["arcface"], b["farl"]))
    err = np.linalg.norm(vs.double().numpy() - gt.double().numpy()[:, None], axis=-1).mean(-1) * 1000.0
    pick = scores.numpy().argmax(1)
    assert (B, n) == (4, 3) and err.shape == (4, 3)
    assert m["val/ranked_mm"] == pytest.approx(err[np.arange(B), pick].mean(), rel=1e-5)
    assert m["val/best_of_n_mm"] == pytest.approx(err.min(1).mean(), rel=1e-5)
    assert m["val/sample_mm"] == pytest.approx(err.mean(), rel=1e-5)

    # Through the scoring seam: a scorer that knows the truth. Preferring the closest sample
    # gives the best-of-N error, preferring the farthest the worst-of-N error.
    def oracle(sign):
        def score(batch, verts):
            g = vertices(shape_coeffs=pad(batch["shape_coeffs"][:, :D].float()))
            return -sign * (verts - g[:, None]).norm(dim=-1).mean(-1)
        return score

    for sign, ref in ((1.0, err.min(1).mean()), (-1.0, err.max(1).mean())):
        monkeypatch.setattr(task, "rank_scores", oracle(sign))
        with torch.no_grad():
            got = task.validate(model, val, torch.Generator().manual_seed(5))["val/ranked_mm"]
        assert got == pytest.approx(ref, rel=1e-5)
    assert err.max(1).mean() > err.min(1).mean() + 1e-3  # the two cases differ


def test_without_ranker_todays_metrics_and_one_log_line(world, caplog):
    cfg, model, ranker, val, vertices = _val_setup(world)
    assert ranker is None and "farl" not in val[0]
    task = IdGenTask(cfg, model, vertices)
    assert task.metric_name == "val/mean_sample_mm"
    with caplog.at_level(logging.INFO, logger="ofer.train"), torch.no_grad():
        for _ in range(2):
            m = task.validate(model, val, torch.Generator().manual_seed(5))
    assert set(m) == {"val/mean_sample_mm", "val/sample_mm", "val/best_of_n_mm", "val/mean_shape_mm"}
    told = [r.getMessage() for r in caplog.records if "val.idrank_checkpoint" in r.getMessage()]
    assert len(told) == 1 and "val/ranked_mm" in told[0]


def test_idrank_checkpoint_config_errors(world, idgen_run, tmp_path, capsys):
    run, _ = idgen_run
    with pytest.raises(ConfigError) as e:
        load_config(IdGenTrainConfig, None, ["val.idrank_checkpoint=rank.pt"])  # data.val is empty
    assert str(e.value) == ("config key 'val.idrank_checkpoint' needs held-out datasets in 'data.val' "
                            "(the ranked error is measured on them)")
    with pytest.raises(ConfigError, match=r"^config key 'val.idrank_checkpoint' expects "):
        load_config(IdGenTrainConfig, None, ["data.val=[A]", "val.idrank_checkpoint=[1,2]"])
    with pytest.raises(ConfigError, match=r"^unknown config key 'val.idrank_checkpoint'"):
        load_config(ExpGenTrainConfig, None, ["val.idrank_checkpoint=rank.pt"])  # IdGen only

    def dry(value):
        rc = run_cli("idgen", IdGenTrainConfig, trainIdGen.main,
                     ["--config", str(DEMO / "idgen.yaml"), f"data_root={world}", "data.root=.",
                      f"val.idrank_checkpoint={value}", "--dry-run"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, err
        return err

    idgen = run / "checkpoints" / "latest.pt"
    assert dry(idgen) == (f"error: config key 'val.idrank_checkpoint': {idgen} holds an idgen checkpoint, "
                          "expected idrank\n")
    assert dry("nope.pt") == (f"error: config key 'val.idrank_checkpoint': file not found: {world}/nope.pt "
                              f"(data_root='{world}')\n")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert dry(tmp_path / "junk.pt").startswith(
        f"error: config key 'val.idrank_checkpoint': cannot read checkpoint {tmp_path / 'junk.pt'}")
    # the same checks guard training itself (before any data or weights are loaded)
    with pytest.raises(CheckpointError, match="holds an idgen checkpoint, expected idrank"):
        trainIdGen.main(_idgen_cfg(world, tmp_path / "run", [f"val.idrank_checkpoint={idgen}"]))


def test_released_idrank_tar_as_validation_ranker(world, tmp_path, capsys):
    """The official ``model_idrank.tar`` layout (``net`` + encoder state dicts) via ofer.compat."""
    from ofer.nets import FaRLEncoder, IResNet, RankMLP

    with open(world / "flame" / "FLAME_masks.pkl", "rb") as f:
        face = np.asarray(pickle.load(f)["face"], dtype=np.int64)
    torch.manual_seed(1)
    net = RankMLP(in_dim=6 * len(face), cond_dim=1024)
    farl = FaRLEncoder(image_size=32, patch_size=8, width=64, layers=1, heads=1, output_dim=512)
    tar = tmp_path / "model_idrank.tar"
    torch.save({"net": net.state_dict(), "arcface": IResNet(layers=(1, 1, 1, 1), width=8).state_dict(),
                "farl": farl.state_dict(), "epoch": 3}, tar)
    np.save(tmp_path / "frontindices.npy", face)
    args = ["--config", str(DEMO / "idgen.yaml"), f"data_root={world}", "data.root=.",
            f"val.idrank_checkpoint={tar}", "--dry-run"]
    rc = run_cli("idgen", IdGenTrainConfig, trainIdGen.main, args)
    assert rc == 2 and capsys.readouterr().err == (
        f"error: config key 'val.idrank_vertex_indices': the released IdRank checkpoint {tar} needs its "
        "front-face vertex list (frontindices.npy): none given\n")
    rc = run_cli("idgen", IdGenTrainConfig, trainIdGen.main,
                 args + [f"val.idrank_vertex_indices={tmp_path / 'frontindices.npy'}"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert f"val.idrank_checkpoint: {tar} (official IdRank)" in cap.out
    assert "validation ranker: " in cap.out and f"{len(face)} vertices" in cap.out
    cfg = _idgen_cfg(world, tmp_path / "run", [f"val.idrank_checkpoint={tar}",
                                               f"val.idrank_vertex_indices={tmp_path / 'frontindices.npy'}"])
    ranker = build.load_val_ranker(cfg)
    np.testing.assert_array_equal(ranker.head.vertex_indices.numpy(), face)
    for k, v in net.state_dict().items():
        assert torch.equal(ranker.head.net.state_dict()[k], v), k
    assert not any(p.requires_grad for p in ranker.parameters())


def _targets_on_disk(world, name, kind, n):
    """The training targets read straight from the world's files (independent of ofer.data)."""
    table = np.load(world / "image_paths" / f"{name}.npy", allow_pickle=True).item()
    rows = []
    for _, prel in table.values():
        z = np.load(world / name.split("_")[0] / "FLAME_parameters" / prel)
        rows.append(z["betas"][:n] if kind == "idgen"
                    else np.concatenate([z["betas"][300:300 + n], z["pose"][6:9]]))
    return np.stack(rows).astype(np.float64)


@pytest.mark.parametrize("kind,name,n", [("idgen", "WORLDID_TRAIN", 20), ("expgen", "WORLDEXP_TRAIN", 50)])
def test_target_stats_match_the_training_files(world, kind, name, n):
    schema = SPECS[kind].train_schema
    cfg = load_config(schema, DEMO / f"{kind}.yaml", [f"data_root={world}", "data.root=."])
    train, _ = build.build_datasets(cfg, kind, load_farl=False)
    mean, std = build.target_stats(train, kind, n)
    x = _targets_on_disk(world, name, kind, n)
    assert len(mean) == len(std) == x.shape[1] == (n if kind == "idgen" else n + 3)
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(std, x.std(0), rtol=1e-6)


def test_expgen_normalize_run_keeps_its_statistics(world, tmp_path, monkeypatch):
    args = [f"data_root={world}", f"run_dir={tmp_path}", *COMMON, *FARL, *SMALL_DENOISER,
            "diffusion.normalize=true", "train.max_steps=2", "diffusion.prediction=x0",
            "diffusion.cond_scale=2.5"]
    trainExpGen.main(load_config(ExpGenTrainConfig, DEMO / "expgen.yaml", args))
    ck = read_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    x = _targets_on_disk(world, "WORLDEXP_TRAIN", "expgen", 50)
    d = ck["config"]["diffusion"]
    np.testing.assert_allclose(d["target_std"], x.std(0), rtol=1e-6)
    model, _ = load_trained_model(tmp_path / "checkpoints" / "latest.pt", "expgen")
    assert model.head.normalize == {"mean": d["target_mean"], "std": d["target_std"]}
    assert model.head.prediction == "x0" and model.head.cond_scale == 2.5
    # a resumed run takes the statistics its weights were trained with from the checkpoint,
    # even when the training files changed in between
    def fail(*a, **k):
        raise AssertionError("statistics recomputed on resume")

    monkeypatch.setattr(build, "target_stats", fail)
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(str(f)) or real_load(f, *a, **k))
    cfg = load_config(ExpGenTrainConfig, DEMO / "expgen.yaml", [*args, "resume=true", "train.max_steps=4"])
    res = trainExpGen.main(cfg)
    assert res.step == 4 and cfg.diffusion.target_std == d["target_std"]
    assert sum(r.endswith("latest.pt") for r in reads) == 1  # the resumed run reads its checkpoint once
    # pinned statistics are used as given
    pinned = load_config(ExpGenTrainConfig, DEMO / "expgen.yaml",
                         [*args, f"diffusion.target_mean={[0.0] * 53}", f"diffusion.target_std={[2.0] * 53}"])
    build.fill_target_stats(pinned, "expgen", None)
    assert build_model("expgen", pinned, load_weights=False).head.normalize["std"] == [2.0] * 53


def test_normalize_config_errors(world, tmp_path):
    base = [f"data_root={world}", f"run_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="diffusion.normalize.*must be true when target_mean"):
        load_config(IdGenTrainConfig, DEMO / "idgen.yaml",
                    [*base, "diffusion.normalize=false", "diffusion.target_mean=[0.0]", "diffusion.target_std=[1.0]"])
    with pytest.raises(ConfigError, match="diffusion.cond_scale.*must be > 0"):
        load_config(IdGenTrainConfig, DEMO / "idgen.yaml", [*base, "diffusion.cond_scale=0"])
    with pytest.raises(ConfigError, match="diffusion.prediction"):
        load_config(IdGenTrainConfig, DEMO / "idgen.yaml", [*base, "diffusion.prediction=v"])
    with pytest.raises(ConfigError, match="target_std.*both be given"):
        load_config(IdGenTrainConfig, DEMO / "idgen.yaml", [*base, "diffusion.target_mean=[0.0]"])
    with pytest.raises(ConfigError, match="target_std.*must be > 0"):
        load_config(IdGenTrainConfig, DEMO / "idgen.yaml",
                    [*base, "diffusion.target_mean=[0.0]", "diffusion.target_std=[0.0]"])
    cfg = load_config(IdGenTrainConfig, DEMO / "idgen.yaml", base)
    with pytest.raises(ConfigError, match="'diffusion.normalize' is true but .*fill_target_stats"):
        build_model("idgen", cfg, load_weights=False)
    cfg = load_config(IdGenTrainConfig, DEMO / "idgen.yaml",
                      [*base, "diffusion.target_mean=[0.0]", "diffusion.target_std=[1.0]"])
    with pytest.raises(ConfigError, match="normalize.mean must have 8 entries"):
        build_model("idgen", cfg, load_weights=False)
