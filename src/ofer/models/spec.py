"""What each kind of OFER model is: one table, read wherever behaviour depends on the kind.

An entry says which head the kind has, whether its condition includes FaRL, how wide the
condition is, which dataset mode trains it and how a training configuration becomes the head's
architecture. Code elsewhere asks the table (``SPECS[kind].uses_farl``) instead of comparing
kind names.

The condition layout is the original's: ``normalize(ArcFace)`` (512) for IdGen;
``[FaRL (E, not normalised) | normalize(ArcFace) (512)]`` for ExpGen and IdRank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import nn

from ..config import ExpGenTrainConfig, IdGenTrainConfig, IdRankTrainConfig
from ..errors import ConfigError
from .expgen import ExpGen
from .idgen import IdGen
from .idrank import IdRank

__all__ = ["ModelSpec", "SPECS", "KINDS", "get_spec", "ARCFACE_DIM"]

#: Width of the ArcFace embedding in every condition.
ARCFACE_DIM = 512


def _schedule(cfg: Any) -> dict[str, Any]:
    d = cfg.diffusion
    if d.schedule == "cosine":
        return {"kind": "cosine", "num_steps": d.num_steps, "s": d.cosine_s, "max_beta": d.max_beta}
    return {"kind": "linear", "num_steps": d.num_steps, "beta_1": d.beta_1, "beta_T": d.beta_T}


def _normalize(cfg: Any) -> Optional[dict[str, list[float]]]:
    d = cfg.diffusion
    if not d.normalize:
        return None
    if d.target_mean is None or d.target_std is None:
        raise ConfigError("config key 'diffusion.normalize' is true but 'diffusion.target_mean' / "
                          "'target_std' are empty: the training scripts fill them from the training "
                          "set (ofer.train.build.fill_target_stats)")
    return {"mean": list(d.target_mean), "std": list(d.target_std)}


def _diffusion_head(cfg: Any, param_dim: int, cond_dim: int) -> dict[str, Any]:
    return {"param_dim": param_dim, "cond_dim": cond_dim, "dims": list(cfg.denoiser.dims),
            "num_qkv": cfg.denoiser.num_qkv, "schedule": _schedule(cfg), "loss": cfg.diffusion.loss,
            "normalize": _normalize(cfg), "prediction": cfg.diffusion.prediction,
            "cond_scale": cfg.diffusion.cond_scale}


def _idgen_head(cfg: Any, cond_dim: int, num_vertices: Optional[int]) -> dict[str, Any]:
    return _diffusion_head(cfg, cfg.n_shape, cond_dim)


def _expgen_head(cfg: Any, cond_dim: int, num_vertices: Optional[int]) -> dict[str, Any]:
    return {**_diffusion_head(cfg, cfg.n_exp + 3, cond_dim), "jaw_scale": cfg.jaw_scale}


def _idrank_head(cfg: Any, cond_dim: int, num_vertices: Optional[int]) -> dict[str, Any]:
    if num_vertices is None:
        raise ValueError("the IdRank head config needs num_vertices")
    r = cfg.ranker
    return {"in_dim": 6 * int(num_vertices), "cond_dim": cond_dim, "hidden": list(r.hidden),
            "groups": r.groups, "temperature": r.temperature, "mean_scale": r.mean_scale}


@dataclass(frozen=True)
class ModelSpec:
    """One kind of model.

    Attributes:
        kind: ``"idgen"``, ``"expgen"`` or ``"idrank"``.
        head: the head class (``IdGen``, ``ExpGen``, ``IdRank``).
        uses_farl: the condition starts with a FaRL embedding (else ArcFace only).
        data_mode: the :class:`~ofer.data.datasets.FaceDataset` mode that trains it.
        train_schema: the training configuration dataclass.
        generative: a diffusion head (samples) rather than a ranker (scores).
        head_config_fn: ``(training cfg, cond_dim, num_vertices) -> head config dict``.
    """

    kind: str
    head: type[nn.Module]
    uses_farl: bool
    data_mode: str
    train_schema: type
    generative: bool
    head_config_fn: Callable[[Any, int, Optional[int]], dict[str, Any]]

    def cond_dim(self, farl_dim: int = 512) -> int:
        """Width of the condition for a FaRL embedding of ``farl_dim``."""
        return ARCFACE_DIM + (int(farl_dim) if self.uses_farl else 0)

    def head_config(self, cfg: Any, num_vertices: Optional[int] = None) -> dict[str, Any]:
        """The head's ``from_config`` dict for a training configuration of this kind."""
        farl = getattr(cfg, "farl", None)
        return self.head_config_fn(cfg, self.cond_dim(farl.embed_dim if farl is not None else 0), num_vertices)


SPECS: dict[str, ModelSpec] = {
    "idgen": ModelSpec("idgen", IdGen, uses_farl=False, data_mode="identity",
                       train_schema=IdGenTrainConfig, generative=True, head_config_fn=_idgen_head),
    "expgen": ModelSpec("expgen", ExpGen, uses_farl=True, data_mode="expression",
                        train_schema=ExpGenTrainConfig, generative=True, head_config_fn=_expgen_head),
    "idrank": ModelSpec("idrank", IdRank, uses_farl=True, data_mode="identity",
                        train_schema=IdRankTrainConfig, generative=False, head_config_fn=_idrank_head),
}
KINDS = tuple(SPECS)


def get_spec(kind: Any, error: type[Exception] = ConfigError) -> ModelSpec:
    """The entry of ``kind``; ``error`` (one line) for anything else."""
    if kind not in SPECS:
        raise error(f"unknown model kind {kind!r}; expected one of {list(KINDS)}")
    return SPECS[kind]
