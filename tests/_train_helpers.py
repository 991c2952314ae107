"""Synthetic stand-ins shared by the training tests: a tiny MICA/OFER-layout world on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_world(root: Path, name: str = "TOY_TRAIN", n_actors: int = 6, n_images: int = 3,
                layout: str = "mica", seed: int = 0, expression: bool = False) -> dict:
    """Write ``n_actors`` actors with ``n_images`` crops each; return {actor: params dict}."""
    rng = np.random.default_rng(seed)
    base = name.split("_TRAIN")[0].split("_VAL")[0]
    table, truth = {}, {}
    for a in range(n_actors):
        actor = f"A{a:02d}"
        rels = []
        for i in range(n_images):
            rel = f"{actor}/img{i}.jpg"
            img_path = root / base / "arcface_input" / rel
            img_path.parent.mkdir(parents=True, exist_ok=True)
            pix = rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
            Image.fromarray(pix).save(img_path, quality=95)
            blob = ((pix[::2, ::2].astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)
            np.save(img_path.with_suffix(".npy"), np.ascontiguousarray(blob))
            rels.append(rel)
        shape = rng.standard_normal(300).astype(np.float32)
        exp = rng.standard_normal(100).astype(np.float32)
        pose = rng.standard_normal(15).astype(np.float32) * 0.1
        if layout == "mica":
            prel = f"{actor}/{actor}.npz"
            ppath = root / base / "FLAME_parameters" / prel
            ppath.parent.mkdir(parents=True, exist_ok=True)
            np.savez(ppath, betas=np.concatenate([shape, exp]), pose=pose)
            table[actor] = (rels, prel)
            truth[actor] = dict(shape=shape, exp=exp, jaw=pose[6:9])
        else:
            prel = f"{actor}/fit.npz"
            ppath = root / base / "FLAME23_parameters" / prel
            ppath.parent.mkdir(parents=True, exist_ok=True)
            np.savez(ppath, shape=shape, exp=exp[:50], pose=pose)
            table[actor] = [prel, rels]
            truth[actor] = dict(shape=shape, exp=exp[:50], jaw=pose[3:6])
    lst = root / "image_paths" / ("arcface23" if layout == "ofer23" else "") / f"{name}.npy"
    lst.parent.mkdir(parents=True, exist_ok=True)
    np.save(lst, table, allow_pickle=True)
    return truth


def write_flame(root: Path, n_vertices: int = 400) -> Path:
    """Synthetic FLAME-format assets in ``root/flame`` (generic_model.pkl, landmark_embedding.npy,
    FLAME_masks.pkl); returns the folder."""
    from ofer.world.head import write_synthetic_flame

    write_synthetic_flame(root / "flame", n_vertices=n_vertices, seed=0)
    return root / "flame"


# ----------------------------------------------------------------------------------------
# Stand-in model / task / data for the loop tests (no dependency on the real networks)
# ----------------------------------------------------------------------------------------
import torch  # noqa: E402
from torch import nn  # noqa: E402

from ofer.config import IdGenTrainConfig, load_config  # noqa: E402
from ofer.train.loop import TrainTask, flatten_views  # noqa: E402


class ToyData(torch.utils.data.Dataset):
    """Items like FaceDataset's: K views of a tiny 'image' and a 6-d target."""

    def __init__(self, n: int = 12, k: int = 2, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 4, 3, 6, 6, generator=g)
        self.targets = torch.randn(n, 6, generator=g)
        self.k = k

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, key):
        import numpy as np

        if isinstance(key, tuple):
            idx, seed = key
            pick = np.random.default_rng(seed).choice(4, self.k, replace=False)
        else:
            idx, pick = key, np.arange(self.k)
        return {"arcface": self.images[idx, torch.as_tensor(pick)],
                "shape_coeffs": self.targets[idx].expand(self.k, 6).clone(),
                "index": torch.tensor(idx)}


class ToyModel(nn.Module):
    def __init__(self, bn: bool = True):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4) if bn else nn.Identity(), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.generator = nn.Sequential(nn.Linear(6 + 4 + 1, 32), nn.SiLU(), nn.Linear(32, 6))


class ToyTask(TrainTask):
    """A miniature epsilon-prediction diffusion loss; ``noise=False`` makes it deterministic."""

    kind = "idgen"
    ema_prefixes = ["generator."]
    num_steps = 10
    metric_name = "val/err"

    def __init__(self, noise: bool = True, nan_at: int | None = None, bn: bool = True):
        self.model = ToyModel(bn=bn)
        self.noise = noise
        self.nan_at = nan_at
        self.calls = 0

    def param_groups(self):
        m = self.model
        return [{"name": "encoder", "params": list(m.encoder.parameters()) + list(m.frozen.parameters()),
                 "lr": 1e-3},
                {"name": "diffusion", "params": list(m.generator.parameters()), "lr": 1e-2}]

    def loss(self, model, batch, generator):
        b = flatten_views(batch)
        cond = model.encoder(b["arcface"])
        x0 = b["shape_coeffs"]
        n = x0.shape[0]
        dev = x0.device
        if self.noise:
            t = torch.randint(0, self.num_steps, (n,), generator=generator, device=dev)
            eps = torch.randn(x0.shape, generator=generator, device=dev)
        else:
            # a function of the example (actor, view), not of its place in the local batch
            k = batch["arcface"].shape[1]
            ex = b["index"] * k + torch.arange(n, device=dev) % k
            t = ex % self.num_steps
            eps = torch.sin(ex[:, None].float() * 6 + torch.arange(6, device=dev)[None])
        a = 1 - (t.float() + 1) / (self.num_steps + 1)
        xt = a.sqrt()[:, None] * x0 + (1 - a).sqrt()[:, None] * eps
        pred = model.generator(torch.cat([xt, cond, t[:, None].float() / self.num_steps], 1))
        per = (pred - eps).abs().mean(1)
        self.calls += 1
        loss = per.mean()
        if self.nan_at is not None and self.calls >= self.nan_at:
            loss = loss * float("nan")
        return loss, {"loss": per.detach(), "t": t}

    def validate(self, model, dataset, generator):
        items = [dataset[i] for i in range(len(dataset))]
        b = flatten_views(torch.utils.data.default_collate(items))
        cond = model.encoder(b["arcface"])
        z = torch.zeros_like(b["shape_coeffs"])
        pred = model.generator(torch.cat([z, cond, torch.zeros(len(z), 1)], 1))
        return {"val/err": float((pred - b["shape_coeffs"]).abs().mean())}


def toy_config(run_dir, **over) -> IdGenTrainConfig:
    items = {"run_dir": str(run_dir), "data.actors_per_batch": 4, "data.num_workers": 0,
             "train.max_steps": 8, "train.log_every": 1, "train.val_every": 0,
             "train.ckpt_every": 2, "train.sample_every": 0, "train.progress": False,
             "train.tensorboard": False, "train.device": "cpu", "ema.decay": 0.9}
    items.update(over)
    return load_config(IdGenTrainConfig, None, [f"{k}={v}" for k, v in items.items()])


# ----------------------------------------------------------------------------------------
# One intra-op thread for the training tests: these models are tiny, and on a shared 2-core
# machine two spinning OpenMP threads make a step up to 10x slower than one.
# ----------------------------------------------------------------------------------------
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
