"""Byte planes on the CPU, one block of words at a time: split (encode) and merge (decode) in cache-sized scratch.

The container's plane ``j`` of chunk ``i`` covers words ``[i*C, (i+1)*C)`` of the array (``C = chunk_nbytes``), so
a worker can split one block of ``C`` words into its ``k`` plane chunks, or merge ``k`` decoded plane chunks back
into the output, without any whole-array plane buffer. The byte transpose itself is c-blosc2's public, SIMD
``blosc2_shuffle``/``blosc2_unshuffle`` (``blosc2.h``), loaded with ctypes from the ``blosc2`` wheel's shared
library without importing the ``blosc2`` Python package; where that library is missing the NumPy reference
(:func:`cupycodec.filters.byteplane.split_planes`/``merge_planes``) does the same work on the block. Both produce
exactly format v1's planes; tests pin them to the reference.

blosc2's shuffle writes byte ``b`` (memory order) of every word to row ``b`` of the block, so plane ``j`` (bits
``8*(k-1-j)..``, most significant first) is row ``k-1-j`` for little-endian words and row ``j`` for big-endian
ones. The optional one-bit rotation (``rotate=True``) runs in NumPy on the block, which is in cache (~10 GB/s).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import importlib.util
import os
import sys
import threading

import numpy as np

from ..filters.byteplane import merge_planes, split_planes

__all__ = ["BlockPlanes", "blosc2_library", "planes_for"]

_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_NATIVE_BIG = sys.byteorder == "big"
_PIECE = 131072  # words rotated at a time: few NumPy calls, still within L2


@functools.cache
def blosc2_library():
    """c-blosc2's shared library from the installed ``blosc2`` wheel (ctypes), or None when it is not there."""
    try:
        spec = importlib.util.find_spec("blosc2")
    except (ImportError, ValueError):  # a broken or half-installed package: the NumPy path still works
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    names = ("libblosc2.so*", "libblosc2*.dylib", "libblosc2*.dll", "blosc2.dll")
    for root in spec.submodule_search_locations:
        for sub in ("lib", "lib64", "."):
            for name in names:
                for path in sorted(glob.glob(os.path.join(root, sub, name))):
                    lib = _load(path)
                    if lib is not None:
                        return lib
    return None


def _load(path: str):
    try:
        lib = ctypes.CDLL(path)  # CDLL calls release the GIL, so workers shuffle in parallel
        fns = (lib.blosc2_shuffle, lib.blosc2_unshuffle)
    except (OSError, AttributeError):
        return None
    for fn in fns:
        fn.argtypes = [ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p]
        fn.restype = ctypes.c_int32
    # The first call picks the SIMD implementation (a static set once): make it here, not racing in two threads.
    src, dst = np.arange(16, dtype=np.uint8), np.empty(16, np.uint8)
    if lib.blosc2_shuffle(2, 16, src.ctypes.data, dst.ctypes.data) != 16 or \
            not np.array_equal(dst, np.r_[src[0::2], src[1::2]]):
        return None
    return lib


class BlockPlanes:
    """Split and merge blocks of ``k``-byte words (rotated left one bit when ``rotate``; stored big-endian when
    ``big``) into the ``k`` byte planes of format v1, through per-thread scratch.

    ``split(src)`` returns the ``k`` plane chunks (memoryviews into scratch, plane 0 first, valid until the next
    call in this thread); ``merge_into(out)`` merges what was written into ``rows(m)`` (the ``k`` plane slots for
    a block of ``m`` words) into ``out``. Instances are shared by threads; the scratch is per thread (one buffer,
grown to the largest block it has seen).
    """

    def __init__(self, k: int, rotate: bool, big: bool, lib=None):
        if k not in _UINT:
            raise ValueError(f"byte planes need 2-, 4- or 8-byte words, got {k}")
        self.k, self.rotate, self.big, self.lib = k, rotate, big, lib
        # With rotate, words are rotated in native order (a copy converts them when they are stored otherwise), and
        # blosc2 then sees native-order words; without, it sees the stored bytes as they are.
        self._convert = rotate and big != _NATIVE_BIG
        order_big = _NATIVE_BIG if rotate else big
        self._row = [j if order_big else k - 1 - j for j in range(k)] if lib is not None else list(range(k))
        t = _UINT[k]
        self._word = np.dtype(t)
        self._stored = np.dtype(t).newbyteorder(">" if big else "<")
        self._one, self._top = t(1), t(8 * k - 1)

    def _scratch(self, m: int, words: bool = False):
        """(plane rows of ``k*m`` bytes, a small word temporary, ``m`` words for the rotated block or None, the rows'
        address). Only splitting with rotation needs the block of words; a decoding thread holds the rows and the
        temporary alone (on 16 threads the words were 2 MiB each of float32 decodes' memory, for nothing)."""
        n = self.k * m
        t = min(m, _PIECE) * self.k
        s, addr = _thread_buffer(n + t + (n if words else 0))
        return s[:n], s[n : n + t].view(self._word), s[n + t : 2 * n + t].view(self._word) if words else None, addr

    def rows(self, m: int) -> list[memoryview]:
        """The slots plane chunks ``0..k-1`` of an ``m``-word block are decoded into (this thread's scratch)."""
        mv = memoryview(self._scratch(m)[0])
        return [mv[r * m : (r + 1) * m] for r in self._row]

    def slots(self, m: int) -> list[int]:
        """The addresses of :meth:`rows`, for decoders and copies that run without the GIL."""
        addr = self._scratch(m)[3]
        return [addr + r * m for r in self._row]

    def split(self, src: np.ndarray) -> list[memoryview]:
        """Plane chunks of ``src`` (uint8, ``m*k`` bytes), plane 0 first."""
        k = self.k
        m = src.size // k
        buf, tmp, w, addr = self._scratch(m, words=self.rotate)
        if self.lib is None:
            out = buf.reshape(k, m)
            out[...] = split_planes(src, k, self.rotate, self.big)
            return [memoryview(out[j]) for j in range(k)]
        data = src
        if self.rotate:
            words = src.view(self._stored)
            for lo in range(0, m, _PIECE):  # pieces that stay in L1/L2 between the three passes
                hi = min(m, lo + _PIECE)
                v, t = w[lo:hi], tmp[: hi - lo]
                if self._convert:
                    np.copyto(v, words[lo:hi])  # byte-swapping copy into native order
                    np.right_shift(v, self._top, out=t)
                    np.left_shift(v, self._one, out=v)
                else:
                    np.right_shift(words[lo:hi], self._top, out=t)
                    np.left_shift(words[lo:hi], self._one, out=v)
                np.bitwise_or(v, t, out=v)
            data = w
        self.lib.blosc2_shuffle(k, k * m, data.ctypes.data, addr)
        mv = memoryview(buf)
        return [mv[r * m : (r + 1) * m] for r in self._row]

    def merge_into(self, out: np.ndarray, out_addr: int | None = None) -> None:
        """Merge this thread's ``rows(m)`` into ``out`` (uint8, ``m*k`` bytes; ``out_addr``: its address, when the
        caller knows it)."""
        k = self.k
        m = out.size // k
        buf, tmp, _, addr = self._scratch(m)
        if self.lib is None:
            merge_planes(buf.reshape(k, m), k, self.rotate, self.big, out)
            return
        self.lib.blosc2_unshuffle(k, k * m, addr, out.ctypes.data if out_addr is None else out_addr)
        if not self.rotate:
            return
        words = out.view(self._word)  # native order here; swapped back below when stored otherwise
        for lo in range(0, m, _PIECE):
            v, t = words[lo : lo + _PIECE], tmp[: min(m - lo, _PIECE)]
            np.left_shift(v, self._top, out=t)
            np.right_shift(v, self._one, out=v)
            np.bitwise_or(v, t, out=v)
            if self._convert:
                v.byteswap(inplace=True)


_local = threading.local()


def _thread_buffer(nbytes: int) -> tuple[np.ndarray, int]:
    """This thread's scratch and its address, grown to ``nbytes`` when needed (one buffer per thread, whatever the
    geometry)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = _local.buf = np.empty(nbytes, np.uint8)
        _local.addr = buf.ctypes.data
    return buf, _local.addr


def planes_for(k: int, rotate: bool, big: bool, engine: str = "auto") -> BlockPlanes:
    """A :class:`BlockPlanes` with the fastest engine here (``engine="numpy"`` forces the reference)."""
    lib = blosc2_library() if engine != "numpy" else None
    if engine == "blosc2" and lib is None:
        raise RuntimeError("blosc2's shared library is not available (pip install blosc2)")
    return _cached(k, rotate, big, lib)


@functools.lru_cache(maxsize=32)
def _cached(k, rotate, big, lib):
    return BlockPlanes(k, rotate, big, lib)
