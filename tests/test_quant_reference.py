"""Properties and edge cases of the int8 reference (cupycodec.quant.reference), the specification the kernels match."""

from __future__ import annotations

import math
import re

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cupycodec.errors import UnsupportedDtypeError
from cupycodec.quant import reference

BF16 = np.dtype(ml_dtypes.bfloat16)
TINY = np.float32(2.0**-126)
LIMIT = 2.0**127
# |x - q * s| <= s/2 * (1 + TOL): the two float32 roundings (x / s and q * s) cost up to 508 units of 2**-24.
TOL = 2.0**-15
DTYPES = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "bf16": BF16,
          ">f32": np.dtype(">f4"), ">f16": np.dtype(">f2"), ">bf16": BF16.newbyteorder(">")}
GROUP_SIZES = [1, 2, 3, 4, 5, 7, 8, 16, 32, 100, 128]


# --- strategies --------------------------------------------------------------------------------------------------

def _elements(base: str, wide: bool):
    """Element strategy for `base` in {"f32", "f16"}: the whole domain (|x| < 2**127, subnormals included)."""
    if base == "f32":
        full = st.floats(-LIMIT, LIMIT, exclude_min=True, exclude_max=True, width=32)
    else:
        full = st.floats(width=16, allow_nan=False, allow_infinity=False)
    narrow = st.floats(-4, 4, width=32 if base == "f32" else 16)  # many non-zero codes per group
    return st.one_of(full, narrow) if wide else narrow


# bfloat16 bit patterns with |x| < 2**127 (0x7f00 is 2**127): every finite bf16 below the limit, subnormals included.
_BF16_BITS = st.one_of(st.integers(0, 0x7EFF), st.integers(0x8000, 0xFEFF),
                       st.integers(0x3C00, 0x4100), st.integers(0xBC00, 0xC100))  # the last two: |x| in [2**-7, 8]


@st.composite
def arrays(draw, shape, dtype_key=None, wide=True):
    key = dtype_key or draw(st.sampled_from(sorted(DTYPES)))
    base = key.lstrip(">")
    if base == "bf16":
        x = draw(hnp.arrays(np.uint16, shape, elements=_BF16_BITS)).view(BF16)
    else:
        x = draw(hnp.arrays(DTYPES[base], shape, elements=_elements(base, wide)))
    return x.astype(DTYPES[key])


@st.composite
def cases(draw, max_side=6, max_row=140, dtype_key=None, wide=True):
    """(x, params): any granularity, axis and group size over 0-d to 4-d arrays, empty ones included."""
    granularity = draw(st.sampled_from(reference.GRANULARITIES))
    shape = draw(hnp.array_shapes(min_dims=0 if granularity == "tensor" else 1, max_dims=4, min_side=0,
                                  max_side=max_side))
    if granularity == "group" and draw(st.booleans()):  # rows longer than a group, split unevenly
        shape = (*shape[:-1][:2], draw(st.integers(0, max_row)))
    params = {"granularity": granularity, "axis": 0, "group_size": draw(st.sampled_from(GROUP_SIZES))}
    if granularity == "channel":
        params["axis"] = draw(st.integers(-len(shape), len(shape) - 1))
    return draw(arrays(shape, dtype_key, wide)), params


def per_element_scale(scales, shape, granularity, axis, group_size):
    """An independent broadcast of the scales to every element, by explicit index arithmetic."""
    out = np.empty(shape, dtype=np.float32)
    for idx in np.ndindex(*shape):
        if granularity == "tensor":
            out[idx] = scales[()]
        elif granularity == "channel":
            out[idx] = scales[idx[axis % len(shape)]]
        else:
            out[idx] = scales[(*idx[:-1], idx[-1] // group_size)]
    return out


def naive_quantize(x, granularity, axis, group_size):
    """The rules of the docstring, element by element in float32 scalars, written without the reference's code."""
    x32 = np.array(x, dtype=np.float32)
    shape = x32.shape
    key = {
        "tensor": lambda idx: (),
        "channel": lambda idx: (idx[axis % len(shape)],),
        "group": lambda idx: (*idx[:-1], idx[-1] // group_size),
    }[granularity]
    absmax: dict[tuple, np.float32] = {}
    for idx in np.ndindex(*shape):
        k = key(idx)
        absmax[k] = max(absmax.get(k, np.float32(0)), abs(x32[idx]))
    sshape = reference.scale_shape(shape, granularity, axis, group_size)
    scales = np.empty(sshape, dtype=np.float32)
    for k in np.ndindex(*sshape):
        s = np.float32(absmax.get(k, np.float32(0)) / np.float32(127))
        scales[k] = np.float32(1) if s < TINY else s
    codes = np.empty(shape, dtype=np.int8)
    for idx in np.ndindex(*shape):
        v = float(np.rint(x32[idx] / scales[key(idx)]))
        codes[idx] = int(min(max(v, -127.0), 127.0))
    return codes, scales


def bf16_rne(y32):
    """float32 -> bfloat16 by integer round-half-even on the bits (the kernel's method), NaN excluded."""
    bits = y32.view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).view(BF16)


# --- properties --------------------------------------------------------------------------------------------------

@given(cases(max_side=4, max_row=40))
def test_matches_element_by_element_oracle(case):
    x, params = case
    codes, scales = reference.quantize_int8(x, **params)
    want_codes, want_scales = naive_quantize(x, **params)
    np.testing.assert_array_equal(scales, want_scales)
    np.testing.assert_array_equal(codes, want_codes)


@given(cases())
def test_output_contract(case):
    x, params = case
    codes, scales = reference.quantize_int8(x, **params)
    assert codes.dtype == np.int8 and codes.shape == x.shape and codes.flags.c_contiguous
    assert scales.dtype == np.float32 and scales.dtype.isnative and scales.flags.c_contiguous
    assert scales.shape == reference.scale_shape(x.shape, **params)
    assert np.all(codes >= -127)  # -128 never appears
    assert np.all(scales >= TINY) and np.all(np.isfinite(scales))  # every scale is a normal float32


@given(cases())
def test_error_is_at_most_half_a_step(case):
    x, params = case
    codes, scales = reference.quantize_int8(x, **params)
    y = reference.dequantize_int8(codes, scales, **params)
    assert y.dtype == np.float32 and y.shape == x.shape and y.flags.c_contiguous
    step = per_element_scale(scales, x.shape, **params).astype(np.float64)
    err = np.abs(y.astype(np.float64) - x.astype(np.float64))
    assert np.all(err <= step / 2 * (1 + TOL)), float(np.max(err / step, initial=0))


@given(cases())
def test_group_maximum_gets_code_127(case):
    x, params = case
    codes, scales = reference.quantize_int8(x, **params)
    a = np.abs(x.astype(np.float32))
    step = per_element_scale(scales, x.shape, **params)
    # the element that defines a group's scale (absmax = 127 * scale up to rounding) always lands on +-127
    is_max = (a >= np.float32(127) * step * np.float32(1 - 2**-20)) & (step != 1)
    assert np.all(np.abs(codes[is_max]) == 127)


@given(cases())
def test_requantizing_dequantized_values_is_idempotent(case):
    x, params = case
    codes, scales = reference.quantize_int8(x, **params)
    y = reference.dequantize_int8(codes, scales, **params)
    assume(np.all(np.abs(y) < LIMIT))  # see test_top_of_domain_dequantizes_to_the_limit
    codes2, scales2 = reference.quantize_int8(y, **params)
    np.testing.assert_array_equal(codes2, codes)
    ulps = np.abs(scales2.view(np.int32).astype(np.int64) - scales.view(np.int32).astype(np.int64))
    assert np.all(ulps <= 1), int(ulps.max(initial=0))


@given(cases())
def test_negation_negates_codes(case):
    x, params = case
    codes, scales = reference.quantize_int8(x, **params)
    neg_codes, neg_scales = reference.quantize_int8(-x, **params)
    np.testing.assert_array_equal(neg_codes, -codes)
    np.testing.assert_array_equal(neg_scales, scales)


@given(cases(max_side=5, max_row=60))
def test_granularities_agree_on_slices(case):
    """A channel (or a group) is quantized exactly as a tensor made of its elements alone."""
    x, params = case
    codes, scales = reference.quantize_int8(x, **params)
    if params["granularity"] == "channel":
        axis = params["axis"]
        for c in range(x.shape[axis]):
            q, s = reference.quantize_int8(np.take(x, c, axis=axis), granularity="tensor")
            np.testing.assert_array_equal(q, np.take(codes, c, axis=axis))
            assert s == scales[c]
    elif params["granularity"] == "group":
        g = params["group_size"]
        for idx in np.ndindex(*scales.shape):
            cols = slice(idx[-1] * g, (idx[-1] + 1) * g)
            q, s = reference.quantize_int8(x[(*idx[:-1], cols)], granularity="tensor")
            np.testing.assert_array_equal(q, codes[(*idx[:-1], cols)])
            assert s == scales[idx]


@given(cases(), st.sampled_from(["float32", "float16", "bfloat16", "float64"]))
def test_dequantize_to_each_dtype_rounds_the_float32_result(case, dtype):
    x, params = case
    codes, scales = reference.quantize_int8(x, **params)
    y32 = reference.dequantize_int8(codes, scales, **params)
    y = reference.dequantize_int8(codes, scales, **params, dtype=BF16 if dtype == "bfloat16" else dtype)
    assert y.shape == codes.shape and y.flags.c_contiguous and y.dtype.isnative
    if dtype == "bfloat16":
        assert y.dtype == BF16
        np.testing.assert_array_equal(y.view(np.uint16), bf16_rne(y32).view(np.uint16))
    elif dtype == "float16":
        with np.errstate(over="ignore"):  # float64 -> float16 is a second, independent correctly rounded path
            want = y32.astype(np.float64).astype(np.float16)
        np.testing.assert_array_equal(y.view(np.uint16), want.view(np.uint16))
    else:
        assert y.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(y, y32.astype(dtype))
    # the float32 result itself: one float32 product per element
    step = per_element_scale(scales, codes.shape, **params)
    np.testing.assert_array_equal(y32, (codes.astype(np.float64) * step).astype(np.float32))


@given(cases(dtype_key="f32"))
def test_strides_and_byte_order_do_not_matter(case):
    x, params = case
    codes, scales = reference.quantize_int8(x, **params)
    for other in (x.astype(">f4"), np.asfortranarray(x), np.repeat(x, 2, axis=-1)[..., ::2] if x.ndim else x):
        q, s = reference.quantize_int8(other, **params)
        np.testing.assert_array_equal(q, codes)
        np.testing.assert_array_equal(s, scales)


def float64_oracle(x, granularity, axis, group_size):
    """Vectorized oracle in float64: a float32 quotient rounded once from float64 equals the IEEE float32 quotient
    (53 >= 2 * 24 + 2, so double rounding is innocuous), so this checks the reference's float32 divisions."""
    x64 = np.asarray(x).astype(np.float64)
    a = np.abs(x64)
    if granularity == "channel":
        absmax = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1).max(axis=1, initial=0)
    else:
        n, g = x64.shape[-1], group_size
        pad = np.zeros((*a.shape[:-1], -(-n // g) * g - n))
        absmax = np.concatenate([a, pad], axis=-1).reshape(*a.shape[:-1], -1, g).max(axis=-1)
    scales = (absmax / 127).astype(np.float32)
    scales[scales < TINY] = 1
    step = per_element_scale(scales, x64.shape, granularity, axis, group_size).astype(np.float64)
    codes = np.clip(np.rint((x64 / step).astype(np.float32)), -127, 127).astype(np.int8)
    return codes, scales


@pytest.mark.parametrize("base", ["bf16", "f16"])
@pytest.mark.parametrize(
    "params", [{"granularity": "channel", "axis": 0}, {"granularity": "channel", "axis": 1},
               {"granularity": "group", "group_size": 7}, {"granularity": "group", "group_size": 64}])
def test_every_16_bit_value_matches_a_float64_oracle(base, params):
    """All finite bfloat16 (or float16) values below 2**127, sorted by magnitude so that every row and group holds
    neighbours: scales cover the whole exponent range, subnormal maxima included."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    x = bits.view(BF16) if base == "bf16" else bits.view(np.float16)
    x32 = x.astype(np.float32)
    x = x[np.abs(x32) < LIMIT]  # drops NaN, inf and |x| >= 2**127
    x = x[np.argsort(np.abs(x.astype(np.float32)), kind="stable")]
    x = x[: x.size // 256 * 256].reshape(-1, 256)
    codes, scales = reference.quantize_int8(x, **params)
    want_codes, want_scales = float64_oracle(x, **{"axis": 0, "group_size": 1, **params})
    np.testing.assert_array_equal(scales, want_scales)
    np.testing.assert_array_equal(codes, want_codes)
    assert np.count_nonzero(np.abs(codes) == 127) >= scales.size // 2  # the rows really do hold neighbours


# --- explicit edge cases -----------------------------------------------------------------------------------------

def test_rounds_half_to_even_and_never_produces_minus_128():
    x = np.array([127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, -127], dtype=np.float32)
    codes, scale = reference.quantize_int8(x, granularity="tensor")
    assert scale.shape == () and scale == 1
    np.testing.assert_array_equal(codes, [127, 0, 2, 2, 0, -2, -2, -127])


def test_zero_rows_get_scale_one_and_zero_codes():
    x = np.array([[0, 0, 0], [1, -2, 0.5], [-0.0, 0, 0]], dtype=np.float32)
    codes, scales = reference.quantize_int8(x, granularity="channel", axis=0)
    np.testing.assert_array_equal(scales, np.array([1, np.float32(2) / np.float32(127), 1], dtype=np.float32))
    np.testing.assert_array_equal(codes, [[0, 0, 0], [64, -127, 32], [0, 0, 0]])


@pytest.mark.parametrize("value", [5.8e-43, 1e-44, 1.4e-45, -1e-40, 126 * 2.0**-126, 127 * 2.0**-126 * (1 - 2**-23)])
def test_subnormal_scales_are_flushed(value):
    x = np.array([[value, value / 3]], dtype=np.float32)
    codes, scales = reference.quantize_int8(x, granularity="channel")
    assert scales.tolist() == [1.0]
    np.testing.assert_array_equal(codes, [[0, 0]])
    y = reference.dequantize_int8(codes, scales)
    assert np.all(np.abs(y - x) <= 0.5)


def test_smallest_normal_scale_is_kept():
    x = np.array([127 * 2.0**-126, -(2.0**-126)], dtype=np.float32)
    codes, scale = reference.quantize_int8(x, granularity="tensor")
    assert scale == TINY
    np.testing.assert_array_equal(codes, [127, -1])


@pytest.mark.parametrize("value", [1.7e38, np.nextafter(np.float32(LIMIT), np.float32(0)), -1.7e38])
def test_just_below_the_limit_is_accepted(value):
    x = np.array([value, value / 4, 1.0], dtype=np.float32)
    codes, scale = reference.quantize_int8(x, granularity="tensor")
    y = reference.dequantize_int8(codes, scale, granularity="tensor")
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(np.abs(codes), [127, 32, 0])


def test_top_of_domain_dequantizes_to_the_limit():
    """Documented corner: 127 * (x / 127) rounds up to 2**127 for the largest float32 below it. The value stays
    finite (the reason for the limit) but quantizing it again is refused."""
    x = np.array([np.nextafter(np.float32(LIMIT), np.float32(0))], dtype=np.float32)
    codes, scale = reference.quantize_int8(x, granularity="tensor")
    y = reference.dequantize_int8(codes, scale, granularity="tensor")
    assert y[0] == LIMIT
    with pytest.raises(ValueError, match=r"x\[0\] = 1\.7014118e\+38"):
        reference.quantize_int8(y, granularity="tensor")


def test_half_step_bound_needs_more_slack_than_1e_minus_6():
    """Pins the docstring's claim: a tie of x / s at k + 0.5 can hide a true quotient past the tie."""
    x = np.array([1.5118216, -0.8392396], dtype=np.float32)
    codes, scale = reference.quantize_int8(x, granularity="tensor")
    y = reference.dequantize_int8(codes, scale, granularity="tensor")
    excess = abs(float(y[1]) - float(x[1])) / (float(scale) / 2) - 1
    assert 1e-6 < excess <= TOL


@pytest.mark.parametrize(
    ("value", "text"),
    [(LIMIT, "1.7014118e+38"), (-LIMIT, "-1.7014118e+38"), (np.finfo(np.float32).max, "3.4028235e+38"),
     (np.inf, "inf"), (-np.inf, "-inf"), (np.nan, "nan")],
)
def test_outside_the_domain_is_rejected_with_its_index(value, text):
    x = np.zeros((4, 20), dtype=np.float32)
    x[3, 17] = value
    for granularity in reference.GRANULARITIES:
        with pytest.raises(ValueError, match=rf"\|x\| < 2\*\*127; x\[3, 17\] = {re.escape(text)}$"):
            reference.quantize_int8(x, granularity=granularity)


def test_the_first_bad_element_in_c_order_is_named():
    x = np.zeros((3, 4, 5), dtype=np.float32)
    x[2, 0, 0] = np.nan
    x[1, 3, 4] = -np.inf
    x[1, 3, 3] = 2.0**127
    with pytest.raises(ValueError, match=r"x\[1, 3, 3\] = 1\.7014118e\+38$"):
        reference.quantize_int8(x, granularity="group", group_size=2)
    with pytest.raises(ValueError, match=r"x\[1, 3, 3\] = "):  # C order of the logical array, whatever the strides
        reference.quantize_int8(np.asfortranarray(x), granularity="tensor")


@pytest.mark.parametrize(
    ("x", "where"),
    [(np.array(np.nan, dtype=np.float32), r"x\[\(\)\] = nan"),
     (np.array([1, np.inf], dtype=np.float16), r"x\[1\] = inf"),
     (np.array([[1, 2], [3, 2.0**127]], dtype=BF16), r"x\[1, 1\] = 1\.7014118e\+38"),
     (np.array([1, -np.inf], dtype=">f4"), r"x\[1\] = -inf")],
)
def test_domain_error_for_each_dtype(x, where):
    with pytest.raises(ValueError, match=where):
        reference.quantize_int8(x, granularity="tensor")


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.uint16, np.bool_, np.complex64, np.float64, object,
                                   ml_dtypes.float8_e4m3fn])
def test_unsupported_dtypes_are_type_errors(dtype):
    x = np.zeros((2, 3), dtype=dtype)
    with pytest.raises(UnsupportedDtypeError, match="supported: float32, float16, bfloat16") as info:
        reference.quantize_int8(x)
    assert isinstance(info.value, TypeError)


@pytest.mark.parametrize(
    ("shape", "params", "match"),
    [((2, 3), {"granularity": "row"}, "granularity must be one of 'tensor', 'channel', 'group', got 'row'"),
     ((2, 3), {"granularity": None}, "granularity must be one of"),
     ((2, 3), {"axis": 2}, r"axis=2 is out of range for a 2-d array; pass an axis in \[-2, 2\)"),
     ((2, 3), {"axis": -3}, "axis=-3 is out of range"),
     ((2, 3), {"axis": True}, "axis must be an int"),
     ((2, 3), {"axis": 1.0}, "axis must be an int"),
     ((2, 3), {"axis": None}, "axis must be an int"),
     ((2, 3), {"granularity": "group", "group_size": 0}, "group_size must be an int >= 1"),
     ((2, 3), {"granularity": "group", "group_size": -4}, "group_size must be an int >= 1"),
     ((2, 3), {"granularity": "group", "group_size": True}, "group_size must be an int >= 1"),
     ((2, 3), {"granularity": "group", "group_size": 2.0}, "group_size must be an int >= 1"),
     ((), {"granularity": "channel"}, "needs an array with at least 1 dimension.*granularity='tensor'"),
     ((), {"granularity": "group"}, "needs an array with at least 1 dimension")],
)
def test_bad_parameters_are_value_errors(shape, params, match):
    x = np.ones(shape, dtype=np.float32)
    for call in (lambda: reference.quantize_int8(x, **params), lambda: reference.scale_shape(shape, **params)):
        with pytest.raises(ValueError, match=match):
            call()


def test_ignored_parameters_are_not_checked():
    x = np.ones((2, 3), dtype=np.float32)
    assert reference.check_params(x.shape, "tensor", 99, 0) == ("tensor", None, None)
    assert reference.check_params(x.shape, "channel", np.int64(-1), True) == ("channel", 1, None)
    assert reference.check_params(x.shape, "group", "nonsense", np.int32(4)) == ("group", None, 4)
    assert reference.quantize_int8(x, granularity="tensor", axis=5)[1].shape == ()


@pytest.mark.parametrize(
    ("shape", "params", "scales"),
    [((0,), {"granularity": "tensor"}, np.float32(1)),
     ((3, 0), {"granularity": "channel", "axis": 0}, np.ones(3, np.float32)),
     ((3, 0), {"granularity": "channel", "axis": 1}, np.ones(0, np.float32)),
     ((0, 2, 5), {"granularity": "channel", "axis": -1}, np.ones(5, np.float32)),
     ((3, 0), {"granularity": "group", "group_size": 4}, np.ones((3, 0), np.float32)),
     ((0, 10), {"granularity": "group", "group_size": 4}, np.ones((0, 3), np.float32))],
)
def test_empty_arrays(shape, params, scales):
    for dtype in (np.float32, np.float16, BF16):
        x = np.zeros(shape, dtype=dtype)
        codes, s = reference.quantize_int8(x, **params)
        assert codes.shape == shape and codes.dtype == np.int8
        assert s.shape == np.shape(scales) and s.dtype == np.float32
        np.testing.assert_array_equal(s, scales)
        y = reference.dequantize_int8(codes, s, **params, dtype=dtype)
        assert y.shape == shape and y.dtype == dtype


def test_scale_shapes():
    assert reference.scale_shape((4, 10), "group", group_size=3) == (4, 4)
    assert reference.scale_shape((4, 10), "group", group_size=10) == (4, 1)
    assert reference.scale_shape((4, 10), "group", group_size=11) == (4, 1)
    assert reference.scale_shape((2, 3, 7), "group", group_size=2) == (2, 3, 4)
    assert reference.scale_shape((2, 3, 7), "channel", axis=-2) == (3,)
    assert reference.scale_shape((), "tensor") == ()


def test_partial_last_group():
    x = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], dtype=np.float32)
    codes, scales = reference.quantize_int8(x, granularity="group", group_size=4)
    np.testing.assert_array_equal(scales, np.float32([[4, 8, 10]]) / np.float32(127))
    np.testing.assert_array_equal(codes[0, [3, 7, 9]], [127, 127, 127])


@pytest.mark.parametrize("group_size", [2**61 + 1, 2**62])
def test_group_sizes_up_to_the_filters_maximum_make_one_partial_group(group_size):
    # a group longer than the row is one partial group, up to the int8 filter's 2**62 (past 2**61, the empty array
    # of full groups once made NumPy refuse its shape as "too big")
    x = np.linspace(-1, 1, 60, dtype=np.float32).reshape(3, 20)
    codes, scales = reference.quantize_int8(x, granularity="group", group_size=group_size)
    want = reference.quantize_int8(x, granularity="group", group_size=20)
    np.testing.assert_array_equal(codes, want[0])
    np.testing.assert_array_equal(scales, want[1])
    y = reference.dequantize_int8(codes, scales, granularity="group", group_size=group_size)
    np.testing.assert_array_equal(y, reference.dequantize_int8(*want, granularity="group", group_size=20))

def test_bfloat16_and_big_endian_inputs_quantize_like_their_float32_values():
    rng = np.random.default_rng(7)
    x32 = rng.standard_normal((16, 40)).astype(np.float32)
    want = reference.quantize_int8(x32.astype(BF16).astype(np.float32), granularity="group", group_size=16)
    for x in (x32.astype(BF16), x32.astype(BF16).astype(BF16.newbyteorder(">"))):
        got = reference.quantize_int8(x, granularity="group", group_size=16)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    want = reference.quantize_int8(x32.astype(np.float16).astype(np.float32), axis=1)
    got = reference.quantize_int8(x32.astype(">f2"), axis=1)
    np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16, np.float64, "bfloat16", ">f4"])
def test_dequantize_output_dtypes(dtype):
    codes = np.array([[127, -64, 0], [1, 2, -127]], dtype=np.int8)
    scales = np.array([0.5, 2.0**-10], dtype=np.float32)
    y = reference.dequantize_int8(codes, scales, dtype=dtype)
    want = np.array([[63.5, -32, 0], [2.0**-10, 2.0**-9, -127 * 2.0**-10]])
    assert y.dtype.isnative and y.flags.c_contiguous
    np.testing.assert_array_equal(y.astype(np.float64), want)


def test_dequantize_to_float16_overflows_to_inf_without_warning():
    codes = np.array([127, -127, 1], dtype=np.int8)
    y = reference.dequantize_int8(codes, np.array(1000, dtype=np.float32), granularity="tensor", dtype=np.float16)
    np.testing.assert_array_equal(y, np.array([np.inf, -np.inf, 1000], dtype=np.float16))


@pytest.mark.parametrize(
    ("codes", "scales", "params", "error", "match"),
    [(np.zeros((2, 3), np.int16), np.ones(2, np.float32), {}, UnsupportedDtypeError, "supported: int8"),
     (np.zeros((2, 3), np.int8), np.ones(3, np.float32), {}, ValueError, r"float32 of shape \(2,\)"),
     (np.zeros((2, 3), np.int8), np.ones(2, np.float64), {}, ValueError, "scales must be float32"),
     (np.zeros((2, 3), np.int8), np.ones((2, 1), np.float32), {"granularity": "group", "group_size": 2},
      ValueError, r"shape \(2, 2\)"),
     (np.zeros((2, 3), np.int8), np.ones(2, np.float32), {"dtype": np.int8}, UnsupportedDtypeError,
      "float32, float16, bfloat16, float64"),
     (np.zeros((2, 3), np.int8), np.ones(2, np.float32), {"dtype": "complex64"}, UnsupportedDtypeError, "float64"),
     (np.zeros((2, 3), np.int8), np.ones(2, np.float32), {"axis": 3}, ValueError, "out of range")],
)
def test_dequantize_validation(codes, scales, params, error, match):
    with pytest.raises(error, match=match):
        reference.dequantize_int8(codes, scales, **params)


def test_dequantize_accepts_big_endian_scales_and_strided_codes():
    codes = np.arange(-12, 12, dtype=np.int8).reshape(4, 6)
    scales = np.array([0.25, 0.5, 1.0, 2.0, 4.0, 8.0], dtype=">f4")
    y = reference.dequantize_int8(codes.T, scales, axis=0)
    np.testing.assert_array_equal(y, codes.T * scales.astype(np.float32)[:, None])


# --- SQNR --------------------------------------------------------------------------------------------------------

def test_sqnr_values():
    assert reference.sqnr(np.array([3.0, 4.0]), np.array([3.0, 4.5])) == pytest.approx(20.0, abs=1e-12)
    assert reference.sqnr(np.ones(3, np.float32), np.ones(3, np.float32)) == math.inf
    assert reference.sqnr(np.zeros(0), np.zeros(0)) == math.inf
    assert reference.sqnr(np.zeros(3), np.ones(3)) == -math.inf
    assert reference.sqnr(np.ones(4), np.zeros(4)) == 0.0
    assert reference.sqnr(np.ones(2, dtype=BF16), np.array([1, 1.5], dtype=BF16)) == pytest.approx(
        20 * math.log10(math.sqrt(2) / 0.5))
    with pytest.raises(ValueError, match="same shape"):
        reference.sqnr(np.ones(3), np.ones(4))


@pytest.mark.parametrize(
    ("params", "floor"),
    [({"granularity": "channel", "axis": 0}, 35), ({"granularity": "channel", "axis": 1}, 35),
     ({"granularity": "tensor"}, 33), ({"granularity": "group", "group_size": 128}, 38),
     ({"granularity": "group", "group_size": 32}, 40)],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16])
def test_sqnr_on_gaussian_data(params, floor, dtype):
    x = np.random.default_rng(0).standard_normal((64, 256)).astype(dtype)
    codes, scales = reference.quantize_int8(x, **params)
    y = reference.dequantize_int8(codes, scales, **params)
    assert reference.sqnr(x, y) > floor


# --- the CPU decode's block-by-block dequantization --------------------------------------------------------------

@given(cases(max_side=6, max_row=70), st.sampled_from(["float32", "float16", "bfloat16", ">f4"]),
       st.integers(1, 40))
def test_block_by_block_dequantization_equals_the_reference(case, dtype, block):
    """The container's CPU decode dequantizes a block of rows at a time (filters.int8.dequantize_into); with
    blocks of a few elements, every shape, axis, group and output byte order must give the reference's bits."""
    from cupycodec.filters import int8

    x, params = case
    codes, scales = reference.quantize_int8(x, **params)
    want = reference.dequantize_int8(codes, scales, **params, dtype=BF16 if dtype == "bfloat16" else "float32"
                                     if dtype == ">f4" else dtype)
    out = np.full(codes.shape, 7, dtype=BF16 if dtype == "bfloat16" else dtype)
    old, int8.BLOCK_ELEMENTS = int8.BLOCK_ELEMENTS, block
    try:
        int8.dequantize_into(out, codes, scales, dtype=want.dtype, **params)
    finally:
        int8.BLOCK_ELEMENTS = old
    assert out.tobytes() == want.astype(out.dtype).tobytes()


def test_block_by_block_dequantization_refuses_scales_of_another_shape():
    """A block's slice of too many channel scales has the block's shape: the whole shape is checked first."""
    from cupycodec.filters import int8

    codes = np.ones((8, 4), np.int8)
    old, int8.BLOCK_ELEMENTS = int8.BLOCK_ELEMENTS, 4
    try:
        with pytest.raises(ValueError, match=r"shape \(8,\)"):
            int8.dequantize_into(np.empty((8, 4), np.float32), codes, np.ones(9, np.float32), dtype=np.float32,
                                 granularity="channel", axis=0, group_size=128)
    finally:
        int8.BLOCK_ELEMENTS = old


@pytest.mark.parametrize("granularity", ["channel", "group", "tensor"])
def test_cpu_int8_decode_holds_the_output_and_codes_not_float32_copies(granularity):
    """Before the block-by-block decode, a 16 MiB bf16 INT8 container decoded through a whole float32 copy and a
    whole bf16 copy: 3.5x the output at its peak (4.5x with group scales). Now: the output, the codes and one
    block (NumPy's allocations, as tracemalloc sees them)."""
    import tracemalloc

    import cupycodec as cc

    x = np.random.default_rng(0).standard_normal((2048, 4096), dtype=np.float32).astype(BF16)
    c = cc.compress(x, quantize="int8", granularity=granularity)
    tracemalloc.start()
    try:
        y = cc.decompress(c)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    bound = y.nbytes + x.size + (12 << 20)  # the output, the int8 codes, a block's temporaries
    assert peak <= bound, f"{granularity}: peak {peak / y.nbytes:.2f}x the output"
    want = reference.dequantize_int8(*cc.decompress(c, dequantize=False)[:2], granularity=granularity,
                                     group_size=128, dtype=BF16)
    assert y.tobytes() == want.tobytes()


def test_quantize_int8_holds_one_float32_temporary():
    # a temporary per step (|x|, the mask, the quotients, rint, clip) took 14 bytes an element over a float32
    # weight and 18 over a bf16 one (9x it): a large layer's CPU compression peaked at gigabytes
    import tracemalloc

    for dtype, most in ((np.float32, 5.5), (ml_dtypes.bfloat16, 9.5)):  # float32 codes' temporary + int8 (+ x32)
        x = np.random.default_rng(0).standard_normal((256, 1024), dtype=np.float32).astype(dtype)
        tracemalloc.start()
        try:
            codes, scales = reference.quantize_int8(x)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak / x.size < most, (dtype, peak / x.size)
        assert np.array_equal(codes, np.clip(np.rint(x.astype(np.float32) / scales[:, None]), -127, 127))
