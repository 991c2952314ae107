"""Write NoW challenge submissions (neutral meshes + 7 landmarks, mm) and check them for completeness.

Layout written (what the NoW evaluation and the challenge server read)::

    <out>/<subject>/<challenge>/<IMG>.obj   (or .ply) FLAME mesh, identity only (expression,
                                             jaw, neck, eye and global pose zero), millimetres
    <out>/<subject>/<challenge>/<IMG>.npy   (7, 3) float32 landmarks in mm, NoW order

for every line ``<subject>/<challenge>/<IMG>.jpg`` of the NoW image list.

Inputs: per image, an ``.npz`` from ``sample.py`` (``<samples>/<subject>/<challenge>/<IMG>/*.npz``
or ``<samples>/<subject>/<challenge>/<IMG>.npz``) holding ``shape_coeffs``: the ranked identity
``(n,)``/``(1, n)``, or all identity samples ``(N, n)`` together with ``ranked_index`` (or
``identity_shape``, which wins: a photo set's mean identity, ``group.select=top_mean``).

CLI::

    python -m ofer.eval.now_submission write --samples DIR --images LIST --out DIR \\
        --flame data/FLAME2020/generic_model.pkl --landmark-embedding data/landmark_embedding.npy [--format ply]
    python -m ofer.eval.now_submission check --out DIR --images LIST
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import OferError
from ..io import identity_coefficients, write_landmarks, write_mesh
from .now import NowError, parse_image_list
from ..flame import FLAME

__all__ = ["neutral_meshes_mm", "write_now_prediction", "load_shape_coeffs", "find_sample_file",
           "write_submission", "check_submission", "main"]


def neutral_meshes_mm(flame: Any, shape_coeffs: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Identity-only FLAME meshes and NoW landmarks in millimetres.

    Args:
        flame: an ``ofer.flame.FLAME`` (called as ``flame(shape_coeffs=(B, n) tensor)``; every
            other FLAME input omitted, i.e. zero expression and pose).
        shape_coeffs: ``(B, n)`` identity coefficients; zero-padded up to ``flame.n_shape`` if shorter.
    Returns:
        ``vertices (B, V, 3) float32`` and ``landmarks7 (B, 7, 3) float32``, both mm.
    """
    import torch

    S = np.atleast_2d(np.asarray(shape_coeffs, dtype=np.float32))
    n_shape = int(getattr(flame, "n_shape", S.shape[1]))
    if S.shape[1] > n_shape:
        raise NowError(f"shape_coeffs have {S.shape[1]} entries but the FLAME layer uses n_shape={n_shape}")
    if S.shape[1] < n_shape:
        S = np.concatenate([S, np.zeros((len(S), n_shape - S.shape[1]), dtype=np.float32)], axis=1)
    verts, lmks = [], []
    device = _device(flame)
    with torch.no_grad():
        for i in range(0, len(S), batch_size):
            out = flame(shape_coeffs=torch.from_numpy(S[i:i + batch_size]).to(device))
            verts.append(out.vertices.detach().cpu().numpy().astype(np.float64) * 1000.0)
            lmks.append(out.landmarks7.detach().cpu().numpy().astype(np.float64) * 1000.0)
    return np.concatenate(verts).astype(np.float32), np.concatenate(lmks).astype(np.float32)


def _device(module: Any) -> Any:
    for name in ("parameters", "buffers"):
        fn = getattr(module, name, None)
        if callable(fn):
            for t in fn():
                return t.device
    return "cpu"


def write_now_prediction(out_dir: str | Path, image_line: str, vertices_mm: np.ndarray, faces: np.ndarray,
                         landmarks7_mm: np.ndarray, fmt: str = "obj") -> tuple[Path, Path]:
    """Write one image's prediction in the NoW layout; returns ``(mesh_path, landmark_path)``.

    Args:
        image_line: the NoW image-list line ``<subject>/<challenge>/<IMG>.jpg``.
        vertices_mm: ``(V, 3)``; faces: ``(F, 3)``; landmarks7_mm: ``(7, 3)`` (saved float32).
        fmt: ``'obj'`` or ``'ply'``.
    """
    parts = image_line.strip().split("/")
    if len(parts) < 3:
        raise NowError(f"expected an image line '<subject>/<challenge>/<image>', got {image_line!r}")
    lmk = np.asarray(landmarks7_mm, dtype=np.float32)
    if lmk.shape != (7, 3):
        raise NowError(f"{image_line}: landmarks must have shape (7, 3), got {lmk.shape}")
    stem = parts[-1][:-4] if parts[-1][-4:-3] == "." else Path(parts[-1]).stem
    base = Path(out_dir) / parts[-3] / parts[-2]
    if fmt not in ("obj", "ply"):
        raise NowError(f"mesh format must be obj or ply, got {fmt!r}")
    mesh_path = base / f"{stem}.{fmt}"
    write_mesh(mesh_path, vertices_mm, faces, unit="mm", source_unit="mm")
    lmk_path = write_landmarks(base / f"{stem}.npy", lmk, unit="mm", source_unit="mm")
    return mesh_path, lmk_path


def find_sample_file(samples_dir: str | Path, image_line: str) -> Path | None:
    """The ``.npz`` of one image: ``<samples>/<s>/<c>/<IMG>.npz`` or the one ``.npz`` in ``<s>/<c>/<IMG>/``."""
    parts = image_line.strip().split("/")
    stem = Path(parts[-1]).stem
    base = Path(samples_dir) / parts[-3] / parts[-2]
    if (base / f"{stem}.npz").is_file():
        return base / f"{stem}.npz"
    d = base / stem
    if d.is_dir():
        hits = sorted(d.glob("*.npz"))
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise NowError(f"{d}: {len(hits)} .npz files, expected one per image")
    return None


def load_shape_coeffs(path: str | Path, key: str = "shape_coeffs") -> np.ndarray:
    """The ranked identity ``(n,) float32`` from a sample file.

    Accepts ``key`` of shape ``(n,)`` or ``(1, n)``, or ``(N, n)`` with an integer ``ranked_index``;
    with the default key an ``identity_shape (n,)`` in the file wins (a group's mean identity).
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return identity_coefficients(z, key).astype(np.float32)
    except ValueError as exc:  # a missing or malformed array, or not an npz
        raise NowError(f"{path}: {exc}") from exc
    except OSError as exc:
        raise NowError(f"cannot read {path}: {exc}") from exc


def write_submission(samples_dir: str | Path, image_list: str | Path, out_dir: str | Path, flame: Any,
                     fmt: str = "obj", key: str = "shape_coeffs", batch_size: int = 64) -> dict:
    """Write NoW predictions for every listed image that has a sample file.

    Returns ``{"written": int, "missing": [image lines without a sample file]}``.
    """
    entries = parse_image_list(image_list)
    todo, missing = [], []
    for e in entries:
        f = find_sample_file(samples_dir, e.line)
        if f is None:
            missing.append(e.line)
        else:
            todo.append((e.line, load_shape_coeffs(f, key)))
    if not todo:
        raise NowError(f"none of the {len(entries)} images in {image_list} has a sample file under {samples_dir} "
                       "(expected <samples>/<subject>/<challenge>/<IMG>/*.npz or .../<IMG>.npz)")
    lens = {len(s) for _, s in todo}
    if len(lens) != 1:
        raise NowError(f"sample files under {samples_dir} have different shape_coeffs lengths: {sorted(lens)}")
    faces = np.asarray(flame.faces.detach().cpu().numpy() if hasattr(flame.faces, "detach") else flame.faces,
                       dtype=np.int64)
    for i in range(0, len(todo), batch_size):
        chunk = todo[i:i + batch_size]
        V, L = neutral_meshes_mm(flame, np.stack([s for _, s in chunk]), batch_size)
        for (line, _), v, l7 in zip(chunk, V, L):
            write_now_prediction(out_dir, line, v, faces, l7, fmt)
    return {"written": len(todo), "missing": missing}


def check_submission(out_dir: str | Path, image_list: str | Path) -> list[str]:
    """Image-list lines whose prediction is incomplete in ``out_dir``, each with what is missing.

    A complete prediction has ``<IMG>.obj`` or ``<IMG>.ply`` and ``<IMG>.npy`` (or ``.txt``)
    holding 7x3 landmarks.
    """
    out_dir = Path(out_dir)
    problems = []
    for e in parse_image_list(image_list):
        base = out_dir / e.subject / e.challenge
        stem = e.stem
        lacks = []
        if not ((base / f"{stem}.obj").is_file() or (base / f"{stem}.ply").is_file()):
            lacks.append("mesh")
        npy, txt = base / f"{stem}.npy", base / f"{stem}.txt"
        if npy.is_file():
            try:
                shp = np.load(npy, allow_pickle=False).shape
                if shp not in ((7, 3), (1, 7, 3)):
                    lacks.append(f"landmarks of shape (7, 3) (found {shp})")
            except (ValueError, OSError):
                lacks.append("readable landmarks")
        elif not txt.is_file():
            lacks.append("landmarks")
        if lacks:
            problems.append(f"{e.line}: missing {' and '.join(lacks)}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ofer.eval.now_submission",
                                 description="Write or check NoW challenge submissions.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write neutral meshes + 7 landmarks (mm) for a NoW image list")
    w.add_argument("--samples", required=True, help="sample.py output folder (per-image .npz with shape_coeffs)")
    w.add_argument("--images", required=True, help="NoW image list (imagepathsvalidation.txt / imagepathstest.txt)")
    w.add_argument("--out", required=True)
    w.add_argument("--flame", required=True, help="FLAME model file (generic_model.pkl)")
    w.add_argument("--landmark-embedding", required=True, help="landmark embedding file")
    w.add_argument("--format", choices=["obj", "ply"], default="obj")
    w.add_argument("--key", default="shape_coeffs", help="npz key of the identity coefficients")
    w.add_argument("--n-shape", type=int, default=300)
    c = sub.add_parser("check", help="list images of the NoW list that lack a complete prediction")
    c.add_argument("--out", required=True)
    c.add_argument("--images", required=True)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "write":
            flame = FLAME(a.flame, a.landmark_embedding, n_shape=a.n_shape, n_exp=100)
            res = write_submission(a.samples, a.images, a.out, flame, a.format, a.key)
            print(f"wrote {res['written']} predictions to {a.out}; {len(res['missing'])} images had no sample file")
            for m in res["missing"][:20]:
                print(f"  missing: {m}")
            return 0 if not res["missing"] else 1
        problems = check_submission(a.out, a.images)
        n = len(parse_image_list(a.images))
        if problems:
            print(f"{len(problems)} of {n} images incomplete:")
            for p in problems:
                print(f"  {p}")
            return 1
        print(f"all {n} images have a mesh and 7 landmarks")
        return 0
    except OferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
