#!/usr/bin/env python
"""Training throughput: data loading and compute measured separately.

    PYTHONPATH=src python benchmarks/bench_train.py [--preset demo|paper] [--device cpu|cuda]
        [--steps N] [--models idgen,expgen,idrank]

* data:    items/s of FaceDataset (MICA layout written to a temp dir; K images per actor,
           occlusion p=0.5) through a DataLoader, i.e. the input side of one step.
* compute: optimiser steps/s on a pre-loaded batch (forward + backward + AdamW + EMA),
           with the real encoders (IResNet, FaRL ViT) and the real ``ofer.nets.Denoiser``.
           The heads are the real ``ofer.models.IdGen`` / ``ExpGen`` (eps-prediction L1),
           the optimiser the training loop's fused AdamW.
* idrank:  the dominant cost of an IdRank step, the frozen IdGen drawing N hypotheses
           per image (``--rank-steps`` DDIM steps), reported as images/s.
Prints figures only; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

PRESETS = {  # (arcface layers, width, freeze), farl (width, layers, heads, patch), batch (actors, K)
    "demo": dict(arc=([1, 1, 1, 1], 8, "none"), farl=(64, 2, 2, 32), batch=(8, 2), qkv=2),
    "paper": dict(arc=([3, 13, 30, 3], 64, "l4"), farl=(768, 12, 12, 16), batch=(16, 4), qkv=16),
}


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench_data(actors: int, k: int, farl: bool, steps: int, workers: int) -> float:
    from _train_helpers import write_world
    from ofer.data.datasets import FaceDataset, StreamBatchSampler, load_index

    with tempfile.TemporaryDirectory() as tmp:
        write_world(Path(tmp), "BENCH_TRAIN", n_actors=max(actors, 16), n_images=max(k, 4))
        ds = FaceDataset(load_index(tmp, ["BENCH_TRAIN"]), k, load_farl=farl, occlusion_prob=0.5)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=StreamBatchSampler(len(ds), actors),
                                             num_workers=workers)
        it = iter(loader)
        next(it)
        t0 = time.perf_counter()
        for _ in range(steps):
            next(it)
        dt = time.perf_counter() - t0
        del it
    return steps * actors * k / dt


def bench_compute(kind: str, p: dict, dev: torch.device, steps: int) -> float:
    from ofer.nets.arcface import IResNet
    from ofer.nets.farl import FaRLEncoder
    from ofer.train.ema import EMA
    from ofer.models import ConditionedModel

    torch.manual_seed(0)
    layers, width, freeze = p["arc"]
    arc = IResNet(layers=layers, width=width, freeze=None if freeze == "none" else freeze)
    farl = None
    cond_dim = 512
    if kind == "expgen":
        fw, fl, fh, fp = p["farl"]
        farl = FaRLEncoder(patch_size=fp, width=fw, layers=fl, heads=fh, output_dim=512)
        cond_dim = 1024
    dim = 300 if kind == "idgen" else 53
    dims = [300, 50, 10] if kind == "idgen" else [53, 25, 10]
    from ofer.models import ExpGen, IdGen

    head = (IdGen if kind == "idgen" else ExpGen)(param_dim=dim, cond_dim=cond_dim, dims=dims,
                                                  num_qkv=p["qkv"])
    model = ConditionedModel(head, arc, farl).to(dev)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4,
                            weight_decay=1e-4, foreach=True)
    ema = EMA(model, 0.9999, ["head."])
    n = p["batch"][0] * p["batch"][1]
    x112 = torch.randn(n, 3, 112, 112, device=dev)
    x224 = torch.randn(n, 3, 224, 224, device=dev) if farl is not None else None
    x0 = torch.randn(n, dim, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    bf16 = dev.type == "cuda"

    def step():
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = model.head.training_loss(x0, model.condition(x112, x224).float(), g)
        opt.zero_grad(set_to_none=True)
        loss.float().backward()
        opt.step()
        ema.update(model)

    step()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(dev)
    return steps / (time.perf_counter() - t0)


def bench_rank_sampling(p: dict, dev: torch.device, n: int, ddim_steps: int, images: int) -> float:
    from ofer.diffusion import NoiseSchedule
    from ofer.nets import Denoiser

    torch.manual_seed(0)
    net = Denoiser(300, 512, [300, 50, 10], num_qkv=p["qkv"]).to(dev).eval()
    sched = NoiseSchedule.linear(num_steps=1000, beta_1=1e-4, beta_T=1e-2)
    abar = sched.alphas_cumprod.to(dev)
    cond = torch.randn(images * n, 512, device=dev)
    ts = torch.linspace(999, 0, ddim_steps).long().tolist()
    _sync(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        x = torch.randn(images * n, 300, device=dev)
        for i, t in enumerate(ts):
            e = net(x, torch.full((len(x),), t, device=dev), cond)
            a = abar[t]
            a2 = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, device=dev)
            x = a2.sqrt() * (x - (1 - a).sqrt() * e) / a.sqrt() + (1 - a2).sqrt() * e
    _sync(dev)
    return images / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--models", default="idgen,expgen,idrank")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--rank-samples", type=int, default=100)
    ap.add_argument("--rank-steps", type=int, default=50)
    args = ap.parse_args()
    p = PRESETS[args.preset]
    dev = torch.device(args.device)
    actors, k = p["batch"]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; preset {args.preset}: batch {actors} actors x {k} images; torch {torch.__version__}")
    kinds = args.models.split(",")
    if "idgen" in kinds or "idrank" in kinds:
        r = bench_data(actors, k, False, args.steps, args.workers)
        print(f"data   identity   (ArcFace blob + occlusion): {r:8.1f} images/s  ({r / (actors * k):.2f} batches/s)")
    if "expgen" in kinds:
        r = bench_data(actors, k, True, args.steps, args.workers)
        print(f"data   expression (+ FaRL crop):             {r:8.1f} images/s  ({r / (actors * k):.2f} batches/s)")
    for kind in ("idgen", "expgen"):
        if kind in kinds:
            r = bench_compute(kind, p, dev, args.steps)
            print(f"compute {kind:7s} step (fwd+bwd+AdamW+EMA):     {r:8.3f} steps/s")
    if "idrank" in kinds:
        r = bench_rank_sampling(p, dev, args.rank_samples, args.rank_steps, images=2)
        print(f"compute idrank hypotheses (N={args.rank_samples}, {args.rank_steps} DDIM steps): {r:8.3f} images/s")


if __name__ == "__main__":
    main()
