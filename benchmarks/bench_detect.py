"""Face detectors: 5-point error and time per image, on the synthetic world's renders (exact
keypoints) and on two real photographs from registry packages (hand-annotated points).

The world is built with its command line into a temporary folder; its held-out test renders
(``clean``, ``occluded``, ``mouth`` variants) come with ``.kps.txt`` sidecars of the exact
projected keypoints. For each detector that can be built here (the built-in BlazeFace;
SCRFD when its pack is installed) it prints: faces found, mean 5-point error in pixels and
in eye distances (the face nearest the true keypoints), and the detection time per image;
where both run, the mean distance between their points. Prints figures only.

Usage::

    PYTHONPATH=src python benchmarks/bench_detect.py [--test-identities 40] [--size 256]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: the module whose command line builds the synthetic world
WORLD_CLI = "ofer.world"
#: hand annotations (x, y, insightface order) of skimage's astronaut and matplotlib's Grace Hopper
REAL = {
    "astronaut (skimage, 512x512)": [(203.5, 100.5), (246.0, 103.0), (223.5, 126.5), (203.0, 140.0), (244.0, 141.5)],
    "grace_hopper (matplotlib, 512x600)": [(222.5, 188.0), (304.0, 185.0), (267.0, 241.5), (231.5, 280.0),
                                           (304.5, 276.5)],
}


def _build_world(root: Path, ids: int, size: int, seed: int) -> Path:
    cmd = [sys.executable, "-m", WORLD_CLI, "--output", str(root), "--identities", "1", "--images-per-identity", "1",
           "--expression-frames", "0", "--test-identities", str(ids), "--size", str(size), "--seed", str(seed),
           "--no-crops", "--quiet", "--workers", "1"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return root / "test" / "images"


def _detectors() -> dict:
    from ofer.data.detect import build_detector
    from ofer.errors import OferError

    out = {}
    for mode in ("blazeface", "scrfd"):
        t0 = time.perf_counter()
        try:
            det, msg = build_detector(mode)
        except OferError as exc:
            print(f"{mode}: not available here ({exc})")
            continue
        print(f"{mode}: {msg}; built in {time.perf_counter() - t0:.2f} s")
        out[mode] = det
    return out


def _nearest(kpss: np.ndarray, ref: np.ndarray) -> np.ndarray | None:
    if len(kpss) == 0:
        return None
    return kpss[int(np.argmin([np.linalg.norm(k.mean(0) - ref.mean(0)) for k in kpss]))]


def _run(det, image: np.ndarray) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    _, kpss = det.detect(np.ascontiguousarray(image[..., ::-1]))
    return np.asarray(kpss, np.float64).reshape(-1, 5, 2), time.perf_counter() - t0


def main() -> None:
    from PIL import Image

    from ofer.data.images import read_image, read_sidecar_kps

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test-identities", type=int, default=40, help="world test identities (3 renders each)")
    ap.add_argument("--size", type=int, default=256, help="render side in pixels")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    dets = _detectors()
    if not dets:
        return
    for det in dets.values():  # warm-up
        _run(det, np.zeros((64, 64, 3), np.uint8))

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = _build_world(Path(tmp) / "world", args.test_identities, args.size, args.seed)
        files = sorted(p for p in folder.glob("*.png") if not p.name.endswith("_mask.png"))
        print(f"world: {len(files)} test renders of {args.size}x{args.size} px (seed {args.seed}), "
              f"built in {time.perf_counter() - t0:.1f} s with `python -m {WORLD_CLI}`")
        rows: dict = {}
        pts: dict = {}
        for p in files:
            image, ref = read_image(p), read_sidecar_kps(p)
            variant = p.stem.rsplit("_", 1)[-1]
            eye = float(np.linalg.norm(ref[1] - ref[0]))
            for mode, det in dets.items():
                kpss, dt = _run(det, image)
                k = _nearest(kpss, ref)
                r = rows.setdefault((mode, variant), {"n": 0, "found": 0, "px": [], "eye": [], "t": []})
                r["n"] += 1
                r["t"].append(dt)
                if k is not None:
                    e = float(np.linalg.norm(k - ref, axis=1).mean())
                    r["found"] += 1
                    r["px"].append(e)
                    r["eye"].append(e / eye)
                    pts.setdefault(p.name, {})[mode] = (k, eye)
        for mode in dets:
            tot = {"n": 0, "found": 0, "px": [], "eye": [], "t": []}
            for variant in ("clean", "occluded", "mouth"):
                r = rows.get((mode, variant))
                if r is None:
                    continue
                for key in tot:
                    tot[key] = tot[key] + r[key]
                _print_row(mode, variant, r)
            _print_row(mode, "all", tot)
        both = [(v["blazeface"], v["scrfd"]) for v in pts.values() if "blazeface" in v and "scrfd" in v]
        if both:
            d = [np.linalg.norm(a[0] - b[0], axis=1).mean() / a[1] for a, b in both]
            print(f"blazeface vs scrfd on {len(both)} renders both found: mean 5-point distance "
                  f"{np.mean(d):.3f} eye distances")

    try:
        import matplotlib.cbook as cbook
        import skimage.data as skd
    except ImportError:
        print("real photos: scikit-image / matplotlib not installed")
        return
    photos = {
        "astronaut (skimage, 512x512)": skd.astronaut(),
        "grace_hopper (matplotlib, 512x600)": np.asarray(
            Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")),
    }
    for name, image in photos.items():
        ref = np.asarray(REAL[name])
        eye = float(np.linalg.norm(ref[1] - ref[0]))
        for mode, det in dets.items():
            times = []
            for _ in range(5):
                kpss, dt = _run(det, image)
                times.append(dt)
            k = _nearest(kpss, ref)
            if k is None:
                print(f"{mode:9s} {name}: no face")
                continue
            e = np.linalg.norm(k - ref, axis=1)
            print(f"{mode:9s} {name}: 5-point error vs hand annotation {e.mean():.2f} px = {e.mean() / eye:.3f} eye "
                  f"distances (max {e.max() / eye:.3f}); {np.median(times) * 1000:.1f} ms/image")


def _print_row(mode: str, variant: str, r: dict) -> None:
    if not r["n"]:
        return
    err = (f"mean 5-point error {np.mean(r['px']):.2f} px = {np.mean(r['eye']):.3f} eye distances "
           f"(median {np.median(r['eye']):.3f})") if r["px"] else "no face found"
    print(f"{mode:9s} world {variant:8s}: found {r['found']:3d}/{r['n']:3d}; {err}; "
          f"{np.mean(r['t']) * 1000:.1f} ms/image")


if __name__ == "__main__":
    main()
