"""The IdGen / ExpGen denoiser: OFER's 1-D "U-Net" over a length-1 sequence.

Every feature map of the original network has shape ``(B, channels, 1)``, so each
``Conv1d(kernel_size=1)`` acts as a linear layer. This module keeps the original
parameter shapes and ``state_dict`` key names (``Conv1d`` weights stay ``(out, in, 1)``)
but computes on ``(B, channels)`` tensors with ``F.linear``; that is numerically the
same network, it works for a batch of one (the original squeezed the batch axis away)
and it is faster.

Differences from the original, all deliberate:

* The ``num_qkv`` q/k/v projections of every attention block are registered
  parameters (``<block>.to_qkv.<i>.weight``). The original kept them in a plain Python
  list, so they were never trained nor saved (see :mod:`ofer.compat` for how the
  published checkpoints get them back).
* The projections are applied as one fused matrix product instead of ``num_qkv``
  convolutions; without autograd the fused weight is cached until a weight changes.
* No per-call ``print`` and no hard-coded device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Denoiser", "QKVAttention", "ResnetBlock", "TIME_EMB_DIM"]

#: Width of the sinusoidal time embedding and of the time MLP (fixed in the original).
TIME_EMB_DIM = 512


def _pointwise(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """Apply a kernel-size-1 ``Conv1d`` to ``x`` of shape ``(..., in)`` -> ``(..., out)``."""
    return F.linear(x, conv.weight[..., 0], conv.bias)


class SinusoidalTimeEmbedding(nn.Module):
    """Sinusoidal embedding of integer time steps (no parameters).

    ``emb(t) = [sin(t * f_k), cos(t * f_k)]`` with ``f_k = exp(-k * ln(theta) / (half - 1))``,
    ``k = 0 .. half-1``, computed in float32 exactly like the original.
    """

    def __init__(self, dim: int = TIME_EMB_DIM, theta: float = 10000.0) -> None:
        super().__init__()
        self.dim = dim
        self.theta = theta

    def forward(self, t: Tensor) -> Tensor:
        """Args: t (B,) int64 time steps. Returns (B, dim) float32."""
        half = self.dim // 2
        step = math.log(self.theta) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=t.device) * -step)
        args = t[:, None] * freqs[None, :]
        return torch.cat((args.sin(), args.cos()), dim=-1)


class RMSNorm(nn.Module):
    """``y = normalize(x) * g * sqrt(c)`` over channels; ``g`` has the original shape (1, c, 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, c). Returns (B, c)."""
        return F.normalize(x, dim=1) * self.g[..., 0] * (x.shape[1] ** 0.5)


class Block(nn.Module):
    """Pointwise projection -> GroupNorm(1) -> optional FiLM ``x * (scale + 1) + shift`` -> SiLU."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Conv1d(dim_in, dim_out, 1)
        self.norm = nn.GroupNorm(1, dim_out)

    def forward(self, x: Tensor, scale_shift: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Args: x (B, dim_in); scale_shift: two (B, dim_out) tensors. Returns (B, dim_out)."""
        x = _pointwise(self.proj, x)
        # GroupNorm(1, c) on a length-1 sequence normalises over the c channels of each
        # row: that is layer_norm over the last axis (same statistics, faster kernel)
        x = F.layer_norm(x, x.shape[-1:], self.norm.weight, self.norm.bias, self.norm.eps)
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return F.silu(x)


class ResnetBlock(nn.Module):
    """Two :class:`Block` s with FiLM from ``[time embedding || condition]`` on the first.

    ``mlp`` is ``Sequential(SiLU, Linear(512 + C, 2 * dim_out))`` as in the original. The
    :class:`Denoiser` evaluates the ``mlp`` of all its blocks in one fused product and
    passes each block its slice ``film = mlp([t_emb || cond])`` (B, 2 * dim_out).
    """

    def __init__(self, dim_in: int, dim_out: int, emb_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, dim_out * 2))
        self.block1 = Block(dim_in, dim_out)
        self.block2 = Block(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x: Tensor, film: Tensor) -> Tensor:
        """Args: x (B, dim_in); film (B, 2 * dim_out) = mlp([t_emb || cond]) (first half
        scale, second half shift). Returns (B, dim_out)."""
        scale, shift = film.chunk(2, dim=1)
        h = self.block1(x, (scale, shift))
        h = self.block2(h)
        res = x if isinstance(self.res_conv, nn.Identity) else _pointwise(self.res_conv, x)
        return h + res


class _FusedCache:
    """Caches a tensor derived from some parameters while autograd is off.

    The key is every source tensor's storage pointer and in-place version counter, so
    optimizer steps, ``load_state_dict`` and ``.to()`` all invalidate it.
    """

    def __init__(self) -> None:
        self.value: Tensor | None = None
        self.key: tuple | None = None

    def get(self, sources: list[Tensor], build) -> Tensor:
        if torch.is_grad_enabled():
            return build()
        key = tuple((w.data_ptr(), w._version) for w in sources)
        key += (sources[0].dtype, sources[0].device)
        if self.value is None or self.key != key:
            with torch.no_grad():
                self.value = build()
            self.key = key
        return self.value


class QKVAttention(nn.Module):
    """Self-attention among ``num_qkv`` projections of one feature vector.

    For each projection ``i`` the input (B, c) is mapped to ``[q_i | k_i | v_i]`` (3 x 128
    channels, 4 heads x 32). The ``num_qkv`` projections act as tokens: per head,
    ``A = softmax(Q K^T / sqrt(32))`` is (num_qkv x num_qkv), ``O = A V``, then ``to_out``
    maps the 128 channels back to ``c`` and ``to_out_linear`` mixes the ``num_qkv`` tokens
    into one. The condition does not enter here.

    Computation: one stacked weight for all projections (rows pre-ordered as
    (q/k/v, head, token, channel), q rows pre-scaled), and since ``to_out`` and
    ``to_out_linear`` are linear the token mix is applied to ``A`` before it meets ``V``:
    ``sum_n w_n (W_out o_n + b) = W_out (sum_n w_n A_n) V + b sum_n w_n``.
    """

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32, num_qkv: int = 16) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.num_qkv = num_qkv
        self.scale = dim_head**-0.5
        hidden = heads * dim_head
        # Built first, like the original's list, so that construction order (and thus
        # default initialisation under a given seed) matches it.
        self.to_qkv = nn.ModuleList(
            nn.Conv1d(dim, hidden * 3, 1, bias=False) for _ in range(num_qkv)
        )
        self.to_out = nn.Conv1d(hidden, dim, 1)
        self.to_out_linear = nn.Linear(num_qkv, 1)
        self._cache = _FusedCache()

    def _build_fused(self) -> Tensor:
        h, d, n = self.heads, self.dim_head, self.num_qkv
        w = torch.stack([m.weight[..., 0] for m in self.to_qkv])  # (n, 3*h*d, c)
        w = w.view(n, 3, h, d, -1).permute(1, 2, 0, 3, 4)  # (3, h, n, d, c)
        q = w[0] * self.scale  # (h, n, d, c)
        k = w[1].transpose(1, 2)  # (h, d, n, c): yields K^T directly
        return torch.cat([q.reshape(h * n * d, -1), k.reshape(h * d * n, -1),
                          w[2].reshape(h * n * d, -1)])

    def fused_qkv_weight(self) -> Tensor:
        """All projections stacked into one (3 * heads * num_qkv * dim_head, dim) matrix.

        Three row blocks: q rows ordered (head, projection, channel) and multiplied by
        ``dim_head ** -0.5``; k rows ordered (head, channel, projection), so that the
        product is K^T without a transpose copy; v rows ordered like q. Row
        ``p * 128 + h * 32 + j`` of projection ``i`` is the source of each entry.
        Cached while autograd is off.
        """
        return self._cache.get([m.weight for m in self.to_qkv], self._build_fused)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, dim). Returns (B, dim)."""
        b = x.shape[0]
        h, d, n = self.heads, self.dim_head, self.num_qkv
        # all projections at once; q, k and v are separate row blocks so that each
        # product is contiguous in the layout the next matmul wants
        wq, wk, wv = self.fused_qkv_weight().chunk(3)
        q = F.linear(x, wq).view(b, h, n, d)  # pre-scaled
        k_t = F.linear(x, wk).view(b, h, d, n)
        v = F.linear(x, wv).view(b, h, n, d)
        attn = torch.matmul(q, k_t).softmax(dim=-1)  # (B, h, n, n)
        w_tok = self.to_out_linear.weight  # (1, n)
        mix = torch.einsum("n,bhnj->bhj", w_tok[0], attn)  # token mix of A: (B, h, n)
        mixed = torch.matmul(mix.unsqueeze(-2), v)  # (B, h, 1, d)
        bias = self.to_out.bias * w_tok.sum() + self.to_out_linear.bias
        return F.linear(mixed.reshape(b, h * d), self.to_out.weight[..., 0], bias)


class PreNorm(nn.Module):
    """``fn(RMSNorm(x))`` (keys ``fn.*``, ``norm.g``)."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.norm = RMSNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self.norm(x))


class Residual(nn.Module):
    """``x + fn(x)``."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x) + x


def _resample(dim_in: int, dim_out: int) -> nn.Sequential:
    """The original Down/Upsample: ``Linear(in, in) -> SiLU -> Linear(in, out)``."""
    return nn.Sequential(nn.Linear(dim_in, dim_in), nn.SiLU(), nn.Linear(dim_in, dim_out))


class Denoiser(nn.Module):
    """OFER's epsilon-predicting 1-D U-Net.

    Args:
        param_dim: D, the width of the diffused vector (IdGen 300, ExpGen 53).
        cond_dim: C, the width of the condition vector (IdGen 512, ExpGen 1024).
        dims: channel widths per level; ``dims[0]`` must equal ``param_dim``
            (IdGen ``(300, 50, 10)``, ExpGen ``(53, 25, 10)``).
        num_qkv: number of q/k/v projections ("tokens") per attention block.

    ``forward(x_t (B, D) float, t (B,) int64, cond (B, C) float) -> eps (B, D)``.

    The ``state_dict`` holds the 174 keys of the original ``Unet`` plus
    ``<block>.to_qkv.<i>.weight`` (384, c, 1) for each of the 6 attention blocks.
    """

    def __init__(
        self, param_dim: int, cond_dim: int, dims: Sequence[int], num_qkv: int = 16
    ) -> None:
        super().__init__()
        dims = [int(d) for d in dims]
        if len(dims) < 2:
            raise ValueError(f"dims must have at least 2 entries, got {dims}")
        if dims[0] != param_dim:
            raise ValueError(f"dims[0] must equal param_dim={param_dim}, got dims={dims}")
        self.param_dim = int(param_dim)
        self.cond_dim = int(cond_dim)
        self.dims = tuple(dims)
        self.num_qkv = int(num_qkv)
        emb_dim = TIME_EMB_DIM + self.cond_dim
        in_out = list(zip(dims[:-1], dims[1:]))

        # Same construction order as the original (it fixes the default initialisation
        # under a given seed): init_conv, time_mlp, downs, mid, ups, finals. The three
        # ModuleLists are registered before the mid blocks, as in the original key order.
        self.init_conv = nn.Conv1d(param_dim, param_dim, 1)
        self.time_mlp = nn.Sequential(
            SinusoidalTimeEmbedding(TIME_EMB_DIM),
            nn.Linear(TIME_EMB_DIM, TIME_EMB_DIM),
            nn.GELU(),
            nn.Linear(TIME_EMB_DIM, TIME_EMB_DIM),
        )
        self.downs = nn.ModuleList()
        self.ups = nn.ModuleList()
        self.finals = nn.ModuleList()

        def attention(c: int) -> Residual:
            return Residual(PreNorm(c, QKVAttention(c, num_qkv=self.num_qkv)))

        for d_in, d_out in in_out:
            self.downs.append(
                nn.ModuleList(
                    [
                        ResnetBlock(d_in, d_in, emb_dim),
                        ResnetBlock(d_in, d_in, emb_dim),
                        attention(d_in),
                        _resample(d_in, d_out),
                    ]
                )
            )
        mid = dims[-1]
        self.mid_block1 = ResnetBlock(mid, mid, emb_dim)
        self.mid_attn = attention(mid)
        self.mid_block2 = ResnetBlock(mid, mid, emb_dim)
        for d_out, d_in in reversed(in_out):
            self.ups.append(
                nn.ModuleList(
                    [
                        _resample(d_in, d_out),
                        ResnetBlock(d_out * 2, d_out, emb_dim),
                        ResnetBlock(d_out * 2, d_out, emb_dim),
                        attention(d_out),
                    ]
                )
            )
        self.finals.append(
            nn.ModuleList(
                [
                    ResnetBlock(param_dim * 2, param_dim, emb_dim),
                    attention(param_dim),
                    nn.Conv1d(param_dim, param_dim, 1),
                ]
            )
        )

        self._film_cache = _FusedCache()

    # ------------------------------------------------------------------ forward
    def resnet_blocks(self) -> list[ResnetBlock]:
        """The 11 ResnetBlocks in forward order (their FiLM slices follow this order)."""
        blocks = [m for level in self.downs for m in level[:2]]
        blocks += [self.mid_block1, self.mid_block2]
        blocks += [m for level in self.ups for m in level[1:3]]
        return blocks + [self.finals[0][0]]

    def _film_params(self) -> tuple[Tensor, Tensor]:
        layers = [blk.mlp[1] for blk in self.resnet_blocks()]
        sources = [p for lin in layers for p in (lin.weight, lin.bias)]
        return self._film_cache.get(
            sources,
            lambda: (torch.cat([lin.weight for lin in layers]),
                     torch.cat([lin.bias for lin in layers])),
        )

    def cond_film(self, cond: Tensor) -> Tensor:
        """The condition's share of all FiLM projections, (B, sum of 2 * c_out), bias included.

        It does not depend on ``x_t`` or ``t``: samplers compute it once per run and pass
        it to :meth:`forward` as ``cond_film``.
        """
        weight, bias = self._film_params()
        dtype = weight.dtype
        return F.linear(F.silu(cond.to(dtype)), weight[:, TIME_EMB_DIM:], bias)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor,
                cond_film: Tensor | None = None) -> Tensor:
        """Predict the noise.

        Args:
            x_t: (B, D) noisy parameters (cast to the weights' dtype).
            t: (B,) int64 time steps in ``[0, T)`` (the legacy sampler also passes -1).
            cond: (B, C) condition vectors.
            cond_film: optional ``self.cond_film(cond)``, precomputed.

        Returns:
            (B, D) predicted epsilon, in the weights' dtype.
        """
        dtype = self.init_conv.weight.dtype
        x = x_t.reshape(x_t.shape[0], -1).to(dtype)
        b = x.shape[0]
        if x.shape[1] != self.param_dim:
            raise ValueError(f"x_t must have {self.param_dim} columns, got {tuple(x_t.shape)}")
        if cond.shape != (b, self.cond_dim):
            raise ValueError(
                f"cond must have shape ({b}, {self.cond_dim}), got {tuple(cond.shape)}"
            )
        t = t.reshape(-1).long().to(x.device)
        if t.shape[0] not in (1, b):
            raise ValueError(f"t must have {b} entries, got {t.shape[0]}")

        # FiLM of all 11 blocks in one product. mlp = Linear(silu([t_emb || cond])) splits
        # into a time part and a condition part; during sampling every row has the same
        # t, so the time part is computed once (on CPU, where checking is free).
        if t.shape[0] == 1 or (t.device.type == "cpu" and bool((t == t[0]).all())):
            t = t[:1]
        t_emb = self.time_mlp(t).to(dtype)
        weight, bias = self._film_params()
        film = F.linear(F.silu(t_emb), weight[:, :TIME_EMB_DIM])
        film = film + (self.cond_film(cond) if cond_film is None else cond_film)
        films = iter(film.split([blk.mlp[1].out_features for blk in self.resnet_blocks()], 1))

        x = _pointwise(self.init_conv, x)
        r = x
        skips: list[Tensor] = []
        for block1, block2, attn, down in self.downs:
            x = block1(x, next(films))
            skips.append(x)
            x = attn(block2(x, next(films)))
            skips.append(x)
            x = down(x)
        x = self.mid_block1(x, next(films))
        x = self.mid_attn(x)
        x = self.mid_block2(x, next(films))
        for up, block1, block2, attn in self.ups:
            x = up(x)
            x = block1(torch.cat([x, skips.pop()], dim=1), next(films))
            x = block2(torch.cat([x, skips.pop()], dim=1), next(films))
            x = attn(x)
        x = torch.cat([x, r], dim=1)
        block, attn, conv = self.finals[0]
        x = attn(block(x, next(films)))
        return _pointwise(conv, x)

    # ------------------------------------------------------------ initialisation
    def attention_blocks(self) -> Iterator[tuple[str, QKVAttention]]:
        """Yield ``(prefix, module)`` for the 6 attention blocks, ``prefix`` like ``downs.0.2``."""
        for name, module in self.named_modules():
            if isinstance(module, QKVAttention):
                yield name[: -len(".fn.fn")], module

    def construction_order(self) -> list[nn.Module]:
        """The Linear / Conv1d layers in the order the original ``Unet.__init__`` built them.

        This order (init_conv, time_mlp, downs, mid, ups, finals; inside attention the
        ``num_qkv`` projections first) is the order in which the original drew their
        default initial values from the torch RNG.
        """
        parts: list[nn.Module] = [self.init_conv, self.time_mlp, self.downs]
        parts += [self.mid_block1, self.mid_attn, self.mid_block2, self.ups, self.finals]
        return [
            m for part in parts for m in part.modules() if isinstance(m, (nn.Linear, nn.Conv1d))
        ]

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-draw all weights with PyTorch's default Linear/Conv1d init, in original order.

        With ``generator = torch.Generator().manual_seed(s)`` every parameter (and every
        q/k/v projection) equals what ``torch.manual_seed(s); Unet(cfg)`` of the original
        code draws. Norm weights are reset to one, biases of norms to zero.
        """
        for m in self.construction_order():
            draw_default_init(m.weight, m.bias, generator)
        for m in self.modules():
            if isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.g)


@torch.no_grad()
def draw_default_init(
    weight: Tensor, bias: Tensor | None, generator: torch.Generator | None
) -> None:
    """PyTorch's default ``Linear`` / ``ConvNd`` initialisation, drawn from ``generator``.

    ``weight ~ kaiming_uniform(a=sqrt(5))`` (= U(-1/sqrt(fan_in), 1/sqrt(fan_in))), then
    ``bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; the same RNG consumption as
    ``reset_parameters`` of those modules.
    """
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    if bias is not None:
        fan_in = weight.shape[1] * (weight[0, 0].numel() if weight.dim() > 2 else 1)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(bias, -bound, bound, generator=generator)
