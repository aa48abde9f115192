"""Helpers shared by the CPU codec implementations: per-thread compressor caches and bounded decoding."""

from __future__ import annotations

import contextlib
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


@functools.cache
def _libzstd():
    """libzstd's C API from blosc2's shared library (it exports ZSTD_*), typed for ctypes, or None without it.

    ``ZSTD_decompressDCtx`` is a plain foreign call (it releases the GIL while it decodes); the header peek
    ``ZSTD_getFrameContentSize`` comes through a ``PyDLL`` handle of the same library, which keeps the GIL: giving
    it up and taking it back around a call of a few nanoseconds cost more than the call whenever another worker
    was waiting for it."""
    from ..backends._planes import blosc2_library

    lib = blosc2_library()
    try:
        fns = (lib.ZSTD_createDCtx, lib.ZSTD_decompressDCtx, lib.ZSTD_freeDCtx)
        content_size = ctypes.PyDLL(lib._name).ZSTD_getFrameContentSize
    except (AttributeError, OSError):  # no library (None), or one built without zstd's symbols
        return None
    create, decompress, free = fns
    create.restype, create.argtypes = ctypes.c_void_p, []
    decompress.restype = ctypes.c_size_t
    decompress.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
    free.restype, free.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    content_size.restype, content_size.argtypes = ctypes.c_ulonglong, [ctypes.c_void_p, ctypes.c_size_t]
    return functools.partial(_DCtx, create, free), decompress, content_size


class _DCtx:
    """One thread's libzstd decompression context, freed when the thread's cache goes (``threading.local`` drops it
    as the thread ends): a bare pointer there lost ~90 KiB per thread that ever decoded zstd, for good."""

    __slots__ = ("_free", "ptr")

    def __init__(self, create, free):
        self.ptr, self._free = create(), free

    def __del__(self):
        with contextlib.suppress(Exception):  # interpreter exit: the library may be gone, and the process with it
            self._free(self.ptr)


def zstd_decode_at(src: int, src_nbytes: int, dst: int, dst_nbytes: int) -> bool:
    """Decode the zstd frame at address ``src`` straight into the ``dst_nbytes`` bytes at ``dst`` with libzstd (a
    per-thread context; one foreign call, without the GIL). True when it did; False where libzstd's API is not
    available, the frame does not say it holds exactly ``dst_nbytes`` bytes, or it does not decode to them (the
    caller's exact path then decides, and words the error). Decoding is bounded by ``dst_nbytes`` whatever the
    frame says; the caller guarantees both ranges are valid memory."""
    fns = _libzstd()
    if fns is None or not src_nbytes:
        return False
    create, decompress, content_size = fns
    if content_size(src, src_nbytes) != dst_nbytes:  # also UNKNOWN and ERROR
        return False
    dctx = per_thread(("libzstd-dctx",), create).ptr
    return decompress(dctx, dst, dst_nbytes, src, src_nbytes) == dst_nbytes  # error codes are never a size here
