"""Checkpoint import and round trips.

Official-format files are synthesised here with the original entry and key names
(``net``, ``var_sched``, ``diffusion``, ``arcface``, ``farl``, training state, and the
``<block>.fn.fn.qkv.weight`` keys a training checkpoint carries); no real checkpoint is
needed. The replay of the training-time q/k/v draw was checked once against the original
code (``torch.manual_seed(0); Arcface(); Unet(cfg)``: 96/96 projections equal).
"""

from __future__ import annotations

import pickle

import pytest
import torch

import ofer
from ofer.compat import export_checkpoint, import_official, load_checkpoint, main, replay_qkv
from ofer.diffusion import NoiseSchedule
from ofer.errors import CheckpointError
from ofer.models import ExpGen, IdGen, IdRank
from ofer.nets import Denoiser, RankMLP

ARCH = {"param_dim": 53, "cond_dim": 1024, "dims": [53, 25, 10], "num_qkv": 16}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def official_denoiser_file(path, arch=ARCH, qkv_weights=None, seed=1):
    """An official-layout IdGen/ExpGen .tar: 174 net keys (+ qkv.weight), var_sched, diffusion."""
    net = Denoiser(arch["param_dim"], arch["cond_dim"], arch["dims"])
    net.reset_parameters(torch.Generator().manual_seed(seed))
    sd = {k: v for k, v in net.state_dict().items() if ".to_qkv." not in k}
    if qkv_weights is not None:  # training checkpoints hold projection 15 as '...fn.fn.qkv.weight'
        for k, v in qkv_weights.items():
            if k.endswith(".to_qkv.15.weight"):
                sd[k.replace(".to_qkv.15.weight", ".qkv.weight")] = v.clone()
    sched = NoiseSchedule.linear().state_dict()
    diffusion = {**{f"net.{k}": v for k, v in sd.items()},
                 **{f"var_sched.{k}": v for k, v in sched.items()}}
    ckpt = {"farl": {"visual.proj": torch.zeros(768, 512)},
            "arcface": {"fc.weight": torch.zeros(512, 8), "fc.bias": torch.zeros(512)},
            "net": sd, "var_sched": sched, "diffusion": diffusion,
            "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"best": 0.1},
            "epoch": 4, "global_step": 1200, "batch_size": 16}
    torch.save(ckpt, path)
    return ckpt


def test_import_expgen_strict_report(tmp_path):
    path = tmp_path / "model_expgen.tar"
    ckpt = official_denoiser_file(path)
    res = import_official(path, "expgen", qkv="unet", qkv_seed=3)
    rep = res.report
    assert rep.ok and rep.loaded == 174
    assert rep.encoders == {"farl": 1, "arcface": 2}
    assert set(rep.ignored_entries) == {"optimizer", "scheduler", "epoch", "global_step", "batch_size"}
    assert "17 buffers match" in rep.schedule and "not verifiable" in rep.qkv_check
    assert "seed 3 with the U-Net built first" in rep.qkv_source
    assert isinstance(res.model, ExpGen) and res.model.config["dims"] == [53, 25, 10]
    sd = res.model.net.state_dict()
    for k, v in ckpt["net"].items():
        assert torch.equal(sd[k], v)
    want = replay_qkv(ARCH, "unet", 3)
    assert all(torch.equal(sd[k], v) for k, v in want.items())
    assert torch.equal(res.encoders["arcface"]["fc.bias"], torch.zeros(512))
    assert "expgen checkpoint" in str(rep)


def test_qkv_check_against_stored_training_projection(tmp_path):
    qkv = replay_qkv(ARCH, "unet", 7)
    official_denoiser_file(tmp_path / "a.tar", qkv_weights=qkv)
    rep = import_official(tmp_path / "a.tar", "expgen", qkv="unet", qkv_seed=7).report
    assert rep.qkv_check.startswith("verified: 6/6")
    rep = import_official(tmp_path / "a.tar", "expgen", qkv="unet", qkv_seed=8).report
    assert rep.qkv_check.startswith("mismatch: 0/6")
    # explicit projections win over any replay
    rep = import_official(tmp_path / "a.tar", "expgen", qkv_weights=qkv).report
    assert rep.qkv_source == "supplied by the caller" and rep.qkv_check.startswith("verified")


def test_training_replay_is_the_default(tmp_path):
    qkv = replay_qkv(ARCH, "training", 0)
    official_denoiser_file(tmp_path / "t.tar", qkv_weights=qkv)
    rep = import_official(tmp_path / "t.tar", "expgen").report
    assert "training draw (seed 0: CLIP ViT-B/16, ArcFace iresnet100" in rep.qkv_source
    assert rep.qkv_check.startswith("verified")


@pytest.mark.parametrize("tamper,match", [
    (lambda c: c["net"].pop("ups.1.3.fn.norm.g"), "1 missing"),
    (lambda c: c["net"].__setitem__("downs.0.9.weight", torch.zeros(1)), "1 unexpected"),
    (lambda c: c["net"].__setitem__("init_conv.bias", torch.zeros(54)), "1 mis-shaped"),
])
def test_key_problems_are_errors_with_report(tmp_path, tamper, match):
    path = tmp_path / "bad.tar"
    ckpt = official_denoiser_file(path)
    tamper(ckpt)
    ckpt.pop("diffusion")
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=match) as err:
        import_official(path, "expgen", qkv="unet")
    assert "\n" not in str(err.value)
    assert not err.value.report.ok


def test_wrong_kind_and_bad_files(tmp_path):
    path = tmp_path / "m.tar"
    official_denoiser_file(path)
    with pytest.raises(CheckpointError, match="holds an expgen checkpoint, expected idgen"):
        import_official(path, "idgen")
    with pytest.raises(CheckpointError, match="unknown checkpoint kind 'shape'"):
        import_official(path, "shape")
    with pytest.raises(CheckpointError, match="not found"):
        import_official(tmp_path / "nope.tar", "idgen")
    (tmp_path / "junk.tar").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        import_official(tmp_path / "junk.tar", "idgen")
    torch.save({"something": 1}, tmp_path / "other.tar")
    with pytest.raises(CheckpointError, match="not an official OFER checkpoint"):
        import_official(tmp_path / "other.tar", "idgen")


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.tar"
    with open(path, "wb") as f:
        pickle.dump({"net": Payload()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)


def test_inconsistent_entries_are_errors(tmp_path):
    path = tmp_path / "m.tar"
    ckpt = official_denoiser_file(path)
    ckpt["diffusion"]["net.init_conv.bias"] = ckpt["diffusion"]["net.init_conv.bias"] + 1
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="'net' and 'diffusion' disagree on 1 tensors"):
        import_official(path, "expgen", qkv="unet")
    ckpt = official_denoiser_file(path)
    ckpt["var_sched"] = NoiseSchedule.linear(1000, 1e-4, 2e-2).state_dict()
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="var_sched' is not the linear"):
        import_official(path, "expgen", qkv="unet")


def test_diffusion_only_file(tmp_path):
    path = tmp_path / "d.tar"
    ckpt = official_denoiser_file(path)
    del ckpt["net"], ckpt["var_sched"]
    torch.save(ckpt, path)
    res = import_official(path, "expgen", qkv="unet")
    assert res.report.ok and any("'diffusion'" in n for n in res.report.notes)


def test_import_idrank(tmp_path):
    net = RankMLP(in_dim=30, cond_dim=1024)
    torch.save({"net": net.state_dict(), "arcface": {"a": torch.zeros(1)},
                "farl": {"b": torch.zeros(1)}, "epoch": 1}, tmp_path / "rank.tar")
    res = import_official(tmp_path / "rank.tar", "idrank")
    assert res.report.ok and res.report.loaded == 33 and isinstance(res.model, IdRank)
    assert any("set_vertex_indices" in n for n in res.report.notes)
    res = import_official(tmp_path / "rank.tar", "idrank", vertex_indices=[1, 2, 3, 4, 5])
    feats = res.model.features(torch.zeros(1, 2, 8, 3))
    torch.testing.assert_close(res.model(feats, torch.zeros(1, 1024)),
                               net(feats, torch.zeros(1, 1024)))
    with pytest.raises(CheckpointError, match="holds an idrank checkpoint, expected idgen"):
        import_official(tmp_path / "rank.tar", "idgen")


def test_our_format_round_trip_identical_outputs(tmp_path):
    torch.manual_seed(0)
    models = [IdGen(param_dim=12, cond_dim=8, dims=(12, 6, 4)),
              ExpGen(param_dim=8, cond_dim=8, dims=(8, 4), jaw_scale=0.3),
              IdRank(in_dim=18, cond_dim=8, hidden=(16, 8), groups=4, vertex_indices=[0, 2, 4])]
    for m in models:
        path = tmp_path / f"{m.kind}.pt"
        export_checkpoint(m, path, step=7, encoders={"arcface": {"w": torch.ones(2)}})
        raw = torch.load(path, weights_only=True)
        assert raw["kind"] == m.kind and raw["step"] == 7 and raw["config"] == m.config
        back = ofer.load_checkpoint(path)
        assert type(back) is type(m) and back.config == m.config and not back.training
        assert torch.equal(back.encoder_state_dicts["arcface"]["w"], torch.ones(2))
        m.eval()
        with torch.no_grad():
            if isinstance(m, IdRank):
                v = torch.randn(2, 3, 6, 3)
                assert torch.equal(back(back.features(v), torch.ones(2, 8)), m(m.features(v), torch.ones(2, 8)))
            else:
                x, t, c = torch.randn(3, m.param_dim), torch.tensor([0, 5, 999]), torch.randn(3, 8)
                assert torch.equal(back(x, t, c), m(x, t, c))
                assert torch.equal(back.sample(c, 2, steps=3, seed=1), m.sample(c, 2, steps=3, seed=1))


def test_load_prefers_ema_and_nested_config(tmp_path):
    torch.manual_seed(0)
    m = IdGen(param_dim=12, cond_dim=8, dims=(12, 6, 4))
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in m.state_dict().items()}
    torch.save({"model": m.state_dict(), "ema": ema, "optimizer": None, "step": 3,
                "config": {"model": m.config, "train": {"lr": 1e-3}}, "kind": "idgen",
                "version": 1}, tmp_path / "c.pt")
    back = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(back.net.init_conv.bias, ema["net.init_conv.bias"])
    with pytest.raises(CheckpointError, match="holds an idgen checkpoint, expected expgen"):
        load_checkpoint(tmp_path / "c.pt", kind="expgen")
    torch.save({"model": {"bogus": torch.zeros(1)}, "config": m.config, "kind": "idgen"},
               tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match="missing and 1 unexpected keys for idgen"):
        load_checkpoint(tmp_path / "d.pt")
    torch.save({"model": {}, "config": {"param_dim": 12, "dims": [5]}, "kind": "idgen"},
               tmp_path / "e.pt")
    with pytest.raises(CheckpointError, match="cannot rebuild idgen from 'config'"):
        load_checkpoint(tmp_path / "e.pt")


def test_load_checkpoint_reads_official_files(tmp_path):
    official_denoiser_file(tmp_path / "x.tar")
    m = load_checkpoint(tmp_path / "x.tar")
    assert isinstance(m, ExpGen) and m.import_report.ok
    assert set(m.encoder_state_dicts) == {"arcface", "farl"}


def test_cli_converts_and_reports(tmp_path, capsys):
    official_denoiser_file(tmp_path / "in.tar")
    assert main(["--kind", "expgen", "--qkv", "unet", str(tmp_path / "in.tar"),
                 str(tmp_path / "out.pt")]) == 0
    out = capsys.readouterr().out
    assert "network keys loaded: 174" in out and "wrote" in out
    back = load_checkpoint(tmp_path / "out.pt", kind="expgen")
    assert set(back.encoder_state_dicts) == {"arcface", "farl"}
    assert main(["--kind", "idgen", str(tmp_path / "in.tar"), str(tmp_path / "o2.pt")]) == 1
    assert "expected idgen" in capsys.readouterr().err
    assert not (tmp_path / "o2.pt").exists()


# ------------------------------------------------------------------ non-finite and odd values
def _poison(sd, key, value=float("nan")):
    t = sd[key].clone()
    t.view(-1)[0] = value
    sd[key] = t


@pytest.mark.parametrize("entry", ["net", "diffusion", "var_sched", "arcface", "farl"])
def test_non_finite_official_weights_are_refused_naming_file_and_tensor(tmp_path, capsys, entry):
    path = tmp_path / "in.tar"
    ckpt = official_denoiser_file(path)
    key = sorted(k for k, v in ckpt[entry].items() if v.is_floating_point())[0]
    _poison(ckpt[entry], key, float("inf") if entry == "farl" else float("nan"))
    torch.save(ckpt, path)
    for load in (lambda: import_official(path, "expgen", qkv="unet"),
                 lambda: load_checkpoint(path), lambda: ofer.models.load_model(path)):
        with pytest.raises(CheckpointError, match="NaN or infinite") as excinfo:
            load()
        assert f"'{entry}/{key}'" in str(excinfo.value) and str(path) in str(excinfo.value)
    assert main(["--kind", "expgen", "--qkv", "unet", str(path), str(tmp_path / "out.pt")]) != 0
    assert f"{entry}/{key}" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()


def test_non_finite_weights_of_our_formats_are_refused(tmp_path):
    torch.manual_seed(0)
    m = IdGen(param_dim=12, cond_dim=8, dims=(12, 6, 4))
    export_checkpoint(m, tmp_path / "e.pt", encoders={"arcface": {"w": torch.ones(2)}})
    raw = torch.load(tmp_path / "e.pt", weights_only=True)
    _poison(raw["model"], "net.init_conv.weight")
    torch.save(raw, tmp_path / "bad_model.pt")
    with pytest.raises(CheckpointError, match=r"'model/net\.init_conv\.weight' holds NaN"):
        load_checkpoint(tmp_path / "bad_model.pt")
    raw = torch.load(tmp_path / "e.pt", weights_only=True)
    _poison(raw["arcface"], "w", float("-inf"))
    torch.save(raw, tmp_path / "bad_enc.pt")
    with pytest.raises(CheckpointError, match=r"'arcface/w'"):
        load_checkpoint(tmp_path / "bad_enc.pt")
    # a training checkpoint: the weights used (EMA by default) are checked before anything is built
    sd = {f"head.{k}": v for k, v in m.state_dict().items()}
    ema = dict(sd)
    _poison(ema, "head.net.init_conv.bias")
    torch.save({"model": sd, "ema": ema, "config": {}, "kind": "idgen", "step": 3}, tmp_path / "t.pt")
    for load in (lambda: ofer.models.load_trained_model(tmp_path / "t.pt", "idgen"),
                 lambda: ofer.models.load_model(tmp_path / "t.pt"), lambda: load_checkpoint(tmp_path / "t.pt")):
        with pytest.raises(CheckpointError, match=r"'ema/head\.net\.init_conv\.bias' holds NaN"):
            load()


@pytest.mark.parametrize("value", ["python ints", "int tensors", "strings", "scalars"])
def test_var_sched_of_other_types_is_a_clean_error(tmp_path, capsys, value):
    path = tmp_path / "in.tar"
    ckpt = official_denoiser_file(path)
    sched = ckpt["var_sched"]
    ckpt["var_sched"] = {k: {"python ints": 0, "int tensors": v.round().long(), "strings": "x",
                             "scalars": v.double().mean()}[value] for k, v in sched.items()}
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="'var_sched' is not the linear") as excinfo:
        import_official(path, "expgen", qkv="unet")
    assert "\n" not in str(excinfo.value)
    assert main(["--kind", "expgen", "--qkv", "unet", str(path), str(tmp_path / "o.pt")]) == 1
    assert "var_sched" in capsys.readouterr().err


def test_var_sched_equal_in_value_is_accepted(tmp_path):
    path = tmp_path / "in.tar"
    ckpt = official_denoiser_file(path)
    ckpt["var_sched"] = {k: v.double().tolist() for k, v in ckpt["var_sched"].items()}  # plain lists
    torch.save(ckpt, path)
    assert "17 buffers match" in import_official(path, "expgen", qkv="unet").report.schedule


def test_cli_output_under_a_file_is_a_clean_error(tmp_path, capsys):
    official_denoiser_file(tmp_path / "in.tar")
    (tmp_path / "file").write_text("x")
    assert main(["--kind", "expgen", "--qkv", "unet", str(tmp_path / "in.tar"),
                 str(tmp_path / "file" / "out.pt")]) == 1
    assert "cannot write" in capsys.readouterr().err
