"""One identity for several images of one person: grouping and the group reconstruction.

A group's identity hypotheses are drawn from every image of the group (``n_identities`` per
image, or ``n_identities`` in total shared out over the images), each hypothesis is scored by
IdRank under every image's condition, and the chosen identity maximises the aggregate of the
per-image scores (:func:`aggregate_scores`). ExpGen then draws each image's expressions on
that one identity.

Aggregate rules (``group.aggregate``), for an ``(I, H)`` score matrix ``S``:

* ``log_softmax`` (default): ``sum_i log_softmax(S_i)``, the log-likelihood of the hypothesis
  being every image's best under the ranker's ListNet distribution; each image counts the same
  whatever the scale of its scores.
* ``score``: ``sum_i S_i``, the raw scores (an image with spread-out scores weighs more).
* ``borda``: ``sum_i rank_i`` of each hypothesis within each image (robust to one outlying image).

Selection (``group.select``): ``top_mean`` (the config's default) takes the mean shape
coefficients of the ``group.top_k`` highest aggregates, ``best`` the hypothesis of the highest
(:func:`select_identity`; :func:`reconstruct_group`'s own default is ``best``, the rule a single
image is ranked by).
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

import torch

from ..errors import ConfigError
from .config import SampleConfig

__all__ = ["GROUP_MODES", "AGGREGATES", "SELECTIONS", "group_key", "read_group_list", "group_names",
           "aggregate_scores", "select_identity", "split_counts", "GroupResult", "reconstruct_group"]

GROUP_MODES = ("none", "folder", "prefix", "list")
AGGREGATES = ("log_softmax", "score", "borda")
SELECTIONS = ("best", "top_mean")


def group_key(rel: str, mode: str, prefix_sep: str = "_", table: dict[str, str] | None = None) -> str:
    """The group of an image from its path relative to the input (POSIX, with or without suffix).

    ``folder``: its parent folder (``.`` for the top); ``prefix``: the file name up to the first
    ``prefix_sep`` (the whole stem when it has none), within its folder; ``list``: ``table``'s
    entry (an image not listed is a group of its own); ``none``: the image itself.
    """
    p = PurePosixPath(rel)
    if mode == "none":
        return rel
    if mode == "folder":
        return str(p.parent)
    if mode == "prefix":
        stem = p.name.split(".")[0] if "." in p.name else p.name
        head = stem.split(prefix_sep, 1)[0] if prefix_sep else stem
        return str(p.parent / head) if str(p.parent) != "." else head
    if mode == "list":
        if table is None:
            raise ConfigError("group.by=list needs group.list (a file of 'image,group' lines)")
        for key in (rel, str(p.with_suffix("")), p.name, p.stem):
            if key in table:
                return table[key]
        return rel
    raise ConfigError(f"config key 'group.by' must be one of {list(GROUP_MODES)}, got {mode!r}")


def read_group_list(path: str | Path) -> dict[str, str]:
    """``image,group`` lines (CSV; a tab or whitespace also separates; ``#`` starts a comment)
    -> ``{image: group}``. The image is its path relative to the input, with or without suffix,
    or its bare file name."""
    table: dict[str, str] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config key 'group.list': cannot read {path}: {exc.strerror or exc}") from exc
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = next(csv.reader([line])) if "," in line else line.split()
        parts = [x.strip() for x in parts if x.strip()]
        if len(parts) != 2:
            raise ConfigError(f"config key 'group.list': {path} line {n}: expected 'image,group', got {line!r}")
        table[parts[0]] = parts[1]
    return table


def group_names(rels: Sequence[str], mode: str, prefix_sep: str = "_",
                table: dict[str, str] | None = None) -> dict[str, list[int]]:
    """``{group: [indices into rels]}`` in first-seen order, each group's images in input order."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rels):
        groups.setdefault(group_key(r, mode, prefix_sep, table), []).append(i)
    return groups


def aggregate_scores(scores: torch.Tensor, rule: str = "log_softmax") -> torch.Tensor:
    """``(I, H)`` IdRank scores of H hypotheses under I images -> ``(H,)`` aggregate (higher is
    better); the rules are the module's."""
    s = scores.float()
    if rule == "log_softmax":
        return torch.log_softmax(s, dim=1).sum(0)
    if rule == "score":
        return s.sum(0)
    if rule == "borda":
        return s.argsort(dim=1).argsort(dim=1).float().sum(0)
    raise ConfigError(f"config key 'group.aggregate' must be one of {list(AGGREGATES)}, got {rule!r}")


def select_identity(shape_coeffs: torch.Tensor, aggregate: torch.Tensor, select: str = "best",
                    top_k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's identity from its ``(H, n_shape)`` hypotheses and their ``(H,)`` aggregate:
    ``(shape (n_shape,), chosen (k,) long)``, ``chosen`` the hypotheses it is the mean of, in
    decreasing aggregate (ties: the lower index first).

    ``best``: the one hypothesis of the highest aggregate (k = 1). ``top_mean``: the mean of
    the ``min(top_k, H)`` highest. The mean is a valid FLAME identity: the neutral mesh is
    affine in the shape coefficients (template plus shape basis times coefficients), so the
    mean coefficients give exactly the mean of the k meshes, a point of the basis' span; it
    is, however, not one of IdGen's samples (it is smoother than each of them).
    """
    if select not in SELECTIONS:
        raise ConfigError(f"config key 'group.select' must be one of {list(SELECTIONS)}, got {select!r}")
    if top_k < 1:
        raise ConfigError(f"config key 'group.top_k' must be >= 1, got {top_k}")
    k = 1 if select == "best" else min(int(top_k), int(aggregate.shape[0]))
    # a stable descending sort, so that ties keep the lower index first whatever the backend
    order = torch.sort(aggregate.float().cpu(), descending=True, stable=True).indices[:k]
    return shape_coeffs[order.to(shape_coeffs.device)].mean(0), order


def split_counts(n: int, n_images: int, per_image: bool) -> list[int]:
    """Hypotheses drawn from each image: ``n`` each, or ``n`` in total (the first images one
    more when it does not divide; every image at least one)."""
    if per_image:
        return [n] * n_images
    base, extra = divmod(max(n, n_images), n_images)
    return [base + (i < extra) for i in range(n_images)]


@dataclass
class GroupResult:
    """One group: its pooled identity hypotheses, their scores under every image, the chosen
    identity and each image's expressions on it (tensors on the CPU, metres).

    ``chosen`` holds the hypotheses the identity is the mean of (:func:`select_identity`):
    one under ``select="best"``, whose row of ``shape_coeffs`` is then ``identity_shape``.
    """

    shape_coeffs: torch.Tensor  # (H, n_shape) every image's hypotheses, image by image
    source_image: torch.Tensor  # (H,) which image (row of the batch) drew each hypothesis
    scores: torch.Tensor  # (I, H) IdRank scores of every hypothesis under each identity image
    aggregate: torch.Tensor  # (H,)
    chosen: torch.Tensor  # (k,) long: the hypotheses averaged into the identity, best first
    identity_shape: torch.Tensor  # (n_shape,) the shared identity's shape coefficients
    per_image_best: torch.Tensor  # (I,) each identity image's best among its own hypotheses (into H)
    identity_vertices: torch.Tensor  # (V, 3) neutral
    exp_coeffs: torch.Tensor  # (I, M, n_exp)
    jaw_pose: torch.Tensor  # (I, M, 3)
    expression_vertices: torch.Tensor | None  # (I, M, V, 3) when asked for
    expression_mean: torch.Tensor  # (I, V, 3) mean of each image's M expression meshes
    hypothesis_vertices: torch.Tensor | None = None  # (H, V, 3) when asked for


@torch.inference_mode()
def reconstruct_group(rec, arcface_x: torch.Tensor, farl_rgb: torch.Tensor, image_indices: list[int],
                      *, per_image: bool = True, rule: str = "log_softmax", select: str = "best",
                      top_k: int = 10, expressions: bool = True,
                      keep_expression_vertices: bool = True, keep_hypotheses: bool = False,
                      identity_rows: Sequence[int] | None = None, timer: dict | None = None,
                      conds: dict[str, torch.Tensor] | None = None) -> GroupResult:
    """Reconstruct I images of one person with one identity (``rec``: a
    :class:`~ofer.sample.reconstructor.Reconstructor`).

    ``identity_rows``: the images the identity stage uses (all by default; a clip passes a
    sub-sample of its frames); every image gets its expressions. Hypothesis ``k`` of image
    ``i`` depends on ``(seed, image_indices[i], k)`` only, as for single images. ``conds``:
    the three models' conditions of the images, when already encoded. ``rule``, ``select``,
    ``top_k``: the aggregate and the selection (the module's).
    """
    cfg: SampleConfig = rec.cfg
    timer = timer if timer is not None else {}
    for k in ("encoders", "idgen", "flame", "idrank", "expgen"):
        timer.setdefault(k, 0.0)
    dev = rec.device
    arcface_x, farl_rgb = arcface_x.to(dev), farl_rgb.to(dev)
    B = arcface_x.shape[0]
    rows = list(range(B)) if identity_rows is None else list(identity_rows)
    if not rows:
        raise ConfigError("a group needs at least one image for its identity")
    if conds is None:
        conds = rec.encode(arcface_x, farl_rgb, timer)
    conds = {k: v.to(dev) for k, v in conds.items()}

    t0 = time.perf_counter()
    counts = split_counts(cfg.n_identities, len(rows), per_image)
    method, steps = cfg.sampler("idgen")
    n_max = max(counts)
    r = torch.as_tensor(rows, device=dev)
    drawn = rec.idgen.head.sample(conds["idgen"][r], n_max, method=method, steps=steps, seed=cfg.seed,
                                  image_indices=[image_indices[i] for i in rows])  # (I, n_max, S)
    shapes = torch.cat([drawn[i, :c] for i, c in enumerate(counts)])
    local = torch.cat([torch.full((c,), i, dtype=torch.long) for i, c in enumerate(counts)])
    source = torch.as_tensor(rows)[local]
    timer["idgen"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    verts = rec.flame_id(shape_coeffs=shapes).vertices  # (H, V, 3)
    timer["flame"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    rank = rec.idrank.head
    feats = rank.features(verts[None])  # (1, H, F): the features of the pooled set
    scores = rank(feats.expand(len(rows), -1, -1), conds["idrank"][r])  # (I, H)
    agg = aggregate_scores(scores, rule)
    ident, chosen = select_identity(shapes, agg, select, top_k)
    # the identity's mesh: the chosen hypothesis' or, for a mean, FLAME's of the mean coefficients
    ident_v = rec.flame_id(shape_coeffs=ident[None]).vertices[0] if len(chosen) > 1 else verts[int(chosen[0])]
    sc = scores.float().cpu()
    own = torch.stack([torch.nonzero(local == i)[0, 0] + sc[i, local == i].argmax() for i in range(len(rows))])
    timer["idrank"] += time.perf_counter() - t0

    n_exp = rec.expgen.head.n_exp
    exp_c = torch.zeros(B, 0, n_exp)
    jaw = torch.zeros(B, 0, 3)
    ev = None
    emean = ident_v.expand(B, -1, -1).cpu()
    if expressions:
        t0 = time.perf_counter()
        method, steps = cfg.sampler("expgen")
        M = cfg.n_expressions
        x = rec.expgen.head.sample(conds["expgen"], M, method=method, steps=steps, seed=cfg.seed + 1,
                                   image_indices=image_indices)
        exp_c, jaw = rec.expgen.head.split(x)  # (B, M, n_exp), (B, M, 3)
        timer["expgen"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        ev = rec.expression_vertices(ident, exp_c.reshape(B * M, -1), jaw.reshape(B * M, 3)
                                     ).reshape(B, M, -1, 3)
        emean = ev.mean(1).cpu()
        timer["flame"] += time.perf_counter() - t0
    return GroupResult(
        shape_coeffs=shapes.cpu(), source_image=source, scores=scores.float().cpu(), aggregate=agg.cpu(),
        chosen=chosen, identity_shape=ident.cpu(), per_image_best=own, identity_vertices=ident_v.cpu(),
        exp_coeffs=exp_c.cpu(), jaw_pose=jaw.cpu(), expression_vertices=ev.cpu() if (ev is not None and keep_expression_vertices) else None,
        expression_mean=emean, hypothesis_vertices=verts.cpu() if keep_hypotheses else None)

# ----------------------------------------------------------------------------------------
# Photo sets in a folder run
# ----------------------------------------------------------------------------------------
def image_result(rec, gr: GroupResult, i: int):
    """The :class:`~ofer.sample.reconstructor.ImageResult` of image ``i`` of a group (its
    ranked identity is the group's; its scores are those under its own condition), so that
    its folder is written as a single image's is. ``ranked_index`` is the group's best
    hypothesis; a mean of several (``top_mean``) comes as ``identity_shape`` and ``ranked_top``."""
    from ..uncertainty import select_far_apart, summarize, vertex_spread
    from .reconstructor import ImageResult

    cfg = rec.cfg
    hyp = gr.hypothesis_vertices
    scores = gr.scores[i]
    out = rec.flame_id(shape_coeffs=gr.identity_shape[None].to(rec.device))
    mean = len(gr.chosen) > 1
    k = min(cfg.uncertainty.top_k, hyp.shape[0])
    top = scores.topk(k).indices
    ev = gr.expression_vertices[i]
    spreads = {"identity": vertex_spread(hyp[None].float())[0] * 1000.0,
               "identity_top_k": vertex_spread(hyp[top][None].float())[0] * 1000.0,
               "expression": vertex_spread(ev[None].float())[0] * 1000.0}
    summary = {"units": "mm", "top_k": k, "n_identities": int(hyp.shape[0]), "n_expressions": int(ev.shape[0])}
    summary.update({n: summarize(v.numpy(), rec.regions) for n, v in spreads.items()})
    chosen = select_far_apart(ev, cfg.chosen_expressions)
    return ImageResult(
        shape_coeffs=gr.shape_coeffs, scores=scores, ranked_index=int(gr.chosen[0]),
        identity_vertices=gr.identity_vertices,
        worst_vertices=hyp[int(scores.argmin())], landmarks68=out.landmarks68[0].cpu(),
        landmarks7=out.landmarks7[0].cpu(), exp_coeffs=gr.exp_coeffs[i], jaw_pose=gr.jaw_pose[i],
        expression_vertices=ev[:cfg.save_expressions], identity_spread=spreads["identity"],
        topk_spread=spreads["identity_top_k"], expression_spread=spreads["expression"], top_k=k,
        chosen_index=chosen, chosen_vertices=ev[chosen], expression_mean=gr.expression_mean[i], uncertainty=summary,
        identity_shape=gr.identity_shape if mean else None, ranked_top=gr.chosen.tolist() if mean else None)


def group_folder(name: str) -> str:
    """The output folder of a group under ``groups/`` (the input's top folder is ``_top``)."""
    return "_top" if name in (".", "") else name


def run_groups(todo: list, rec, detector, cfg: SampleConfig, output: Path, faces, state, bar=None) -> None:
    """Reconstruct the folder run's images group by group (``group.by``).

    Per group ``<output>/groups/<group>/``: ``identity.<ext>`` (the shared identity, neutral,
    mm), ``identity.npz`` (every hypothesis, the ``(I, H)`` score matrix, the aggregate, the
    chosen indices (one, or the ``top_k`` averaged), the identity's coefficients, each image's
    own best) and ``group.json`` (written last). Each image gets its
    usual folder, its identity being the group's. A group whose ``group.json`` and images'
    ``result.json`` all exist is done before (unless ``overwrite``).
    """
    import numpy as np

    from ..io import write_json, write_mesh, write_npz
    from .reconstructor import image_seed_index
    from .runner import RESULT_FILE, error_line, finite_result, prepare, write_image_outputs

    g = cfg.group
    table = read_group_list(g.list) if g.by == "list" else None
    groups = group_names([j.name for j in todo], g.by, g.prefix_sep, table)
    for name, members in groups.items():
        jobs = [todo[i] for i in members]
        gdir = output / "groups" / group_folder(name)
        if not cfg.overwrite and (gdir / "group.json").is_file() and all(
                (output / j.rel / RESULT_FILE).is_file() for j in jobs):
            state.records += [{"image": j.name, "status": "done-before", "group": name} for j in jobs]
            if bar is not None:
                bar.update(len(jobs))
            continue
        ready = []
        for j in jobs:
            got = prepare(j, detector, cfg, state)
            if got:
                j.face = got[0].face
                ready.append(j)
        if bar is not None:
            bar.update(len(jobs))
        if not ready:
            continue
        arc = torch.stack([torch.from_numpy(j.face.arcface) for j in ready])
        farl = torch.stack([torch.from_numpy(j.face.farl_crop).permute(2, 0, 1) for j in ready])
        idx = [image_seed_index(j.rel) for j in ready]
        t0 = time.perf_counter()
        try:
            gr = reconstruct_group(rec, arc, farl, idx, per_image=g.per_image, rule=g.aggregate, select=g.select,
                                   top_k=g.top_k, keep_hypotheses=True, timer=state.timer)
        except Exception as exc:  # one group's fault must not stop the others
            for j in ready:
                state.fail(j, error_line(exc))
            continue
        per_image = (time.perf_counter() - t0) / len(ready)
        if not all(bool(torch.isfinite(t).all()) for t in (gr.shape_coeffs, gr.scores, gr.exp_coeffs)):
            for j in ready:
                state.fail(j, "the reconstruction holds NaN or inf values (check the checkpoints)")
            continue
        ext = cfg.mesh_format
        write_mesh(gdir / f"identity.{ext}", gr.identity_vertices, faces, unit="mm")
        write_npz(gdir / "identity.npz", shape_coeffs=gr.shape_coeffs.numpy().astype(np.float32),
                  source_image=gr.source_image.numpy(), scores=gr.scores.numpy(), aggregate=gr.aggregate.numpy(),
                  chosen=gr.chosen.numpy().astype(np.int64), per_image_best=gr.per_image_best.numpy(),
                  shape=gr.identity_shape.numpy().astype(np.float32))
        chosen = gr.chosen.tolist()
        own_hit = [int(b) in chosen for b in gr.per_image_best]
        for i, j in enumerate(ready):
            res = image_result(rec, gr, i)
            if not finite_result(res):
                state.fail(j, "the reconstruction holds NaN or inf values (check the checkpoints)")
                continue
            meta = {"image": j.name, "status": "ok", "group": name, "image_index": idx[i],
                    "ranked_index": chosen[0], "ranked_top": chosen, "own_best_index": int(gr.per_image_best[i]),
                    "face_source": j.face.source, "detector": j.face.detector, "n_faces": j.face.n_faces,
                    "kps": np.round(j.face.kps.astype(np.float64), 2).tolist(), "notes": list(j.face.notes),
                    "seed": cfg.seed, "n_identities": int(gr.shape_coeffs.shape[0]),
                    "n_expressions": cfg.n_expressions, "units": "mm"}
            t1 = time.perf_counter()
            write_image_outputs(output / j.rel, res, faces, cfg, j.face.farl_crop, meta, face=j.face)
            dt = time.perf_counter() - t1
            state.timer["writing"] += dt
            state.records.append({"image": j.name, "status": "ok", "group": name, "ranked_index": chosen[0],
                                  "seconds": round(per_image + dt + j.seconds, 4)})
        write_json(gdir / "group.json", {
            "group": name, "images": [j.name for j in ready], "aggregate": g.aggregate, "per_image": g.per_image,
            "select": g.select, "top_k": len(chosen), "n_hypotheses": int(gr.shape_coeffs.shape[0]),
            "chosen": chosen, "chosen_from_image": [ready[int(gr.source_image[c])].name for c in chosen],
            "own_best": [int(b) for b in gr.per_image_best], "own_best_is_chosen": own_hit,
            "identity": f"identity.{ext}", "units": "mm"})
