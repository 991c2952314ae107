"""NoW benchmark evaluation (scan-to-mesh error), a faithful reimplementation of the official protocol.

Per image (see ``docs/eval.md`` for the full description):

1. crop the subject's scan to a sphere around the face, computed from the 7 scan landmarks;
2. map the prediction onto the scan with NoW's 7-landmark similarity Procrustes (float32,
   reflections allowed, as the original);
3. refine scale, rotation and translation by minimising Σ scan-to-mesh distance² with a
   dogleg solver identical in its steps to chumpy's (``[r, t]`` only with ``metrical``);
4. the error of each cropped scan vertex is its unsigned distance (mm) to the closest point
   on the aligned predicted surface.

Statistics (median, mean, population std) are pooled over all cropped scan vertices of all
evaluated images, overall and per challenge.

CLI::

    python -m ofer.eval.now --pred PRED_DIR --gt NOW_DIR [--images LIST] [--challenge neutral]
                            [--metrical --unit m] [--out DIR] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import OferError
from .geometry import (MeshError, ProcrustesResult, RefineResult, MeshDistance, procrustes_now,
                       read_mesh, refine_similarity_dogleg, validate_mesh)
from ..io import atomic_write_bytes, write_mesh

__all__ = [
    "CHALLENGES",
    "NowError",
    "load_pp",
    "load_landmarks",
    "compute_crop",
    "crop_scan",
    "ScanEvaluation",
    "evaluate_scan",
    "pooled_stats",
    "cumulative_error_curve",
    "save_cumulative_plot",
    "parse_image_list",
    "unit_warnings",
    "evaluate_now",
    "main",
]

CHALLENGES = ("multiview_neutral", "multiview_expressions", "multiview_occlusions", "selfie")
_ALIASES = {
    "neutral": "multiview_neutral", "expression": "multiview_expressions",
    "expressions": "multiview_expressions", "occlusion": "multiview_occlusions",
    "occlusions": "multiview_occlusions", "selfie": "selfie",
}
_UNITS = {"mm": 1.0, "cm": 10.0, "m": 1000.0}
DISPARITY_WARN = 0.1  # Procrustes standardised residual above which landmarks look mis-ordered
#: Plausible range of (bounding-box diagonal of the 7 predicted landmarks) / (that of the predicted
#: mesh): about 0.2-0.5 for a FLAME head, up to about 1 for a face-only mesh; a millimetre/metre
#: mix gives about 1000 or 0.001.
LANDMARK_EXTENT_RATIO = (0.1, 3.0)
#: Plausible bounding-box diagonal of a predicted head or face mesh, in mm (FLAME: about 370),
#: checked with ``metrical`` after applying the ``unit``.
HEAD_EXTENT_MM = (50.0, 1000.0)


class NowError(OferError, ValueError):
    """An input of the NoW evaluation is missing or malformed (one-line message)."""


# ----------------------------------------------------------------------------------------
# Landmarks
# ----------------------------------------------------------------------------------------


def load_pp(path: str | os.PathLike) -> np.ndarray:
    """Read a MeshLab PickedPoints ``.pp`` file -> ``(7, 3) float32`` in file order (NoW order 1..7).

    The original reads lines 8..14 of the file; this parses the XML ``<point x= y= z=/>``
    elements, which gives the same values for the NoW files and also tolerates other
    header lengths.
    """
    path = Path(path)
    if not path.is_file():
        raise NowError(f"scan landmark file not found: {path}")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise NowError(f"{path}: not a valid PickedPoints XML file ({exc})") from exc
    pts = []
    for el in root.iter("point"):
        try:
            pts.append([float(el.attrib["x"]), float(el.attrib["y"]), float(el.attrib["z"])])
        except (KeyError, ValueError) as exc:
            raise NowError(f"{path}: <point> without numeric x/y/z attributes") from exc
    if len(pts) != 7:
        raise NowError(f"{path}: expected 7 picked points (NoW landmarks), found {len(pts)}")
    return np.asarray(pts, dtype=np.float64).astype(np.float32)


def load_landmarks(path: str | os.PathLike) -> np.ndarray:
    """Read predicted 7 landmarks from ``.npy`` (``(7,3)`` or ``(1,7,3)``, dtype kept) or ``.txt``.

    ``.txt``: 7 lines of 3 numbers (float32), blank lines ignored.
    Raises :class:`NowError` naming the file for a wrong shape or non-finite values.
    """
    path = Path(path)
    if not path.is_file():
        raise NowError(f"landmark file not found: {path}")
    if path.suffix == ".npy":
        try:
            lmk = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise NowError(f"{path}: cannot read landmarks ({exc})") from exc
        if lmk.ndim == 3 and lmk.shape[0] == 1:
            lmk = lmk[0]
    else:
        rows = []
        with open(path, "r", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        rows.append([float(x) for x in line.split()])
                    except ValueError as exc:
                        raise NowError(f"{path}: non-numeric landmark line {line.strip()!r}") from exc
        try:
            lmk = np.asarray(rows, dtype=np.float32)
        except ValueError as exc:
            raise NowError(f"{path}: landmark lines have different lengths") from exc
    if lmk.shape != (7, 3):
        raise NowError(f"{path}: expected 7 landmarks of shape (7, 3) in NoW order, got shape {lmk.shape}")
    if not np.issubdtype(lmk.dtype, np.floating):
        lmk = lmk.astype(np.float64)
    if not np.all(np.isfinite(lmk)):
        raise NowError(f"{path}: landmarks contain NaN or infinite values")
    return lmk


# ----------------------------------------------------------------------------------------
# Per-scan evaluation
# ----------------------------------------------------------------------------------------


def compute_crop(scan_lmk: np.ndarray) -> tuple[np.ndarray, float]:
    """NoW face crop from the 7 scan landmarks: ``(centre (3,), radius)`` in scan units (mm).

    The sphere sits on the nose: with the bridge ``b`` (midpoint of the inner eye corners) and
    the nose bottom ``n``, ``centre = n + 0.3 (b − n)`` and
    ``radius = 1.4 (‖outer_R − outer_L‖ + ‖b − n‖) / 2``. Computed in float64 whatever the
    landmark dtype (``.pp`` landmarks are float32).
    """
    L = np.asarray(scan_lmk, dtype=np.float64)
    nose = L[4]
    nose_to_bridge = 0.5 * (L[1] + L[2]) - nose
    eye_span = np.linalg.norm(L[3] - L[0])
    centre = nose + 0.3 * nose_to_bridge
    return centre, float(1.4 * (eye_span + np.linalg.norm(nose_to_bridge)) / 2)


def crop_scan(scan_v: np.ndarray, scan_lmk: np.ndarray) -> np.ndarray:
    """Indices ``(K,) int64`` of the scan vertices kept by the NoW crop (``dist <= radius``, float64)."""
    centre, radius = compute_crop(scan_lmk)
    dist = np.linalg.norm(np.asarray(scan_v, dtype=np.float64) - centre, axis=1)
    return np.flatnonzero(dist <= radius).astype(np.int64)


@dataclass
class ScanEvaluation:
    """Result of :func:`evaluate_scan`.

    ``distances (K,) float64`` mm, one per cropped scan vertex; ``aligned_vertices`` the
    prediction in the scan frame; ``procrustes`` and ``refine`` the two alignment stages.
    """

    distances: np.ndarray
    aligned_vertices: np.ndarray
    procrustes: ProcrustesResult
    refine: RefineResult
    crop_ids: np.ndarray
    warnings: list[str] = field(default_factory=list)


def _extent(points: np.ndarray) -> float:
    """Bounding-box diagonal of a point set."""
    P = np.asarray(points, dtype=np.float64)
    return float(np.linalg.norm(P.max(axis=0) - P.min(axis=0))) if len(P) else 0.0


def _coincide(points: np.ndarray) -> bool:
    """Whether the points are all the same point (to 1e-6 of their magnitude)."""
    P = np.asarray(points, dtype=np.float64)
    spread = float(np.sqrt(np.sum((P - P.mean(axis=0)) ** 2)))
    return spread <= 1e-6 * float(np.abs(P).max())


def unit_warnings(pred_v: np.ndarray, pred_lmk: np.ndarray, metrical: bool = False, unit: str = "m",
                  name: str = "prediction") -> list[str]:
    """Warnings for a prediction whose units look inconsistent (see ``docs/eval.md``).

    * the landmarks' bounding-box diagonal divided by the mesh's is outside
      :data:`LANDMARK_EXTENT_RATIO` (landmarks in mm beside a mesh in metres give about 1000);
    * with ``metrical``, the mesh's diagonal in mm (after the ``unit`` factor) is outside
      :data:`HEAD_EXTENT_MM` (``--unit mm`` on a mesh in metres gives about 0.4 mm).
    """
    out = []
    mesh, lmk = _extent(pred_v), _extent(pred_lmk)
    lo, hi = LANDMARK_EXTENT_RATIO
    if mesh > 0 and not lo <= lmk / mesh <= hi:
        out.append(f"{name}: the landmarks span {lmk / mesh:.3g} times the mesh's extent (expected "
                   f"{lo}-{hi}); are landmarks and mesh in different units (about 1000: landmarks in mm, "
                   "mesh in metres)?")
    if metrical:
        size = mesh * _UNITS[unit]
        lo, hi = HEAD_EXTENT_MM
        if not lo <= size <= hi:
            out.append(f"{name}: with --unit {unit} the mesh spans {size:.3g} mm, not a head's "
                       f"{lo:g}-{hi:g} mm; is --unit the unit of the mesh?")
    return out


def evaluate_scan(scan_v: np.ndarray, scan_lmk: np.ndarray, pred_v: np.ndarray, pred_f: np.ndarray,
                  pred_lmk: np.ndarray, metrical: bool = False, unit: str = "m",
                  crop_ids: np.ndarray | None = None, name: str = "prediction") -> ScanEvaluation:
    """NoW error of one prediction against one scan.

    Args:
        scan_v: ``(Ns, 3)`` scan vertices (mm). scan_lmk: ``(7, 3)`` scan landmarks (float32 as
            read from ``.pp``). pred_v: ``(Nv, 3)``, pred_f: ``(M, 3)`` predicted mesh.
        pred_lmk: ``(7, 3)`` predicted landmarks in NoW order (same units as ``pred_v``).
        metrical: NoW's metrical protocol: ``v' = k (v @ T) + c`` with ``k`` the unit factor
            (``unit`` in mm/cm/m) and ``c`` the Procrustes translation (still computed with the
            Procrustes scale, as the original), then refinement of rotation and translation only.
        crop_ids: precomputed :func:`crop_scan` indices (optional, for reuse across images).

    ``warnings`` lists a reflected or poor landmark fit and units that look inconsistent
    (:func:`unit_warnings`). Landmarks that are all one point raise :class:`NowError`.
    """
    warnings_: list[str] = []
    if crop_ids is None:
        crop_ids = crop_scan(scan_v, scan_lmk)
    scan_c = np.asarray(scan_v, dtype=np.float64)[crop_ids]
    if len(scan_c) == 0:
        raise NowError(f"{name}: the scan crop is empty; are the scan landmarks in the scan's frame and units (mm)?")
    for what, L in (("predicted", pred_lmk), ("scan", scan_lmk)):
        if _coincide(L):
            raise NowError(f"{name}: the 7 {what} landmarks are all the same point; they cannot align "
                           "the prediction")
    warnings_ += unit_warnings(pred_v, pred_lmk, metrical, unit, name)
    pr = procrustes_now(scan_lmk, pred_lmk)
    if pr.is_reflection:
        warnings_.append(f"{name}: the landmark alignment is a reflection; are left/right landmarks swapped? "
                         "(NoW order: R-eye outer, R-eye inner, L-eye inner, L-eye outer, nose, R-mouth, L-mouth)")
    elif pr.disparity > DISPARITY_WARN:
        warnings_.append(f"{name}: landmarks fit the scan landmarks poorly (Procrustes disparity "
                         f"{pr.disparity:.3f} > {DISPARITY_WARN}); check their order and units")
    pv = np.asarray(pred_v, dtype=np.float64)
    k = _UNITS[unit] if metrical else pr.scale
    v1 = k * (pr.rotation.T.dot(pv.T).T) + pr.translation
    v1 = np.asarray(v1, dtype=np.float64)
    ref = refine_similarity_dogleg(scan_c, v1, pred_f, fix_scale=metrical)
    v2 = ref.apply(v1)
    dist = MeshDistance(v2, pred_f).query(scan_c)[0]
    return ScanEvaluation(distances=dist, aligned_vertices=v2, procrustes=pr, refine=ref, crop_ids=crop_ids,
                          warnings=warnings_)


# ----------------------------------------------------------------------------------------
# Statistics and curve
# ----------------------------------------------------------------------------------------


def pooled_stats(arrays: Sequence[np.ndarray]) -> dict:
    """Pooled ``median, mean, std`` (population) over the concatenation of per-image arrays."""
    if len(arrays) == 0:
        return {"median": None, "mean": None, "std": None, "n_images": 0, "n_points": 0}
    cat = np.concatenate([np.asarray(a, dtype=np.float64) for a in arrays])
    return {"median": float(np.median(cat)), "mean": float(np.mean(cat)), "std": float(np.std(cat)),
            "n_images": len(arrays), "n_points": int(cat.size)}


def cumulative_error_curve(errors: np.ndarray, bins: int = 100000) -> tuple[np.ndarray, np.ndarray]:
    """NoW's cumulative error curve: ``x`` = histogram bin left edges over [min, max],
    ``y`` = percentage of errors in bins up to and including each one (``100·cumsum/N``)."""
    errors = np.asarray(errors, dtype=np.float64)
    counts, edges = np.histogram(errors, bins=bins)
    y = 100.0 * np.cumsum(counts) / max(errors.size, 1)
    return edges[:-1], y


def save_cumulative_plot(path: str | os.PathLike, curves: dict[str, tuple[np.ndarray, np.ndarray]],
                         size: tuple[int, int] = (640, 480)) -> None:
    """Draw cumulative error curves with PIL (x 0–8 mm, y 0–100 %, as NoW's plot) and save a PNG."""
    from PIL import Image, ImageDraw

    W, H = size
    left, right, top, bottom = 60, 20, 20, 50
    img = Image.new("RGB", (W, H), "white")
    dr = ImageDraw.Draw(img)
    pw, ph = W - left - right, H - top - bottom

    def to_px(x, y):
        return left + x / 8.0 * pw, top + (1 - y / 100.0) * ph

    for xt in range(9):
        px, _ = to_px(xt, 0)
        dr.line([(px, top), (px, top + ph)], fill=(225, 225, 225))
        dr.text((px - 3, top + ph + 5), str(xt), fill="black")
    for yt in range(0, 101, 20):
        _, py = to_px(0, yt)
        dr.line([(left, py), (left + pw, py)], fill=(225, 225, 225))
        dr.text((left - 28, py - 6), str(yt), fill="black")
    dr.rectangle([left, top, left + pw, top + ph], outline="black")
    dr.text((left + pw // 2 - 30, H - 22), "Error [mm]", fill="black")
    dr.text((5, top + ph // 2 - 40), "Percentage", fill="black")
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    for k, (label, (x, y)) in enumerate(curves.items()):
        col = colours[k % len(colours)]
        x = np.asarray(x)
        y = np.asarray(y)
        keep = x <= 8.0
        if keep.sum() < 2:
            keep = np.ones_like(x, dtype=bool)
        xs, ys = x[keep], y[keep]
        if len(xs) > 2000:  # subsample for drawing only
            sel = np.unique(np.linspace(0, len(xs) - 1, 2000).astype(int))
            xs, ys = xs[sel], ys[sel]
        pts = [to_px(min(a, 8.0), b) for a, b in zip(xs, ys)]
        pts = [to_px(0.0, 0.0)] + pts if xs[0] > 0 else pts
        dr.line(pts, fill=col, width=2)
        dr.line([(left + pw - 150, top + 12 + 16 * k), (left + pw - 125, top + 12 + 16 * k)], fill=col, width=2)
        dr.text((left + pw - 120, top + 6 + 16 * k), label, fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)

    atomic_write_bytes(path, lambda f: img.save(f, format="PNG"))


# ----------------------------------------------------------------------------------------
# Dataset layer
# ----------------------------------------------------------------------------------------


@dataclass
class ImageEntry:
    index: int
    line: str
    subject: str
    challenge: str
    filename: str

    @property
    def stem(self) -> str:
        return self.filename[:-4] if len(self.filename) > 4 and self.filename[-4] == "." else \
            os.path.splitext(self.filename)[0]


def parse_image_list(path: str | os.PathLike) -> list[ImageEntry]:
    """Parse a NoW image list (``<subject>/<challenge>/<IMG>.jpg`` per line; longer prefixes allowed)."""
    path = Path(path)
    if not path.is_file():
        raise NowError(f"image list not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first line
    except UnicodeDecodeError as exc:
        raise NowError(f"image list {path} is not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise NowError(f"cannot read image list {path}: {exc.strerror or exc}") from exc
    out = []
    for i, line in enumerate(text.splitlines()):
        line = line.strip()
        if not line:
            continue
        parts = line.split("/")
        if len(parts) < 3:
            raise NowError(f"{path}:{i + 1}: expected '<subject>/<challenge>/<image>', got {line!r}")
        out.append(ImageEntry(len(out), line, parts[-3], parts[-2], parts[-1]))
    if not out:
        raise NowError(f"image list {path} is empty")
    return out


def _find_prediction(pred_dir: Path, e: ImageEntry) -> tuple[Path | None, Path | None]:
    base = pred_dir / e.subject / e.challenge / e.stem
    mesh = next((p for p in (base.with_name(e.stem + ".obj"), base.with_name(e.stem + ".ply")) if p.is_file()), None)
    lmk = next((p for p in (base.with_name(e.stem + ".npy"), base.with_name(e.stem + ".txt")) if p.is_file()), None)
    return mesh, lmk


def _first(folder: Path, patterns: Iterable[str]) -> Path | None:
    for pat in patterns:
        hits = sorted(folder.glob(pat))
        if hits:
            return hits[0]
    return None


def _evaluate_subject(args) -> list[dict]:
    """Worker: evaluate all images of one subject (scan loaded and cropped once)."""
    scan_path, pp_path, items, metrical, unit, check_dir = args
    scan_v, scan_f = read_mesh(scan_path)
    if scan_v.shape[0] == 0 or not np.all(np.isfinite(scan_v)):
        raise NowError(f"{scan_path}: scan has no vertices or non-finite coordinates")
    scan_lmk = load_pp(pp_path)
    ids = crop_scan(scan_v, scan_lmk)
    out = []
    for e, mesh_path, lmk_path in items:
        pv, pf = read_mesh(mesh_path)
        warns = validate_mesh(pv, pf, str(mesh_path), warn=False)
        lmk = load_landmarks(lmk_path)
        ev = evaluate_scan(scan_v, scan_lmk, pv, pf, lmk, metrical=metrical, unit=unit, crop_ids=ids,
                           name=str(lmk_path))
        if check_dir is not None:
            d = Path(check_dir) / e.subject / e.challenge / e.filename
            try:
                write_mesh(d / "predicted_aligned.obj", ev.aligned_vertices, pf, unit="mm", source_unit="mm")
                write_mesh(d / "gt_scan_cropped.obj", scan_v[ids], None, unit="mm", source_unit="mm")
            except OSError as exc:
                raise NowError(f"cannot write the alignment check to {d}: {exc.strerror or exc}") from exc
        out.append({
            "index": e.index, "line": e.line, "subject": e.subject, "challenge": e.challenge,
            "distances": ev.distances, "warnings": warns + ev.warnings,
            "procrustes_scale": float(ev.procrustes.scale), "procrustes_disparity": ev.procrustes.disparity,
            "reflection": ev.procrustes.is_reflection, "refine_scale": ev.refine.s,
            "refine_iterations": ev.refine.iterations, "refine_fevals": ev.refine.fevals,
            "refine_stop": ev.refine.stop, "n_points": int(ev.distances.size),
        })
    return out


def evaluate_now(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike | None = None,
                 images: str | os.PathLike | None = None, challenge: str = "", metrical: bool = False,
                 unit: str = "m", out_dir: str | os.PathLike | None = None, method: str = "RECON",
                 workers: int = 1, strict: bool = False, gt_mesh_dir: str | os.PathLike | None = None,
                 gt_lmk_dir: str | os.PathLike | None = None, image_set: str = "val",
                 check_alignment_dir: str | os.PathLike | None = None, quiet: bool = False) -> dict:
    """Evaluate a folder of NoW predictions; write results to ``out_dir`` and return the summary.

    Layout (as the official evaluation): ``gt_dir/scans/<subject>/*.obj`` (first match),
    ``gt_dir/scans_lmks_onlypp/<subject>/*.pp``, image list ``gt_dir/imagepathsvalidation.txt``
    (``image_set='val'``) or ``imagepathstest.txt``; predictions
    ``pred_dir/<subject>/<challenge>/<IMG>.obj|.ply`` with ``<IMG>.npy|.txt`` landmarks.
    Images without a prediction are counted as missing (an error with ``strict``).

    Written to ``out_dir`` (default ``pred_dir/results``): ``<method>_computed_distances[_<ch>].npy``
    (the original's pickled-dict format), ``.meanmedian``, ``distances.npz`` (no pickle),
    ``summary.json``, ``cumulative_error.npz`` and ``cumulative_error.png``.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise NowError(f"prediction folder not found: {pred_dir}")
    if challenge:
        challenge = _ALIASES.get(challenge, challenge)
        if challenge not in CHALLENGES:
            raise NowError(f"unknown challenge {challenge!r}; expected one of {', '.join(CHALLENGES)} "
                           "(or neutral/expression/occlusion/selfie)")
    if unit not in _UNITS:
        raise NowError(f"unknown --unit {unit!r}; expected mm, cm or m")
    out = Path(out_dir) if out_dir else pred_dir / "results"
    _check_folder(out, "output folder")
    if check_alignment_dir is not None:
        _check_folder(Path(check_alignment_dir), "--check-alignment folder")
    gt = Path(gt_dir) if gt_dir is not None else None
    if images is None:
        if gt is None:
            raise NowError("give --gt (the NoW dataset folder) or --images with --gt-mesh-dir and --gt-lmk-dir")
        images = gt / ("imagepathsvalidation.txt" if image_set == "val" else "imagepathstest.txt")
    mesh_root = Path(gt_mesh_dir) if gt_mesh_dir else (gt / "scans" if gt else None)
    lmk_root = Path(gt_lmk_dir) if gt_lmk_dir else (gt / "scans_lmks_onlypp" if gt else None)
    if mesh_root is None or lmk_root is None:
        raise NowError("ground-truth scan and landmark folders are not set (use --gt or --gt-mesh-dir/--gt-lmk-dir)")
    entries = parse_image_list(images)
    for e in entries:
        if e.challenge not in CHALLENGES:
            raise NowError(f"{images}:{e.index + 1}: unknown challenge folder {e.challenge!r} in {e.line!r}")
    selected = [e for e in entries if not challenge or e.challenge == challenge]

    # resolve files, grouped per subject
    missing: list[str] = []
    by_subject: dict[str, list] = {}
    for e in selected:
        mesh, lmk = _find_prediction(pred_dir, e)
        if mesh is None or lmk is None:
            what = "mesh (.obj/.ply)" if mesh is None else "landmarks (.npy/.txt)"
            missing.append(f"{e.line}: no predicted {what}")
            continue
        by_subject.setdefault(e.subject, []).append((e, mesh, lmk))
    if not by_subject:
        raise NowError(f"none of the {len(selected)} images listed in {images} has a prediction under {pred_dir} "
                       "(expected <pred>/<subject>/<challenge>/<IMG>.obj|.ply and <IMG>.npy|.txt)")
    if strict and missing:
        raise NowError(f"{len(missing)} of {len(selected)} images have no prediction, e.g. {missing[0]}")
    listed = {(e.subject, e.challenge, e.stem) for e in entries}
    extra = [p for p in pred_dir.glob("*/*/*") if p.suffix in (".obj", ".ply")
             and (p.parent.parent.name, p.parent.name, p.stem) not in listed and p.parent.parent.parent == pred_dir]
    jobs = []
    for subject, items in by_subject.items():
        scan = _first(mesh_root / subject, ["*.obj", "*.ply"])
        pp = _first(lmk_root / subject, ["*.pp"])
        if scan is None:
            raise NowError(f"no ground-truth scan for subject {subject!r}: expected {mesh_root / subject}/*.obj")
        if pp is None:
            raise NowError(f"no scan landmarks for subject {subject!r}: expected {lmk_root / subject}/*.pp")
        jobs.append((scan, pp, items, metrical, unit, check_alignment_dir))

    results: list[dict] = []
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            for res in ex.map(_evaluate_subject, jobs):
                results.extend(res)
    else:
        for job in jobs:
            results.extend(_evaluate_subject(job))
    results.sort(key=lambda r: r["index"])

    warn_lines = [w for r in results for w in r["warnings"]]
    if extra:
        warn_lines.append(f"{len(extra)} predicted meshes under {pred_dir} are not in the image list, "
                          f"e.g. {extra[0].relative_to(pred_dir)}")
    if not quiet:
        for w in warn_lines:
            print(f"warning: {w}", file=sys.stderr)
    if strict:
        refl = [r for r in results if r["reflection"]]
        if refl:
            raise NowError(f"{len(refl)} images align by a reflection (swapped landmarks?), e.g. {refl[0]['line']}")

    arrays = [r["distances"] for r in results]
    summary: dict = {
        "protocol": "NoW metrical" if metrical else "NoW non-metrical",
        "unit": unit if metrical else None,
        "image_list": str(images),
        "challenge": challenge or "all",
        "overall": pooled_stats(arrays),
        "per_challenge": {c: pooled_stats([r["distances"] for r in results if r["challenge"] == c])
                          for c in CHALLENGES if not challenge or c == challenge},
        "num_images": len(selected),
        "num_evaluated": len(results),
        "num_missing_files": len(missing),
        "missing": missing,
        "warnings": warn_lines,
        "per_image": [{k: v for k, v in r.items() if k not in ("distances", "index")} | {
            "median": float(np.median(r["distances"])), "mean": float(np.mean(r["distances"]))} for r in results],
    }

    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_outputs(out, method + ("_metrical" if metrical else ""), challenge, results, summary)
    except OSError as exc:
        raise NowError(f"cannot write the results to {out}: {exc.strerror or exc}") from exc
    summary["out_dir"] = str(out)
    return summary


def _check_folder(folder: Path, what: str) -> None:
    """Refuse an output folder that is a file or lies under one, before any work is done."""
    p = folder
    while not p.exists() and p.parent != p:
        p = p.parent
    if p.exists() and not p.is_dir():
        where = "is a file" if p == folder else f"lies under the file {p}"
        raise NowError(f"{what} {folder} {where}")


def _write_outputs(out: Path, method: str, challenge: str, results: list[dict], summary: dict) -> None:
    import io


    arrays = [r["distances"] for r in results]
    suffix = "distances" if not challenge else f"distances_{challenge}"
    legacy = out / f"{method}_computed_{suffix}.npy"
    payload = {"computed_distances": arrays, "num_missing_files": summary["num_missing_files"],
               "input_files": np.array([r["line"] for r in results])}

    def _w_legacy(f):
        np.save(f, payload, allow_pickle=True)

    atomic_write_bytes(legacy, _w_legacy)
    ov = summary["overall"]
    atomic_write_bytes(Path(str(legacy) + ".meanmedian"),
                       lambda f: f.write(f"{ov['median']}\n{ov['mean']}\n".encode()))
    cat = np.concatenate(arrays)
    offsets = np.cumsum([0] + [a.size for a in arrays])

    def _w_npz(f):
        buf = io.BytesIO()
        np.savez(buf, distances=cat, offsets=offsets, input_files=np.array([r["line"] for r in results]),
                 challenges=np.array([r["challenge"] for r in results]))
        f.write(buf.getvalue())

    atomic_write_bytes(out / "distances.npz", _w_npz)
    curves = {"all": cumulative_error_curve(cat)}
    for c in CHALLENGES:
        sel = [r["distances"] for r in results if r["challenge"] == c]
        if sel and (challenge == "" or challenge == c):
            curves[c] = cumulative_error_curve(np.concatenate(sel))

    def _w_curve(f):
        buf = io.BytesIO()
        np.savez(buf, **{f"{k}_x": v[0] for k, v in curves.items()}, **{f"{k}_y": v[1] for k, v in curves.items()})
        f.write(buf.getvalue())

    atomic_write_bytes(out / "cumulative_error.npz", _w_curve)
    save_cumulative_plot(out / "cumulative_error.png", curves)
    atomic_write_bytes(out / "summary.json", lambda f: f.write(json.dumps(summary, indent=2).encode()))


def _fmt(st: dict) -> str:
    if st["median"] is None:
        return "    -      -      -      0"
    return f"{st['median']:6.3f} {st['mean']:6.3f} {st['std']:6.3f} {st['n_images']:6d}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ofer.eval.now", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pred", required=True, help="prediction folder <subject>/<challenge>/<IMG>.obj|.ply + .npy|.txt")
    ap.add_argument("--gt", default=None, help="NoW dataset folder (scans/, scans_lmks_onlypp/, image lists)")
    ap.add_argument("--images", default=None, help="image list (default: <gt>/imagepathsvalidation.txt)")
    ap.add_argument("--image-set", choices=["val", "test"], default="val")
    ap.add_argument("--gt-mesh-dir", default=None, help="override <gt>/scans")
    ap.add_argument("--gt-lmk-dir", default=None, help="override <gt>/scans_lmks_onlypp")
    ap.add_argument("--challenge", default="", help="evaluate one challenge only: neutral, expression, occlusion, "
                    "selfie (or the multiview_* folder names); default all, with a per-challenge breakdown")
    ap.add_argument("--metrical", action="store_true", help="NoW metrical protocol (scale fixed to the unit factor)")
    ap.add_argument("--unit", choices=sorted(_UNITS), default="m", help="predicted mesh unit for --metrical")
    ap.add_argument("--out", default=None, help="output folder (default <pred>/results)")
    ap.add_argument("--method", default="RECON", help="method identifier used in output file names")
    ap.add_argument("--workers", type=int, default=1, help="processes (one subject per task)")
    ap.add_argument("--strict", action="store_true", help="missing predictions or reflected landmark fits are errors")
    ap.add_argument("--check-alignment", default=None, metavar="DIR", help="write aligned meshes and cropped scans here")
    a = ap.parse_args(argv)
    try:
        s = evaluate_now(a.pred, a.gt, a.images, a.challenge, a.metrical, a.unit, a.out, a.method, a.workers,
                         a.strict, a.gt_mesh_dir, a.gt_lmk_dir, a.image_set, a.check_alignment)
    except OferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{s['protocol']}: {s['num_evaluated']} of {s['num_images']} images evaluated, "
          f"{s['num_missing_files']} missing")
    print("challenge                median   mean    std images")
    for c, st in s["per_challenge"].items():
        print(f"{c:22s} {_fmt(st)}")
    print(f"{'all':22s} {_fmt(s['overall'])}")
    print(f"results written to {s['out_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
