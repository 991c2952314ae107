"""Synthetic stand-ins shared by the training tests: a tiny MICA/OFER-layout world on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_world(root: Path, name: str = "TOY_TRAIN", n_actors: int = 6, n_images: int = 3,
                layout: str = "mica", seed: int = 0, expression: bool = False) -> dict:
    """Write ``n_actors`` actors with ``n_images`` crops each; return {actor: params dict}."""
    rng = np.random.default_rng(seed)
    base = name.split("_TRAIN")[0].split("_VAL")[0]
    table, truth = {}, {}
    for a in range(n_actors):
        actor = f"A{a:02d}"
        rels = []
        for i in range(n_images):
            rel = f"{actor}/img{i}.jpg"
            img_path = root / base / "arcface_input" / rel
            img_path.parent.mkdir(parents=True, exist_ok=True)
            pix = rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
            Image.fromarray(pix).save(img_path, quality=95)
            blob = ((pix[::2, ::2].astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)
            np.save(img_path.with_suffix(".npy"), np.ascontiguousarray(blob))
            rels.append(rel)
        shape = rng.standard_normal(300).astype(np.float32)
        exp = rng.standard_normal(100).astype(np.float32)
        pose = rng.standard_normal(15).astype(np.float32) * 0.1
        if layout == "mica":
            prel = f"{actor}/{actor}.npz"
            ppath = root / base / "FLAME_parameters" / prel
            ppath.parent.mkdir(parents=True, exist_ok=True)
            np.savez(ppath, betas=np.concatenate([shape, exp]), pose=pose)
            table[actor] = (rels, prel)
            truth[actor] = dict(shape=shape, exp=exp, jaw=pose[6:9])
        else:
            prel = f"{actor}/fit.npz"
            ppath = root / base / "FLAME23_parameters" / prel
            ppath.parent.mkdir(parents=True, exist_ok=True)
            np.savez(ppath, shape=shape, exp=exp[:50], pose=pose)
            table[actor] = [prel, rels]
            truth[actor] = dict(shape=shape, exp=exp[:50], jaw=pose[3:6])
    lst = root / "image_paths" / ("arcface23" if layout == "ofer23" else "") / f"{name}.npy"
    lst.parent.mkdir(parents=True, exist_ok=True)
    np.save(lst, table, allow_pickle=True)
    return truth
