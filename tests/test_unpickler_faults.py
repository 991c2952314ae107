"""Hostile pickles against the allow-list unpickler: tensor records, allocations, crafted assets.

The fault corpus is built here, in temporary folders: tensor records with fuzzed and
hand-picked offsets, sizes, strides and dtypes; pickles that ask for huge allocations or
repeat a cheap one many times; FLAME ``.pkl``, ``FLAME_masks.pkl`` and
``landmark_embedding.npy`` files carrying them. Each load must either give exactly the right
values or stop with the project's one-line error, never crash or read outside a buffer.
"""

from __future__ import annotations

import collections
import math
import pickle
import struct
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from ofer.errors import AssetError, OferError, UnsafePickleError
from ofer.flame import load_flame_model, load_landmark_embedding
from ofer.flame.assets import safe_load_pickle, tensor_from_record
from ofer.nets.rank_mlp import load_vertex_indices
from ofer.world.head import build_synthetic_flame, write_flame_pickle, write_landmark_embedding

DTYPES = (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_)
TORCH_DTYPES = {np.float64: torch.float64, np.float32: torch.float32, np.float16: torch.float16,
                np.int64: torch.int64, np.int32: torch.int32, np.int16: torch.int16, np.int8: torch.int8,
                np.uint8: torch.uint8, np.bool_: torch.bool}


def one_line_error(excinfo) -> None:
    assert isinstance(excinfo.value, OferError)
    text = str(excinfo.value)
    assert text and "\n" not in text


# ------------------------------------------------------------------------ the reference
def expected_indices(n, offset, size, stride, itemsize, max_bytes):
    """Naive reference: the flat storage index of every element, or None for a refused record.

    A record is valid when offset, sizes and strides are non-negative integers (one stride per
    size, at most 32 dims), the copy fits ``max_bytes`` (element + int64 index each, zero sizes
    counted as one) and every
    element it reaches, enumerated one by one, is inside the storage (an empty tensor: the
    offset is at most the storage length).
    """
    if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))):
        return None
    if len(size) != len(stride) or len(size) > 32:
        return None
    if not all(type(v) is int for v in (offset, *size, *stride)):
        return None
    if offset < 0 or any(s < 0 for s in size) or any(st < 0 for st in stride):
        return None
    numel = math.prod(size)
    if math.prod(max(s, 1) for s in size) * (itemsize + 8) > max_bytes:
        return None
    if numel == 0:
        return np.zeros(size, dtype=np.int64) if offset <= n else None
    out = np.empty(size, dtype=np.int64)
    for ix in np.ndindex(*size):
        k = offset + sum(i * st for i, st in zip(ix, stride))
        if k >= n:
            return None
        out[ix] = k
    return out


def storage_data(rng, dtype, n):
    if dtype == np.bool_:
        return rng.integers(0, 2, n).astype(bool)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -1000), min(info.max, 1000), n, endpoint=True).astype(dtype)
    return rng.standard_normal(n).astype(dtype)


def random_record(rng, n):
    ndim = int(rng.integers(0, 5))
    size = [int(rng.integers(0, 6)) for _ in range(ndim)]
    stride = [int(rng.integers(0, 12)) for _ in range(ndim)]
    offset = int(rng.integers(0, n + 4))
    if ndim and rng.random() < 0.1:
        size[int(rng.integers(ndim))] = int(rng.choice([-1, -5, 2**31, 2**40, 2**63]))
    if ndim and rng.random() < 0.1:
        stride[int(rng.integers(ndim))] = int(rng.choice([-1, -3, 2**33, 2**62, 2**64 + 1]))
    if rng.random() < 0.05:
        offset = int(rng.choice([-1, -n - 1, 2**63, 2**100]))
    if rng.random() < 0.04:
        bad = [1.5, None, "3", True, np.float32(2.0)][int(rng.integers(5))]
        where = int(rng.integers(3))
        if where == 0:
            offset = bad
        elif ndim:
            (size if where == 1 else stride)[int(rng.integers(ndim))] = bad
    if rng.random() < 0.02:
        stride = stride + [1]
    return offset, tuple(size), tuple(stride)


# Hand-written worst cases: (storage length, offset, size, stride).
WORST_CASES = [
    (10, 0, (2**62,), (0,)),                    # huge size, stride 0: one element, 2^62 copies
    (10, 0, (2**40, 2**40), (0, 0)),            # element count beyond int64
    (10, 10, (1,), (1,)),                        # offset at the end
    (10, 11, (0,), (1,)),                        # empty, but offset past the end
    (10, 10, (0, 3), (1, 1)),                    # empty at the end: allowed
    (10, 2**63, (1,), (1,)),                     # offset beyond int64
    (10, -1, (1,), (1,)),                        # negative offset (would read from the end)
    (10, 9, (3,), (-1,)),                        # negative stride, inside the storage: refused
    (10, 0, (-1,), (1,)),                        # negative size
    (10, 0, (2**33,), (2**31,)),                 # size * stride overflows int64 to a small value
    (10, 0, (2,), (2**64 + 1,)),                 # stride wraps to 1 in 64 bits
    (10, 0, (3, 2), (2**63 - 1, 1)),            # one step of the first dim is far outside
    (5, 2, (1, 3), (2**70, 1)),                  # a size-1 dim: its stride is never used: valid
    (5, 4, (), ()),                              # 0-d, last element: valid
    (5, 5, (), ()),                              # 0-d, past the end
    (0, 0, (1,), (1,)),                          # empty storage
    (4, 0, (1,) * 33, (1,) * 33),                # too many dims
    (4, 0, (2, 2), (1,)),                        # stride count differs
    (4, 1.0, (1,), (1,)),                        # non-integer offset
    (4, 0, ("3",), (1,)),                        # non-integer size
    (4, 0, (True,), (1,)),                       # a boolean is not a size
    (4, 0, (2,), (None,)),                       # missing stride
]


def check_record(data, offset, size, stride, max_bytes, load):
    """Load through ``load(offset, size, stride)``; compare with the naive reference and numpy's view."""
    want = expected_indices(data.shape[0], offset, size, stride, data.itemsize, max_bytes)
    if want is None:
        with pytest.raises(UnsafePickleError) as excinfo:
            load(offset, size, stride)
        one_line_error(excinfo)
        return False
    got = load(offset, size, stride)
    assert isinstance(got, np.ndarray) and got.dtype == data.dtype and got.shape == tuple(size)
    np.testing.assert_array_equal(got, data[want])
    if want.size and all(st < 2**40 for st in stride):  # numpy's own view of a valid record
        view = np.lib.stride_tricks.as_strided(data[offset:], shape=size,
                                               strides=[st * data.itemsize for st in stride])
        np.testing.assert_array_equal(got, view)
    return True


def test_random_and_adversarial_tensor_records_load_exactly_or_are_refused():
    rng = np.random.default_rng(20240518)
    max_bytes = 64 * 1024
    outcomes = collections.Counter()
    for _ in range(3000):
        dtype = DTYPES[int(rng.integers(len(DTYPES)))]
        data = storage_data(rng, dtype, int(rng.integers(0, 40)))
        offset, size, stride = random_record(rng, data.shape[0])
        ok = check_record(data, offset, size, stride, max_bytes,
                          lambda o, s, st: tensor_from_record(data, o, s, st, max_bytes))
        outcomes[ok] += 1
    assert outcomes[True] > 600 and outcomes[False] > 600  # both sides of the contract exercised
    for n, offset, size, stride in WORST_CASES:
        data = storage_data(rng, np.float32, n)
        check_record(data, offset, size, stride, max_bytes,
                     lambda o, s, st: tensor_from_record(data, o, s, st, max_bytes))


def test_worst_cases_have_the_expected_outcome():
    data = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(tensor_from_record(np.arange(5.0), 2, (1, 3), (2**70, 1)), [[2, 3, 4]])
    assert tensor_from_record(data, 10, (0, 3), (1, 1)).shape == (0, 3)
    for offset, size, stride in [(10, (1,), (1,)), (9, (3,), (-1,)), (0, (2**33,), (2**31,)),
                                 (0, (2**62,), (0,)), (-1, (1,), (1,))]:
        with pytest.raises(UnsafePickleError):
            tensor_from_record(data, offset, size, stride)


# ------------------------------------------------------------------- records in files
class Record:
    """Pickles as torch's tensor rebuild with an arbitrary (offset, size, stride) record."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict()))


def typed_storage(data: np.ndarray):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated, but it is what old files hold
        return torch.from_numpy(data.copy()).to(TORCH_DTYPES[data.dtype.type]).storage()


def dump(obj, path, protocol=2):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.mark.parametrize("protocol", [2, 3])
def test_tensor_records_in_pickle_files(tmp_path, protocol):
    rng = np.random.default_rng(7)
    cases = [(n, o, s, st) for n, o, s, st in WORST_CASES if n > 0]
    while len(cases) < 60:
        n = int(rng.integers(1, 30))
        o, s, st = random_record(rng, n)
        if all(type(v) is int and 0 <= v < 2**30 for v in s) and math.prod(s) <= 512:
            cases.append((n, o, s, st))
    for i, (n, offset, size, stride) in enumerate(cases):
        data = storage_data(rng, DTYPES[i % len(DTYPES)], n)
        path = dump({"t": Record(typed_storage(data), offset, size, stride)}, tmp_path / f"r{i}.pkl", protocol)
        check_record(data, offset, size, stride, 2**28, lambda *_: safe_load_pickle(path)["t"])


def test_storage_that_is_not_a_storage_is_refused(tmp_path):
    path = dump({"t": Record(np.arange(4.0), 0, (2,), (1,))}, tmp_path / "s.pkl")
    with pytest.raises(UnsafePickleError) as excinfo:
        safe_load_pickle(path)
    one_line_error(excinfo)
    assert str(path) in str(excinfo.value)


# ------------------------------------------------------------------- allocation caps
def g(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def p_int(n):
    return pickle.dumps(n, protocol=2)[2:-1]


def p_tuple(*items):
    return b"(" + b"".join(items) + b"t"


HOSTILE = {
    "bytes(n)": b"\x80\x02" + g("__builtin__", "bytes") + p_tuple(p_int(2**40)) + b"R.",
    "bytearray(n)": b"\x80\x02" + g("builtins", "bytearray") + p_tuple(p_int(2**36)) + b"R.",
    "BYTEARRAY8 opcode": b"\x80\x05\x96" + struct.pack("<Q", 2**40) + b".",
    "numpy _reconstruct": b"\x80\x02" + g("numpy._core.multiarray", "_reconstruct")
                          + p_tuple(g("numpy", "ndarray"), p_tuple(p_int(2**20), p_int(2**20)),
                                    pickle.dumps(b"f8", protocol=3)[2:-1]) + b"R.",
    "numpy scalar of a huge dtype": b"\x80\x02" + g("numpy.core.multiarray", "scalar")
                                    + p_tuple(g("numpy", "dtype") + p_tuple(
                                        p_tuple(pickle.dumps("f8", protocol=2)[2:-1], p_tuple(p_int(2**27))))
                                        + b"R") + b"R.",
    "ndarray called": b"\x80\x02" + g("numpy", "ndarray") + p_tuple(p_tuple(p_int(2**40))) + b"R.",
    "ndarray created": b"\x80\x02" + g("numpy", "ndarray") + p_tuple(p_tuple(p_int(2**40))) + b"\x81.",
    "bytes created": b"\x80\x02" + g("builtins", "bytes") + p_tuple(p_int(2**40)) + b"\x81.",
    "sparse matrix called": b"\x80\x02" + g("scipy.sparse", "csr_matrix")
                            + p_tuple(p_tuple(p_int(1), p_int(2**40))) + b"R.",
    "hex codec doubling": b"\x80\x02" + g("_codecs", "encode")
                          + p_tuple(pickle.dumps("ab", protocol=2)[2:-1], pickle.dumps("hex", protocol=2)[2:-1])
                          + b"R.",
    "reconstructor with ndarray base": b"\x80\x02" + g("copy_reg", "_reconstructor")
                                       + p_tuple(g("numpy", "ndarray"), g("numpy", "ndarray"),
                                                 p_tuple(p_int(2**40))) + b"R.",
    "array state larger than its data": b"\x80\x02" + g("numpy._core.multiarray", "_reconstruct")
                                        + p_tuple(g("numpy", "ndarray"), p_tuple(p_int(0)),
                                                  pickle.dumps(b"b", protocol=3)[2:-1]) + b"R"
                                        + p_tuple(p_int(1), p_tuple(p_int(2**40)),
                                                  g("numpy", "dtype") + p_tuple(pickle.dumps("f8", protocol=2)[2:-1])
                                                  + b"R", b"\x89", pickle.dumps(b"", protocol=3)[2:-1]) + b"b.",
    "state set on a storage marker": b"\x80\x02" + g("torch", "FloatStorage") + b"}b.",
    "items set on a set": b"\x80\x02" + g("builtins", "set") + p_tuple(b"]") + b"R" + p_int(1) + p_int(2) + b"s.",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_pickles_are_refused_in_one_line(tmp_path, name):
    path = tmp_path / "h.pkl"
    path.write_bytes(HOSTILE[name])
    with pytest.raises(UnsafePickleError) as excinfo:
        safe_load_pickle(path)
    one_line_error(excinfo)


def test_many_cheap_calls_are_charged_together(tmp_path):
    # one list of 20k entries in the file, then 5k set() calls on it through the memo
    body = b"\x80\x02" + b"]q\x00(" + b"K\x01" * 20000 + b"e" + g("builtins", "set") + b"q\x01"
    body += b"(" + (b"h\x01h\x00\x85R0" * 5000) + b"1N."
    path = tmp_path / "amp.pkl"
    path.write_bytes(body)
    with pytest.raises(UnsafePickleError, match="beyond"):
        safe_load_pickle(path)
    path.write_bytes(b"\x80\x02" + b"]q\x00(" + b"K\x01" * 20000 + b"e" + g("builtins", "set")
                     + b"h\x00\x85R.")
    assert safe_load_pickle(path) == {1}  # one call is fine
    with pytest.raises(UnsafePickleError):
        safe_load_pickle(path, alloc_limit=1000)


def test_sparse_matrix_with_indices_outside_its_shape_is_refused(tmp_path):
    model = build_synthetic_flame(n_vertices=300, seed=2)
    bad = model["J_regressor"].copy()
    bad.indices = bad.indices.copy()
    bad.indices[0] = 10**6  # toarray() of this would write outside the dense array
    path = write_flame_pickle(tmp_path / "m.pkl", {**model, "J_regressor": bad})
    with pytest.raises(UnsafePickleError, match="sparse") as excinfo:
        load_flame_model(path)
    one_line_error(excinfo)
    huge = sp.csc_matrix((np.ones(1), np.zeros(1, np.int32), np.array([0, 1] + [1] * 4, np.int32)),
                         shape=(2**40, 5))
    with pytest.raises(UnsafePickleError):
        safe_load_pickle(dump({"J": huge}, tmp_path / "huge.pkl"))


# ------------------------------------------------------------------- crafted assets
@pytest.fixture(scope="module")
def model():
    return build_synthetic_flame(n_vertices=300, seed=1)


def test_crafted_flame_pickle_is_refused(tmp_path, model):
    storage = typed_storage(np.zeros(4, np.float64))
    for i, rec in enumerate([Record(storage, 0, (model["v_template"].shape[0], 3), (3, 1)),  # past the end
                             Record(storage, 0, (2**40, 3), (0, 0))]):  # memory
        path = tmp_path / f"m{i}.pkl"
        write_flame_pickle(path, {**model, "v_template": rec}, chumpy_keys=())
        with pytest.raises(UnsafePickleError) as excinfo:
            load_flame_model(path)
        one_line_error(excinfo)
        assert str(path) in str(excinfo.value)


def test_crafted_masks_pickle_is_refused(tmp_path, model):
    storage = typed_storage(np.arange(10, dtype=np.int64))
    good = dump({"face": Record(storage, 2, (4,), (2,))}, tmp_path / "good_masks.pkl")
    assert load_vertex_indices(good).tolist() == [2, 4, 6, 8]
    for i, rec in enumerate([Record(storage, 2, (5,), (2,)), Record(storage, 0, (2**50,), (0,)),
                             Record(storage, 12, (0,), (1,))]):
        path = dump({"face": rec, "nose": np.arange(3)}, tmp_path / f"FLAME_masks{i}.pkl")
        with pytest.raises(UnsafePickleError) as excinfo:
            load_vertex_indices(path)
        one_line_error(excinfo)


def test_crafted_landmark_embedding_is_refused(tmp_path, model):
    lmk = dict(model["landmarks"])
    bary = np.asarray(lmk["dynamic_lmk_bary_coords"], np.float32)
    storage = typed_storage(bary.ravel())
    ok = write_landmark_embedding(tmp_path / "ok.npy",
                                  {**lmk, "dynamic_lmk_bary_coords": Record(storage, 0, (79, 17, 3), (51, 3, 1))})
    np.testing.assert_array_equal(load_landmark_embedding(ok)["dynamic_lmk_bary_coords"], bary)
    for i, rec in enumerate([Record(storage, 1, (79, 17, 3), (51, 3, 1)),  # one element past the end
                             Record(storage, 0, (79, 17, 3), (-51, 3, 1)),
                             Record(storage, 0, (79, 17, 3 * 2**40), (51, 3, 0))]):
        path = write_landmark_embedding(tmp_path / f"l{i}.npy", {**lmk, "dynamic_lmk_bary_coords": rec})
        with pytest.raises(UnsafePickleError) as excinfo:
            load_landmark_embedding(path)
        one_line_error(excinfo)
        assert str(path) in str(excinfo.value)


def test_truncated_and_corrupt_torch_streams_are_one_line_errors(tmp_path):
    data = np.arange(8, dtype=np.float32)
    raw = dump({"t": Record(typed_storage(data), 0, (8,), (1,))}, tmp_path / "t.pkl", protocol=3).read_bytes()
    numel_at = raw.index(struct.pack("<q", 8) + data.tobytes())  # element count before the raw data
    corrupt = [raw[:len(raw) // 2],  # the outer pickle cut short
               raw[:numel_at + 12],  # the storage data cut short
               raw[:numel_at] + struct.pack("<q", -1) + raw[numel_at + 8:],  # negative element count
               raw[:numel_at] + struct.pack("<q", 2**40) + raw[numel_at + 8:]]  # more than there is
    for i, blob in enumerate(corrupt):
        (tmp_path / f"c{i}.pkl").write_bytes(blob)
        with pytest.raises((AssetError, UnsafePickleError)) as excinfo:
            safe_load_pickle(tmp_path / f"c{i}.pkl")
        one_line_error(excinfo)


def test_zero_size_items_do_not_make_huge_arrays_free(tmp_path):
    body = (b"\x80\x02" + g("numpy._core.multiarray", "_reconstruct")
            + p_tuple(g("numpy", "ndarray"), p_tuple(p_int(2**40)),
                      g("numpy", "dtype") + p_tuple(pickle.dumps("V0", protocol=2)[2:-1]) + b"R") + b"R.")
    (tmp_path / "v0.pkl").write_bytes(body)
    with pytest.raises(UnsafePickleError):
        safe_load_pickle(tmp_path / "v0.pkl")
