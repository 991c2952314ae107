"""IdRank: pick the best of N IdGen identity hypotheses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..nets.rank_mlp import (
    RankMLP,
    listnet_loss,
    load_vertex_indices,
    rank_features,
    vertex_errors_mm,
)
from .diffusion import check_config_keys

__all__ = ["IdRank"]


class IdRank(nn.Module):
    """Scores N identity hypotheses of an image from their front-face vertices.

    Args:
        in_dim: feature width ``6 * K`` for K vertices (10710 for the original 1785).
        cond_dim: condition width (1024 = [FaRL || ArcFace]).
        hidden, groups: :class:`~ofer.nets.RankMLP` architecture.
        temperature: ListNet target temperature (mm; 1 in the original).
        mean_scale: weight of the set-mean half of the features (1 in the original). The
            mean holds absolute face coordinates (tens of mm) shared by all N hypotheses; a
            small weight keeps them from drowning the residuals (a few mm) that tell the
            hypotheses apart, which a ranker trained from scratch needs.
        vertex_indices: the K vertex indices (array, ``.npy`` / ``FLAME_masks.pkl``-style
            file or dict with a ``"face"`` entry, see
            :func:`~ofer.nets.rank_mlp.load_vertex_indices`). They are stored in the
            ``state_dict`` (buffer ``vertex_indices``), so a checkpoint carries them.

    ``state_dict`` keys: ``net.ranklayers.*`` (the original keys under ``net.``) and
    ``vertex_indices``.
    """

    kind: ClassVar[str] = "idrank"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "in_dim": 10710,
        "cond_dim": 1024,
        "hidden": (4096, 1024, 256, 64),
        "groups": 8,
        "temperature": 1.0,
        "mean_scale": 1.0,
    }
    vertex_indices: Tensor

    def __init__(self, in_dim: int = 10710, cond_dim: int = 1024,
                 hidden: Sequence[int] = (4096, 1024, 256, 64), groups: int = 8,
                 temperature: float = 1.0, mean_scale: float = 1.0, vertex_indices=None) -> None:
        super().__init__()
        if in_dim % 6:
            raise ConfigError(f"IdRank in_dim must be 6 * (number of vertices), got {in_dim}")
        self.net = RankMLP(in_dim, cond_dim, hidden, groups)
        self.temperature = float(temperature)
        if mean_scale < 0:
            raise ConfigError(f"IdRank mean_scale must be >= 0, got {mean_scale}")
        self.mean_scale = float(mean_scale)
        self.register_buffer("vertex_indices", torch.full((in_dim // 6,), -1, dtype=torch.long))
        if vertex_indices is not None:
            self.set_vertex_indices(vertex_indices)

    @property
    def num_vertices(self) -> int:
        return self.net.in_dim // 6

    @property
    def config(self) -> dict[str, Any]:
        """Plain dict of the architecture; :meth:`from_config` rebuilds it."""
        return {"in_dim": self.net.in_dim, "cond_dim": self.net.cond_dim,
                "hidden": list(self.net.hidden), "groups": self.net.groups,
                "temperature": self.temperature, "mean_scale": self.mean_scale}

    @classmethod
    def from_config(cls, config: dict[str, Any], vertex_indices=None) -> "IdRank":
        check_config_keys(cls.__name__, config, list(cls.DEFAULTS))
        return cls(**{**cls.DEFAULTS, **config}, vertex_indices=vertex_indices)

    def set_vertex_indices(self, source) -> None:
        """Set the K feature vertices (see the class docstring for accepted sources)."""
        idx = load_vertex_indices(source)
        if idx.shape[0] != self.num_vertices:
            raise ConfigError(f"IdRank with in_dim={self.net.in_dim} needs {self.num_vertices} "
                              f"vertex indices, got {idx.shape[0]}")
        self.vertex_indices.copy_(torch.from_numpy(np.ascontiguousarray(idx)))

    def _indices(self) -> Tensor:
        if bool((self.vertex_indices < 0).any()):
            raise ConfigError("IdRank has no vertex indices: pass vertex_indices= (e.g. the "
                              "original frontindices.npy or a FLAME_masks.pkl 'face' region)")
        return self.vertex_indices

    def features(self, vertices: Tensor) -> Tensor:
        """(B, N, V, 3) vertices in metres -> (B, N, in_dim)
        ``[mean_scale * mean || hyp - mean]`` in mm."""
        return rank_features(vertices, self._indices(), self.mean_scale)

    def forward(self, features: Tensor, cond: Tensor) -> Tensor:
        """Scores (B, N) for features (B, N, in_dim) and conditions (B, C)."""
        return self.net(features, cond)

    def training_loss(self, scores: Tensor, vertices: Tensor,
                      gt_vertices: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """ListNet loss against the hypotheses' true vertex errors.

        Args:
            scores: (B, N) from :meth:`forward`.
            vertices: (B, N, V, 3) the hypotheses, metres.
            gt_vertices: (B, V, 3) ground truth, metres.

        Returns:
            ``(loss, stats)``: scalar loss and ``{"errors_mm": (B, N) mean abs error,
            "picked_error_mm": (B,) error of the top-scored hypothesis,
            "best_error_mm": (B,) lowest error among the N}`` (stats detached).
        """
        errors = vertex_errors_mm(vertices, gt_vertices, self._indices())
        loss = listnet_loss(scores, errors, self.temperature)
        picked = errors.gather(1, self.select(scores)[:, None])[:, 0]
        return loss, {"errors_mm": errors.detach(), "picked_error_mm": picked.detach(),
                      "best_error_mm": errors.min(dim=1).values.detach()}

    @staticmethod
    def select(scores: Tensor) -> Tensor:
        """(B, N) scores -> (B,) int64 index of the best hypothesis (argmax)."""
        return scores.argmax(dim=1)
