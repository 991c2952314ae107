"""Benchmark what the spread outputs, the preview and the exports cost per image.

Prints figures; asserts nothing about time. Usage::

    PYTHONPATH=src python benchmarks/bench_outputs.py [--vertices 5023] [--threads 1] [--repeats 3]

On a synthetic FLAME-format head with N = M = 100 hypotheses:

1. FLAME of the M expression meshes, the three per-vertex spreads and the far-apart choice
   (what the reconstructor does on top of decoding the first ``save_expressions``);
2. ``write_image_outputs`` without the preview, with it, and with the three exports.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_core import best_time  # noqa: E402 (a sibling script: run from the repository root)
from ofer.flame import FLAME
from ofer.sample.config import SampleConfig
from ofer.sample.reconstructor import ImageResult
from ofer.sample.runner import write_image_outputs
from ofer.uncertainty import select_far_apart, summarize, vertex_spread
from ofer.world.head import write_synthetic_flame


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vertices", type=int, default=5023)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_outputs_"))
    paths = write_synthetic_flame(tmp / "flame", n_vertices=args.vertices, seed=0)
    flame = FLAME(paths.model, paths.landmarks, n_exp=100).eval()
    g = torch.Generator().manual_seed(0)
    shapes = torch.randn(100, 300, generator=g) * 0.5
    exps = torch.randn(100, 100, generator=g) * 0.5
    jaw = torch.zeros(100, 3)
    with torch.no_grad():
        ident = flame(shape_coeffs=shapes)

        def decode():
            return flame(shape_coeffs=shapes[:1].expand(100, -1), exp_coeffs=exps, jaw_pose=jaw).vertices

        t_decode = best_time(decode, args.repeats)
        ev = decode()

    def spreads():
        vertex_spread(ident.vertices)
        vertex_spread(ident.vertices[:10])
        vertex_spread(ev)
        select_far_apart(ev, 4)

    t_spread = best_time(spreads, args.repeats)
    isp, esp = vertex_spread(ident.vertices) * 1000, vertex_spread(ev) * 1000
    chosen = select_far_apart(ev, 4)
    res = ImageResult(
        shape_coeffs=shapes, scores=torch.randn(100, generator=g), ranked_index=0,
        identity_vertices=ident.vertices[0], worst_vertices=ident.vertices[1], landmarks68=ident.landmarks68[0],
        landmarks7=ident.landmarks7[0], exp_coeffs=exps, jaw_pose=jaw, expression_vertices=ev[:15],
        identity_spread=isp, topk_spread=isp, expression_spread=esp, top_k=10, chosen_index=chosen,
        chosen_vertices=ev[chosen], expression_mean=ev.mean(0),
        uncertainty={"n_identities": 100, "n_expressions": 100, "identity": summarize(isp.numpy()),
                     "identity_top_k": summarize(isp.numpy()), "expression": summarize(esp.numpy())})
    faces = flame.faces.numpy()
    crop = np.zeros((224, 224, 3), np.uint8)
    print(f"{args.vertices} vertices, N = M = 100, {args.threads} thread(s), best of {args.repeats}")
    print(f"  FLAME of the M expressions: {t_decode:.3f} s; spreads + far-apart choice: {t_spread:.3f} s")
    for label, cfg in (("outputs, no preview", SampleConfig(preview=False)),
                       ("outputs + preview", SampleConfig()),
                       ("outputs + preview + exports", SampleConfig(export=["flame", "blender", "glb"]))):
        t = best_time(lambda: write_image_outputs(tmp / "out", res, faces, cfg, crop,
                                                {"image": "x", "image_index": 1}), args.repeats)
        print(f"  {label}: {t:.3f} s")


if __name__ == "__main__":
    main()
