"""Import of the published OFER ``.tar`` files.

Official files (``model_idgen_flame20.tar``, ``model_expgen_flame20.tar``,
``model_idrank.tar``) are dicts with the entries ``net`` (denoiser or ranker
``state_dict``), ``var_sched`` (17 schedule buffers), ``diffusion`` (``net.*`` +
``var_sched.*``), ``arcface``, ``farl`` and training state (``optimizer``, ``scheduler``,
``epoch``, ``global_step``, ``batch_size``). :func:`import_official` maps every key
strictly and returns an :class:`ImportReport`; anything missing, unexpected or
mis-shaped is a :class:`~ofer.errors.CheckpointError`, never a silent partial load.

**The q/k/v projections.** The original denoiser kept its 16 q/k/v projections per
attention block in a plain Python list: never trained, never saved, drawn from the torch CPU
generator whenever a process built the network. They are re-created by replaying that draw
(:mod:`ofer.models.qkv_replay`): ``qkv="training"`` (default) gives the projections the
network was trained with, ``qkv="released"`` those of the released ``test.py`` run (and so of
its results), ``qkv="unet"`` a process that built the U-Net first; ``qkv_weights=<dict>``
uses projections you dumped yourself (keys ``<block>.to_qkv.<i>.weight``).

A training-time checkpoint also holds ``<block>.fn.fn.qkv.weight`` = projection 15 of each
block as used in training; the report compares the replay against it ("verified" or
"mismatch"). The arcface / farl entries are passed through as state dicts (their
modules live in :mod:`ofer.nets`) and only counted here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..nets.unet1d import TIME_EMB_DIM
from .checkpoint import read_checkpoint, require_finite
from .qkv_replay import QKV_REPLAYS, replay_description, replay_qkv
from .spec import ARCFACE_DIM, KINDS, SPECS

__all__ = [
    "ImportReport",
    "ImportResult",
    "import_official",
    "detect_official_kind",
    "is_official",
    "replay_qkv",
    "QKV_REPLAYS",
]

ENCODER_ENTRIES = ("arcface", "farl")
TRAINING_ENTRIES = ("optimizer", "scheduler", "epoch", "global_step", "batch_size", "validator")
OFFICIAL_SCHEDULE = {"kind": "linear", "num_steps": 1000, "beta_1": 1e-4, "beta_T": 1e-2}


@dataclass
class ImportReport:
    """What :func:`import_official` did with every entry and key of an official file."""

    path: str
    kind: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mis_shaped: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    schedule: str = "absent"
    qkv_source: str = ""
    qkv_check: str = "not checked"
    encoders: dict[str, int] = field(default_factory=dict)
    ignored_entries: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every key was mapped (no missing, unexpected or mis-shaped key)."""
        return not (self.missing or self.unexpected or self.mis_shaped)

    def summary(self) -> str:
        """One line: counts of each problem (used in error messages)."""
        parts = [f"{len(self.missing)} missing", f"{len(self.unexpected)} unexpected",
                 f"{len(self.mis_shaped)} mis-shaped"]
        first = (self.missing + self.unexpected + [k for k, _, _ in self.mis_shaped])[:3]
        return ", ".join(parts) + (f" (e.g. {', '.join(first)})" if first else "")

    def __str__(self) -> str:
        lines = [f"{self.kind} checkpoint {self.path}",
                 f"  network keys loaded: {self.loaded} ({self.summary()})"]
        for k, want, got in self.mis_shaped:
            lines.append(f"  mis-shaped {k}: expected {want}, got {got}")
        lines.append(f"  schedule: {self.schedule}")
        if self.qkv_source:
            lines.append(f"  q/k/v projections: {self.qkv_source}")
            lines.append(f"  q/k/v check: {self.qkv_check}")
        for name, n in self.encoders.items():
            lines.append(f"  encoder {name}: {n} keys (returned as a state dict)")
        if self.ignored_entries:
            lines.append(f"  ignored entries: {', '.join(self.ignored_entries)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class ImportResult:
    """``model`` (built, eval mode), ``report`` and the encoder ``state_dict`` s by entry name."""

    model: nn.Module
    report: ImportReport
    encoders: dict[str, dict[str, Tensor]]


def _fail(message: str, report: ImportReport | None = None) -> CheckpointError:
    err = CheckpointError(message)
    err.report = report  # type: ignore[attr-defined]
    return err


# ---------------------------------------------------------------- official import
def _denoiser_config_from_keys(sd: dict[str, Tensor], path: str) -> dict[str, Any]:
    try:
        d = sd["init_conv.weight"].shape[0]
        cond = sd["downs.0.0.mlp.1.weight"].shape[1] - TIME_EMB_DIM
        levels = sorted({int(k.split(".")[1]) for k in sd if k.startswith("downs.")})
        dims = [d] + [sd[f"downs.{i}.3.2.weight"].shape[0] for i in levels]
        num_qkv = sd["mid_attn.fn.fn.to_out_linear.weight"].shape[1]
    except (KeyError, IndexError) as exc:
        raise _fail(f"{path}: 'net' is not an OFER denoiser state dict (no key {exc})") from exc
    except (AttributeError, TypeError, ValueError) as exc:
        raise _fail(f"{path}: 'net' is not an OFER denoiser state dict (an entry is not a tensor "
                    "of the expected rank)") from exc
    return {"param_dim": int(d), "cond_dim": int(cond), "dims": [int(v) for v in dims],
            "num_qkv": int(num_qkv)}


def _cond_width(net: dict[str, Any]) -> int | None:
    """Condition width of a denoiser state dict: the first FiLM layer reads [time emb | cond]."""
    w = net.get("downs.0.0.mlp.1.weight")
    if not isinstance(w, Tensor) or w.ndim != 2:
        return None
    return int(w.shape[1]) - TIME_EMB_DIM


def _official_net(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    net = ckpt.get("net")
    if isinstance(net, dict):
        return net
    diff = ckpt.get("diffusion")
    if isinstance(diff, dict):
        return {k[4:]: v for k, v in diff.items() if k.startswith("net.")}
    return None


def is_official(ckpt: dict[str, Any]) -> bool:
    """Whether a checkpoint dict is laid out like the released files (``net`` / ``diffusion``)."""
    return "model" not in ckpt and "ema" not in ckpt and _official_net(ckpt) is not None


def detect_official_kind(ckpt: dict[str, Any]) -> str | None:
    """The kind of a released checkpoint dict, from what it holds (None when it is none).

    A ranker file holds ``ranklayers.*``; a denoiser is IdGen or ExpGen by its condition
    layout (:data:`~ofer.models.spec.SPECS`): the condition width read off the first
    residual block is ArcFace alone or ArcFace and FaRL.
    """
    net = _official_net(ckpt)
    if not net:
        return None
    ranker = any(str(k).startswith("ranklayers.") for k in net)
    cond = _cond_width(net)
    for spec in SPECS.values():
        if spec.generative == ranker:
            continue
        if ranker:
            return spec.kind
        if cond is not None and (cond > ARCFACE_DIM) == spec.uses_farl:
            return spec.kind
    return None


def _schedule_buffer_matches(value: Any, ours: Tensor) -> bool:
    """Whether a stored ``var_sched`` buffer equals ours in shape and value (rtol 1e-6).

    Any numeric tensor (integer ones too) or nested list of numbers is compared by value;
    strings, ``None`` and other objects never match.
    """
    try:
        v = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        return False
    return v.shape == ours.shape and bool(torch.allclose(v, ours.double(), rtol=1e-6, atol=1e-12))


def _strict_load(module: nn.Module, sd: dict[str, Tensor], report: ImportReport,
                 skip: tuple[str, ...] = (), allow_extra: tuple[str, ...] = ()) -> None:
    """Copy ``sd`` into ``module``; record missing (except ``skip`` substrings) /
    unexpected (except ``allow_extra`` suffixes) / mis-shaped keys; load only if clean."""
    target = module.state_dict()
    expected = [k for k in target if not any(s in k for s in skip)]
    report.missing += [k for k in expected if k not in sd]
    for k, v in sd.items():
        if k not in target:
            if not (allow_extra and k.endswith(allow_extra)):
                report.unexpected.append(k)
        elif not isinstance(v, Tensor) or tuple(v.shape) != tuple(target[k].shape):
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            report.mis_shaped.append((k, tuple(target[k].shape), got))
    if report.ok:
        module.load_state_dict({k: sd[k] for k in expected}, strict=False)
        report.loaded = len(expected)


def import_official(source: str | Path | dict[str, Any], kind: str, *, qkv: str = "training",
                    qkv_seed: int | None = None, qkv_weights: dict[str, Tensor] | None = None,
                    vertex_indices=None, map_location: Any = "cpu",
                    path: str | Path | None = None) -> ImportResult:
    """Read an official OFER ``.tar`` checkpoint into our model, strictly.

    Args:
        source: the ``.tar`` file (read with ``torch.load(weights_only=True)``), or its
            contents already read (then ``path`` names it in messages).
        kind: ``"idgen"``, ``"expgen"`` or ``"idrank"``; a file of another kind raises.
        qkv: which draw of the q/k/v projections to replay: ``"training"`` (the
            network's own), ``"released"`` (the released ``test.py`` run) or ``"unet"``.
        qkv_seed: the seed of that process (default: 1 for released, else 0).
        qkv_weights: projections to use instead of a replay (Denoiser ``to_qkv`` keys).
        vertex_indices: IdRank only, the feature vertices (the original
            ``frontindices.npy``); can also be set later with ``set_vertex_indices``.

    Returns:
        :class:`ImportResult` with the model in eval mode.

    Raises:
        CheckpointError: unreadable file, wrong kind, a tensor with NaN or inf (named), a
            ``var_sched`` that is not the official schedule, or any missing / unexpected /
            mis-shaped key (the message summarises; ``err.report`` has the lists).

    ``var_sched`` buffers are compared by value: integer tensors or plain numbers that equal
    the schedule would pass (none can equal its fractional values); anything else is refused.
    """
    if kind not in KINDS:
        raise CheckpointError(f"unknown checkpoint kind {kind!r}; expected one of {KINDS}")
    if isinstance(source, dict):
        ckpt, path = source, Path(path if path is not None else "<checkpoint>")
    else:
        path = Path(source)
        ckpt = read_checkpoint(path, map_location=map_location)
    report = ImportReport(path=str(path), kind=kind)
    found = detect_official_kind(ckpt)
    if found is None:
        raise _fail(f"{path} is not an official OFER checkpoint (entries: "
                    f"{sorted(map(str, ckpt))[:8]}; expected 'net' or 'diffusion')", report)
    if found != kind:
        raise _fail(f"{path} holds an {found} checkpoint, expected {kind}", report)

    require_finite({k: ckpt[k] for k in ("net", "diffusion", "var_sched", *ENCODER_ENTRIES)
                    if isinstance(ckpt.get(k), dict)}, path)
    encoders = {k: ckpt[k] for k in ENCODER_ENTRIES if isinstance(ckpt.get(k), dict)}
    report.encoders = {k: len(v) for k, v in encoders.items()}
    handled = set(ENCODER_ENTRIES) | {"net", "var_sched", "diffusion"}
    report.ignored_entries = [k for k in ckpt if k not in handled]

    spec = SPECS[kind]
    if not spec.generative:
        first = ckpt["net"].get("ranklayers.0.mlp.weight")
        model: nn.Module = spec.head.from_config(
            {"in_dim": first.shape[1]} if isinstance(first, Tensor) and first.ndim == 2 else {},
            vertex_indices=vertex_indices)
        _strict_load(model.net, ckpt["net"], report)
        if not report.ok:
            raise _fail(f"{path}: ranker keys do not match: {report.summary()}", report)
        if vertex_indices is None:
            report.notes.append("vertex indices not set: call set_vertex_indices() with the "
                                "original frontindices.npy before ranking")
        return ImportResult(model.eval(), report, encoders)

    # ---- IdGen / ExpGen
    diff = ckpt.get("diffusion") if isinstance(ckpt.get("diffusion"), dict) else {}
    net_sd = ckpt.get("net") if isinstance(ckpt.get("net"), dict) else None
    diff_net = {k[4:]: v for k, v in diff.items() if k.startswith("net.")}
    if net_sd is None:
        net_sd = diff_net
        report.notes.append("no 'net' entry: network weights taken from 'diffusion'")
    elif diff_net:
        differ = [k for k, v in net_sd.items()
                  if k in diff_net and not (isinstance(v, Tensor) and isinstance(diff_net[k], Tensor)
                                            and v.shape == diff_net[k].shape and torch.equal(v, diff_net[k]))]
        if differ or set(diff_net) != set(net_sd):
            raise _fail(f"{path}: 'net' and 'diffusion' disagree on {len(differ)} tensors "
                        f"and {len(set(diff_net) ^ set(net_sd))} key names", report)
    arch = _denoiser_config_from_keys(net_sd, str(path))
    model = spec.head.from_config({**arch, "schedule": dict(OFFICIAL_SCHEDULE)})

    _strict_load(model.net, net_sd, report, skip=(".to_qkv.",), allow_extra=(".fn.fn.qkv.weight",))
    if not report.ok:
        raise _fail(f"{path}: denoiser keys do not match: {report.summary()}", report)

    # schedule: must equal the official linear schedule, buffer for buffer
    sched_sd = ckpt.get("var_sched")
    if not isinstance(sched_sd, dict):
        sched_sd = {k[10:]: v for k, v in diff.items() if k.startswith("var_sched.")} or None
    if sched_sd is None:
        report.schedule = "absent; using the official linear schedule (T=1000, 1e-4 -> 1e-2)"
    else:
        ours = model.var_sched.state_dict()
        if set(sched_sd) != set(ours):
            raise _fail(f"{path}: 'var_sched' has keys {sorted(set(sched_sd) ^ set(ours))[:4]} "
                        "that differ from the 17 expected buffers", report)
        bad = [k for k, v in sched_sd.items() if not _schedule_buffer_matches(v, ours[k])]
        if bad:
            raise _fail(f"{path}: 'var_sched' is not the linear T=1000 1e-4 -> 1e-2 schedule "
                        f"(differs in {bad[:3]})", report)
        report.schedule = "linear T=1000, beta 1e-4 -> 1e-2 (all 17 buffers match)"

    # q/k/v projections
    if qkv_weights is not None:
        report.qkv_source = "supplied by the caller"
        proj = qkv_weights
    else:
        try:
            proj = replay_qkv(arch, qkv, qkv_seed, kind=kind)
        except ValueError as exc:
            raise _fail(f"{path}: {exc}", report) from exc
        report.qkv_source = "replayed " + replay_description(qkv, qkv_seed, kind, spec.uses_farl)
    qkv_report = ImportReport(path=str(path), kind=kind)
    _strict_load(model.net, proj, qkv_report, skip=tuple(k for k in model.net.state_dict()
                                                          if ".to_qkv." not in k))
    if not qkv_report.ok:
        raise _fail(f"{path}: q/k/v projections do not fit the network: "
                    f"{qkv_report.summary()}", report)
    # compare with the training-time projection 15 stored as <block>.fn.fn.qkv.weight
    stored = {k: v for k, v in net_sd.items() if k.endswith(".fn.fn.qkv.weight")}
    if not stored:
        report.qkv_check = "not verifiable (the file holds no '.fn.fn.qkv.weight' keys)"
    elif qkv == "released" and qkv_weights is None:
        report.qkv_check = ("not compared: the file stores training-time projections, and the "
                            "released run drew others")
    else:
        last = arch["num_qkv"] - 1
        match = sum(
            torch.allclose(v.float(), model.net.state_dict()[
                k.replace(".qkv.weight", f".to_qkv.{last}.weight")].float(), atol=1e-7)
            for k, v in stored.items())
        report.qkv_check = (f"verified: {match}/{len(stored)} blocks equal the stored "
                            "training-time projection" if match == len(stored) else
                            f"mismatch: {match}/{len(stored)} blocks equal the stored "
                            "training-time projection; outputs will differ from training")
    return ImportResult(model.eval(), report, encoders)
