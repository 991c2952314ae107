"""How much the sampled hypotheses disagree, vertex by vertex, and how to show it.

* :func:`vertex_spread`: the per-vertex spread of K meshes of one topology, the root mean
  squared distance of each vertex to its mean position (the square root of the trace of its
  3x3 covariance over the hypotheses, population normalisation). Zero for identical
  hypotheses; scaling every hypothesis's offset from the mean by ``s`` scales it by ``|s|``.
  No alignment: OFER's hypotheses live in FLAME's canonical frame.
* :func:`select_far_apart`: a few hypotheses that differ the most from each other (a greedy
  farthest-point choice that starts from the one closest to the mean).
* :func:`load_regions` / :func:`region_summary`: the spread summarised on the face regions
  of a ``FLAME_masks.pkl`` (eyes, nose, mouth, forehead, cheeks).
* :func:`colorize`, :data:`COLORMAP`, :func:`nice_ceiling`: the colour map of the spread maps.
* :func:`roc_auc`: area under the ROC curve of a score for a binary label (how well the
  spread predicts, e.g., that a vertex is occluded).
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "vertex_spread",
    "select_far_apart",
    "REGIONS",
    "load_regions",
    "region_summary",
    "summarize",
    "COLORMAP",
    "colorize",
    "nice_ceiling",
    "roc_auc",
]

# ------------------------------------------------------------------------------------ spread


def vertex_spread(vertices: torch.Tensor | np.ndarray, dim: int = -3) -> torch.Tensor | np.ndarray:
    """Per-vertex spread of hypotheses ``(..., K, V, 3)`` (hypotheses along ``dim``) -> ``(..., V)``.

    ``sqrt(mean_k |v_k - mean_j v_j|^2)``, in the unit of the input (FLAME: metres). Returns
    the input's array type; identical hypotheses (or one) give exact zeros.
    """
    if isinstance(vertices, np.ndarray):
        return vertex_spread(torch.from_numpy(vertices), dim).numpy()
    if vertices.shape[-1] != 3 or vertices.dim() < 3:
        raise ValueError(f"expected hypotheses (..., K, V, 3), got {tuple(vertices.shape)}")
    # offsets from the first hypothesis first: identical hypotheses give exact zeros, and the
    # mean is taken of small numbers (float32 meshes far from the origin keep their precision)
    rel = vertices - vertices.narrow(dim, 0, 1)
    dev = rel - rel.mean(dim=dim, keepdim=True)
    return dev.pow(2).sum(-1).mean(dim=dim if dim >= 0 else dim + 1).sqrt()


def select_far_apart(vertices: torch.Tensor | np.ndarray, count: int) -> list[int]:
    """Indices of ``count`` of the K hypotheses ``(K, V, 3)`` that are far apart.

    The first is the hypothesis closest to the mean (a typical one); each next one is the
    hypothesis whose distance to the nearest one already chosen is the largest (distance:
    root mean squared vertex distance). Deterministic; ties go to the lower index.
    """
    v = torch.as_tensor(vertices)
    K = v.shape[0]
    count = max(0, min(int(count), K))
    if count == 0:
        return []
    flat = v.reshape(K, -1).double()
    d_mean = (flat - flat.mean(0, keepdim=True)).pow(2).sum(1)
    chosen = [int(torch.argmin(d_mean))]
    nearest = (flat - flat[chosen[0]]).pow(2).sum(1)
    while len(chosen) < count:
        nxt = int(torch.argmax(nearest))
        if nearest[nxt] <= 0:  # all remaining coincide with a chosen one: take them in order
            rest = [k for k in range(K) if k not in chosen]
            chosen += rest[:count - len(chosen)]
            break
        chosen.append(nxt)
        nearest = torch.minimum(nearest, (flat - flat[nxt]).pow(2).sum(1))
    return chosen


# ----------------------------------------------------------------------------------- regions

#: Summary regions and the ``FLAME_masks.pkl`` entries they are made of. ``cheeks`` has no
#: mask of its own: it is the ``face`` region less eyes, nose, lips and forehead.
REGIONS: dict[str, tuple[str, ...]] = {
    "eyes": ("eye_region",),
    "nose": ("nose",),
    "mouth": ("lips",),
    "forehead": ("forehead",),
    "cheeks": ("face", "-eye_region", "-nose", "-lips", "-forehead"),
}


def load_regions(source: str | os.PathLike | Mapping, n_vertices: Optional[int] = None) -> dict[str, np.ndarray]:
    """The :data:`REGIONS` (plus ``face``) as sorted vertex-index arrays, from a FLAME masks dict or file.

    Regions whose masks are missing (or empty) are left out. ``n_vertices``: drop indices
    outside the mesh (a masks file of another topology gives an error instead).
    """
    from .errors import AssetError
    from .flame.assets import safe_load_pickle

    masks = source if isinstance(source, Mapping) else safe_load_pickle(source)
    if not isinstance(masks, Mapping):
        raise AssetError(f"{source}: expected a dict of vertex-index arrays (FLAME_masks.pkl)")

    def idx(name: str) -> Optional[np.ndarray]:
        if name not in masks:
            return None
        a = np.unique(np.asarray(masks[name]).astype(np.int64).ravel())
        if n_vertices is not None and a.size and (a.min() < 0 or a.max() >= n_vertices):
            raise AssetError(f"masks entry {name!r} has vertex indices outside [0, {n_vertices}): "
                             "the masks file belongs to another mesh")
        return a

    out: dict[str, np.ndarray] = {}
    for region, parts in {"face": ("face",), **REGIONS}.items():
        base = idx(parts[0])
        if base is None:
            continue
        for p in parts[1:]:
            sub = idx(p[1:])
            if sub is not None:
                base = np.setdiff1d(base, sub)
        if base.size:
            out[region] = base
    return out


def region_summary(spread: np.ndarray, regions: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Mean spread on each region (in the spread's unit), rounded to 1e-4."""
    s = np.asarray(spread, dtype=np.float64)
    return {name: round(float(s[idx].mean()), 4) for name, idx in regions.items() if len(idx)}


def summarize(spread: np.ndarray, regions: Optional[Mapping[str, np.ndarray]] = None) -> dict:
    """JSON-ready summary of one spread map: mean, 95th percentile and maximum over all
    vertices, and the mean per region when ``regions`` are given."""
    s = np.asarray(spread, dtype=np.float64)
    out = {"mean": round(float(s.mean()), 4), "p95": round(float(np.percentile(s, 95)), 4),
           "max": round(float(s.max()), 4)}
    if regions:
        out["regions"] = region_summary(s, regions)
    return out


# ------------------------------------------------------------------------------------ colour

#: The spread colour map: (position in [0, 1], sRGB colour in [0, 1]) anchors, linearly
#: interpolated; light cool blue for no spread through green and amber to red for the top of
#: the scale (light enough at the bottom for a shaded mesh to stay readable).
COLORMAP: tuple[tuple[float, tuple[float, float, float]], ...] = (
    (0.00, (0.55, 0.66, 0.90)),
    (0.30, (0.35, 0.78, 0.78)),
    (0.55, (0.55, 0.84, 0.38)),
    (0.78, (0.98, 0.76, 0.22)),
    (1.00, (0.88, 0.18, 0.14)),
)


def colorize(values: np.ndarray, vmax: float, vmin: float = 0.0) -> np.ndarray:
    """Map values to sRGB ``uint8`` colours ``(..., 3)`` with :data:`COLORMAP` on [vmin, vmax]
    (values outside are clipped)."""
    v = np.asarray(values, dtype=np.float64)
    span = max(float(vmax) - float(vmin), 1e-12)
    t = np.clip((v - vmin) / span, 0.0, 1.0)
    pos = np.array([p for p, _ in COLORMAP])
    cols = np.array([c for _, c in COLORMAP])
    rgb = np.stack([np.interp(t, pos, cols[:, k]) for k in range(3)], axis=-1)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def nice_ceiling(x: float) -> float:
    """The smallest of 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 (x a power of ten) that is >= ``x``; 1 for
    ``x <= 0``. A colour scale's upper end."""
    if not x > 0 or not math.isfinite(x):
        return 1.0
    e = math.floor(math.log10(x))
    for m in (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0):
        c = m * 10.0 ** e
        if c >= x * (1 - 1e-12):
            return float(f"{c:.6g}")
    return float(10.0 ** (e + 1))


# ------------------------------------------------------------------------------------- AUC


def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the binary ``labels``.

    The probability that a random positive scores above a random negative, ties counting one
    half (the Mann-Whitney U statistic over the product of the class sizes, from average
    ranks). nan when a class is empty.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"roc_auc: {s.size} scores for {y.size} labels")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size)
    sorted_s = s[order]
    # average rank (1-based) of each run of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
