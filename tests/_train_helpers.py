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
# Stand-in heads with the ofer.models interfaces, and a linear stand-in FLAME
# ----------------------------------------------------------------------------------------
class StandInGen(nn.Module):
    """IdGen/ExpGen interface: eps-prediction L1 loss on a linear schedule; DDIM-like sampler."""

    def __init__(self, dim: int, cond_dim: int, num_steps: int = 1000):
        super().__init__()
        self.dim, self.num_steps = dim, num_steps
        self.net = nn.Sequential(nn.Linear(dim + cond_dim + 1, 64), nn.SiLU(), nn.Linear(64, dim))
        betas = torch.linspace(1e-4, 1e-2, num_steps)
        self.register_buffer("abar", torch.cumprod(1 - betas, 0), persistent=False)

    def eps(self, x, t, cond):
        return self.net(torch.cat([x, cond, t[:, None].float() / self.num_steps], 1))

    def training_loss(self, x0, cond, generator=None):
        t = torch.randint(0, self.num_steps, (len(x0),), generator=generator, device=x0.device)
        e = torch.randn(x0.shape, generator=generator, device=x0.device)
        a = self.abar[t][:, None]
        per = (self.eps(a.sqrt() * x0 + (1 - a).sqrt() * e, t, cond) - e).abs().mean(1)
        return per.mean(), {"loss": per.detach(), "t": t}

    def sample(self, cond, n, method="ddim", steps=10, generator=None):
        B = len(cond)
        c = cond.repeat_interleave(n, 0)
        x = torch.randn(B * n, self.dim, generator=generator, device=cond.device)
        ts = torch.linspace(self.num_steps - 1, 0, steps).long()
        for i, t in enumerate(ts):
            tt = torch.full((B * n,), int(t), device=cond.device)
            a = self.abar[t]
            e = self.eps(x, tt, c)
            x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
            a2 = self.abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
            x = a2.sqrt() * x0 + (1 - a2).sqrt() * e
        return x.view(B, n, self.dim)


class StandInRank(nn.Module):
    """IdRank interface: features [mean | residual], a linear scorer, ListNet loss."""

    def __init__(self, in_dim: int, cond_dim: int):
        super().__init__()
        self.score = nn.Linear(in_dim, 1)
        self.film = nn.Linear(cond_dim, 1)

    def features(self, vertices):
        m = vertices.mean(1, keepdim=True).expand_as(vertices)
        return torch.cat([m, vertices - m], 2).flatten(2) * 1000.0

    def forward(self, features, cond):
        return self.score(features)[..., 0] + self.film(cond)

    def training_loss(self, scores, vertices, gt_vertices):
        err = (vertices - gt_vertices[:, None]).abs().mean((2, 3)) * 1000.0
        p = torch.softmax(-err, 1)
        return -(p * torch.log_softmax(scores, 1)).sum(1).mean()


class StandInFlame:
    """Linear FLAME-like model: V vertices, 300 shape and 100 expression directions, jaw on half."""

    def __init__(self, v: int = 40, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.template = torch.randn(v, 3, generator=g) * 0.1
        self.shapedirs = torch.randn(v, 3, 300, generator=g) * 1e-3
        self.expdirs = torch.randn(v, 3, 100, generator=g) * 1e-3
        self.faces = torch.tensor([[i, i + 1, i + 2] for i in range(v - 2)]).numpy()

    def __call__(self, shape_coeffs, exp_coeffs=None, jaw_pose=None):
        dev = shape_coeffs.device
        v = self.template.to(dev) + torch.einsum("vcs,bs->bvc", self.shapedirs.to(dev), shape_coeffs)
        if exp_coeffs is not None:
            v = v + torch.einsum("vce,be->bvc", self.expdirs.to(dev), exp_coeffs)
        if jaw_pose is not None:
            h = v.shape[1] // 2
            v = torch.cat([v[:, :h], v[:, h:] + 0.01 * jaw_pose[:, None]], 1)
        return v


def stand_in_builders(monkeypatch):
    """Patch ofer.train.build to use the stand-in heads and FLAME."""
    from ofer.train import build

    def head(kind, cfg, in_dim=None):
        if kind == "idgen":
            return StandInGen(cfg.n_shape, 512, cfg.diffusion.num_steps)
        if kind == "expgen":
            return StandInGen(cfg.n_exp + 3, 512 + cfg.farl.embed_dim, cfg.diffusion.num_steps)
        return StandInRank(in_dim, 512 + cfg.farl.embed_dim)

    flame = StandInFlame()
    monkeypatch.setattr(build, "build_head", head)
    monkeypatch.setattr(build, "build_flame", lambda cfg: (flame, flame.faces))
    return flame
