"""Files other tools read: FLAME parameters, the FLAME Blender add-on, glTF, spread-coloured meshes.

Written per image by ``sample.py`` (``export=[flame,blender,glb]``; the coloured meshes with
``uncertainty.meshes``) or afterwards from a finished run's ``samples.npz`` with

    python -m ofer.sample.export --samples OUT [--config FILE] [key=value ...] --formats flame,glb

Every export holds the ranked identity and the expression hypotheses chosen far apart
(``chosen_index`` of ``samples.npz``; the first is the most typical one). Layouts and units:
``docs/outputs.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from ..io import identity_coefficients, write_glb, write_json, write_mesh, write_npz, write_text
from ..uncertainty import COLORMAP, colorize

__all__ = ["flame_params", "write_flame_params", "write_blender", "write_hypotheses_glb",
           "write_spread_meshes", "SPREADS", "POSE_LAYOUT", "main"]

#: the spread maps: name -> (``samples.npz`` key, what it is)
SPREADS = {
    "identity": ("identity_spread_mm", "the N identity hypotheses"),
    "identity_top_k": ("identity_top_k_spread_mm", "the top_k best-ranked identities"),
    "expression": ("expression_spread_mm", "the M expression hypotheses on the ranked identity"),
}

#: FLAME's 15 pose values: five joints, axis-angle (radians), in this order
POSE_LAYOUT = ("global", "neck", "jaw", "left_eye", "right_eye")


def flame_params(shape_coeffs: np.ndarray, exp_coeffs: np.ndarray, jaw_pose: np.ndarray,
                 expression_index: Sequence[int]) -> dict[str, np.ndarray]:
    """The ``flame_params.npz`` arrays: one row per exported expression hypothesis.

    ``shape`` (C, n_shape) (the ranked identity on every row), ``exp`` (C, n_exp), ``pose``
    (C, 15): global, neck, jaw, left eye, right eye, axis-angle radians (only the jaw is
    sampled; the rest is zero), ``expression_index`` (C,) (rows of ``samples.npz``).
    """
    shape = np.asarray(shape_coeffs, np.float32).reshape(-1)
    exp = np.asarray(exp_coeffs, np.float32)
    jaw = np.asarray(jaw_pose, np.float32)
    if exp.ndim != 2 or jaw.shape != (exp.shape[0], 3):
        raise ValueError(f"expected exp (C, n_exp) and jaw (C, 3), got {exp.shape} and {jaw.shape}")
    pose = np.zeros((exp.shape[0], 15), np.float32)
    pose[:, 6:9] = jaw
    return {"shape": np.repeat(shape[None], exp.shape[0], axis=0), "exp": exp, "pose": pose,
            "expression_index": np.asarray(expression_index, np.int64)}


def write_flame_params(path: Path, shape_coeffs, exp_coeffs, jaw_pose, expression_index) -> Path:
    """``flame_params.npz`` (:func:`flame_params`), with ``pose_layout`` and ``units`` strings."""
    arrays = flame_params(shape_coeffs, exp_coeffs, jaw_pose, expression_index)
    return write_npz(path, **arrays, pose_layout=np.array(" ".join(POSE_LAYOUT)),
                     units=np.array("shape, exp: FLAME coefficients; pose: axis-angle radians; "
                                    "FLAME canonical frame (metres), no translation, no camera"))


_BLENDER_SCRIPT = r'''"""Put an OFER reconstruction on a FLAME head made by the FLAME Blender add-on.

Select the add-on's FLAME mesh, then run this file from Blender's Text Editor (or
blender --python). It reads flame_blender.json beside it: the identity shape keys are set
once, and expression hypothesis i is keyed on frame start + i (its Exp keys and the jaw
bone), so the hypotheses can be flipped through on the timeline.
"""
import json
import math
import os
import re

import bpy



def here():
    """This file's folder (run from the Text Editor or with blender --python)."""
    text = getattr(getattr(bpy.context, "space_data", None), "text", None)
    path = bpy.path.abspath(text.filepath) if text is not None and text.filepath else __file__
    return os.path.dirname(os.path.abspath(path))


with open(os.path.join(here(), "flame_blender.json")) as fh:
    DATA = json.load(fh)

obj = bpy.context.active_object
if obj is None or obj.type != "MESH" or obj.data.shape_keys is None:
    raise SystemExit("select the FLAME mesh of the FLAME add-on first")
keys = obj.data.shape_keys.key_blocks
armature = obj.parent if obj.parent is not None and obj.parent.type == "ARMATURE" else None


def key_index(name, prefix):
    m = re.fullmatch(prefix + r"0*(\d+)", name)
    return int(m.group(1)) if m else None


def set_keys(prefix, values, frame=None):
    for kb in keys:
        i = key_index(kb.name, prefix)
        if i is None:
            continue
        v = values[i - 1] if i <= len(values) else 0.0
        kb.slider_min, kb.slider_max = -10.0, 10.0
        kb.value = max(-10.0, min(10.0, v))
        if frame is not None:
            kb.keyframe_insert("value", frame=frame)


set_keys(DATA["shape_prefix"], DATA["shape"])
try:
    bpy.ops.object.flame_update_joint_locations("EXEC_DEFAULT")
except Exception as exc:  # the add-on is not installed: the shape keys are set all the same
    print("joint locations not updated:", exc)
start = bpy.context.scene.frame_start
for i, hyp in enumerate(DATA["expressions"]):
    set_keys(DATA["exp_prefix"], hyp["exp"], frame=start + i)
    if armature is not None:
        for bone, rotvec in hyp["bones"].items():
            pb = armature.pose.bones.get(bone)
            if pb is None:
                continue
            angle = math.sqrt(sum(c * c for c in rotvec))
            axis = [c / angle for c in rotvec] if angle > 0 else [0.0, 0.0, 1.0]
            pb.rotation_mode = "AXIS_ANGLE"
            pb.rotation_axis_angle = (angle, *axis)
            pb.keyframe_insert("rotation_axis_angle", frame=start + i)
bpy.context.scene.frame_end = max(bpy.context.scene.frame_end, start + len(DATA["expressions"]) - 1)
bpy.context.scene.frame_set(start)
print("OFER: identity and", len(DATA["expressions"]), "expression hypotheses on frames",
      start, "to", start + len(DATA["expressions"]) - 1)
'''


def write_blender(folder: Path, shape_coeffs, exp_coeffs, jaw_pose, expression_index) -> Path:
    """``flame_blender.json`` + ``apply_in_blender.py`` for the FLAME Blender add-on.

    The add-on's head carries shape keys ``Shape<i>`` (300) and ``Exp<i>`` (100), 1-based, and
    bones ``neck``, ``jaw``, ``left_eye``, ``right_eye`` whose axis-angle rotation is FLAME's
    pose of that joint. The JSON holds the coefficient lists and per expression hypothesis the
    jaw's rotation vector (radians); the script sets them on the selected FLAME mesh.
    """
    folder = Path(folder)
    p = flame_params(shape_coeffs, exp_coeffs, jaw_pose, expression_index)
    data = {
        "format": "OFER reconstruction for the FLAME Blender add-on",
        "shape_prefix": "Shape", "exp_prefix": "Exp",
        "shape": [round(float(x), 6) for x in p["shape"][0]],
        "expressions": [{"index": int(k), "exp": [round(float(x), 6) for x in e],
                         "bones": {"jaw": [round(float(x), 6) for x in pose[6:9]]}}
                        for k, e, pose in zip(p["expression_index"], p["exp"], p["pose"])],
        "units": {"shape": "FLAME coefficients", "exp": "FLAME coefficients",
                  "bones": "axis-angle rotation vector, radians"},
    }
    write_text(folder / "apply_in_blender.py", _BLENDER_SCRIPT)
    return write_json(folder / "flame_blender.json", data)


def write_hypotheses_glb(path: Path, identity_vertices, faces, expression_vertices,
                         expression_index: Sequence[int], colors=None) -> Path:
    """``hypotheses.glb``: the ranked identity with the expressions as morph targets
    (``expression_<k>``), smooth normals, metres."""
    from ..render import vertex_normals

    base = torch.as_tensor(identity_vertices).double()
    targets = torch.as_tensor(expression_vertices).double().reshape(-1, *base.shape)
    f = torch.as_tensor(np.asarray(faces, np.int64))
    return write_glb(path, base.numpy(), f.numpy(), targets=targets.numpy(),
                     target_names=[f"expression_{int(k):03d}" for k in expression_index],
                     normals=vertex_normals(base, f).numpy(),
                     target_normals=vertex_normals(targets, f).numpy() if len(targets) else None,
                     colors=colors, name="ofer_identity",
                     extras={"ofer": "ranked identity; morph targets: expression hypotheses"})


def write_spread_meshes(folder: Path, identity_vertices, faces, spreads: dict[str, np.ndarray],
                        scales: dict[str, float], fmt: str = "ply") -> dict[str, str]:
    """The ranked identity coloured by each spread map (mm; :data:`SPREADS`), one file each,
    and ``scale.json``: the colour map and each file's scale. Returns ``{name: file name}``."""
    folder = Path(folder)
    files = {}
    for name, spread in spreads.items():
        vmax = float(scales[name])
        fname = f"{name}_spread.{fmt}"
        what = SPREADS[name][1]
        write_mesh(folder / fname, identity_vertices, faces, unit="mm", colors=colorize(spread, vmax),
                   comments=[f"colour: per-vertex spread of {what} (RMS distance to their mean, mm)",
                             f"colour scale: 0 mm to {vmax:g} mm (clipped above), colour map in scale.json"])
        files[name] = fname
    write_json(folder / "scale.json", {
        "units": "mm", "value": "per-vertex spread: RMS distance of the vertex to its mean over the hypotheses",
        "colormap": [{"at": p, "srgb": list(c)} for p, c in COLORMAP],
        "files": {files[n]: {"spread": n, "of": SPREADS[n][1], "vmin": 0.0, "vmax": float(scales[n])}
                  for n in files},
    })
    return files


def export_image(folder: Path, formats: Iterable[str], *, shape_coeffs, exp_coeffs, jaw_pose,
                 chosen_index: Sequence[int], identity_vertices, chosen_vertices, faces) -> list[str]:
    """Write the ``formats`` (``flame``, ``blender``, ``glb``) of one image into ``folder``;
    the names of the files written."""
    folder = Path(folder)
    chosen = list(chosen_index)
    exp, jaw = np.asarray(exp_coeffs)[chosen], np.asarray(jaw_pose)[chosen]
    written = []
    for fmt in formats:
        if fmt == "flame":
            write_flame_params(folder / "flame_params.npz", shape_coeffs, exp, jaw, chosen)
            written.append("flame_params.npz")
        elif fmt == "blender":
            write_blender(folder, shape_coeffs, exp, jaw, chosen)
            written += ["flame_blender.json", "apply_in_blender.py"]
        elif fmt == "glb":
            write_hypotheses_glb(folder / "hypotheses.glb", identity_vertices, faces, chosen_vertices, chosen)
            written.append("hypotheses.glb")
        else:
            raise ValueError(f"unknown export format {fmt!r} (flame, blender, glb)")
    return written


# ------------------------------------------------------------------------------------ CLI
def _decode(flame, shape: np.ndarray, exp: np.ndarray, jaw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(identity (V, 3), expressions (C, V, 3)) in metres."""
    with torch.no_grad():
        s = torch.from_numpy(np.asarray(shape, np.float32))[None]
        ident = flame(shape_coeffs=s).vertices[0]
        if len(exp) == 0:
            return ident, ident.new_zeros((0, *ident.shape))
        ex = flame(shape_coeffs=s.expand(len(exp), -1), exp_coeffs=torch.from_numpy(np.asarray(exp, np.float32)),
                   jaw_pose=torch.from_numpy(np.asarray(jaw, np.float32))).vertices
    return ident, ex


def export_run(samples: Path, formats: Sequence[str], cfg, log=print) -> int:
    """Export every image folder under ``samples`` (those with a ``samples.npz``); the count."""
    from ..config import resolve_path
    from ..flame import FLAME
    from ..uncertainty import select_far_apart

    flame = None
    done = 0
    for npz in sorted(Path(samples).rglob("samples.npz")):
        z = np.load(npz)
        shape = identity_coefficients(z)  # a group's mean identity, or the ranked hypothesis
        if flame is None or flame.n_exp != z["exp_coeffs"].shape[1] or flame.n_shape != len(shape):
            flame = FLAME(resolve_path(cfg.data_root, cfg.flame.model_path), None, n_shape=len(shape),
                          n_exp=z["exp_coeffs"].shape[1]).eval()
        if "chosen_index" in z:
            chosen = [int(k) for k in z["chosen_index"]]
        else:  # a run before the spread outputs: choose now
            _, allv = _decode(flame, shape, z["exp_coeffs"], z["jaw_pose"])
            chosen = select_far_apart(allv, cfg.chosen_expressions)
        ident, chosen_v = _decode(flame, shape, z["exp_coeffs"][chosen], z["jaw_pose"][chosen])
        export_image(npz.parent / "export", formats, shape_coeffs=shape, exp_coeffs=z["exp_coeffs"],
                     jaw_pose=z["jaw_pose"], chosen_index=chosen, identity_vertices=ident,
                     chosen_vertices=chosen_v, faces=flame.faces.cpu().numpy())
        done += 1
    log(f"exported {done} image folder(s) under {samples}: {', '.join(formats)}")
    return done


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m ofer.sample.export``: exports of a finished ``sample.py`` run."""
    from ..config import load_config
    from ..errors import OferError
    from .config import EXPORTS, SampleConfig

    ap = argparse.ArgumentParser(prog="python -m ofer.sample.export",
                                 description="Write FLAME-parameter, Blender and glTF exports of a sample.py run.")
    ap.add_argument("--samples", "-s", required=True, help="sample.py output folder")
    ap.add_argument("--formats", "-f", default=",".join(EXPORTS), help=f"comma list of {', '.join(EXPORTS)}")
    ap.add_argument("--config", "-c", default=None, help="the run's YAML config (for the FLAME model path)")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = ap.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in EXPORTS]
    if bad or not formats:
        print(f"error: --formats takes {', '.join(EXPORTS)}; got {args.formats!r}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(SampleConfig, args.config, list(args.overrides))
        n = export_run(Path(args.samples), formats, cfg)
    except OferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if n else 1


if __name__ == "__main__":
    sys.exit(main())
