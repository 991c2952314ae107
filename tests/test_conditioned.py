"""Training and sampling build the same condition from the same image, for every kind.

One face image (and its keypoints) goes down both roads: the sampling road (the face
preparation of ``sample.py`` and the reconstructor's encoder pass) and the training road (the
crop files of a dataset, a ``FaceDataset`` batch, ``ConditionedModel.condition_of_batch``). The
crop files are written losslessly here, so the two conditions must agree to float precision,
with full-size (224 px) FaRL inputs and with the demo's small encoders (ArcFace averaged down
to 64 px, FaRL resized to 32 px).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ofer.config import load_config
from ofer.data.datasets import FaceDataset, load_index
from ofer.data.images import prepare_face_array
from ofer.flame import FLAME
from ofer.models import SPECS, ConditionedModel, build_model
from ofer.nets import FaRLEncoder, IResNet
from ofer.sample import Reconstructor, SampleConfig
from ofer.train.loop import flatten_views

from _train_helpers import write_world

DEMO = Path(__file__).resolve().parents[1] / "src" / "ofer" / "world" / "configs"  # the demo's configs


@pytest.fixture(scope="module")
def face_and_world(tmp_path_factory):
    """A textured image with a face-like layout of keypoints, and a one-image dataset of its crops."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:300, 0:260]
    img = np.stack([np.sin(xx / 9.0 + c) * np.cos(yy / 13.0 - c) for c in range(3)], -1)
    img = np.clip(127 + 90 * img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
    kps = np.array([[100.0, 120.0], [160.0, 118.0], [131.0, 152.0], [108.0, 185.0], [155.0, 184.0]])
    face = prepare_face_array(img, kps=kps, channel_order="rgb", name="face", source_hint="sidecar")
    root = tmp_path_factory.mktemp("world")
    write_world(root, "TOY_TRAIN", n_actors=1, n_images=1, expression=True)
    crop = root / "TOY" / "arcface_input" / "A00" / "img0.jpg"
    Image.fromarray(face.farl_crop).save(crop, format="PNG")  # lossless, under the index's file name
    np.save(crop.with_suffix(".npy"), face.arcface.astype(np.float32))
    return face, load_index(root, ["TOY_TRAIN"])


def _tiny(cfg, farl_size):
    """The config with encoders small enough for a test (the demo's sizes are kept as they are)."""
    cfg.arcface.layers, cfg.arcface.width, cfg.arcface.weights = [1, 1, 1, 1], 8, None
    if hasattr(cfg, "farl"):
        cfg.farl.width, cfg.farl.layers, cfg.farl.heads, cfg.farl.weights = 64, 1, 1, None
        if farl_size is not None:
            cfg.farl.image_size, cfg.farl.patch_size = farl_size, 16
    if hasattr(cfg, "diffusion"):
        cfg.diffusion.normalize = False
    return cfg


def _models(farl_size):
    torch.manual_seed(0)
    out = {}
    for kind in ("idgen", "idrank", "expgen"):
        cfg = _tiny(load_config(SPECS[kind].train_schema, DEMO / f"{kind}.yaml"), farl_size)
        out[kind] = (build_model(kind, cfg, load_weights=False, num_vertices=10).eval(), cfg)
    return out


@pytest.mark.parametrize("farl_size", [224, None], ids=["farl224", "demo-encoders"])
def test_training_and_sampling_conditions_agree(face_and_world, synthetic_flame_paths, farl_size):
    face, entries = face_and_world
    models = _models(farl_size)
    if farl_size is None:  # the demo's own encoder sizes
        assert models["expgen"][0].farl.image_size == 32 and models["idgen"][0].arcface.input_size == 64
    flame = FLAME(synthetic_flame_paths.model, synthetic_flame_paths.landmarks, n_exp=0)
    flame_e = FLAME(synthetic_flame_paths.model, None, n_exp=models["expgen"][0].head.n_exp)
    cfg = SampleConfig(channel_order="rgb")
    rec = Reconstructor(models["idgen"][0], models["idrank"][0], models["expgen"][0], flame, flame_e, cfg,
                        torch.device("cpu"))
    timer = {"encoders": 0.0}
    with torch.no_grad():
        sampled = rec.encode(torch.from_numpy(face.arcface)[None],
                              torch.from_numpy(face.farl_crop).permute(2, 0, 1)[None], timer)
        for kind, (model, tcfg) in models.items():
            spec = SPECS[kind]
            ds = FaceDataset(entries, images_per_actor=1, mode=spec.data_mode, load_farl=spec.uses_farl)
            batch = flatten_views(torch.utils.data.default_collate([ds[0]]))
            trained = model.condition_of_batch(batch)
            width = spec.cond_dim(tcfg.farl.embed_dim if spec.uses_farl else 0)
            assert trained.shape == sampled[kind].shape == (1, width)
            torch.testing.assert_close(trained, sampled[kind], rtol=1e-5, atol=1e-6)


def test_condition_layout_follows_the_spec():
    torch.manual_seed(1)
    arc = IResNet(layers=(1, 1, 1, 1), width=8)
    farl = FaRLEncoder(image_size=32, patch_size=16, width=64, layers=1, heads=1)
    from ofer.models import ExpGen, IdGen

    gen = ConditionedModel(ExpGen(cond_dim=1024), arc, farl).eval()
    x, rgb = torch.randn(2, 3, 112, 112), torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        c = gen.condition(x, rgb)
        a = torch.nn.functional.normalize(arc(x), dim=-1)
        f = farl(farl.prepare(rgb))
    torch.testing.assert_close(c, torch.cat([f, a], -1))  # FaRL first, then the unit ArcFace
    with pytest.raises(ValueError, match="needs a FaRL encoder"):
        ConditionedModel(ExpGen(), arc)
    with pytest.raises(ValueError, match="has no FaRL encoder"):
        ConditionedModel(IdGen(), arc, farl)
    with pytest.raises(ValueError, match="needs the FaRL face crops"):
        gen.condition(x)
