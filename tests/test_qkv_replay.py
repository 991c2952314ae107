"""The q/k/v projections of the original denoiser, replayed (:mod:`ofer.models.qkv_replay`).

The reference digests were produced by running the original code's constructions on CPU
(torch 2.13) and hashing the 96 projections of each network (float32 bytes, keys sorted):

* ``released``: the released ``test.py`` from ``seed_everything(1)`` up to its ExpGen model
  (IdRank: ``clip.load("ViT-B/16")`` (openai-clip 1.0.1, built from a state dict of the right
  shapes), ``Arcface()``, ``RankMLPNet``, its own IdGen; IdGen; ExpGen);
* ``training``: ``jobs.deterministic(0)`` then ``FlameParamDiffusionModel`` with
  ``config_flameparamdiffusion_flame20.yml`` (IdGen) and ``config_flameparamdiffusion_exp.yml``
  (ExpGen).

Weights loaded after construction do not touch the generator, so none were needed.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from ofer.errors import CheckpointError, ConfigError
from ofer.models.loading import export_checkpoint, load_model
from ofer.models.official import import_official
from ofer.models.qkv_replay import RELEASED_ARCHITECTURES, replay_qkv
from ofer.sample.config import SampleConfig
from ofer.config import config_from_dict

from test_compat import official_denoiser_file

REFERENCE = {  # (replay, kind): (sha256, first three values of mid_attn's projection 15)
    ("released", "idgen"): ("4133bb29263a41024b6fe0a6a54d63ac93bcc2f0e504ce8bda7dc08ca303f6b3",
                            [-0.24009478092193604, 0.1643790602684021, 0.30760568380355835]),
    ("released", "expgen"): ("21e5ae0c2db3809b354a15b38cd48ce79b1df664c2605276112bc164d7fe9e6e",
                             [0.1323409229516983, -0.019771547988057137, -0.2846202850341797]),
    ("training", "idgen"): ("028ce3c719d6ff22410653529f3374164e5d7df2b36a8be7581fbee0c87d6bd9",
                            [0.22641465067863464, -0.2972535789012909, -0.22967547178268433]),
    ("training", "expgen"): ("002815b72d4ce675fec2be9f162804075aa07e6befc820710b408cbfb497279d",
                             [-0.2720615565776825, 0.19179584085941315, 0.17029741406440735]),
}


def digest(proj: dict[str, torch.Tensor]) -> str:
    return hashlib.sha256(b"".join(proj[k].contiguous().numpy().tobytes() for k in sorted(proj))).hexdigest()


@pytest.mark.parametrize("replay,kind", sorted(REFERENCE))
def test_replay_equals_the_original_construction(replay, kind):
    proj = replay_qkv(RELEASED_ARCHITECTURES[kind], replay, kind=kind)
    assert len(proj) == 6 * 16
    want_hash, want_first = REFERENCE[(replay, kind)]
    first = proj["mid_attn.fn.fn.to_qkv.15.weight"].flatten()[:3].tolist()
    assert first == want_first, (replay, kind, first)
    assert digest(proj) == want_hash


def test_the_draws_differ():
    a = replay_qkv(RELEASED_ARCHITECTURES["idgen"], "released")
    b = replay_qkv(RELEASED_ARCHITECTURES["idgen"], "training")
    assert all(not torch.equal(a[k], b[k]) for k in a)


def test_released_replay_refuses_other_architectures(tmp_path):
    small = {"param_dim": 53, "cond_dim": 1024, "dims": [53, 20, 10], "num_qkv": 16}
    with pytest.raises(ValueError, match="released test.py builds expgen"):
        replay_qkv(small, "released")
    official_denoiser_file(tmp_path / "s.tar", arch=small)
    with pytest.raises(CheckpointError, match="released draw does not exist"):
        import_official(tmp_path / "s.tar", "expgen", qkv="released")
    with pytest.raises(ValueError, match="unknown q/k/v replay"):
        replay_qkv(small, "train")


def test_import_released_and_its_report(tmp_path):
    arch = RELEASED_ARCHITECTURES["expgen"]
    training = replay_qkv(arch, "training")
    official_denoiser_file(tmp_path / "e.tar", arch=arch, qkv_weights=training)
    res = import_official(tmp_path / "e.tar", "expgen", qkv="released")
    sd = res.model.net.state_dict()
    assert digest({k: v for k, v in sd.items() if ".to_qkv." in k}) == REFERENCE[("released", "expgen")][0]
    assert "released test.py draw" in res.report.qkv_source
    assert res.report.qkv_check.startswith("not compared")
    assert "q/k/v projections: replayed the released test.py draw" in str(res.report)
    # the training replay is checked against the projection the file stores
    rep = import_official(tmp_path / "e.tar", "expgen").report
    assert "CLIP ViT-B/16, ArcFace iresnet100" in rep.qkv_source and rep.qkv_check.startswith("verified: 6/6")


def test_load_model_qkv_choices(tmp_path, monkeypatch):
    arch = {"param_dim": 53, "cond_dim": 1024, "dims": [53, 25, 10], "num_qkv": 16}
    official_denoiser_file(tmp_path / "e.tar", arch=arch)
    monkeypatch.setattr("ofer.models.loading.farl_from_state_dict", lambda sd, what: None)
    monkeypatch.setattr("ofer.models.loading.arcface_from_state_dict", lambda sd, what: None)
    monkeypatch.setattr("ofer.models.loading.ConditionedModel", lambda head, a, f: _Holder(head))
    m = load_model(tmp_path / "e.tar", "expgen", qkv_default="released")
    assert "released" in m.load_info.import_report.qkv_source
    m = load_model(tmp_path / "e.tar", "expgen", qkv="unet", qkv_default="released")
    assert "U-Net built first" in m.load_info.import_report.qkv_source
    with pytest.raises(CheckpointError, match="stores no q/k/v projections"):
        load_model(tmp_path / "e.tar", "expgen", qkv="stored")
    # ours keep theirs: a replay asked of them is an error, the default is not
    export_checkpoint(m.head, tmp_path / "ours.pt", encoders={n: {"w": torch.zeros(1)} for n in ("arcface", "farl")})
    with pytest.raises(CheckpointError, match="keeps its own projections"):
        load_model(tmp_path / "ours.pt", "expgen", qkv="released")
    kept = load_model(tmp_path / "ours.pt", "expgen", qkv_default="training")
    assert torch.equal(kept.head.net.state_dict()["mid_attn.fn.fn.to_qkv.3.weight"],
                       m.head.net.state_dict()["mid_attn.fn.fn.to_qkv.3.weight"])


class _Holder(torch.nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head


def test_sample_config_qkv_key():
    assert SampleConfig().official_qkv == "training"
    assert config_from_dict(SampleConfig, {"preset": "faithful"}).official_qkv == "released"
    cfg = config_from_dict(SampleConfig, {"preset": "faithful", "qkv": "training"})
    assert cfg.qkv == "training"
    with pytest.raises(ConfigError, match="qkv"):
        config_from_dict(SampleConfig, {"qkv": "train"})
