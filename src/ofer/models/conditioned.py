"""Image encoders + one head: the module that training optimises and sampling runs.

:class:`ConditionedModel` is the only place where a condition vector is built from images,
including the encoders' input preprocessing (ArcFace's area-averaging to a small trunk lives in
:class:`~ofer.nets.IResNet`; FaRL's resize and CLIP normalisation in
:meth:`~ofer.nets.FaRLEncoder.prepare`). Training batches and the sampling pipeline hand it the
same inputs: ``arcface_x (B,3,112,112)`` in [-1, 1] and ``farl_rgb (B,3,224,224)`` RGB in [0, 1]
(or uint8).

:func:`build_model` makes one from a training configuration.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ..config import ArcFaceConfig, FaRLConfig, asset_file, resolve_path
from ..errors import AssetError
from ..flame.assets import safe_load_pickle
from ..nets.arcface import IResNet, load_arcface_state_dict
from ..nets.farl import FaRLEncoder, load_farl_state_dict
from ..nets.rank_mlp import load_vertex_indices
from ..weights import find_weights
from .spec import get_spec

__all__ = ["ConditionedModel", "build_model", "build_arcface", "build_farl", "build_head",
           "load_rank_vertices"]


class ConditionedModel(nn.Module):
    """Image encoders + a head (IdGen, ExpGen or IdRank).

    ``state_dict`` keys: ``farl.*`` (when present), ``arcface.*``, ``head.*``.

    Args:
        head: the head; its ``kind`` selects the condition layout from :data:`~ofer.models.spec.SPECS`.
        arcface: IResNet (its output is L2-normalised in the condition).
        farl: FaRL encoder, present exactly when the kind's condition uses FaRL.
    """

    def __init__(self, head: nn.Module, arcface: nn.Module, farl: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.spec = get_spec(getattr(head, "kind", None), ValueError)
        if self.spec.uses_farl != (farl is not None):
            raise ValueError(f"the {self.spec.kind} condition {'needs a' if self.spec.uses_farl else 'has no'} "
                             "FaRL encoder")
        self.farl = farl
        self.arcface = arcface
        self.head = head

    @property
    def kind(self) -> str:
        return self.spec.kind

    def encode_arcface(self, arcface_x: Tensor, one_at_a_time: bool = False) -> Tensor:
        """Raw ArcFace embeddings ``(B, 512)``; ``one_at_a_time`` runs the images one by one
        (the released ranker's call, which skips the final BatchNorm1d at batch 1)."""
        if one_at_a_time:
            return torch.cat([self.arcface(arcface_x[i:i + 1]) for i in range(arcface_x.shape[0])])
        return self.arcface(arcface_x)

    def encode_farl(self, farl_rgb: Tensor) -> Tensor:
        """FaRL embeddings ``(B, E)`` of face crops (RGB in [0, 1] or uint8, any side)."""
        return self.farl(self.farl.prepare(farl_rgb))

    def assemble(self, arcface_emb: Tensor, farl_emb: Optional[Tensor] = None) -> Tensor:
        """The condition from the encoders' outputs: ``[farl | normalize(arcface)]`` (float32)."""
        a = nn.functional.normalize(arcface_emb.float(), dim=-1)
        if not self.spec.uses_farl:
            return a
        if farl_emb is None:
            raise ValueError(f"the {self.kind} condition needs the FaRL embedding")
        return torch.cat([farl_emb.float(), a], dim=-1)

    def condition(self, arcface_x: Tensor, farl_rgb: Optional[Tensor] = None) -> Tensor:
        """``(B,3,112,112)`` [and ``(B,3,S,S)`` face crops] -> ``(B, cond_dim)`` float32."""
        farl = None
        if self.spec.uses_farl:
            if farl_rgb is None:
                raise ValueError(f"the {self.kind} condition needs the FaRL face crops")
            farl = self.encode_farl(farl_rgb)
        return self.assemble(self.encode_arcface(arcface_x), farl)

    def condition_of_batch(self, batch: dict[str, Tensor]) -> Tensor:
        """:meth:`condition` of a training batch (``arcface`` and, when used, ``farl``)."""
        return self.condition(batch["arcface"], batch.get("farl") if self.spec.uses_farl else None)


# --------------------------------------------------------------------------------------
# Building from a training configuration
# --------------------------------------------------------------------------------------
def build_arcface(c: ArcFaceConfig, weights: Any = None) -> IResNet:
    """IResNet with the configured depth, width and freezing; ``weights``: a path or state dict."""
    m = IResNet(layers=tuple(c.layers), width=c.width, freeze=None if c.freeze == "none" else c.freeze,
                input_size=c.input_size)
    if weights is not None:
        load_arcface_state_dict(m, weights)
    return m


def build_farl(c: FaRLConfig, weights: Any = None) -> FaRLEncoder:
    """FaRL ViT of the configured size; ``weights``: a path or state dict; frozen unless trainable."""
    m = FaRLEncoder(image_size=c.image_size, patch_size=c.patch_size, width=c.width, layers=c.layers,
                    heads=c.heads, output_dim=c.embed_dim)
    if weights is not None:
        load_farl_state_dict(m, weights)
    if not c.trainable:
        m.requires_grad_(False)
    return m


def load_rank_vertices(cfg: Any) -> np.ndarray:
    """The (K,) int64 ranker vertices of ``ranker.vertex_indices`` (+ ``ranker.vertex_region``)."""
    path = asset_file(cfg, "ranker.vertex_indices", cfg.ranker.vertex_indices)
    try:
        # a .pkl of masks goes through the FLAME allow-list unpickler (Python 2 and 3 pickles)
        source = path if path.suffix == ".npy" else safe_load_pickle(path)
        return load_vertex_indices(source, key=cfg.ranker.vertex_region)
    except AssetError as exc:
        raise AssetError(f"config key 'ranker.vertex_indices': {exc}") from exc


def build_head(kind: str, cfg: Any, vertex_indices: Any = None, num_vertices: Optional[int] = None) -> nn.Module:
    """The head of ``kind`` for a training configuration.

    A ranker takes its vertices from ``vertex_indices`` (K,) or, to fill them later from a
    state dict, just their number ``num_vertices``.
    """
    spec = get_spec(kind)
    if vertex_indices is not None:
        num_vertices = len(vertex_indices)
    config = spec.head_config(cfg, num_vertices)
    if spec.generative:
        return spec.head.from_config(config)
    return spec.head.from_config(config, vertex_indices=vertex_indices)


def build_model(kind: str, cfg: Any, load_weights: bool = True, vertex_indices: Any = None,
                num_vertices: Optional[int] = None) -> ConditionedModel:
    """Encoders + head of ``kind``; the pretrained encoder weights of the config when ``load_weights``.

    An encoder weight file missing at its configured path but known to :mod:`ofer.weights` by
    its name (the FaRL release file, say) is taken from the weight cache, downloaded once.

    A ranker's vertices come from ``vertex_indices`` / ``num_vertices`` when given, else from
    ``ranker.vertex_indices`` of the config.
    """
    spec = get_spec(kind)
    if not spec.generative and vertex_indices is None and num_vertices is None:
        vertex_indices = load_rank_vertices(cfg)
    head = build_head(kind, cfg, vertex_indices=vertex_indices, num_vertices=num_vertices)
    def weights(key: str, rel: Optional[str]) -> Any:
        path = resolve_path(cfg.data_root, rel) if load_weights else None
        return None if path is None else find_weights(path, key, context=f" (data_root={cfg.data_root!r})")

    arcface = build_arcface(cfg.arcface, weights("arcface.weights", cfg.arcface.weights))
    farl = build_farl(cfg.farl, weights("farl.weights", cfg.farl.weights)) if spec.uses_farl else None
    return ConditionedModel(head, arcface, farl)

