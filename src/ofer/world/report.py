"""Learning evidence on the synthetic world: how good are the sampled reconstructions?

Reads ``sample.py`` outputs for the world's held-out test images and their ground truth
(``test/gt/<id>.npz``) and measures, on the FLAME ``face`` region of the world's head:

* identity error (mean per-vertex Euclidean distance, mm, neutral canonical space, no
  alignment: the models predict canonical FLAME coefficients) of the ranked identity, the
  average over all N sampled identities, the best of the N, and the mean-shape baseline
  (all shape coefficients zero);
* how the error grows with occlusion: paired, on the renders of one scene with and without
  an occluder (the world writes every test scene ``clean``, ``occluded`` and ``mouth``, see
  :data:`ofer.world.build.TEST_VARIANTS`), and as the Spearman correlation of the occluded
  share of the face and the ranked error over all images. The check reads the average
  error over the N sampled identities (what IdGen's posterior loses); the ranked identity's
  difference, reported beside it, adds the noise of one pick among N;
* expression diversity: per-vertex standard deviation of the M sampled expressions on the
  lips region (mm), paired: the renders of a scene whose mouth is occluded against those of
  the same scene whose mouth is visible;
* the expression spread as an occlusion signal (:func:`occlusion_auc`): on every render with
  an occluder, the area under the ROC curve of the per-vertex spread of the M expressions
  (:func:`ofer.uncertainty.vertex_spread`) for "this vertex is hidden by the occluder", over
  the vertices the render shows; once from the spread itself and once from its increase over
  the clean render of the same scene (which removes where expressions move anyway), each
  tested against chance (0.5); and the lips spread of the face-mask render against the clean
  render of the same scene.

Pairing removes what varies between scenes (identity, expression, pose, light), so a few
dozen scenes show an effect that the same number of unrelated images would hide. Each check
holds when its paired effect is positive and a one-sided randomisation test of it gives
p < :data:`ALPHA` (:func:`paired_test`): a margin that sampling noise could give does not pass.

``python -m ofer.world.report --samples DIR --world DIR [--output report.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import OferError
from ..io import identity_coefficients
from ..uncertainty import roc_auc, vertex_spread

__all__ = ["world_report", "format_report", "spearman", "paired_test", "occlusion_auc", "ALPHA", "CHECK_P"]

#: a check holds when its effect is positive and its one-sided paired test gives p < ALPHA
ALPHA = 0.05

#: each check of the report and the summary key of its p-value
CHECK_P = {
    "ranked_below_mean_sample": "ranked_vs_mean_sample_p",
    "ranked_below_mean_shape": "ranked_vs_mean_shape_p",
    "error_grows_with_occlusion": "occlusion_p",
    "more_expression_diversity_when_mouth_occluded": "mouth_p",
}


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); nan for fewer than 3 points."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size < 3:
        return float("nan")

    def ranks(a):
        order = np.argsort(a, kind="mergesort")
        r = np.empty(a.size)
        r[order] = np.arange(a.size)
        for v in np.unique(a):  # average ranks of ties
            m = a == v
            r[m] = r[m].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def paired_test(diffs: np.ndarray, resamples: int = 20000, seed: int = 0) -> float:
    """One-sided paired randomisation (sign-flip) test of ``mean(diffs) > 0``.

    Under the null hypothesis each paired difference is as likely positive as negative, so
    its sign is flipped at random: p is the share of the 2^n sign patterns whose mean is at
    least the observed one (all of them for n <= 16, else ``resamples`` random ones, seeded,
    counting the observed pattern). Unlike a sign test it weighs each difference by its
    size; unlike a t-test it assumes no distribution. Small values say the positive mean is
    unlikely to be chance; nan without data.
    """
    d = np.asarray(diffs, float).ravel()
    n = d.size
    if n == 0:
        return float("nan")
    observed = d.mean() - 1e-12 * max(1.0, float(np.abs(d).max()))  # ties count as "at least"
    if n <= 16:
        signs = 1.0 - 2.0 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
        return float(np.mean(signs @ d / n >= observed))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, resamples, 4096):
        signs = rng.choice((-1.0, 1.0), size=(min(4096, resamples - start), n))
        hits += int((signs @ d / n >= observed).sum())
    return float((hits + 1) / (resamples + 1))


def occlusion_auc(spread: np.ndarray, in_render: np.ndarray, visible: np.ndarray) -> float:
    """AUC of ``spread`` (V,) for "hidden by the occluder" (``in_render`` and not ``visible``)
    over the vertices the render shows (``in_render``); nan unless both kinds are there."""
    seen = np.asarray(in_render, bool)
    hidden = seen & ~np.asarray(visible, bool)
    return roc_auc(np.asarray(spread, np.float64)[seen], hidden[seen])


def _spread_measures(per_image: list[dict], spreads: dict[str, np.ndarray], visibility: dict) -> dict[str, Any]:
    """The occlusion AUCs (added to ``per_image``) and the face-mask lips comparison."""
    clean_of = {r["scene"]: r["image"] for r in per_image if r["variant"] == "clean"}
    for r in per_image:
        auc = auc_clean = None
        if r["variant"] != "clean":
            a = occlusion_auc(spreads[r["image"]], *visibility[r["image"]])
            auc = None if np.isnan(a) else a
            twin = clean_of.get(r["scene"])
            if auc is not None and twin is not None:
                auc_clean = occlusion_auc(spreads[r["image"]] - spreads[twin], *visibility[r["image"]])
        r["spread_auc_occluded"] = auc
        r["spread_increase_auc_occluded"] = auc_clean
    aucs = np.array([r["spread_auc_occluded"] for r in per_image if r["spread_auc_occluded"] is not None])
    incs = np.array([r["spread_increase_auc_occluded"] for r in per_image
                     if r["spread_increase_auc_occluded"] is not None])
    by_variant = {}
    for v in sorted({r["variant"] for r in per_image} - {"clean"}):
        a = [r["spread_auc_occluded"] for r in per_image if r["variant"] == v and r["spread_auc_occluded"] is not None]
        by_variant[v] = float(np.mean(a)) if a else float("nan")
    lips = {(r["scene"], r["variant"]): r["lips_expression_std_mm"] for r in per_image}
    masked = [(lips[(sc, "mouth")], lips[(sc, "clean")]) for sc, v in lips if v == "mouth" and (sc, "clean") in lips]
    m = np.array(masked).reshape(-1, 2)

    def mean(a):
        return float(np.mean(a)) if len(a) else float("nan")

    return {
        "spread_auc_images": int(len(aucs)),
        "spread_auc_occluded": mean(aucs),
        "spread_auc_occluded_by_variant": by_variant,
        "spread_auc_above_chance_fraction": mean(aucs > 0.5),
        "spread_auc_p": paired_test(aucs - 0.5),
        "spread_increase_auc_images": int(len(incs)),
        "spread_increase_auc_occluded": mean(incs),
        "spread_increase_auc_above_chance_fraction": mean(incs > 0.5),
        "spread_increase_auc_p": paired_test(incs - 0.5),
        "face_mask_pairs": int(len(m)),
        "lips_spread_face_mask_mm": mean(m[:, 0]),
        "lips_spread_clean_mm": mean(m[:, 1]),
        "lips_spread_face_mask_increase_mm": mean(m[:, 0] - m[:, 1]),
        "lips_spread_face_mask_increase_fraction": mean(m[:, 0] > m[:, 1]),
        "face_mask_p": paired_test(m[:, 0] - m[:, 1]),
    }


def world_report(samples_dir: str | Path, world_dir: str | Path, device: str = "cpu") -> dict[str, Any]:
    """Metrics of a ``sample.py`` run on ``<world>/test/images`` (see the module docstring)."""
    from ..flame import FLAME
    from ..flame.assets import safe_load_pickle

    samples_dir, world_dir = Path(samples_dir), Path(world_dir)
    gt_dir = world_dir / "test" / "gt"
    flame_dir = world_dir / "flame"
    if not gt_dir.is_dir():
        raise OferError(f"no world ground truth at {gt_dir}: build one with python -m ofer.world")
    masks = safe_load_pickle(flame_dir / "FLAME_masks.pkl")
    face, lips = np.asarray(masks["face"]), np.asarray(masks["lips"])
    flame = None
    per_image = []
    spreads: dict[str, np.ndarray] = {}
    visibility: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for gt_path in sorted(gt_dir.glob("*.npz")):
        name = gt_path.stem
        s_path = samples_dir / name / "samples.npz"
        if not s_path.is_file():
            continue
        gt = np.load(gt_path)
        s = np.load(s_path)
        shapes = torch.from_numpy(s["shape_coeffs"]).double()
        n_shape = shapes.shape[1]
        n_exp = s["exp_coeffs"].shape[1]
        if flame is None:
            flame = FLAME(flame_dir / "generic_model.pkl", None, n_shape=n_shape, n_exp=n_exp,
                          dtype=torch.float64).to(device)
        with torch.no_grad():
            verts = flame(shape_coeffs=shapes.to(device)).vertices.cpu().numpy()  # (N, V, 3)
            template = flame.v_template.cpu().numpy()
            identity = torch.from_numpy(identity_coefficients(s)).double()
            best_shape = identity[None].expand(s["exp_coeffs"].shape[0], -1)
            exp_v = flame(shape_coeffs=best_shape.to(device),
                          exp_coeffs=torch.from_numpy(s["exp_coeffs"]).double().to(device),
                          jaw_pose=torch.from_numpy(s["jaw_pose"]).double().to(device)).vertices.cpu().numpy()
        gt_v = gt["vertices_neutral"].astype(np.float64)

        def err(v: np.ndarray) -> np.ndarray:  # (K, V, 3) metres -> (K,) mm on the face region
            return np.linalg.norm(v[:, face] - gt_v[face], axis=-1).mean(-1) * 1000.0

        errs = err(verts)
        ranked_err = float(errs[int(s["ranked_index"])])
        if "identity_shape" in s.files:  # a mean identity: score it, not the top hypothesis
            with torch.no_grad():
                id_v = flame(shape_coeffs=identity[None].to(device)).vertices.cpu().numpy()
            ranked_err = float(err(id_v)[0])
        lip = exp_v[:, lips]
        diversity = float(np.sqrt(((lip - lip.mean(0)) ** 2).sum(-1).mean(0)).mean() * 1000.0)
        spreads[name] = vertex_spread(exp_v) * 1000.0
        visibility[name] = (gt["vertex_in_render"], gt["vertex_visible"])
        per_image.append({
            "image": name,
            "scene": str(gt["scene"]) if "scene" in gt else name,
            "variant": str(gt["variant"]) if "variant" in gt else
            ("occluded" if float(gt["occluded_fraction"]) > 0 else "clean"),
            "ranked_error_mm": ranked_err,
            "mean_sample_error_mm": float(errs.mean()),
            "best_sample_error_mm": float(errs.min()),
            "mean_shape_error_mm": float(err(template[None])[0]),
            "occluded_fraction": float(gt["occluded_fraction"]),
            "mouth_occluded": bool(gt["mouth_occluded"]),
            "lips_expression_std_mm": diversity,
        })
    if not per_image:
        raise OferError(f"no sample.py outputs in {samples_dir} match the ground truth in {gt_dir}")
    num = [k for k, v in per_image[0].items() if not isinstance(v, str)]
    col = {k: np.array([r[k] for r in per_image]) for k in num}
    occ = col["occluded_fraction"]
    mouth = col["mouth_occluded"].astype(bool)
    variant = np.array([r["variant"] for r in per_image])
    scene = np.array([r["scene"] for r in per_image])

    def mean(a):
        return float(np.mean(a)) if len(a) else float("nan")

    # paired differences within a scene: (value where cond holds) - (value where it does not)
    def paired(values, cond):
        diffs = []
        for sc in np.unique(scene):
            m = scene == sc
            if (m & cond).any() and (m & ~cond).any():
                diffs.append(values[m & cond].mean() - values[m & ~cond].mean())
        return np.array(diffs)

    ranked = col["ranked_error_mm"]
    lips = col["lips_expression_std_mm"]
    ranked_gain = col["mean_sample_error_mm"] - ranked  # per image, > 0: the ranker helps
    shape_gain = col["mean_shape_error_mm"] - ranked
    occ_diff = paired(col["mean_sample_error_mm"], occ > 0)
    occ_ranked_diff = paired(ranked, occ > 0)
    mouth_diff = paired(lips, mouth)
    # the paired effect behind each check; its p-value goes to the summary under CHECK_P[check]
    effects = {"ranked_below_mean_sample": ranked_gain, "ranked_below_mean_shape": shape_gain,
               "error_grows_with_occlusion": occ_diff, "more_expression_diversity_when_mouth_occluded": mouth_diff}
    summary = {
        "images": len(per_image),
        "scenes": int(len(np.unique(scene))),
        "ranked_error_mm": mean(ranked),
        "mean_sample_error_mm": mean(col["mean_sample_error_mm"]),
        "best_sample_error_mm": mean(col["best_sample_error_mm"]),
        "mean_shape_error_mm": mean(col["mean_shape_error_mm"]),
        "ranked_beats_mean_sample_fraction": mean(ranked_gain > 0),
        "ranked_error_by_variant_mm": {v: mean(ranked[variant == v]) for v in sorted(set(variant))},
        "mean_sample_error_by_variant_mm": {v: mean(col["mean_sample_error_mm"][variant == v])
                                            for v in sorted(set(variant))},
        "spearman_occlusion_vs_ranked_error": spearman(occ, ranked),
        "occlusion_pairs": int(len(occ_diff)),
        "occlusion_error_increase_mm": mean(occ_diff),
        "occlusion_error_increase_fraction": mean(occ_diff > 0),
        "occlusion_ranked_error_increase_mm": mean(occ_ranked_diff),
        "occlusion_ranked_error_increase_fraction": mean(occ_ranked_diff > 0),
        "occlusion_ranked_p": paired_test(occ_ranked_diff),
        "lips_expression_std_mouth_occluded_mm": mean(lips[mouth]),
        "lips_expression_std_mouth_visible_mm": mean(lips[~mouth]),
        "mouth_pairs": int(len(mouth_diff)),
        "lips_expression_std_increase_mm": mean(mouth_diff),
        "lips_expression_std_increase_fraction": mean(mouth_diff > 0),
        "images_mouth_occluded": int(mouth.sum()),
        "alpha": ALPHA,
    }
    summary.update(_spread_measures(per_image, spreads, visibility))
    summary.update({CHECK_P[k]: paired_test(d) for k, d in effects.items()})
    # a positive effect, unlikely to be chance
    summary["checks"] = {k: bool(mean(effects[k]) > 0 and summary[p] < ALPHA) for k, p in CHECK_P.items()}
    return {"summary": summary, "per_image": per_image}


def format_report(rep: dict[str, Any]) -> str:
    """A short Markdown report."""
    s = rep["summary"]
    lines = [
        "# OFER on the synthetic world: held-out test images",
        "",
        f"{s['images']} held-out images of unseen identities ({s['scenes']} scenes, "
        f"{s['images_mouth_occluded']} images with the mouth occluded).",
        "Errors: mean per-vertex distance on the face region, neutral canonical space, mm.",
        "",
        "| identity | error (mm) |",
        "|---|---|",
        f"| ranked (IdRank's pick) | {s['ranked_error_mm']:.3f} |",
        f"| average over the N IdGen samples | {s['mean_sample_error_mm']:.3f} |",
        f"| best of the N samples (oracle) | {s['best_sample_error_mm']:.3f} |",
        f"| mean shape (baseline) | {s['mean_shape_error_mm']:.3f} |",
        "",
        f"Ranked identity beats the sample average on {100 * s['ranked_beats_mean_sample_fraction']:.0f}% "
        f"of the images (paired test p = {s['ranked_vs_mean_sample_p']:.2g}; against the mean shape "
        f"p = {s['ranked_vs_mean_shape_p']:.2g}).",
        "",
        "Occlusion, error by test variant (ranked / average sample): "
        + ", ".join(f"{k} {v:.3f} / {s['mean_sample_error_by_variant_mm'][k]:.3f} mm"
                    for k, v in s["ranked_error_by_variant_mm"].items())
        + f". On {s['occlusion_pairs']} scenes rendered with and without an occluder the occluder adds "
        f"{s['occlusion_error_increase_mm']:.3f} mm to the average sample's error (it grows on "
        f"{100 * s['occlusion_error_increase_fraction']:.0f}% of them, paired test p = "
        f"{s['occlusion_p']:.2g}) and {s['occlusion_ranked_error_increase_mm']:.3f} mm to the ranked "
        f"identity's ({100 * s['occlusion_ranked_error_increase_fraction']:.0f}%, p = "
        f"{s['occlusion_ranked_p']:.2g}); Spearman correlation of occluded "
        f"face share and ranked error {s['spearman_occlusion_vs_ranked_error']:.2f}.",
        "",
        f"Expression diversity (per-vertex std of the M ExpGen samples on the lips): "
        f"{s['lips_expression_std_mouth_occluded_mm']:.3f} mm with the mouth occluded vs "
        f"{s['lips_expression_std_mouth_visible_mm']:.3f} mm with it visible; on {s['mouth_pairs']} scenes "
        f"rendered both ways, covering the mouth adds {s['lips_expression_std_increase_mm']:.3f} mm "
        f"(on {100 * s['lips_expression_std_increase_fraction']:.0f}% of them, paired test p = "
        f"{s['mouth_p']:.2g}).",
        "",
        f"Expression spread as an occlusion signal (per-vertex spread of the M ExpGen samples, "
        f"area under the ROC curve for \"hidden by the occluder\" over the vertices each render "
        f"shows; 0.5 = chance): {s['spread_auc_occluded']:.3f} on {s['spread_auc_images']} renders with an "
        f"occluder ("
        + ", ".join(f"{k} {v:.3f}" for k, v in s["spread_auc_occluded_by_variant"].items())
        + f"; above 0.5 on {100 * s['spread_auc_above_chance_fraction']:.0f}% of them, test against "
        f"chance p = {s['spread_auc_p']:.2g}); from the spread's increase over the clean render of the "
        f"same scene {s['spread_increase_auc_occluded']:.3f} (above 0.5 on "
        f"{100 * s['spread_increase_auc_above_chance_fraction']:.0f}%, p = {s['spread_increase_auc_p']:.2g}). "
        f"Lips spread with a face mask {s['lips_spread_face_mask_mm']:.3f} mm vs "
        f"{s['lips_spread_clean_mm']:.3f} mm clean on {s['face_mask_pairs']} scenes (the mask adds "
        f"{s['lips_spread_face_mask_increase_mm']:.3f} mm, on "
        f"{100 * s['lips_spread_face_mask_increase_fraction']:.0f}% of them, paired test p = "
        f"{s['face_mask_p']:.2g}).",
        "",
        f"A check holds when its effect is positive with a one-sided paired randomisation test "
        f"p < {s['alpha']:g}.",
        "",
        "| check | holds | p |",
        "|---|---|---|",
    ]
    lines += [f"| {k.replace('_', ' ')} | {'yes' if v else 'NO'} | {s[CHECK_P[k]]:.2g} |"
              for k, v in s["checks"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ofer.world.report", description=__doc__.splitlines()[0])
    ap.add_argument("--samples", required=True, help="sample.py output folder for <world>/test/images")
    ap.add_argument("--world", required=True, help="world folder (python -m ofer.world)")
    ap.add_argument("--output", default=None, help="write the JSON report here (and a .md next to it)")
    args = ap.parse_args(argv)
    try:
        rep = world_report(args.samples, args.world)
    except OferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = format_report(rep)
    print(text)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rep, indent=1))
        out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
