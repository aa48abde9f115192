"""Helpers shared by the CPU codec implementations: per-thread compressor caches and bounded decoding."""

from __future__ import annotations

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
