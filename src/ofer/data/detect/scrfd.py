"""SCRFD through insightface and onnxruntime (the ``detect`` extra), with the weights a user downloads.

The released OFER and MICA models were trained on SCRFD keypoints (insightface's
``antelopev2`` pack); insightface downloads its packs from GitHub at run time and no registry
package ships them, so :class:`SCRFDDetector` only looks for a pack already on disk.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...errors import AssetError, OferError

__all__ = ["INSIGHTFACE_URLS", "SCRFDDetector", "resolve_detector_dir"]

INSIGHTFACE_URLS = {
    "antelopev2": "https://github.com/deepinsight/insightface/releases/download/v0.7/antelopev2.zip",
    "buffalo_l": "https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip",
}


def resolve_detector_dir(model_dir: str | os.PathLike | None = None, name: str = "antelopev2") -> Path:
    """Find the ONNX file of the SCRFD detector.

    Looks in ``model_dir`` (config), else ``$INSIGHTFACE_HOME/models/<name>`` or
    ``~/.insightface/models/<name>`` (also one nested ``<name>/`` level, as some zips unpack).
    Accepts ``scrfd*.onnx`` (antelopev2) and ``det_*.onnx`` (buffalo_*).

    Raises:
        AssetError: one line, naming the folder searched and where to get the model pack.
    """
    if model_dir is not None:
        base = Path(model_dir).expanduser()
    else:
        root = Path(os.environ.get("INSIGHTFACE_HOME", Path.home() / ".insightface")).expanduser()
        base = root / "models" / name
    candidates: list[Path] = []
    if base.is_file() and base.suffix == ".onnx":
        return base
    for d in (base, base / name):
        if d.is_dir():
            candidates += sorted(d.glob("scrfd*.onnx")) + sorted(d.glob("det_*.onnx"))
    if candidates:
        return candidates[0]
    url = INSIGHTFACE_URLS.get(name, "the insightface model zoo (github.com/deepinsight/insightface)")
    raise AssetError(
        f"no SCRFD detector (scrfd*.onnx / det_*.onnx) in {base}: download {url} and unzip it there, "
        f"set the detector directory in the config, or give 5-point .kps.txt sidecars / aligned crops"
    )


class SCRFDDetector:
    """SCRFD face detector through insightface + onnxruntime (the ``detect`` extra).

    Args:
        model_dir: folder (or ``.onnx`` file) of the model pack; default
            ``~/.insightface/models/<name>``.
        name: model pack name (``"antelopev2"``, used by MICA and OFER, or ``"buffalo_l"``).
        det_size: detector input size ``(w, h)``. OFER/MICA used ``(224, 224)``; the default
            ``(640, 640)`` finds small faces in large photos.
        det_thresh: score threshold (0.5 as insightface).
        providers: onnxruntime providers (default CPU).

    ``detect`` takes a **BGR** uint8 image, as insightface expects.
    """

    name = "scrfd"

    def __init__(self, model_dir: str | os.PathLike | None = None, name: str = "antelopev2",
                 det_size: tuple[int, int] = (640, 640), det_thresh: float = 0.5,
                 providers: Sequence[str] | None = None) -> None:
        onnx_path = resolve_detector_dir(model_dir, name)
        where = INSIGHTFACE_URLS.get(name, "the insightface model zoo (github.com/deepinsight/insightface)")
        fix = f"download {where} again and unzip it into {onnx_path.parent}"
        if onnx_path.stat().st_size == 0:
            raise AssetError(f"SCRFD model {onnx_path} is empty (an interrupted download?): {fix}")
        try:
            from insightface.model_zoo import get_model  # noqa: PLC0415 (optional extra)
        except ImportError as exc:
            raise OferError(
                f"face detection with SCRFD needs the optional extra 'detect' (pip install 'ofer[detect]': "
                f"insightface, onnxruntime); import failed: {exc}; the built-in detector (detector.mode=blazeface) "
                f"or .kps.txt sidecars work without it"
            ) from exc
        try:
            model = get_model(str(onnx_path), providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:  # onnxruntime raises its own types for unreadable graphs
            text = str(exc).strip()
            first = text.splitlines()[0][:200] if text else type(exc).__name__
            raise AssetError(f"SCRFD model {onnx_path} could not be loaded ({first}): {fix}") from None
        if model is None or not hasattr(model, "detect"):
            raise AssetError(f"{onnx_path} is not an insightface detection model: {fix}")
        model.prepare(ctx_id=-1, input_size=tuple(det_size), det_thresh=det_thresh)
        self.model = model
        self.path = onnx_path
        self.det_size = tuple(det_size)
        self.description = f"scrfd ({name}: {onnx_path.name}, det_size {det_size[0]}x{det_size[1]})"

    def detect(self, img: np.ndarray, max_num: int = 0, metric: str = "default") -> tuple[np.ndarray, np.ndarray | None]:
        """``img`` (H, W, 3) uint8 BGR -> ``(boxes (N, 5), kps (N, 5, 2))``."""
        return self.model.detect(img, max_num=max_num, metric=metric)
