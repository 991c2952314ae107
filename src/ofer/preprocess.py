"""Preprocess a folder of face images into OFER's ``arcface_input`` layout.

For every image ``<input>/<rel>/<stem>.<ext>`` it writes

* ``<output>/<rel>/<stem>.npy``: the ArcFace input, ``(3, 112, 112)`` float32 in [-1, 1]
  (BGR channel order by default, as OFER's own files; ``--channel-order rgb`` for MICA);
* ``<output>/<rel>/<stem>.jpg``: the 224x224 FaRL crop (RGB JPEG, quality 95).

Keypoints come from ``<stem>.kps.txt`` / ``<stem>.kps.npy`` sidecars when present, from
``--aligned`` (inputs already ArcFace-aligned, side 112/224/...), and otherwise from the SCRFD
detector (``pip install 'ofer[detect]'`` plus the antelopev2 model pack). Files whose two
outputs exist are skipped, so an interrupted run can be resumed. Failures never stop the
run: each one is listed in ``<output>/failures.txt`` with a one-line reason.

Example::

    python -m ofer.preprocess --input photos/ --output data/MYSET/arcface_input
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .data.images import CROP_JPEG_QUALITY, crop_file_paths, iter_images, prepare_face, write_face_crops
from .errors import ImageError, OferError
from .io import atomic_write_bytes

__all__ = ["main", "preprocess_folder", "output_paths"]


def output_paths(image: Path, input_root: Path, output_root: Path) -> tuple[Path, Path]:
    """``(<out>/<rel>/<stem>.npy, <out>/<rel>/<stem>.jpg)`` for an input image."""
    rel = image.relative_to(input_root) if input_root.is_dir() else Path(image.name)
    return crop_file_paths(output_root / rel.parent / rel.stem)


class _LazyDetector:
    """Builds the SCRFD detector on first use; remembers a failure so it is reported per image."""

    def __init__(self, model_dir: str | None, name: str, det_size: int, det_thresh: float) -> None:
        self.args = (model_dir, name, det_size, det_thresh)
        self.model = None
        self.error: str | None = None

    def get(self):
        if self.model is None and self.error is None:
            from .data.detect import SCRFDDetector

            model_dir, name, det_size, det_thresh = self.args
            try:
                self.model = SCRFDDetector(model_dir, name=name, det_size=(det_size, det_size), det_thresh=det_thresh)
            except OferError as exc:
                self.error = str(exc)
        if self.error is not None:
            raise ImageError(self.error)
        return self.model

    def detect(self, img: np.ndarray, max_num: int = 0, metric: str = "default"):
        """Build the detector if needed (so sidecar-only runs never import insightface), then detect."""
        return self.get().detect(img, max_num=max_num, metric=metric)


def preprocess_folder(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    detector=None,
    detector_dir: str | None = None,
    detector_name: str = "antelopev2",
    det_size: int = 640,
    det_thresh: float = 0.5,
    aligned: bool = False,
    use_sidecar: bool = True,
    channel_order: str = "bgr",
    antialias: bool = True,
    warp: str = "float",
    overwrite: bool = False,
    jpeg_quality: int = CROP_JPEG_QUALITY,
    progress: bool = True,
) -> dict:
    """Preprocess every image under ``input_dir``; see the module docstring.

    Args:
        detector: an object with insightface's ``detect`` interface; when ``None`` an SCRFD
            detector is built on first need from ``detector_dir`` / ``detector_name``.
        antialias, warp: as :func:`ofer.data.images.prepare_faces` (``antialias=False,
            warp="opencv"``: the released ``arcface_process.py`` crops).

    Returns:
        ``{"done": [...], "skipped": [...], "failed": [(relpath, reason), ...]}``.
    """
    from tqdm import tqdm

    input_root = Path(input_dir)
    output_root = Path(output_dir)
    if not input_root.exists():
        raise OferError(f"input folder not found: {input_root}")
    images = list(iter_images(input_root, exclude=output_root))
    lazy = None if detector is not None else _LazyDetector(detector_dir, detector_name, det_size, det_thresh)
    result: dict = {"done": [], "skipped": [], "failed": []}
    claimed: dict[Path, Path] = {}
    bar = tqdm(images, desc="preprocess", unit="img", disable=not progress, dynamic_ncols=True)
    for image in bar:
        rel = image.relative_to(input_root) if input_root.is_dir() else Path(image.name)
        npy_path, jpg_path = output_paths(image, input_root, output_root)
        if npy_path in claimed:
            result["failed"].append((rel.as_posix(), f"output name collides with {claimed[npy_path].as_posix()}"))
            continue
        claimed[npy_path] = rel
        if not overwrite and npy_path.is_file() and jpg_path.is_file():
            result["skipped"].append(rel.as_posix())
            continue
        try:
            face = prepare_face(image, detector if detector is not None else lazy, aligned=aligned, use_sidecar=use_sidecar,
                                channel_order=channel_order, antialias=antialias, warp=warp)
            write_face_crops(face, npy_path.with_suffix(""), jpeg_quality=jpeg_quality)
            result["done"].append(rel.as_posix())
        except ImageError as exc:
            result["failed"].append((rel.as_posix(), str(exc).replace(str(image), rel.as_posix())))
        except Exception as exc:  # an unexpected bug must not stop the batch either
            result["failed"].append((rel.as_posix(), f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
        bar.set_postfix(failed=len(result["failed"]))
    bar.close()

    fail_path = output_root / "failures.txt"
    if result["failed"]:
        text = "".join(f"{rel}\t{reason}\n" for rel, reason in result["failed"])
        atomic_write_bytes(fail_path, lambda f: f.write(text.encode("utf-8")))
    elif fail_path.is_file():
        fail_path.unlink()
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ofer.preprocess",
        description=(
            "Make OFER's network inputs for a folder of face images: <stem>.npy (ArcFace input, 3x112x112 "
            "float32) and <stem>.jpg (224x224 FaRL crop), mirroring the input tree. Keypoints come from "
            "<stem>.kps.txt/.kps.npy sidecars, --aligned, or the SCRFD detector ('detect' extra). Done files "
            "are skipped; failures are listed in <output>/failures.txt."
        ),
    )
    p.add_argument("--input", "-i", required=True, help="input folder (searched recursively) or one image")
    p.add_argument("--output", "-o", required=True, help="output folder (mirrors the input tree)")
    p.add_argument("--detector-dir", default=None,
                   help="folder of the insightface model pack or an SCRFD .onnx file "
                        "(default: ~/.insightface/models/<name>)")
    p.add_argument("--detector-name", default="antelopev2", help="insightface model pack name (default antelopev2)")
    p.add_argument("--det-size", type=int, default=640,
                   help="detector input size in pixels (default 640; OFER/MICA used 224)")
    p.add_argument("--det-thresh", type=float, default=0.5, help="detector score threshold (default 0.5)")
    p.add_argument("--aligned", action="store_true",
                   help="inputs are ArcFace-aligned square crops (side 112, 224, ...); no detection")
    p.add_argument("--no-sidecar", action="store_true", help="ignore <stem>.kps.txt / .kps.npy sidecar files")
    p.add_argument("--channel-order", choices=("bgr", "rgb"), default="bgr",
                   help="channel order of the .npy: bgr = OFER's files and checkpoints (default), rgb = MICA")
    p.add_argument("--no-antialias", action="store_true",
                   help="plain bilinear sampling even when shrinking a large face (as OpenCV)")
    p.add_argument("--warp", choices=("float", "opencv"), default="float",
                   help="ArcFace crop sampling: float (default) or opencv (cv2.warpAffine's 1/32 px grid, "
                        "as the released files; with --no-antialias)")
    p.add_argument("--overwrite", action="store_true", help="redo images whose outputs already exist")
    p.add_argument("--jpeg-quality", type=int, default=CROP_JPEG_QUALITY, help="quality of the 224 crop JPEG (default 95)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point. Exit status: 0 when at least one image is ready (or none needed work),
    1 when every image failed, 2 on a usage error."""
    args = _parser().parse_args(argv)
    try:
        res = preprocess_folder(
            args.input, args.output, detector_dir=args.detector_dir, detector_name=args.detector_name,
            det_size=args.det_size, det_thresh=args.det_thresh, aligned=args.aligned,
            use_sidecar=not args.no_sidecar, channel_order=args.channel_order,
            antialias=not args.no_antialias, warp=args.warp, overwrite=args.overwrite, jpeg_quality=args.jpeg_quality,
            progress=not args.no_progress,
        )
    except OferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n_done, n_skip, n_fail = len(res["done"]), len(res["skipped"]), len(res["failed"])
    print(f"{n_done} written, {n_skip} already done, {n_fail} failed")
    if n_fail:
        for rel, reason in res["failed"][:10]:
            print(f"  {rel}: {reason}")
        if n_fail > 10:
            print(f"  ... {n_fail - 10} more")
        print(f"failures listed in {Path(args.output) / 'failures.txt'}")
    return 1 if n_fail and not (n_done or n_skip) else 0


if __name__ == "__main__":
    raise SystemExit(main())
