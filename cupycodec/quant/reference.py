"""The NumPy specification of symmetric absmax int8 quantization, which every kernel must match bit for bit.

Symmetric absmax quantization stores a float tensor ``x`` as int8 *codes* ``q`` and float32 *scales* ``s``, one scale
per group of elements, so that ``x ≈ q * s``. A group is the whole tensor (``granularity="tensor"``), one index along
an axis (``"channel"``) or a run of ``group_size`` consecutive elements of the last axis (``"group"``). For each group
``G``::

    absmax = max(|x_i| for i in G)                 (0 for an empty group)
    s      = absmax / 127                          (one float32 division, round to nearest even)
    s      = 1  if s < 2**-126                     (zero groups and subnormal scales)
    q_i    = clip(rint(x_i / s), -127, 127)        (float32 division; rint rounds half to even)
    y_i    = q_i * s                               (dequantization, one float32 multiplication)

All arithmetic is float32; float16 and bfloat16 inputs are widened first, which is exact. This module fixes every
edge case (the domain, empty arrays, subnormal maxima, partial groups, the error messages); ``cupycodec.kernels.int8``
reproduces it on the GPU, and ``tests/gpu/test_kernels_int8.py`` pins the two together bit for bit.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from ..errors import UnsupportedDtypeError

__all__ = ["GRANULARITIES", "check_params", "dequantize_int8", "quantize_int8", "scale_shape", "sqnr"]

GRANULARITIES = ("tensor", "channel", "group")

# Inputs are widened to float32 exactly; float64 is refused because narrowing it would be a silent, lossy choice.
_INPUT_DTYPES = ("float32", "float16", "bfloat16")
_OUTPUT_DTYPES = ("float32", "float16", "bfloat16", "float64")
_LIMIT = np.float32(2.0**127)  # |x| must stay below this: 127 * (2**127 / 127) still rounds to a finite float32
_TINY = np.finfo(np.float32).tiny  # 2**-126, the smallest normal float32
# The largest scale quantize_int8 can produce: the largest |x| allowed (the float32 just below 2**127) over 127.
MAX_SCALE = np.nextafter(_LIMIT, np.float32(0)) / np.float32(127)


def scales_in_range(scales: np.ndarray) -> bool:
    """Whether every scale is one :func:`quantize_int8` can produce: finite, in [2**-126, MAX_SCALE]. Only such
    scales keep ``127 * scale`` finite in float32, so dequantizing them cannot overflow."""
    s = np.asarray(scales, dtype=np.float32)
    return bool(((s >= _TINY) & (s <= MAX_SCALE)).all())  # NaN compares False
_QMAX = np.float32(127)


def _is_bfloat16(dtype: np.dtype) -> bool:
    # Recognize ml_dtypes' bfloat16 without importing ml_dtypes (arrays of it can only exist if it is imported).
    return dtype.name == "bfloat16" and getattr(dtype.type, "__module__", "").startswith("ml_dtypes")


def _bfloat16() -> np.dtype:
    import ml_dtypes  # lazy: only needed to produce bfloat16 output

    return np.dtype(ml_dtypes.bfloat16)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_params(
    shape: tuple[int, ...], granularity: str, axis: int | None, group_size: int | None
) -> tuple[str, int | None, int | None]:
    """Validate and normalize the quantization parameters for an array of shape `shape`.

    Parameters
    ----------
    shape : tuple of int
        Shape of the array to quantize.
    granularity : {"tensor", "channel", "group"}
        One scale for the whole tensor, one per index along `axis`, or one per `group_size` consecutive elements of
        the last axis.
    axis : int
        The channel axis; negative values count from the end. Only used (and only checked) for ``"channel"``.
    group_size : int
        Elements per group, ``>= 1``; need not divide the last axis. Only used (and only checked) for ``"group"``.

    Returns
    -------
    (granularity, axis, group_size)
        `axis` is normalized to ``[0, ndim)`` for ``"channel"`` and ``None`` otherwise; `group_size` is a Python int
        for ``"group"`` and ``None`` otherwise.

    Raises
    ------
    ValueError
        For an unknown granularity, a 0-d array with ``"channel"`` or ``"group"``, an axis that is not an int (bools
        are refused) or is out of range, or a group size that is not an int ``>= 1``.
    """
    if not isinstance(granularity, str) or granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(map(repr, GRANULARITIES))}, got {granularity!r}")
    ndim = len(shape)
    if granularity == "tensor":
        return granularity, None, None
    if ndim == 0:
        raise ValueError(
            f"granularity={granularity!r} needs an array with at least 1 dimension, got a 0-d array; "
            "use granularity='tensor' or reshape to (1,)"
        )
    if granularity == "channel":
        if not _is_int(axis):
            raise ValueError(f"axis must be an int in [{-ndim}, {ndim}) for granularity='channel', got {axis!r}")
        axis = operator.index(axis)
        if not -ndim <= axis < ndim:
            raise ValueError(
                f"axis={axis} is out of range for a {ndim}-d array; pass an axis in [{-ndim}, {ndim})"
            )
        return granularity, axis % ndim, None
    if not _is_int(group_size) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1 for granularity='group', got {group_size!r}")
    return granularity, None, operator.index(group_size)


def scale_shape(
    shape: tuple[int, ...], granularity: str = "channel", axis: int = 0, group_size: int = 128
) -> tuple[int, ...]:
    """The shape of the scales that :func:`quantize_int8` returns for an array of shape `shape`.

    Parameters
    ----------
    shape, granularity, axis, group_size
        As for :func:`check_params`.

    Returns
    -------
    tuple of int
        ``()`` for ``"tensor"``; ``(shape[axis],)`` for ``"channel"``;
        ``shape[:-1] + (ceil(shape[-1] / group_size),)`` for ``"group"`` (the last group of a row may be partial).

    Raises
    ------
    ValueError
        As for :func:`check_params`.

    Examples
    --------
    >>> scale_shape((4, 10), "group", group_size=3)
    (4, 4)
    >>> scale_shape((4, 10), "channel", axis=-1)
    (10,)
    """
    shape = tuple(operator.index(n) for n in shape)
    granularity, axis, group_size = check_params(shape, granularity, axis, group_size)
    if granularity == "tensor":
        return ()
    if granularity == "channel":
        return (shape[axis],)
    return (*shape[:-1], -(-shape[-1] // group_size))


def _domain_error(index: tuple[int, ...], value: np.float32) -> ValueError:
    # Shared with cupycodec.kernels.int8, so that the device check raises the same text.
    where = ", ".join(str(int(i)) for i in index) if index else "()"
    return ValueError(f"int8 quantization needs finite input with |x| < 2**127; x[{where}] = {np.float32(value)!s}")


def _as_float32(x: np.ndarray) -> np.ndarray:
    """C-contiguous native float32 copy (or view) of a float32/float16/bfloat16 array of either byte order."""
    dtype = x.dtype
    if not (dtype.kind == "f" and dtype.itemsize in (2, 4)) and not _is_bfloat16(dtype):
        raise UnsupportedDtypeError(dtype, _INPUT_DTYPES, "int8 quantization reads float32, float16 or bfloat16")
    if not dtype.isnative:
        x = x.astype(dtype.newbyteorder("="))
    return np.asarray(x, dtype=np.float32, order="C")  # not ascontiguousarray: it turns 0-d into 1-d


def _group_absmax(a: np.ndarray, group_size: int) -> np.ndarray:
    """Max of `a` (non-negative) over groups of `group_size` along the last axis; the last group may be partial."""
    n = a.shape[-1]
    full = n // group_size
    parts = []
    if full:  # no empty (..., 0, group_size) array: past 2**61 float32 elements a group, NumPy refuses its shape
        parts.append(a[..., : full * group_size].reshape(*a.shape[:-1], full, group_size).max(axis=-1, initial=0))
    if n % group_size:
        parts.append(a[..., full * group_size :].max(axis=-1, initial=0, keepdims=True))
    if not parts:  # an empty last axis: no group
        return np.zeros((*a.shape[:-1], 0), a.dtype)
    return np.concatenate(parts, axis=-1)


def _broadcast_scales(scales: np.ndarray, shape: tuple[int, ...], granularity: str, axis, group_size) -> np.ndarray:
    """Scales repeated to one per element of an array of shape `shape`."""
    if granularity == "tensor":
        return scales
    if granularity == "channel":
        return scales.reshape([n if d == axis else 1 for d, n in enumerate(shape)])
    return scales[..., np.arange(shape[-1]) // group_size]  # indexing, not np.repeat: group_size may be huge


def quantize_int8(
    x: np.ndarray, *, granularity: str = "channel", axis: int = 0, group_size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric absmax int8 quantization: ``x ≈ codes * scales``, one float32 scale per group.

    For each group ``G`` (see `granularity`), in float32 arithmetic::

        absmax = max(|x_i| for i in G)             (0 for an empty group)
        scale  = absmax / float32(127)             (IEEE division, round to nearest even)
        scale  = 1.0  if scale < 2**-126           (float32's smallest normal)
        code_i = clip(rint(x_i / scale), -127, 127)

    ``rint`` rounds half to even, like CUDA's ``rintf``. ``-128`` never appears, so negating codes is safe.
    Replacing scales below the smallest normal by 1 handles all-zero groups and groups whose maximum is so small
    that the scale would be subnormal (with too few significant bits for the half-step error bound); such groups get
    codes 0. Float16 and bfloat16 inputs are widened to float32 first, which is exact.

    Parameters
    ----------
    x : numpy.ndarray
        float32, float16 or ``ml_dtypes.bfloat16``, either byte order, any strides, any shape (empty included; 0-d
        only with ``granularity="tensor"``).
    granularity : {"tensor", "channel", "group"}
        ``"tensor"``: one scale. ``"channel"``: one scale per index along `axis`, the maximum taken over all other
        axes. ``"group"``: one scale per `group_size` consecutive elements of the last axis; when `group_size` does
        not divide the last axis, the last group of each row is partial.
    axis : int
        Channel axis for ``"channel"`` (negative counts from the end); ignored otherwise.
    group_size : int
        Group length for ``"group"``; ignored otherwise.

    Returns
    -------
    codes : numpy.ndarray
        int8, the shape of `x`, C-contiguous.
    scales : numpy.ndarray
        float32, C-contiguous, of shape :func:`scale_shape` ``(x.shape, ...)``: ``()`` for ``"tensor"`` (1.0 for an
        empty tensor), ``(x.shape[axis],)`` for ``"channel"`` (1.0 for channels without elements),
        ``x.shape[:-1] + (ceil(x.shape[-1] / group_size),)`` for ``"group"``.

    Raises
    ------
    UnsupportedDtypeError
        If `x` is not float32, float16 or bfloat16 (a ``TypeError``).
    ValueError
        For bad parameters (see :func:`check_params`), or if any element is NaN, infinite or has
        ``|x| >= 2**127``; the message names the first such element in C order, e.g.
        ``"int8 quantization needs finite input with |x| < 2**127; x[3, 17] = nan"``. The bound keeps
        dequantization finite: ``127 * (absmax / 127)`` can round one ulp above ``absmax``. Nothing is clipped
        silently.

    Notes
    -----
    Every dequantized value is within half a step of the input:
    ``|x - codes * scale| <= scale / 2 * (1 + 2**-15)`` (the slack covers the two float32 roundings of
    ``x / scale`` and ``codes * scale``; ``1e-6`` is not enough, ties of ``x / scale`` at ``k + 0.5`` with a true
    quotient slightly past the tie exceed it).

    Examples
    --------
    >>> q, s = quantize_int8(np.array([[1.0, -0.5], [0.0, 0.0]], dtype=np.float32))
    >>> q
    array([[127, -64],
           [  0,   0]], dtype=int8)
    >>> s
    array([0.00787402, 1.        ], dtype=float32)
    """
    x = np.asarray(x)
    x32 = _as_float32(x)
    granularity, axis, group_size = check_params(x32.shape, granularity, axis, group_size)
    # one float32 temporary besides x32, reused for |x|, then the quotients rounded and clipped in place: 5x a bf16
    # weight at the peak (x32 and it, a byte mask, the codes), where a temporary per step took 9x
    a = np.abs(x32, out=np.empty_like(x32))  # an array for 0-d input too (np.abs gives a scalar there)
    ok = a < _LIMIT  # also False for NaN
    if not ok.all():
        flat = int(np.argmin(ok.reshape(-1)))
        raise _domain_error(np.unravel_index(flat, x32.shape), x32.reshape(-1)[flat])
    del ok
    if granularity == "tensor":
        absmax = np.asarray(a.max(initial=np.float32(0)), dtype=np.float32)
    elif granularity == "channel":
        others = tuple(d for d in range(x32.ndim) if d != axis)
        absmax = a.max(axis=others, initial=np.float32(0))
    else:
        absmax = _group_absmax(a, group_size)
    scales = np.array(absmax / _QMAX, dtype=np.float32)  # float32 / float32: one IEEE division; keeps 0-d as 0-d
    scales[scales < _TINY] = 1
    with np.errstate(under="ignore"):  # subnormal x / 1.0 is exact; no other flag can be raised here
        codes = np.divide(x32, _broadcast_scales(scales, x32.shape, granularity, axis, group_size), out=a)
    np.rint(codes, out=codes)
    return np.clip(codes, -_QMAX, _QMAX, out=codes).astype(np.int8), scales


def dequantize_int8(
    codes: np.ndarray,
    scales: np.ndarray,
    *,
    granularity: str = "channel",
    axis: int = 0,
    group_size: int = 128,
    dtype=np.float32,
) -> np.ndarray:
    """Inverse of :func:`quantize_int8`: ``y = codes * scales`` in float32, then cast to `dtype`.

    ``y32 = float32(code) * scale`` (one float32 multiplication, exact for float64 output), then
    ``y32.astype(dtype)``, rounding to nearest even for float16 and bfloat16. Float16 output overflows to ``±inf``
    for ``|y32| >= 65520``, as any float32 to float16 cast does.

    Parameters
    ----------
    codes : numpy.ndarray
        int8 codes, any shape and strides.
    scales : numpy.ndarray
        float32 (either byte order) of shape exactly :func:`scale_shape` ``(codes.shape, granularity, axis,
        group_size)``.
    granularity, axis, group_size
        The values that :func:`quantize_int8` was called with.
    dtype : dtype-like
        float32, float16, ``ml_dtypes.bfloat16`` or float64; the result is in native byte order.

    Returns
    -------
    numpy.ndarray
        C-contiguous array of `dtype` with the shape of `codes`.

    Raises
    ------
    UnsupportedDtypeError
        If `codes` is not int8 or `dtype` is not one of the four float types (``TypeError``).
    ValueError
        For bad parameters (see :func:`check_params`) or if `scales` is not float32 of the expected shape.

    Examples
    --------
    >>> dequantize_int8(np.array([127, -64], dtype=np.int8), np.array(0.5, dtype=np.float32), granularity="tensor")
    array([ 63.5, -32. ], dtype=float32)
    """
    codes = np.asarray(codes)
    scales = np.asarray(scales)
    if codes.dtype != np.int8:
        raise UnsupportedDtypeError(codes.dtype, ["int8"], "dequantize_int8 reads the codes quantize_int8 returns")
    out_dtype = _output_dtype(dtype)
    granularity, axis, group_size = check_params(codes.shape, granularity, axis, group_size)
    expected = scale_shape(codes.shape, granularity, axis if axis is not None else 0, group_size or 1)
    if scales.dtype.kind != "f" or scales.dtype.itemsize != 4 or scales.shape != expected:
        raise ValueError(
            f"scales must be float32 of shape {expected} for codes of shape {codes.shape} and "
            f"granularity={granularity!r}, got {scales.dtype} of shape {scales.shape}; "
            "pass the scales quantize_int8 returned with the same parameters"
        )
    scales = np.array(scales, dtype=np.float32)  # native order; np.ascontiguousarray would make a 0-d array 1-d
    y32 = np.array(codes, dtype=np.float32, order="C")
    y32 *= _broadcast_scales(scales, codes.shape, granularity, axis, group_size)
    with np.errstate(over="ignore", under="ignore"):  # float16 output: overflow to inf and subnormals are intended
        return y32.astype(out_dtype, order="C")


def _output_dtype(dtype) -> np.dtype:
    if isinstance(dtype, str) and dtype == "bfloat16":
        return _bfloat16()
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise UnsupportedDtypeError(dtype, _OUTPUT_DTYPES) from exc
    if _is_bfloat16(dt):
        return dt.newbyteorder("=")
    if dt.kind == "f" and dt.itemsize in (2, 4, 8):
        return dt.newbyteorder("=")
    raise UnsupportedDtypeError(dt, _OUTPUT_DTYPES)


def sqnr(x: np.ndarray, y: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: ``20 * log10(||x|| / ||x - y||)``, computed in float64.

    The same quantity as torchao's ``compute_error``. Higher is better; int8 absmax quantization of Gaussian data
    gives about 40 to 45 dB.

    Parameters
    ----------
    x : numpy.ndarray
        The reference signal (any float dtype, bfloat16 included).
    y : numpy.ndarray
        Its approximation, of the same shape.

    Returns
    -------
    float
        ``inf`` when ``x == y`` everywhere (empty arrays included); ``-inf`` when ``x`` is all zero but ``y`` is not.

    Raises
    ------
    ValueError
        If the shapes differ.

    Examples
    --------
    >>> round(sqnr(np.array([3.0, 4.0]), np.array([3.0, 4.5])), 6)
    20.0
    """
    x64 = np.asarray(x).astype(np.float64)
    y64 = np.asarray(y).astype(np.float64)
    if x64.shape != y64.shape:
        raise ValueError(f"sqnr needs arrays of the same shape, got {x64.shape} and {y64.shape}")
    noise = float(np.linalg.norm((x64 - y64).reshape(-1)))
    signal = float(np.linalg.norm(x64.reshape(-1)))
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 20 * math.log10(signal / noise)
