"""Images -> ranked identity + expression hypotheses: :class:`Reconstructor`.

For a batch of aligned faces: the encoders (each distinct encoder once) -> IdGen draws N
identity (shape) hypotheses -> FLAME -> IdRank scores them -> the best identity -> ExpGen draws
M expressions (expression coefficients + jaw) -> FLAME on that identity -> the per-vertex
spread of the hypotheses (:mod:`ofer.uncertainty`) and a few expressions chosen far apart. All N (or M)
hypotheses of all images of a batch go through one batched sampling loop. Hypothesis k of an
image depends only on (seed, the image's index, k), never on the batch size or order.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..config import resolve_path
from ..device import resolve_device
from ..errors import AssetError, CheckpointError, ConfigError
from ..flame import FLAME
from ..models.conditioned import ConditionedModel
from ..models.loading import load_model
from ..uncertainty import load_regions, select_far_apart, summarize, vertex_spread
from .config import SampleConfig

__all__ = ["Reconstructor", "ImageResult", "STAGES", "image_seed_index"]

STAGES = ("prepare", "encoders", "idgen", "flame", "idrank", "expgen", "writing")


def image_seed_index(relpath: str) -> int:
    """Stable per-image index for the noise streams: a hash of the image's relative path."""
    # surrogateescape: a file name that is not valid UTF-8 still has a stable index
    digest = hashlib.sha1(relpath.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _same_weights(a: nn.Module | None, b: nn.Module | None) -> bool:
    if a is None or b is None or type(a) is not type(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


@dataclass
class ImageResult:
    """Everything sampled for one image (tensors on the CPU, FLAME units: metres)."""

    shape_coeffs: torch.Tensor  # (N, n_shape)
    scores: torch.Tensor  # (N,)
    ranked_index: int
    identity_vertices: torch.Tensor  # (V, 3) the ranked identity, neutral
    worst_vertices: torch.Tensor  # (V, 3) the lowest-scored identity
    landmarks68: torch.Tensor  # (68, 3)
    landmarks7: torch.Tensor  # (7, 3)
    exp_coeffs: torch.Tensor  # (M, n_exp)
    jaw_pose: torch.Tensor  # (M, 3) after the jaw scale
    expression_vertices: torch.Tensor  # (S, V, 3) the first S expressions
    #: per-vertex spread (mm) of all N identities, of the top_k best-ranked ones, and of the M
    #: expressions on the ranked identity (:func:`ofer.uncertainty.vertex_spread`), each (V,)
    identity_spread: torch.Tensor | None = None
    topk_spread: torch.Tensor | None = None
    expression_spread: torch.Tensor | None = None
    top_k: int = 0
    chosen_index: list[int] | None = None  # expressions chosen far apart (indices into M)
    chosen_vertices: torch.Tensor | None = None  # (C, V, 3) their meshes
    expression_mean: torch.Tensor | None = None  # (V, 3) the mean of the M expression meshes
    #: JSON-ready summary of the three spreads (mean, p95, max, per region), mm
    uncertainty: dict | None = None
    #: a group's identity (``group.select=top_mean``): the mean shape coefficients (n_shape,) of
    #: the hypotheses ``ranked_top`` (best first; ``ranked_index`` is the first); None: the
    #: identity is ``shape_coeffs[ranked_index]``
    identity_shape: torch.Tensor | None = None
    ranked_top: list[int] | None = None


class Reconstructor:
    """IdGen + IdRank + ExpGen + FLAME, batched over images and hypotheses.

    Args:
        idgen, idrank, expgen: :class:`~ofer.models.ConditionedModel` s.
        flame_id: FLAME layer for identities (``n_exp`` any).
        flame_exp: FLAME layer with ExpGen's ``n_exp`` expression coefficients.
        cfg: the sampling settings.
        regions: vertex regions of the uncertainty summary (:func:`ofer.uncertainty.load_regions`).
    """

    #: expression meshes decoded per FLAME call (bounds the memory of the M hypotheses)
    FLAME_CHUNK = 512

    def __init__(self, idgen: ConditionedModel, idrank: ConditionedModel, expgen: ConditionedModel,
                 flame_id: nn.Module, flame_exp: nn.Module, cfg: SampleConfig, device: torch.device,
                 regions: dict | None = None) -> None:
        self.regions = regions
        self.idgen, self.idrank, self.expgen = idgen, idrank, expgen
        self.models = {"idgen": idgen, "idrank": idrank, "expgen": expgen}
        self.flame_id, self.flame_exp = flame_id, flame_exp
        self.cfg, self.device = cfg, device
        if cfg.jaw_scale is not None:
            expgen.head.jaw_scale = float(cfg.jaw_scale)
        # encoders that hold the same weights are evaluated once per batch
        self._arc_alias = self._aliases({k: m.arcface for k, m in self.models.items()})
        self._farl_alias = self._aliases({k: m.farl for k, m in self.models.items() if m.farl is not None})
        for which, model in (("idgen", idgen), ("expgen", expgen)):
            method, steps = cfg.sampler(which)
            T = model.head.var_sched.num_steps
            if method == "legacy_ddim" and steps is not None:
                raise ConfigError(f"config key '{which}_steps' must be null for legacy_ddim (fixed stride 4)")
            if method == "ddpm" and steps not in (None, T):
                raise ConfigError(f"config key '{which}_steps' must be null or {T} for ddpm "
                                  f"(use ddim or dpmpp_2m for fewer steps), got {steps}")
        if flame_id.num_vertices != flame_exp.num_vertices:
            raise AssetError("the identity and expression FLAME layers have different vertex counts")

    def model_lines(self) -> list[str]:
        """One line per model: its file and format, and for an official denoiser where its
        q/k/v projections came from (the import report)."""
        lines = []
        for kind, model in self.models.items():
            info = getattr(model, "load_info", None)
            if info is None:
                continue
            line = f"{kind}: {info.format} checkpoint {info.path}"
            rep = info.import_report
            if rep is not None and rep.qkv_source:
                line += f"; q/k/v projections: {rep.qkv_source}"
            lines.append(line)
        return lines

    @staticmethod
    def _aliases(mods: dict[str, nn.Module | None]) -> dict[str, str]:
        names = list(mods)
        alias = {}
        for i, n in enumerate(names):
            alias[n] = next((m for m in names[:i] if alias.get(m) == m and _same_weights(mods[m], mods[n])), n)
        return alias

    @classmethod
    def from_config(cls, cfg: SampleConfig, device: torch.device | None = None) -> "Reconstructor":
        device = device or resolve_device(cfg.device)
        root = cfg.data_root
        ck = cfg.checkpoints
        vidx = resolve_path(root, ck.ranker_vertex_indices)
        models = {}
        for kind in ("idgen", "expgen", "idrank"):
            try:
                models[kind] = load_model(resolve_path(root, getattr(ck, kind)), kind, vertex_indices=vidx,
                                          qkv=cfg.qkv, qkv_default=cfg.official_qkv)
            except CheckpointError as exc:
                key = "qkv" if getattr(exc, "qkv_choice", False) else f"checkpoints.{kind}"
                raise CheckpointError(f"config key '{key}': {exc}") from exc
            except AssetError as exc:
                raise AssetError(f"config key 'checkpoints.ranker_vertex_indices': {exc}") from exc
        idgen, expgen, idrank = models["idgen"], models["expgen"], models["idrank"]
        model_path = resolve_path(root, cfg.flame.model_path)
        lmk_path = resolve_path(root, cfg.flame.landmark_embedding_path)
        n_shape = idgen.head.param_dim
        flame_id = FLAME(model_path, lmk_path, n_shape=n_shape, n_exp=0)
        flame_exp = FLAME(model_path, None, n_shape=n_shape, n_exp=expgen.head.n_exp)
        if cfg.batch1_quirk:
            idrank.arcface.skip_bn1d_for_batch1 = True
        masks = resolve_path(root, cfg.uncertainty.masks_path)
        regions = None
        if masks is not None and masks.is_file():
            try:
                regions = load_regions(masks, flame_id.num_vertices)
            except AssetError as exc:
                raise AssetError(f"config key 'uncertainty.masks_path': {exc}") from exc
        mods = [m.to(device).eval() for m in (idgen, idrank, expgen, flame_id, flame_exp)]
        return cls(*mods[:3], *mods[3:], cfg=cfg, device=device, regions=regions)

    # ------------------------------------------------------------------------------
    def encode(self, arcface_x: torch.Tensor, farl_rgb: torch.Tensor, timer: dict) -> dict[str, torch.Tensor]:
        """Condition vectors of the three models; an encoder shared by several runs once."""
        t0 = time.perf_counter()
        arc: dict[str, torch.Tensor] = {}
        far: dict[str, torch.Tensor] = {}
        conds = {}
        for name, model in self.models.items():
            # the released ranker encoded each image alone (BatchNorm1d skipped at B = 1)
            alone = name == "idrank" and self.cfg.batch1_quirk
            key = self._arc_alias[name]
            if alone or key not in arc:
                emb = model.encode_arcface(arcface_x, one_at_a_time=alone)
                if alone:
                    key = name + "/alone"
                arc[key] = emb
            farl = None
            if model.farl is not None:
                fkey = self._farl_alias[name]
                if fkey not in far:
                    far[fkey] = model.encode_farl(farl_rgb)
                farl = far[fkey]
            conds[name] = model.assemble(arc[key], farl)
        timer["encoders"] += time.perf_counter() - t0
        return conds

    def expression_vertices(self, shape_coeffs: torch.Tensor, exp_coeffs: torch.Tensor,
                            jaw_pose: torch.Tensor) -> torch.Tensor:
        """FLAME meshes ``(R, V, 3)`` (metres) of ``R`` expression rows, decoded in chunks of
        :attr:`FLAME_CHUNK`; ``shape_coeffs`` is ``(R, n_shape)``, or ``(n_shape,)`` for one identity."""
        dev = self.device
        ex, jw, sh = exp_coeffs.to(dev), jaw_pose.to(dev), shape_coeffs.to(dev)
        if sh.ndim == 1:
            sh = sh[None].expand(ex.shape[0], -1)
        rows = torch.arange(ex.shape[0], device=dev)
        return torch.cat([self.flame_exp(shape_coeffs=sh[c], exp_coeffs=ex[c], jaw_pose=jw[c]).vertices
                          for c in rows.split(self.FLAME_CHUNK)])

    @torch.inference_mode()
    def reconstruct(self, arcface_x: torch.Tensor, farl_rgb: torch.Tensor, image_indices: list[int],
                    timer: dict | None = None, *, noise: dict | None = None,
                    return_intermediates: bool = False) -> list[ImageResult] | tuple[list[ImageResult], dict]:
        """Reconstruct a batch.

        Args:
            arcface_x: (B, 3, 112, 112) ArcFace inputs in [-1, 1].
            farl_rgb: (B, 3, 224, 224) face crops, RGB uint8 or float in [0, 1] (each
                model prepares them for its FaRL).
            image_indices: (B,) stable per-image indices (see :func:`image_seed_index`).
            timer: optional dict of per-stage seconds, accumulated.
            noise: the sampling noise to use instead of the seeded streams, per generator:
                ``{"idgen": {...}, "expgen": {...}}`` (either may be left out), each with
                ``x_T`` ((B, n, D) or (B * n, D), in the head's sampling space) and/or
                ``noise`` (per-step noise, ``(K, B * n, D)`` or a callable ``k -> (B * n, D)``),
                as :meth:`ofer.models.diffusion.ConditionalDiffusion.sample` takes them. With
                both given a run is replayed exactly.
            return_intermediates: also return a dict of CPU tensors: ``conditions`` (per
                model, (B, C)), ``shapes`` (B, N, n_shape) all candidates, ``scores`` (B, N),
                ``ranked`` (B,), ``expgen_samples`` (B, M, D) ExpGen's raw samples (before the
                split and the jaw scale).

        Returns:
            the :class:`ImageResult` of each image; with ``return_intermediates``,
            ``(results, intermediates)``.
        """
        noise = dict(noise or {})
        unknown = set(noise) - {"idgen", "expgen"}
        if unknown:
            raise ValueError(f"noise is given per generator ('idgen', 'expgen'), got {sorted(unknown)}")
        for key, given in noise.items():
            extra = set(given) - {"x_T", "noise"}
            if extra:
                raise ValueError(f"noise[{key!r}] takes 'x_T' and 'noise', got {sorted(extra)}")
        cfg = self.cfg
        timer = timer if timer is not None else {s: 0.0 for s in STAGES}
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        arcface_x, farl_rgb = arcface_x.to(self.device), farl_rgb.to(self.device)
        B, N, M = arcface_x.shape[0], cfg.n_identities, cfg.n_expressions
        conds = self.encode(arcface_x, farl_rgb, timer)

        t0 = time.perf_counter()
        method, steps = cfg.sampler("idgen")
        shapes = self.idgen.head.sample(conds["idgen"], N, method=method, steps=steps, seed=cfg.seed,
                                        image_indices=image_indices, **noise.get("idgen", {}))  # (B, N, n_shape)
        sync()
        timer["idgen"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        out = self.flame_id(shape_coeffs=shapes.reshape(B * N, -1))
        verts = out.vertices.reshape(B, N, -1, 3)
        sync()
        timer["flame"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        rank = self.idrank.head
        scores = rank(rank.features(verts), conds["idrank"])  # (B, N)
        best = rank.select(scores)
        worst = scores.argmin(dim=1)
        sync()
        timer["idrank"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        method, steps = cfg.sampler("expgen")
        x = self.expgen.head.sample(conds["expgen"], M, method=method, steps=steps, seed=cfg.seed + 1,
                                    image_indices=image_indices, **noise.get("expgen", {}))  # (B, M, n_exp + 3)
        exp_coeffs, jaw = self.expgen.head.split(x)
        sync()
        timer["expgen"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        b_idx = torch.arange(B, device=self.device)
        best_shape = shapes[b_idx, best]  # (B, n_shape)
        # all M expressions of every image, (B, M, V, 3)
        exp_verts = self.expression_vertices(best_shape.repeat_interleave(M, dim=0), exp_coeffs.reshape(B * M, -1),
                                             jaw.reshape(B * M, 3)).reshape(B, M, -1, 3)
        sync()
        timer["flame"] += time.perf_counter() - t0

        # the spread of the hypotheses, in mm
        k = min(cfg.uncertainty.top_k, N)
        top = scores.topk(k, dim=1).indices  # (B, k)
        id_spread = vertex_spread(verts.float()) * 1000.0  # (B, V)
        top_spread = vertex_spread(verts[b_idx[:, None], top].float()) * 1000.0
        exp_spread = vertex_spread(exp_verts.float()) * 1000.0
        S = cfg.save_expressions

        results = []
        for i in range(B):
            chosen = select_far_apart(exp_verts[i], cfg.chosen_expressions)
            spreads = {"identity": id_spread[i].cpu(), "identity_top_k": top_spread[i].cpu(),
                       "expression": exp_spread[i].cpu()}
            summary = {"units": "mm", "top_k": k, "n_identities": N, "n_expressions": M}
            summary.update({name: summarize(v.numpy(), self.regions) for name, v in spreads.items()})
            results.append(ImageResult(
                shape_coeffs=shapes[i].cpu(), scores=scores[i].float().cpu(), ranked_index=int(best[i]),
                identity_vertices=verts[i, best[i]].cpu(), worst_vertices=verts[i, worst[i]].cpu(),
                landmarks68=out.landmarks68.reshape(B, N, 68, 3)[i, best[i]].cpu(),
                landmarks7=out.landmarks7.reshape(B, N, 7, 3)[i, best[i]].cpu(),
                exp_coeffs=exp_coeffs[i].cpu(), jaw_pose=jaw[i].cpu(),
                expression_vertices=exp_verts[i, :S].cpu(),
                identity_spread=spreads["identity"], topk_spread=spreads["identity_top_k"],
                expression_spread=spreads["expression"], top_k=k, chosen_index=chosen,
                chosen_vertices=exp_verts[i, chosen].cpu(), expression_mean=exp_verts[i].mean(0).cpu(),
                uncertainty=summary,
            ))
        if not return_intermediates:
            return results
        intermediates = {
            "conditions": {name: c.detach().float().cpu() for name, c in conds.items()},
            "shapes": shapes.detach().cpu(), "scores": scores.detach().float().cpu(), "ranked": best.detach().cpu(),
            "expgen_samples": x.detach().cpu(),
        }
        return results, intermediates
