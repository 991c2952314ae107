"""FaRL (CLIP ViT-B/16 visual tower): key layout, golden outputs vs OpenAI CLIP, loading, preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _image_seeded import seeded_fill_, seeded_input
from ofer.errors import CheckpointError
from ofer.nets import FaRLEncoder
from ofer.nets.farl import CLIP_MEAN, CLIP_STD, clip_normalize, clip_preprocess, load_farl_state_dict

GOLDEN = Path(__file__).parent / "golden"
TINY = dict(image_size=32, patch_size=8, width=64, layers=2, heads=4, output_dim=16)


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDEN / "farl_seeded_outputs.npz"))


def test_vitb16_keys_match_clip_visual():
    ref = json.loads((GOLDEN / "farl_vitb16_keys.json").read_text())
    ours = {"visual." + k: list(v.shape) for k, v in FaRLEncoder().state_dict().items()}
    assert len(ours) == 152
    assert ours == ref


def test_vitb16_golden_output(golden):
    m = FaRLEncoder().eval()
    seeded_fill_(m, 5)
    with torch.no_grad():
        y = m(seeded_input((1, 3, 224, 224), 21))
    assert y.shape == (1, 512)
    np.testing.assert_allclose(y.numpy(), golden["vitb16_b1"], rtol=1e-4, atol=2e-5)


def test_tiny_golden_output_and_batch_independence(golden):
    m = FaRLEncoder(**TINY).eval()
    seeded_fill_(m, 6)
    x = seeded_input((3, 3, 32, 32), 22)
    with torch.no_grad():
        y = m(x)
        y1 = m(x[1:2])
    np.testing.assert_allclose(y.numpy(), golden["tiny_b3"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y1, y[1:2], rtol=1e-5, atol=1e-5)


def test_attention_equals_torch_multihead_attention():
    m = FaRLEncoder(**TINY)
    seeded_fill_(m, 2)
    blk = m.transformer.resblocks[0].attn
    mha = torch.nn.MultiheadAttention(64, 4)
    mha.load_state_dict(blk.state_dict())
    x = seeded_input((2, 5, 64), 3)
    ref = mha(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), need_weights=False)[0].transpose(0, 1)
    torch.testing.assert_close(blk(x), ref, rtol=1e-5, atol=1e-5)


def test_input_shape_error():
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        FaRLEncoder(**TINY)(torch.zeros(1, 3, 224, 224))


def _farl_release_layout(visual_sd):
    sd = {"visual." + k: v.clone() for k, v in visual_sd.items()}
    sd["token_embedding.weight"] = torch.zeros(10, 8)  # text tower keys are ignored
    sd["logit_scale"] = torch.tensor(4.6)
    return sd


def test_load_layouts(tmp_path):
    src = FaRLEncoder(**TINY)
    seeded_fill_(src, 8)
    x = seeded_input((2, 3, 32, 32), 4)
    ref = src.eval()(x)
    full = _farl_release_layout(src.state_dict())
    layouts = {
        "release": {"state_dict": full},
        "ofer_farl_entry": {"farl": full, "arcface": {"fc.weight": torch.zeros(1)}, "epoch": 3},
        "bare": src.state_dict(),
        "ddp": {"module." + k: v for k, v in full.items()},
        "fp16": {"state_dict": {k: v.half() for k, v in full.items()}},
    }
    for name, layout in layouts.items():
        path = tmp_path / f"{name}.pth"
        torch.save(layout, path)
        m = load_farl_state_dict(FaRLEncoder(**TINY), path).eval()
        tol = 2e-2 if name == "fp16" else 0.0
        torch.testing.assert_close(m(x), ref, rtol=tol, atol=tol, msg=name)


def test_load_errors(tmp_path):
    src = FaRLEncoder(**TINY).state_dict()
    bad = {"visual." + k: v for k, v in src.items() if k != "proj"}
    bad["visual.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"1 missing \['proj'\], 1 unexpected \['extra'\]"):
        load_farl_state_dict(FaRLEncoder(**TINY), {"state_dict": bad})
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_farl_state_dict(FaRLEncoder(**{**TINY, "output_dim": 8}), src)
    with pytest.raises(CheckpointError, match="not found"):
        load_farl_state_dict(FaRLEncoder(**TINY), tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read FaRL weights"):
        load_farl_state_dict(FaRLEncoder(**TINY), tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="no FaRL state_dict"):
        load_farl_state_dict(FaRLEncoder(**TINY), {"epoch": 1})


def test_clip_preprocess_constant_image():
    img = Image.new("RGB", (300, 260), (255, 128, 0))
    x = clip_preprocess(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    expect = [(v / 255.0 - m) / s for v, m, s in zip((255, 128, 0), CLIP_MEAN, CLIP_STD)]
    torch.testing.assert_close(x.mean(dim=(1, 2)), torch.tensor(expect), rtol=1e-5, atol=1e-5)


def test_clip_preprocess_crop_offsets_without_resize():
    # short side already 224: no resampling, centre crop offset = round((W - 224) / 2) = 38
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (224, 301, 3), dtype=np.uint8)
    x = clip_preprocess(arr)
    ref = clip_normalize(torch.from_numpy(arr[:, 38:262].copy()).permute(2, 0, 1))
    torch.testing.assert_close(x, ref)
    # grayscale and RGBA PIL images are converted to RGB
    g = clip_preprocess(Image.fromarray(arr[..., 0], "L"))
    torch.testing.assert_close(g[0], ref[0])


def test_clip_preprocess_resize_matches_pil_bicubic():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (448, 600, 3), dtype=np.uint8)
    x = clip_preprocess(arr)
    # short side 448 -> 224, long side int(224 * 600 / 448) = 300, crop left = 38
    small = np.asarray(Image.fromarray(arr).resize((300, 224), Image.Resampling.BICUBIC))
    ref = clip_normalize(torch.from_numpy(small[:, 38:262].copy()).permute(2, 0, 1))
    torch.testing.assert_close(x, ref)
    with pytest.raises(ValueError, match="uint8"):
        clip_preprocess(arr.astype(np.float32))
