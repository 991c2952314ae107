"""ArcFace IResNet: published key layout, golden outputs, freezing, quirks and loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _image_seeded import seeded_fill_, seeded_input
from ofer.errors import CheckpointError
from ofer.nets import IResNet
from ofer.nets.arcface import ARCH_LAYERS, iresnet, l2_normalize, load_arcface_state_dict

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDEN / "arcface_seeded_outputs.npz"))


@pytest.fixture(scope="module")
def r100():
    torch.manual_seed(0)
    m = IResNet().eval()
    seeded_fill_(m, 7)
    return m


def test_r100_keys_and_shapes_match_insightface(r100):
    ref = json.loads((GOLDEN / "arcface_r100_keys.json").read_text())
    ours = {k: list(v.shape) for k, v in r100.state_dict().items()}
    assert list(ours) == list(ref)  # same names, same order
    assert ours == ref
    assert len(ours) == 925
    n_params = sum(p.numel() for p in r100.parameters())
    assert n_params == 65_156_160
    # 65,225,792 elements with BN running stats, plus one num_batches_tracked per BN (154)
    sd = r100.state_dict()
    assert sum(v.numel() for k, v in sd.items() if "num_batches" not in k) == 65_225_792


def test_r100_golden_output(r100, golden):
    x = seeded_input((1, 3, 112, 112), 12)
    with torch.no_grad():
        y = r100(x)
    assert y.shape == (1, 512)
    np.testing.assert_allclose(y.numpy(), golden["r100_eval_b1"], rtol=1e-4, atol=1e-4)


def test_r100_batch1_quirk_skips_bn1d(r100, golden):
    x = seeded_input((1, 3, 112, 112), 12)
    r100.skip_bn1d_for_batch1 = True
    try:
        with torch.no_grad():
            y = r100(x)
    finally:
        r100.skip_bn1d_for_batch1 = False
    np.testing.assert_allclose(y.numpy(), golden["r100_eval_b1_nobn1d"], rtol=1e-4, atol=1e-4)


def test_r18_golden_output_batch2(golden):
    m = iresnet("r18").eval()
    seeded_fill_(m, 7)
    x = seeded_input((2, 3, 112, 112), 11)
    with torch.no_grad():
        y = m(x)
    np.testing.assert_allclose(y.numpy(), golden["r18_eval_b2"], rtol=1e-4, atol=1e-4)
    # the quirk only acts at batch size 1
    m.skip_bn1d_for_batch1 = True
    with torch.no_grad():
        np.testing.assert_allclose(m(x).numpy(), golden["r18_eval_b2"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["r18", "r34", "r50"])
def test_arch_variants_key_count(arch):
    # stem conv1+bn1+prelu = 7 entries; a block = bn1 5 + conv1 1 + bn2 5 + prelu 1 + conv2 1 + bn3 5 = 18;
    # one downsample (conv 1 + BN 5) per stage; head bn2 5 + fc 2 + features 5 = 12  (r100: 925)
    m = iresnet(arch)
    assert len(m.state_dict()) == 7 + 18 * sum(ARCH_LAYERS[arch]) + 4 * 6 + 12
    assert m.fc.weight.shape == (512, 512 * 7 * 7)


def test_tiny_width_forward():
    m = IResNet(layers=(1, 1, 1, 1), width=8, num_features=32).eval()
    y = m(torch.zeros(3, 3, 112, 112), normalize=True)
    assert y.shape == (3, 32)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match=r"\(B, 3, S, S\) with S >= 112"):
        m(torch.zeros(1, 3, 64, 64))


def _area_average(x: torch.Tensor, out: int) -> torch.Tensor:
    """Naive area resampling: output pixel i averages input rows floor(i*S/out)..ceil((i+1)*S/out)."""
    S = x.shape[-1]
    bins = [(i * S // out, -(-(i + 1) * S // out)) for i in range(out)]
    y = torch.empty(*x.shape[:2], out, out)
    for i, (r0, r1) in enumerate(bins):
        for j, (c0, c1) in enumerate(bins):
            y[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean((-2, -1))
    return y


def test_small_input_size_takes_the_112_crop_area_averaged():
    torch.manual_seed(0)
    m = IResNet(layers=(1, 1, 1, 1), width=8, num_features=16, input_size=64).eval()
    assert m.fc.in_features == 8 * 8 * 4 * 4
    crop = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(m(crop), m(_area_average(crop, 64)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="S >= 64"):
        m(torch.zeros(1, 3, 48, 48))
    with pytest.raises(ValueError, match="multiple of 16"):
        IResNet(layers=(1, 1, 1, 1), width=8, input_size=56)


def test_l2_normalize_matches_reference():
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(l2_normalize(x), x / x.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("policy,frozen", [("l2", ["layer1"]), ("l3", ["layer1", "layer2"]),
                                           ("l4", ["layer1", "layer2", "layer3"])])
def test_freeze_policies(policy, frozen):
    m = IResNet(layers=(1, 1, 1, 1), width=8, freeze=policy)
    seeded_fill_(m, 3)
    frozen_names = {"conv1", "bn1", "prelu", *frozen}
    for name, p in m.named_parameters():
        top = name.split(".")[0]
        if top in frozen_names:
            assert not p.requires_grad, name
        elif name != "features.weight":
            assert p.requires_grad, name
    assert not m.features.weight.requires_grad  # fixed to 1 as in insightface

    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items() if "running" in k}
    y = m(seeded_input((4, 3, 112, 112), 5))
    y.sum().backward()
    after = m.state_dict()
    for k, v in before.items():
        top = k.split(".")[0]
        changed = not torch.equal(v, after[k])
        # frozen BatchNorms keep their statistics (documented fix); trainable ones update
        assert changed == (top not in frozen_names), k
    for name, p in m.named_parameters():
        if name.split(".")[0] in frozen_names:
            assert p.grad is None, name
    assert m.layer4[0].conv1.weight.grad is not None


def test_freeze_bn_stats_false_is_original_behaviour():
    m = IResNet(layers=(1, 1, 1, 1), width=8, freeze="l4", freeze_bn_stats=False).train()
    before = m.bn1.running_mean.clone()
    m(seeded_input((2, 3, 112, 112), 5))
    assert not torch.equal(before, m.bn1.running_mean)


def test_frozen_forward_equals_unfrozen_in_eval():
    a = IResNet(layers=(1, 2, 1, 1), width=8).eval()
    seeded_fill_(a, 1)
    b = IResNet(layers=(1, 2, 1, 1), width=8, freeze="l4").eval()
    b.load_state_dict(a.state_dict())
    x = seeded_input((2, 3, 112, 112), 2)
    torch.testing.assert_close(a(x), b(x))


def test_bad_freeze_value():
    with pytest.raises(ValueError, match="freeze"):
        IResNet(layers=(1, 1, 1, 1), width=8, freeze="l5")


def test_load_layouts_and_errors(tmp_path):
    src = IResNet(layers=(1, 1, 1, 1), width=8)
    seeded_fill_(src, 4)
    sd = src.state_dict()
    x = seeded_input((2, 3, 112, 112), 9)
    ref = src.eval()(x)
    ours = {"model": {**{"arcface." + k: v for k, v in sd.items()}, "head.w": torch.zeros(2),
                      "farl.proj": torch.ones(1)}, "step": 5, "kind": "idgen"}
    for layout in (sd, {"arcface": sd, "epoch": 3}, {"state_dict": {"module." + k: v for k, v in sd.items()}},
                   ours):
        path = tmp_path / "w.pth"
        torch.save(layout, path)
        dst = load_arcface_state_dict(IResNet(layers=(1, 1, 1, 1), width=8), path).eval()
        torch.testing.assert_close(dst(x), ref)

    bad = dict(sd)
    bad.pop("fc.bias")
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"1 missing \['fc.bias'\], 1 unexpected \['extra.weight'\]"):
        load_arcface_state_dict(IResNet(layers=(1, 1, 1, 1), width=8), bad)
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_arcface_state_dict(IResNet(layers=(1, 1, 1, 1), width=16), sd)
    with pytest.raises(CheckpointError, match="not found"):
        load_arcface_state_dict(IResNet(layers=(1, 1, 1, 1), width=8), tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="no ArcFace state_dict"):
        load_arcface_state_dict(IResNet(layers=(1, 1, 1, 1), width=8), {"foo": 1})
