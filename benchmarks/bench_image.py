"""Image-side throughput on CPU: ArcFace r100, FaRL ViT-B/16, and face preparation.

Prints figures only (no assertions). Usage::

    PYTHONPATH=src python benchmarks/bench_image.py [--threads N] [--batches 1,8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    from PIL import Image

    from ofer.data.align import ARCFACE_TEMPLATE
    from ofer.data.images import prepare_face
    from ofer.nets import FaRLEncoder, IResNet

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    nets = {"arcface_r100 (112x112)": (IResNet().eval(), 112), "farl_vitb16 (224x224)": (FaRLEncoder().eval(), 224)}
    for name, (net, side) in nets.items():
        for b in (int(v) for v in args.batches.split(",")):
            x = torch.zeros(b, 3, side, side)
            with torch.inference_mode():
                dt = _time(lambda: net(x), args.repeats)
            print(f"{name:24s} batch {b:3d}: {dt * 1000:8.1f} ms/batch  {b / dt:7.1f} img/s")

    with tempfile.TemporaryDirectory() as tmp:
        for w, h in ((640, 480), (6000, 4000)):
            rng = np.random.default_rng(0)
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            p = Path(tmp) / f"img_{w}.jpg"
            Image.fromarray(img).save(p, quality=90)
            s = min(w, h) / 300.0
            kps = ARCFACE_TEMPLATE * s + [w / 2 - 56 * s, h / 2 - 60 * s]
            p.with_suffix(".kps.txt").write_text("".join(f"{x} {y}\n" for x, y in kps))
            dt = _time(lambda: prepare_face(p), args.repeats)
            print(f"prepare_face {w}x{h} JPEG (sidecar, decode + 2 crops): {dt * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
