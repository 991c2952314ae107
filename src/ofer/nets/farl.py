"""FaRL image encoder: the CLIP ViT-B/16 visual tower, written for this project.

FaRL (``FaRL-Base-Patch16-LAIONFace20M-ep64.pth``) is an OpenAI-CLIP ViT-B/16 trained on
LAION-Face. OFER's ExpGen and IdRank use its image embedding (``encode_image``: class token
-> ``ln_post`` -> ``@ proj``; 512-d, **not** L2-normalised) and fine-tune the whole tower.

:class:`FaRLEncoder` has the parameter names of CLIP's ``VisionTransformer`` (``conv1``,
``class_embedding``, ``positional_embedding``, ``ln_pre``, ``transformer.resblocks.{i}.
{ln_1,attn.in_proj_weight,attn.in_proj_bias,attn.out_proj,ln_2,mlp.c_fc,mlp.c_proj}``,
``ln_post``, ``proj``), so the ``visual.*`` part of a FaRL/CLIP state_dict loads strictly
(:func:`load_farl_state_dict`). The MLP uses QuickGELU (``x * sigmoid(1.702 x)``) as
OpenAI CLIP and FaRL do; with exact GELU the output would differ by about 0.03.
Attention is computed batch-first with :func:`torch.nn.functional.scaled_dot_product_attention`;
it is the same function as CLIP's sequence-first ``nn.MultiheadAttention``.

:func:`clip_preprocess` is CLIP's ``_transform(224)`` (bicubic resize of the short side,
centre crop, RGB, ``/255``, CLIP mean/std) with PIL and torch only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError

__all__ = [
    "FaRLEncoder",
    "CLIP_MEAN",
    "CLIP_STD",
    "clip_preprocess",
    "clip_normalize",
    "load_farl_state_dict",
    "farl_from_state_dict",
]

#: CLIP's normalisation constants (RGB).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the activation of OpenAI CLIP / FaRL."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 (as CLIP does), returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names.

    Parameters: ``in_proj_weight (3W, W)``, ``in_proj_bias (3W,)``, ``out_proj`` Linear(W, W).
    Input and output ``(B, L, W)``.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm32(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = LayerNorm32(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of ``layers`` :class:`ResidualAttentionBlock` under ``resblocks``."""

    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class FaRLEncoder(nn.Module):
    """CLIP vision transformer (default ViT-B/16) producing the FaRL image embedding.

    Args:
        image_size: input side (224).
        patch_size: patch side (16).
        width: token width (768).
        layers: transformer depth (12).
        heads: attention heads (12).
        output_dim: embedding size after ``proj`` (512).

    Input: ``(B, 3, image_size, image_size)`` float, CLIP-normalised RGB (:func:`clip_preprocess`).
    Output: ``(B, output_dim)`` float, not normalised (OFER uses it as is).
    """

    def __init__(self, image_size: int = 224, patch_size: int = 16, width: int = 768,
                 layers: int = 12, heads: int = 12, output_dim: int = 512) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        grid = image_size // patch_size
        # Initialisation as CLIP (scaled normals); seeded through the global torch RNG like any nn.Module.
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm32(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm32(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def prepare(self, rgb: torch.Tensor) -> torch.Tensor:
        """This encoder's input from face crops: ``(B, 3, H, W)`` RGB, uint8 or float in [0, 1].

        A crop of another side is resized to ``image_size`` (bicubic, no antialiasing) and
        clamped to [0, 1]; then the CLIP mean/std normalisation. Training and sampling both
        call this, so a small encoder sees the same pixels in both.
        """
        x = rgb.float() / 255.0 if rgb.dtype == torch.uint8 else rgb.float()
        s = self.image_size
        if x.shape[-2:] != (s, s):
            x = torch.nn.functional.interpolate(x, size=(s, s), mode="bicubic", align_corners=False).clamp(0, 1)
        return clip_normalize(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed ``x (B, 3, S, S)`` (CLIP-normalised, :meth:`prepare`) -> ``(B, output_dim)``."""
        s = self.image_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != s or x.shape[3] != s:
            raise ValueError(f"FaRLEncoder expects input (B, 3, {s}, {s}), got {tuple(x.shape)}")
        x = x.to(self.conv1.weight.dtype)
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, grid^2, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0, :]) @ self.proj


# --------------------------------------------------------------------------------------
# Preprocessing (CLIP ``_transform``) without torchvision
# --------------------------------------------------------------------------------------
def _to_pil_rgb(image: Any):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"clip_preprocess expects a PIL image or an (H, W, 3) uint8 RGB array, got "
                         f"{arr.dtype} {arr.shape}")
    return Image.fromarray(arr, "RGB")


def clip_preprocess(image: Any, size: int = 224) -> torch.Tensor:
    """CLIP's test transform: short side -> ``size`` (bicubic), centre crop, ``/255``, mean/std.

    Same arithmetic as ``torchvision`` ``Resize(size, BICUBIC)`` + ``CenterCrop(size)`` on a PIL
    image (long side ``int(size * long / short)``, crop offsets ``round((dim - size) / 2)``).

    Args:
        image: PIL image (any mode; converted to RGB) or ``(H, W, 3)`` uint8 RGB array.
        size: output side (224).

    Returns:
        ``(3, size, size)`` float32 tensor.
    """
    from PIL import Image

    img = _to_pil_rgb(image)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short != size:
        new_long = int(size * long / short)
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    w, h = img.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    arr = np.asarray(img, dtype=np.uint8)[top:top + size, left:left + size]
    return clip_normalize(torch.from_numpy(arr.copy()).permute(2, 0, 1))


def clip_normalize(x: torch.Tensor) -> torch.Tensor:
    """``(…, 3, H, W)`` uint8 (0..255) or float (0..1) RGB -> CLIP-normalised float32."""
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------
def _read(path: str | os.PathLike) -> Any:
    if not os.path.isfile(path):
        raise CheckpointError(f"FaRL weights not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read FaRL weights {path} (weights_only load): {msg}") from exc


def _visual_state_dict(obj: Any, name: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("farl", "state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(torch.is_tensor(v) for v in inner.values()):
                return _visual_state_dict(inner, name)
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}
        if tensors:
            if all(k.startswith("module.") for k in tensors):
                tensors = {k[len("module."):]: v for k, v in tensors.items()}
            if any(k.startswith("visual.") for k in tensors):
                # full CLIP/FaRL state_dict: keep the vision tower, drop the text tower
                return {k[len("visual."):]: v for k, v in tensors.items() if k.startswith("visual.")}
            return tensors
    raise CheckpointError(
        f"{name}: no FaRL state_dict found (expected tensors, 'visual.*' keys, or a dict under "
        f"'state_dict'/'farl')"
    )


def load_farl_state_dict(model: FaRLEncoder, source: str | os.PathLike | Mapping[str, Any]) -> FaRLEncoder:
    """Load FaRL / CLIP vision weights into ``model`` strictly and return it.

    Accepted layouts: the FaRL release file (``{"state_dict": {"visual.*": ..., text keys}}``),
    a full CLIP state_dict (``visual.*`` kept, the text tower ignored), the ``farl`` entry of
    an OFER checkpoint (a full CLIP state_dict), or a bare visual state_dict as produced by
    :meth:`FaRLEncoder.state_dict`. A ``module.`` prefix is removed.

    Raises:
        CheckpointError: one line, on a missing file, an unreadable file, or missing /
            unexpected / mis-shaped vision keys.
    """
    name = "FaRL state_dict" if isinstance(source, Mapping) else str(source)
    obj = source if isinstance(source, Mapping) else _read(source)
    sd = _visual_state_dict(obj, name)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{name}: FaRL keys do not match: {len(missing)} missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}"
        )
    bad = [k for k in own if tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(
            f"{name}: {len(bad)} FaRL tensors have the wrong shape, e.g. {k}: {tuple(sd[k].shape)} in "
            f"file, {tuple(own[k].shape)} expected (wrong image_size/patch_size/width/layers?)"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)
    return model


def farl_from_state_dict(source: Mapping[str, Any], name: str = "FaRL state_dict") -> FaRLEncoder:
    """A FaRLEncoder whose size is read off CLIP vision weights (heads = width / 64), loaded."""
    sd = _visual_state_dict(source, name)
    try:
        width, _, patch, _ = (int(n) for n in sd["conv1.weight"].shape)
        grid = int(round((sd["positional_embedding"].shape[0] - 1) ** 0.5))
        depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
        out = int(sd["proj"].shape[1])
    except (KeyError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{name}: not in the CLIP vision-tower layout ({exc})") from exc
    model = FaRLEncoder(image_size=grid * patch, patch_size=patch, width=width, layers=depth,
                        heads=max(1, width // 64), output_dim=out)
    return load_farl_state_dict(model, sd)
