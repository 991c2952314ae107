"""Reconstructing a folder of images (``sample.py``): resume, per-image outputs, summaries, sharding.

Run semantics: every image ends ``ok``, ``failed`` (with a one-line reason) or ``done-before``,
and files the runner cannot use are listed as ``skipped``; one image never stops the others
(a model error fails its batch, which is then retried image by image); results with NaN or
inf are ``failed``; ``summary.json`` / ``summary.csv`` are written at the end of every run,
also an interrupted one. An output folder records the settings that change results
(``run.json``): resuming into it with other settings is refused unless ``overwrite=true``.
Exit status of :func:`main`: 0 all done, 1 some images failed, 2 usage or configuration error,
130 interrupted.

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
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..config import config_to_dict, load_config
from ..device import cleanup, dist_env, init_distributed
from ..data.images import iter_images, prepare_faces
from ..errors import ConfigError, OferError
from ..io import atomic_write_bytes, remove_stale_temps, write_json, write_landmarks, write_mesh, write_npz
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
    shape = res.shape_coeffs[res.ranked_index] if res.identity_shape is None else res.identity_shape
    if res.identity_shape is not None:  # a mean of several hypotheses (group.select=top_mean)
        extra.update(identity_shape=res.identity_shape.numpy().astype(np.float32),
                     ranked_top=np.asarray(res.ranked_top, np.int64))
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
            out_dir / "export", cfg.export, shape_coeffs=shape.numpy(),
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
def list_inputs(input_path: Path, exclude: Optional[Path] = None) -> tuple[Path, list[Path], list[dict]]:
    """``(root, sorted image files, skipped records)`` for a folder (recursive) or one file.

    ``exclude`` (the output folder, when it lies inside the input) is not searched. Files of an
    unsupported image format and folders that cannot be read come back as ``skipped`` records
    (:func:`ofer.data.images.iter_images`).
    """
    if input_path.is_file():
        return input_path.parent, [input_path], []
    if not input_path.is_dir():
        raise OferError(f"input not found: {input_path}")
    found: list[tuple[Path, str]] = []
    files = sorted(iter_images(input_path, exclude, skipped=found))
    skipped = [{"image": p.relative_to(input_path).as_posix() + ("/" if p.is_dir() else ""),
                "status": "skipped", "reason": why} for p, why in found]
    return input_path, files, skipped


def make_detector(cfg: SampleConfig):
    """(detector or None, a line saying which) for ``detector.*`` (:func:`ofer.data.detect.build_detector`).

    The released models were trained on SCRFD keypoints: under the faithful preset the line
    says so when another detector is used.
    """
    if cfg.detector.mode == "none" or cfg.aligned:
        return None, "no detector (sidecars or aligned crops)"
    from ..data.detect import build_detector

    d = cfg.detector
    det, msg = build_detector(d.mode, scrfd_dir=d.model_dir, scrfd_name=d.name, det_size=d.det_size,
                              det_thresh=d.det_thresh, blazeface_dir=d.blazeface_dir)
    if cfg.preset == "faithful" and det is not None and getattr(det, "name", "") != "scrfd":
        msg += ("; the faithful preset prefers SCRFD (the released models were trained on its keypoints): "
                "install the 'detect' extra and the antelopev2 pack")
    return det, msg


@dataclass
class Job:
    """One image of a run: its file, its name relative to the input root, its face once prepared."""

    path: Path
    rel: str  # relative path without suffix: the output folder
    name: str  # relative path with suffix: the summary's name
    face: Any = None
    seconds: float = 0.0
    last: bool = True  # the image's last job (``detector.faces=all`` makes one job per face)


@dataclass
class RunState:
    """What a run (one process of it) has done so far."""

    records: list[dict] = field(default_factory=list)
    timer: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STAGES})
    released: Any = None  # the released noise stream (``noise: released``)

    def fail(self, job: Job, reason: str) -> None:
        self.records.append({"image": job.name, "status": "failed", "reason": reason})


def plan(input_path: Path, output: Path, rank: int = 0, world: int = 1, redo: bool = False,
         every_face: bool = False) -> tuple[list[Job], list[dict]]:
    """This process's share of the images: (jobs to do, records of those done before or skipped).

    An image's output folder is its path relative to the input without the suffix; images that
    would share one (``face.jpg`` and ``face.png``) keep their suffix instead (``face.jpg/``),
    so each has its own folder and its own noise. ``redo`` ignores finished images. With
    ``every_face`` the faces are known only after detection: :func:`prepare` skips those done
    before.
    """
    exclude = output if output.resolve().is_relative_to(input_path.resolve()) and input_path.is_dir() else None
    root, files, skipped = list_inputs(input_path, exclude)
    rels = [f.relative_to(root).with_suffix("").as_posix() for f in files]
    taken = {r for r in rels if rels.count(r) > 1}
    todo, done = [], [r for j, r in enumerate(skipped) if j % world == rank]
    for j, (f, rel) in enumerate(zip(files, rels)):
        if j % world != rank:
            continue
        job = Job(f, f.relative_to(root).as_posix() if rel in taken else rel, str(f.relative_to(root)))
        if not redo and not every_face and (output / job.rel / RESULT_FILE).is_file():
            done.append({"image": job.name, "status": "done-before"})
        else:
            todo.append(job)
    return todo, done


def prepare(job: Job, detector: Any, cfg: SampleConfig, state: RunState, output: Path | None = None) -> list[Job]:
    """Find and align ``job``'s face: the jobs to reconstruct, empty (and a failed record) when
    the image is unusable. With ``detector.faces=all`` one job per face, output
    ``<image>_face<k>`` (numbered from the left); faces whose ``result.json`` is in ``output``
    are recorded as done before."""
    which = cfg.detector.faces
    t0 = time.perf_counter()
    try:
        faces = prepare_faces(job.path, detector, aligned=cfg.aligned, use_sidecar=cfg.use_sidecar, which=which,
                              channel_order=cfg.channel_order, min_relative_size=cfg.detector.min_relative_size,
                              max_kps_residual=cfg.max_kps_residual, **cfg.crop_options())
    except OferError as exc:
        state.fail(job, str(exc))
        return []
    except Exception as exc:  # an unforeseen fault of one image must not stop the others
        state.fail(job, error_line(exc))
        return []
    finally:
        job.seconds = time.perf_counter() - t0
        state.timer["prepare"] += job.seconds
    if which != "all":
        job.face = faces[0]
        return [job]
    jobs = []
    for f in faces:
        fj = Job(job.path, f"{job.rel}_face{f.face_index}", f"{job.name}#face{f.face_index}", face=f,
                 seconds=job.seconds / len(faces), last=False)
        if output is not None and (output / fj.rel / RESULT_FILE).is_file():
            state.records.append({"image": fj.name, "status": "done-before"})
        else:
            jobs.append(fj)
    if jobs:
        jobs[-1].last = True
    return jobs


def error_line(exc: BaseException) -> str:
    """``"<Type>: <first line>"`` of an unforeseen exception, for a record's reason."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def finite_result(res: ImageResult) -> bool:
    """Whether everything sampled for an image is finite (else it is ``failed``, never ``ok``)."""
    return all(bool(torch.isfinite(t).all()) for t in (res.shape_coeffs, res.scores, res.identity_vertices,
                                                       res.exp_coeffs, res.jaw_pose, res.expression_vertices))


def reconstruct_batch(batch: list[Job], rec: Reconstructor, cfg: SampleConfig, output: Path,
                      faces: np.ndarray, state: RunState) -> None:
    """Reconstruct ``batch`` and write each image's folder.

    A model error (out of memory, say) fails the batch, which is then retried image by image,
    so that it fails only the images it belongs to. Results with NaN or inf are ``failed``, as
    is an image whose files cannot be written (a full disk, say).
    """
    arc = torch.stack([torch.from_numpy(j.face.arcface) for j in batch])
    farl = torch.stack([torch.from_numpy(j.face.farl_crop).permute(2, 0, 1) for j in batch])
    idx = [image_seed_index(j.rel) for j in batch]
    t_batch = time.perf_counter()
    try:
        given = {} if state.released is None else {"noise": state.released.for_images([j.rel for j in batch])}
        results = rec.reconstruct(arc, farl, idx, state.timer, **given)
    except (OferError, RuntimeError) as exc:
        if len(batch) > 1:
            for j in batch:
                reconstruct_batch([j], rec, cfg, output, faces, state)
        else:
            state.fail(batch[0], error_line(exc) if isinstance(exc, RuntimeError) else str(exc))
        return
    per_image = (time.perf_counter() - t_batch) / len(batch)
    samplers = {w: list(cfg.sampler(w)) for w in ("idgen", "expgen")}
    for j, i, res in zip(batch, idx, results):
        if not finite_result(res):
            state.fail(j, "the reconstruction holds NaN or inf values (check the checkpoints)")
            continue
        t0 = time.perf_counter()
        meta = {"image": j.name, "status": "ok", "image_index": i, "ranked_index": res.ranked_index,
                "face_source": j.face.source, "detector": j.face.detector, "n_faces": j.face.n_faces,
                "kps": np.round(j.face.kps.astype(np.float64), 2).tolist(), "notes": list(j.face.notes),
                "preset": "custom" if cfg.samplers_overridden else cfg.preset, "samplers": samplers,
                "seed": cfg.seed, "n_identities": cfg.n_identities, "n_expressions": cfg.n_expressions,
                "units": "mm"}
        try:
            write_image_outputs(output / j.rel, res, faces, cfg, j.face.farl_crop, meta, face=j.face)
        except OSError as exc:
            # an unfinished folder is worth nothing (no result.json): free its space
            shutil.rmtree(output / j.rel, ignore_errors=True)
            state.fail(j, f"cannot write its outputs: {exc.strerror or error_line(exc)}")
            continue
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
        "skipped": sum(r["status"] == "skipped" for r in records),
        "interrupted": any(p.get("interrupted") for p in parts),
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
    atomic_write_bytes(output / "summary.csv", buf.getvalue().encode("utf-8", "backslashreplace"))
    return summary


# ----------------------------------------------------------------------------------------
# A folder run
# ----------------------------------------------------------------------------------------
RUN_FILE = "run.json"


def _file_id(path: Optional[Path]) -> Optional[str]:
    if path is None:
        return None
    try:
        return f"{path.resolve()} ({path.stat().st_size} bytes)"
    except OSError:
        return str(path)


def settings_of(cfg: SampleConfig) -> dict:
    """What changes an image's results: the run's fingerprint (kept in ``run.json``)."""
    from ..config import resolve_path

    ck = cfg.checkpoints
    root = cfg.data_root
    return {
        "seed": cfg.seed, "n_identities": cfg.n_identities, "n_expressions": cfg.n_expressions,
        "save_expressions": cfg.save_expressions, "samplers": {w: list(cfg.sampler(w)) for w in ("idgen", "expgen")},
        "jaw_scale": cfg.jaw_scale, "ranker_batch1_quirk": cfg.batch1_quirk, "channel_order": cfg.channel_order,
        "noise": cfg.noise, "qkv": [cfg.qkv, cfg.official_qkv], "aligned": cfg.aligned,
        "use_sidecar": cfg.use_sidecar, "mesh_format": cfg.mesh_format,
        "chosen_expressions": cfg.chosen_expressions, "export": list(cfg.export),
        "uncertainty": {"top_k": cfg.uncertainty.top_k, "meshes": cfg.uncertainty.meshes,
                        "scale_mm": cfg.uncertainty.scale_mm,
                        "masks": _file_id(resolve_path(root, cfg.uncertainty.masks_path))},
        "detector": config_to_dict(cfg.detector), "crops": cfg.crop_options(),
        "group": config_to_dict(cfg.group), "video": config_to_dict(cfg.video),
        "checkpoints": {k: _file_id(resolve_path(root, getattr(ck, k)))
                        for k in ("idgen", "expgen", "idrank", "ranker_vertex_indices")},
        "flame": {k: _file_id(resolve_path(root, getattr(cfg.flame, k)))
                  for k in ("model_path", "landmark_embedding_path")},
    }


def claim_output(output: Path, cfg: SampleConfig, rank: int) -> None:
    """Create ``output`` and make sure it may receive this run's results.

    Raises:
        OferError: the folder cannot be created or written (one line), or it holds results
            made with other settings and ``overwrite`` is off.
    """
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OferError(f"cannot create the output folder {output}: {exc.strerror or exc}") from exc
    settings = settings_of(cfg)
    old = output / RUN_FILE
    if old.is_file() and not cfg.overwrite:
        try:
            before = json.loads(old.read_text(encoding="utf-8")).get("settings", {})
        except (OSError, ValueError):
            before = {}
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            raise ConfigError(f"the output folder {output} holds results made with other settings "
                              f"({', '.join(changed)}); choose another folder, or redo every image with "
                              "overwrite=true")
    if rank == 0:
        remove_stale_temps(output, recursive=True)  # left by a run killed while writing
        try:
            write_json(old, {"settings": settings})
        except OSError as exc:
            raise OferError(f"cannot write to the output folder {output}: {exc.strerror or exc}") from exc


def run(cfg: SampleConfig, input_path: str | os.PathLike, output: str | os.PathLike,
        reconstructor: Reconstructor | None = None, log: Callable[[str], Any] = print,
        device: Optional[torch.device] = None, detector: Any = None) -> dict:
    """Reconstruct every image under ``input_path`` into ``output``; returns the summary.

    Per image ``<output>/<relative path without suffix>/``: ``identity.<ext>`` (ranked,
    neutral, mm), ``expressions/expression_XXX.<ext>`` (mm), ``samples.npz`` (all sampled
    coefficients, ranker scores, ``ranked_index``, the per-vertex spreads in mm),
    ``uncertainty/`` (the ranked identity coloured by each spread), ``export/`` (the
    ``export`` formats), ``landmarks68.npy`` / ``landmarks7.npy`` (mm, NoW-ready),
    ``preview.png`` and ``result.json`` (written last, with the spread summary). Images whose
    ``result.json`` exists are skipped (unless ``overwrite``). Bad images are reported and
    skipped. Under ``torchrun`` images are sharded by rank; rank 0 merges the summaries.
    ``detector``: a detector object to use instead of the one ``detector.*`` names.
    """
    from tqdm import tqdm

    input_path, output = Path(input_path), Path(output)
    rank, world, _ = dist_env()
    claim_output(output, cfg, rank)
    grouped = cfg.group.by != "none"
    todo, done = plan(input_path, output, rank, world, redo=cfg.overwrite or grouped,
                      every_face=cfg.detector.faces == "all" and not grouped)
    state = RunState(records=done)
    rec = reconstructor
    if rec is None and todo:
        rec = Reconstructor.from_config(cfg, device)
        if rank == 0:
            for line in rec.model_lines():
                log(line)
    if cfg.noise == "released" and rec is not None:
        if world > 1:
            raise ConfigError("noise=released follows one image list: run it in one process")
        from .released_noise import ReleasedNoise

        state.released = ReleasedNoise(cfg.n_identities, rec.idgen.head.param_dim, cfg.n_expressions,
                                       rec.expgen.head.param_dim, *(cfg.sampler(w)[0] for w in ("idgen", "expgen")))
    det_msg = "the given detector"
    if detector is None:
        detector, det_msg = make_detector(cfg) if todo else (None, "")
    if rank == 0:
        log(f"{len(done) + len(todo)} images on this process, {len(todo)} to do ({world} process(es)); {det_msg}")
    faces = rec.flame_id.faces.cpu().numpy() if rec is not None else None
    bar = tqdm(total=len(todo), disable=not cfg.progress or rank != 0, unit="img")
    batch: list[Job] = []
    interrupted = False
    t_start = time.perf_counter()
    try:
        if grouped:  # photo sets: one identity per group (ofer.sample.groups)
            from .groups import run_groups

            run_groups(todo, rec, detector, cfg, output, faces, state, bar)
            todo = []
        for job in todo:
            ready = prepare(job, detector, cfg, state, None if cfg.overwrite else output)
            batch += ready
            if not ready:
                bar.update(1)
            while len(batch) >= cfg.batch_size:
                reconstruct_batch(batch[:cfg.batch_size], rec, cfg, output, faces, state)
                bar.update(sum(j.last for j in batch[:cfg.batch_size]))
                batch = batch[cfg.batch_size:]
        if batch:
            reconstruct_batch(batch, rec, cfg, output, faces, state)
            bar.update(sum(j.last for j in batch))
            batch = []
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: finished images are kept; re-run the same command to resume")
    finally:
        bar.close()
        for job in batch:  # prepared but not reached
            state.fail(job, "not reconstructed: the run stopped before its batch")
        # the summary is written whatever happened above
        try:
            summary = write_summary(output, rank, world, cfg, state, time.perf_counter() - t_start, interrupted)
        except OSError as exc:
            for r in state.records:
                log(f"{r['image']}: {r['status']}" + (f" ({r['reason']})" if "reason" in r else ""))
            raise OferError(f"cannot write the run summary in {output}: {exc.strerror or exc} "
                            "(the images' statuses are listed above)") from exc
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
    ap.add_argument("--group-by", default=None, metavar="{none,folder,prefix,list}",
                    help="images of one group share one identity (shorthand for group.by=...)")
    ap.add_argument("--group-list", default=None, metavar="FILE",
                    help="'image,group' lines (implies --group-by list)")
    ap.add_argument("--video", action="store_true",
                    help="the input folder holds the frames of one clip (a clip file is recognised by its suffix)")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = ap.parse_intermixed_args(argv)
    overrides = list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else [])
    if args.group_list is not None:
        overrides += ["group.by=list", f"group.list={args.group_list}"]
    if args.group_by is not None:
        overrides.append(f"group.by={args.group_by}")
    rank = dist_env()[0]
    try:
        cfg = load_config(SampleConfig, args.config, overrides)
        dist = init_distributed(cfg.device, key="device")
        from .video import is_video, run_video

        if args.video or is_video(args.input):  # one clip: ofer.sample.video
            info = run_video(cfg, args.input, args.output, device=dist.device)
            print(f"{info['frames']} frames, {len(info['filled_frames'])} filled, "
                  f"{info['frames_per_second']:.2f} frames/s; {Path(args.output) / 'video.json'}")
            return 0
        summary = run(cfg, args.input, args.output, device=dist.device)
        if rank == 0:
            per = summary["stage_seconds_per_image"]
            timing = ", ".join(f"{k} {v:.3f}s" for k, v in per.items() if v)
            print(f"{summary['ok']} reconstructed, {summary['failed']} failed, {summary['done_before']} done before; "
                  f"per image: {timing}; summary: {Path(args.output) / 'summary.json'}")
            for r in summary["records"]:
                if r["status"] == "failed":
                    print(f"  failed: {r['image']}: {r['reason']}")
        return 0 if summary.get("failed", 0) == 0 else 1
    except OferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        cleanup()
