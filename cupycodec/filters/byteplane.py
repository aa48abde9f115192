"""The ``byteplane`` filter: split multi-byte elements into byte planes, exponent first, so codecs see entropy.

A float's exponent carries ~2.6-2.8 bits of entropy in trained weights while its mantissa bytes are nearly random
(../docs/FLOATS.md). Interleaved, a byte codec sees ~8 bits everywhere; split into planes, the exponent plane
compresses ~3x and the mantissa planes are stored as they are (the container stores a chunk raw whenever coding
would not shrink it). With ``rotate=True`` each element is rotated left by one bit first (sign to the bottom), so the
top plane holds exactly the 8 exponent bits of bfloat16 and float32 (ZipNN's bit reordering).

The functions :func:`split_planes` and :func:`merge_planes` are the NumPy reference of the CUDA kernels in
:mod:`cupycodec.kernels.byteplane`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..dtypes import ArraySpec, is_float
from .base import Filter

__all__ = ["Byteplane", "merge_planes", "plane_names", "split_planes", "word_size"]

_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def word_size(spec: ArraySpec) -> int:
    """Bytes per plane-split word: the itemsize, or the component size of complex types."""
    if spec.dtype in ("C64", "C128"):
        return spec.itemsize // 2
    return spec.itemsize


def plane_names(k: int) -> list[str]:
    return [f"data.p{j}" for j in range(k)]


_BLOCK = 1 << 18  # elements per step: temporaries stay in cache


def _words(raw: np.ndarray, k: int, big_endian: bool) -> np.ndarray:
    return raw.view(np.dtype(_UINT[k]).newbyteorder(">" if big_endian else "<"))


def split_planes(raw: np.ndarray, k: int, rotate: bool, big_endian: bool) -> np.ndarray:
    """Reference: ``raw`` (uint8, n*k bytes) -> planes (k, n) uint8, plane 0 = most significant byte.

    Words are read in their stored byte order (``big_endian``), rotated left by one bit when ``rotate``, and plane
    ``j`` holds bits ``8*(k-1-j) .. 8*(k-j)-1`` of each rotated word.
    """
    t = _UINT[k]
    words = _words(raw, k, big_endian)
    n = words.size
    planes = np.empty((k, n), dtype=np.uint8)
    u = np.empty(min(n, _BLOCK), dtype=t)
    tmp = np.empty_like(u)
    for lo in range(0, n, _BLOCK):
        hi = min(n, lo + _BLOCK)
        m = hi - lo
        w, v = u[:m], tmp[:m]
        w[...] = words[lo:hi]
        if rotate:
            np.right_shift(w, t(8 * k - 1), out=v)
            np.left_shift(w, t(1), out=w)
            np.bitwise_or(w, v, out=w)
        for j in range(k):
            np.right_shift(w, t(8 * (k - 1 - j)), out=v)
            planes[j, lo:hi] = v  # keeps the low byte
    return planes


def merge_planes(planes, k: int, rotate: bool, big_endian: bool, out: np.ndarray) -> None:
    """Reference inverse of :func:`split_planes`: planes (k, n) uint8 -> ``out`` (uint8, n*k bytes).

    ``planes`` may also be a sequence of ``k`` uint8 arrays of ``n`` bytes (read block by block, never stacked).
    """
    t = _UINT[k]
    words = _words(out, k, big_endian)
    n = words.size
    u = np.empty(min(n, _BLOCK), dtype=t)
    tmp = np.empty_like(u)
    for lo in range(0, n, _BLOCK):
        hi = min(n, lo + _BLOCK)
        m = hi - lo
        w, v = u[:m], tmp[:m]
        w[...] = planes[0][lo:hi]
        for j in range(1, k):
            np.left_shift(w, t(8), out=w)
            v[...] = planes[j][lo:hi]
            np.bitwise_or(w, v, out=w)
        if rotate:
            np.left_shift(w, t(8 * k - 1), out=v)
            np.right_shift(w, t(1), out=w)
            np.bitwise_or(w, v, out=w)
        words[lo:hi] = w


class Byteplane(Filter):
    """Split the ``data`` array into byte planes ``data.p0`` (most significant) .. ``data.p{k-1}``.

    Parameters
    ----------
    rotate : bool, optional
        Rotate each word left by one bit before splitting (sign to the bottom, exponent to the top byte).
        ``None`` picks ``True`` for floating-point data and ``False`` for integers.
    """

    filter_id = "byteplane"
    version = 1

    def __init__(self, rotate: bool | None = None):
        if rotate is not None and not isinstance(rotate, bool):
            raise ValueError(f"byteplane: rotate must be a bool or None, got {rotate!r}")
        self.rotate = rotate

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"id": self.filter_id, "version": self.version}
        if self.rotate is not None:
            config["rotate"] = self.rotate
        return config

    def resolve(self, inputs):
        if self.rotate is not None:
            return self
        data = inputs.get("data")
        return Byteplane(rotate=bool(data is not None and (is_float(data.dtype) or data.dtype in ("C64", "C128"))))

    def specs(self, inputs):
        data = inputs.get("data")
        if data is None or set(inputs) != {"data"}:
            raise ValueError(f"byteplane applies to a single 'data' array, got segments {sorted(inputs)}")
        k = word_size(data)
        if k not in _UINT:
            raise ValueError(f"byteplane needs 2-, 4- or 8-byte words, got {data.dtype} ({k}-byte words); "
                             "drop the filter for this dtype")
        n = data.nbytes // k
        return {name: ArraySpec("U8", "|", (n,)) for name in plane_names(k)}

    def params(self, spec: ArraySpec) -> tuple[int, bool, bool]:
        """``(word size, rotate, big-endian)`` of this (resolved) filter on an array of ``spec``."""
        return word_size(spec), bool(self.rotate), spec.byteorder == ">"

    def encode(self, arrays, specs, gpu):
        spec = specs["data"]
        k, rotate, big = self.params(spec)
        if gpu:
            from ..kernels import byteplane as kern

            planes = kern.split(arrays["data"].reshape(-1).view("u1"), k, rotate)
        else:
            planes = split_planes(np.ascontiguousarray(arrays["data"]).reshape(-1).view(np.uint8), k, rotate, big)
        return {name: planes[j] for j, name in enumerate(plane_names(k))}

    def decode(self, arrays, specs, gpu, out=None):
        spec = specs["data"]
        k, rotate, big = self.params(spec)
        names = plane_names(k)
        if gpu:
            from ..kernels import byteplane as kern

            target = out["data"] if out is not None else None
            return {"data": kern.merge([arrays[n] for n in names], k, rotate, spec, out=target)}
        if out is not None:
            target = out["data"]
        else:
            target = np.empty(spec.shape, dtype=spec.numpy_dtype())
        merge_planes([np.asarray(arrays[n]).reshape(-1) for n in names], k, rotate, big,
                     target.reshape(-1).view(np.uint8))
        return {"data": target}
