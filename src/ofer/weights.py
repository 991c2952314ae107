"""Known pretrained weight files: where they come from and where they are cached.

Files with a public URL are downloaded on request into the cache (``$OFER_CACHE`` or
``~/.cache/ofer``) with a streamed sha256 check and an atomic rename, so an interrupted
download never leaves a partial file under the final name. Files without a public URL
(licence-gated or behind a login) must be placed by the user; :func:`ensure_weights` then
says exactly where. Nothing here ever substitutes random weights.

Example::

    from ofer.weights import ensure_weights
    path = ensure_weights("farl")            # downloads once, then returns the cached path
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import AssetError
from .io import atomic_write_bytes

__all__ = ["WeightFile", "REGISTRY", "cache_dir", "weight_path", "ensure_weights", "find_weights", "download_file",
           "sha256_file"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightFile:
    """One known weight file.

    Attributes:
        filename: name in the cache.
        description: what it is.
        url: public download URL, or ``None`` when it must be obtained by hand.
        sha256: expected hex digest, or ``None`` when not known (the computed one is reported).
        source: where to get it (a web page) when there is no direct URL.
    """

    filename: str
    description: str
    url: str | None = None
    sha256: str | None = None
    source: str | None = None


REGISTRY: dict[str, WeightFile] = {
    "farl": WeightFile(
        filename="FaRL-Base-Patch16-LAIONFace20M-ep64.pth",
        description="FaRL ViT-B/16 pretrained on LAION-Face 20M, 64 epochs (FaRLEncoder initialisation)",
        url="https://github.com/FacePerceiver/FaRL/releases/download/pretrained_weights/"
            "FaRL-Base-Patch16-LAIONFace20M-ep64.pth",
        sha256=None,
        source="https://github.com/FacePerceiver/FaRL",
    ),
    "arcface_glint360k_r100": WeightFile(
        filename="glint360k_r100_backbone.pth",
        description="insightface arcface_torch r100 trained on Glint360K (backbone.pth; IResNet initialisation)",
        source="the insightface arcface_torch model zoo (github.com/deepinsight/insightface/tree/master/"
               "recognition/arcface_torch)",
    ),
    "ofer_idgen_flame20": WeightFile(
        filename="model_idgen_flame20.tar",
        description="OFER IdGen checkpoint (FLAME2020)",
        source="https://ofer.is.tue.mpg.de (registration required)",
    ),
    "ofer_expgen_flame20": WeightFile(
        filename="model_expgen_flame20.tar",
        description="OFER ExpGen checkpoint (FLAME2020)",
        source="https://ofer.is.tue.mpg.de (registration required)",
    ),
    "ofer_idrank": WeightFile(
        filename="model_idrank.tar",
        description="OFER IdRank checkpoint",
        source="https://ofer.is.tue.mpg.de (registration required)",
    ),
}


def cache_dir() -> Path:
    """The weight cache: ``$OFER_CACHE`` if set, else ``~/.cache/ofer``."""
    env = os.environ.get("OFER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ofer"


def weight_path(name: str) -> Path:
    """Cache path of a registered weight file (it may not exist yet)."""
    return cache_dir() / _entry(name).filename


def _entry(name: str) -> WeightFile:
    if name not in REGISTRY:
        raise AssetError(f"unknown weight file {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _check_hash(path: Path, expected: str | None, actual: str) -> None:
    if expected is None:
        log.warning("sha256 of %s is %s (no expected hash registered; compare it with the source)", path, actual)
    elif actual.lower() != expected.lower():
        raise AssetError(f"{path}: sha256 {actual} does not match the expected {expected}")


def download_file(url: str, target: str | os.PathLike, sha256: str | None = None, progress: bool = True,
                  timeout: float = 30.0, chunk: int = 1 << 20) -> str:
    """Download ``url`` to ``target`` atomically, checking ``sha256`` when given.

    The data is streamed into a temporary file next to ``target`` and renamed only after the
    hash matched; on any error nothing is left under ``target``. A tqdm bar shows progress.

    Returns:
        The sha256 hex digest of the downloaded file.

    Raises:
        AssetError: one line with the URL and the target path (offline, HTTP error, hash mismatch).
    """
    from tqdm import tqdm

    target = Path(target)
    digest = hashlib.sha256()

    def fail(reason: str) -> AssetError:
        return AssetError(f"cannot download {url} ({reason}); download it by hand and save it as {target}")

    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "ofer"}), timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise fail(f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise fail(f"no connection: {reason}") from None

    def writer(f) -> None:
        total = resp.headers.get("Content-Length")
        got = 0
        with tqdm(total=int(total) if total and total.isdigit() else None, unit="B", unit_scale=True,
                  unit_divisor=1024, desc=target.name, disable=not progress) as bar:
            while True:
                try:
                    block = resp.read(chunk)
                except http.client.IncompleteRead as exc:
                    got += len(exc.partial)
                    block = b""
                if not block:
                    break
                got += len(block)
                f.write(block)
                digest.update(block)
                bar.update(len(block))
        if total and total.isdigit() and got != int(total):
            raise fail(f"connection closed after {got} of {total} bytes")
        if sha256 is not None and digest.hexdigest().lower() != sha256.lower():
            raise AssetError(
                f"{url}: sha256 {digest.hexdigest()} does not match the expected {sha256}; nothing was saved to {target}"
            )

    try:
        with resp:
            atomic_write_bytes(target, writer)
    except AssetError:
        raise
    except (OSError, http.client.HTTPException) as exc:
        raise fail(f"transfer failed: {type(exc).__name__}: {exc}") from None
    actual = digest.hexdigest()
    if sha256 is None:
        _check_hash(target, None, actual)
    return actual


def ensure_weights(name: str, path: str | os.PathLike | None = None, download: bool = True,
                   progress: bool = True, timeout: float = 30.0, verify: bool = True) -> Path:
    """Return the path of a registered weight file, downloading it into the cache if allowed.

    Args:
        name: registry key (see :data:`REGISTRY`).
        path: an explicit location (from config). If given it must exist; it is never
            downloaded to.
        download: allow a download when the file is not cached.
        verify: check the sha256 of an existing file when one is registered.

    Raises:
        AssetError: one line naming the file, the path expected and where to get it.
    """
    entry = _entry(name)
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            where = entry.url or entry.source or "its publisher"
            raise AssetError(f"{entry.description}: {p} not found; get {entry.filename} from {where}")
        if verify and entry.sha256:
            _check_hash(p, entry.sha256, sha256_file(p))
        return p
    target = weight_path(name)
    if target.is_file():
        if verify and entry.sha256:
            _check_hash(target, entry.sha256, sha256_file(target))
        return target
    if entry.url is None:
        raise AssetError(
            f"{entry.description}: {target} not found; get {entry.filename} from {entry.source} and put it there "
            f"(or set its path in the config)"
        )
    if not download:
        raise AssetError(f"{entry.description}: {target} not found; download {entry.url} to that path")
    download_file(entry.url, target, sha256=entry.sha256, progress=progress, timeout=timeout)
    return target


def find_weights(path: str | os.PathLike, key: str, download: bool = True, context: str = "") -> Path:
    """The weight file configured under ``key``: ``path`` when it exists, else the registered file
    of the same name from the cache (downloaded there once when it has a public URL).

    ``context`` is appended to the message of a missing file (e.g. the ``data_root``).

    Raises:
        AssetError: neither exists (one line naming the key, the path and where to get the file).
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p
    entry = next((n for n, e in REGISTRY.items() if e.filename == p.name), None)
    if entry is None:
        raise AssetError(f"config key '{key}': file not found: {p}{context}")
    try:
        return ensure_weights(entry, download=download)
    except AssetError as exc:
        raise AssetError(f"config key '{key}': {p} not found, and {exc}") from exc

