"""Typed configuration: dataclass schemas, YAML files and dotted ``key.sub=value`` overrides.

Every script has one dataclass schema (``IdGenTrainConfig``, ``ExpGenTrainConfig``,
``IdRankTrainConfig``; ``sample.py`` brings its own). :func:`load_config` reads a YAML file,
applies command-line overrides, checks every key and type against the schema and runs the
schema's ``validate()`` methods. All mistakes are one-line :class:`~ofer.errors.ConfigError`
messages that name the key and list the valid keys or values::

    cfg = load_config(IdGenTrainConfig, "configs/idgen.yaml", ["train.max_steps=10"])
    plain = config_to_dict(cfg)            # nested dicts/lists of str/int/float/bool/None

Asset paths in the training schemas are relative to the single ``data_root`` key (absolute
paths are accepted too); :func:`resolve_path` joins them.

Overrides are parsed as YAML scalars/flow collections: ``train.lr=1e-3``, ``data.train=[A,B]``,
``arcface.weights=null``. Floats written as ``1e-4`` (which YAML 1.1 reads as strings) are
accepted for float fields; NaN and infinities (``.inf``, ``1e999``, ``nan``) are refused for
every float key (learning rates, scales, thresholds, statistics): a schema that needs "no
limit" uses ``Optional[float] = None``. Config files are UTF-8 (a byte-order mark is allowed).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, TypeVar, Union

import yaml

from .errors import AssetError, ConfigError
from .io import atomic_write_bytes

T = TypeVar("T")

__all__ = [
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "parse_overrides",
    "save_config",
    "resolve_path",
    "asset_file",
    "check_key",
    "ArcFaceConfig",
    "FaRLConfig",
    "DenoiserConfig",
    "DiffusionConfig",
    "OcclusionAugConfig",
    "DataConfig",
    "FlameConfig",
    "OptimConfig",
    "EMAConfig",
    "LoopConfig",
    "ValConfig",
    "IdGenValConfig",
    "IdGenTrainConfig",
    "ExpGenTrainConfig",
    "IdRankTrainConfig",
]


# ----------------------------------------------------------------------------------------
# Generic machinery
# ----------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, Sequence):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


class _NonFinite(ConfigError):
    """A float key given NaN or infinity (no schema key accepts them)."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return the (possibly converted) value."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {_describe(value)}")
        return _from_dict(tp, value, key)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except _NonFinite:
                raise
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or type(value) is not type(allowed[0]):
            raise ConfigError(
                f"config key '{key}' expects one of {', '.join(repr(a) for a in allowed)}, "
                f"got {value!r}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {_describe(value)}")
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {_describe(value)}")
        _, vt = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects bool (true/false), got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects int, got {_describe(value)}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"config key '{key}' expects float, got {_describe(value)}")
        if not math.isfinite(number):
            raise _NonFinite(f"config key '{key}' must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' expects str, got {_describe(value)}")
    raise ConfigError(f"config key '{key}': unsupported schema type {tp!r}")  # pragma: no cover


def _from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"'{prefix}'" if prefix else "the top level"
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(
            f"unknown config key '{key}'; valid keys in {where}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def config_from_dict(schema_cls: type[T], data: dict) -> T:
    """Build and validate a schema instance from nested plain dicts (strict: no unknown keys)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping at the top level, got {_describe(data)}")
    cfg = _from_dict(schema_cls, data)
    _validate(cfg, "")
    return cfg


def _validate(cfg: Any, prefix: str) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _validate(value, f"{prefix}{f.name}.")
    check = getattr(cfg, "validate", None)
    if callable(check):
        check(prefix)


def config_to_dict(cfg: Any) -> Any:
    """Nested plain containers (dict/list/str/int/float/bool/None) for YAML or checkpoints."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {str(k): config_to_dict(v) for k, v in cfg.items()}
    return cfg


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """``["a.b=1", "c=[x,y]"]`` -> ``[("a.b", 1), ("c", ["x", "y"])]`` (values parsed as YAML)."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out


def _set_dotted(data: dict, schema_cls: type, key: str, value: Any) -> None:
    parts = key.split(".")
    node, cls, prefix = data, schema_cls, ""
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
        if fields is not None and part not in fields:
            where = f"'{prefix}'" if prefix else "the top level"
            raise ConfigError(
                f"unknown config key '{prefix + '.' if prefix else ''}{part}'; valid keys in "
                f"{where}: {', '.join(fields)}"
            )
        prefix = f"{prefix}.{part}" if prefix else part
        if i == len(parts) - 1:
            node[part] = value
            return
        hint = typing.get_type_hints(cls)[part] if fields is not None else Any
        if fields is not None and not dataclasses.is_dataclass(hint):
            raise ConfigError(f"config key '{prefix}' is a {_type_name(hint)}, it has no sub-keys")
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node, cls = child, hint


def load_config(
    schema_cls: type[T],
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Read ``path`` (YAML, optional), apply ``key.sub=value`` overrides, validate strictly.

    Keys missing from the file take the schema defaults.

    Raises:
        ConfigError: unknown key, wrong type, invalid value, unreadable YAML (one line).
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {p} is not UTF-8 text (byte {exc.start} cannot be "
                              "decoded); save it as UTF-8") from exc
        except OSError as exc:
            raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ConfigError(f"config file {p} is not valid YAML: {first}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping, got {type(loaded).__name__}")
        data = loaded
    # Start from the schema defaults so overrides of nested keys merge correctly.
    merged = config_to_dict(schema_cls())
    _deep_update(merged, data, schema_cls, "")
    for key, value in parse_overrides(overrides):
        _set_dotted(merged, schema_cls, key, value)
    return config_from_dict(schema_cls, merged)


def _deep_update(base: dict, new: dict, cls: type, prefix: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for k, v in new.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            where = f"'{prefix}'" if prefix else "the top level"
            raise ConfigError(f"unknown config key '{key}'; valid keys in {where}: {', '.join(fields)}")
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v, hints[k], key)
        else:
            base[k] = v


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""

    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def resolve_path(data_root: str | os.PathLike, path: str | os.PathLike | None) -> Path | None:
    """``data_root / path`` for relative paths, ``path`` itself when absolute, None for None."""
    if path is None:
        return None
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(data_root).expanduser() / p


def asset_file(cfg: Any, key: str, rel: str | os.PathLike | None) -> Path | None:
    """The file of config key ``key`` (``rel`` resolved against ``cfg.data_root``); None for None.

    Raises:
        AssetError: the file does not exist (naming the key, the path and ``data_root``).
    """
    p = resolve_path(cfg.data_root, rel)
    if p is not None and not p.is_file():
        raise AssetError(f"config key '{key}': file not found: {p} (data_root={cfg.data_root!r})")
    return p


def check_key(cond: bool, key: str, message: str) -> None:
    """Raise ``ConfigError("config key '<key>' <message>")`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"config key '{key}' {message}")


# ----------------------------------------------------------------------------------------
# Training schemas
# ----------------------------------------------------------------------------------------
@dataclass
class ArcFaceConfig:
    """ArcFace IResNet encoder (insightface layout). ``layers=[3,13,30,3]`` is r100."""

    layers: list[int] = field(default_factory=lambda: [3, 13, 30, 3])
    width: int = 64
    freeze: Literal["none", "l2", "l3", "l4"] = "l4"
    weights: Optional[str] = "pretrained/arcface/glint360_r100/backbone.pth"
    lr: float = 1e-4
    #: side the trunk sees; the 112 crops are area-averaged down to it (published models: 112)
    input_size: int = 112

    def validate(self, p: str) -> None:
        check_key(len(self.layers) == 4 and all(n >= 1 for n in self.layers), p + "layers",
               f"must be 4 positive block counts, got {self.layers}")
        check_key(self.width >= 8, p + "width", f"must be >= 8, got {self.width}")
        check_key(16 <= self.input_size <= 112 and self.input_size % 16 == 0, p + "input_size",
               f"must be a multiple of 16 in [16, 112], got {self.input_size}")
        check_key(self.lr >= 0, p + "lr", f"must be >= 0, got {self.lr}")


@dataclass
class FaRLConfig:
    """FaRL (CLIP ViT) image encoder. The defaults are ViT-B/16."""

    width: int = 768
    layers: int = 12
    heads: int = 12
    patch_size: int = 16
    image_size: int = 224
    embed_dim: int = 512
    weights: Optional[str] = "pretrained/FaRL-Base-Patch16-LAIONFace20M-ep64.pth"
    trainable: bool = True
    lr: float = 1e-4

    def validate(self, p: str) -> None:
        check_key(self.width % self.heads == 0, p + "width", f"must be divisible by heads={self.heads}")
        check_key(self.image_size % self.patch_size == 0, p + "image_size",
               f"must be divisible by patch_size={self.patch_size}")
        check_key(self.lr >= 0, p + "lr", f"must be >= 0, got {self.lr}")


@dataclass
class DenoiserConfig:
    """1-D attention U-Net denoiser (``ofer.nets.Denoiser``)."""

    dims: list[int] = field(default_factory=lambda: [300, 50, 10])
    num_qkv: int = 16

    def validate(self, p: str) -> None:
        check_key(len(self.dims) >= 2 and all(d >= 1 for d in self.dims), p + "dims",
               f"must hold >= 2 positive widths, got {self.dims}")
        check_key(self.num_qkv >= 1, p + "num_qkv", f"must be >= 1, got {self.num_qkv}")


@dataclass
class DiffusionConfig:
    """Noise schedule, training objective and the denoiser learning rate (OFER: eps, L1).

    ``schedule: linear`` uses ``num_steps, beta_1, beta_T`` (the original); ``cosine`` uses
    ``num_steps, cosine_s, max_beta``.

    ``noise_samples`` (not in the original; 1 = the original): K draws of ``(t, eps)`` per
    image and step, a lower-variance loss for K passes of the small denoiser (the encoders
    run once). ``prediction: x0`` trains the net to output the clean coefficients instead of
    the noise, ``cond_scale`` multiplies the condition before the net (``eps`` and 1: the
    original). ``normalize: true`` (not in the original) diffuses standardised targets
    ``(x - target_mean) / target_std``; the training scripts fill ``target_mean`` /
    ``target_std`` from the training set (one value per coefficient; on resume, from the
    checkpoint) unless the config pins them, and the checkpoint's config keeps them.
    """

    num_steps: int = 1000
    beta_1: float = 1e-4
    beta_T: float = 1e-2
    schedule: Literal["linear", "cosine"] = "linear"
    cosine_s: float = 0.008
    max_beta: float = 0.999
    loss: Literal["l1", "mse"] = "l1"
    lr: float = 1e-3
    noise_samples: int = 1
    prediction: Literal["eps", "x0"] = "eps"
    cond_scale: float = 1.0
    normalize: bool = False
    target_mean: Optional[list[float]] = None
    target_std: Optional[list[float]] = None

    def validate(self, p: str) -> None:
        check_key(self.num_steps >= 2, p + "num_steps", f"must be >= 2, got {self.num_steps}")
        check_key(self.noise_samples >= 1, p + "noise_samples", f"must be >= 1, got {self.noise_samples}")
        check_key(self.cond_scale > 0, p + "cond_scale", f"must be > 0, got {self.cond_scale}")
        stats = (self.target_mean, self.target_std)
        if any(v is not None for v in stats):
            check_key(self.normalize, p + "normalize",
                   "must be true when target_mean / target_std are given")
            check_key(all(v is not None for v in stats) and len(self.target_mean) == len(self.target_std),
                   p + "target_std", "target_mean and target_std must both be given, with one "
                   "entry per diffused coefficient")
            check_key(min(self.target_std, default=1.0) > 0, p + "target_std",
                   f"must be > 0 everywhere, got min {min(self.target_std, default=1.0)}")
        if self.schedule == "linear":
            check_key(0 < self.beta_1 < self.beta_T < 1, p + "beta_T",
                   f"must satisfy 0 < beta_1 < beta_T < 1, got {self.beta_1}, {self.beta_T}")
        else:
            check_key(self.cosine_s > 0, p + "cosine_s", f"must be > 0, got {self.cosine_s}")
            check_key(0 < self.max_beta < 1, p + "max_beta", f"must be in (0, 1), got {self.max_beta}")
        check_key(self.lr >= 0, p + "lr", f"must be >= 0, got {self.lr}")


@dataclass
class OcclusionAugConfig:
    """Synthetic occluders pasted on both crops before the encoders (``ofer.data.occlusion``).

    ``prob``: chance that an image gets one occluder; ``area``: its area as a fraction of the
    face box, drawn uniformly from ``[min, max]``. The masks are returned in the batch
    (``occlusion_mask``, 1 = occluded)."""

    prob: float = 0.0
    area: list[float] = field(default_factory=lambda: [0.05, 0.4])
    return_mask: bool = True

    def validate(self, p: str) -> None:
        check_key(0.0 <= self.prob <= 1.0, p + "prob", f"must be in [0, 1], got {self.prob}")
        check_key(len(self.area) == 2 and 0.0 < self.area[0] <= self.area[1] <= 1.0, p + "area",
               f"must be [min, max] with 0 < min <= max <= 1 (fractions of the face box), "
               f"got {self.area}")


@dataclass
class DataConfig:
    """Training data: dataset names under ``<data_root>/<root>`` in the MICA or OFER layout."""

    root: str = "datasets"
    train: list[str] = field(default_factory=lambda: ["LYHM", "STIRLING_LQ", "STIRLING_HQ",
                                                      "FACEWAREHOUSE", "FLORENCE"])
    val: list[str] = field(default_factory=list)
    layout: Literal["auto", "mica", "ofer23"] = "auto"
    actors_per_batch: int = 16
    images_per_actor: int = 4
    num_workers: int = 4
    occlusion: OcclusionAugConfig = field(default_factory=OcclusionAugConfig)

    def validate(self, p: str) -> None:
        check_key(len(self.train) >= 1, p + "train", "must name at least one dataset")
        check_key(self.actors_per_batch >= 1, p + "actors_per_batch",
               f"must be >= 1, got {self.actors_per_batch}")
        check_key(self.images_per_actor >= 1, p + "images_per_actor",
               f"must be >= 1, got {self.images_per_actor}")
        check_key(self.num_workers >= 0, p + "num_workers", f"must be >= 0, got {self.num_workers}")


@dataclass
class FlameConfig:
    """FLAME model used for validation errors, sample meshes and IdRank vertices."""

    model_path: str = "FLAME2020/generic_model.pkl"
    landmark_embedding_path: Optional[str] = None
    n_shape: int = 300
    n_exp: int = 100


@dataclass
class OptimConfig:
    """AdamW (one parameter group per module, learning rates in the module sections)."""

    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"

    def validate(self, p: str) -> None:
        check_key(self.weight_decay >= 0, p + "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check_key(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), p + "betas",
               f"must be two numbers in [0, 1), got {self.betas}")
        check_key(self.grad_clip >= 0, p + "grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip}")
        check_key(self.warmup_steps >= 0, p + "warmup_steps", f"must be >= 0, got {self.warmup_steps}")


@dataclass
class EMAConfig:
    """Exponential moving average of the denoiser (sampling uses it by default)."""

    enabled: bool = True
    decay: float = 0.9999
    start_step: int = 0

    def validate(self, p: str) -> None:
        check_key(0.0 <= self.decay < 1.0, p + "decay", f"must be in [0, 1), got {self.decay}")


@dataclass
class LoopConfig:
    """Steps, logging, checkpointing, device and precision."""

    max_steps: int = 2_000_000
    log_every: int = 50
    val_every: int = 5000
    ckpt_every: int = 1000
    sample_every: int = 5000
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    progress: bool = True
    tensorboard: bool = True
    nan_guard: bool = True

    def validate(self, p: str) -> None:
        check_key(self.max_steps >= 1, p + "max_steps", f"must be >= 1, got {self.max_steps}")
        for name in ("log_every", "val_every", "ckpt_every", "sample_every"):
            v = getattr(self, name)
            check_key(v >= 0, p + name, f"must be >= 0 (0 = off), got {v}")
        check_key(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               p + "device", f"must be 'auto', 'cpu' or 'cuda[:i]', got {self.device!r}")


@dataclass
class ValConfig:
    """Held-out evaluation (datasets from ``data.val``)."""

    num_samples: int = 10
    method: Literal["ddpm", "ddim", "dpmpp_2m", "legacy_ddim"] = "ddim"
    steps: int = 50
    max_items: int = 64
    seed: int = 1234

    def validate(self, p: str) -> None:
        check_key(self.num_samples >= 1, p + "num_samples", f"must be >= 1, got {self.num_samples}")
        check_key(self.steps >= 1, p + "steps", f"must be >= 1, got {self.steps}")
        check_key(self.max_items >= 1, p + "max_items", f"must be >= 1, got {self.max_items}")


@dataclass
class IdGenValConfig(ValConfig):
    """IdGen validation; with ``idrank_checkpoint`` also the error of the *ranked* identity.

    ``idrank_checkpoint``: an IdRank checkpoint (ours, from ``trainIdRank.py``, or the released
    ``model_idrank.tar``), relative to ``data_root`` or absolute. It is loaded once and scores
    the ``num_samples`` samples of every validation image; ``val/ranked_mm`` is the error of
    the top-scored one and becomes the metric that selects ``best.pt``.
    ``idrank_vertex_indices``: the front-face vertex list (``frontindices.npy``) the released
    IdRank needs (ours stores its vertices); relative to ``data_root`` or absolute.
    """

    idrank_checkpoint: Optional[str] = None
    idrank_vertex_indices: Optional[str] = None

    def validate(self, p: str) -> None:
        super().validate(p)
        for name in ("idrank_checkpoint", "idrank_vertex_indices"):
            v = getattr(self, name)
            check_key(v is None or bool(v.strip()), p + name, "must be a file path or null, got ''")


def _common_validate(cfg: Any) -> None:
    check_key(bool(cfg.run_dir), "run_dir", "must not be empty")
    check_key(not (cfg.resume and cfg.overwrite), "overwrite", "cannot be combined with resume=true")


@dataclass
class IdGenTrainConfig:
    """IdGen: ArcFace-conditioned diffusion over 300 FLAME shape coefficients."""

    data_root: str = "data"
    run_dir: str = "runs/idgen"
    seed: int = 0
    resume: bool = False
    #: start afresh in a run_dir that holds a run (its checkpoints are replaced)
    overwrite: bool = False
    n_shape: int = 300
    flame: FlameConfig = field(default_factory=FlameConfig)
    data: DataConfig = field(default_factory=DataConfig)
    arcface: ArcFaceConfig = field(default_factory=ArcFaceConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    val: IdGenValConfig = field(default_factory=IdGenValConfig)

    def validate(self, p: str) -> None:
        _common_validate(self)
        check_key(self.val.idrank_checkpoint is None or len(self.data.val) >= 1, "val.idrank_checkpoint",
               "needs held-out datasets in 'data.val' (the ranked error is measured on them)")
        check_key(1 <= self.n_shape <= self.flame.n_shape, "n_shape",
               f"must be in [1, flame.n_shape={self.flame.n_shape}], got {self.n_shape}")
        check_key(self.denoiser.dims[0] == self.n_shape, "denoiser.dims",
               f"must start with n_shape={self.n_shape}, got {self.denoiser.dims}")


@dataclass
class ExpGenTrainConfig:
    """ExpGen: [FaRL | ArcFace]-conditioned diffusion over 50 expression + 3 jaw values."""

    data_root: str = "data"
    run_dir: str = "runs/expgen"
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    n_exp: int = 50
    #: factor applied to *sampled* jaw poses at inference (stored in the model config;
    #: 0.5 in the released pipeline). Training targets are always the raw jaw axis-angle.
    jaw_scale: float = 0.5
    flame: FlameConfig = field(default_factory=FlameConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(train=["TEMPEH"]))
    arcface: ArcFaceConfig = field(default_factory=ArcFaceConfig)
    farl: FaRLConfig = field(default_factory=FaRLConfig)
    denoiser: DenoiserConfig = field(default_factory=lambda: DenoiserConfig(dims=[53, 25, 10]))
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    val: ValConfig = field(default_factory=ValConfig)

    def validate(self, p: str) -> None:
        _common_validate(self)
        check_key(1 <= self.n_exp <= self.flame.n_exp, "n_exp",
               f"must be in [1, flame.n_exp={self.flame.n_exp}], got {self.n_exp}")
        check_key(self.denoiser.dims[0] == self.n_exp + 3, "denoiser.dims",
               f"must start with n_exp + 3 = {self.n_exp + 3}, got {self.denoiser.dims}")
        check_key(self.jaw_scale > 0, "jaw_scale", f"must be > 0, got {self.jaw_scale}")


@dataclass
class RankerConfig:
    """IdRank scoring MLP (``ofer.nets.RankMLP``), its feature vertices and learning rate.

    ``vertex_indices``: the K vertices the ranker sees (its input width is ``6 * K``): a
    ``.npy`` integer array (the original ``frontindices.npy``, 1785 vertices) or a
    ``FLAME_masks.pkl``-style pickle, of which the region ``vertex_region`` is used.
    The indices are stored in the checkpoint.
    """

    lr: float = 1e-6
    vertex_indices: str = "pretrained/frontindices.npy"
    vertex_region: str = "face"
    hidden: list[int] = field(default_factory=lambda: [4096, 1024, 256, 64])
    groups: int = 8
    temperature: float = 1.0
    #: weight of the set-mean half of the features (1 = the original); a small value keeps
    #: the absolute face coordinates (tens of mm) from drowning the residuals (a few mm)
    mean_scale: float = 1.0

    def validate(self, p: str) -> None:
        check_key(self.lr >= 0, p + "lr", f"must be >= 0, got {self.lr}")
        check_key(self.mean_scale >= 0, p + "mean_scale", f"must be >= 0, got {self.mean_scale}")
        check_key(len(self.hidden) >= 1 and all(h >= 1 for h in self.hidden), p + "hidden",
               f"must hold >= 1 positive widths, got {self.hidden}")
        check_key(self.groups >= 1 and all(h % self.groups == 0 for h in self.hidden), p + "groups",
               f"must divide every hidden width {self.hidden}, got {self.groups}")
        check_key(self.temperature > 0, p + "temperature", f"must be > 0, got {self.temperature}")


@dataclass
class IdRankTrainConfig:
    """IdRank: learns to pick the best of N IdGen samples (ListNet loss)."""

    data_root: str = "data"
    run_dir: str = "runs/idrank"
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    idgen_checkpoint: str = "checkpoints/idgen.pt"
    idgen_use_ema: bool = True
    num_samples: int = 100
    sample_method: Literal["ddpm", "ddim", "dpmpp_2m", "legacy_ddim"] = "ddpm"
    sample_steps: int = 1000
    flame: FlameConfig = field(default_factory=FlameConfig)
    data: DataConfig = field(
        default_factory=lambda: DataConfig(train=["STIRLING_LQ_VAL"], actors_per_batch=8,
                                           images_per_actor=1, num_workers=0))
    arcface: ArcFaceConfig = field(default_factory=ArcFaceConfig)
    farl: FaRLConfig = field(default_factory=FaRLConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(enabled=False))
    train: LoopConfig = field(default_factory=LoopConfig)
    val: ValConfig = field(default_factory=ValConfig)

    def validate(self, p: str) -> None:
        _common_validate(self)
        check_key(self.num_samples >= 2, "num_samples", f"must be >= 2, got {self.num_samples}")
        check_key(self.sample_steps >= 1, "sample_steps", f"must be >= 1, got {self.sample_steps}")
