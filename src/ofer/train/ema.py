"""Exponential moving average of (part of) a model's weights.

The EMA covers the floating-point parameters and buffers whose names start with one of
``prefixes`` (all of them when ``prefixes`` is None). :meth:`EMA.full_state_dict` returns
the module's ``state_dict`` with those entries replaced by their averages, so a checkpoint's
``"ema"`` entry loads into the same model class as ``"model"``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
from torch import nn
from ..errors import CheckpointError

__all__ = ["EMA"]


class EMA:
    """``shadow <- decay * shadow + (1 - decay) * weight`` after each optimiser step.

    Args:
        module: the (unwrapped) model.
        decay: the EMA decay in [0, 1).
        prefixes: names of the tracked submodules (e.g. ``["generator."]``); None = all.
    """

    def __init__(self, module: nn.Module, decay: float = 0.9999,
                 prefixes: Optional[Sequence[str]] = None) -> None:
        self.decay = float(decay)
        self.prefixes = tuple(prefixes) if prefixes else None
        self.shadow: dict[str, torch.Tensor] = {
            name: t.detach().clone() for name, t in self._tracked(module)
        }

    def _tracked(self, module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in module.state_dict(keep_vars=True).items():
            if not torch.is_floating_point(t):
                continue
            if self.prefixes is None or name.startswith(self.prefixes):
                yield name, t

    @torch.no_grad()
    def update(self, module: nn.Module, decay: Optional[float] = None) -> None:
        """Blend the current weights into the average (``decay=0`` copies them)."""
        d = self.decay if decay is None else float(decay)
        avg, cur = [], []
        for name, t in self._tracked(module):
            s = self.shadow[name]
            if isinstance(t, nn.Parameter):
                avg.append(s)
                cur.append(t.detach())
            else:  # buffers (BatchNorm statistics) are copied
                s.copy_(t.detach())
        if avg:  # one fused update (same arithmetic as a per-tensor lerp_)
            torch._foreach_lerp_(avg, cur, 1.0 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged tensors only (names as in the module)."""
        return {k: v.clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise CheckpointError(f"EMA state lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
        for k in self.shadow:
            self.shadow[k].copy_(state[k])

    def full_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``module.state_dict()`` with the tracked entries replaced by their averages."""
        out = {k: v.detach().clone() for k, v in module.state_dict().items()}
        for k, v in self.shadow.items():
            out[k] = v.clone()
        return out

    @contextlib.contextmanager
    def swapped_in(self, module: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averages into ``module`` (for sampling / validation)."""
        backup = {name: t.detach().clone() for name, t in self._tracked(module)}
        sd = module.state_dict(keep_vars=True)
        with torch.no_grad():
            for k, v in self.shadow.items():
                sd[k].copy_(v)
        try:
            yield module
        finally:
            with torch.no_grad():
                for k, v in backup.items():
                    sd[k].copy_(v)
