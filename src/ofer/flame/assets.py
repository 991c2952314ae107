"""Safe loading of FLAME assets without chumpy and without running pickled code.

FLAME model files (``generic_model.pkl`` of FLAME2020, the FLAME2023 pkls) are Python-2
pickles that reference ``chumpy`` objects and ``scipy.sparse`` matrices; the landmark
embedding (``landmark_embedding.npy``) is a 0-d object array holding a pickled dict with
numpy arrays and legacy-serialised torch tensors. Plain ``pickle.load`` would import
chumpy (which does not install on current Python/numpy) and would execute any callable a
tampered file names. Here every pickle goes through :class:`SafeUnpickler`, which resolves
only an allow-list of globals:

* numpy array/dtype/scalar reconstruction, the ``scipy.sparse`` CSC/CSR/COO classes,
  ``_codecs.encode`` and the ``set``/``frozenset``/``OrderedDict`` containers;
* any ``chumpy.*`` class, replaced by an inert stand-in that only records its state
  (a plain ``chumpy.ch.Ch`` keeps its array under ``'x'``);
* the torch tensor/storage rebuilders, replaced by a numpy parser of the legacy
  ``torch.save`` stream (so reading a landmark file does not even need torch).

Anything else (``os.system``, ``builtins.eval``, ...) raises :class:`UnsafePickleError`
before it is called.

Allow-listed is not the same as harmless: a numpy ``_reconstruct``, ``bytes(n)`` or a tensor
record can ask for any amount of memory or point anywhere. So the unpickler (the pure-Python
one, whose opcodes can be overridden) also checks what it runs:

* every call goes through one gate: only the allow-listed constructors run, each with its
  arguments checked; ``numpy.ndarray`` and the sparse classes are never called, only
  created empty and filled by their state;
* every size-taking constructor (arrays, scalars, byte strings, containers, storages, tensor
  copies, ``BYTEARRAY8``) is charged to one budget per file: :data:`ALLOC_FLOOR` plus
  :data:`ALLOC_PER_BYTE` bytes per byte of the stream; beyond it the load stops;
* a tensor record (storage offset, sizes, strides) is accepted only if every element it
  reaches lies inside its storage (:func:`tensor_from_record`); the copy is a bounds-checked
  gather, not a strided view;
* item assignment only fills dicts, lists and sets; states are only set on arrays, dtypes,
  sparse matrices and chumpy stand-ins;
* every sparse matrix in the result passes scipy's full format check (indices inside the
  shape) before anything makes it dense; only CSC, CSR and COO matrices are accepted.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import reprlib
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
    "tensor_from_record",
    "FLAME_KEYS",
    "README_DATA_SECTION",
    "ALLOC_FLOOR",
    "ALLOC_PER_BYTE",
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
# Allocation limit
# --------------------------------------------------------------------------------------

#: Bytes one load may allocate through size-taking constructors, whatever the file's size.
ALLOC_FLOOR = 256 * 2**20
#: ... plus this many bytes per byte of the pickle stream (a real file's arrays come from its
#: own bytes, so their total is about the file's size).
ALLOC_PER_BYTE = 4
#: Most dimensions a tensor record may have.
MAX_TENSOR_DIMS = 32
#: Bytes charged per entry when a pickle builds or fills a container (sets, dicts, states).
_ENTRY_BYTES = 64


def _brief(value: Any) -> str:
    """A short, safe description of a value taken from a pickle, for messages."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    try:
        return reprlib.repr(value)
    except Exception:  # a hostile object may not even print
        return type(value).__name__


def _size_text(nbytes: int) -> str:
    if nbytes >= 2**60:
        return f"2^{nbytes.bit_length() - 1} bytes or more"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


class _Budget:
    """The bytes one load may still allocate; nested unpicklers of one file share it."""

    def __init__(self, limit: int) -> None:
        self.limit = int(limit)
        self.used = 0

    def charge(self, nbytes: int, what: str) -> None:
        if nbytes < 0 or nbytes > self.limit - self.used:
            raise UnsafePickleError(f"{what} would allocate {_size_text(max(nbytes, 0))}, beyond the "
                                    f"{_size_text(self.limit)} this file may allocate")
        self.used += nbytes


def _sized(value: Any) -> int:
    try:
        return len(value)
    except Exception:
        return 0


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


class _StorageRef:
    """A persistent id of the main pickle of a torch stream, resolved once the data is read."""

    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key


class _LegacyStorage:
    """A storage parsed from a legacy torch stream: a flat numpy array (never shown to the pickle)."""

    __slots__ = ("data",)

    def __init__(self, data: np.ndarray) -> None:
        self.data = data


def _storage_key(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or (
            isinstance(value, int) and value.bit_length() > 64) or (isinstance(value, str) and len(value) > 256):
        raise UnsafePickleError(f"torch stream: storage key must be a string or an integer, got {_brief(value)}")
    return str(value)


def _index(value: Any, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise UnsafePickleError(f"tensor record: {what} must be an integer, got {_brief(value)}")
    return int(value)


def _tensor_from_record(data: np.ndarray, offset: Any, size: Any, stride: Any, budget: _Budget) -> np.ndarray:
    if not isinstance(data, np.ndarray) or data.ndim != 1:
        raise UnsafePickleError("tensor record without a flat storage")
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)):
        raise UnsafePickleError(f"tensor record: sizes and strides must be tuples, got {_brief(size)} "
                                f"and {_brief(stride)}")
    if len(size) != len(stride) or len(size) > MAX_TENSOR_DIMS:
        raise UnsafePickleError(f"tensor record: {len(size)} sizes and {len(stride)} strides "
                                f"(at most {MAX_TENSOR_DIMS} dimensions, one stride per size)")
    offset = _index(offset, "the storage offset")
    size = [_index(s, "a size") for s in size]
    stride = [_index(s, "a stride") for s in stride]
    if offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0:
        raise UnsafePickleError(f"tensor record: negative offset, size or stride (offset {offset}, "
                                f"sizes {_brief(tuple(size))}, strides {_brief(tuple(stride))})")
    numel = math.prod(size)
    extent = math.prod(max(s, 1) for s in size)  # an empty tensor's other sizes must be sane too
    if extent * (data.itemsize + 8) > budget.limit:
        budget.charge(extent * (data.itemsize + 8), f"a tensor of sizes {_brief(tuple(size))}")
    budget.charge(numel * (data.itemsize + 8), f"a tensor of {_brief(numel)} elements")
    n = data.shape[0]
    if numel == 0:
        if offset > n:
            raise UnsafePickleError(f"tensor record: storage offset {offset} is past the end of a "
                                    f"storage of {n} elements")
        return np.zeros(size, dtype=data.dtype)
    last = offset + sum((s - 1) * st for s, st in zip(size, stride))
    if last >= n:
        raise UnsafePickleError(f"tensor record reaches element {_brief(last)} of a storage of {n} "
                                f"elements (offset {offset}, sizes {_brief(tuple(size))}, strides "
                                f"{_brief(tuple(stride))})")
    # Every partial sum below is at most ``last`` < n, so the int64 arithmetic cannot overflow;
    # the gather is bounds-checked by numpy as well.
    idx = np.full((), offset, dtype=np.int64)
    for s, st in zip(size, stride):
        idx = idx[..., None] + np.arange(s, dtype=np.int64) * (st if s > 1 else 0)
    return np.asarray(np.take(data, idx))


def tensor_from_record(data: np.ndarray, offset: Any, size: Any, stride: Any,
                       max_bytes: int = ALLOC_FLOOR) -> np.ndarray:
    """The tensor a legacy torch record describes, copied out of its flat storage ``data``.

    A record is ``(storage offset, sizes, strides)`` in elements, as ``torch`` pickles it.
    It is accepted only if the offset, sizes and strides are non-negative integers (at most
    :data:`MAX_TENSOR_DIMS` dimensions), every element it reaches lies inside ``data``
    (``offset + sum((size_i - 1) * stride_i) < len(data)``; an empty tensor needs
    ``offset <= len(data)``) and the copy and its index array fit in ``max_bytes`` (for an
    empty tensor: as if its zero sizes were one).

    Returns:
        A new array of shape ``sizes`` and the storage's dtype.

    Raises:
        UnsafePickleError: the record does not fit its storage or asks for too much memory.
    """
    return _tensor_from_record(data, offset, size, stride, _Budget(max_bytes))


def _read_torch_stream(up: "SafeUnpickler", blob: Any) -> Any:
    """Parse the legacy (non-zip) ``torch.save`` stream with the safe unpickler.

    Layout: three small pickles (magic number, protocol version, system info), the main
    pickle whose persistent ids are ``('storage', StorageType, key, location, numel,
    view_metadata)``, a pickle with the list of storage keys, then for each key an
    int64 element count followed by the raw little-endian data.
    """
    if not isinstance(blob, (bytes, bytearray)):
        raise UnsafePickleError(f"torch stream: expected bytes, got {type(blob).__name__}")
    f = io.BytesIO(blob)
    for _ in range(3):
        SafeUnpickler(f, _budget=up.budget).load()
    main = _TorchMainUnpickler(f, _budget=up.budget)
    obj = main.load()
    keys = SafeUnpickler(f, _budget=up.budget).load()
    if not isinstance(keys, (list, tuple)):
        raise UnsafePickleError(f"torch stream: expected a list of storage keys, got {type(keys).__name__}")
    storages: dict[str, np.ndarray] = {}
    for key in keys:
        key = _storage_key(key)
        if key not in main.pending or key in storages:
            raise UnsafePickleError(f"torch stream: unexpected storage key {_brief(key)}")
        head = f.read(8)
        if len(head) != 8:
            raise AssetError("truncated torch tensor data in a pickled file")
        (numel,) = struct.unpack("<q", head)
        dtype = main.pending[key].dtype
        nbytes = numel * dtype.itemsize
        if numel < 0 or nbytes > len(blob) - f.tell():
            raise AssetError("truncated torch tensor data in a pickled file")
        up.budget.charge(nbytes, f"a storage of {numel} elements")
        raw = f.read(nbytes)
        if dtype == np.bool_:
            storages[key] = np.frombuffer(raw, dtype=np.uint8) != 0
        else:
            storages[key] = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)
    if isinstance(obj, _StorageRef):
        if obj.key not in storages:
            raise UnsafePickleError(f"torch stream: no data for storage {_brief(obj.key)}")
        return _LegacyStorage(storages[obj.key])
    return obj


def _rebuild_tensor(up: "SafeUnpickler", storage: Any = None, offset: Any = 0, size: Any = (),
                    stride: Any = (), *_: Any) -> np.ndarray:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: a checked strided copy as a numpy array."""
    if not isinstance(storage, _LegacyStorage):
        raise UnsafePickleError("tensor rebuild without a parsed storage")
    return _tensor_from_record(storage.data, offset, size, stride, up.budget)


# --------------------------------------------------------------------------------------
# Guarded constructors: what a pickle may call
# --------------------------------------------------------------------------------------


class _Guarded:
    """A callable on the allow-list: ``fn(unpickler, *args)``, run only through the unpickler."""

    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn: Any) -> None:
        self.name = name
        self.fn = fn

    def __repr__(self) -> str:
        return f"<allow-listed {self.name}>"


class _NdarrayClass:
    """Stands for ``numpy.ndarray`` in a pickle: an argument of ``_reconstruct``, never called."""

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NdarrayClass()


def _shape_bytes(shape: Any, dtype: np.dtype, what: str) -> int:
    dims = shape if isinstance(shape, (tuple, list)) else (shape,)
    if len(dims) > 64:
        raise UnsafePickleError(f"{what}: {len(dims)} dimensions")
    for d in dims:
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)) or d < 0:
            raise UnsafePickleError(f"{what}: invalid shape {_brief(shape)}")
    return math.prod(int(d) for d in dims) * max(dtype.itemsize, 1)  # zero-size items count as 1


def _np_reconstruct(up: "SafeUnpickler", cls: Any, shape: Any, dtype: Any) -> np.ndarray:
    if cls is not _NDARRAY:
        raise UnsafePickleError(f"refused to reconstruct an array of class {_brief(cls)}")
    try:
        dt = np.dtype(dtype)
    except Exception as exc:
        raise UnsafePickleError(f"array with an invalid dtype {_brief(dtype)}") from exc
    up.budget.charge(_shape_bytes(shape, dt, "array") + _ENTRY_BYTES, "an array")
    return _np_core("_reconstruct")(np.ndarray, shape, dt)


def _np_scalar(up: "SafeUnpickler", dtype: Any, *obj: Any) -> Any:
    if not isinstance(dtype, np.dtype) or len(obj) > 1:
        raise UnsafePickleError("numpy scalar with an invalid dtype or payload")
    up.budget.charge(dtype.itemsize + _ENTRY_BYTES, "a numpy scalar")
    return _np_core("scalar")(dtype, *obj)


def _np_dtype(up: "SafeUnpickler", *args: Any) -> np.dtype:
    up.budget.charge(_ENTRY_BYTES * (1 + sum(_sized(a) for a in args)), "a dtype")
    return np.dtype(*args)


def _codecs_encode(up: "SafeUnpickler", obj: Any, encoding: Any = "utf-8", *_: Any) -> bytes:
    import codecs

    if not isinstance(obj, str) or not isinstance(encoding, str):
        raise UnsafePickleError("_codecs.encode: only the latin-1 encoding of a string is allowed")
    try:
        name = codecs.lookup(encoding).name
    except LookupError as exc:
        raise UnsafePickleError(f"_codecs.encode: unknown encoding {_brief(encoding)}") from exc
    if name != "iso8859-1":  # what Python 3 writes for bytes in protocols 0-2
        raise UnsafePickleError(f"_codecs.encode: encoding {_brief(encoding)} is not allowed (only latin-1)")
    up.budget.charge(len(obj), "a byte string")
    return obj.encode("latin-1")


def _byte_string(cls: type):
    def make(up: "SafeUnpickler", *args: Any) -> Any:
        if not args:
            return cls()
        src = args[0]
        if isinstance(src, (bool, np.bool_)):
            raise UnsafePickleError(f"{cls.__name__}() of a boolean")
        if isinstance(src, (int, np.integer)):
            up.budget.charge(int(src), f"{cls.__name__}({_brief(int(src))})")
            return cls(int(src))
        if isinstance(src, str):
            if len(args) < 2:
                raise UnsafePickleError(f"{cls.__name__}() of a string without an encoding")
            up.budget.charge(4 * len(src), f"a {cls.__name__}")
            return cls(src, *args[1:3])
        if isinstance(src, (bytes, bytearray, list, tuple)):
            up.budget.charge(len(src), f"a {cls.__name__}")
            return cls(src)
        raise UnsafePickleError(f"{cls.__name__}() of a {type(src).__name__}")

    return make


def _container(cls: type):
    def make(up: "SafeUnpickler", *args: Any) -> Any:
        up.budget.charge(_ENTRY_BYTES * (1 + sum(_sized(a) for a in args)), f"a {cls.__name__}")
        return cls(*args)

    return make


_SPARSE_NAMES = ("csc_matrix", "csr_matrix", "coo_matrix")
_SPARSE_CLASSES = tuple(getattr(sp, n) for n in _SPARSE_NAMES)


def _guarded_reconstructor(up: "SafeUnpickler", cls: Any, base: Any, state: Any = None) -> Any:
    """``copyreg._reconstructor`` (protocols 0-1) restricted to chumpy stand-ins and sparse matrices."""
    if not (isinstance(cls, type) and (issubclass(cls, ChumpyStub) or cls in _SPARSE_CLASSES)):
        raise UnsafePickleError(f"refused to reconstruct {_brief(cls)}")
    if base is not object:
        raise UnsafePickleError(f"refused to reconstruct with base {_brief(base)}")
    return object.__new__(cls)


_GUARDED = {
    "_reconstruct": _Guarded("numpy _reconstruct", _np_reconstruct),
    "scalar": _Guarded("numpy scalar", _np_scalar),
    "dtype": _Guarded("numpy.dtype", _np_dtype),
    "encode": _Guarded("_codecs.encode", _codecs_encode),
    "bytes": _Guarded("bytes", _byte_string(bytes)),
    "bytearray": _Guarded("bytearray", _byte_string(bytearray)),
    "set": _Guarded("set", _container(set)),
    "frozenset": _Guarded("frozenset", _container(frozenset)),
    "OrderedDict": _Guarded("OrderedDict", _container(collections.OrderedDict)),
    "_reconstructor": _Guarded("copyreg._reconstructor", _guarded_reconstructor),
    "_rebuild_tensor_v2": _Guarded("torch._utils._rebuild_tensor_v2", _rebuild_tensor),
    "_load_from_bytes": _Guarded("torch.storage._load_from_bytes", _read_torch_stream),
}


# --------------------------------------------------------------------------------------
# The allow-list unpickler
# --------------------------------------------------------------------------------------


def _allowed_global(module: str, name: str) -> Any:
    """Resolve ``module.name`` if it is on the allow-list, else ``None``."""
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
        return _GUARDED[name]
    if module == "numpy" and name == "ndarray":
        return _NDARRAY
    if module == "numpy" and name == "dtype":
        return _GUARDED["dtype"]
    if module.startswith("scipy.sparse") and name in _SPARSE_NAMES:
        return getattr(sp, name)  # old pickles say scipy.sparse.csc, new ones scipy.sparse._csc
    if (module, name) == ("_codecs", "encode"):
        return _GUARDED["encode"]
    if module in ("__builtin__", "builtins"):
        if name in ("set", "frozenset", "bytes", "bytearray"):
            return _GUARDED[name]
        if name in ("object", "slice"):
            return {"object": object, "slice": slice}[name]
    if module in ("copy_reg", "copyreg") and name == "_reconstructor":
        return _GUARDED["_reconstructor"]
    if module == "collections" and name == "OrderedDict":
        return _GUARDED["OrderedDict"]
    if module == "chumpy" or module.startswith("chumpy."):
        return _chumpy_class(module, name)
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
        return _GUARDED[name]
    if module == "torch.storage" and name == "_load_from_bytes":
        return _GUARDED[name]
    if module == "torch" and name in _TORCH_STORAGE_DTYPES:
        return _StorageType(name)
    return None


def _callable_name(func: Any) -> str:
    if isinstance(func, _Guarded):
        return func.name
    if isinstance(func, (_NdarrayClass, _StorageType)):
        return repr(func) if isinstance(func, _NdarrayClass) else f"torch.{func.name}"
    name = getattr(func, "__qualname__", None)
    return (name if isinstance(name, str) else type(func).__name__)[:80]


def _array_state_bytes(state: Any) -> int:
    """Bytes an ``ndarray.__setstate__(state)`` produces (``([version,] shape, dtype, fortran, data)``)."""
    if not (isinstance(state, tuple) and len(state) in (4, 5) and isinstance(state[-3], np.dtype)):
        raise UnsafePickleError("malformed numpy array state")
    return _shape_bytes(state[-4], state[-3], "array state")


def _check_sparse(m: Any) -> int:
    """Check a sparse matrix built from a pickle; return the bytes of its dense form."""
    shape = m.__dict__.get("_shape")
    if not (isinstance(shape, tuple) and len(shape) == 2
            and all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise UnsafePickleError(f"sparse matrix with an invalid shape {_brief(shape)}")
    data = getattr(m, "data", None)
    if not (isinstance(data, np.ndarray) and data.ndim == 1 and data.dtype.kind in "biuf"):
        raise UnsafePickleError("sparse matrix without a 1-D numeric data array")
    if isinstance(m, (sp.csc_matrix, sp.csr_matrix)):
        for name in ("indices", "indptr"):
            arr = getattr(m, name, None)
            if not (isinstance(arr, np.ndarray) and arr.ndim == 1 and arr.dtype.kind in "iu"):
                raise UnsafePickleError(f"sparse matrix: '{name}' is not a 1-D integer array")
        try:
            m.check_format(full_check=True)
        except Exception as exc:
            raise UnsafePickleError(f"malformed sparse matrix: {_first_line(exc)}") from exc
    else:  # coo: one index array per axis, each inside its dimension
        coords = getattr(m, "coords", None)
        if not (isinstance(coords, tuple) and len(coords) == 2):
            raise UnsafePickleError("sparse matrix: malformed coordinates")
        for axis, (idx, dim) in enumerate(zip(coords, shape)):
            if not (isinstance(idx, np.ndarray) and idx.ndim == 1 and idx.dtype.kind in "iu"
                    and len(idx) == len(data)):
                raise UnsafePickleError(f"sparse matrix: axis {axis} indices are not a 1-D integer "
                                        "array as long as the data")
            if len(idx) and (idx.min() < 0 or idx.max() >= dim):
                raise UnsafePickleError(f"sparse matrix: axis {axis} index outside [0, {dim})")
    return int(shape[0]) * int(shape[1]) * data.itemsize


def _check_loaded(root: Any, budget: _Budget) -> None:
    """Walk what a pickle produced; check every sparse matrix (the loaders make them dense)."""
    seen: set[int] = set()
    todo = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, dict):
            todo.extend(obj.keys())
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo.extend(obj)
        elif isinstance(obj, ChumpyStub):
            todo.append(obj._state)
        elif isinstance(obj, _SPARSE_CLASSES):
            budget.charge(_check_sparse(obj), "the dense form of a sparse matrix")
        elif isinstance(obj, np.ndarray) and obj.dtype.hasobject:
            todo.extend(obj.ravel().tolist())


class SafeUnpickler(pickle._Unpickler):
    """Unpickler that resolves only allow-listed globals and checks every call (module docstring).

    Args:
        file: the pickle stream; anything but an ``io.BytesIO`` is read to its end first.
        encoding: for Python 2 ``str`` objects (``latin1``: their bytes unchanged).
        alloc_limit: bytes the load may allocate through constructors; default
            :data:`ALLOC_FLOOR` + :data:`ALLOC_PER_BYTE` times the stream's size.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any, *, encoding: str = "latin1", alloc_limit: int | None = None,
                 _budget: _Budget | None = None) -> None:
        stream = file if isinstance(file, io.BytesIO) else io.BytesIO(file.read())
        super().__init__(stream, encoding=encoding)
        if _budget is None:
            here = stream.tell()
            size = stream.seek(0, io.SEEK_END) - here
            stream.seek(here)
            _budget = _Budget(ALLOC_FLOOR + ALLOC_PER_BYTE * size if alloc_limit is None else alloc_limit)
        self.budget = _budget

    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed_global(module, name)
        if obj is None:
            raise UnsafePickleError(
                f"refused to load pickled object {module}.{name}: not on the allow-list "
                "(FLAME and landmark files only hold numpy, scipy.sparse and chumpy data)"
            )
        return obj

    def load(self) -> Any:
        obj = super().load()
        _check_loaded(obj, self.budget)
        return obj

    # ---- every call a pickle makes goes through _call
    def _call(self, func: Any, args: Any) -> Any:
        if not isinstance(args, tuple):
            raise UnsafePickleError("call arguments in a pickle must be a tuple")
        if isinstance(func, _Guarded):
            return func.fn(self, *args)
        if isinstance(func, type) and issubclass(func, ChumpyStub):
            return func()
        if func is object or func is slice:
            return func(*args)
        raise UnsafePickleError(f"refused to call {_callable_name(func)} from a pickle")

    def _new(self, cls: Any, args: Any, kwargs: Any = None) -> Any:
        if not isinstance(cls, type) or kwargs:
            raise UnsafePickleError(f"refused to create {_callable_name(cls)} from a pickle")
        if issubclass(cls, ChumpyStub):
            return cls.__new__(cls)
        if (cls is object or cls in _SPARSE_CLASSES) and args == ():
            return object.__new__(cls)
        raise UnsafePickleError(f"refused to create {_callable_name(cls)} from a pickle")

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def _instantiate(self, klass: Any, args: Any) -> None:
        self.append(self._call(klass, tuple(args)))

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, kwargs))

    def load_build(self) -> None:
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, np.ndarray) and type(inst) is np.ndarray:
            self.budget.charge(_array_state_bytes(state) + _ENTRY_BYTES, "an array")
        elif isinstance(inst, (ChumpyStub, np.dtype) + _SPARSE_CLASSES):
            self.budget.charge(_ENTRY_BYTES * (1 + _sized(state)), "an object state")
        else:
            raise UnsafePickleError(f"refused to set the state of a {type(inst).__name__} from a pickle")
        super().load_build()

    def _target(self, kind: type | tuple[type, ...], what: str) -> Any:
        target = self.stack[-1]
        if not isinstance(target, kind):
            raise UnsafePickleError(f"refused to {what} a {type(target).__name__} from a pickle")
        return target

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._target(dict, "set items of")[key] = value

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = self._target(dict, "set items of")
        for i in range(0, len(items) - 1, 2):
            target[items[i]] = items[i + 1]

    def load_append(self) -> None:
        value = self.stack.pop()
        self._target(list, "append to").append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._target(list, "append to").extend(items)

    def load_additems(self) -> None:
        items = self.pop_mark()
        self._target(set, "add items to").update(items)

    def load_bytearray8(self) -> None:
        (n,) = struct.unpack("<Q", self.read(8))
        self.budget.charge(n, "a bytearray")
        data = self.read(n)
        if len(data) != n:
            raise AssetError("pickle data was truncated")
        self.append(bytearray(data))


for _op, _method in (
    (pickle.REDUCE, SafeUnpickler.load_reduce),
    (pickle.NEWOBJ, SafeUnpickler.load_newobj),
    (pickle.NEWOBJ_EX, SafeUnpickler.load_newobj_ex),
    (pickle.BUILD, SafeUnpickler.load_build),
    (pickle.SETITEM, SafeUnpickler.load_setitem),
    (pickle.SETITEMS, SafeUnpickler.load_setitems),
    (pickle.APPEND, SafeUnpickler.load_append),
    (pickle.APPENDS, SafeUnpickler.load_appends),
    (pickle.ADDITEMS, SafeUnpickler.load_additems),
    (pickle.BYTEARRAY8, SafeUnpickler.load_bytearray8),
):
    SafeUnpickler.dispatch[_op[0]] = _method
del _op, _method


class _TorchMainUnpickler(SafeUnpickler):
    """The main pickle of a torch stream: storages are persistent ids, recorded in ``pending``."""

    def __init__(self, file: Any, *, _budget: _Budget) -> None:
        super().__init__(file, _budget=_budget)
        self.pending: dict[str, _StorageType] = {}

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise UnsafePickleError(f"unsupported persistent id in torch stream: {_brief(pid)}")
        storage_type, key = pid[1], _storage_key(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"unsupported storage type in torch stream: {_brief(storage_type)}")
        if key in self.pending and self.pending[key].dtype != storage_type.dtype:
            raise UnsafePickleError(f"torch stream: storage {_brief(key)} declared with two dtypes")
        self.pending[key] = storage_type
        return _StorageRef(key)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unpickle(data: bytes, where: Path, alloc_limit: int | None = None, what: str = "pickle") -> Any:
    """Unpickle ``data`` read from ``where``: one-line errors that name the file."""
    try:
        return SafeUnpickler(io.BytesIO(data), alloc_limit=alloc_limit).load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{where}: {_first_line(exc)}") from exc
    except Exception as exc:  # malformed streams raise many types (MemoryError, RecursionError too)
        raise AssetError(f"cannot read {what} {where}: {_first_line(exc)}") from exc


def safe_load_pickle(path: str | os.PathLike, *, alloc_limit: int | None = None) -> Any:
    """Load a pickle file through :class:`SafeUnpickler` (``latin1`` for Python-2 pickles)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AssetError(f"cannot read pickle {path}: {exc.strerror or exc}") from exc
    return _unpickle(data, path, alloc_limit)


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


_FLAME_FLOAT_KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "weights")


def _numeric(value: Any, key: str, path: Path) -> np.ndarray:
    """The values of array ``key`` (a sparse matrix's stored values); non-numeric ones are refused."""
    arr = value.data if sp.issparse(value) else value
    try:
        arr = np.asarray(arr)
    except Exception as exc:
        raise AssetError(f"{path}: '{key}' is not an array ({_first_line(exc)})") from exc
    if arr.dtype.kind not in "biuf":
        raise AssetError(f"{path}: '{key}' is not a numeric array (dtype {arr.dtype})")
    return arr


def _integral(arr: np.ndarray) -> bool:
    return arr.dtype.kind in "biu" or bool(np.isfinite(arr).all() and (arr == np.round(arr)).all())


def _check_flame_arrays(data: dict[str, Any], path: Path) -> None:
    """Finite bases; faces that index existing vertices; a kinematic tree in topological order."""
    for key in _FLAME_FLOAT_KEYS:
        arr = _numeric(data[key], key, path)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise AssetError(f"{path}: '{key}' holds NaN or infinite values")
    v = _numeric(data["v_template"], "v_template", path)
    if v.ndim != 2 or v.shape[1] != 3:
        raise AssetError(f"{path}: 'v_template' has shape {v.shape}, expected (V, 3)")
    f = _numeric(data["f"], "f", path)
    if f.ndim != 2 or f.shape[1] != 3 or not _integral(f):
        raise AssetError(f"{path}: 'f' must be an (F, 3) array of vertex indices, got {f.dtype} {f.shape}")
    if f.size and (f.min() < 0 or f.max() >= len(v)):
        raise AssetError(f"{path}: 'f' indexes vertices outside [0, {len(v)}) (min {f.min()}, max {f.max()})")
    tree = _numeric(data["kintree_table"], "kintree_table", path)
    if tree.ndim != 2 or tree.shape[0] != 2 or tree.shape[1] < 1 or not _integral(tree):
        raise AssetError(f"{path}: 'kintree_table' must be a (2, J) integer array, got {tree.dtype} {tree.shape}")
    parents = tree[0, 1:].astype(np.float64)
    if ((parents < 0) | (parents >= np.arange(1, tree.shape[1]))).any():
        raise AssetError(f"{path}: 'kintree_table' is not a tree with each joint after its parent")


def load_flame_model(path: str | os.PathLike) -> dict[str, Any]:
    """Load a FLAME model file (``.pkl`` of FLAME2020/2023, or our ``.npz`` export).

    Returns a dict with at least :data:`FLAME_KEYS`, with chumpy objects turned into
    ``np.ndarray`` and ``J_regressor`` kept as stored (dense array or scipy sparse).
    The arrays are checked: numeric, finite bases, faces ``(F, 3)`` inside the vertices,
    a kinematic tree whose joints come after their parents.

    Raises:
        AssetError: the file is missing, unreadable, lacks a key, holds a derived chumpy
            expression where an array is expected, or an array fails the checks (the
            message names the file and the key).
        UnsafePickleError: the pickle references a global outside the allow-list, or asks
            for more memory or data than it may.
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
        if not all(isinstance(k, str) for k in data):
            raise AssetError(f"{path}: expected a dict with string keys")
        data = {k: _to_plain(k, v, path) for k, v in data.items()}
    missing = [k for k in FLAME_KEYS if k not in data]
    if missing:
        raise AssetError(f"{path}: not a FLAME model, missing keys {missing}")
    _check_flame_arrays(data, path)
    return data


def read_npy_pickle(path: str | os.PathLike, what: str) -> Any:
    """The object inside an object-dtype ``.npy`` (as ``np.save`` writes a dict), read safely.

    The payload after the ``.npy`` header goes through :class:`SafeUnpickler` instead of
    ``np.load(allow_pickle=True)``, so the file can hold data but never run code.

    Raises:
        AssetError: unreadable file or not an object array.
        UnsafePickleError: the pickle names a global outside the allow-list, or asks for more
            memory or data than it may.
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
            payload = f.read()
    except AssetError:
        raise
    except Exception as exc:
        raise AssetError(f"cannot read {what} {path}: {_first_line(exc)}") from exc
    return _unpickle(payload, Path(path), what=what)


#: Shapes of the landmark embedding's arrays (leading axes of length 1 are allowed): 51 static
#: landmarks, 17 contour landmarks for each of 79 yaw angles (-39..39 degrees), the full 68.
_LANDMARK_SHAPES = {
    "static_lmk_faces_idx": (51,),
    "static_lmk_bary_coords": (51, 3),
    "dynamic_lmk_faces_idx": (79, 17),
    "dynamic_lmk_bary_coords": (79, 17, 3),
    "full_lmk_faces_idx": (68,),
    "full_lmk_bary_coords": (68, 3),
}
_LANDMARK_KEYS = tuple(_LANDMARK_SHAPES)


def _check_landmark_array(arr: np.ndarray, key: str, path: Path) -> None:
    want = _LANDMARK_SHAPES[key]
    shape = list(arr.shape)
    while len(shape) > len(want) and shape[0] == 1:
        shape.pop(0)
    if tuple(shape) != want:
        raise AssetError(f"{path}: '{key}' has shape {arr.shape}, expected {want}")
    arr = _numeric(arr, key, path)
    if key.endswith("_faces_idx"):
        if not _integral(arr):
            raise AssetError(f"{path}: '{key}' must hold integer face indices")
    elif not (arr.dtype.kind == "f" and np.isfinite(arr).all()):
        raise AssetError(f"{path}: '{key}' must hold finite barycentric coordinates")


def load_landmark_embedding(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a DECA/MICA-style ``landmark_embedding.npy`` without ``allow_pickle`` risks.

    The file is a 0-d object array holding a pickled dict; its dynamic entries are
    legacy-serialised torch tensors. The payload after the ``.npy`` header is read by
    :class:`SafeUnpickler`, so torch is not needed and no code can run.

    Returns:
        dict of numpy arrays with the six ``*_lmk_*`` keys (see the module docstring), as
        stored, each checked: the shapes of :data:`_LANDMARK_SHAPES`, integer face indices,
        finite barycentric coordinates.

    Raises:
        AssetError: missing or unreadable file, a missing key, or an array failing the checks.
        UnsafePickleError: see :func:`read_npy_pickle`.
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
    out = {}
    for k in _LANDMARK_KEYS:
        try:
            out[k] = np.asarray(obj[k])
        except Exception as exc:
            raise AssetError(f"{path}: '{k}' is not an array ({_first_line(exc)})") from exc
        _check_landmark_array(out[k], k, path)
    return out


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
