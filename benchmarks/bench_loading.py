"""Loading the three released-format checkpoints: seconds and file reads per model.

Writes official-layout ``.tar`` files with the released architectures and random weights
(IdGen: denoiser 300-d + ArcFace r100; ExpGen: denoiser 53-d + ArcFace r100 + FaRL ViT-B/16;
IdRank: ranker on 1785 vertices + ArcFace r100 + FaRL ViT-B/16; the ``diffusion`` entry
duplicating ``net``, as the released files do), then times turning each into the model that
sampling runs, counting how often ``torch.load`` reads a file.

    python benchmarks/bench_loading.py [--repeats 3] [--threads 2]

The same script runs against an older checkout (its ``ofer.pipeline.load_model``), which is
how the README's "before" figure was measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ofer.nets import Denoiser, FaRLEncoder, IResNet, RankMLP  # noqa: E402

try:  # this checkout
    from ofer.models.loading import load_model as _load_model

    def load(path, kind, vidx):
        return _load_model(path, kind, vertex_indices=vidx)
except ImportError:  # an older checkout: the pipeline's loader
    from ofer.pipeline import load_model as _load_model

    def load(path, kind, vidx):
        return _load_model(Path(path), kind, vertex_indices=Path(vidx))


def write_files(root: Path) -> Path:
    torch.manual_seed(0)
    arc = IResNet().state_dict()
    farl = {f"visual.{k}": v for k, v in FaRLEncoder().state_dict().items()}
    for kind, net in (("idgen", Denoiser(300, 512, (300, 50, 10))), ("expgen", Denoiser(53, 1024, (53, 25, 10)))):
        sd = {k: v for k, v in net.state_dict().items() if ".to_qkv." not in k}
        payload = {"net": sd, "diffusion": {f"net.{k}": v for k, v in sd.items()}, "arcface": arc, "epoch": 1}
        if kind == "expgen":
            payload["farl"] = farl
        torch.save(payload, root / f"{kind}.tar")
    torch.save({"net": RankMLP(in_dim=6 * 1785, cond_dim=1024).state_dict(), "arcface": arc, "farl": farl},
               root / "idrank.tar")
    vidx = root / "frontindices.npy"
    np.save(vidx, np.arange(1785, dtype=np.int64) * 2)
    return vidx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reads = {"n": 0}
    real_load = torch.load

    def counting_load(*a, **kw):
        reads["n"] += 1
        return real_load(*a, **kw)

    torch.load = counting_load
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        vidx = write_files(root)
        sizes = {k: (root / f"{k}.tar").stat().st_size / 2**20 for k in ("idgen", "expgen", "idrank")}
        total = []
        for kind in ("idgen", "expgen", "idrank"):
            times = []
            for _ in range(args.repeats):
                reads["n"] = 0
                t0 = time.perf_counter()
                load(root / f"{kind}.tar", kind, vidx)
                times.append(time.perf_counter() - t0)
            total.append(statistics.median(times))
            print(f"{kind:7s} {sizes[kind]:6.0f} MB  {statistics.median(times):6.2f} s (median of {args.repeats}, "
                  f"min {min(times):.2f})  file reads: {reads['n']}")
        print(f"all three: {sum(total):.2f} s")


if __name__ == "__main__":
    main()
