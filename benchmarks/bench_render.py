"""CPU renderer and synthetic-world timings (prints figures; asserts nothing about time).

    python benchmarks/bench_render.py [--size 512] [--vertices 5023] [--repeats 5] [--world]

Renders the synthetic FLAME-format head (about 5k vertices / 10k faces, as FLAME) at
``--size`` and reports the median wall time per frame for 1 and 2 torch threads, plus the
batched rate at 256x256. ``--world`` also times a small world build (40 identities x 8 images
+ expressions + 20 test images).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ofer.flame import FLAME  # noqa: E402
from ofer.world.head import write_synthetic_flame  # noqa: E402
from ofer.render import Camera, render, render_mesh_preview  # noqa: E402


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--vertices", type=int, default=5023)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--world", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_synthetic_flame(Path(tmp) / "flame", n_vertices=args.vertices)
        flame = FLAME(paths.model, paths.landmarks)
        with torch.no_grad():
            v = flame(shape_coeffs=torch.randn(8, 20, generator=torch.Generator().manual_seed(0))).vertices
        faces = flame.faces
        print(f"mesh: {v.shape[1]} vertices, {faces.shape[0]} faces; torch {torch.__version__}")
        threads0 = torch.get_num_threads()
        for threads in (1, 2):
            torch.set_num_threads(threads)
            cam = Camera.framing((0, 0, 0.015), 0.22, args.size, fov_deg=14, fill=0.8)
            t = _median_time(lambda: render(v[0], faces, cam), args.repeats)
            print(f"render {args.size}x{args.size}, 1 mesh, {threads} thread(s): {t * 1000:.1f} ms/frame")
            cam256 = Camera.framing((0, 0, 0.015), 0.22, 256, fov_deg=14, fill=0.8)
            t = _median_time(lambda: render(v, faces, cam256), args.repeats)
            print(f"render 256x256, batch of 8, {threads} thread(s): {t * 1000 / 8:.1f} ms/frame")
            t = _median_time(lambda: render_mesh_preview(v[0], faces, 256), args.repeats)
            print(f"render_mesh_preview 256 (2x supersampled), {threads} thread(s): {t * 1000:.1f} ms")
        torch.set_num_threads(threads0)

        if args.world:
            from ofer.world.build import WorldConfig, build_world

            cfg = WorldConfig(identities=40, images_per_identity=8, expression_frames=2, images_per_frame=2,
                              test_identities=20, vertices=args.vertices)
            n = 40 * 8 + 40 * 2 * 2 + 20
            for workers in (1, None):
                out = Path(tmp) / f"world{workers}"
                t = time.perf_counter()
                build_world(out, cfg, workers=workers)
                dt = time.perf_counter() - t
                print(f"world 40x8 + 80 frames x2 + 20 test ({n} images, with crops), workers={workers or 'auto'}: "
                      f"{dt:.1f} s ({dt / n * 1000:.0f} ms/image)")


if __name__ == "__main__":
    main()
