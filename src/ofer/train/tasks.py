"""The three training tasks: IdGen, ExpGen and IdRank on top of :mod:`ofer.train.loop`.

Each trained module is a :class:`~ofer.models.ConditionedModel` (image encoders + one head) so that a
checkpoint's ``"model"``/``"ema"`` state_dict holds everything inference needs:

* IdGen:  ``arcface.*`` (IResNet) + ``head.*`` (``ofer.models.IdGen``); cond = normalize(ArcFace).
* ExpGen: ``farl.*`` + ``arcface.*`` + ``head.*`` (``ExpGen``); cond = [FaRL | normalize(ArcFace)].
* IdRank: ``farl.*`` + ``arcface.*`` + ``head.*`` (``IdRank``); scores N frozen-IdGen samples.

The EMA covers ``head.`` (the denoiser / ranker). The heads are ``ofer.models.IdGen`` /
``ExpGen`` (``training_loss(x0, cond, generator) -> (loss, {"loss": (B,), "t": (B,)})``,
``sample(cond, n, method=, steps=, generator=) -> (B,n,D)``) and ``ofer.models.IdRank``
(``features(vertices)``, ``forward(features, cond)``, ``training_loss(scores, vertices,
gt_vertices)``, ``vertex_indices``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..io import write_mesh
from ..models.conditioned import ConditionedModel
from ..nets.rank_mlp import listnet_loss
from .loop import TrainTask, flatten_views

__all__ = [
    "IdGenTask",
    "ExpGenTask",
    "IdRankTask",
    "vertex_error_mm",
]

log = logging.getLogger("ofer.train")

# (shape_coeffs, exp_coeffs=None, jaw_pose=None) -> (B,V,3) m; coefficients past those given are
# zero, as in ofer.flame.FLAME (ofer.train.build.build_flame)
VertexFn = Callable[..., torch.Tensor]


def _cond(model: ConditionedModel, b: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.condition_of_batch(b)


def vertex_error_mm(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Mean per-vertex Euclidean distance in mm: (...,V,3) metres -> (...)."""
    return (pred - gt).norm(dim=-1).mean(-1) * 1000.0


def _val_batches(dataset: Any, max_items: int, chunk: int = 8):
    n = min(len(dataset), max_items)
    for s in range(0, n, chunk):
        items = [dataset[i] for i in range(s, min(n, s + chunk))]
        yield flatten_views(torch.utils.data.default_collate(items))


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _groups(model: ConditionedModel, head_lr: float, arcface_lr: float,
            farl_lr: Optional[float], head_name: str) -> list[dict[str, Any]]:
    groups = []
    if model.farl is not None and farl_lr is not None:
        groups.append({"name": "farl", "params": list(model.farl.parameters()), "lr": farl_lr})
    groups.append({"name": "arcface", "params": list(model.arcface.parameters()), "lr": arcface_lr})
    groups.append({"name": head_name, "params": list(model.head.parameters()), "lr": head_lr})
    return groups


class _GenTask(TrainTask):
    ema_prefixes = ["head."]
    metric_name = "val/mean_sample_mm"

    def __init__(self, cfg: Any, model: ConditionedModel, vertices: Optional[VertexFn] = None,
                 faces: Optional[np.ndarray] = None) -> None:
        self.cfg = cfg
        self.model = model
        self.vertices = vertices
        self.faces = faces
        self.num_steps = cfg.diffusion.num_steps

    def param_groups(self) -> list[dict[str, Any]]:
        farl_lr = self.cfg.farl.lr if hasattr(self.cfg, "farl") else None
        return _groups(self.model, self.cfg.diffusion.lr, self.cfg.arcface.lr, farl_lr, "diffusion")

    def target(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model, batch, generator):
        b = flatten_views(batch)
        cond = _cond(model, b)
        x0 = self.target(b).float()
        with torch.autocast(device_type=x0.device.type, enabled=False):
            return model.head.training_loss(x0, cond.float(), generator=generator,
                                            noise_samples=self.cfg.diffusion.noise_samples)

    def _sample(self, model, b, generator, n=None):
        cond = _cond(model, b)
        v = self.cfg.val
        return model.head.sample(cond.float(), n or v.num_samples, method=v.method, steps=v.steps,
                                 generator=generator).float()


class IdGenTask(_GenTask):
    """x0 = the first ``n_shape`` shape coefficients; cond = normalize(ArcFace).

    Validation (mean per-vertex Euclidean error over all FLAME vertices, mm):
    ``mean_sample_mm`` (mean of the N samples), ``sample_mm`` (average sample),
    ``best_of_n_mm`` (best of the N, an oracle), ``mean_shape_mm`` (the FLAME mean shape: the
    baseline to beat) and, with a ``ranker``, ``ranked_mm``: the error of the sample the
    IdRank scores highest, i.e. the identity the pipeline would output.

    The metric that selects ``best.pt`` is ``val/ranked_mm`` with a ranker, else
    ``val/mean_sample_mm``.

    Args:
        cfg: ``IdGenTrainConfig``.
        model: ConditionedModel(IdGen, ArcFace).
        vertices, faces: FLAME vertices function (metres) and faces (validation, meshes).
        ranker: optional IdRank ConditionedModel (``ofer.train.build.load_val_ranker``), frozen;
            the validation batches must then hold FaRL crops (``farl``) when it has a FaRL.
    """

    kind = "idgen"

    def __init__(self, cfg: Any, model: ConditionedModel, vertices: Optional[VertexFn] = None,
                 faces: Optional[np.ndarray] = None, ranker: Optional[ConditionedModel] = None) -> None:
        super().__init__(cfg, model, vertices, faces)
        self.ranker = ranker.requires_grad_(False).eval() if ranker is not None else None
        self.metric_name = "val/ranked_mm" if ranker is not None else "val/mean_sample_mm"
        self._told_no_ranker = False

    def target(self, b):
        return b["shape_coeffs"][:, : self.cfg.n_shape]

    def _verts(self, shape):
        return self.vertices(shape_coeffs=shape)  # FLAME zero-fills the coefficients past n_shape

    def rank_scores(self, b: dict[str, torch.Tensor], verts: torch.Tensor) -> torch.Tensor:
        """Ranker scores of N sample meshes; higher = better (``IdRank.select`` is argmax).

        Args:
            b: validation batch (views flattened): ``arcface`` (B,3,112,112) and, for a ranker
                with FaRL, ``farl`` (B,3,S,S) float32.
            verts: (B,N,V,3) float32 sample vertices in metres.

        Returns:
            (B,N) float32 scores.
        """
        r = self.ranker
        if r is None:
            raise RuntimeError("IdGenTask.rank_scores needs a ranker")
        farl_x = None
        if r.farl is not None:
            if "farl" not in b:
                raise ConfigError("config key 'val.idrank_checkpoint': the validation batches hold no "
                                  "FaRL crops ('farl'); build the held-out set with "
                                  "build_datasets(..., val_farl=True)")
            farl_x = b["farl"].float()
        r.to(verts.device).eval()
        with torch.no_grad(), torch.autocast(device_type=verts.device.type, enabled=False):
            cond = r.condition(b["arcface"].float(), farl_x)
            return r.head(r.head.features(verts.float()), cond).float()

    def validate(self, model, dataset, generator):
        if self.vertices is None:
            return {}
        if self.ranker is None and not self._told_no_ranker:
            self._told_no_ranker = True
            log.info("IdGen validation: the ranked-identity error (val/ranked_mm) needs an IdRank "
                     "checkpoint in 'val.idrank_checkpoint'; reporting the sample errors only")
        errs = {"val/mean_sample_mm": [], "val/sample_mm": [], "val/best_of_n_mm": [],
                "val/mean_shape_mm": [], "val/ranked_mm": []}
        dev = _device_of(model)
        for b in _val_batches(dataset, self.cfg.val.max_items):
            b = {k: v.to(dev) for k, v in b.items()}
            s = self._sample(model, b, generator)  # (B,n,D)
            B, n, D = s.shape
            gt = self._verts(self.target(b).float())
            vs = self._verts(s.reshape(B * n, D)).view(B, n, -1, 3)
            vm = self._verts(s.mean(1))
            e = vertex_error_mm(vs, gt[:, None])  # (B,n)
            # baseline: the FLAME mean shape (all coefficients zero)
            errs["val/mean_shape_mm"].append(vertex_error_mm(self._verts(torch.zeros_like(s[:, 0])), gt))
            errs["val/mean_sample_mm"].append(vertex_error_mm(vm, gt))
            errs["val/sample_mm"].append(e.mean(1))
            errs["val/best_of_n_mm"].append(e.min(1).values)
            if self.ranker is not None:
                pick = self.rank_scores(b, vs).argmax(1)  # (B,) the top-scored sample
                errs["val/ranked_mm"].append(e.gather(1, pick[:, None])[:, 0])
        return {k: float(torch.cat(v).mean()) for k, v in errs.items() if v}

    def write_samples(self, model, dataset, out_dir, generator):
        if self.vertices is None:
            return
        dev = _device_of(model)
        b = next(_val_batches(dataset, 1, 1))
        b = {k: v[:1].to(dev) for k, v in b.items()}
        s = self._sample(model, b, generator, n=4)[0]
        out_dir = Path(out_dir)
        for i, v in enumerate(self._verts(s)):
            write_mesh(out_dir / f"sample{i}.ply", v, self.faces, binary=False)
        write_mesh(out_dir / "gt.ply", self._verts(self.target(b).float())[0], self.faces, binary=False)


class ExpGenTask(_GenTask):
    """x0 = [exp_coeffs[:n_exp] | jaw_pose] (n_exp + 3, the raw jaw as in the original);
    cond = [FaRL | normalize(ArcFace)]. ``jaw_scale`` only affects sampling for users
    (``ExpGen.split``); validation compares raw samples with the ground truth, on the true
    identity: ``mean_sample_mm`` (mean of the N), ``sample_mm`` (average sample) and
    ``zero_expression_mm`` (the neutral face: the baseline to beat)."""

    kind = "expgen"

    def target(self, b):
        return torch.cat([b["exp_coeffs"][:, : self.cfg.n_exp], b["jaw_pose"]], -1)

    def _verts(self, shape, x):
        # FLAME zero-fills the shape and expression coefficients past those given
        n = self.cfg.n_exp
        return self.vertices(shape_coeffs=shape, exp_coeffs=x[:, :n], jaw_pose=x[:, n:])

    def validate(self, model, dataset, generator):
        if self.vertices is None:
            return {}
        errs = {"val/mean_sample_mm": [], "val/sample_mm": [], "val/zero_expression_mm": []}
        dev = _device_of(model)
        for b in _val_batches(dataset, self.cfg.val.max_items):
            b = {k: v.to(dev) for k, v in b.items()}
            s = self._sample(model, b, generator)
            B, n, D = s.shape
            shape = b["shape_coeffs"].float()
            gt = self._verts(shape, self.target(b).float())
            # baseline: the neutral face (expression and jaw zero) of the true identity
            errs["val/zero_expression_mm"].append(vertex_error_mm(self._verts(shape, torch.zeros_like(s[:, 0])), gt))
            vs = self._verts(shape.repeat_interleave(n, 0), s.reshape(B * n, D)).view(B, n, -1, 3)
            errs["val/mean_sample_mm"].append(vertex_error_mm(self._verts(shape, s.mean(1)), gt))
            errs["val/sample_mm"].append(vertex_error_mm(vs, gt[:, None]).mean(1))
        return {k: float(torch.cat(v).mean()) for k, v in errs.items() if v}

    def write_samples(self, model, dataset, out_dir, generator):
        if self.vertices is None:
            return
        dev = _device_of(model)
        b = next(_val_batches(dataset, 1, 1))
        b = {k: v[:1].to(dev) for k, v in b.items()}
        s = self._sample(model, b, generator, n=4)[0]
        shape = b["shape_coeffs"][:1].float().expand(len(s), -1)
        for i, v in enumerate(self._verts(shape, s)):
            write_mesh(Path(out_dir) / f"sample{i}.ply", v, self.faces, binary=False)


class IdRankTask(TrainTask):
    """Learn to score N samples of a frozen IdGen (ListNet loss against their true errors).

    Args:
        cfg: ``IdRankTrainConfig``.
        model: ConditionedModel(IdRank, ArcFace, FaRL); the IdRank holds its feature
            vertices (``head.vertex_indices``).
        idgen: the frozen IdGen ConditionedModel (EMA weights), never trained here.
        vertices: FLAME vertices function (metres).

    Validation (``val/*``, Euclidean mean over the ranker's vertices, mm): ``chosen_mm``
    (top-scored hypothesis), ``sample_mm`` (average hypothesis), ``oracle_mm`` (best of N),
    ``mean_sample_mm`` (the mean shape of the N), ``top1`` (rate of picking the best).
    """

    kind = "idrank"
    ema_prefixes = ["head."]
    metric_name = "val/chosen_mm"

    def __init__(self, cfg: Any, model: ConditionedModel, idgen: ConditionedModel,
                 vertices: VertexFn) -> None:
        self.cfg = cfg
        self.model = model
        self.idgen = idgen.requires_grad_(False)
        self.vertices = vertices

    def param_groups(self):
        return _groups(self.model, self.cfg.ranker.lr, self.cfg.arcface.lr, self.cfg.farl.lr, "ranker")

    def _hypotheses(self, b, generator, method, steps):
        """(B,N,V,3) sample vertices and (B,V,3) ground truth, in metres (no grad)."""
        dev = b["arcface"].device
        self.idgen.to(dev).eval()
        with torch.no_grad(), torch.autocast(device_type=dev.type, enabled=False):
            cond = self.idgen.condition(b["arcface"].float())
            s = self.idgen.head.sample(cond, self.cfg.num_samples, method=method, steps=steps,
                                       generator=generator).float()
            B, n, D = s.shape
            # FLAME zero-fills the coefficients past the IdGen's D
            verts = self.vertices(shape_coeffs=s.reshape(B * n, D))
            gt = self.vertices(shape_coeffs=b["shape_coeffs"][:, :D].float())
        return verts.view(B, n, -1, 3), gt

    def loss(self, model, batch, generator):
        b = flatten_views(batch)
        verts, gt = self._hypotheses(b, generator, self.cfg.sample_method, self.cfg.sample_steps)
        cond = _cond(model, b)
        scores = model.head(model.head.features(verts), cond).float()
        loss, stats = model.head.training_loss(scores, verts, gt)
        per = listnet_loss(scores.detach(), stats["errors_mm"], model.head.temperature,
                           reduction="none")
        return loss, {"loss": per, "picked_error_mm": stats["picked_error_mm"]}

    def validate(self, model, dataset, generator):
        dev = _device_of(model)
        top1, chosen, mean_s, avg_s, oracle = [], [], [], [], []
        v = self.cfg.val
        idx = model.head.vertex_indices.to(dev)
        for b in _val_batches(dataset, v.max_items):
            b = {k: t.to(dev) for k, t in b.items()}
            verts, gt = self._hypotheses(b, generator, v.method, v.steps)
            scores = model.head(model.head.features(verts), _cond(model, b)).float()
            verts, gt = verts[:, :, idx], gt[:, idx]
            err = vertex_error_mm(verts, gt[:, None])  # (B,N)
            pick = model.head.select(scores)
            top1.append((pick == err.argmin(1)).float())
            chosen.append(err.gather(1, pick[:, None])[:, 0])
            mean_s.append(vertex_error_mm(verts.mean(1), gt))
            avg_s.append(err.mean(1))
            oracle.append(err.min(1).values)
        cat = lambda xs: float(torch.cat(xs).mean()) if xs else math.nan  # noqa: E731
        return {"val/top1": cat(top1), "val/chosen_mm": cat(chosen), "val/mean_sample_mm": cat(mean_s),
                "val/sample_mm": cat(avg_s), "val/oracle_mm": cat(oracle)}
