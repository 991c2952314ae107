"""End-to-end sampling speed: images per second and seconds per stage.

Builds the released architectures with random weights (ArcFace r100 x3 and FaRL ViT-B/16 x2,
as the three released checkpoints each carry their own encoders; IdGen 300-d, ExpGen 53-d,
IdRank on 1785 vertices) and a synthetic FLAME-format head of 5023 vertices, then times
``Reconstructor.reconstruct`` plus writing for the fast and faithful presets.

    python benchmarks/bench_pipeline.py [--presets fast,faithful] [--batches 1,16] [--images 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ofer.config import load_config  # noqa: E402
from ofer.flame import FLAME  # noqa: E402
from ofer.world.head import write_synthetic_flame  # noqa: E402
from ofer.models import ExpGen, IdGen, IdRank  # noqa: E402
from ofer.nets import FaRLEncoder, IResNet  # noqa: E402
from ofer.sample.reconstructor import STAGES, Reconstructor  # noqa: E402
from ofer.sample import SampleConfig  # noqa: E402
from ofer.sample.runner import write_image_outputs  # noqa: E402
from ofer.models import ConditionedModel  # noqa: E402


def build(device, cfg, flame_dir):
    torch.manual_seed(0)
    paths = write_synthetic_flame(flame_dir, n_vertices=5023)
    front = np.arange(0, 5002, 5002 // 1785)[:1785]
    idgen = ConditionedModel(IdGen(), IResNet())
    expgen = ConditionedModel(ExpGen(), IResNet(), FaRLEncoder())
    idrank = ConditionedModel(IdRank(vertex_indices=front), IResNet(), FaRLEncoder())
    flame_id = FLAME(paths.model, paths.landmarks, n_exp=0)
    flame_exp = FLAME(paths.model, None, n_exp=50)
    mods = [m.to(device).eval() for m in (idgen, idrank, expgen, flame_id, flame_exp)]
    if cfg.batch1_quirk:
        mods[1].arcface.skip_bn1d_for_batch1 = True
    return Reconstructor(*mods[:3], *mods[3:], cfg=cfg, device=device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="fast,faithful")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--images", type=int, default=16, help="images per measurement (>= batch)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for preset in args.presets.split(","):
            cfg = load_config(SampleConfig, None, [f"preset={preset}", "progress=false"])
            rec = build(device, cfg, Path(tmp) / "flame")
            faces = rec.flame_id.faces.cpu().numpy()
            crop = np.zeros((224, 224, 3), np.uint8)
            for bs in map(int, args.batches.split(",")):
                n_img = max(bs, args.images if preset == "fast" else bs)
                timer = {s: 0.0 for s in STAGES}
                # warm-up on one image, written too (allocations, lazily built caches)
                warm = rec.reconstruct(torch.zeros(1, 3, 112, 112), torch.zeros(1, 3, 224, 224), [0],
                                       {s: 0.0 for s in STAGES})
                write_image_outputs(Path(tmp) / "warm-up", warm[0], faces, cfg, crop, {"image_index": 0})
                t0 = time.perf_counter()
                done = 0
                while done < n_img:
                    b = min(bs, n_img - done)
                    g = torch.Generator().manual_seed(done)
                    arc = torch.rand(b, 3, 112, 112, generator=g) * 2 - 1
                    farl = torch.randn(b, 3, 224, 224, generator=g)
                    results = rec.reconstruct(arc, farl, list(range(done, done + b)), timer)
                    for i, res in enumerate(results):
                        tw = time.perf_counter()
                        write_image_outputs(Path(tmp) / "out" / f"{done + i}", res, faces, cfg, crop,
                                            {"image_index": done + i})
                        timer["writing"] += time.perf_counter() - tw
                    done += b
                total = time.perf_counter() - t0
                per = {k: v / n_img for k, v in timer.items() if k != "prepare"}
                rows.append((preset, bs, n_img, total / n_img, per))
                stages = "  ".join(f"{k} {v:.3f}" for k, v in per.items())
                print(f"{preset:9s} batch {bs:3d}: {total / n_img:7.3f} s/image ({n_img / total:6.3f} img/s)  "
                      f"per image: {stages}", flush=True)
        by = {(p, b): s for p, b, _, s, _ in rows}
        for b in map(int, args.batches.split(",")):
            if ("fast", b) in by and ("faithful", b) in by:
                print(f"batch {b}: fast preset is {by[('faithful', b)] / by[('fast', b)]:.1f}x the faithful preset")


if __name__ == "__main__":
    main()
