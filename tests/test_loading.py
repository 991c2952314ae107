"""One loader for every checkpoint format: one read per file, the kind from the spec table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ofer.compat import export_checkpoint, import_official
from ofer.errors import AssetError, CheckpointError
from ofer.models import SPECS, ConditionedModel, load_model
from ofer.models.loading import checkpoint_format
from ofer.models.official import detect_official_kind
from ofer.nets import Denoiser, FaRLEncoder, IResNet, RankMLP

FARL = dict(image_size=32, patch_size=8, width=64, layers=1, heads=1, output_dim=512)


def _encoders(seed):
    torch.manual_seed(seed)
    arc = IResNet(layers=(1, 1, 1, 1), width=8)
    farl = FaRLEncoder(**FARL)
    return arc.state_dict(), {f"visual.{k}": v for k, v in farl.state_dict().items()}


def official_file(path, kind, param_dim=None, seed=0):
    """A released-layout file of ``kind`` with tiny encoders (``diffusion`` duplicating ``net``)."""
    arc, farl = _encoders(seed)
    spec = SPECS[kind]
    if spec.generative:
        d = param_dim or (300 if kind == "idgen" else 53)
        net = Denoiser(d, spec.cond_dim(), (d, 20, 10))
        net.reset_parameters(torch.Generator().manual_seed(seed))
        sd = {k: v for k, v in net.state_dict().items() if ".to_qkv." not in k}
        payload = {"net": sd, "diffusion": {f"net.{k}": v for k, v in sd.items()}, "arcface": arc,
                   "optimizer": {}, "epoch": 2}
    else:
        payload = {"net": RankMLP(in_dim=6 * 20, cond_dim=1024).state_dict(), "arcface": arc}
    if spec.uses_farl:
        payload["farl"] = farl
    torch.save(payload, path)
    return payload


@pytest.fixture
def reads(monkeypatch):
    count = {"n": 0}
    real = torch.load

    def counting(*a, **kw):
        count["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(torch, "load", counting)
    return count


@pytest.mark.parametrize("kind", ["idgen", "expgen", "idrank"])
def test_official_file_is_read_once_into_the_whole_model(tmp_path, kind, reads):
    path = tmp_path / f"{kind}.tar"
    payload = official_file(path, kind)
    vidx = tmp_path / "front.npy"
    np.save(vidx, np.arange(20, dtype=np.int64) * 3)
    reads["n"] = 0
    model = load_model(path, kind, vertex_indices=vidx)
    assert reads["n"] == 1
    assert isinstance(model, ConditionedModel) and model.kind == kind and not model.training
    assert model.load_info.format == "official" and model.load_info.import_report.ok
    for k, v in payload["arcface"].items():
        assert torch.equal(model.arcface.state_dict()[k], v), k
    assert (model.farl is not None) == SPECS[kind].uses_farl
    if model.farl is not None:
        assert model.farl.image_size == 32
        assert torch.equal(model.farl.proj, payload["farl"]["visual.proj"])
    if kind == "idrank":
        assert model.head.vertex_indices.tolist() == (np.arange(20) * 3).tolist()


def test_kind_of_a_released_file_comes_from_its_condition_layout(tmp_path):
    # the condition width tells IdGen (ArcFace) from ExpGen (FaRL + ArcFace), not the parameter count
    for kind, dim in (("idgen", 53), ("expgen", 300), ("idgen", 100)):
        path = tmp_path / f"{kind}{dim}.tar"
        payload = official_file(path, kind, param_dim=dim)
        assert detect_official_kind(payload) == kind
        assert load_model(path).kind == kind
        assert load_model(path).head.param_dim == dim
    official_file(tmp_path / "r.tar", "idrank")
    assert detect_official_kind(torch.load(tmp_path / "r.tar")) == "idrank"
    assert detect_official_kind({"weights": {}}) is None


def test_exported_and_official_give_the_same_model(tmp_path, reads):
    official_file(tmp_path / "e.tar", "expgen", seed=4)
    res = import_official(tmp_path / "e.tar", "expgen")
    export_checkpoint(res.model, tmp_path / "e.pt", encoders=res.encoders, step=7)
    reads["n"] = 0
    a = load_model(tmp_path / "e.tar")
    b = load_model(tmp_path / "e.pt", "expgen")
    assert reads["n"] == 2  # one read each
    assert b.load_info.format == "exported" and b.load_info.step == 7
    assert checkpoint_format(torch.load(tmp_path / "e.pt")) == "exported"
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_loader_errors_name_the_file(tmp_path):
    official_file(tmp_path / "g.tar", "idgen")
    with pytest.raises(CheckpointError, match=r"g\.tar holds an idgen checkpoint, expected expgen"):
        load_model(tmp_path / "g.tar", "expgen")
    with pytest.raises(CheckpointError, match="idrank checkpoint not found"):
        load_model(tmp_path / "none.tar", "idrank")
    torch.save({"weights": {"a": torch.zeros(1)}}, tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="neither our format"):
        load_model(tmp_path / "junk.pt")
    official_file(tmp_path / "r.tar", "idrank")
    with pytest.raises(AssetError, match="front-face vertex list .*: none given"):
        load_model(tmp_path / "r.tar")
    payload = official_file(tmp_path / "nofarl.tar", "expgen")
    del payload["farl"]
    torch.save(payload, tmp_path / "nofarl.tar")
    with pytest.raises(CheckpointError, match="no 'farl' encoder weights"):
        load_model(tmp_path / "nofarl.tar", "expgen")
