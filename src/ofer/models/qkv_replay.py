"""The q/k/v projections of the original denoiser, re-created by replaying its RNG draws.

The original ``Attention`` kept its 16 q/k/v projections per block in a plain Python list:
never registered, never trained, never saved. Each process drew them from the torch CPU
generator when it built the network, after everything it had built before. To run a
released checkpoint as the released code ran it, we replay that process's consumption of
the generator: for every module built before the U-Net, tensors of the same sizes go
through the same init calls (``uniform_`` / ``normal_``; the generator's consumption
depends only on the call and the element count), and the U-Net itself is drawn by
:meth:`ofer.nets.Denoiser.reset_parameters`. No weights are read, nothing is downloaded.

Three processes are known (``QKV_REPLAYS``):

``training``
    ``jobs.py``'s trainer: ``torch.manual_seed(0)``, then for ExpGen (ArcFace + FaRL
    condition) ``clip.load("ViT-B/16")``, which builds the whole CLIP model (text tower
    included), then ``Arcface()`` (iresnet100), then the ``Unet``. These are the
    projections each network was trained with.
``released``
    the released ``test.py``: ``seed_everything(1)``, then the IdRank model (CLIP ViT-B/16,
    ArcFace, ``RankMLPNet``, then its own IdGen: ArcFace + ``Unet(300, 512, (300, 50, 10))``),
    then IdGen (ArcFace + ``Unet``), then ExpGen (CLIP, ArcFace, ``Unet(53, 1024,
    (53, 25, 10))``). These are the projections behind the released results.
``unet``
    ``torch.manual_seed(seed)`` then the ``Unet`` alone (the network is the first consumer).

Both original processes were run on CPU and their 96 projections per network compared
with these replays (tests/test_qkv_replay.py holds the digests).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..nets.unet1d import Denoiser

__all__ = ["QKV_REPLAYS", "RELEASED_ARCHITECTURES", "replay_qkv", "replay_description"]

QKV_REPLAYS = ("released", "training", "unet")

#: The denoisers ``test.py`` builds (param_dim, cond_dim, dims, num_qkv): the released
#: replay reproduces the draw of exactly these networks.
RELEASED_ARCHITECTURES = {
    "idgen": {"param_dim": 300, "cond_dim": 512, "dims": [300, 50, 10], "num_qkv": 16},
    "expgen": {"param_dim": 53, "cond_dim": 1024, "dims": [53, 25, 10], "num_qkv": 16},
}

# CLIP ViT-B/16 as clip.load builds it: (embed, resolution, patch, vision width, vision
# layers, text width, text layers, context length, vocabulary)
_VIT_B16 = dict(embed=512, resolution=224, patch=16, v_width=768, v_layers=12,
                t_width=512, t_layers=12, context=77, vocab=49408)
# RankMLPNet of the released IdRank: (in, out) of its five context-modulated layers
_RANK_LAYERS = ((2 * 5355, 4096), (4096, 1024), (1024, 256), (256, 64), (64, 1))
_RANK_CONTEXT = 1024


class _Draws:
    """A generator and one scratch buffer: ``uniform(n)`` / ``normal(n)`` consume the
    generator exactly like the same call on a fresh contiguous tensor of ``n`` floats."""

    def __init__(self, generator: torch.Generator) -> None:
        self.g = generator
        self.buf = torch.empty(0)

    def _view(self, n: int) -> Tensor:
        if self.buf.numel() < n:
            self.buf = torch.empty(n)
        return self.buf[:n]

    def uniform(self, n: int) -> None:
        self._view(n).uniform_(generator=self.g)

    def normal(self, n: int) -> None:
        self._view(n).normal_(generator=self.g)

    def default_init(self, fan_out: int, fan_in: int, bias: bool = True) -> None:
        """``nn.Linear`` / ``nn.ConvNd`` construction: kaiming-uniform weight, uniform bias
        (``fan_in`` counts the kernel's elements too)."""
        self.uniform(fan_out * fan_in)
        if bias:
            self.uniform(fan_out)


def _iresnet100(d: _Draws) -> None:
    """``Arcface()`` (iresnet100, layers 3/13/30/3): every Conv2d (no bias) and the fc Linear
    in construction order, then ``normal_(0, 0.1)`` over every Conv2d weight again (the order
    differs from construction only in where a stage's downsample sits; sizes per stage are
    what counts, and a stage's re-draws are three sizes in a fixed pattern)."""
    convs: list[int] = [64 * 3 * 9]  # module order (block convs, then the stage's downsample)
    d.default_init(64, 3 * 9, bias=False)
    inplanes = 64
    for planes, blocks in zip((64, 128, 256, 512), (3, 13, 30, 3)):
        d.default_init(planes, inplanes, bias=False)  # 1x1 stride-2 downsample, built first
        for b in range(blocks):
            d.default_init(planes, inplanes * 9, bias=False)
            d.default_init(planes, planes * 9, bias=False)
            convs += [planes * inplanes * 9, planes * planes * 9] + ([planes * inplanes] if b == 0 else [])
            inplanes = planes
    d.default_init(512, 512 * 7 * 7)
    for n in convs:
        d.normal(n)


def _transformer(d: _Draws, width: int, layers: int) -> None:
    """CLIP's residual attention blocks: ``nn.MultiheadAttention`` (its out projection
    Linear, then xavier-uniform over the packed in-projection), then the MLP's two Linears."""
    for _ in range(layers):
        d.default_init(width, width)
        d.uniform(3 * width * width)
        d.default_init(4 * width, width)
        d.default_init(width, 4 * width)


def _clip_vit_b16(d: _Draws) -> None:
    """``clip.load("ViT-B/16")``: ``CLIP(...)`` construction (the weights loaded afterwards
    do not touch the generator)."""
    c = _VIT_B16
    w = c["v_width"]
    d.default_init(w, 3 * c["patch"] ** 2, bias=False)  # patch embedding
    d.normal(w)  # class embedding
    d.normal(((c["resolution"] // c["patch"]) ** 2 + 1) * w)  # positional embedding
    _transformer(d, w, c["v_layers"])
    d.normal(w * c["embed"])  # visual projection
    t = c["t_width"]
    _transformer(d, t, c["t_layers"])
    d.normal(c["vocab"] * t)  # nn.Embedding's own init
    # initialize_parameters(): embeddings, the text blocks' four matrices, the projection
    d.normal(c["vocab"] * t)
    d.normal(c["context"] * t)
    for _ in range(c["t_layers"]):
        for n in (3 * t * t, t * t, 4 * t * t, 4 * t * t):
            d.normal(n)
    d.normal(t * c["embed"])


def _rank_mlp(d: _Draws) -> None:
    """``RankMLPNet``: per layer the main Linear, the context scale Linear and the bias-free
    context shift Linear."""
    for fan_in, fan_out in _RANK_LAYERS:
        d.default_init(fan_out, fan_in)
        d.default_init(fan_out, _RANK_CONTEXT)
        d.default_init(fan_out, _RANK_CONTEXT, bias=False)


def _unet(d: _Draws, arch: dict[str, Any]) -> dict[str, Tensor]:
    net = Denoiser(arch["param_dim"], arch["cond_dim"], arch["dims"], arch.get("num_qkv", 16))
    net.reset_parameters(d.g)
    return {k: v for k, v in net.state_dict().items() if ".to_qkv." in k}


def _uses_farl(arch: dict[str, Any]) -> bool:
    # the released condition widths: 512 = ArcFace alone, 1024 = FaRL + ArcFace
    return int(arch["cond_dim"]) > 512


def replay_qkv(arch: dict[str, Any], replay: str = "training", seed: int | None = None,
               kind: str | None = None) -> dict[str, Tensor]:
    """The q/k/v projections a process of the original code drew for this denoiser.

    Args:
        arch: ``param_dim``, ``cond_dim``, ``dims``, ``num_qkv`` of the denoiser.
        replay: ``"released"``, ``"training"`` or ``"unet"`` (module docstring).
        seed: the process's torch seed; default 1 for ``released``, 0 otherwise.
        kind: ``"idgen"`` or ``"expgen"`` (``released`` only; default from the condition
            width: 1024 = ExpGen).

    Returns:
        ``{"<block>.fn.fn.to_qkv.<i>.weight": (384, c, 1)}`` for all blocks (Denoiser keys).

    Raises:
        ValueError: an unknown replay, or ``released`` for a denoiser that ``test.py`` does
            not build (it hard-codes both architectures).
    """
    if replay not in QKV_REPLAYS:
        raise ValueError(f"unknown q/k/v replay {replay!r}; expected one of {QKV_REPLAYS}")
    seed = (1 if replay == "released" else 0) if seed is None else int(seed)
    d = _Draws(torch.Generator().manual_seed(seed))
    if replay == "unet":
        return _unet(d, arch)
    if replay == "training":
        if _uses_farl(arch):
            _clip_vit_b16(d)
        _iresnet100(d)
        return _unet(d, arch)
    kind = kind or ("expgen" if _uses_farl(arch) else "idgen")
    want = RELEASED_ARCHITECTURES.get(kind)
    got = {"param_dim": int(arch["param_dim"]), "cond_dim": int(arch["cond_dim"]), "dims": list(arch["dims"]),
           "num_qkv": int(arch.get("num_qkv", 16))}
    if want is None or got != want:
        raise ValueError(f"the released test.py builds {kind} as {want}; this denoiser is {got}, so "
                         "its released draw does not exist (use the training replay)")
    _clip_vit_b16(d)  # IdRank: CLIP, ArcFace, the ranker,
    _iresnet100(d)
    _rank_mlp(d)
    _iresnet100(d)  # ... and its own IdGen
    _unet(d, RELEASED_ARCHITECTURES["idgen"])
    _iresnet100(d)  # IdGen
    if kind == "expgen":
        _unet(d, RELEASED_ARCHITECTURES["idgen"])
        _clip_vit_b16(d)  # ExpGen
        _iresnet100(d)
    return _unet(d, arch)


def replay_description(replay: str, seed: int | None = None, kind: str | None = None,
                       uses_farl: bool = False) -> str:
    """One line naming the process a replay re-creates (for import reports)."""
    if replay == "released":
        s = 1 if seed is None else seed
        return (f"the released test.py draw (seed {s}: IdRank's CLIP, ArcFace, ranker and IdGen, "
                + ("IdGen, then ExpGen's CLIP and ArcFace" if kind == "expgen" else "then IdGen's ArcFace")
                + ", then this U-Net)")
    s = 0 if seed is None else seed
    if replay == "training":
        return (f"the training draw (seed {s}: " + ("CLIP ViT-B/16, " if uses_farl else "")
                + "ArcFace iresnet100, then the U-Net)")
    return f"the draw of seed {s} with the U-Net built first"
