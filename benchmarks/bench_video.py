"""Clip speed: frames per second of the clip pipeline (one identity, M expressions per frame,
the dynamic-programming path), released architectures with random weights.

Frames are synthetic 256 px images with fixed keypoints (no detector, no writing): the
figure is the reconstruction's, batched over frames as images are; the head pose fit that
follows it in a clip run is timed on its own.

    python benchmarks/bench_video.py [--frames 16] [--batch 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_pipeline import build  # noqa: E402
from ofer.config import load_config  # noqa: E402
from ofer.sample import SampleConfig  # noqa: E402
from ofer.sample.reconstructor import STAGES  # noqa: E402
from ofer.sample.video import clip_global_pose, reconstruct_clip  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--identity-frames", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(SampleConfig, None, ["preset=fast", f"batch_size={args.batch}",
                                           f"video.identity_frames={args.identity_frames}"])
    with tempfile.TemporaryDirectory() as tmp:
        rec = build(device, cfg, Path(tmp) / "flame")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (256, 256, 3), dtype=np.uint8) for _ in range(args.frames)]
    kps = np.array([[88, 104], [168, 104], [128, 148], [96, 192], [160, 192]], float)
    kps = np.repeat(kps[None], args.frames, 0) + rng.normal(0, 1, (args.frames, 5, 2))
    timer = {s: 0.0 for s in STAGES}
    reconstruct_clip(rec, frames[:2], kps[:2], cfg, "warmup", {s: 0.0 for s in STAGES})
    t0 = time.perf_counter()
    res = reconstruct_clip(rec, frames, kps, cfg, "clip", timer)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    clip_global_pose(rec.flame_id, res["vertices"], kps, cfg.video.smooth_sigma, log=lambda *a: None)
    pose_s = time.perf_counter() - t0
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in timer.items() if v)
    print(f"{args.frames} frames, batch {args.batch}, N = M = 100, {args.identity_frames} identity frames, "
          f"{device}, {torch.get_num_threads()} threads: {wall:.1f} s = {args.frames / wall:.2f} frames/s ({stages}); "
          f"then the head pose fit {pose_s:.2f} s")


if __name__ == "__main__":
    main()
