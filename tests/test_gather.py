"""Native batch gather (pyft._core.gather_rows) against NumPy's ``src[indices].astype(np.float32)``.

Conversions to float32 from float16, bfloat16, float32 and float64 are exact, so results are
compared bit for bit (NaNs by position only: their payloads are not part of the contract).
bfloat16 comes in as its uint16 bit pattern with ``bfloat16=True`` (what pyft._arrays passes for
torch tensors); its reference is the bit shift that defines bfloat16 -> float32, cross-checked
with torch.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from pyft import _core

DTYPES = ["float16", "bfloat16", "float32", "float64"]
ROW_SHAPES = [(1,), (3,), (7,), (1281,), (3, 5, 7), (0,)]


def _values(rng, shape, dtype=np.float32):
    """Normal values with special cases sprinkled in: infinities, NaN, signed zeros, float16 and
    float32 subnormals, the largest float16, values that overflow float16 or float32."""
    x = rng.normal(scale=3.0, size=shape).astype(dtype)
    special = np.array(
        [np.inf, -np.inf, np.nan, -0.0, 0.0, 6e-8, -3e-5, 65504.0, 1e-40, 3.0e38, 1e39, -1e-42],
        dtype=np.float64,
    )
    with np.errstate(over="ignore"):
        special = special.astype(dtype)
    flat = x.reshape(-1)
    if flat.size:
        pos = rng.choice(flat.size, size=min(flat.size, 2 * special.size), replace=False)
        flat[pos] = np.resize(special, pos.size)
    return x


def make_src(dtype, shape, seed=0):
    """(array passed to gather_rows, bfloat16 flag, float32 reference of the whole array)."""
    rng = np.random.default_rng(seed)
    x = _values(rng, shape, np.float64 if dtype == "float64" else np.float32)
    if dtype == "bfloat16":
        bits = (x.view(np.uint32) >> 16).astype(np.uint16)  # truncation: any pattern will do
        return bits, True, bf16_to_f32(bits)
    with np.errstate(over="ignore"):
        arr = x.astype(dtype)
    return arr, False, None


def bf16_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def reference(src, idx, bf16):
    """``src[idx].astype(np.float32)``; bfloat16 through its defining bit shift."""
    rows = src[idx]
    if bf16:
        return bf16_to_f32(rows)
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, as in C++
        return rows.astype(np.float32)


def assert_same_bits(got, want):
    assert got.dtype == np.float32 and got.shape == want.shape
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])


def shuffled_with_repeats(n, k, seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=k).astype(np.int64) if n else np.zeros(0, np.int64)


# ============================================================================================
# results against the reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_shape", ROW_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("n_rows, n_idx", [(1, 1), (1, 5), (37, 0), (37, 1), (37, 64)])
def test_matches_numpy(dtype, row_shape, n_rows, n_idx):
    src, bf16, _ = make_src(dtype, (n_rows, *row_shape))
    idx = shuffled_with_repeats(n_rows, n_idx)
    got = _core.gather_rows(src, idx, bfloat16=bf16)
    want = reference(src, idx, bf16)
    assert got.shape == (n_idx, *row_shape)
    assert got.flags.c_contiguous and got.flags.writeable
    assert_same_bits(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_index_order(dtype):
    src, bf16, _ = make_src(dtype, (50, 13))
    orders = [np.arange(50), np.arange(50)[::-1].copy(), np.random.default_rng(3).permutation(50),
              np.full(20, 49), np.array([0, 49, 0, 49, 7])]
    for idx in orders:
        assert_same_bits(_core.gather_rows(src, idx, bfloat16=bf16), reference(src, idx, bf16))


def test_all_float16_bit_patterns():
    """Every one of the 65536 float16 values (subnormals, infinities, NaNs) converts exactly."""
    src = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).reshape(256, 256)
    idx = np.random.default_rng(0).permutation(256)
    assert_same_bits(_core.gather_rows(src, idx), src[idx].astype(np.float32))


def test_all_bfloat16_bit_patterns_match_torch():
    torch = pytest.importorskip("torch")
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
    idx = np.random.default_rng(0).permutation(256)
    got = _core.gather_rows(bits, idx, bfloat16=True)
    # The way pyft._arrays hands a torch bfloat16 tensor to the core: its int16 bit pattern.
    t = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    want = t[torch.from_numpy(idx)].float().numpy()
    assert_same_bits(got, want)
    assert_same_bits(_core.gather_rows(t.view(torch.int16).numpy(), idx, bfloat16=True), want)


def test_ml_dtypes_bfloat16_without_flag():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.random.default_rng(0).normal(size=(20, 9)).astype(ml_dtypes.bfloat16)
    idx = np.array([3, 19, 0, 3])
    assert_same_bits(_core.gather_rows(x, idx), x[idx].astype(np.float32))


@pytest.mark.parametrize("index_dtype", [np.int64, np.int32, np.int16, np.uint8, np.uint32,
                                         np.uint64])
def test_index_dtypes(index_dtype):
    src, _, _ = make_src("float16", (30, 5))
    idx = np.array([29, 0, 7, 7, 12], dtype=index_dtype)
    assert_same_bits(_core.gather_rows(src, idx), src[idx].astype(np.float32))


def test_strided_indices():
    src, _, _ = make_src("float32", (30, 5))
    idx = (np.arange(60) // 2)[::-2]
    assert not idx.flags.c_contiguous
    assert_same_bits(_core.gather_rows(src, idx), src[idx])


# ============================================================================================
# layouts


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "view",
    [
        lambda a: np.asfortranarray(a),
        lambda a: a[::2],
        lambda a: a[::-1],
        lambda a: a[:, ::3],
        lambda a: a[::-3, ::-2],
        lambda a: np.broadcast_to(a[:1], a.shape),  # zero row stride
    ],
    ids=["fortran", "every_other_row", "reversed_rows", "column_step", "negative_both",
         "broadcast"],
)
def test_2d_any_strides(dtype, view):
    base, bf16, _ = make_src(dtype, (40, 11))
    src = view(base)
    idx = shuffled_with_repeats(src.shape[0], 25)
    assert_same_bits(_core.gather_rows(src, idx, bfloat16=bf16), reference(src, idx, bf16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nd_rows_with_any_row_stride(dtype):
    base, bf16, _ = make_src(dtype, (20, 3, 5, 7))
    idx = np.array([9, 0, 4, 4, 1])
    for src in [base, base[::2], base[::-1], base[:, None], base[:, :, :, :, None]]:
        got = _core.gather_rows(src, idx, bfloat16=bf16)
        assert got.shape == (5, *src.shape[1:])
        assert_same_bits(got, reference(src, idx, bf16))


def test_nd_size_one_dims_may_have_any_stride():
    base, _, _ = make_src("float16", (10, 6))
    src = np.lib.stride_tricks.as_strided(base, shape=(10, 1, 6), strides=(12, 999, 2))
    idx = np.array([3, 1])
    assert_same_bits(_core.gather_rows(src, idx), src[idx].astype(np.float32))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("shape", [(300, 1281), (64, 3, 5, 7)], ids=["2d", "4d"])
def test_read_only_memmap(tmp_path, dtype, shape):
    arr, bf16, _ = make_src(dtype, shape)
    path = tmp_path / "features.bin"
    arr.tofile(path)
    mm = np.memmap(path, dtype=arr.dtype, mode="r", shape=shape)
    assert not mm.flags.writeable
    idx = np.random.default_rng(5).permutation(shape[0])[:50]
    got = _core.gather_rows(mm, idx, bfloat16=bf16)
    assert type(got) is np.ndarray
    assert_same_bits(got, reference(arr, idx, bf16))
    del mm


# ============================================================================================
# the out buffer


def test_out_is_filled_in_place_and_returned():
    src, _, _ = make_src("float16", (100, 7))
    out = np.full((16, 7), -1.0, np.float32)
    for seed in range(3):
        idx = shuffled_with_repeats(100, 16, seed=seed)
        res = _core.gather_rows(src, idx, out)
        assert res is out
        assert_same_bits(out, src[idx].astype(np.float32))


@pytest.mark.parametrize("flat", [False, True])
def test_out_for_nd_src_full_or_flat_shape(flat):
    src, _, _ = make_src("float16", (20, 3, 5, 7))
    idx = np.array([1, 19, 1])
    out = np.empty((3, 105) if flat else (3, 3, 5, 7), np.float32)
    assert _core.gather_rows(src, idx, out=out) is out
    assert_same_bits(out.reshape(3, 3, 5, 7), src[idx].astype(np.float32))


def test_out_may_be_a_writeable_memmap(tmp_path):
    src, _, _ = make_src("float16", (20, 9))
    out = np.memmap(tmp_path / "out.bin", dtype=np.float32, mode="w+", shape=(4, 9))
    idx = np.array([0, 5, 5, 19])
    assert _core.gather_rows(src, idx, out) is out
    assert_same_bits(np.asarray(out), src[idx].astype(np.float32))
    del out


def test_empty_indices_and_empty_src():
    src = np.zeros((0, 4, 2), np.float16)
    got = _core.gather_rows(src, np.zeros(0, np.int64))
    assert got.shape == (0, 4, 2) and got.dtype == np.float32
    out = np.empty((0, 8), np.float32)
    assert _core.gather_rows(src, np.zeros(0, np.int32), out) is out


def test_threads_give_identical_results():
    src, _, _ = make_src("float16", (2000, 1281))
    idx = shuffled_with_repeats(2000, 700)
    one = _core.gather_rows(src, idx, n_threads=1)
    two = _core.gather_rows(src, idx, n_threads=2)
    many = _core.gather_rows(src, idx, n_threads=64)  # more threads than some batches have rows
    few = _core.gather_rows(src, idx[:3], n_threads=64)
    np.testing.assert_array_equal(one.view(np.uint32), two.view(np.uint32))
    np.testing.assert_array_equal(one.view(np.uint32), many.view(np.uint32))
    np.testing.assert_array_equal(one[:3].view(np.uint32), few.view(np.uint32))
    assert_same_bits(one, src[idx].astype(np.float32))


# ============================================================================================
# bad input: a ValueError naming the argument, what was expected and what was given


@pytest.fixture
def src():
    return make_src("float16", (10, 3))[0]


@pytest.mark.parametrize(
    "idx, bad, pos",
    [([0, 10, 3], 10, 1), ([1, 2, -1], -1, 2), ([-5, 99], -5, 0), ([2**40], 2**40, 0)],
)
def test_index_out_of_range(src, idx, bad, pos):
    msg = rf"indices must be in \[0, 10\).*got {bad} at position {pos}$"
    with pytest.raises(ValueError, match=msg):
        _core.gather_rows(src, np.array(idx, dtype=np.int64))


def test_index_out_of_range_int32_and_huge_uint64(src):
    with pytest.raises(ValueError, match=r"got 10 at position 2$"):
        _core.gather_rows(src, np.array([0, 1, 10], dtype=np.int32))
    with pytest.raises(ValueError, match=rf"got {2**63 + 1} at position 1$"):
        _core.gather_rows(src, np.array([0, 2**63 + 1], dtype=np.uint64))


def test_index_into_empty_src():
    with pytest.raises(ValueError, match=r"indices must be in \[0, 0\).*got 0 at position 0"):
        _core.gather_rows(np.zeros((0, 3), np.float32), np.array([0]))


def test_bad_index_leaves_out_untouched(src):
    out = np.full((3, 3), 7.0, np.float32)
    with pytest.raises(ValueError, match="indices must be in"):
        _core.gather_rows(src, np.array([0, 1, 11]), out)
    assert (out == 7.0).all()


@pytest.mark.parametrize(
    "idx, msg",
    [
        (np.array([0.0, 1.0]),
         r"indices must be an integer array \(int64 or int32\) of row indices; got float64"),
        (np.array([True, False]), r"indices must be an integer array .*; got bool"),
        (np.zeros((2, 2), np.int64),
         r"indices must be a 1-D array of row indices; got 2 dimension\(s\)"),
        (np.array(3), r"indices must be a 1-D array of row indices; got 0 dimension\(s\)"),
    ],
    ids=["float", "bool", "2d", "0d"],
)
def test_bad_indices(src, idx, msg):
    with pytest.raises(ValueError, match=msg):
        _core.gather_rows(src, idx)


@pytest.mark.parametrize(
    "out, msg",
    [
        (np.empty((2, 3), np.float32),
         r"out must have shape \(3, 3\) \(len\(indices\), \*src.shape\[1:\]\); got \(2, 3\)"),
        (np.empty((3, 4), np.float32), r"got \(3, 4\)"),
        (np.empty(9, np.float32), r"got \(9,\)"),
        (np.empty((3, 3), np.float64), r"out must be float32; got float64"),
        (np.empty((3, 3), np.float16), r"out must be float32; got float16"),
        (np.empty((3, 3), np.int32), r"out must be float32; got int32"),
        (np.empty((3, 3), np.float32, order="F"), r"out must be C-contiguous"),
        (np.empty((3, 6), np.float32)[:, ::2],
         r"out must be C-contiguous .*np.empty\(\(3, 3\), np.float32\)"),
        (np.empty((6, 3), np.float32)[::2], r"out must be C-contiguous"),
        ([[0.0] * 3] * 3, r"out must be a NumPy float32 array or None; got list"),
    ],
    ids=["rows", "cols", "1d", "f64", "f16", "i32", "fortran", "col_step", "row_step", "list"],
)
def test_bad_out(src, out, msg):
    with pytest.raises(ValueError, match=msg):
        _core.gather_rows(src, np.array([1, 2, 3]), out)


def test_read_only_out(src):
    out = np.empty((2, 3), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match=r"out must be writeable \(it is filled in place\)"):
        _core.gather_rows(src, np.array([1, 2]), out)


def test_nd_out_shape_message_lists_both_shapes():
    src = np.zeros((4, 3, 5), np.float32)
    with pytest.raises(ValueError, match=re.escape("out must have shape (2, 3, 5) or (2, 15)")):
        _core.gather_rows(src, np.array([0, 1]), np.empty((2, 5, 3), np.float32))


def test_out_overlapping_src():
    x = np.zeros((6, 3), np.float32)
    with pytest.raises(ValueError, match=r"out must not share memory with src"):
        _core.gather_rows(x, np.array([0, 1]), x[4:])
    with pytest.raises(ValueError, match=r"out must not share memory with src"):
        _core.gather_rows(x[::-1], np.array([0, 1]), x[:2])
    # Neighbouring, not overlapping: fine.
    buf = np.arange(18, dtype=np.float32).reshape(6, 3)
    _core.gather_rows(buf[:4], np.array([3, 0]), buf[4:])
    np.testing.assert_array_equal(buf[4:], buf[[3, 0]])


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16, np.bool_, np.complex64,
                                   np.longdouble])
def test_non_float_src(dtype):
    if np.dtype(dtype) == np.float64:
        pytest.skip("longdouble is float64 on this platform")
    src = np.zeros((4, 3), dtype)
    name = str(np.dtype(dtype))
    msg = rf"src must be float32, float16, bfloat16 or float64; got {name}$"
    with pytest.raises(ValueError, match=msg):
        _core.gather_rows(src, np.array([0]))


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.int32])
def test_bfloat16_flag_needs_16bit_patterns(dtype):
    msg = rf"src with bfloat16=True must hold 16-bit.*got {np.dtype(dtype)}"
    with pytest.raises(ValueError, match=msg):
        _core.gather_rows(np.zeros((4, 3), dtype), np.array([0]), bfloat16=True)


@pytest.mark.parametrize("shape", [(5,), ()], ids=["1d", "0d"])
def test_src_needs_two_dimensions(shape):
    msg = rf"src must have at least 2 dimensions \(n_rows, \.\.\.\); got {len(shape)} dimension"
    with pytest.raises(ValueError, match=msg):
        _core.gather_rows(np.zeros(shape, np.float32), np.array([0]))


def test_nd_src_with_non_contiguous_rows():
    src = np.zeros((5, 4, 6), np.float16)[:, :, ::2]
    with pytest.raises(
        ValueError,
        match=re.escape("src with 3 dimensions must have C-contiguous rows")
        + r".*got shape \(5, 4, 3\) and strides \(48, 12, 4\) bytes",
    ):
        _core.gather_rows(src, np.array([0]))
    with pytest.raises(ValueError, match=r"C-contiguous rows"):
        _core.gather_rows(np.zeros((5, 4, 6), np.float32).transpose(0, 2, 1), np.array([0]))


def test_negative_threads(src):
    msg = r"n_threads must be >= 0 \(0: all available threads\); got -1"
    with pytest.raises(ValueError, match=msg):
        _core.gather_rows(src, np.array([0]), n_threads=-1)


def test_non_arrays_are_type_errors(src):
    with pytest.raises(TypeError):
        _core.gather_rows(src.tolist(), np.array([0]))
    with pytest.raises(TypeError):
        _core.gather_rows(src, [0, 1])
