"""Benchmark the NoW evaluator on synthetic scans; compare with a trimesh-based distance baseline.

Each scan: ~120k vertices sampled on the front of a FLAME-sized bumpy head (4902 vertices,
9800 faces) under a random similarity, plus 0.3 mm noise; predicted landmarks carry 2 mm noise
so the refinement has work to do. Timed per scan: crop + Procrustes + dogleg refinement +
final distances (scan generation is not timed).

Baseline: ``trimesh.proximity.closest_point`` (needs ``rtree``) for the same cropped scan,
timed for one distance evaluation on a few scans; a full evaluation needs ``fevals + 1``
such evaluations (the refinement's residual evaluations plus the final distances), which
gives the estimated per-scan baseline time.

    PYTHONPATH=src python benchmarks/bench_eval.py [--scans 100] [--points 120000] [--baseline-scans 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from ofer.eval.geometry import MeshDistance
from ofer.eval.now import crop_scan, evaluate_scan
from ofer.world.now_scans import head_landmarks, head_mesh, make_scan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scans", type=int, default=100)
    ap.add_argument("--points", type=int, default=120000)
    ap.add_argument("--baseline-scans", type=int, default=3, help="scans timed with the trimesh baseline (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    rng = np.random.default_rng(a.seed)
    V, F = head_mesh(50, 100)
    lmk = head_landmarks(V, F)
    print(f"mesh: {len(V)} vertices, {len(F)} faces; scans: {a.scans} x {a.points} vertices; "
          f"CPU: {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    times, n_crop, fevals, iters, medians = [], [], [], [], []
    kept = []
    for i in range(a.scans):
        rv = rng.normal(0, 0.15, 3)
        s0 = rng.uniform(0.9, 1.1)
        t0 = rng.normal(0, 20, 3)
        scan, slmk, _ = make_scan(V, F, a.points, rng, s0, rv, t0, noise=0.3)
        pred_lmk = ((lmk + rng.normal(0, 2.0, lmk.shape)) / 1000).astype(np.float32)
        t = time.perf_counter()
        ev = evaluate_scan(scan, slmk, V / 1000, F, pred_lmk)
        times.append(time.perf_counter() - t)
        n_crop.append(ev.distances.size)
        fevals.append(ev.refine.fevals)
        iters.append(ev.refine.iterations)
        medians.append(float(np.median(ev.distances)))
        if i < a.baseline_scans:
            kept.append((scan[ev.crop_ids], ev.aligned_vertices, ev.distances))
    times = np.array(times)
    print(f"ours (libigl AABB + dogleg): {times.mean():.3f} s/scan mean, {np.median(times):.3f} median, "
          f"{times.max():.3f} max; total {times.sum():.1f} s for {a.scans} scans")
    print(f"  cropped scan vertices: {int(np.mean(n_crop))} mean; refinement: {np.mean(iters):.1f} iterations, "
          f"{np.mean(fevals):.1f} distance evaluations mean; median error {np.mean(medians):.4f} mm "
          f"(noise sigma 0.3 -> expected 0.2024)")

    if a.baseline_scans <= 0:
        return
    try:
        import rtree  # noqa: F401
        import trimesh
    except ImportError:
        print("baseline skipped: trimesh.proximity needs the 'rtree' package (pip install rtree)")
        return
    bt, diffs, ours_t = [], [], []
    for pts, Va, d_ours in kept:
        mesh = trimesh.Trimesh(Va, F, process=False)
        t = time.perf_counter()
        _, d_tm, _ = trimesh.proximity.closest_point(mesh, pts)
        bt.append(time.perf_counter() - t)
        t = time.perf_counter()
        MeshDistance(Va, F).query(pts)
        ours_t.append(time.perf_counter() - t)
        diffs.append(float(np.max(np.abs(d_tm - d_ours))))
    per_eval = float(np.mean(bt))
    est = per_eval * (np.mean(fevals) + 1)
    print(f"baseline trimesh.proximity.closest_point (+rtree), timed on {len(kept)} scans: "
          f"{per_eval:.3f} s per distance evaluation vs ours {np.mean(ours_t):.4f} s "
          f"({per_eval / np.mean(ours_t):.0f}x); max |d_trimesh - d_ours| = {max(diffs):.2e} mm")
    print(f"  estimated baseline per scan with the same {np.mean(fevals) + 1:.1f} evaluations: {est:.1f} s "
          f"({est / times.mean():.0f}x slower than ours)")


if __name__ == "__main__":
    main()
