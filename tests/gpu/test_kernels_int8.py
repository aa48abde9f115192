"""The int8 kernels (cupycodec.kernels.int8) equal the NumPy reference bit for bit: codes, scales, dequantized values."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cupycodec.errors import UnsupportedDtypeError
from cupycodec.kernels import int8 as kernels
from cupycodec.quant import reference

pytestmark = pytest.mark.gpu

BF16 = np.dtype(ml_dtypes.bfloat16)
LIMIT = 2.0**127
OUTPUTS = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": BF16, "F64": np.dtype(np.float64)}
BITS = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def to_device(x: np.ndarray, offset: int = 0):
    """(cupy array, dtype_name) for a host array; BF16 travels as uint16 bits. `offset` elements of padding in front
    make the device array contiguous but not 16-byte aligned (the kernels' scalar path)."""
    import cupy

    host = x.view(np.uint16) if x.dtype == BF16 else x
    if offset:
        padded = cupy.zeros(host.size + offset, dtype=host.dtype)
        padded[offset:] = cupy.asarray(host.reshape(-1))
        dev = padded[offset:].reshape(host.shape)
        assert dev.flags.c_contiguous
    else:
        dev = cupy.asarray(host)
    return dev, ("BF16" if x.dtype == BF16 else None)


def assert_bits_equal(got: np.ndarray, want: np.ndarray):
    assert got.shape == want.shape and got.dtype.itemsize == want.dtype.itemsize
    np.testing.assert_array_equal(got.view(BITS[got.dtype.itemsize]), want.view(BITS[want.dtype.itemsize]))


def check_matches_reference(x: np.ndarray, params: dict, offset: int = 0, outputs=OUTPUTS):
    q_ref, s_ref = reference.quantize_int8(x, **params)
    xd, name = to_device(x, offset)
    q, s = kernels.quantize_int8(xd, **params, dtype_name=name)
    assert q.dtype == np.int8 and q.shape == x.shape and q.flags.c_contiguous
    assert s.dtype == np.float32 and s.shape == s_ref.shape
    np.testing.assert_array_equal(q.get(), q_ref)
    assert_bits_equal(s.get(), s_ref)
    for dtype_name in outputs:
        y_ref = reference.dequantize_int8(q_ref, s_ref, **params, dtype=OUTPUTS[dtype_name])
        y = kernels.dequantize_int8(q, s, **params, dtype_name=dtype_name)
        assert y.shape == x.shape and y.flags.c_contiguous
        assert_bits_equal(y.get(), y_ref)


# --- strategies (the reference tests' domain: every finite value below 2**127, subnormals included) -------------

_BF16_BITS = st.one_of(st.integers(0, 0x7EFF), st.integers(0x8000, 0xFEFF),
                       st.integers(0x3C00, 0x4100), st.integers(0xBC00, 0xC100))


@st.composite
def arrays(draw, shape):
    kind = draw(st.sampled_from(["f32", "f16", "bf16"]))
    if kind == "bf16":
        return draw(hnp.arrays(np.uint16, shape, elements=_BF16_BITS)).view(BF16)
    if kind == "f32":
        full = st.floats(-LIMIT, LIMIT, exclude_min=True, exclude_max=True, width=32)
        return draw(hnp.arrays(np.float32, shape, elements=st.one_of(full, st.floats(-4, 4, width=32))))
    full = st.floats(width=16, allow_nan=False, allow_infinity=False)
    return draw(hnp.arrays(np.float16, shape, elements=st.one_of(full, st.floats(-4, 4, width=16))))


@st.composite
def cases(draw):
    granularity = draw(st.sampled_from(reference.GRANULARITIES))
    shape = draw(hnp.array_shapes(min_dims=0 if granularity == "tensor" else 1, max_dims=4, min_side=0,
                                  max_side=9))
    if draw(st.booleans()):  # long rows: several vectors per group, partial groups, block-sized segments
        shape = (*shape[:-1][:2], draw(st.integers(0, 1100)))
    params = {"granularity": granularity, "axis": 0,
              "group_size": draw(st.sampled_from([1, 2, 3, 5, 7, 8, 16, 32, 64, 100, 128, 600]))}
    if granularity == "channel" and shape:
        params["axis"] = draw(st.integers(-len(shape), len(shape) - 1))
    return draw(arrays(shape)), params


@given(cases(), st.sampled_from([0, 1, 3]))
def test_kernels_match_reference(case, offset):
    x, params = case
    check_matches_reference(x, params, offset=offset)


# --- every launch path, chosen by shape (see the kernel table in cupycodec/kernels/int8.py) ----------------------

PATHS = [
    ("tensor fused", (3, 50), {"granularity": "tensor"}),
    ("tensor two-pass", (300, 301), {"granularity": "tensor"}),
    ("channel rows warp", (40, 200), {"granularity": "channel", "axis": 0}),
    ("channel rows block", (300, 2000), {"granularity": "channel", "axis": 0}),
    ("channel few long rows", (3, 9001), {"granularity": "channel", "axis": 0}),
    ("channel leading 1", (1, 6, 33), {"granularity": "channel", "axis": 1}),
    ("channel columns", (70, 300), {"granularity": "channel", "axis": 1}),
    ("channel columns odd", (33, 37), {"granularity": "channel", "axis": -1}),
    ("channel inner 9", (5, 7, 9), {"granularity": "channel", "axis": 1}),
    ("channel inner 16", (5, 7, 16), {"granularity": "channel", "axis": 1}),
    ("channel inner 40", (3, 50, 40), {"granularity": "channel", "axis": 1}),
    ("channel long inner", (4, 6, 1500), {"granularity": "channel", "axis": 1}),
    ("channel axis 2 of 4", (3, 4, 5, 8), {"granularity": "channel", "axis": 2}),
    ("group 128 warp", (64, 1024), {"granularity": "group", "group_size": 128}),
    ("group 32", (64, 512), {"granularity": "group", "group_size": 32}),
    ("group 100 ragged", (7, 1001), {"granularity": "group", "group_size": 100}),
    ("group 1024 block", (16, 4096), {"granularity": "group", "group_size": 1024}),
    ("group few long", (2, 12000), {"granularity": "group", "group_size": 5000}),
    ("group larger than row", (9, 70), {"granularity": "group", "group_size": 128}),
    ("group 24 idle lanes", (10, 96), {"granularity": "group", "group_size": 24}),
    ("group 8", (5, 64), {"granularity": "group", "group_size": 8}),
    ("group 32 partial step", (7, 96), {"granularity": "group", "group_size": 32}),
    ("channel rows in registers", (40, 4096), {"granularity": "channel", "axis": 0}),
    ("channel rows too long for registers", (20, 40000), {"granularity": "channel", "axis": 0}),
    # quantize_flat: equal groups of 2**k aligned vectors (bf16/f16 8 and f32 4 elements per vector)
    ("flat one vector", (40, 64), {"granularity": "group", "group_size": 8}),
    ("flat two vectors", (40, 64), {"granularity": "group", "group_size": 16}),
    ("flat many tiles per warp", (96, 1024), {"granularity": "group", "group_size": 32}),
    ("flat warp-wide groups", (20, 768), {"granularity": "group", "group_size": 256}),
    ("flat two loads per group", (6, 2048), {"granularity": "group", "group_size": 512}),
    ("flat four loads per group", (5, 2048), {"granularity": "group", "group_size": 1024}),
    ("flat channel rows", (300, 64), {"granularity": "channel", "axis": 0}),
    # per-tensor absmax_all + quantize_all: grid-stride chunks and a scalar tail
    ("tensor two-pass tail", (70001,), {"granularity": "tensor"}),
    ("tensor two-pass many chunks", (400, 1001), {"granularity": "tensor"}),
]


def weights(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (0.02 * rng.standard_t(5, size=shape)).astype(np.float32)
    x.reshape(-1)[:: 97] = 0  # zeros, and a few exact ties below
    x.reshape(-1)[5 :: 101] = np.float32(0.5) * np.float32(0.02)
    return x.astype(dtype)


@pytest.mark.parametrize(("label", "shape", "params"), PATHS, ids=[p[0] for p in PATHS])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_each_path_matches_reference(label, shape, params, dtype, offset):
    check_matches_reference(weights(shape, dtype), params, offset=offset)


@pytest.mark.parametrize(("label", "shape", "params"), PATHS, ids=[p[0] for p in PATHS])
def test_each_path_handles_zero_and_subnormal_groups(label, shape, params):
    x = weights(shape, np.float32)
    flat = x.reshape(-1)
    flat[: flat.size // 3] = 0
    flat[flat.size // 3 : flat.size // 2] = np.float32(1e-40)  # subnormal maxima: scale flushed to 1
    check_matches_reference(x, params, outputs=("F32",))


@pytest.mark.parametrize(("label", "shape", "params"), PATHS, ids=[p[0] for p in PATHS])
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["f32", "bf16"])
def test_each_path_with_the_max_in_the_last_element(label, shape, params, dtype):
    """The last element (a scalar tail, the last lane of a partial tile) decides its group's scale."""
    x = weights(shape, dtype)
    x.reshape(-1)[-1] = -3.0
    check_matches_reference(x, params, outputs=("F32",))


@pytest.mark.parametrize(("label", "shape", "params"), PATHS, ids=[p[0] for p in PATHS])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, LIMIT])
def test_domain_error_text_matches_reference(label, shape, params, bad):
    x = weights(shape, np.float32)
    flat = x.reshape(-1)
    first = flat.size * 2 // 3
    flat[first] = bad
    flat[-1] = np.nan  # later in C order: must not be the one reported
    with pytest.raises(ValueError) as want:
        reference.quantize_int8(x, **params)
    with pytest.raises(ValueError) as got:
        kernels.quantize_int8(to_device(x)[0], **params)
    assert str(got.value) == str(want.value)


HALF_DOMAIN_PATHS = [p for p in PATHS if p[0] in (
    "tensor two-pass", "tensor two-pass tail", "channel rows block", "group 32", "flat warp-wide groups",
    "flat four loads per group", "channel columns", "group 100 ragged")]


@pytest.mark.parametrize(("label", "shape", "params"), HALF_DOMAIN_PATHS, ids=[p[0] for p in HALF_DOMAIN_PATHS])
@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize("bad", [np.nan, -np.inf, LIMIT], ids=["nan", "-inf", "2**127"])
def test_domain_error_text_matches_reference_half_types(label, shape, params, dtype, bad):
    """The abs-bits thresholds of the 16-bit inputs: NaN and inf (and 2**127 for bfloat16; it is inf in float16)."""
    x = weights(shape, dtype)
    flat = x.reshape(-1)
    flat[flat.size // 2 + 3] = np.inf if bad == LIMIT and dtype == np.float16 else bad
    flat[-1] = np.nan
    with pytest.raises(ValueError) as want:
        reference.quantize_int8(x, **params)
    xd, name = to_device(x)
    with pytest.raises(ValueError) as got:
        kernels.quantize_int8(xd, **params, dtype_name=name)
    assert str(got.value) == str(want.value)
    x[...] = weights(shape, dtype)  # largest finite values are in the domain
    x.reshape(-1)[5] = np.finfo(np.float16).max if dtype == np.float16 else np.float32(2.0**127 - 2.0**119)
    check_matches_reference(x, params, outputs=("F32",))


@pytest.mark.parametrize(("label", "shape", "params"), HALF_DOMAIN_PATHS[:5], ids=[p[0] for p in HALF_DOMAIN_PATHS[:5]])
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["f32", "bf16"])
def test_domain_error_in_the_last_element(label, shape, params, dtype):
    """The only bad value is the last one: a scalar tail, or the last vector of a partial tile."""
    x = weights(shape, dtype)
    x.reshape(-1)[-1] = np.nan
    xd, name = to_device(x)
    with pytest.raises(ValueError, match=r"x\[.*\] = nan$") as got:
        kernels.quantize_int8(xd, **params, dtype_name=name)
    with pytest.raises(ValueError) as want:
        reference.quantize_int8(x, **params)
    assert str(got.value) == str(want.value)


def near_ties(row_len: int, seed: int) -> np.ndarray:
    """Rows whose scale is RN(absmax / 127) for a random absmax, filled with float32 values within 3 ulps of the
    ties (k + 0.5) * scale: where x * (1 / scale) and x / scale can round differently (see cc_codes)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(64):
        absmax = np.float32(rng.uniform(0.5, 2.0) * 2.0 ** int(rng.integers(-100, 100)))
        scale = (absmax / np.float32(127)).astype(np.float64)
        k = rng.integers(-127, 127, size=row_len - 1)
        ties = ((k + 0.5) * scale).astype(np.float32)
        vals = (ties.view(np.int32) + rng.integers(-3, 4, size=ties.size).astype(np.int32)).view(np.float32)
        rows.append(np.concatenate([[absmax], np.clip(vals, -absmax, absmax)]).astype(np.float32))
    return np.stack(rows)


@pytest.mark.parametrize("row_len", [128, 1024, 1000])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_values_near_ties_match_reference(row_len, offset):
    x = near_ties(row_len, seed=row_len + offset)
    check_matches_reference(x, {"granularity": "channel", "axis": 0}, offset=offset, outputs=("F32",))
    check_matches_reference(x, {"granularity": "group", "group_size": 128}, offset=offset, outputs=())


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=["f32", "f16", "bf16"])
def test_exact_ties_round_half_to_even(dtype):
    """absmax = 127 * 2**e makes the scale 2**e exactly, so (k + 0.5) * 2**e are exact ties in every dtype."""
    k = np.arange(-127, 127)
    rows = [np.concatenate([[127.0], k + 0.5]) * 2.0**e for e in (-10, -3, 0, 5)]
    x = np.stack(rows).astype(dtype)
    codes, _ = reference.quantize_int8(x)
    np.testing.assert_array_equal(codes[:, 1:], np.broadcast_to(np.rint(k + 0.5), (4, k.size)))
    check_matches_reference(x, {"granularity": "channel", "axis": 0}, outputs=("F32",))


@pytest.mark.parametrize(
    ("x", "text"),
    [(np.array(np.nan, dtype=np.float32), "x[()] = nan"),
     (np.array([[1, 2], [3, np.inf]], dtype=np.float16), "x[1, 1] = inf"),
     (np.array([1, -(2.0**127)], dtype=np.float32).astype(BF16), "x[1] = -1.7014118e+38")],
)
def test_domain_error_for_each_dtype(x, text):
    xd, name = to_device(x)
    with pytest.raises(ValueError, match=r"\|x\| < 2\*\*127; ") as info:
        kernels.quantize_int8(xd, granularity="tensor", dtype_name=name)
    assert str(info.value).endswith(text)


@pytest.mark.parametrize(
    "params", [{"granularity": "tensor"}, {"granularity": "group", "group_size": 64},
               {"granularity": "channel", "axis": 0}])
def test_flags_are_reset_between_calls(params):
    """The domain flag and the per-tensor workspace are reused by the next call on the stream: a failed check, or a
    call with larger values, must not leak into it."""
    import cupy

    big = weights((300, 301), np.float32, seed=3) * np.float32(1000)
    small = weights((300, 301), np.float32, seed=4)
    bad = small.copy()
    bad[7, 11] = np.inf
    for x in (big, small):
        kernels.quantize_int8(cupy.asarray(x), **params, check=False)
    with pytest.raises(ValueError, match=r"x\[7, 11\] = inf"):
        kernels.quantize_int8(cupy.asarray(bad), **params)
    check_matches_reference(small, params, outputs=("F32",))
    kernels.quantize_int8(cupy.asarray(bad), **params, check=False)
    check_matches_reference(small, params, outputs=())


def test_check_false_skips_the_domain_check_only():
    x = weights((64, 256), np.float32)
    q_ref, s_ref = reference.quantize_int8(x)
    q, s = kernels.quantize_int8(to_device(x)[0], check=False)
    np.testing.assert_array_equal(q.get(), q_ref)
    x[3, 4] = np.nan
    kernels.quantize_int8(to_device(x)[0], check=False)  # no error, codes unspecified


@pytest.mark.parametrize(
    ("shape", "params"),
    [((0,), {"granularity": "tensor"}), ((3, 0), {"granularity": "channel"}),
     ((0, 5), {"granularity": "channel", "axis": 1}), ((4, 0), {"granularity": "group", "group_size": 3}),
     ((0, 10), {"granularity": "group", "group_size": 3}), ((2, 0, 3), {"granularity": "channel", "axis": 2})],
)
def test_empty_inputs(shape, params):
    for dtype in (np.float32, np.float16, BF16):
        check_matches_reference(np.zeros(shape, dtype=dtype), params)


def test_zero_dimensional_tensor():
    for value in (0.0, 3.5, -1e-40):
        check_matches_reference(np.array(value, dtype=np.float32), {"granularity": "tensor"})


def test_out_arrays_are_used():
    import cupy

    x = weights((32, 300), np.float32)
    params = {"granularity": "group", "group_size": 64}
    q_ref, s_ref = reference.quantize_int8(x, **params)
    codes = cupy.full(x.shape, 99, dtype=np.int8)
    scales = cupy.zeros(s_ref.shape, dtype=np.float32)
    q, s = kernels.quantize_int8(cupy.asarray(x), **params, out=(codes, scales))
    assert q is codes and s is scales
    np.testing.assert_array_equal(codes.get(), q_ref)
    assert_bits_equal(scales.get(), s_ref)
    y = cupy.empty(x.shape, dtype=np.uint16)
    assert kernels.dequantize_int8(codes, scales, **params, dtype_name="BF16", out=y) is y
    assert_bits_equal(y.get(), reference.dequantize_int8(q_ref, s_ref, **params, dtype=BF16))


@pytest.mark.parametrize("dtype_name", list(OUTPUTS))
def test_dequantize_into_unaligned_out(dtype_name):
    """An out= view one element past a 16-byte boundary takes the scalar path; the values are the same."""
    import cupy

    x = weights((33, 100), np.float32)
    params = {"granularity": "group", "group_size": 32}
    q_ref, s_ref = reference.quantize_int8(x, **params)
    storage = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}[dtype_name]
    padded = cupy.zeros(x.size + 1, dtype=storage)
    out = padded[1:].reshape(x.shape)
    y = kernels.dequantize_int8(cupy.asarray(q_ref), cupy.asarray(s_ref), **params, dtype_name=dtype_name, out=out)
    assert y is out
    assert_bits_equal(out.get(), reference.dequantize_int8(q_ref, s_ref, **params, dtype=OUTPUTS[dtype_name]))


@pytest.mark.parametrize(
    "bad_out",
    [lambda cp, s: (cp.empty((32, 301), np.int8), None),
     lambda cp, s: (cp.empty((32, 300), np.int16), None),
     lambda cp, s: (cp.empty((300, 32), np.int8).T, None),
     lambda cp, s: (None, cp.empty(s, np.float64)),
     lambda cp, s: (None, cp.empty((1,), np.float32))],
)
def test_bad_out_is_rejected(bad_out):
    import cupy

    x = cupy.asarray(weights((32, 300), np.float32))
    with pytest.raises(ValueError, match="must be a C-contiguous cupy array"):
        kernels.quantize_int8(x, granularity="group", group_size=64, out=bad_out(cupy, (32, 5)))
    codes, scales = kernels.quantize_int8(x)
    for out in (cupy.empty((32, 300), np.float16), cupy.empty((32, 299), np.float32)):
        with pytest.raises(ValueError, match="must be a C-contiguous cupy array"):
            kernels.dequantize_int8(codes, scales, out=out)


def test_non_contiguous_input_is_rejected():
    import cupy

    x = cupy.asarray(weights((16, 64), np.float32))
    with pytest.raises(ValueError, match=r"C-contiguous.*cupy\.ascontiguousarray"):
        kernels.quantize_int8(x[:, ::2])
    codes, scales = kernels.quantize_int8(x)
    with pytest.raises(ValueError, match="cupy.ascontiguousarray"):
        kernels.dequantize_int8(codes.T, scales, axis=1)


def test_dtype_errors():
    import cupy

    with pytest.raises(UnsupportedDtypeError, match="float32, float16, bfloat16"):
        kernels.quantize_int8(cupy.zeros((2, 3), dtype=np.float64))
    with pytest.raises(UnsupportedDtypeError, match="dtype_name='BF16'"):
        kernels.quantize_int8(cupy.zeros((2, 3), dtype=np.uint16))
    with pytest.raises(UnsupportedDtypeError, match="needs an array of float32"):
        kernels.quantize_int8(cupy.zeros((2, 3), dtype=np.uint16), dtype_name="F32")
    with pytest.raises(ValueError, match="dtype_name must be"):
        kernels.quantize_int8(cupy.zeros((2, 3), dtype=np.float32), dtype_name="float32")
    with pytest.raises(TypeError, match="cupy.ndarray"):
        kernels.quantize_int8(np.zeros((2, 3), dtype=np.float32))
    codes, scales = kernels.quantize_int8(cupy.ones((2, 3), dtype=np.float32))
    with pytest.raises(UnsupportedDtypeError, match="int8"):
        kernels.dequantize_int8(codes.astype(np.int16), scales)
    with pytest.raises(UnsupportedDtypeError, match="F32, F16, BF16, F64"):
        kernels.dequantize_int8(codes, scales, dtype_name="F8")
    with pytest.raises(ValueError, match=r"float32 of shape \(2,\)"):
        kernels.dequantize_int8(codes, scales[:1])
    with pytest.raises(ValueError, match="out of range"):
        kernels.quantize_int8(cupy.ones((2, 3), dtype=np.float32), axis=2)


def test_explicit_stream():
    import cupy

    x = weights((256, 512), np.float16)
    q_ref, s_ref = reference.quantize_int8(x, granularity="group", group_size=64)
    stream = cupy.cuda.Stream(non_blocking=True)
    q, s = kernels.quantize_int8(cupy.asarray(x), granularity="group", group_size=64, stream=stream)
    y = kernels.dequantize_int8(q, s, granularity="group", group_size=64, dtype_name="F16", stream=stream)
    stream.synchronize()
    np.testing.assert_array_equal(q.get(), q_ref)
    assert_bits_equal(y.get(), reference.dequantize_int8(q_ref, s_ref, granularity="group", group_size=64,
                                                          dtype=np.float16))


@pytest.mark.parametrize(
    "params", [{"granularity": "channel", "axis": 0}, {"granularity": "channel", "axis": 1},
               {"granularity": "group", "group_size": 128}, {"granularity": "tensor"}])
def test_large_bfloat16_weight(params):
    """16 Mi elements (4096 x 4096 bf16): the sizes the benchmark uses, scaled down, against the reference."""
    x = weights((4096, 4096), BF16, seed=1)
    check_matches_reference(x, params, outputs=("BF16", "F32"))
