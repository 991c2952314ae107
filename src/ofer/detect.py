"""Write 5-point ``.kps.txt`` sidecars for a folder of photos, and contact sheets to check them.

For every image ``photo.jpg`` under ``--input`` without a sidecar, the detector
(:func:`ofer.data.detect.build_detector`; the built-in one needs no download) finds the faces,
the chosen one (``--faces center|largest|all``, as ``detector.faces`` of ``sample.py``) is
written to ``photo.kps.txt`` (5 lines ``x y`` per face, a ``#`` line naming the detector),
and a row of the contact sheet shows the image with the points, the ArcFace-aligned 112 crop
with the template points, and the 224 FaRL crop, i.e. what the models will see. Existing
sidecars are kept (``--overwrite`` re-detects) and shown too, so a hand-corrected sidecar can
be checked the same way. ``--draw`` also writes each image with every detected box and its
points. ``sample.py`` reads the sidecars before running any detector.

Example::

    python -m ofer.detect --input photos/ --draw
    # check photos_kps_sheet/sheet_001.png, fix a .kps.txt by hand if needed, then
    python sample.py --input photos/ --output out/
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .data.align import ARCFACE_TEMPLATE, FACE_CHOICES, farl_crop_matrix, transform_points
from .data.images import (
    PreparedFace,
    iter_images,
    prepare_faces,
    prepare_faces_array,
    read_image,
    read_sidecar_faces,
    write_sidecar_kps,
)
from .errors import OferError
from .io import atomic_write_bytes

__all__ = ["main", "detect_folder", "contact_rows", "default_sheet_dir"]

CELL = 224
#: colours of the 5 points: eyes, nose, mouth corners
POINT_COLOURS = [(255, 60, 60), (60, 120, 255), (255, 220, 0), (255, 60, 255), (0, 230, 230)]


def default_sheet_dir(input_path: Path) -> Path:
    """``photos/`` -> ``photos_kps_sheet/`` beside it (outside the input, so it is never an input)."""
    p = input_path.resolve()
    return p.parent / (f"{p.name}_kps_sheet" if p.is_dir() else f"{p.stem}_kps_sheet")


def _draw_points(img, pts: np.ndarray, radius: float, box: np.ndarray | None = None) -> None:
    from PIL import ImageDraw

    d = ImageDraw.Draw(img)
    if box is not None:
        d.rectangle([float(v) for v in box[:4]], outline=(0, 255, 0), width=max(1, int(radius / 2)))
    for (x, y), c in zip(np.asarray(pts, np.float64), POINT_COLOURS):
        d.ellipse([x - radius, y - radius, x + radius, y + radius], outline=c, width=max(1, int(radius / 2)))


def contact_rows(image: np.ndarray, face: PreparedFace) -> list[np.ndarray]:
    """Three ``224x224`` cells for one face: context with the points, the aligned 112 crop
    (2x, template points), the FaRL crop (points where the crop puts them)."""
    from PIL import Image

    from .data.images import warp_crop

    kps = face.kps.astype(np.float64)
    box = face.box.astype(np.float64)
    # context: a square 2.2x the face box's long side around its centre
    scale = CELL / (2.2 * max(box[2] - box[0], box[3] - box[1]))
    c = (CELL - 1) / 2.0
    to_ctx = np.array([[scale, 0.0, c - scale * (box[0] + box[2]) / 2.0],
                       [0.0, scale, c - scale * (box[1] + box[3]) / 2.0]])
    ctx = Image.fromarray(warp_crop(image, to_ctx, CELL, True))
    _draw_points(ctx, transform_points(to_ctx, kps), 3.0)
    blob = face.arcface if face.channel_order == "rgb" else face.arcface[::-1]
    aligned = np.clip(np.rint(blob.transpose(1, 2, 0) * 127.5 + 127.5), 0, 255).astype(np.uint8)
    al = Image.fromarray(aligned).resize((CELL, CELL), Image.Resampling.NEAREST)
    _draw_points(al, (ARCFACE_TEMPLATE + 0.5) * 2.0 - 0.5, 3.0)
    farl = Image.fromarray(face.farl_crop)
    _draw_points(farl, transform_points(farl_crop_matrix(face.box), kps), 3.0)
    return [np.asarray(ctx), np.asarray(al), np.asarray(farl)]


def _save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _drawing(image: np.ndarray, detector, max_side: int = 1024) -> np.ndarray:
    """The image (long side at most ``max_side``) with every detected face's box and points."""
    from PIL import Image

    img = Image.fromarray(image)
    f = min(1.0, max_side / float(max(image.shape[:2])))
    if f < 1.0:
        img = img.resize((max(1, round(image.shape[1] * f)), max(1, round(image.shape[0] * f))),
                         Image.Resampling.BILINEAR)
    try:
        faces = prepare_faces_array(image, detector, which="all", min_relative_size=0.0)
    except OferError:
        faces = []
    r = max(2.0, 0.01 * max(img.size))
    for face in faces:
        _draw_points(img, (face.kps.astype(np.float64) + 0.5) * f - 0.5, r, box=face.box * f)
    return np.asarray(img)


def detect_folder(input_path: str | Path, detector, *, which: str = "center", overwrite: bool = False,
                  sheet_dir: str | Path | None = None, draw: bool = False, rows_per_sheet: int = 8,
                  min_relative_size: float = 0.5, log=print) -> dict:
    """Write sidecars and contact sheets for every image under ``input_path``.

    Returns ``{"written": [...], "kept": [...], "failed": [(name, reason), ...], "sheets": [...]}``
    (names relative to the input folder).
    """
    from .render import image_grid

    input_path = Path(input_path)
    if not input_path.exists():
        raise OferError(f"input not found: {input_path}")
    root = input_path if input_path.is_dir() else input_path.parent
    sheet = Path(sheet_dir) if sheet_dir is not None else default_sheet_dir(input_path)
    desc = getattr(detector, "description", None) or getattr(detector, "name", "detector")
    result: dict = {"written": [], "kept": [], "failed": [], "sheets": []}
    cells: list[np.ndarray] = []
    labels: list[str] = []

    def flush() -> None:
        if cells:
            page = sheet / f"sheet_{len(result['sheets']) + 1:03d}.png"
            _save_png(page, image_grid(cells, ncols=3, labels=labels, label_height=16))
            result["sheets"].append(str(page))
            cells.clear()
            labels.clear()

    for path in iter_images(input_path, exclude=sheet):
        name = path.relative_to(root).as_posix()
        try:
            image = read_image(path, min_side=16)
            has_sidecar = read_sidecar_faces(path) is not None
            if has_sidecar and not overwrite:
                faces = prepare_faces(path, None, which="all", min_relative_size=0.0)
                result["kept"].append(name)
                source = "sidecar"
            else:
                if detector is None:
                    raise OferError(f"{path}: no sidecar and no detector")
                faces = prepare_faces_array(image, detector, which=which, name=str(path),
                                            min_relative_size=min_relative_size)
                n = faces[0].n_faces
                scores = ", ".join(f"{f.score:.2f}" for f in faces if f.score is not None)
                comment = f"{desc}; {n} face(s) found, {which}: score {scores}"
                write_sidecar_kps(path, np.stack([f.kps for f in faces]), comment=comment)
                result["written"].append(name)
                source = "detected"
        except OferError as exc:
            result["failed"].append((name, str(exc)))
            continue
        for face in faces:
            cells += contact_rows(image, face)
            tag = f" face {face.face_index}" if len(faces) > 1 else ""
            score = f" {face.score:.2f}" if face.score is not None else ""
            labels += [f"{name}{tag}: {source}{score}", "aligned 112 (template)", "FaRL 224"]
            if len(cells) >= 3 * rows_per_sheet:
                flush()
        if draw and detector is not None:
            out = sheet / "drawn" / Path(name).with_suffix(".png")
            _save_png(out, _drawing(image, detector))
    flush()
    if result["sheets"]:
        log(f"contact sheets: {sheet}/sheet_*.png ({len(result['sheets'])})")
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ofer.detect",
        description="Write 5-point .kps.txt sidecars for the photos in a folder, with contact sheets of the points "
                    "and aligned crops to check them before a long sample.py run.")
    p.add_argument("--input", "-i", required=True, help="image file or folder (searched recursively)")
    p.add_argument("--faces", choices=FACE_CHOICES, default="center",
                   help="which face: nearest the centre (default), largest, or all (one sidecar lists every face)")
    p.add_argument("--detector", choices=("auto", "blazeface", "scrfd"), default="auto",
                   help="auto: SCRFD when its weights exist, else the built-in BlazeFace (default)")
    p.add_argument("--detector-dir", default=None, help="SCRFD model pack folder (default ~/.insightface/models/<name>)")
    p.add_argument("--det-thresh", type=float, default=None, help="score threshold (default: the detector's own)")
    p.add_argument("--overwrite", action="store_true", help="re-detect images that already have a sidecar")
    p.add_argument("--sheet", default=None, help="folder of the contact sheets (default: <input>_kps_sheet beside it)")
    p.add_argument("--draw", action="store_true", help="also write each image with every detected face drawn")
    p.add_argument("--rows", type=int, default=8, help="faces per contact sheet (default 8)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .data.detect import build_detector

    try:
        detector, msg = build_detector(args.detector, scrfd_dir=args.detector_dir, det_thresh=args.det_thresh)
        print(f"detector: {msg}")
        res = detect_folder(args.input, detector, which=args.faces, overwrite=args.overwrite, sheet_dir=args.sheet,
                            draw=args.draw, rows_per_sheet=max(1, args.rows))
    except OferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(res['written'])} sidecars written, {len(res['kept'])} kept, {len(res['failed'])} failed")
    for name, reason in res["failed"]:
        print(f"  failed: {reason if name in reason else name + ': ' + reason}")
    ok = len(res["written"]) + len(res["kept"])
    return 0 if ok or not res["failed"] else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
