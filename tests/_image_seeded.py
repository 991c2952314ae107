"""Deterministic, name-keyed weight fill shared by the ArcFace / FaRL golden tests.

Each tensor is drawn from its own ``torch.Generator`` seeded with ``seed + crc32(key)``, so two
modules with the same key names and shapes get identical weights whatever their
construction order. The golden numbers in ``tests/golden/`` were produced by filling the
published reference implementations (insightface ``iresnet``, OpenAI CLIP
``VisionTransformer``) with this same function.
"""

from __future__ import annotations

import zlib

import torch


@torch.no_grad()
def seeded_fill_(module: torch.nn.Module, seed: int = 0) -> None:
    for key, t in module.state_dict().items():
        if not t.is_floating_point():
            continue
        g = torch.Generator().manual_seed(seed + zlib.crc32(key.encode()))
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "running_var":
            v = torch.rand(t.shape, generator=g) + 0.5
        elif leaf == "running_mean" or leaf.endswith("bias"):
            v = 0.1 * torch.randn(t.shape, generator=g)
        elif key.endswith("bn3.weight"):  # last BN of an IResNet residual branch: keep depth stable
            v = 0.2 + 0.02 * torch.randn(t.shape, generator=g)
        elif t.ndim == 1:  # norm / PReLU weights, class embedding
            v = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
        else:
            fan_in = t[0].numel() if t.ndim > 1 else t.numel()
            if key.endswith("proj") or key.endswith("positional_embedding"):
                fan_in = t.shape[0] if key.endswith("proj") else t.shape[1]
            v = torch.randn(t.shape, generator=g) / fan_in**0.5
        t.copy_(v.to(t.dtype))


def seeded_input(shape, seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 2.0 - 1.0
