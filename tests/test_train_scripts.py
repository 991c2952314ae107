"""The three scripts' main(cfg) on a tiny on-disk world, with stand-in heads and FLAME."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import trainExpGen
import trainIdGen
import trainIdRank
from ofer.config import ExpGenTrainConfig, IdGenTrainConfig, IdRankTrainConfig, load_config
from ofer.train.checkpoint import read_checkpoint
from ofer.train.cli import run_cli

from _train_helpers import stand_in_builders, write_world

REPO = Path(__file__).resolve().parents[1]

COMMON = ["data.root=.", "data.actors_per_batch=2", "data.images_per_actor=2", "data.num_workers=0",
          "arcface.layers=[1,1,1,1]", "arcface.width=8", "arcface.freeze=l2", "arcface.weights=null",
          "train.max_steps=4", "train.log_every=2", "train.val_every=2", "train.ckpt_every=2",
          "train.sample_every=4", "train.progress=false", "train.device=cpu", "val.num_samples=3",
          "val.steps=3", "val.max_items=2", "flame.landmark_embedding_path=null",
          "data.occlusion.prob=0.5", "train.tensorboard=false"]
FARL = ["farl.width=32", "farl.layers=1", "farl.heads=2", "farl.patch_size=32", "farl.embed_dim=16",
        "farl.weights=null"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_world(root, "WORLDID_TRAIN", n_actors=4, n_images=2, seed=1)
    write_world(root, "WORLDID_VAL", n_actors=2, n_images=2, seed=2)
    write_world(root, "WORLDEXP_TRAIN", n_actors=4, n_images=2, seed=3)
    write_world(root, "WORLDEXP_VAL", n_actors=2, n_images=2, seed=4)
    return root


def _idgen_cfg(world, run, extra=()):
    return load_config(IdGenTrainConfig, REPO / "configs" / "demo" / "idgen.yaml",
                       [f"data_root={world}", f"run_dir={run}", *COMMON, *extra])


def test_trainidgen_main(world, tmp_path, monkeypatch):
    stand_in_builders(monkeypatch)
    res = trainIdGen.main(_idgen_cfg(world, tmp_path / "idgen", ["train.tensorboard=true"]))
    assert res.step == 4 and len(res.losses) == 4 and all(map(torch.isfinite, torch.tensor(res.losses)))
    assert {"val/mean_sample_mm", "val/sample_mm", "val/best_of_n_mm"} <= set(res.metrics)
    assert res.metrics["val/best_of_n_mm"] <= res.metrics["val/sample_mm"]
    ck = read_checkpoint(tmp_path / "idgen" / "checkpoints" / "latest.pt")
    assert ck["kind"] == "idgen" and ck["step"] == 4
    assert any(k.startswith("arcface.") for k in ck["model"]) and any(k.startswith("head.") for k in ck["model"])
    groups = {g["name"]: g for g in ck["optimizer"]["param_groups"]}
    assert groups["diffusion"]["lr"] == 1e-3 and groups["arcface"]["lr"] == 1e-3
    # freeze=l2: the stem and layer1 are excluded from the optimiser
    model = trainIdGen.build.build_model("idgen", _idgen_cfg(world, tmp_path / "x"), load_weights=False)
    n_trainable = sum(1 for p in model.arcface.parameters() if p.requires_grad)
    assert len(groups["arcface"]["params"]) == n_trainable < sum(1 for _ in model.arcface.parameters())
    plys = sorted((tmp_path / "idgen" / "samples" / "0000004").glob("*.ply"))
    assert [p.name for p in plys] == ["gt.ply", "sample0.ply", "sample1.ply", "sample2.ply", "sample3.ply"]
    assert "element face 38" in plys[0].read_text()
    assert (tmp_path / "idgen" / "config.yaml").is_file() and (tmp_path / "idgen" / "tb").is_dir()


def test_trainexpgen_main(world, tmp_path, monkeypatch):
    stand_in_builders(monkeypatch)
    cfg = load_config(ExpGenTrainConfig, REPO / "configs" / "demo" / "expgen.yaml",
                      [f"data_root={world}", f"run_dir={tmp_path}", *COMMON, *FARL])
    res = trainExpGen.main(cfg)
    assert res.step == 4 and "val/mean_sample_mm" in res.metrics
    ck = read_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    assert [g["name"] for g in ck["optimizer"]["param_groups"]] == ["farl", "arcface", "diffusion"]
    assert any(k.startswith("farl.") for k in ck["model"])


def test_trainidrank_main(world, tmp_path, monkeypatch):
    stand_in_builders(monkeypatch)
    trainIdGen.main(_idgen_cfg(world, tmp_path / "idgen", ["train.val_every=0", "train.sample_every=0"]))
    cfg = load_config(IdRankTrainConfig, REPO / "configs" / "demo" / "idrank.yaml",
                      [f"data_root={world}", f"run_dir={tmp_path / 'rank'}", *COMMON, *FARL,
                       f"idgen_checkpoint={tmp_path / 'idgen' / 'checkpoints' / 'latest.pt'}",
                       "num_samples=5", "sample_steps=3", "data.images_per_actor=1",
                       "train.sample_every=0"])
    res = trainIdRank.main(cfg)
    assert res.step == 4
    m = res.metrics
    assert 0.0 <= m["val/top1"] <= 1.0
    assert m["val/oracle_mm"] <= m["val/chosen_mm"]
    ck = read_checkpoint(tmp_path / "rank" / "checkpoints" / "latest.pt")
    assert [g["name"] for g in ck["optimizer"]["param_groups"]] == ["farl", "arcface", "ranker"]
    assert ck["optimizer"]["param_groups"][2]["lr"] == 1e-4  # demo ranker lr


def test_cli_errors_are_one_line(world, tmp_path, capsys):
    rc = run_cli("idgen", IdGenTrainConfig, trainIdGen.main,
                 ["--config", str(REPO / "configs" / "demo" / "idgen.yaml"), "train.maxsteps=3"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("error: unknown config key 'train.maxsteps'; valid keys in 'train': max_steps,")
    rc = run_cli("idgen", IdGenTrainConfig, trainIdGen.main,
                 ["--config", str(REPO / "configs" / "idgen.yaml"), f"data_root={tmp_path}", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == (f"error: config key 'arcface.weights': file not found: "
                   f"{tmp_path}/pretrained/arcface/glint360_r100/backbone.pth (data_root='{tmp_path}')\n")


def test_dry_run_reports_missing_dataset_files(world, tmp_path, capsys, monkeypatch):
    stand_in_builders(monkeypatch)
    args = ["--config", str(REPO / "configs" / "demo" / "idgen.yaml"), f"data_root={world}",
            "data.root=.", "flame.model_path=null_is_not_allowed", "--dry-run"]
    rc = run_cli("idgen", IdGenTrainConfig, trainIdGen.main, args)
    assert rc == 2 and "config key 'flame.model_path': file not found" in capsys.readouterr().err
    (world / "flame.pkl").write_bytes(b"x")
    args[-2] = "flame.model_path=flame.pkl"
    rc = run_cli("idgen", IdGenTrainConfig, trainIdGen.main,
                 args + ["flame.landmark_embedding_path=null", "data.train=[WORLDID_TRAIN,NOPE]"])
    assert rc == 2 and "no image list for dataset NOPE" in capsys.readouterr().err
    rc = run_cli("idgen", IdGenTrainConfig, trainIdGen.main,
                 args + ["flame.landmark_embedding_path=null", "arcface.layers=[1,1,1,1]", "arcface.width=8"])
    out = capsys.readouterr().out
    assert rc == 0 and out.rstrip().endswith("dry run OK") and "data.train: 4 items, data.val: 2 items" in out
