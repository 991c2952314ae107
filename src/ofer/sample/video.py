"""A clip (or a folder of frames) -> one identity and a temporally coherent expression per frame.

Frames are decoded with PyAV (the ``video`` extra), keypoints found per frame by the detector,
frames without a face filled from their neighbours (:func:`fill_gaps`, reported), and the
keypoints smoothed over time (:func:`smooth_keypoints`). The identity comes from a few frames
spread over the clip, scored as a photo set (:func:`ofer.sample.groups.reconstruct_group`);
ExpGen then draws M expressions per frame on that identity, batched over frames, and one
hypothesis per frame is chosen by dynamic programming (:func:`dp_path`) over

    cost(path) = data_weight * sum_t d_t(m_t) + smooth_weight * sum_t s_t(m_{t-1}, m_t)

with ``d_t(m)`` the RMS vertex distance (mm) of hypothesis m to the frame's mean expression and
``s_t(a, b)`` the RMS vertex distance (mm) between consecutive frames' hypotheses.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import OferError
from .config import SampleConfig

__all__ = ["VIDEO_EXTENSIONS", "is_video", "read_frames", "fill_gaps", "smooth_keypoints", "dp_path",
           "rms_distances", "choose_expressions", "jitter_mm", "in_plane_pose", "clip_global_pose", "run_video"]

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


def is_video(path: str | Path) -> bool:
    return Path(path).is_file() and Path(path).suffix.lower() in VIDEO_EXTENSIONS


def read_frames(path: str | Path, frame_step: int = 1, max_frames: int | None = None
                ) -> tuple[list[np.ndarray], float, list[str]]:
    """``(frames (H, W, 3) uint8 RGB, frames per second, frame names)`` of a clip or of a
    folder of images (sorted by name; 25 fps assumed), every ``frame_step``-th frame."""
    path = Path(path)
    frames: list[np.ndarray] = []
    names: list[str] = []
    if path.is_dir():
        from ..data.images import IMAGE_EXTENSIONS, read_image

        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        for k, f in enumerate(files[::frame_step]):
            if max_frames is not None and k >= max_frames:
                break
            frames.append(read_image(f))
            names.append(f.name)
        fps = 25.0 / frame_step
    else:
        try:
            import av
        except ImportError as exc:
            raise OferError("reading a clip needs PyAV: pip install 'ofer[video]'") from exc
        try:
            with av.open(str(path)) as box:
                stream = box.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate or 25
                fps = float(rate) / frame_step
                for t, frame in enumerate(box.decode(stream)):
                    if t % frame_step:
                        continue
                    if max_frames is not None and len(frames) >= max_frames:
                        break
                    frames.append(frame.to_ndarray(format="rgb24"))
                    names.append(f"frame_{t:06d}")
        except (av.FFmpegError, IndexError, OSError) as exc:
            raise OferError(f"cannot decode the clip {path}: {exc}") from exc
    if not frames:
        raise OferError(f"no frames in {path}")
    return frames, fps, names


def fill_gaps(kps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(F, ...)`` keypoints with NaN rows for frames without a face -> (filled, which were
    filled): linear interpolation between the nearest frames with a face on either side, the
    nearest one at the ends."""
    kps = np.asarray(kps, dtype=np.float64)
    flat = kps.reshape(len(kps), -1)
    missing = ~np.isfinite(flat).all(axis=1)
    if missing.all():
        raise OferError("no face found in any frame")
    t = np.arange(len(kps))
    good = ~missing
    out = flat.copy()
    for c in range(flat.shape[1]):
        out[missing, c] = np.interp(t[missing], t[good], flat[good, c])
    return out.reshape(kps.shape), missing


def smooth_keypoints(kps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of ``(F, ...)`` keypoints over time (``sigma`` in frames; the kernel,
    cut at 3 sigma, renormalised at the ends so a still face stays put)."""
    kps = np.asarray(kps, dtype=np.float64)
    if sigma <= 0 or len(kps) < 2:
        return kps.copy()
    r = max(1, int(math.ceil(3 * sigma)))
    w = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    flat = kps.reshape(len(kps), -1)
    out = np.empty_like(flat)
    F = len(kps)
    for t in range(F):
        lo, hi = max(0, t - r), min(F, t + r + 1)
        ww = w[lo - t + r:hi - t + r]
        out[t] = (ww[:, None] * flat[lo:hi]).sum(0) / ww.sum()
    return out.reshape(kps.shape)


def dp_path(data: np.ndarray, trans: Sequence[np.ndarray], data_weight: float = 1.0,
            smooth_weight: float = 1.0) -> tuple[np.ndarray, float]:
    """The path ``m_0..m_{F-1}`` minimising ``data_weight * sum_t data[t, m_t] + smooth_weight *
    sum_t trans[t-1][m_{t-1}, m_t]`` (Viterbi): ``(path (F,), its cost)``.

    ``data``: (F, M); ``trans``: F - 1 arrays (M, M), row: the previous frame's hypothesis.
    """
    data = np.asarray(data, dtype=np.float64)
    F = data.shape[0]
    if len(trans) != F - 1:
        raise ValueError(f"expected {F - 1} transition matrices, got {len(trans)}")
    cost = data_weight * data[0]
    back = []
    for t in range(1, F):
        tot = cost[:, None] + smooth_weight * np.asarray(trans[t - 1], dtype=np.float64)
        arg = tot.argmin(axis=0)
        back.append(arg)
        cost = tot[arg, np.arange(tot.shape[1])] + data_weight * data[t]
    path = np.empty(F, dtype=np.int64)
    path[-1] = int(cost.argmin())
    for t in range(F - 1, 0, -1):
        path[t - 1] = back[t - 1][path[t]]
    return path, float(cost.min())


def rms_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """RMS vertex distance (mm) between every mesh of ``a`` (A, V, 3) and of ``b`` (B, V, 3),
    metres in -> (A, B)."""
    V = a.shape[1]
    d = torch.cdist(a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double())
    return d / math.sqrt(V) * 1000.0


def choose_expressions(verts: Sequence[torch.Tensor], choice: str = "dp", data_weight: float = 1.0,
                       smooth_weight: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Per frame ``(M, V, 3)`` expression meshes -> ``(chosen index per frame (F,), data costs (F, M))``.

    ``dp``: :func:`dp_path`; ``independent``: each frame's lowest data cost; ``mean``: -1 (the
    frame's mean expression).
    """
    data = np.stack([rms_distances(v, v.mean(0, keepdim=True))[:, 0].numpy() for v in verts])
    if choice == "mean":
        return np.full(len(verts), -1, np.int64), data
    if choice == "independent" or len(verts) == 1:
        return data.argmin(axis=1), data
    if choice != "dp":
        raise OferError(f"config key 'video.choice' must be dp, independent or mean, got {choice!r}")
    trans = [rms_distances(verts[t - 1], verts[t]).numpy() for t in range(1, len(verts))]
    return dp_path(data, trans, data_weight, smooth_weight)[0], data


def jitter_mm(verts: torch.Tensor | np.ndarray) -> float:
    """Mean frame-to-frame vertex acceleration ``|v_{t+1} - 2 v_t + v_{t-1}|`` (mm) of a
    ``(F, V, 3)`` sequence in metres (0 for fewer than 3 frames)."""
    v = torch.as_tensor(verts, dtype=torch.float64)
    if v.shape[0] < 3:
        return 0.0
    acc = v[2:] - 2 * v[1:-1] + v[:-2]
    return float(acc.norm(dim=-1).mean() * 1000.0)


def in_plane_pose(kps: np.ndarray) -> np.ndarray:
    """``(F, 5, 2)`` keypoints (left eye, right eye, nose, mouth corners) -> ``(F, 3)`` axis-angle
    global pose holding the in-plane rotation of the eye line only (about the camera axis;
    yaw and pitch are not estimated: zero)."""
    d = kps[:, 1] - kps[:, 0]
    roll = np.arctan2(d[:, 1], d[:, 0])  # image y points down
    out = np.zeros((len(kps), 3))
    out[:, 2] = -roll
    return out


def clip_global_pose(flame: Any, vertices: torch.Tensor, kps: np.ndarray, sigma: float,
                     log: Callable[[str], Any] = print) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Each frame's head pose from its (smoothed) keypoints and its reconstructed mesh ``(F, V, 3)``
    (canonical pose, metres): ``(global_pose (F, 3) axis-angle, camera (F, 3) = (s, t_x, t_y),
    method)`` by a scaled-orthographic fit to the mesh's five keypoint landmarks
    (:func:`ofer.sample.head_pose.estimate_clip_pose`, smoothed with ``sigma`` frames). Without a
    landmark embedding on ``flame`` (or no frame with usable keypoints): :func:`in_plane_pose`
    and no camera, logged."""
    from ..data.align import kps_from_landmarks68
    from .head_pose import estimate_clip_pose

    template = flame.v_template
    lmk = (flame.landmarks68_of(vertices.to(template.device, template.dtype))
           if getattr(flame, "has_landmarks", False) else None)
    inplane = in_plane_pose(kps)
    if lmk is None:
        log("no landmark embedding: global_pose holds the in-plane rotation only")
        return inplane, None, "in-plane"
    model = kps_from_landmarks68(lmk.double().cpu().numpy())
    if not np.isfinite(model).all():
        log("the meshes hold NaN or inf: global_pose holds the in-plane rotation only")
        return inplane, None, "in-plane"
    try:
        pose, cam, failed = estimate_clip_pose(model, kps, sigma, smooth_keypoints, starts=inplane)
    except (OferError, np.linalg.LinAlgError) as exc:
        log(f"pose fit failed ({exc}): global_pose holds the in-plane rotation only")
        return inplane, None, "in-plane"
    if failed.any():
        log(f"pose fit: degenerate keypoints in {int(failed.sum())} frame(s): their neighbours' pose used")
    return pose, cam, "scaled-orthographic"


# ----------------------------------------------------------------------------------------
# The clip run
# ----------------------------------------------------------------------------------------
def _detect_all(frames: list[np.ndarray], detector: Any, cfg: SampleConfig,
                sidecars: Sequence[Path | None] = ()) -> tuple[np.ndarray, int]:
    """(F, 5, 2) keypoints, NaN where no face was found; a frame's sidecar (``use_sidecar``)
    wins over the detector. Also how many came from sidecars."""
    from ..data.images import prepare_faces_array, read_sidecar_kps

    kps = np.full((len(frames), 5, 2), np.nan)
    n_side = 0
    for t, fr in enumerate(frames):
        side = sidecars[t] if t < len(sidecars) else None
        if side is not None:
            try:
                k = read_sidecar_kps(side)
            except OferError:
                k = None
            if k is not None:
                kps[t] = k
                n_side += 1
                continue
        if detector is None:
            continue
        try:
            face = prepare_faces_array(fr, detector, which=cfg.detector.faces if cfg.detector.faces != "all"
                                       else "center", channel_order=cfg.channel_order,
                                       min_relative_size=cfg.detector.min_relative_size,
                                       max_kps_residual=cfg.max_kps_residual, name=f"frame {t}")[0]
            kps[t] = face.kps
        except OferError:
            pass
    return kps, n_side


def _expressions(rec, shape: torch.Tensor, cond: torch.Tensor, idx: list[int],
                 timer: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ExpGen's M hypotheses of a batch of frames (ExpGen conditions ``cond``) on ``shape``:
    (exp (B, M, n_exp), jaw (B, M, 3), meshes (B, M, V, 3))."""
    cfg = rec.cfg
    t0 = time.perf_counter()
    method, steps = cfg.sampler("expgen")
    M = cfg.n_expressions
    x = rec.expgen.head.sample(cond.to(rec.device), M, method=method, steps=steps, seed=cfg.seed + 1,
                               image_indices=idx)
    exp_c, jaw = rec.expgen.head.split(x)
    timer["expgen"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    B = cond.shape[0]
    verts = rec.expression_vertices(shape, exp_c.reshape(B * M, -1), jaw.reshape(B * M, 3)).reshape(B, M, -1, 3)
    timer["flame"] += time.perf_counter() - t0
    return exp_c.cpu(), jaw.cpu(), verts.cpu()


def frame_index(name: str, t: int) -> int:
    from .reconstructor import image_seed_index

    return image_seed_index(f"{name}#{t}")


@torch.inference_mode()
def reconstruct_clip(rec, frames: list[np.ndarray], kps: np.ndarray, cfg: SampleConfig, name: str = "clip",
                     timer: dict | None = None, keep_hypotheses: bool = False) -> dict:
    """The clip's identity and per-frame expressions from its frames and (filled, smoothed)
    keypoints: a dict of numpy arrays and the chosen path (see :func:`run_video`);
    ``keep_hypotheses``: also every frame's M expression meshes (``hypothesis_vertices``)."""
    from ..data.images import prepare_faces_array
    from .groups import reconstruct_group

    timer = timer if timer is not None else {}
    for k in ("prepare", "encoders", "idgen", "flame", "idrank", "expgen"):
        timer.setdefault(k, 0.0)
    F = len(frames)
    t0 = time.perf_counter()
    faces = [prepare_faces_array(fr, None, kps=k, which="center", channel_order=cfg.channel_order,
                                 max_kps_residual=None, name=f"frame {t}")[0]
             for t, (fr, k) in enumerate(zip(frames, kps))]
    timer["prepare"] += time.perf_counter() - t0
    arc = torch.stack([torch.from_numpy(f.arcface) for f in faces])
    farl = torch.stack([torch.from_numpy(f.farl_crop).permute(2, 0, 1) for f in faces])
    idx = [frame_index(name, t) for t in range(F)]
    n_id = min(cfg.video.identity_frames, F)
    rows = sorted({int(round(x)) for x in np.linspace(0, F - 1, n_id)})
    # every frame is encoded once, in batches; the identity frames' conditions are reused
    parts = [rec.encode(arc[b:b + cfg.batch_size].to(rec.device), farl[b:b + cfg.batch_size].to(rec.device), timer)
             for b in range(0, F, cfg.batch_size)]
    conds = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    sel = torch.as_tensor(rows, device=conds["idgen"].device)
    gr = reconstruct_group(rec, arc[rows], farl[rows], [idx[r] for r in rows], per_image=cfg.group.per_image,
                           rule=cfg.group.aggregate, select=cfg.group.select, top_k=cfg.group.top_k,
                           expressions=False, timer=timer,
                           conds={k: v[sel] for k, v in conds.items()})
    shape = gr.identity_shape
    exps, jaws, verts = [], [], []
    for b in range(0, F, cfg.batch_size):
        s = slice(b, b + cfg.batch_size)
        e, j, v = _expressions(rec, shape, conds["expgen"][s], idx[s], timer)
        exps.append(e)
        jaws.append(j)
        verts += list(v)
    exp_c, jaw = torch.cat(exps), torch.cat(jaws)  # (F, M, n_exp), (F, M, 3)
    v = cfg.video
    path, data = choose_expressions(verts, v.choice, v.data_weight, v.smooth_weight)
    if v.choice == "mean":
        exp_f, jaw_f = exp_c.mean(1), jaw.mean(1)
        chosen_verts = torch.stack([x.mean(0) for x in verts])
    else:
        ar = torch.arange(F)
        exp_f, jaw_f = exp_c[ar, torch.as_tensor(path)], jaw[ar, torch.as_tensor(path)]
        chosen_verts = torch.stack([verts[t][path[t]] for t in range(F)])
    return {"shape": shape.numpy(), "exp": exp_f.numpy(), "jaw": jaw_f.numpy(), "path": path,
            "data_cost": data, "exp_all": exp_c.numpy(), "jaw_all": jaw.numpy(), "identity_frames": np.asarray(rows),
            "identity_scores": gr.scores.numpy(), "identity_chosen": gr.chosen.numpy(),
            "vertices": chosen_verts, "identity_vertices": gr.identity_vertices, "crops": [f.farl_crop for f in faces],
            "shape_t": shape, "hypothesis_vertices": verts if keep_hypotheses else None}


def _write_preview_video(path: Path, frames: list[np.ndarray], kps: np.ndarray, verts: torch.Tensor,
                         faces: np.ndarray, fps: float, size: int) -> None:
    """``preview.mp4``: each input frame (its smoothed keypoints drawn) beside the rendered mesh."""
    import av
    from PIL import Image, ImageDraw

    from ..render import render_mesh_preview

    # one framing for the whole clip: the first frame's box, so the head's motion shows
    with av.open(str(path), mode="w") as box:
        stream = box.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4",
                                rate=max(1, int(round(fps))))
        stream.width, stream.height = 2 * size, size
        stream.pix_fmt = "yuv420p"
        for fr, k, v in zip(frames, kps, verts):
            h, w = fr.shape[:2]
            s = size / max(h, w)
            img = Image.fromarray(fr).resize((max(1, round(w * s)), max(1, round(h * s))))
            canvas = Image.new("RGB", (size, size))
            canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
            d = ImageDraw.Draw(canvas)
            for x, y in k * s + [(size - img.width) // 2, (size - img.height) // 2]:
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(0, 255, 0))
            mesh = render_mesh_preview(v.numpy(), faces, size=size, supersample=1)
            row = np.concatenate([np.asarray(canvas), mesh], axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(row, format="rgb24")):
                box.mux(packet)
        for packet in stream.encode():
            box.mux(packet)


def run_video(cfg: SampleConfig, input_path: str | Path, output: str | Path, reconstructor: Any = None,
              log: Callable[[str], Any] = print, device: Any = None, detector: Any = None) -> dict:
    """Reconstruct a clip (or a folder of frames) into ``output``; returns ``video.json``'s dict.

    Outputs: ``motion.npz`` (``shape`` once; ``exp``, ``jaw_pose``, ``global_pose`` and
    ``camera`` (:func:`clip_global_pose`; the camera model: :mod:`ofer.sample.head_pose`),
    ``kps`` (smoothed, px), ``filled`` (frames without a detected face), ``chosen`` (the
    hypothesis per frame, -1: the mean) per frame; ``fps``),
    ``identity.<ext>``, ``frames/frame_XXXXXX.<ext>`` (``video.meshes``), ``preview.mp4``
    (``video.preview``) and ``video.json`` (written last).
    """
    from ..io import write_json, write_mesh, write_npz
    from .reconstructor import STAGES, Reconstructor
    from .runner import claim_output, make_detector

    input_path, output = Path(input_path), Path(output)
    claim_output(output, cfg, 0)
    timer = {s: 0.0 for s in STAGES}
    t_start = time.perf_counter()
    frames, fps, names = read_frames(input_path, cfg.video.frame_step, cfg.video.max_frames)
    rec = reconstructor or Reconstructor.from_config(cfg, device)
    t0 = time.perf_counter()
    if cfg.aligned:
        kps_raw = np.full((len(frames), 5, 2), np.nan)
        det_msg = "aligned frames"
    else:
        sidecars = [input_path / n for n in names] if input_path.is_dir() and cfg.use_sidecar else []
        if detector is None:
            detector, det_msg = make_detector(cfg)
        else:
            det_msg = "the given detector"
        if detector is None and not sidecars:
            raise OferError("a clip needs a detector (detector.mode=auto, blazeface or scrfd)")
        kps_raw, n_side = _detect_all(frames, detector, cfg, sidecars)
        if n_side:
            det_msg += f"; {n_side} frame(s) with sidecar keypoints"
    timer["prepare"] += time.perf_counter() - t0
    log(f"{len(frames)} frames at {fps:.2f} fps; {det_msg}")
    if cfg.aligned:
        from ..data.align import ARCFACE_TEMPLATE

        s = frames[0].shape[0] / 112.0
        kps = np.repeat((np.asarray(ARCFACE_TEMPLATE, np.float64) * s)[None], len(frames), 0)
        filled = np.zeros(len(frames), bool)
    else:
        kps, filled = fill_gaps(kps_raw)
        kps = smooth_keypoints(kps, cfg.video.smooth_sigma)
    if filled.any():
        log(f"no face in {int(filled.sum())} frame(s): filled from their neighbours")
    res = reconstruct_clip(rec, frames, kps, cfg, input_path.stem, timer)
    faces = rec.flame_id.faces.cpu().numpy()
    ext = cfg.mesh_format
    t0 = time.perf_counter()
    pose, camera, pose_method = clip_global_pose(rec.flame_id, res["vertices"], kps, cfg.video.smooth_sigma, log)
    write_mesh(output / f"identity.{ext}", res["identity_vertices"], faces, unit="mm")
    write_npz(output / "motion.npz", shape=res["shape"].astype(np.float32), exp=res["exp"].astype(np.float32),
              jaw_pose=res["jaw"].astype(np.float32), global_pose=pose.astype(np.float32),
              **({} if camera is None else {"camera": camera.astype(np.float32)}),
              kps=kps.astype(np.float32), filled=filled, chosen=res["path"].astype(np.int64), fps=np.float64(fps),
              data_cost=res["data_cost"].astype(np.float32), identity_frames=res["identity_frames"],
              identity_scores=res["identity_scores"], identity_chosen=res["identity_chosen"],
              seed=np.int64(cfg.seed))
    if cfg.video.meshes:
        for t, v in enumerate(res["vertices"]):
            write_mesh(output / "frames" / f"frame_{t:06d}.{ext}", v, faces, unit="mm")
    if cfg.video.preview:
        _write_preview_video(output / "preview.mp4", frames, kps, res["vertices"], faces, fps, cfg.video.preview_size)
    timer["writing"] += time.perf_counter() - t0
    wall = time.perf_counter() - t_start
    info = {"input": str(input_path), "status": "ok", "frames": len(frames), "fps": fps,
            "filled_frames": [names[t] for t in np.flatnonzero(filled)], "choice": cfg.video.choice,
            "identity_select": cfg.group.select, "identity_top_k": cfg.group.top_k,
            "data_weight": cfg.video.data_weight, "smooth_weight": cfg.video.smooth_weight, "global_pose": pose_method,
            "identity_frames": [names[t] for t in res["identity_frames"]],
            "jitter_mm": jitter_mm(res["vertices"]), "wall_seconds": wall,
            "frames_per_second": len(frames) / wall, "stage_seconds": timer,
            "outputs": ["motion.npz", f"identity.{ext}"] + (["preview.mp4"] if cfg.video.preview else [])
            + ([f"frames/frame_XXXXXX.{ext}"] if cfg.video.meshes else []), "units": "mm"}
    write_json(output / "video.json", info)
    return info
