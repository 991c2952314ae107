"""Reconstructing a folder of images (``sample.py``): resume, per-image outputs, summaries, sharding.

:func:`run` goes through named stages: :func:`plan` (which images, which are done),
:func:`prepare` (face detection / alignment, one image at a time, failures recorded),
:func:`reconstruct_batch` (the :class:`~ofer.sample.reconstructor.Reconstructor` on a batch),
:func:`write_image_outputs` (one folder per image, ``result.json`` last) and
:func:`write_summary` (``summary.json`` / ``summary.csv``, merged over ``torchrun`` processes).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..config import config_to_dict, load_config
from ..device import cleanup, dist_env, init_distributed
from ..errors import OferError
from ..io import atomic_write_bytes, write_json, write_landmarks, write_mesh, write_npz
from .config import SampleConfig
from .reconstructor import STAGES, ImageResult, Reconstructor, image_seed_index

__all__ = ["run", "main", "plan", "prepare", "reconstruct_batch", "write_image_outputs", "write_summary",
           "list_inputs", "RESULT_FILE"]

RESULT_FILE = "result.json"


# ----------------------------------------------------------------------------------------
# Writing one image's outputs
# ----------------------------------------------------------------------------------------
def write_image_outputs(out_dir: Path, res: ImageResult, faces: np.ndarray, cfg: SampleConfig,
                        crop: np.ndarray | None, meta: dict, face: Any = None) -> None:
    """Write one image's folder; ``result.json`` goes last, so its presence marks completion.

    ``face``: the :class:`~ofer.data.images.PreparedFace` (its file and keypoints go into the
    preview's first cell).
    """
    from .export import SPREADS, export_image, write_spread_meshes
    from .preview import spread_scale

    out_dir.mkdir(parents=True, exist_ok=True)
    ext = cfg.mesh_format
    write_mesh(out_dir / f"identity.{ext}", res.identity_vertices, faces, unit="mm")
    for k in range(res.expression_vertices.shape[0]):
        write_mesh(out_dir / "expressions" / f"expression_{k:03d}.{ext}", res.expression_vertices[k], faces, unit="mm")
    spreads = {}
    if res.identity_spread is not None:
        spreads = {"identity": res.identity_spread.numpy(), "identity_top_k": res.topk_spread.numpy(),
                   "expression": res.expression_spread.numpy()}
    extra = {SPREADS[n][0]: v.astype(np.float32) for n, v in spreads.items()}
    if res.chosen_index is not None:
        extra.update(chosen_index=np.asarray(res.chosen_index, np.int64), top_k=np.int64(res.top_k))
    write_npz(out_dir / "samples.npz", shape_coeffs=res.shape_coeffs.numpy().astype(np.float32),
              scores=res.scores.numpy(), ranked_index=np.int64(res.ranked_index),
              exp_coeffs=res.exp_coeffs.numpy().astype(np.float32), jaw_pose=res.jaw_pose.numpy().astype(np.float32),
              seed=np.int64(cfg.seed), image_index=np.int64(meta["image_index"]), **extra)
    write_landmarks(out_dir / "landmarks68.npy", res.landmarks68, unit="mm")
    write_landmarks(out_dir / "landmarks7.npy", res.landmarks7, unit="mm")
    meta = dict(meta)
    if spreads:
        scales = {n: spread_scale(v, cfg.uncertainty.scale_mm) for n, v in spreads.items()}
        unc = dict(res.uncertainty or {})
        unc["chosen_expressions"] = list(res.chosen_index or [])
        unc["color_scale_mm"] = scales
        if cfg.uncertainty.meshes:
            unc["meshes"] = {n: f"uncertainty/{f}" for n, f in write_spread_meshes(
                out_dir / "uncertainty", res.identity_vertices, faces, spreads, scales, ext).items()}
        meta["uncertainty"] = unc
    if cfg.export:
        meta["exports"] = [f"export/{f}" for f in export_image(
            out_dir / "export", cfg.export, shape_coeffs=res.shape_coeffs[res.ranked_index].numpy(),
            exp_coeffs=res.exp_coeffs.numpy(), jaw_pose=res.jaw_pose.numpy(), chosen_index=res.chosen_index or [],
            identity_vertices=res.identity_vertices, chosen_vertices=res.chosen_vertices, faces=faces)]
    if cfg.preview and crop is not None:
        _write_preview(out_dir / "preview.png", res, faces, crop, face, cfg, meta.get("image"))
    write_json(out_dir / RESULT_FILE, meta)


def _write_preview(path: Path, res: ImageResult, faces: np.ndarray, crop: np.ndarray, face: Any = None,
                   cfg: SampleConfig | None = None, title: str | None = None) -> None:
    """One row (:func:`ofer.sample.preview.method_preview`): input with its 5 points, face crop,
    ranked identity, identity spread, far-apart expressions, expression spread, colour scale."""
    from PIL import Image

    from .preview import method_preview

    image = kps = None
    if face is not None and getattr(face, "path", None) is not None:
        from ..data.images import read_image

        try:
            image, kps = read_image(face.path), face.kps
        except OferError:
            image = kps = None
    grid = method_preview(res, faces, crop, image, kps, scale_mm=cfg.uncertainty.scale_mm if cfg else None,
                          title=title)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------
# Stages of a folder run
# ----------------------------------------------------------------------------------------
def list_inputs(input_path: Path) -> tuple[Path, list[Path]]:
    """(root, sorted image files) for a folder (recursive) or a single file."""
    from ..data.images import iter_images

    if input_path.is_file():
        return input_path.parent, [input_path]
    if not input_path.is_dir():
        raise OferError(f"input not found: {input_path}")
    return input_path, sorted(iter_images(input_path))


def make_detector(cfg: SampleConfig):
    """(detector or None, a line saying which) for ``detector.*``."""
    mode = cfg.detector.mode
    if mode == "none" or cfg.aligned:
        return None, "no detector (sidecars or aligned crops)"
    from ..data.align import SCRFDDetector

    d = cfg.detector
    try:
        det = SCRFDDetector(model_dir=d.model_dir, name=d.name, det_size=(d.det_size, d.det_size),
                            det_thresh=d.det_thresh)
        return det, f"SCRFD ({d.name})"
    except OferError as exc:
        if mode == "scrfd":
            raise
        return None, f"no detector ({exc}); images need .kps.txt sidecars"


@dataclass
class Job:
    """One image of a run: its file, its name relative to the input root, its face once prepared."""

    path: Path
    rel: str  # relative path without suffix: the output folder
    name: str  # relative path with suffix: the summary's name
    face: Any = None
    seconds: float = 0.0


@dataclass
class RunState:
    """What a run (one process of it) has done so far."""

    records: list[dict] = field(default_factory=list)
    timer: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STAGES})

    def fail(self, job: Job, reason: str) -> None:
        self.records.append({"image": job.name, "status": "failed", "reason": reason})


def plan(input_path: Path, output: Path, rank: int = 0, world: int = 1) -> tuple[list[Job], list[dict]]:
    """This process's share of the images: (jobs to do, records of those done before)."""
    root, files = list_inputs(input_path)
    todo, done = [], []
    for j, f in enumerate(files):
        if j % world != rank:
            continue
        job = Job(f, f.relative_to(root).with_suffix("").as_posix(), str(f.relative_to(root)))
        if (output / job.rel / RESULT_FILE).is_file():
            done.append({"image": job.name, "status": "done-before"})
        else:
            todo.append(job)
    return todo, done


def prepare(job: Job, detector: Any, cfg: SampleConfig, state: RunState) -> bool:
    """Find and align ``job``'s face; False (and a failed record) when the image is unusable."""
    from ..data.images import prepare_face

    t0 = time.perf_counter()
    try:
        job.face = prepare_face(job.path, detector, aligned=cfg.aligned, use_sidecar=cfg.use_sidecar,
                                channel_order=cfg.channel_order)
    except OferError as exc:
        state.fail(job, str(exc))
        return False
    finally:
        job.seconds = time.perf_counter() - t0
        state.timer["prepare"] += job.seconds
    return True


def reconstruct_batch(batch: list[Job], rec: Reconstructor, cfg: SampleConfig, output: Path,
                      faces: np.ndarray, state: RunState) -> None:
    """Reconstruct ``batch`` and write each image's folder; a model failure fails the batch."""
    arc = torch.stack([torch.from_numpy(j.face.arcface) for j in batch])
    farl = torch.stack([torch.from_numpy(j.face.farl_crop).permute(2, 0, 1) for j in batch])
    idx = [image_seed_index(j.rel) for j in batch]
    t_batch = time.perf_counter()
    try:
        results = rec.reconstruct(arc, farl, idx, state.timer)
    except OferError as exc:
        for j in batch:
            state.fail(j, str(exc))
        return
    per_image = (time.perf_counter() - t_batch) / len(batch)
    for j, i, res in zip(batch, idx, results):
        t0 = time.perf_counter()
        meta = {"image": j.name, "status": "ok", "image_index": i, "ranked_index": res.ranked_index,
                "face_source": j.face.source, "notes": list(j.face.notes), "preset": cfg.preset,
                "seed": cfg.seed, "n_identities": cfg.n_identities, "n_expressions": cfg.n_expressions,
                "units": "mm"}
        write_image_outputs(output / j.rel, res, faces, cfg, j.face.farl_crop, meta, face=j.face)
        dt = time.perf_counter() - t0
        state.timer["writing"] += dt
        state.records.append({"image": j.name, "status": "ok", "ranked_index": res.ranked_index,
                              "seconds": round(per_image + dt + j.seconds, 4)})


def write_summary(output: Path, rank: int, world: int, cfg: SampleConfig, state: RunState,
                  wall: float, interrupted: bool) -> dict:
    """This process's part of the summary; on rank 0 the merged ``summary.json`` / ``.csv``."""
    part = {"rank": rank, "records": state.records, "stage_seconds": state.timer, "wall_seconds": wall,
            "ok": sum(r["status"] == "ok" for r in state.records), "interrupted": interrupted}
    write_json(output / f".summary.rank{rank}.json", part)
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return _merge_summaries(output, world, cfg) if rank == 0 else part


def _merge_summaries(output: Path, world: int, cfg: SampleConfig) -> dict:
    parts = []
    for r in range(world):
        p = output / f".summary.rank{r}.json"
        if p.is_file():
            parts.append(json.loads(p.read_text()))
    records = sorted((rec for p in parts for rec in p["records"]), key=lambda x: x["image"])
    stage = {s: sum(p["stage_seconds"].get(s, 0.0) for p in parts) for s in STAGES}
    n_ok = sum(r["status"] == "ok" for r in records)
    summary = {
        "images": len(records),
        "ok": n_ok,
        "failed": sum(r["status"] == "failed" for r in records),
        "done_before": sum(r["status"] == "done-before" for r in records),
        "processes": world,
        "wall_seconds": max((p["wall_seconds"] for p in parts), default=0.0),
        "stage_seconds": stage,
        "stage_seconds_per_image": {s: (v / n_ok if n_ok else None) for s, v in stage.items()},
        "config": config_to_dict(cfg),
        "records": records,
    }
    write_json(output / "summary.json", summary)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image", "status", "seconds", "ranked_index", "reason"])
    for r in records:
        w.writerow([r["image"], r["status"], r.get("seconds", ""), r.get("ranked_index", ""), r.get("reason", "")])
    atomic_write_bytes(output / "summary.csv", buf.getvalue().encode())
    return summary


# ----------------------------------------------------------------------------------------
# A folder run
# ----------------------------------------------------------------------------------------
def run(cfg: SampleConfig, input_path: str | os.PathLike, output: str | os.PathLike,
        reconstructor: Reconstructor | None = None, log: Callable[[str], Any] = print,
        device: Optional[torch.device] = None) -> dict:
    """Reconstruct every image under ``input_path`` into ``output``; returns the summary.

    Per image ``<output>/<relative path without suffix>/``: ``identity.<ext>`` (ranked,
    neutral, mm), ``expressions/expression_XXX.<ext>`` (mm), ``samples.npz`` (all sampled
    coefficients, ranker scores, ``ranked_index``, the per-vertex spreads in mm),
    ``uncertainty/`` (the ranked identity coloured by each spread), ``export/`` (the
    ``export`` formats), ``landmarks68.npy`` / ``landmarks7.npy`` (mm, NoW-ready),
    ``preview.png`` and ``result.json`` (written last, with the spread summary). Images whose
    ``result.json`` exists are skipped. Bad images are reported and skipped. Under
    ``torchrun`` images are sharded by rank; rank 0 merges the summaries.
    """
    from tqdm import tqdm

    input_path, output = Path(input_path), Path(output)
    rank, world, _ = dist_env()
    todo, done = plan(input_path, output, rank, world)
    output.mkdir(parents=True, exist_ok=True)
    state = RunState(records=done)
    rec = reconstructor
    if rec is None and todo:
        rec = Reconstructor.from_config(cfg, device)
    detector, det_msg = make_detector(cfg) if todo else (None, "")
    if rank == 0:
        log(f"{len(done) + len(todo)} images on this process, {len(todo)} to do ({world} process(es)); {det_msg}")
    faces = rec.flame_id.faces.cpu().numpy() if rec is not None else None
    bar = tqdm(total=len(todo), disable=not cfg.progress or rank != 0, unit="img")
    batch: list[Job] = []
    interrupted = False
    t_start = time.perf_counter()
    try:
        for job in todo:
            if prepare(job, detector, cfg, state):
                batch.append(job)
            else:
                bar.update(1)
            if len(batch) >= cfg.batch_size:
                reconstruct_batch(batch, rec, cfg, output, faces, state)
                bar.update(len(batch))
                batch = []
        if batch:
            reconstruct_batch(batch, rec, cfg, output, faces, state)
            bar.update(len(batch))
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: finished images are kept; re-run the same command to resume")
    finally:
        bar.close()
    summary = write_summary(output, rank, world, cfg, state, time.perf_counter() - t_start, interrupted)
    if interrupted:
        raise KeyboardInterrupt
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command line of ``sample.py`` (and ``python -m ofer.sample``)."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="sample.py",
        description="Reconstruct FLAME identities (IdGen + IdRank) and expressions (ExpGen) for images.")
    ap.add_argument("--input", "-i", required=True, help="image file or folder (searched recursively)")
    ap.add_argument("--output", "-o", required=True, help="output folder (re-running resumes)")
    ap.add_argument("--config", "-c", default=None, help="YAML config (e.g. configs/sample.yaml)")
    ap.add_argument("--seed", type=int, default=None, help="shorthand for seed=N")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = ap.parse_intermixed_args(argv)
    overrides = list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else [])
    rank = dist_env()[0]
    try:
        cfg = load_config(SampleConfig, args.config, overrides)
        dist = init_distributed(cfg.device, key="device")
        summary = run(cfg, args.input, args.output, device=dist.device)
        if rank == 0:
            per = summary["stage_seconds_per_image"]
            timing = ", ".join(f"{k} {v:.3f}s" for k, v in per.items() if v)
            print(f"{summary['ok']} reconstructed, {summary['failed']} failed, {summary['done_before']} done before; "
                  f"per image: {timing}; summary: {Path(args.output) / 'summary.json'}")
            for r in summary["records"]:
                if r["status"] == "failed":
                    print(f"  failed: {r['image']}: {r['reason']}")
        return 0 if summary.get("failed", 0) == 0 or summary.get("ok", 0) > 0 else 1
    except OferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        cleanup()
