"""ArcFace identity encoder: the insightface ``arcface_torch`` IResNet, written for this project.

The module layout (and therefore every ``state_dict`` key) is that of insightface's
``iresnet{18,34,50,100}``, which MICA and OFER copy unchanged. Consequently these files load
with ``strict=True``:

* insightface Glint360K / MS1MV3 ``backbone.pth`` (r100: ``layers=(3, 13, 30, 3)``),
* the ``arcface`` entry of MICA's ``mica.tar``,
* the ``arcface`` entry of OFER's IdGen / ExpGen / IdRank checkpoints.

Differences to the originals, all opt-in or documented:

* ``freeze="l2" | "l3" | "l4"`` freezes the stem and the first 1/2/3 stages as OFER/MICA do
  (``requires_grad=False`` and run under ``torch.no_grad()``). In the originals the BatchNorm
  running statistics of the frozen part keep updating in ``train()`` mode; here frozen stages
  stay in eval mode (``freeze_bn_stats=True``, the default), so frozen means frozen. Pass
  ``freeze_bn_stats=False`` to get the original behaviour.
* ``skip_bn1d_for_batch1=True`` reproduces MICA/OFER's quirk of skipping the final
  ``BatchNorm1d`` (``features``) when the batch holds one image. The released IdRank was
  evaluated that way (batch 1 at test time); the default (``False``) is insightface's
  behaviour (always apply it).
* ``width`` scales all channel counts (64 -> ``width``), for tiny CPU demo encoders. Only
  ``width=64`` matches the published weights.

The network returns the raw 512-d embedding; the OFER models use its L2-normalised form
(:func:`l2_normalize` or ``forward(x, normalize=True)``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError

__all__ = [
    "IResNet",
    "IBasicBlock",
    "ARCH_LAYERS",
    "iresnet",
    "l2_normalize",
    "load_arcface_state_dict",
    "arcface_from_state_dict",
]

#: Stage depths of the insightface variants.
ARCH_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}

_FREEZE_DEPTH = {None: 0, "none": 0, "l2": 1, "l3": 2, "l4": 3}


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalise embeddings along the last dimension (as ``F.normalize(x, dim=1)`` for (B, C))."""
    return F.normalize(x, p=2.0, dim=-1, eps=eps)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation-style residual block of IResNet.

    ``bn1 -> conv1 (3x3) -> bn2 -> prelu -> conv2 (3x3, stride) -> bn3`` plus the identity or
    ``downsample`` (1x1 conv with stride + BN). No activation after the sum.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """ArcFace IResNet (default r100) mapping aligned 112x112 faces to 512-d embeddings.

    Args:
        layers: blocks per stage; ``(3, 13, 30, 3)`` = r100, see :data:`ARCH_LAYERS`.
        num_features: embedding size (512).
        width: channels of the stem / first stage (64 in every published model); the
            stages use ``width * (1, 2, 4, 8)``.
        dropout: dropout before ``fc`` (0 in the published models).
        freeze: ``None``, ``"l2"``, ``"l3"`` or ``"l4"``: freeze the stem and stages before
            ``layer2`` / ``layer3`` / ``layer4`` (OFER uses ``"l4"``).
        freeze_bn_stats: keep frozen BatchNorms in eval mode while training (default True;
            the originals let their running statistics drift).
        skip_bn1d_for_batch1: skip ``features`` (BatchNorm1d) when the batch size is 1, the
            MICA/OFER quirk needed to reproduce the released IdRank (default False).
        input_size: side of the square input the trunk sees (112 in every published model;
            it sizes ``fc``). Larger inputs are area-averaged down to it, so a small CPU
            encoder (e.g. 64) can take the standard 112 crops at a third of the cost.

    Input: ``(B, 3, 112, 112)`` float32 in [-1, 1] (``(pixel - 127.5) / 127.5``).
    Output: ``(B, num_features)`` float32, *not* normalised unless ``normalize=True``.
    """

    def __init__(
        self,
        layers: Sequence[int] = ARCH_LAYERS["r100"],
        num_features: int = 512,
        width: int = 64,
        dropout: float = 0.0,
        freeze: str | None = None,
        freeze_bn_stats: bool = True,
        skip_bn1d_for_batch1: bool = False,
        input_size: int = 112,
    ) -> None:
        super().__init__()
        layers = tuple(int(n) for n in layers)
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"IResNet layers must be 4 positive ints, got {layers}")
        if freeze not in _FREEZE_DEPTH:
            raise ValueError(f"IResNet freeze must be one of None, 'l2', 'l3', 'l4'; got {freeze!r}")
        if input_size % 16 != 0:
            raise ValueError(f"IResNet input_size must be a multiple of 16, got {input_size}")
        self.layers_cfg = layers
        self.width = int(width)
        self.input_size = int(input_size)
        self.freeze = None if freeze in (None, "none") else freeze
        self.freeze_bn_stats = bool(freeze_bn_stats)
        self.skip_bn1d_for_batch1 = bool(skip_bn1d_for_batch1)

        w = self.width
        self.conv1 = nn.Conv2d(3, w, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w, eps=1e-5)
        self.prelu = nn.PReLU(w)
        self._inplanes = w
        self.layer1 = self._make_layer(w, layers[0])
        self.layer2 = self._make_layer(2 * w, layers[1])
        self.layer3 = self._make_layer(4 * w, layers[2])
        self.layer4 = self._make_layer(8 * w, layers[3])
        self.bn2 = nn.BatchNorm2d(8 * w, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        side = self.input_size // 16
        self.fc = nn.Linear(8 * w * side * side, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        self._init_weights()
        self._apply_freeze()

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(
            nn.Conv2d(self._inplanes, planes, kernel_size=1, stride=2, bias=False),
            nn.BatchNorm2d(planes, eps=1e-5),
        )
        mods = [IBasicBlock(self._inplanes, planes, stride=2, downsample=downsample)]
        self._inplanes = planes
        mods += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def _init_weights(self) -> None:
        # Same scheme as insightface: N(0, 0.1) convs, unit/zero BN, BN1d weight fixed to 1.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    # -- freezing -----------------------------------------------------------------------
    def frozen_modules(self) -> list[nn.Module]:
        """The modules frozen by ``freeze`` (stem first), empty when nothing is frozen."""
        depth = _FREEZE_DEPTH[self.freeze]
        if depth == 0:
            return []
        stages = [self.layer1, self.layer2, self.layer3][:depth]
        return [self.conv1, self.bn1, self.prelu, *stages]

    def _apply_freeze(self) -> None:
        for m in self.frozen_modules():
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> IResNet:
        """Set train/eval mode; frozen stages stay in eval mode when ``freeze_bn_stats``."""
        super().train(mode)
        if mode and self.freeze_bn_stats:
            for m in self.frozen_modules():
                m.eval()
        return self

    # -- forward ------------------------------------------------------------------------
    def _trunk(self, x: torch.Tensor, start: int) -> torch.Tensor:
        stages = [self.layer1, self.layer2, self.layer3, self.layer4]
        for stage in stages[start:]:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Embed aligned faces.

        Args:
            x: ``(B, 3, S, S)`` float, values in [-1, 1]; S = ``input_size`` (112), or a
                larger S that is area-averaged down to ``input_size`` first (a small encoder
                fed the standard 112 crop).
            normalize: return the L2-normalised embedding.

        Returns:
            ``(B, num_features)`` float tensor.
        """
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3] or x.shape[2] < self.input_size:
            raise ValueError(f"IResNet expects input (B, 3, S, S) with S >= {self.input_size} "
                             f"(input_size), got {tuple(x.shape)}")
        if x.shape[2] != self.input_size:  # e.g. a 112 crop into a small demo encoder
            x = F.adaptive_avg_pool2d(x, self.input_size)
        depth = _FREEZE_DEPTH[self.freeze]
        if depth:
            with torch.no_grad():
                h = self.prelu(self.bn1(self.conv1(x)))
                for stage in [self.layer1, self.layer2, self.layer3][:depth]:
                    h = stage(h)
        else:
            h = self.prelu(self.bn1(self.conv1(x)))
        h = self._trunk(h, depth)
        h = self.bn2(h)
        h = self.dropout(torch.flatten(h, 1))
        h = self.fc(h)
        if not (self.skip_bn1d_for_batch1 and h.shape[0] == 1):
            h = self.features(h)
        return l2_normalize(h) if normalize else h


def iresnet(arch: str = "r100", **kwargs: Any) -> IResNet:
    """Build an IResNet by name (``"r18"``, ``"r34"``, ``"r50"``, ``"r100"``, ``"r200"``)."""
    if arch not in ARCH_LAYERS:
        raise ValueError(f"unknown IResNet arch {arch!r}; expected one of {sorted(ARCH_LAYERS)}")
    return IResNet(layers=ARCH_LAYERS[arch], **kwargs)


def _extract_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("arcface", "state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
                if any(torch.is_tensor(v) for v in inner.values()):
                    return _extract_state_dict(inner, source)
        if obj and all(torch.is_tensor(v) for v in obj.values()):
            out = dict(obj)
            if all(k.startswith("module.") for k in out):
                out = {k[len("module."):]: v for k, v in out.items()}
            if any(k.startswith("arcface.") for k in out):  # an OFER training checkpoint's model
                out = {k[len("arcface."):]: v for k, v in out.items() if k.startswith("arcface.")}
            return out
    raise CheckpointError(
        f"{source}: no ArcFace state_dict found (expected a tensor dict, or one under 'arcface'/'state_dict')"
    )


def load_arcface_state_dict(
    model: IResNet, source: str | os.PathLike | Mapping[str, Any], strict: bool = True
) -> IResNet:
    """Load ArcFace weights into ``model`` and return it.

    ``source`` is a path (read with ``weights_only=True``) or a mapping: a bare IResNet
    state_dict (insightface ``backbone.pth``), a checkpoint dict holding one under
    ``arcface`` (MICA, OFER) or ``state_dict``, or a checkpoint of our training scripts
    (its ``model`` entry's ``arcface.*`` keys, e.g. to start ExpGen from a trained IdGen's
    encoder). A ``module.`` prefix (DataParallel) is removed.
    Mismatches raise one-line :class:`~ofer.errors.CheckpointError` naming the keys.
    """
    name = str(source) if not isinstance(source, Mapping) else "ArcFace state_dict"
    if not isinstance(source, Mapping):
        if not os.path.isfile(source):
            raise CheckpointError(f"ArcFace weights not found: {source}")
        try:
            source = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"cannot read ArcFace weights {name}: {msg}") from exc
    sd = _extract_state_dict(source, name)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad_shape = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad_shape:
        k = bad_shape[0]
        raise CheckpointError(
            f"{name}: {len(bad_shape)} ArcFace tensors have the wrong shape, e.g. {k}: "
            f"{tuple(sd[k].shape)} in file, {tuple(own[k].shape)} expected (wrong layers/width?)"
        )
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{name}: ArcFace keys do not match: {len(missing)} missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}"
        )
    model.load_state_dict(sd, strict=strict)
    return model


def arcface_from_state_dict(source: Mapping[str, Any], name: str = "ArcFace state_dict") -> IResNet:
    """An IResNet whose depth, width and input size are read off the weights, with them loaded.

    ``source``: any mapping :func:`load_arcface_state_dict` accepts (the ``arcface`` entry of a
    released checkpoint, an insightface ``backbone.pth``, ...).
    """
    sd = _extract_state_dict(source, name)
    try:
        depth = tuple(1 + max((int(k.split(".")[1]) for k in sd if k.startswith(f"layer{i}.")), default=-1)
                      for i in range(1, 5))
        width = int(sd["conv1.weight"].shape[0])
        num_features, flat = (int(n) for n in sd["fc.weight"].shape)
    except (KeyError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{name}: not in the insightface IResNet layout ({exc})") from exc
    side = int(round((flat / (8 * width)) ** 0.5))  # fc reads 8*width channels of side x side
    model = IResNet(layers=depth, width=width, num_features=num_features, input_size=side * 16)
    return load_arcface_state_dict(model, sd)
