"""Photo sets and clips of the synthetic world, and what a group identity and a temporal path gain.

``build_sequences`` renders, with a built world's head model, prior and scene:

* ``photosets/set<i>/<k>.png`` (+ ``.kps.txt``): K renders of one held-out identity (random pose,
  expression, light, background, the world's occluders); ``photosets/gt/set<i>.npz``: its
  ``shape_coeffs`` and ``vertices_neutral``;
* ``clips/clip<i>/<t>.png`` (+ ``.kps.txt``): a head turning from one side to the other while
  talking (expression key frames blended smoothly, the jaw opening and closing), one camera,
  light and background for the whole clip, and a bar sliding over the face in a stretch of
  frames; ``clips/gt/clip<i>.npz``: per frame ``exp_coeffs``, ``jaw_pose``, ``global_pose``,
  ``occluded`` (the bar covers the face), ``kps``; the identity's ``shape_coeffs``.

``measure_photo_sets`` / ``measure_clips`` run a :class:`~ofer.sample.reconstructor.Reconstructor`
on them (``python -m ofer.world.sequences measure``) and report the identity error of the group
identity against the per-image ranked identities and the mean shape for each K, and the
per-frame expression error and jitter of the dynamic-programming path against independent
per-frame choice and the per-frame sample mean, and the error of the clip's global pose.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..data.occlusion import OcclusionConfig
from ..errors import OferError
from .build import kps_text, load_world_flame, load_world_masks, png_bytes, item_rng, write_file, save_npz_deterministic
from .prior import HeadPrior
from .scene import FaceRenderer, SceneConfig

__all__ = ["SequenceConfig", "build_sequences", "measure_photo_sets", "paired_halves", "measure_clips", "main"]

_S_SET, _S_CLIP = 11, 12


@dataclass(frozen=True)
class SequenceConfig:
    """photo_sets x photo_set_size renders; clips x clip_frames frames, the head turning over
    ``[-clip_yaw, clip_yaw]`` degrees, the bar over the face in ``occluded_share`` of the frames."""

    photo_sets: int = 8
    photo_set_size: int = 8
    clips: int = 4
    clip_frames: int = 32
    clip_yaw: float = 30.0
    occluded_share: float = 0.3
    seed: int = 0


def _world_setup(world: Path) -> tuple[FaceRenderer, HeadPrior, SceneConfig]:
    info = json.loads((world / "world.json").read_text())["config"]
    sc = dict(info["scene"])
    occ = {k: tuple(v) if isinstance(v, list) else v for k, v in sc.pop("occlusion").items()}
    sc = {k: tuple(v) if isinstance(v, list) else v for k, v in sc.items()}
    scene = SceneConfig(**sc, occlusion=OcclusionConfig(**occ))
    prior = HeadPrior(**{k: tuple(v) if isinstance(v, list) else v for k, v in info["prior"].items()})
    flame = load_world_flame(world / "flame")
    return FaceRenderer(flame, scene, load_world_masks(world / "flame" / "FLAME_masks.pkl")), prior, scene


def _npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        save_npz_deterministic(f, **arrays)


def _smooth_keys(keys: np.ndarray, T: int) -> np.ndarray:
    """(K, D) key frames -> (T, D), blended with a cosine ease between consecutive keys."""
    pos = np.linspace(0, len(keys) - 1, T)
    i0 = np.minimum(np.floor(pos).astype(int), len(keys) - 2)
    a = (1 - np.cos(np.pi * (pos - i0))) / 2
    return (1 - a)[:, None] * keys[i0] + a[:, None] * keys[i0 + 1]


def build_sequences(world: str | Path, output: str | Path, cfg: SequenceConfig = SequenceConfig()) -> dict:
    """Render the photo sets and clips of ``cfg`` with ``world``'s head model into ``output``."""
    from scipy.spatial.transform import Rotation

    world, output = Path(world), Path(output)
    fr, prior, scene = _world_setup(world)
    torch.set_num_threads(1)
    with torch.no_grad():
        for i in range(cfg.photo_sets):
            g = item_rng(cfg.seed, _S_SET, i)
            shape, albedo = prior.sample_identity(g), fr.sample_albedo(g)
            K = cfg.photo_set_size
            exps, jaws = zip(*(prior.sample_expression(g) for _ in range(K)))
            samples = fr.render_batch(g, np.tile(shape, (K, 1)), np.stack(exps), np.stack(jaws), albedo)
            for k, s in enumerate(samples):
                write_file(output / "photosets" / f"set{i:03d}" / f"{k:02d}.png", png_bytes(s.image))
                write_file(output / "photosets" / f"set{i:03d}" / f"{k:02d}.kps.txt", kps_text(s.kps))
            neutral = fr.flame(shape_coeffs=torch.as_tensor(shape[None])).vertices[0].numpy()
            _npz(output / "photosets" / "gt" / f"set{i:03d}.npz", shape_coeffs=shape,
                 vertices_neutral=neutral.astype(np.float32))
        for i in range(cfg.clips):
            g = item_rng(cfg.seed, _S_CLIP, i)
            shape, albedo = prior.sample_identity(g), fr.sample_albedo(g)
            T = cfg.clip_frames
            n_keys = max(2, T // 8 + 1)
            keys = [prior.sample_expression(g) for _ in range(n_keys)]
            exp = _smooth_keys(np.stack([k[0] for k in keys]), T).astype(np.float32)
            jaw = _smooth_keys(np.stack([k[1] for k in keys]), T).astype(np.float32)
            # talking: the jaw opens and closes about twice a second at 25 fps
            jaw[:, 0] = np.float32(prior.jaw_open[1]) * 0.5 * (1 - np.cos(2 * np.pi * np.arange(T) / 12.0))
            yaw = np.linspace(-cfg.clip_yaw, cfg.clip_yaw, T)
            pitch = 4.0 * np.sin(np.linspace(0, 2 * np.pi, T))
            pose = Rotation.from_euler("YX", np.stack([yaw, pitch], 1), degrees=True).as_rotvec().astype(np.float32)
            clip_seed = int(g.integers(2**31))
            n_occ = int(round(cfg.occluded_share * T))
            start = int(g.integers(0, T - n_occ + 1)) if n_occ else T
            occluded = np.zeros(T, bool)
            kps_all = []
            S = scene.size
            for t in range(T):
                # one camera, light and background for the clip: the same draws every frame
                s = fr.render_batch(np.random.default_rng(clip_seed), shape[None], exp[t:t + 1], jaw[t:t + 1],
                                    albedo, occlusion=OcclusionConfig(prob=0.0), global_pose=pose[t:t + 1])[0]
                img = s.image.copy()
                if start <= t < start + n_occ:
                    # a bar sweeping over the face from left to right
                    x0, x1 = s.kps[:, 0].min(), s.kps[:, 0].max()
                    w = 0.6 * (x1 - x0)
                    c = x0 - w + (x1 - x0 + 2 * w) * (t - start + 0.5) / n_occ
                    lo, hi = int(max(0, c - w / 2)), int(min(S, c + w / 2))
                    img[:, lo:hi] = (90, 80, 70)
                    occluded[t] = hi > lo and hi > x0 and lo < x1
                write_file(output / "clips" / f"clip{i:03d}" / f"{t:04d}.png", png_bytes(img))
                write_file(output / "clips" / f"clip{i:03d}" / f"{t:04d}.kps.txt", kps_text(s.kps))
                kps_all.append(s.kps)
            _npz(output / "clips" / "gt" / f"clip{i:03d}.npz", shape_coeffs=shape, exp_coeffs=exp, jaw_pose=jaw,
                 global_pose=pose, occluded=occluded, kps=np.stack(kps_all).astype(np.float32))
    info = {"config": cfg.__dict__, "world": str(world)}
    write_file(output / "sequences.json", (json.dumps(info, indent=1) + "\n").encode())
    return info


# ----------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------
def _face_error(v: np.ndarray, gt: np.ndarray, face: np.ndarray) -> np.ndarray:
    """(..., V, 3) against (V, 3) or (..., V, 3), metres -> mean face-region distance, mm."""
    return np.linalg.norm(v[..., face, :] - gt[..., face, :], axis=-1).mean(-1) * 1000.0


def _faces_of(folder: Path, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    from ..data.images import prepare_faces

    arc, farl = [], []
    for p in sorted(folder.glob("*.png")):
        f = prepare_faces(p, None, which="center", channel_order=cfg.channel_order)[0]
        arc.append(torch.from_numpy(f.arcface))
        farl.append(torch.from_numpy(f.farl_crop).permute(2, 0, 1))
    return torch.stack(arc), torch.stack(farl)


def measure_photo_sets(rec, seq_dir: str | Path, world: str | Path, ks: Sequence[int] = (1, 2, 4, 8),
                       top_ks: Sequence[int] = (5, 10, 25, 50)) -> dict:
    """Identity error (mm, face region, neutral) of the group identity for groups of K images
    (every disjoint run of K images of each set): each aggregate rule with ``select=best``,
    ``top_mean`` (log_softmax) for each of ``top_ks``, both selections with N hypotheses in
    total (``per_image=False``), against the per-image ranked identities (mean over the
    group's images), the mean shape, the average and the best (oracle) pooled hypothesis.

    ``{"K": {row: {"mean_mm", "groups"}}}``, and under ``"paired"`` each K that is twice a
    measured one compared per identity with its halves (:func:`paired_halves`).
    """
    from ..flame.assets import safe_load_pickle
    from ..sample.groups import AGGREGATES, aggregate_scores, reconstruct_group, select_identity
    from ..sample.reconstructor import image_seed_index

    seq_dir, world = Path(seq_dir), Path(world)
    face = np.asarray(safe_load_pickle(world / "flame" / "FLAME_masks.pkl")["face"])
    template = rec.flame_id.v_template.detach().cpu().numpy()
    # rows[K][name]: one error per group, sets in order, a set's groups in image order
    rows: dict[int, dict[str, list[float]]] = {k: {} for k in ks}

    def top_mean_error(gr, errs_v: np.ndarray, k: int, gt: np.ndarray) -> float:
        # the mean coefficients' mesh is the mean of the meshes (FLAME's neutral mesh is affine in them)
        _, idx = select_identity(gr.shape_coeffs, aggregate_scores(gr.scores), "top_mean", k)
        return float(_face_error(errs_v[idx.numpy()].mean(0)[None], gt, face)[0])

    gts = sorted((seq_dir / "photosets" / "gt").glob("*.npz"))
    if not gts:  # a sequence world of clips only
        return {}
    size = min(len(list((seq_dir / "photosets" / g.stem).glob("*.png"))) for g in gts)
    bad = [k for k in list(ks) + list(top_ks) if k < 1] + [k for k in ks if k > size]
    if bad or not ks or not top_ks:
        raise OferError(f"group sizes (ks) must be in [1, {size}] (the smallest photo set) and top_ks >= 1, "
                        f"both non-empty; got ks={list(ks)}, top_ks={list(top_ks)}")
    for gt_path in gts:
        gt = np.load(gt_path)["vertices_neutral"].astype(np.float64)
        folder = seq_dir / "photosets" / gt_path.stem
        arc, farl = _faces_of(folder, rec.cfg)
        idx = [image_seed_index(f"{gt_path.stem}/{k}") for k in range(len(arc))]
        # one image alone, ranked as sample.py ranks a single image: also the groups of K = 1
        singles = [reconstruct_group(rec, arc[i:i + 1], farl[i:i + 1], idx[i:i + 1], select="best",
                                     expressions=False, keep_hypotheses=True) for i in range(len(arc))]
        alone = [float(_face_error(g.identity_vertices.numpy()[None], gt, face)[0]) for g in singles]
        for K in ks:
            for s in range(0, len(arc) - K + 1, K):
                sl = slice(s, s + K)
                gr = singles[s] if K == 1 else reconstruct_group(rec, arc[sl], farl[sl], idx[sl], expressions=False,
                                                                 keep_hypotheses=True)
                hv = gr.hypothesis_vertices.numpy().astype(np.float64)
                errs = _face_error(hv, gt, face)
                r = rows[K]
                for rule in AGGREGATES:
                    r.setdefault(f"group ({rule})", []).append(float(errs[int(aggregate_scores(gr.scores, rule).argmax())]))
                for k in top_ks:
                    r.setdefault(f"group, top_mean {k} (log_softmax)", []).append(top_mean_error(gr, hv, k, gt))
                # the alternative: N hypotheses in total, shared out over the K images
                g2 = gr if K == 1 else reconstruct_group(rec, arc[sl], farl[sl], idx[sl], per_image=False,
                                                         expressions=False, keep_hypotheses=True)
                h2 = g2.hypothesis_vertices.numpy().astype(np.float64)
                e2 = _face_error(h2, gt, face)
                r.setdefault("group, N in total (log_softmax)", []).append(float(e2[int(aggregate_scores(g2.scores).argmax())]))
                k_mid = 10 if 10 in top_ks else top_ks[0]
                r.setdefault(f"group, N in total, top_mean {k_mid} (log_softmax)", []).append(
                    top_mean_error(g2, h2, k_mid, gt))
                r.setdefault("per-image ranked", []).append(float(np.mean(alone[sl])))
                r.setdefault("average pooled hypothesis", []).append(float(errs.mean()))
                r.setdefault("mean shape", []).append(float(_face_error(template[None], gt, face)[0]))
                r.setdefault("best pooled hypothesis (oracle)", []).append(float(errs.min()))
    out: dict[str, Any] = {str(K): {name: {"mean_mm": float(np.mean(v)), "groups": len(v),
                                           "errors_mm": [round(x, 4) for x in v]} for name, v in r.items()}
                           for K, r in rows.items()}
    # the rows that differ between a group and its halves (the others are the same by construction)
    sel = [n for n in rows[ks[0]] if n.startswith("group") or "oracle" in n]
    out["paired"] = {f"{K} vs {K // 2}": paired_halves({n: rows[K][n] for n in sel}, rows[K // 2])
                     for K in ks if K % 2 == 0 and K // 2 in rows and rows[K]}
    # every other rule minus the default one on the same groups
    ref = "group (log_softmax)"
    out["vs_best"] = {str(K): {n: _paired_stats(np.subtract(rows[K][n], rows[K][ref]))
                               for n in sel if n.startswith("group") and n != ref} for K in ks}
    return out


def _paired_stats(d: np.ndarray) -> dict:
    """Paired differences (mm) -> their mean, its standard error, and how many are negative."""
    d = np.asarray(d, np.float64)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else math.nan
    return {"mean_diff_mm": float(d.mean()), "se_mm": se, "wins": int((d < 0).sum()), "pairs": len(d)}


def paired_halves(big: dict[str, list[float]], half: dict[str, list[float]]) -> dict:
    """Each group of 2K images against the mean of its two groups of K (the same images):
    per row, the mean difference (mm, negative: the larger group is better), its standard
    error, and how many of the pairs the larger group wins. ``big`` and ``half``: one error
    per group in the order :func:`measure_photo_sets` visits them (the halves of big group
    ``j`` are half groups ``2j`` and ``2j + 1`` when every set has a multiple of 2K images)."""
    res = {}
    for name, v in big.items():
        h = np.asarray(half[name], np.float64)
        if len(h) != 2 * len(v):
            continue
        res[name] = _paired_stats(np.asarray(v, np.float64) - h.reshape(-1, 2).mean(1))
    return res


def measure_clips(rec, seq_dir: str | Path, world: str | Path, kps_noise_px: float = 1.5,
                  smooth_weights: Sequence[float] = (0.5, 1.0, 2.0, 4.0), seed: int = 0) -> dict:
    """Per-frame expression error (mm, face region: the expression's displacement from the
    neutral head, so that the identity's error is left out) and jitter (mean vertex
    acceleration, mm) of the DP path (each smoothness weight), independent per-frame choice and
    the per-frame sample mean; and the error (degrees, mean absolute yaw, pitch and roll as
    the world draws them, and the geodesic angle) of the global pose estimate
    (:func:`ofer.sample.video.clip_global_pose` on the chosen path's meshes) and of the
    in-plane-only estimate. The keypoints are the world's with Gaussian noise of
    ``kps_noise_px`` and missing (detection failed) on the frames the bar covers, then filled
    and smoothed as :func:`ofer.sample.video.run_video` does."""
    from scipy.spatial.transform import Rotation

    from ..flame.assets import safe_load_pickle
    from ..sample.video import (choose_expressions, clip_global_pose, fill_gaps, in_plane_pose, jitter_mm,
                                reconstruct_clip, smooth_keypoints)

    seq_dir, world = Path(seq_dir), Path(world)
    face = np.asarray(safe_load_pickle(world / "flame" / "FLAME_masks.pkl")["face"])
    cfg = rec.cfg
    from ..flame import FLAME

    flame_gt = FLAME(world / "flame" / "generic_model.pkl", None, n_shape=300, n_exp=100)
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, list[float]]] = {}
    for gt_path in sorted((seq_dir / "clips" / "gt").glob("*.npz")):
        gt = np.load(gt_path)
        from PIL import Image

        frames = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((seq_dir / "clips" / gt_path.stem).glob("*.png"))]
        kps = gt["kps"].astype(np.float64) + rng.normal(0, kps_noise_px, gt["kps"].shape)
        kps[gt["occluded"]] = np.nan
        kps, _ = fill_gaps(kps)
        kps = smooth_keypoints(kps, cfg.video.smooth_sigma)
        res = reconstruct_clip(rec, frames, kps, cfg, gt_path.stem, keep_hypotheses=True)
        with torch.no_grad():
            T = len(frames)
            sh = torch.as_tensor(gt["shape_coeffs"])[None].expand(T, -1)
            gv = flame_gt(shape_coeffs=sh, exp_coeffs=torch.as_tensor(gt["exp_coeffs"]),
                          jaw_pose=torch.as_tensor(gt["jaw_pose"])).vertices.numpy().astype(np.float64)
            g0 = flame_gt(shape_coeffs=sh[:1]).vertices.numpy()[0].astype(np.float64)
            p0 = res["identity_vertices"].numpy().astype(np.float64)
        hyp = res["hypothesis_vertices"]
        gt_disp = gv - g0
        occ = gt["occluded"]
        choices = {"mean": ("mean", 1.0), "independent": ("independent", 1.0)}
        choices.update({f"dp (smooth {w:g})": ("dp", w) for w in smooth_weights})
        for name, (choice, w) in choices.items():
            path, _ = choose_expressions(hyp, choice, cfg.video.data_weight, w)
            if choice == "mean":
                v = rec.expression_vertices(res["shape_t"], torch.as_tensor(res["exp_all"]).mean(1),
                                            torch.as_tensor(res["jaw_all"]).mean(1)).cpu().numpy()
            else:
                v = torch.stack([hyp[t][path[t]] for t in range(T)]).numpy()
            v = v.astype(np.float64)
            err = _face_error(v - p0, gt_disp, face)
            d = out.setdefault(name, {})
            d.setdefault("error_mm", []).append(float(err.mean()))
            d.setdefault("error_occluded_frames_mm", []).append(float(err[occ].mean()) if occ.any() else math.nan)
            d.setdefault("jitter_mm", []).append(jitter_mm(v))
        out.setdefault("ground truth", {}).setdefault("jitter_mm", []).append(jitter_mm(gv))
        true = Rotation.from_rotvec(gt["global_pose"].astype(np.float64))
        pose = clip_global_pose(rec.flame_id, res["vertices"], kps, cfg.video.smooth_sigma, log=lambda *a: None)[0]
        for name, p in (("global pose (fit)", pose), ("global pose (in-plane only)", in_plane_pose(kps))):
            est = Rotation.from_rotvec(p)
            ypr = np.abs(est.as_euler("YXZ", degrees=True) - true.as_euler("YXZ", degrees=True)).mean(0)
            d = out.setdefault(name, {})
            for k, e in zip(("yaw_deg", "pitch_deg", "roll_deg"), ypr):
                d.setdefault(k, []).append(float(e))
            d.setdefault("angle_deg", []).append(float(np.degrees((true.inv() * est).magnitude()).mean()))
    return {name: {k: float(np.nanmean(v)) for k, v in d.items()} | {"clips": len(next(iter(d.values())))}
            for name, d in out.items()}


def format_measurements(rep: dict) -> str:
    """Markdown tables of :func:`measure_photo_sets` and :func:`measure_clips`."""
    lines = []
    if rep.get("photo_sets"):
        ps = {k: v for k, v in rep["photo_sets"].items() if k not in ("paired", "vs_best")}
        ks = list(ps)
        names = list(ps[ks[0]])
        lines += ["| identity error (mm) | " + " | ".join(f"K = {k}" for k in ks) + " |",
                  "|---|" + "---|" * len(ks)]
        for n in names:
            lines.append(f"| {n} | " + " | ".join(f"{ps[k][n]['mean_mm']:.3f}" for k in ks) + " |")
        lines.append("")
        lines.append("groups per K: " + ", ".join(f"{k}: {ps[k][names[0]]['groups']}" for k in ks))
        lines.append("")
        for pair, d in rep["photo_sets"].get("paired", {}).items():
            k2, k1 = pair.split(" vs ")
            lines += [f"| K = {k2} minus the mean of its two K = {k1} groups | mean (mm) | std. error (mm) | "
                      f"K = {k2} better |", "|---|---|---|---|"]
            for n, v in d.items():
                lines.append(f"| {n} | {v['mean_diff_mm']:+.3f} | {v['se_mm']:.3f} | {v['wins']} of {v['pairs']} |")
            lines.append("")
        vs = rep["photo_sets"].get("vs_best", {})
        if vs and any(vs.values()):
            kv = list(vs)
            lines += ["| minus group (log_softmax), same groups: mean (mm) +- std. error, wins | "
                      + " | ".join(f"K = {k}" for k in kv) + " |", "|---|" + "---|" * len(kv)]
            for n in vs[kv[0]]:
                lines.append(f"| {n} | " + " | ".join(
                    f"{vs[k][n]['mean_diff_mm']:+.3f} +- {vs[k][n]['se_mm']:.3f}, {vs[k][n]['wins']}/{vs[k][n]['pairs']}"
                    for k in kv) + " |")
            lines.append("")
    if "clips" in rep:
        cl = rep["clips"]
        lines += ["| per-frame expression | error (mm) | error, occluded frames (mm) | jitter (mm/frame^2) |",
                  "|---|---|---|---|"]
        for n, d in cl.items():
            if "error_mm" not in d:
                continue
            lines.append(f"| {n} | {d['error_mm']:.3f} | {d['error_occluded_frames_mm']:.3f} | {d['jitter_mm']:.3f} |")
        if "ground truth" in cl:
            lines.append(f"| ground truth | 0 | 0 | {cl['ground truth']['jitter_mm']:.3f} |")
        poses = {n: d for n, d in cl.items() if "yaw_deg" in d}
        if poses:
            lines += ["", "| global pose error (deg) | yaw | pitch | roll | angle |", "|---|---|---|---|---|"]
            for n, d in poses.items():
                lines.append(f"| {n} | {d['yaw_deg']:.2f} | {d['pitch_deg']:.2f} | {d['roll_deg']:.2f} | "
                             f"{d['angle_deg']:.2f} |")
    return "\n".join(lines) + "\n"


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise OferError(f"{option} must be comma-separated integers, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """``build`` the sequences of a world, or ``measure`` a sampling config's models on them."""
    ap = argparse.ArgumentParser(prog="python -m ofer.world.sequences", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--world", required=True, help="a built world (python -m ofer.world)")
    b.add_argument("--output", required=True, help="the sequence world to write")
    for f in SequenceConfig.__dataclass_fields__.values():
        b.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    m = sub.add_parser("measure")
    m.add_argument("--sequences", required=True, help="a built sequence world")
    m.add_argument("--world", required=True, help="the world it was built from (FLAME, masks)")
    m.add_argument("--config", required=True, help="sampling config (YAML) naming the models")
    m.add_argument("--output", default=None, help="write the measurements here (.json; .md beside)")
    m.add_argument("--ks", default="1,2,4,8", help="group sizes K measured (comma-separated)")
    m.add_argument("--top-ks", default="5,10,25,50", help="group.top_k values measured with top_mean")
    m.add_argument("--no-clips", action="store_true", help="measure the photo sets only")
    m.add_argument("overrides", nargs="*", help="sampling config overrides, key=value")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            cfg = SequenceConfig(**{k: getattr(args, k) for k in SequenceConfig.__dataclass_fields__})
            build_sequences(args.world, args.output, cfg)
            return 0
        from ..config import load_config
        from ..sample import Reconstructor, SampleConfig

        scfg = load_config(SampleConfig, args.config, list(args.overrides))
        rec = Reconstructor.from_config(scfg)
        rep: dict[str, Any] = {"config": {"n_identities": scfg.n_identities, "n_expressions": scfg.n_expressions,
                                          "seed": scfg.seed, "video": scfg.video.__dict__}}
        rep["photo_sets"] = measure_photo_sets(rec, args.sequences, args.world, _int_list(args.ks, "--ks"),
                                               _int_list(args.top_ks, "--top-ks"))
        if not args.no_clips:
            rep["clips"] = measure_clips(rec, args.sequences, args.world)
        text = format_measurements(rep)
        print(text)
        if args.output:
            p = Path(args.output)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(rep, indent=1) + "\n")
            p.with_suffix(".md").write_text(text)
        return 0
    except OferError as exc:
        print(f"error: {exc}")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
