"""CO-545-style evaluation of expressive reconstruction under occlusion (accuracy + diversity).

The OFER paper's exact CO-545 metric definitions are not public (see ``docs/eval.md``); this
module implements the documented Diverse3DFace forms (ASD as mean nearest-neighbour per-vertex
RMS distance, CSE as the closest sample's RMSE) plus the explicit choices below, each a
parameter / CLI flag with a default:

* accuracy (CSE, SE): each sample is aligned to the ground truth by a least-squares similarity
  (``align='similarity'``; or ``'rigid'``, ``'none'``) fitted on the visible region vertices
  (``align_on='visible'``), then the per-vertex RMS error (``distance='v2v'``; or the RMS of
  point-to-surface distances ``'p2s'``) is measured on the evaluation region and separately on
  its visible and occluded parts;
* SE is reported for the ranked sample (``selected`` index, default 0) and for the vertex-wise
  mean of the samples;
* diversity (STD-S, ASD, maxASD, APD) is measured on the visible and the occluded part of the
  region in the samples' own frame (no alignment, as Diverse3DFace);
* all values are in mm (``unit_scale`` converts, e.g. 1000 for FLAME metres).

The core, :func:`co545_metrics`, takes arrays; file reading is a thin layer
(:func:`evaluate_co545`, CLI ``python -m ofer.eval.co545``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import OferError
from .geometry import MeshDistance, read_mesh, umeyama
from ..flame import FLAME
from ..io import atomic_write_bytes, identity_coefficients

__all__ = ["Co545Error", "co545_metrics", "aggregate", "evaluate_co545", "main", "METRIC_KEYS"]


class Co545Error(OferError, ValueError):
    """An input of the CO-545 evaluation is missing or malformed (one-line message)."""


METRIC_KEYS = (
    "cse", "cse_visible", "cse_occluded", "cse_index",
    "se_ranked", "se_ranked_visible", "se_ranked_occluded",
    "se_mean", "se_mean_visible", "se_mean_occluded",
    "std_visible", "std_occluded", "asd_visible", "asd_occluded",
    "max_asd_visible", "max_asd_occluded", "apd_visible", "apd_occluded",
    "n_samples", "n_visible", "n_occluded",
)


def _pairwise_rms(X: np.ndarray) -> np.ndarray:
    """``d(i,j) = sqrt(mean_v ||x_iv - x_jv||²)`` for samples ``X (K, R, 3)`` -> ``(K, K)``."""
    K, R = X.shape[:2]
    D = np.zeros((K, K))
    for i in range(K):  # explicit differences: no Gram-matrix cancellation
        D[i] = np.sqrt(np.sum((X - X[i]) ** 2, axis=(1, 2)) / max(R, 1))
    return D


def _diversity(X: np.ndarray) -> dict:
    """STD-S, ASD (nearest neighbour), maxASD (farthest) and APD (mean pair) of ``X (K, R, 3)``."""
    K, R = X.shape[:2]
    nan = float("nan")
    if R == 0:
        return {"std": nan, "asd": nan, "max_asd": nan, "apd": nan}
    mean = X.mean(axis=0)
    std = float(np.mean(np.sqrt(np.mean(np.sum((X - mean) ** 2, axis=-1), axis=0))))
    if K < 2:
        return {"std": std, "asd": nan, "max_asd": nan, "apd": nan}
    D = _pairwise_rms(X)
    off = ~np.eye(K, dtype=bool)
    asd = float(np.mean(np.min(np.where(off, D, np.inf), axis=1)))
    max_asd = float(np.mean(np.max(np.where(off, D, -np.inf), axis=1)))
    apd = float(np.mean(D[np.triu_indices(K, 1)]))
    return {"std": std, "asd": asd, "max_asd": max_asd, "apd": apd}


def _rms(a: np.ndarray, b: np.ndarray, ids: np.ndarray) -> float:
    if len(ids) == 0:
        return float("nan")
    return float(np.sqrt(np.mean(np.sum((a[ids] - b[ids]) ** 2, axis=-1))))


def co545_metrics(samples: np.ndarray, gt: np.ndarray, visible: np.ndarray, faces: np.ndarray | None = None,
                  region: np.ndarray | None = None, exclude: np.ndarray | None = None, selected: int = 0,
                  align: str = "similarity", align_on: str = "visible", distance: str = "v2v",
                  unit_scale: float = 1.0) -> dict:
    """Accuracy and diversity of ``K`` sampled meshes against one ground-truth mesh.

    Args:
        samples: ``(K, V, 3)`` sampled meshes (same topology as ``gt``).
        gt: ``(V, 3)`` ground-truth mesh.
        visible: ``(V,) bool`` per-vertex visibility (``False`` = occluded).
        faces: ``(F, 3)`` triangles; needed only for ``distance='p2s'``.
        region: vertex indices of the evaluation region (default all ``V``).
        exclude: vertex indices removed from the occluded set (e.g. FLAME eyeballs, as D3F).
        selected: index of the ranked / chosen sample for SE.
        align: ``'similarity'`` | ``'rigid'`` | ``'none'`` for accuracy metrics.
        align_on: ``'visible'`` (visible part of the region) | ``'region'`` | ``'all'``.
        distance: ``'v2v'`` per-vertex RMS error, or ``'p2s'`` RMS of GT-vertex to predicted surface.
        unit_scale: multiply all lengths by this (1000 converts metres to mm).

    Returns:
        dict with the keys of :data:`METRIC_KEYS` (floats in mm; NaN where undefined, e.g.
        ASD with ``K = 1`` or an empty occluded set).
    """
    X = np.asarray(samples, dtype=np.float64)
    if X.ndim == 2:
        X = X[None]
    G = np.asarray(gt, dtype=np.float64)
    vis = np.asarray(visible).astype(bool).reshape(-1)
    if X.ndim != 3 or X.shape[2] != 3 or G.shape != X.shape[1:]:
        raise Co545Error(f"samples must be (K, V, 3) and gt (V, 3) with the same V; got {X.shape} and {G.shape}")
    K, V = X.shape[:2]
    if vis.shape != (V,):
        raise Co545Error(f"visibility mask must have one entry per vertex ({V}), got shape {vis.shape}")
    if not (0 <= selected < K):
        raise Co545Error(f"selected sample index {selected} out of range for {K} samples")
    if align not in ("similarity", "rigid", "none"):
        raise Co545Error(f"align must be similarity, rigid or none, got {align!r}")
    if align_on not in ("visible", "region", "all"):
        raise Co545Error(f"align_on must be visible, region or all, got {align_on!r}")
    if distance not in ("v2v", "p2s"):
        raise Co545Error(f"distance must be v2v or p2s, got {distance!r}")
    if distance == "p2s" and faces is None:
        raise Co545Error("distance='p2s' needs the mesh faces")
    X = X * unit_scale
    G = G * unit_scale
    reg = np.arange(V) if region is None else np.unique(np.asarray(region, dtype=np.int64))
    if len(reg) and (reg.min() < 0 or reg.max() >= V):
        raise Co545Error(f"region vertex indices out of range [0, {V})")
    vis_ids = reg[vis[reg]]
    occ_ids = reg[~vis[reg]]
    if exclude is not None:
        occ_ids = np.setdiff1d(occ_ids, np.asarray(exclude, dtype=np.int64))
    fit_ids = {"visible": vis_ids, "region": reg, "all": np.arange(V)}[align_on]

    def aligned(Y: np.ndarray) -> np.ndarray:
        if align == "none":
            return Y
        if len(fit_ids) < 3:
            raise Co545Error(f"cannot align on {len(fit_ids)} vertices (align_on={align_on!r}); use another region")
        s, R, t = umeyama(Y[fit_ids], G[fit_ids], with_scale=(align == "similarity"))
        return s * Y @ R.T + t

    def errors(Y: np.ndarray) -> tuple[float, float, float]:
        Ya = aligned(Y)
        if distance == "v2v":
            return _rms(Ya, G, reg), _rms(Ya, G, vis_ids), _rms(Ya, G, occ_ids)
        d = MeshDistance(Ya, faces).query(G)[0]

        def r(ids):
            return float(np.sqrt(np.mean(d[ids] ** 2))) if len(ids) else float("nan")

        return r(reg), r(vis_ids), r(occ_ids)

    per = np.array([errors(X[i]) for i in range(K)])  # (K, 3)
    best = int(np.nanargmin(per[:, 0])) if np.any(np.isfinite(per[:, 0])) else 0
    mean_err = errors(X.mean(axis=0))
    dv = _diversity(X[:, vis_ids])
    do = _diversity(X[:, occ_ids])
    return {
        "cse": float(per[best, 0]),
        "cse_visible": float(np.nanmin(per[:, 1])) if np.any(np.isfinite(per[:, 1])) else float("nan"),
        "cse_occluded": float(np.nanmin(per[:, 2])) if np.any(np.isfinite(per[:, 2])) else float("nan"),
        "cse_index": best,
        "se_ranked": float(per[selected, 0]), "se_ranked_visible": float(per[selected, 1]),
        "se_ranked_occluded": float(per[selected, 2]),
        "se_mean": mean_err[0], "se_mean_visible": mean_err[1], "se_mean_occluded": mean_err[2],
        "std_visible": dv["std"], "std_occluded": do["std"],
        "asd_visible": dv["asd"], "asd_occluded": do["asd"],
        "max_asd_visible": dv["max_asd"], "max_asd_occluded": do["max_asd"],
        "apd_visible": dv["apd"], "apd_occluded": do["apd"],
        "n_samples": K, "n_visible": int(len(vis_ids)), "n_occluded": int(len(occ_ids)),
    }


def aggregate(rows: Sequence[dict]) -> dict:
    """Mean and median over images of every numeric metric (NaNs ignored): ``{key: {mean, median, n}}``."""
    out = {}
    for k in METRIC_KEYS:
        if k in ("cse_index",):
            continue
        vals = np.array([r[k] for r in rows if k in r], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        out[k] = {"mean": float(vals.mean()) if vals.size else None,
                  "median": float(np.median(vals)) if vals.size else None, "n": int(vals.size)}
    return out


# ----------------------------------------------------------------------------------------
# File layer
# ----------------------------------------------------------------------------------------


def _load_npz(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError) as exc:
        raise Co545Error(f"cannot read {path}: {exc}") from exc


def _flame_vertices(d: dict, flame, path: Path, n: int | None = None) -> np.ndarray:
    """Meshes ``(K, V, 3)`` (FLAME units, metres) from coefficient keys through the FLAME layer."""
    import torch

    if flame is None:
        raise Co545Error(f"{path}: has no 'vertices' key; pass --flame to build meshes from FLAME coefficients")
    if "shape_coeffs" not in d and "identity_shape" not in d:
        raise Co545Error(f"{path}: needs 'vertices', 'shape_coeffs' or 'identity_shape' (+ optional "
                         "exp_coeffs, jaw_pose)")
    try:  # a group's mean identity (group.select=top_mean) wins over the ranked hypothesis
        shape = identity_coefficients(d).astype(np.float32)
    except ValueError as exc:
        raise Co545Error(f"{path}: {exc}") from exc
    exp = d.get("exp_coeffs")
    K = 1 if exp is None else np.atleast_2d(exp).shape[0]
    shape = np.broadcast_to(shape.reshape(1, -1), (K, shape.reshape(-1).shape[0]))
    kw = {"shape_coeffs": torch.from_numpy(np.ascontiguousarray(shape))}
    if exp is not None:
        kw["exp_coeffs"] = torch.from_numpy(np.atleast_2d(exp).astype(np.float32))
    for key, dim in (("jaw_pose", 3), ("global_pose", 3), ("neck_pose", 3), ("eye_pose", 6)):
        if key in d:
            kw[key] = torch.from_numpy(np.asarray(d[key], dtype=np.float32).reshape(-1, dim).repeat(
                K if np.asarray(d[key]).reshape(-1, dim).shape[0] == 1 else 1, axis=0))
    with torch.no_grad():
        out = flame(**kw)
    return out.vertices.detach().cpu().numpy().astype(np.float64)


def _image_ids(gt_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(gt_dir).with_suffix("")) for p in gt_dir.rglob("*.npz"))


def _find_pred(pred_dir: Path, image_id: str) -> Path | None:
    p = pred_dir / (image_id + ".npz")
    if p.is_file():
        return p
    d = pred_dir / image_id
    if d.is_dir():
        hits = sorted(d.glob("*.npz"))
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise Co545Error(f"{d}: {len(hits)} .npz files, expected one (samples of this image)")
    return None


def _index_file(path: str | None, name: str) -> np.ndarray | None:
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise Co545Error(f"--{name} file not found: {p}")
    if p.suffix == ".npy":
        a = np.load(p, allow_pickle=False)
    else:
        a = np.loadtxt(p, dtype=np.int64, ndmin=1)
    a = np.asarray(a)
    if a.dtype == bool:
        a = np.where(a)[0]
    return a.astype(np.int64).reshape(-1)


def evaluate_co545(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                   unit: str = "m", pred_key: str = "vertices", flame=None, region: np.ndarray | None = None,
                   exclude: np.ndarray | None = None, faces: np.ndarray | None = None, max_samples: int | None = None,
                   strict: bool = False, **kw) -> dict:
    """Evaluate a folder of sampled reconstructions against ground-truth meshes; write JSON + CSV.

    Ground truth: ``gt_dir/<image_id>.npz`` (any depth) with ``vertices (V,3)`` (or FLAME
    coefficients with ``flame``) and ``visible (V,) bool`` or ``occluded (V,) bool``; optional
    ``faces``. Predictions: ``pred_dir/<image_id>.npz`` or one ``.npz`` in ``pred_dir/<image_id>/``
    with ``pred_key`` ``(K,V,3)`` (or coefficients: ``shape_coeffs`` (ranked identity, or ``(N,300)``
    with ``ranked_index``, or ``identity_shape (n_shape,)`` which wins), ``exp_coeffs (K, n_exp)``,
    ``jaw_pose (K, 3)``) and optional ``ranked_index`` / ``selected``. ``unit``: the unit of all meshes (``m`` or ``mm``).
    Remaining keyword arguments go to :func:`co545_metrics`.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for p, what in ((pred_dir, "prediction"), (gt_dir, "ground-truth")):
        if not p.is_dir():
            raise Co545Error(f"{what} folder not found: {p}")
    if unit not in ("m", "mm"):
        raise Co545Error(f"unit must be m or mm, got {unit!r}")
    scale = 1000.0 if unit == "m" else 1.0
    ids = _image_ids(gt_dir)
    if not ids:
        raise Co545Error(f"no ground-truth .npz files under {gt_dir}")
    rows, missing = [], []
    for image_id in ids:
        gpath = gt_dir / (image_id + ".npz")
        g = _load_npz(gpath)
        ppath = _find_pred(pred_dir, image_id)
        if ppath is None:
            missing.append(image_id)
            continue
        p = _load_npz(ppath)
        G = g["vertices"] if "vertices" in g else _flame_vertices(g, flame, gpath)[0]
        if "visible" in g:
            vis = g["visible"].astype(bool)
        elif "occluded" in g:
            vis = ~g["occluded"].astype(bool)
        else:
            raise Co545Error(f"{gpath}: needs a per-vertex 'visible' or 'occluded' mask")
        X = p[pred_key] if pred_key in p else _flame_vertices(p, flame, ppath)
        X = np.asarray(X)
        if X.ndim == 2:
            X = X[None]
        if max_samples:
            X = X[:max_samples]
        if X.shape[1:] != np.asarray(G).shape:
            raise Co545Error(f"{ppath}: samples have shape {X.shape}, ground truth {gpath} has {np.asarray(G).shape}")
        f = faces if faces is not None else g.get("faces")
        sel = int(np.asarray(p.get("selected", 0)))
        row = {"image": image_id, **co545_metrics(X, G, vis, faces=f, region=region, exclude=exclude,
                                                   selected=min(sel, len(X) - 1), unit_scale=scale, **kw)}
        rows.append(row)
    if not rows:
        raise Co545Error(f"none of the {len(ids)} ground-truth images has a prediction under {pred_dir} "
                         "(expected <pred>/<image_id>.npz or <pred>/<image_id>/*.npz)")
    if strict and missing:
        raise Co545Error(f"{len(missing)} of {len(ids)} images have no prediction, e.g. {missing[0]}")
    summary = {
        "protocol": "CO-545-style (see docs/eval.md; not the paper's exact metrics)",
        "settings": {"align": kw.get("align", "similarity"), "align_on": kw.get("align_on", "visible"),
                     "distance": kw.get("distance", "v2v"), "unit": unit,
                     "region_size": None if region is None else int(len(np.unique(region))),
                     "excluded": 0 if exclude is None else int(len(np.unique(exclude))),
                     "max_samples": max_samples},
        "num_images": len(ids), "num_evaluated": len(rows), "missing": missing,
        "aggregate": aggregate(rows), "per_image": [_jsonable(r) for r in rows],
    }
    out = Path(out_dir) if out_dir else pred_dir / "co545_results"
    _write(out, rows, summary)
    summary["out_dir"] = str(out)
    return summary


def _jsonable(r: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}


def _write(out: Path, rows: list[dict], summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["image", *METRIC_KEYS], lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_bytes(out / "per_image.csv", lambda f: f.write(buf.getvalue().encode()))
    atomic_write_bytes(out / "summary.json", lambda f: f.write(json.dumps(summary, indent=2).encode()))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ofer.eval.co545", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pred", required=True, help="folder of <image_id>.npz (or <image_id>/*.npz) sample files")
    ap.add_argument("--gt", required=True, help="folder of <image_id>.npz ground truth with a visibility mask")
    ap.add_argument("--out", default=None, help="output folder (default <pred>/co545_results)")
    ap.add_argument("--unit", choices=["m", "mm"], default="m", help="unit of all meshes (results are mm)")
    ap.add_argument("--pred-key", default="vertices", help="npz key of the (K, V, 3) samples")
    ap.add_argument("--align", choices=["similarity", "rigid", "none"], default="similarity",
                    help="alignment of each sample to the GT for CSE/SE (diversity is never aligned)")
    ap.add_argument("--align-on", choices=["visible", "region", "all"], default="visible",
                    help="vertices the alignment is fitted on")
    ap.add_argument("--distance", choices=["v2v", "p2s"], default="v2v",
                    help="v2v: per-vertex RMS error; p2s: RMS of GT vertex to predicted surface")
    ap.add_argument("--region", default=None, help=".npy/.txt vertex indices (or bool mask) of the evaluation "
                    "region, e.g. the face area; default all vertices")
    ap.add_argument("--exclude", default=None, help=".npy/.txt vertex indices removed from the occluded set "
                    "(e.g. FLAME eyeballs)")
    ap.add_argument("--faces", default=None, help="mesh file whose faces are used for --distance p2s")
    ap.add_argument("--max-samples", type=int, default=None, help="use the first K samples per image (OFER: 15)")
    ap.add_argument("--flame", default=None, help="FLAME model file, to build meshes from coefficients")
    ap.add_argument("--strict", action="store_true", help="missing predictions are an error")
    a = ap.parse_args(argv)
    try:
        flame = None
        if a.flame:
            flame = FLAME(a.flame)
        faces = read_mesh(a.faces)[1] if a.faces else None
        s = evaluate_co545(a.pred, a.gt, a.out, a.unit, a.pred_key, flame, _index_file(a.region, "region"),
                           _index_file(a.exclude, "exclude"), faces, a.max_samples, a.strict, align=a.align,
                           align_on=a.align_on, distance=a.distance)
    except OferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"CO-545-style evaluation: {s['num_evaluated']} of {s['num_images']} images "
          f"(align={a.align} on {a.align_on}, distance={a.distance}); mean / median over images, mm")
    for k, v in s["aggregate"].items():
        if v["n"]:
            print(f"  {k:22s} {v['mean']:9.4f} {v['median']:9.4f}")
    print(f"results written to {s['out_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
