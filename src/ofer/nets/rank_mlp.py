"""IdRank: the FiLM MLP that scores IdGen hypotheses, its input features and its loss.

The ranker sees, for each of the N identity hypotheses of one image, the front-face
vertices in millimetres laid out as ``[mean over the N hypotheses || hypothesis - mean]``
and predicts a score; the highest score is the hypothesis with the lowest predicted
vertex error. Training uses a ListNet loss: cross-entropy between ``softmax(scores)``
and ``softmax(-mean absolute vertex error in mm)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import AssetError
from ..flame.assets import safe_load_pickle
from .unet1d import draw_default_init

__all__ = [
    "RankMLP",
    "RankLayer",
    "rank_features",
    "listnet_loss",
    "vertex_errors_mm",
    "load_vertex_indices",
]


class RankLayer(nn.Module):
    """``out = GroupNorm(SELU(mlp(x))) * sigmoid(scale(c)) + shift(c)``; the last layer is
    ``mlp(x) * sigmoid(scale(c)) + shift(c)``.

    Like the original, the GroupNorm is skipped when ``x`` has a single row.
    """

    def __init__(self, dim_in: int, dim_out: int, cond_dim: int, groups: int = 8,
                 last: bool = False) -> None:
        super().__init__()
        self.mlp = nn.Linear(dim_in, dim_out)
        self.scale = nn.Linear(cond_dim, dim_out)
        self.shift = nn.Linear(cond_dim, dim_out, bias=False)
        self.last = last
        if not last:
            self.gn = nn.GroupNorm(groups, dim_out)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """Args: x (R, dim_in); cond (R, C) or (B, 1, C) broadcastable to x's rows.

        Returns (R, dim_out) or, with x of shape (B, N, dim_in), (B, N, dim_out).
        """
        scale = torch.sigmoid(self.scale(cond))
        shift = self.shift(cond)
        h = self.mlp(x)
        if self.last:
            return h * scale + shift
        h = F.selu(h)
        rows = h.shape[:-1].numel()
        if rows > 1:
            shape = h.shape
            h = self.gn(h.reshape(rows, shape[-1])).reshape(shape)
        return h * scale + shift


class RankMLP(nn.Module):
    """The IdRank scorer: 5 FiLM layers ``in_dim -> 4096 -> 1024 -> 256 -> 64 -> 1``.

    Args:
        in_dim: feature width, ``2 * 3 * K`` for K front-face vertices (10710 for the
            original 1785 vertices).
        cond_dim: width of the condition vector (1024 = [FaRL || ArcFace]).
        hidden: hidden widths (the original's ``(4096, 1024, 256, 64)``).
        groups: GroupNorm groups.

    Keys: ``ranklayers.{0..4}.{mlp,scale,shift,gn}.*`` as in the original.
    """

    def __init__(self, in_dim: int = 10710, cond_dim: int = 1024,
                 hidden: Sequence[int] = (4096, 1024, 256, 64), groups: int = 8) -> None:
        super().__init__()
        self.in_dim, self.cond_dim = int(in_dim), int(cond_dim)
        self.hidden, self.groups = tuple(int(h) for h in hidden), int(groups)
        widths = [self.in_dim, *self.hidden]
        layers = [RankLayer(a, b, self.cond_dim, groups) for a, b in zip(widths[:-1], widths[1:])]
        layers.append(RankLayer(widths[-1], 1, self.cond_dim, last=True))
        self.ranklayers = nn.ModuleList(layers)

    def forward(self, features: Tensor, cond: Tensor) -> Tensor:
        """Score hypotheses.

        Args:
            features: (B, N, in_dim) from :func:`rank_features`.
            cond: (B, C) one condition per image (shared by its N hypotheses).

        Returns:
            (B, N) scores (higher = better).
        """
        if features.dim() != 3 or features.shape[-1] != self.in_dim:
            raise ValueError(
                f"features must have shape (B, N, {self.in_dim}), got {tuple(features.shape)}"
            )
        if cond.shape != (features.shape[0], self.cond_dim):
            raise ValueError(
                f"cond must have shape ({features.shape[0]}, {self.cond_dim}), "
                f"got {tuple(cond.shape)}"
            )
        x, c = features, cond[:, None, :]  # the FiLM terms are computed once per image
        for layer in self.ranklayers:
            x = layer(x, c)
        return x[..., 0]

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PyTorch default init in construction order (mlp, scale, shift per layer).

        With ``torch.Generator().manual_seed(s)`` this equals ``torch.manual_seed(s);
        RankMLPNet(cfg)`` of the original code.
        """
        for layer in self.ranklayers:
            draw_default_init(layer.mlp.weight, layer.mlp.bias, generator)
            draw_default_init(layer.scale.weight, layer.scale.bias, generator)
            draw_default_init(layer.shift.weight, None, generator)
            if not layer.last:
                nn.init.ones_(layer.gn.weight)
                nn.init.zeros_(layer.gn.bias)


# --------------------------------------------------------------------- features
def _as_index(indices, device: torch.device) -> Tensor:
    if isinstance(indices, Tensor):
        return indices.to(device=device, dtype=torch.long)
    return torch.as_tensor(np.asarray(indices), dtype=torch.long, device=device)


def rank_features(vertices: Tensor, indices: Tensor | np.ndarray | Sequence[int],
                  mean_scale: float = 1.0) -> Tensor:
    """The ranker input: ``[mean || hypothesis - mean]`` of the selected vertices in mm.

    Args:
        vertices: (B, N, V, 3) FLAME vertices of N hypotheses per image, in metres.
        indices: (K,) vertex indices (e.g. the 1785 front-face vertices).
        mean_scale: factor on the mean half (1 in the original).

    Returns:
        (B, N, 6K): per hypothesis ``[M (K x 3, xyz interleaved) || P_n - M]`` with
        ``P_n = 1000 * vertices[:, n, indices]`` and ``M`` the mean over the N hypotheses.
    """
    if vertices.dim() != 4 or vertices.shape[-1] != 3:
        raise ValueError(f"vertices must have shape (B, N, V, 3), got {tuple(vertices.shape)}")
    idx = _as_index(indices, vertices.device)
    pts = 1e3 * vertices[:, :, idx]  # (B, N, K, 3) mm
    mean = pts.mean(dim=1, keepdim=True)
    feats = torch.cat([(mean_scale * mean).expand_as(pts), pts - mean], dim=2)  # (B, N, 2K, 3)
    return feats.flatten(2)


def vertex_errors_mm(vertices: Tensor, gt_vertices: Tensor,
                     indices: Tensor | np.ndarray | Sequence[int]) -> Tensor:
    """Mean absolute per-coordinate error in mm over the selected vertices.

    Args: vertices (B, N, V, 3) m; gt_vertices (B, V, 3) m; indices (K,).
    Returns: (B, N).
    """
    idx = _as_index(indices, vertices.device)
    diff = 1e3 * (gt_vertices[:, None, idx] - vertices[:, :, idx])
    return diff.abs().mean(dim=(-2, -1))


def listnet_loss(scores: Tensor, errors_mm: Tensor, temperature: float = 1.0,
                 reduction: str = "mean") -> Tensor:
    """ListNet top-1 loss: ``mean_b( -sum_n softmax(-e_b / T)_n * log_softmax(s_b)_n )``.

    Args: scores (B, N); errors_mm (B, N) (targets are computed without gradient);
        reduction: ``"mean"`` over the batch, or ``"none"`` for each example's loss.
    Returns: scalar, or (B,) with ``reduction="none"``.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    with torch.no_grad():
        target = torch.softmax(-errors_mm / temperature, dim=-1)
    if reduction == "none":
        return -(target * torch.log_softmax(scores, dim=-1)).sum(-1)
    return -(target * torch.log_softmax(scores, dim=-1)).sum(-1).mean()


# --------------------------------------------------------------- vertex indices
def load_vertex_indices(source, key: str = "face") -> np.ndarray:
    """Vertex indices for the ranker features, as a sorted-as-given int64 array (K,).

    Args:
        source: an index array / tensor / list; a dict with a ``key`` entry (the layout of
            FLAME's ``FLAME_masks.pkl``); a path to a ``.npy`` file (e.g. the original
            ``frontindices.npy``, 1785 indices) or to a ``.pkl`` holding such a dict.
        key: the region to take from a dict (``"face"`` by default).

    Raises:
        AssetError: missing file, missing key or not a 1-D integer array.
    """
    name = "vertex indices"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise AssetError(f"vertex index file not found: {path}")
        if path.suffix == ".npy":
            try:
                source = np.load(path, allow_pickle=False)
            except ValueError as exc:
                raise AssetError(f"{path}: expected a plain integer .npy array ({exc})") from exc
        else:
            source = safe_load_pickle(path)  # the FLAME allow-list
    if isinstance(source, Mapping):
        if key not in source:
            raise AssetError(f"{name}: no {key!r} entry (found {sorted(map(str, source))[:8]})")
        source = source[key]
    arr = np.asarray(source.cpu() if isinstance(source, Tensor) else source)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise AssetError(f"{name}: expected a non-empty 1-D integer index array, got "
                         f"{arr.dtype} {arr.shape}")
    return arr.astype(np.int64)
