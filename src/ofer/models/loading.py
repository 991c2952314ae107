"""Loading models from any checkpoint format, reading each file once.

Three formats exist, told apart by their contents (:func:`checkpoint_format`):

* ``"training"``: written by the training scripts: ``model`` (and ``ema``) hold the whole
  :class:`~ofer.models.conditioned.ConditionedModel` (``arcface.*``, ``farl.*``, ``head.*``) and
  ``config`` the training configuration, from which the model is rebuilt.
* ``"exported"``: written by :func:`export_checkpoint` (``python -m ofer.compat``): ``model``
  holds the head, ``config`` its architecture, ``arcface`` / ``farl`` the encoder weights.
* ``"official"``: the released OFER ``.tar`` files (:mod:`ofer.models.official`).

:func:`load_model` returns the complete conditioned model from any of them;
:func:`load_checkpoint` the head alone (with the encoder state dicts beside it). Whatever the
format, the weights a loader uses pass one check
(:func:`~ofer.models.checkpoint.require_finite`): a tensor with NaN or inf is refused, naming
the file and the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from torch import Tensor, nn

from ..config import config_from_dict
from ..errors import AssetError, CheckpointError, OferError
from ..nets.arcface import arcface_from_state_dict
from ..nets.farl import farl_from_state_dict
from .checkpoint import read_checkpoint, require_finite, save_checkpoint
from .conditioned import ConditionedModel, build_model
from .official import ENCODER_ENTRIES, ImportReport, detect_official_kind, import_official, is_official
from .spec import KINDS, SPECS, get_spec

__all__ = [
    "LoadInfo",
    "checkpoint_format",
    "load_model",
    "load_trained_model",
    "load_checkpoint",
    "export_checkpoint",
]


@dataclass
class LoadInfo:
    """Where a loaded model came from (``model.load_info``)."""

    path: str
    kind: str
    format: str  # "training" | "exported" | "official"
    step: int = 0
    ema: bool = False
    import_report: Optional[ImportReport] = None
    notes: list[str] = field(default_factory=list)


def checkpoint_format(ckpt: dict[str, Any]) -> Optional[str]:
    """``"training"``, ``"exported"``, ``"official"`` or None for a checkpoint dict."""
    model = ckpt.get("model")
    if isinstance(model, dict) and any(str(k).startswith("head.") for k in model):
        return "training"
    if "model" in ckpt or "ema" in ckpt:
        return "exported"
    return "official" if is_official(ckpt) else None


def _kind_of(ckpt: dict[str, Any], fmt: Optional[str], path: Path, want: Optional[str]) -> str:
    if fmt is None:
        raise CheckpointError(f"{path}: neither our format ('model', 'config') nor an official OFER "
                              f"checkpoint ('net'); entries {sorted(map(str, ckpt))[:8]}")
    found = detect_official_kind(ckpt) if fmt == "official" else ckpt.get("kind")
    if found not in KINDS:
        raise CheckpointError(f"{path}: 'kind' is {found!r}, expected one of {list(KINDS)}")
    if want is not None and found != want:
        raise CheckpointError(f"{path} holds an {found} checkpoint, expected {want}")
    return found


def _read(source: str | Path | dict, path: Optional[str | Path], map_location: Any) -> tuple[dict, Path]:
    if isinstance(source, dict):
        return source, Path(path if path is not None else "<checkpoint>")
    return read_checkpoint(source, map_location=map_location), Path(source)


# --------------------------------------------------------------------------------------
# Heads (the released files and our exported format)
# --------------------------------------------------------------------------------------
def export_checkpoint(model: nn.Module, path: str | Path, *, step: int = 0,
                      encoders: dict[str, dict[str, Tensor]] | None = None,
                      extra: dict[str, Any] | None = None) -> None:
    """Write a head in our exported format (``model`` = its weights, ``ema`` = None).

    Layout: ``{"model", "ema", "optimizer": None, "step", "config", "kind", "version",
    **encoders, **extra}``; written atomically, readable with ``weights_only=True``.
    """
    kind = getattr(model, "kind", None)
    if kind not in KINDS:
        raise CheckpointError(f"cannot export a {type(model).__name__}: not an OFER model")
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"model": sd, "ema": None, "optimizer": None, "step": int(step),
               "config": model.config, "kind": kind}
    payload.update(encoders or {})
    payload.update(extra or {})
    save_checkpoint(path, payload)


def _architecture(cfg: Any, kind: str, path: Path) -> dict[str, Any]:
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: 'config' must be a dict, got {type(cfg).__name__}")
    marker = "param_dim" if SPECS[kind].generative else "in_dim"
    if marker in cfg or not cfg:
        return cfg
    for key in ("model", kind):  # nested training configs
        if isinstance(cfg.get(key), dict):
            return _architecture(cfg[key], kind, path)
    raise CheckpointError(f"{path}: 'config' holds no {kind} architecture (no {marker!r} key)")


def _exported_head(ckpt: dict[str, Any], kind: str, path: Path) -> nn.Module:
    cfg = _architecture(ckpt.get("config", {}), kind, path)
    try:
        model = SPECS[kind].head.from_config(cfg)
    except (OferError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild {kind} from 'config': {exc}") from exc
    entry = "ema" if isinstance(ckpt.get("ema"), dict) else "model"
    state = ckpt.get(entry)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: no 'ema' or 'model' state dict")
    require_finite({entry: state}, path)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        keys = (result.missing_keys + result.unexpected_keys)[:3]
        raise CheckpointError(f"{path}: {len(result.missing_keys)} missing and "
                              f"{len(result.unexpected_keys)} unexpected keys for {kind} "
                              f"(e.g. {', '.join(keys)})")
    return model


def _head_and_encoders(ckpt: dict[str, Any], fmt: str, kind: str, path: Path,
                       official_options: dict[str, Any]) -> tuple[nn.Module, dict, Optional[ImportReport]]:
    if fmt == "official":
        res = import_official(ckpt, kind, path=path, **official_options)
        return res.model, res.encoders, res.report
    encoders = {k: ckpt[k] for k in ENCODER_ENTRIES if isinstance(ckpt.get(k), dict)}
    require_finite(encoders, path)
    return _exported_head(ckpt, kind, path), encoders, None


def load_checkpoint(source: str | Path | dict, kind: Optional[str] = None, map_location: Any = "cpu",
                    *, path: Optional[str | Path] = None) -> nn.Module:
    """The head of an exported or official checkpoint (``ema`` weights when present).

    The returned module is in eval mode and carries ``encoder_state_dicts`` (``{"arcface":
    ..., "farl": ...}`` when the file has them) and, for official files, ``import_report``.
    A training checkpoint gives its head too (use :func:`load_model` for the whole model).

    Raises:
        CheckpointError: unreadable file, wrong kind, keys that do not match, non-finite weights.
    """
    if kind is not None:
        get_spec(kind, CheckpointError)
    ckpt, path = _read(source, path, map_location)
    fmt = checkpoint_format(ckpt)
    kind = _kind_of(ckpt, fmt, path, kind)
    if fmt == "training":
        model, _ = load_trained_model(ckpt, kind, path=path)
        head = model.head
        head.encoder_state_dicts = {n: getattr(model, n).state_dict() for n in ENCODER_ENTRIES
                                    if getattr(model, n) is not None}
        return head.eval()
    head, encoders, report = _head_and_encoders(ckpt, fmt, kind, path, {"map_location": map_location})
    head.encoder_state_dicts = encoders
    if report is not None:
        head.import_report = report
    return head.eval()


# --------------------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------------------
def load_trained_model(source: str | Path | dict, kind: str, use_ema: bool = True,
                       map_location: Any = "cpu", *, path: Optional[str | Path] = None
                       ) -> tuple[ConditionedModel, Any]:
    """Rebuild a model of ours from its training checkpoint (config inside), EMA weights by default.

    No asset file is read: the encoders, the head and (IdRank) the feature vertex indices all
    come from the checkpoint.

    Returns:
        ``(model, cfg)``: the :class:`ConditionedModel` in eval mode and the training config.

    Raises:
        CheckpointError: unreadable file, wrong kind, weights that do not fit or are not finite.
    """
    ckpt, path = _read(source, path, map_location)
    spec = get_spec(kind, CheckpointError)
    if ckpt.get("kind") != kind:
        raise CheckpointError(f"{path} holds an {ckpt.get('kind')} checkpoint, expected {kind}")
    if checkpoint_format(ckpt) != "training":
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint of ours (no 'head.*' weights)")
    ema = use_ema and ckpt.get("ema") is not None
    sd = ckpt["ema"] if ema else ckpt["model"]
    require_finite({"ema" if ema else "model": sd}, path)
    try:
        cfg = config_from_dict(spec.train_schema, ckpt["config"])
    except (OferError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: its 'config' is not a {kind} training config ({exc})") from exc
    num_vertices = None
    if not spec.generative:
        idx = sd.get("head.vertex_indices")
        if idx is None:
            raise CheckpointError(f"checkpoint {path} has no 'head.vertex_indices' (not an IdRank of ours)")
        num_vertices = int(idx.shape[0])
    model = build_model(kind, cfg, load_weights=False, num_vertices=num_vertices)
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path}: weights do not fit the {kind} model of its config "
                              f"({first})") from exc
    model.load_info = LoadInfo(str(path), kind, "training", step=int(ckpt.get("step", 0) or 0), ema=ema)
    return model.eval(), cfg


def _qkv_error(message: str) -> CheckpointError:
    err = CheckpointError(message)
    err.qkv_choice = True  # type: ignore[attr-defined]  # the qkv argument is at fault, not the file
    return err


def load_model(path: str | Path, kind: Optional[str] = None, *, vertex_indices: Any = None,
               use_ema: bool = True, map_location: Any = "cpu", qkv: Optional[str] = None,
               qkv_default: str = "training", **official_options: Any) -> ConditionedModel:
    """The conditioned model (encoders + head) of any checkpoint, the file read once.

    Args:
        path: our training or exported checkpoint, or a released ``.tar``.
        kind: the kind expected (checked), or None to take the file's.
        vertex_indices: a ranker without its own feature vertices (the released IdRank):
            the original ``frontindices.npy`` or a ``FLAME_masks.pkl``-style file.
        use_ema: our training checkpoints: the EMA weights when present.
        qkv: the denoiser's q/k/v projections: ``"stored"`` (our checkpoints keep theirs;
            an official file holds none), or a replay of the original's draw for official
            files (``"released"``, ``"training"``, ``"unet"``: see
            :mod:`ofer.models.qkv_replay`); None: ``stored`` for ours, ``qkv_default`` for
            official files.
        official_options: passed to :func:`~ofer.models.official.import_official`
            (``qkv_seed``, ``qkv_weights``).

    Returns:
        The model in eval mode, with ``load_info`` (:class:`LoadInfo`).
    """
    path = Path(path)
    if not path.is_file():
        what = kind or "model"
        raise CheckpointError(f"{what} checkpoint not found: {path} (see data/README.md, 'OFER checkpoints')")
    ckpt = read_checkpoint(path, map_location=map_location)
    fmt = checkpoint_format(ckpt)
    kind = _kind_of(ckpt, fmt, path, kind)
    spec = SPECS[kind]
    if fmt == "official" and spec.generative:
        if qkv == "stored":
            raise _qkv_error(f"{path}: an official file stores no q/k/v projections (qkv: stored); "
                             "choose a replay: released or training")
        official_options["qkv"] = qkv or qkv_default
    elif qkv not in (None, "stored") and spec.generative:
        raise _qkv_error(f"{path}: qkv={qkv!r} replays the original code's draw for official files; "
                         "this checkpoint of ours keeps its own projections (qkv: stored or null)")
    if fmt == "training":
        model, _ = load_trained_model(ckpt, kind, use_ema, path=path)
        return model
    head, encoders, report = _head_and_encoders(ckpt, fmt, kind, path,
                                                {"map_location": map_location, **official_options})
    step = int(ckpt.get("step", 0) or 0) if fmt == "exported" else 0
    del ckpt
    for name, needed in (("arcface", True), ("farl", spec.uses_farl)):
        if needed and name not in encoders:
            raise CheckpointError(f"{path}: no '{name}' encoder weights in this {kind} checkpoint")
    arcface = arcface_from_state_dict(encoders["arcface"], f"{path} 'arcface'")
    farl = farl_from_state_dict(encoders["farl"], f"{path} 'farl'") if spec.uses_farl else None
    if not spec.generative and bool((head.vertex_indices < 0).any()):
        if vertex_indices is None or not Path(vertex_indices).is_file():
            why = "none given" if vertex_indices is None else f"{vertex_indices} not found"
            raise AssetError(f"the released IdRank checkpoint {path} needs its front-face vertex list "
                             f"(frontindices.npy): {why}")
        head.set_vertex_indices(str(vertex_indices))
    model = ConditionedModel(head, arcface, farl).eval()
    model.load_info = LoadInfo(str(path), kind, fmt, step=step, import_report=report)
    return model
