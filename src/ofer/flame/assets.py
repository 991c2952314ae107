"""Safe loading of FLAME assets without chumpy and without running pickled code.

FLAME model files (``generic_model.pkl`` of FLAME2020, the FLAME2023 pkls) are Python-2
pickles that reference ``chumpy`` objects and ``scipy.sparse`` matrices; the landmark
embedding (``landmark_embedding.npy``) is a 0-d object array holding a pickled dict with
numpy arrays and legacy-serialised torch tensors. Plain ``pickle.load`` would import
chumpy (which does not install on current Python/numpy) and would execute any callable a
tampered file names. Here every pickle goes through :class:`SafeUnpickler`, which resolves
only an allow-list of globals:

* numpy array/dtype/scalar reconstruction, ``scipy.sparse`` matrix classes,
  ``_codecs.encode`` and the ``set``/``frozenset``/``OrderedDict`` containers;
* any ``chumpy.*`` class, replaced by an inert stand-in that only records its state
  (a plain ``chumpy.ch.Ch`` keeps its array under ``'x'``);
* the torch tensor/storage rebuilders, replaced by a numpy parser of the legacy
  ``torch.save`` stream (so reading a landmark file does not even need torch).

Anything else (``os.system``, ``builtins.eval``, ...) raises :class:`UnsafePickleError`
before it is called.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..errors import AssetError, UnsafePickleError

__all__ = [
    "SafeUnpickler",
    "ChumpyStub",
    "safe_load_pickle",
    "load_flame_model",
    "load_landmark_embedding",
    "export_flame_npz",
    "read_npy_pickle",
    "FLAME_KEYS",
    "README_DATA_SECTION",
]

README_DATA_SECTION = "data/README.md, section 'FLAME'"

#: Keys of a FLAME model file that the FLAME layer needs.
FLAME_KEYS = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "kintree_table", "weights")


def _np_core(name: str):
    """Return ``numpy._core.multiarray.<name>`` (numpy 2) or ``numpy.core.multiarray.<name>``."""
    try:
        from numpy._core import multiarray as ma  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as ma
    return getattr(ma, name)


class ChumpyStub:
    """Inert stand-in for any chumpy class; keeps the pickled state, runs nothing."""

    chumpy_class = "chumpy.?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: D401 - signature mirrors pickle's use
        self._state: Any = None

    def __setstate__(self, state: Any) -> None:
        self._state = state

    def plain_array(self) -> np.ndarray | None:
        """The array this object holds, if it is a plain ``Ch`` (state key ``'x'``)."""
        state = self._state
        if isinstance(state, dict) and "x" in state:
            x = state["x"]
            if isinstance(x, ChumpyStub):
                return x.plain_array()
            if isinstance(x, np.ndarray) or sp.issparse(x) or np.isscalar(x):
                return np.asarray(x.toarray() if sp.issparse(x) else x)
        return None


_CHUMPY_CLASSES: dict[tuple[str, str], type] = {}


def _chumpy_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _CHUMPY_CLASSES:
        _CHUMPY_CLASSES[key] = type(name, (ChumpyStub,), {"chumpy_class": f"{module}.{name}"})
    return _CHUMPY_CLASSES[key]


# --------------------------------------------------------------------------------------
# Legacy torch serialisation (what ``pickle`` produces for a torch tensor)
# --------------------------------------------------------------------------------------

_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    """Marker for ``torch.<X>Storage`` references inside a legacy torch stream."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = np.dtype(_TORCH_STORAGE_DTYPES[name])


class _LegacyStorage:
    """A storage parsed from a legacy torch stream: a flat numpy array."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data


def _load_legacy_torch_bytes(blob: bytes) -> Any:
    """Parse the legacy (non-zip) ``torch.save`` stream with the safe unpickler.

    Layout: three small pickles (magic number, protocol version, system info), the main
    pickle whose persistent ids are ``('storage', StorageType, key, location, numel,
    view_metadata)``, a pickle with the list of storage keys, then for each key an
    int64 element count followed by the raw little-endian data.
    """
    f = io.BytesIO(blob)
    for _ in range(3):
        SafeUnpickler(f).load()
    pending: dict[str, _StorageType] = {}

    class _Main(SafeUnpickler):
        def persistent_load(self, pid: Any) -> Any:
            if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
                raise UnsafePickleError(f"unsupported persistent id in torch stream: {pid!r}")
            storage_type, key = pid[1], str(pid[2])
            if not isinstance(storage_type, _StorageType):
                raise UnsafePickleError(f"unsupported storage type in torch stream: {storage_type!r}")
            pending[key] = storage_type
            return ("__storage__", key)

    obj = _Main(f).load()
    keys = SafeUnpickler(f).load()
    storages: dict[str, np.ndarray] = {}
    for key in keys:
        key = str(key)
        (numel,) = struct.unpack("<q", f.read(8))
        dtype = pending[key].dtype
        raw = f.read(numel * dtype.itemsize)
        if len(raw) != numel * dtype.itemsize:
            raise AssetError("truncated torch tensor data in a pickled landmark file")
        storages[key] = np.frombuffer(raw, dtype=dtype).copy()

    def resolve(o: Any) -> Any:
        if isinstance(o, tuple) and len(o) == 2 and o[0] == "__storage__":
            return _LegacyStorage(storages[o[1]])
        return o

    return resolve(obj)


def _rebuild_tensor(storage: Any, offset: int, size: tuple, stride: tuple, *_: Any) -> np.ndarray:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: a strided copy as a numpy array."""
    if not isinstance(storage, _LegacyStorage):
        raise UnsafePickleError("tensor rebuild without a parsed storage")
    data = storage.data
    if len(size) == 0:
        return data[offset].copy()
    itemsize = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        data[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    )
    return np.array(view, copy=True)


# --------------------------------------------------------------------------------------
# The allow-list unpickler
# --------------------------------------------------------------------------------------

_SPARSE_NAMES = {"csc_matrix", "csr_matrix", "coo_matrix", "lil_matrix", "dok_matrix", "bsr_matrix", "dia_matrix"}


def _allowed_global(module: str, name: str) -> Any:
    """Resolve ``module.name`` if it is on the allow-list, else ``None``."""
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
        return _np_core(name)
    if module == "numpy" and name in ("ndarray", "dtype"):
        return getattr(np, name)
    if module.startswith("scipy.sparse") and name in _SPARSE_NAMES:
        return getattr(sp, name)  # old pickles say scipy.sparse.csc, new ones scipy.sparse._csc
    if (module, name) in {("_codecs", "encode")}:
        import _codecs

        return _codecs.encode
    builtins_ok = {"set": set, "frozenset": frozenset, "object": object, "slice": slice,
                   "bytes": bytes, "bytearray": bytearray}
    if module in ("__builtin__", "builtins") and name in builtins_ok:
        return builtins_ok[name]
    if module in ("copy_reg", "copyreg") and name == "_reconstructor":
        return _guarded_reconstructor
    if module == "collections" and name == "OrderedDict":
        return collections.OrderedDict
    if module == "chumpy" or module.startswith("chumpy."):
        return _chumpy_class(module, name)
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
        return _rebuild_tensor
    if module == "torch.storage" and name == "_load_from_bytes":
        return _load_legacy_torch_bytes
    if module == "torch" and name in _TORCH_STORAGE_DTYPES:
        return _StorageType(name)
    return None


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals (see the module docstring)."""

    def __init__(self, file: Any, *, encoding: str = "latin1") -> None:
        super().__init__(file, encoding=encoding)

    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed_global(module, name)
        if obj is None:
            raise UnsafePickleError(
                f"refused to load pickled object {module}.{name}: not on the allow-list "
                "(FLAME and landmark files only hold numpy, scipy.sparse and chumpy data)"
            )
        return obj


def _guarded_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` restricted to classes the allow-list produced."""
    import copyreg

    if not (isinstance(cls, type) and (issubclass(cls, ChumpyStub) or cls in (np.ndarray,) or
                                       cls in tuple(getattr(sp, n) for n in _SPARSE_NAMES))):
        raise UnsafePickleError(f"refused to reconstruct {cls!r}")
    if base not in (object, np.ndarray):
        raise UnsafePickleError(f"refused to reconstruct with base {base!r}")
    return copyreg._reconstructor(cls, base, state)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def safe_load_pickle(path: str | os.PathLike) -> Any:
    """Load a pickle file through :class:`SafeUnpickler` (``latin1`` for Python-2 pickles)."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            return SafeUnpickler(f).load()
        except UnsafePickleError:
            raise
        except Exception as exc:
            raise AssetError(f"cannot read pickle {path}: {_first_line(exc)}") from exc


def _require_file(path: str | os.PathLike | None, what: str) -> Path:
    if path is None:
        raise AssetError(f"no path given for the {what}; see {README_DATA_SECTION}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise AssetError(f"{what} not found: {path} (see {README_DATA_SECTION})")
    return path


def _to_plain(key: str, value: Any, path: Path) -> Any:
    """Turn chumpy stand-ins into arrays; refuse derived chumpy expressions by key."""
    if isinstance(value, ChumpyStub):
        arr = value.plain_array()
        if arr is None:
            raise AssetError(
                f"{path}: key '{key}' is a derived chumpy expression ({value.chumpy_class}) "
                "that holds no plain array; re-export the model with plain arrays"
            )
        return arr
    return value


def load_flame_model(path: str | os.PathLike) -> dict[str, Any]:
    """Load a FLAME model file (``.pkl`` of FLAME2020/2023, or our ``.npz`` export).

    Returns a dict with at least :data:`FLAME_KEYS`, with chumpy objects turned into
    ``np.ndarray`` and ``J_regressor`` kept as stored (dense array or scipy sparse).

    Raises:
        AssetError: the file is missing, unreadable, lacks a key, or holds a derived
            chumpy expression where an array is expected.
        UnsafePickleError: the pickle references a global outside the allow-list.
    """
    path = _require_file(path, "FLAME model")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                data: dict[str, Any] = {k: z[k] for k in z.files}
        except Exception as exc:
            raise AssetError(f"cannot read FLAME npz {path}: {_first_line(exc)}") from exc
    else:
        data = safe_load_pickle(path)
        if not isinstance(data, dict):
            raise AssetError(f"{path}: expected a pickled dict, found {type(data).__name__}")
        data = {str(k): _to_plain(str(k), v, path) for k, v in data.items()}
    missing = [k for k in FLAME_KEYS if k not in data]
    if missing:
        raise AssetError(f"{path}: not a FLAME model, missing keys {missing}")
    return data


def read_npy_pickle(path: str | os.PathLike, what: str) -> Any:
    """The object inside an object-dtype ``.npy`` (as ``np.save`` writes a dict), read safely.

    The payload after the ``.npy`` header goes through :class:`SafeUnpickler` instead of
    ``np.load(allow_pickle=True)``, so the file can hold data but never run code.

    Raises:
        AssetError: unreadable file or not an object array.
        UnsafePickleError: the pickle names a global outside the allow-list.
    """
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                _, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                _, _, dtype = np.lib.format.read_array_header_2_0(f)
            if not dtype.hasobject:
                raise AssetError(f"{what} {path}: expected a pickled dict inside the .npy, found a {dtype} array")
            return SafeUnpickler(f).load()
    except (AssetError, UnsafePickleError):
        raise
    except Exception as exc:
        raise AssetError(f"cannot read {what} {path}: {_first_line(exc)}") from exc


_LANDMARK_KEYS = (
    "static_lmk_faces_idx",
    "static_lmk_bary_coords",
    "dynamic_lmk_faces_idx",
    "dynamic_lmk_bary_coords",
    "full_lmk_faces_idx",
    "full_lmk_bary_coords",
)


def load_landmark_embedding(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a DECA/MICA-style ``landmark_embedding.npy`` without ``allow_pickle`` risks.

    The file is a 0-d object array holding a pickled dict; its dynamic entries are
    legacy-serialised torch tensors. The payload after the ``.npy`` header is read by
    :class:`SafeUnpickler`, so torch is not needed and no code can run.

    Returns:
        dict of numpy arrays with the six ``*_lmk_*`` keys (see the module docstring).
    """
    path = _require_file(path, "landmark embedding")
    obj = read_npy_pickle(path, "landmark embedding")
    if isinstance(obj, np.ndarray) and obj.dtype == object:
        obj = obj.reshape(-1)[0] if obj.size == 1 else obj
    if not isinstance(obj, dict):
        raise AssetError(f"{path}: expected a dict of landmark arrays, found {type(obj).__name__}")
    missing = [k for k in _LANDMARK_KEYS if k not in obj]
    if missing:
        raise AssetError(f"{path}: not a landmark embedding, missing keys {missing}")
    return {k: np.asarray(obj[k]) for k in _LANDMARK_KEYS}


def export_flame_npz(model_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Convert a FLAME pkl into a pickle-free ``.npz`` with the same keys (dense arrays).

    The ``.npz`` loads with ``allow_pickle=False`` and needs neither chumpy nor scipy.
    """
    data = load_flame_model(model_path)
    arrays = {}
    for k in FLAME_KEYS + ("J",):
        if k in data:
            v = data[k]
            arrays[k] = np.asarray(v.toarray() if sp.issparse(v) else v)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out_path, **arrays)
    return out_path
