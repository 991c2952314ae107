"""Training datasets in the MICA and OFER (FLAME2023 re-fit) layouts.

Two on-disk layouts are read (``root`` = ``<data_root>/<data.root>``):

MICA (``layout="mica"``)::

    image_paths/<NAME>.npy                      pickled {actor: (image_relpaths, params_relpath)}
    <NAME>/arcface_input/<actor>/<img>.jpg      224x224 aligned crop (RGB)
    <NAME>/arcface_input/<actor>/<img>.npy      ArcFace blob (3,112,112) float32, RGB, (px-127.5)/127.5
                                                (OFER's own .npy files are BGR)
    <NAME>/FLAME_parameters/<params_relpath>    .npz: betas (400 = 300 shape + 100 expression),
                                                      pose (15 = global, neck, jaw, eyes)

OFER FLAME2023 re-fits (``layout="ofer23"``)::

    image_paths/arcface23/<NAME>.npy            pickled {actor: [params_relpath, [image_relpaths]]}
    <NAME'>/arcface_input/...                   as above
    <NAME'>/FLAME23_parameters/<params_relpath> .npz: shape (>= 300); frames also exp, pose
                                                      (15, jaw at [3:6])

``NAME'`` is the dataset name with a ``_TRAIN``/``_VAL`` suffix removed (the suffix selects
another image list over the same folders); when that folder does not exist the part before
the first ``_`` is tried (``STIRLING_LQ_VAL`` -> ``STIRLING``). ``layout="auto"`` picks the
layout whose image list exists.

Items (one per actor, or per frame for expression data) hold K images of the same
identity; ``FaceDataset[key]`` returns a dict of tensors::

    arcface         (K,3,112,112) float32  ArcFace input (after occlusion)
    farl            (K,3,S,S)     float32  CLIP-normalised crop (when ``load_farl``)
    shape_coeffs    (K,n_shape)   float32  replicated identity
    exp_coeffs      (K,n_exp)     float32  (``mode="expression"``)
    jaw_pose        (K,3)         float32  axis-angle (``mode="expression"``)
    occlusion_mask  (K,1,224,224) float32  1 = occluded, in the 224 crop (when occlusion is configured)

Occlusion augmentation (``occlusion_prob > 0``): each image independently gets, with that
probability, one synthetic occluder of :mod:`ofer.data.occlusion` on its 224 crop, whose area
is a fraction (uniform in ``occlusion_area``) of the face box; the same occluder is resampled
into the 112 ArcFace input, so both encoders see one consistent occluded face. The geometry
between the two crops (MICA's 2x alignment or OFER's FaRL box crop) and the blob's channel
order are detected once per dataset from its first occluded image.
    index           ()            int64    position of the item in the index

Randomness is per item: the training sampler passes keys ``(index, seed_tuple)`` and every
random choice of that item (which K images, the occluders) comes from
``numpy.random.default_rng(seed_tuple)``. Items therefore do not depend on the number of
workers, on the worker that loads them, or on the process in distributed training, and a
resumed run reloads exactly the same batches. Plain integer keys give the deterministic
evaluation view (the first K images, occlusion seeded by the index).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import AssetError
from ..flame.assets import read_npy_pickle
from .occlusion import ARCFACE_TEMPLATE, OcclusionConfig, VALID_KINDS, occlude_with_info
from .align import CANONICAL_BOX, farl_crop_matrix, transform_points, warp_affine

__all__ = [
    "IndexEntry",
    "load_index",
    "check_index",
    "read_image_list",
    "FaceDataset",
    "StreamBatchSampler",
    "build_occluder",
    "SyntheticOccluder",
    "detect_crop_frame",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# ----------------------------------------------------------------------------------------
# Image lists (pickled dicts inside .npy): the FLAME allow-list unpickler, never arbitrary code
# ----------------------------------------------------------------------------------------
def read_image_list(path: str | Path) -> dict:
    """Read a pickled ``{actor: ...}`` dict stored with ``np.save`` through an allow-list.

    Raises:
        AssetError: missing, unreadable, or not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise AssetError(f"image list not found: {path}")
    obj = read_npy_pickle(path, "image list")
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.ndim == 0:
        obj = obj.item()
    if not isinstance(obj, dict):
        raise AssetError(f"image list {path} holds a {type(obj).__name__}, expected a dict")
    return obj


# ----------------------------------------------------------------------------------------
# Index
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexEntry:
    """One actor (identity data) or one frame (expression data)."""

    dataset: str
    actor: str
    images: tuple[Path, ...]  # the 224 crops; the ArcFace blob is ``img.with_suffix('.npy')``
    params: Path
    layout: str


def _strip_split(name: str) -> str:
    for suffix in ("_TRAIN", "_VAL"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _base_dir(root: Path, name: str) -> Path:
    candidates = [name, _strip_split(name), name.split("_")[0]]
    for c in candidates:
        if (root / c).is_dir():
            return root / c
    return root / _strip_split(name)


def _split_value(value: Any, where: str) -> tuple[list[str], str]:
    """(image_relpaths, params_relpath) from a MICA tuple or an OFER [params, images] list."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        a, b = value
        if isinstance(a, (list, tuple, np.ndarray)) and isinstance(b, (str, np.str_)):
            return [str(x) for x in a], str(b)
        if isinstance(b, (list, tuple, np.ndarray)) and isinstance(a, (str, np.str_)):
            return [str(x) for x in b], str(a)
    raise AssetError(f"image list entry {where} must be (image_paths, params_path), got {value!r:.80}")


def load_index(
    root: str | Path,
    names: Sequence[str],
    layout: Literal["auto", "mica", "ofer23"] = "auto",
) -> list[IndexEntry]:
    """Read the image lists of ``names`` under ``root``; entries keep list order (sorted actors).

    Raises:
        AssetError: an image list is missing (lists every path tried) or malformed.
    """
    root = Path(root)
    entries: list[IndexEntry] = []
    for name in names:
        name = name.upper()
        lists = {"ofer23": root / "image_paths" / "arcface23" / f"{name}.npy",
                 "mica": root / "image_paths" / f"{name}.npy"}
        if layout == "auto":
            found = [k for k in ("ofer23", "mica") if lists[k].is_file()]
            if not found:
                raise AssetError(
                    f"no image list for dataset {name}: tried {lists['mica']} and {lists['ofer23']}"
                )
            lay = found[0]
        else:
            lay = layout
            if not lists[lay].is_file():
                raise AssetError(f"no image list for dataset {name} (layout {lay}): {lists[lay]} not found")
        table = read_image_list(lists[lay])
        base = _base_dir(root, name)
        img_dir = base / "arcface_input"
        par_dir = base / ("FLAME_parameters" if lay == "mica" else "FLAME23_parameters")
        for actor in sorted(table, key=str):
            images, params = _split_value(table[actor], f"{name}[{actor!r}]")
            if not images:
                raise AssetError(f"image list entry {name}[{actor!r}] has no images")
            entries.append(IndexEntry(
                dataset=name, actor=str(actor),
                images=tuple(img_dir / p.lstrip("/") for p in images),
                params=par_dir / params.lstrip("/"), layout=lay,
            ))
    return entries


def check_index(
    entries: Sequence[IndexEntry],
    need_images: bool = True,
    need_arcface: bool = True,
    report_path: str | Path | None = None,
    mode: Literal["identity", "expression"] = "identity",
) -> None:
    """Check every file the index refers to, up front; raise ONE error that counts them all.

    The message lists the first missing files; with ``report_path`` the full list is written
    there too (one path per line). The first parameter file of each dataset is also opened
    and checked for the keys ``mode`` needs.

    Raises:
        AssetError: one line, ``N of M dataset files missing (...): a, b, ...``.
    """
    missing: list[str] = []
    total = 0
    seen_params: set[Path] = set()
    for e in entries:
        paths = []
        if e.params not in seen_params:
            seen_params.add(e.params)
            paths.append(e.params)
        for img in e.images:
            if need_images:
                paths.append(img)
            if need_arcface:
                paths.append(img.with_suffix(".npy"))
        for p in paths:
            total += 1
            if not p.is_file():
                missing.append(str(p))
    if missing:
        note = ""
        if report_path is not None:
            Path(report_path).parent.mkdir(parents=True, exist_ok=True)
            Path(report_path).write_text("\n".join(missing) + "\n")
            note = f", full list in {report_path}"
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing) - 10} more)" if len(missing) > 10 else "")
        raise AssetError(f"{len(missing)} of {total} dataset files missing{note}: {shown}")
    checked: set[str] = set()
    for e in entries:
        if e.dataset not in checked:
            checked.add(e.dataset)
            load_params(e, 1, 1, mode)


# ----------------------------------------------------------------------------------------
# Parameters and images
# ----------------------------------------------------------------------------------------
def _load_param_file(path: Path) -> dict[str, np.ndarray]:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: np.asarray(z[k]) for k in z.files}
        if path.suffix == ".npy":
            obj = read_image_list(path)  # pickled dict of arrays, through the allow-list
            return {k: np.asarray(v) for k, v in obj.items()}
    except AssetError:
        raise
    except Exception as exc:
        raise AssetError(f"cannot read FLAME parameters {path}: {type(exc).__name__}: {exc}") from exc
    raise AssetError(f"FLAME parameters {path}: expected a .npz file")


def _take(d: dict, key: str, lo: int, hi: int, path: Path) -> np.ndarray:
    if key not in d:
        raise AssetError(f"FLAME parameters {path} have no key '{key}' (keys: {', '.join(sorted(d))})")
    flat = np.asarray(d[key], dtype=np.float64).reshape(-1)
    if flat.size < hi:
        raise AssetError(f"FLAME parameters {path}: '{key}' has {flat.size} values, need {hi}")
    return flat[lo:hi].astype(np.float32)


def load_params(
    entry: IndexEntry, n_shape: int, n_exp: int, mode: Literal["identity", "expression"]
) -> dict[str, np.ndarray]:
    """FLAME coefficients of one entry: ``shape_coeffs`` and, for expression, ``exp_coeffs``, ``jaw_pose``."""
    d = _load_param_file(entry.params)
    out: dict[str, np.ndarray] = {}
    if entry.layout == "mica":
        out["shape_coeffs"] = _take(d, "betas", 0, n_shape, entry.params)
        if mode == "expression":
            out["exp_coeffs"] = _take(d, "betas", 300, 300 + n_exp, entry.params)
            out["jaw_pose"] = _take(d, "pose", 6, 9, entry.params)
    else:
        out["shape_coeffs"] = _take(d, "shape", 0, n_shape, entry.params)
        if mode == "expression":
            out["exp_coeffs"] = _take(d, "exp", 0, n_exp, entry.params)
            out["jaw_pose"] = _take(d, "pose", 3, 6, entry.params)
    return out


def _read_rgb(path: Path, size: int = 224) -> np.ndarray:
    """(3,size,size) float32 in [0, 1]."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except Exception as exc:
        raise AssetError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _read_arcface_blob(path: Path) -> np.ndarray:
    try:
        blob = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise AssetError(f"cannot read ArcFace input {path}: {type(exc).__name__}: {exc}") from exc
    if blob.size != 3 * 112 * 112:
        raise AssetError(f"ArcFace input {path} must hold 3x112x112 values, got shape {blob.shape}")
    return np.asarray(blob, dtype=np.float32).reshape(3, 112, 112)


# ----------------------------------------------------------------------------------------
# Occlusion augmentation
# ----------------------------------------------------------------------------------------
#: ``(crop (3,224,224) float32 [0,1], rng, kps (5,2) in crop pixels) -> (occluded crop, mask (224,224))``
Occluder = Callable[[np.ndarray, np.random.Generator, np.ndarray], tuple[np.ndarray, np.ndarray]]


class SyntheticOccluder:
    """Pastes one occluder of :mod:`ofer.data.occlusion` (hands, objects, face masks,
    sunglasses, shapes, cutouts) on a crop; its area is a fraction of the face box drawn
    uniformly from ``area``. Whether an image is occluded at all is decided by the dataset.
    """

    def __init__(self, area: Sequence[float], kinds: Optional[Sequence[str]] = None) -> None:
        self.config = OcclusionConfig(prob=1.0, area=(float(area[0]), float(area[1])),
                                      kinds=tuple(kinds) if kinds else VALID_KINDS)

    def __call__(self, image: np.ndarray, rng: np.random.Generator,
                 kps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:

        u8 = np.clip(np.rint(image.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)
        res = occlude_with_info(u8, rng, self.config, kps=kps, force=True)
        out = res.image.astype(np.float32).transpose(2, 0, 1) / 255.0
        return np.ascontiguousarray(out), res.mask.astype(np.float32)


def build_occluder(prob: float, area: Sequence[float]) -> Optional[Occluder]:
    """The occluder used by the datasets (:class:`SyntheticOccluder`), or None when ``prob == 0``."""
    if prob <= 0:
        return None
    return SyntheticOccluder(area)


# Where the 112 ArcFace input lies inside the 224 crop: (2,3) affine maps from ArcFace
# (template) pixels to crop pixels. MICA's crops are the 224 ArcFace alignment (2x; the
# blob was taken either by striding or by 2x2 averaging); OFER's / ofer.preprocess's crops
# are the FaRL box crop around the face (the canonical box of ofer.data.align, exact for
# upright faces aligned from keypoints).
def _crop_frames() -> dict[str, np.ndarray]:
    return {"aligned": np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]),
            "aligned_avg": np.array([[2.0, 0.0, 0.5], [0.0, 2.0, 0.5]]),
            "box": farl_crop_matrix(CANONICAL_BOX, 224)}


def _inverse_affine(m: np.ndarray) -> np.ndarray:
    return np.linalg.inv(np.vstack([m, [0.0, 0.0, 1.0]]))[:2]


def _crop_to_112(img_hwc: np.ndarray, m: np.ndarray) -> np.ndarray:
    return warp_affine(img_hwc.astype(np.float32), _inverse_affine(m), 112)


def detect_crop_frame(rgb: np.ndarray, blob: np.ndarray) -> tuple[np.ndarray, bool]:
    """Which crop geometry and channel order relate a 224 crop and its ArcFace blob.

    Args:
        rgb: (3,224,224) float32 in [0, 1]. blob: (3,112,112) float32 ``(px-127.5)/127.5``.

    Returns:
        ``(M (2,3) template->crop pixels, bgr)``: the candidate (MICA 2x alignment, or the
        FaRL box crop; RGB or BGR blob) whose resampled crop is closest to the blob.
    """
    img = rgb.transpose(1, 2, 0) * 255.0
    best = (np.inf, None, False)
    for m in _crop_frames().values():
        small = (_crop_to_112(img, m).transpose(2, 0, 1) - 127.5) / 127.5
        for bgr in (False, True):
            err = float(np.abs((small[::-1] if bgr else small) - blob).mean())
            if err < best[0]:
                best = (err, m, bgr)
    return best[1], best[2]


def _occlude_blob(blob: np.ndarray, rgb_occ: np.ndarray, mask: np.ndarray, m: np.ndarray,
                  bgr: bool) -> np.ndarray:
    """Carry an occluder pasted on the 224 crop over to the 112 ArcFace blob.

    ``m`` maps ArcFace pixels to crop pixels (:func:`detect_crop_frame`): the occluded crop and
    its mask are resampled into the ArcFace frame and blended in.
    """
    m112 = _crop_to_112(mask, m)[None]
    occ = (_crop_to_112(rgb_occ.transpose(1, 2, 0) * 255.0, m).transpose(2, 0, 1) - 127.5) / 127.5
    if bgr:
        occ = occ[::-1]
    return (blob * (1 - m112) + occ * m112).astype(np.float32)


# ----------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------
class FaceDataset(torch.utils.data.Dataset):
    """K images of one actor (or frame) with their FLAME coefficients.

    Args:
        entries: the index (:func:`load_index`).
        images_per_actor: K; drawn without replacement (with replacement when an actor has
            fewer than K images) for training keys, the first K (cycled) for integer keys.
        mode: ``"identity"`` (IdGen/IdRank) or ``"expression"`` (ExpGen).
        n_shape, n_exp: coefficient counts returned.
        load_farl: also return the 224 px face crops ``farl`` (RGB in [0, 1]; the model
            prepares them for its FaRL, :meth:`~ofer.nets.FaRLEncoder.prepare`).
        occlusion_prob, occlusion_area: occlusion augmentation (prob 0 = off).
    """

    def __init__(
        self,
        entries: Sequence[IndexEntry],
        images_per_actor: int = 4,
        mode: Literal["identity", "expression"] = "identity",
        n_shape: int = 300,
        n_exp: int = 50,
        load_farl: bool = False,
        occlusion_prob: float = 0.0,
        occlusion_area: Sequence[float] = (0.05, 0.4),
        occluder: Optional[Occluder] = None,
    ) -> None:
        self.entries = list(entries)
        self.k = int(images_per_actor)
        self.mode = mode
        self.n_shape, self.n_exp = int(n_shape), int(n_exp)
        self.load_farl = bool(load_farl)
        self.occlusion_prob = float(occlusion_prob)
        self.occluder = occluder if occluder is not None else build_occluder(occlusion_prob, occlusion_area)
        self.with_mask = self.occluder is not None
        self._frames: dict[str, tuple[np.ndarray, bool]] = {}  # dataset -> (crop frame, bgr)

    def _frame(self, entry: IndexEntry, rgb: np.ndarray, blob: np.ndarray) -> tuple[np.ndarray, bool]:
        """Crop geometry of ``entry``'s dataset, detected once from its first occluded image."""
        f = self._frames.get(entry.dataset)
        if f is None:
            f = self._frames[entry.dataset] = detect_crop_frame(rgb, blob)
        return f

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: int | tuple[int, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        if isinstance(key, tuple):
            index, seed = int(key[0]), tuple(int(s) for s in key[1])
            rng = np.random.default_rng(seed)
            train = True
        else:
            index, train = int(key), False
            rng = np.random.default_rng([0x0FE1, index])
        entry = self.entries[index]
        n = len(entry.images)
        if train:
            pick = rng.choice(n, self.k, replace=n < self.k)
        else:
            pick = np.arange(self.k) % n
        params = load_params(entry, self.n_shape, self.n_exp, self.mode)

        arc, farl, masks = [], [], []
        for j in pick:
            img_path = entry.images[int(j)]
            blob = _read_arcface_blob(img_path.with_suffix(".npy"))
            rgb = _read_rgb(img_path) if (self.load_farl or self.with_mask) else None
            mask = np.zeros((224, 224), np.float32)
            if self.occluder is not None and rng.uniform() < self.occlusion_prob:
                m, bgr = self._frame(entry, rgb, blob)

                rgb, mask = self.occluder(rgb, rng, transform_points(m, ARCFACE_TEMPLATE))
                blob = _occlude_blob(blob, rgb, mask, m, bgr)
            arc.append(blob)
            if self.load_farl:
                farl.append(rgb)
            masks.append(mask)

        item: dict[str, torch.Tensor] = {
            "arcface": torch.from_numpy(np.stack(arc)),
            "shape_coeffs": torch.from_numpy(np.repeat(params["shape_coeffs"][None], self.k, 0)),
            "index": torch.tensor(index, dtype=torch.long),
        }
        if self.mode == "expression":
            item["exp_coeffs"] = torch.from_numpy(np.repeat(params["exp_coeffs"][None], self.k, 0))
            item["jaw_pose"] = torch.from_numpy(np.repeat(params["jaw_pose"][None], self.k, 0))
        if self.load_farl:
            item["farl"] = torch.from_numpy(np.stack(farl))
        if self.with_mask:
            item["occlusion_mask"] = torch.from_numpy(np.stack(masks))[:, None]
        return item


# ----------------------------------------------------------------------------------------
# Sampler: a deterministic stream of batches, sharded over processes, resumable by step
# ----------------------------------------------------------------------------------------
class StreamBatchSampler(torch.utils.data.Sampler):
    """Infinite batches of dataset keys ``(index, seed_tuple)``, starting at ``start_step``.

    The stream is the concatenation of permutations ``perm(seed, epoch)`` of all items. Step
    ``s`` uses stream positions ``[s*G, (s+1)*G)`` with ``G = batch_size * world_size``;
    process ``rank`` takes the slice ``[rank*batch_size, (rank+1)*batch_size)`` of it. Each
    key carries the seed ``(seed, position)``, so an item's randomness is a pure function of
    its place in the stream: the same global batch comes out for 1 or K processes, any number
    of workers, and after a resume at any step.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, start_step: int = 0) -> None:
        if num_items < 1:
            raise AssetError("the training index is empty")
        self.n, self.b = int(num_items), int(batch_size)
        self.seed, self.rank, self.world = int(seed), int(rank), int(world_size)
        self.start_step = int(start_step)
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        p = self._perm_cache.get(epoch)
        if p is None:
            p = np.random.default_rng([self.seed, 0x5A3, epoch]).permutation(self.n)
            if len(self._perm_cache) >= 2:
                self._perm_cache.pop(min(self._perm_cache))
            self._perm_cache[epoch] = p
        return p

    def batch_at(self, step: int) -> list[tuple[int, tuple[int, int]]]:
        start = step * self.b * self.world + self.rank * self.b
        keys = []
        for pos in range(start, start + self.b):
            epoch, i = divmod(pos, self.n)
            keys.append((int(self._perm(epoch)[i]), (self.seed, pos)))
        return keys

    def epoch_of(self, step: int) -> float:
        return step * self.b * self.world / self.n

    def __iter__(self) -> Iterator[list[tuple[int, tuple[int, int]]]]:
        step = self.start_step
        while True:
            yield self.batch_at(step)
            step += 1

    def __len__(self) -> int:  # effectively infinite; DataLoader only needs a number
        return 2**62
