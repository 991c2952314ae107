"""Benchmark the generative core: denoiser throughput and hypothesis sampling.

Prints figures; asserts nothing about time. Usage::

    PYTHONPATH=src python benchmarks/bench_core.py [--threads N] [--repeats R] [--quick]

1. Denoiser evaluations per second at batch 100 (IdGen and ExpGen architectures):
   the fused q/k/v attention (one matmul for all projections) against a per-projection
   loop of Conv1d calls, the way the original code computed it.
2. Sampling 100 IdGen + 100 ExpGen hypotheses for one image: the released settings
   (IdGen ``legacy_ddim``, 251 evaluations; ExpGen ``ddpm``, 1000 evaluations) against
   ``dpmpp_2m`` with 20 + 20 evaluations.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time

import torch
import torch.nn.functional as F

from ofer.models import ExpGen, IdGen
from ofer.nets.unet1d import QKVAttention

CONFIGS = {"IdGen": (300, 512, (300, 50, 10)), "ExpGen": (53, 1024, (53, 25, 10))}


def loop_attention(self: QKVAttention, x: torch.Tensor) -> torch.Tensor:
    """Reference: one Conv1d per projection on (B, c, 1) tensors, as in the original."""
    b = x.shape[0]
    x3 = x.unsqueeze(-1)
    qs, ks, vs = [], [], []
    for conv in self.to_qkv:
        q, k, v = conv(x3).chunk(3, dim=1)
        qs.append(q.reshape(b, self.heads, self.dim_head, 1))
        ks.append(k.reshape(b, self.heads, self.dim_head, 1))
        vs.append(v.reshape(b, self.heads, self.dim_head, 1))
    q = torch.stack(qs, dim=-2).squeeze(-1) * self.scale
    k = torch.stack(ks, dim=-2).squeeze(-1)
    v = torch.stack(vs, dim=-2).squeeze(-1)
    attn = torch.einsum("bhdi,bhdj->bhij", q, k).softmax(dim=-1)
    out = torch.einsum("bhij,bhdj->bhid", attn, v)
    out = out.permute(0, 1, 3, 2).reshape(b, -1, self.num_qkv)
    out = F.conv1d(out, self.to_out.weight, self.to_out.bias)
    return self.to_out_linear(out).squeeze(-1)


@contextlib.contextmanager
def attention_impl(kind: str):
    original = QKVAttention.forward
    if kind == "loop":
        QKVAttention.forward = loop_attention
    try:
        yield
    finally:
        QKVAttention.forward = original


def best_time(fn, repeats: int) -> float:
    """Minimum wall time of ``repeats`` calls after one warm-up (robust to a busy machine)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_denoiser(repeats: int) -> None:
    print(f"\n[1] denoiser evaluations per second, batch 100 (best of {repeats} calls)")
    print("  sample: one t for all rows, condition FiLM precomputed (what the samplers do)")
    print("  train:  one random t per row, plain forward")
    print(f"{'model':8s} {'mode':>6s} {'fused':>10s} {'loop':>10s} {'speed-up':>9s}")
    g = torch.Generator().manual_seed(0)
    for name, (d, c, dims) in CONFIGS.items():
        model = (IdGen if name == "IdGen" else ExpGen)(param_dim=d, cond_dim=c, dims=dims).eval()
        x, cond = torch.randn(100, d, generator=g), torch.randn(100, c, generator=g)
        with torch.inference_mode():
            film = model.net.cond_film(cond)
        calls = {
            "sample": lambda: model.net(x, torch.full((100,), 500), cond, cond_film=film),
            "train": lambda: model.net(x, torch.randint(0, 1000, (100,), generator=g), cond),
        }
        for t_kind, call in calls.items():
            # alternate the two variants so that load from other processes hits both alike
            best = {"fused": math.inf, "loop": math.inf}
            with torch.inference_mode():
                for r in range(repeats + 1):
                    for kind in ("fused", "loop"):
                        with attention_impl(kind):
                            t0 = time.perf_counter()
                            call()
                            if r:  # the first round is a warm-up
                                best[kind] = min(best[kind], time.perf_counter() - t0)
            rates = {k: 1.0 / v for k, v in best.items()}
            print(f"{name:8s} {t_kind:>6s} {rates['fused']:10.1f} {rates['loop']:10.1f} "
                  f"{rates['fused'] / rates['loop']:8.2f}x")


def bench_sampling(repeats: int, n: int) -> None:
    print(f"\n[2] sampling {n} IdGen + {n} ExpGen hypotheses for one image (best of {repeats})")
    idgen, expgen = IdGen().eval(), ExpGen().eval()
    g = torch.Generator().manual_seed(1)
    arc = F.normalize(torch.randn(1, 512, generator=g), dim=1)
    farl_arc = torch.randn(1, 1024, generator=g)

    def legacy():
        idgen.sample(arc, n, method="legacy_ddim", seed=0)
        expgen.sample(farl_arc, n, method="ddpm", seed=0)

    def fast():
        idgen.sample(arc, n, method="dpmpp_2m", steps=20, seed=0)
        expgen.sample(farl_arc, n, method="dpmpp_2m", steps=20, seed=0)

    with torch.inference_mode():
        t_fast = best_time(fast, repeats)
        t_legacy = best_time(legacy, max(1, repeats // 3))
    print(f"legacy   (IdGen legacy_ddim 251 + ExpGen ddpm 1000 evals): {t_legacy:8.2f} s")
    print(f"fast     (IdGen dpmpp_2m 20 + ExpGen dpmpp_2m 20 evals):   {t_fast:8.2f} s")
    print(f"speed-up: {t_legacy / t_fast:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per figure")
    parser.add_argument("--quick", action="store_true", help="fewer calls, 10 hypotheses")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_denoiser(5 if args.quick else args.repeats)
    bench_sampling(1 if args.quick else 3, 10 if args.quick else 100)


if __name__ == "__main__":
    main()
