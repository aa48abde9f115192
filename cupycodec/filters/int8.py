"""The ``int8`` filter: symmetric absmax INT8 quantization (lossy) into ``data`` codes and ``scale`` factors.

The arithmetic is specified by :mod:`cupycodec.quant.reference`; on the GPU the CUDA kernels of
:mod:`cupycodec.kernels.int8` produce bit-identical codes, scales and dequantized values.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..dtypes import ArraySpec
from ..errors import UnsupportedDtypeError
from .base import Filter

__all__ = ["Int8", "dequantize_into"]

_FLOATS = ("F32", "F16", "BF16")


_MAX_GROUP = 2**62  # far beyond any array (NumPy's index arithmetic overflows past 2**63)

class Int8(Filter):
    """Quantize the float ``data`` array to int8 codes (``data``) and float32 scales (``scale``).

    Parameters
    ----------
    granularity : {"channel", "group", "tensor"}
        One scale per index along ``axis``, per ``group_size`` run along the last axis, or for the whole tensor.
    axis : int
        Channel axis (``granularity="channel"``; 0 = output channels of an ``nn.Linear`` weight).
    group_size : int
        Elements per group along the last axis (``granularity="group"``); a partial last group is allowed.
    """

    filter_id = "int8"
    version = 1
    lossless = False

    def __init__(self, granularity: str = "channel", axis: int | None = 0, group_size: int | None = 128):
        from ..quant import reference

        if granularity not in reference.GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(reference.GRANULARITIES)}, got {granularity!r}")
        self.granularity = granularity
        if granularity == "channel" and not reference._is_int(axis):
            raise ValueError(f"axis must be an int, got {axis!r}")
        if granularity == "group" and (not reference._is_int(group_size) or not 1 <= group_size <= _MAX_GROUP):
            raise ValueError(f"group_size must be an int from 1 to 2**62, got {group_size!r}")
        # NumPy integers (as the reference takes them) stored as Python ints: the configuration is JSON
        self.axis = int(axis) if granularity == "channel" else None
        self.group_size = int(group_size) if granularity == "group" else None

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"id": self.filter_id, "version": self.version, "granularity": self.granularity}
        if self.axis is not None:
            config["axis"] = self.axis
        if self.group_size is not None:
            config["group_size"] = self.group_size
        return config

    def _kw(self) -> dict[str, Any]:
        return {"granularity": self.granularity, "axis": self.axis if self.axis is not None else 0,
                "group_size": self.group_size if self.group_size is not None else 128}

    def resolve(self, inputs):
        data = inputs.get("data")
        if self.granularity == "channel" and data is not None and data.shape:
            ndim = len(data.shape)
            if not -ndim <= self.axis < ndim:  # checked here: -ndim - 1 wrapped once to -1, another axis
                raise ValueError(f"axis={self.axis} is out of range for a {ndim}-D array (axes {-ndim} to {ndim - 1})")
            if self.axis < 0:
                return Int8("channel", self.axis + ndim, None)
        return self

    def specs(self, inputs):
        from ..quant import reference

        data = inputs.get("data")
        if data is None or set(inputs) != {"data"}:
            raise ValueError(f"int8 quantization applies to a single 'data' array, got segments {sorted(inputs)}")
        if data.dtype not in _FLOATS:
            raise UnsupportedDtypeError(data.dtype, ["float32", "float16", "bfloat16"],
                                        "int8 quantization takes floating-point weights")
        reference.check_params(data.shape, **self._kw())
        return {
            "data": ArraySpec("I8", "|", data.shape),
            "scale": ArraySpec("F32", "<", reference.scale_shape(data.shape, **self._kw())),
        }

    def encode(self, arrays, specs, gpu):
        if gpu:
            from ..kernels import int8 as kern

            codes, scales = kern.quantize_int8(arrays["data"], dtype_name=specs["data"].dtype, **self._kw())
        else:
            from ..quant import reference

            codes, scales = reference.quantize_int8(arrays["data"], **self._kw())
        return {"data": codes, "scale": scales}

    def decode(self, arrays, specs, gpu, out=None):
        spec = specs["data"]
        target = out["data"] if out is not None else None
        if gpu:
            from ..kernels import int8 as kern

            y = kern.dequantize_int8(arrays["data"], arrays["scale"], dtype_name=spec.dtype, out=target, **self._kw())
            return {"data": y}

        codes = np.asarray(arrays["data"]).reshape(spec.shape)
        scales = np.asarray(arrays["scale"])
        check_scales(scales)
        y = target if target is not None else np.empty(spec.shape, spec.numpy_dtype())
        dequantize_into(y, codes, scales, dtype=spec.numpy_dtype().newbyteorder("="), **self._kw())
        return {"data": y}


BLOCK_ELEMENTS = 1 << 20  # elements dequantized at a time on the CPU: a 4 MiB float32 temporary, in cache


def dequantize_into(y: np.ndarray, codes: np.ndarray, scales: np.ndarray, *, dtype, granularity: str, axis: int,
                    group_size: int) -> None:
    """``y[...] = reference.dequantize_int8(codes, scales, dtype=dtype, ...)``, block by block along the first
    axis.

    The reference makes a float32 copy of the whole array and then one of the output type: 3.5x a bf16 output
    in memory (4.5x with group scales), where a block at a time needs the output, the codes and a few MiB. Every
    element is computed exactly as the reference computes it (the arithmetic is element-wise), and ``y`` of any
    byte order takes the values by assignment."""
    from ..quant import reference

    granularity, axis, group_size = reference.check_params(codes.shape, granularity, axis, group_size)
    kw = {"granularity": granularity, "axis": 0 if axis is None else axis, "group_size": group_size or 128}
    expected = reference.scale_shape(codes.shape, **kw)
    if tuple(scales.shape) != expected:  # checked whole: a block's slice of wrong scales could look right
        raise ValueError(f"scales must be float32 of shape {expected} for codes of shape {codes.shape} and "
                         f"granularity={granularity!r}, got shape {tuple(scales.shape)}")
    if codes.ndim == 0 or codes.size <= BLOCK_ELEMENTS:
        y[...] = reference.dequantize_int8(codes, scales, dtype=dtype, **kw)
        return
    per_row = codes.size // codes.shape[0]
    rows = max(1, BLOCK_ELEMENTS // max(1, per_row))
    flat_groups = granularity == "group" and codes.ndim == 1  # a 1-D array's groups run along its only axis
    if flat_groups:
        rows = max(group_size, rows - rows % group_size)
    for r0 in range(0, codes.shape[0], rows):
        r1 = min(r0 + rows, codes.shape[0])
        s = scales
        if flat_groups:
            s = scales[r0 // group_size : -(-r1 // group_size)]
        elif granularity == "group" or (granularity == "channel" and axis == 0):
            s = scales[r0:r1]
        y[r0:r1] = reference.dequantize_int8(codes[r0:r1], s, dtype=dtype, **kw)


def check_scales(scales) -> None:
    """Refuse host scales that :func:`~cupycodec.quant.reference.quantize_int8` cannot produce (a crafted container:
    a scale of 3e38 would dequantize to inf, a NaN to NaN), whether they are dequantized or handed out as they are."""
    from ..errors import FormatError
    from ..quant import reference

    if not reference.scales_in_range(np.asarray(scales)):
        raise FormatError("segment 'scale' holds values quantize_int8 cannot produce (NaN, Inf, below 2**-126 "
                          f"or above {reference.MAX_SCALE!r}); the container is corrupt or crafted")
