"""Helpers shared by the CPU codec implementations: per-thread compressor caches and bounded decoding."""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable

from ..errors import FormatError

_local = threading.local()


def per_thread(key: tuple, factory: Callable[[], object]) -> object:
    """A per-thread cached object (zstandard's (de)compressors are not thread-safe)."""
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    obj = cache.get(key)
    if obj is None:
        obj = cache[key] = factory()
    return obj


def decode_exact(codec_id: str, fn: Callable[[memoryview, memoryview], int], src: memoryview, dst: memoryview) -> None:
    """Run a ``*_into`` decoder and insist that it filled ``dst`` exactly; library errors become FormatError."""
    import cramjam

    try:
        n = fn(src, dst)
    except (cramjam.DecompressionError, ValueError, OSError) as exc:
        raise FormatError(f"{codec_id} stream does not decode: {exc}") from exc
    if n != len(dst):
        raise FormatError(f"{codec_id} stream decoded to {n} bytes, the chunk table says {len(dst)}")


_CONTENTSIZE_UNKNOWN, _CONTENTSIZE_ERROR = (1 << 64) - 1, (1 << 64) - 2


@functools.cache
def _libzstd():
    """libzstd's C API from blosc2's shared library (it exports ZSTD_*), typed for ctypes, or None without it."""
    from ..backends._planes import blosc2_library

    lib = blosc2_library()
    try:
        fns = (lib.ZSTD_createDCtx, lib.ZSTD_decompressDCtx, lib.ZSTD_getFrameContentSize, lib.ZSTD_isError)
    except AttributeError:  # no library (None), or one built without zstd's symbols
        return None
    create, decompress, content_size, is_error = fns
    create.restype, create.argtypes = ctypes.c_void_p, []
    decompress.restype = ctypes.c_size_t
    decompress.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
    content_size.restype, content_size.argtypes = ctypes.c_ulonglong, [ctypes.c_void_p, ctypes.c_size_t]
    is_error.restype, is_error.argtypes = ctypes.c_uint, [ctypes.c_size_t]
    return lib


def zstd_decode_into(src: memoryview, dst: memoryview) -> bool:
    """Decode the zstd frame ``src`` straight into ``dst`` with libzstd (a per-thread context; the call releases the
    GIL), where python-zstandard returns a new bytes object to copy from. True when it did; False where libzstd's
    API is not available or the frame does not say it holds exactly ``len(dst)`` bytes (the caller's exact path then
    decides, and words the error)."""
    lib = _libzstd()
    if lib is None or not len(src):
        return False
    import numpy as np

    s = np.frombuffer(src, np.uint8).ctypes.data
    if lib.ZSTD_getFrameContentSize(s, len(src)) != len(dst):  # also UNKNOWN and ERROR
        return False
    dctx = per_thread(("libzstd-dctx",), lib.ZSTD_createDCtx)
    n = lib.ZSTD_decompressDCtx(dctx, np.frombuffer(dst, np.uint8).ctypes.data, len(dst), s, len(src))
    return not lib.ZSTD_isError(n) and n == len(dst)
