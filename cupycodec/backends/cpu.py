"""CPU backend: chunks compressed and decompressed in parallel threads with zstandard, zlib and cramjam.

The libraries release the GIL while they work, so a thread pool spreads chunks over every core. Decoders write
straight into the output array (cramjam's ``*_into``), bounded by each chunk's size from the table.
"""

from __future__ import annotations

import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import BackendError, FormatError

__all__ = ["decode_segments", "encode_segment", "executor", "num_threads"]

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_INLINE_NBYTES = 1 << 20  # below this, threads cost more than they save


def num_threads() -> int:
    """Worker threads: ``CUPYCODEC_NUM_THREADS`` if set, else the CPUs this process may use."""
    env = os.environ.get("CUPYCODEC_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"CUPYCODEC_NUM_THREADS must be a positive int, got {env!r}") from None
        if n < 1:
            raise ValueError(f"CUPYCODEC_NUM_THREADS must be a positive int, got {env!r}")
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def executor() -> ThreadPoolExecutor:
    """The shared worker pool, created on first use (never at import)."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=num_threads(), thread_name_prefix="cupycodec")
        return _executor


def reset_after_fork() -> None:
    """Forget the pool in a forked child: its threads were not copied, so jobs queued to it would never run (and
    its lock may have been held by another thread at the fork). The child builds a fresh pool on first use."""
    global _executor, _lock
    _executor = None
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # DataLoader workers and multiprocessing fork by default on Linux
    os.register_at_fork(after_in_child=reset_after_fork)


def _run(jobs: list, fn, total_nbytes: int) -> list:
    if total_nbytes < _INLINE_NBYTES or len(jobs) < 2:
        return [fn(j) for j in jobs]
    return list(executor().map(fn, jobs))


def _batches(n: int, total_nbytes: int) -> list[tuple[int, int]]:
    """Split ``n`` chunks into contiguous ranges, a few per worker (to balance uneven chunks)."""
    if n == 0:
        return []
    parts = 1 if total_nbytes < _INLINE_NBYTES else min(n, 4 * num_threads())
    step = -(-n // parts)
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def encode_segment(raw: memoryview, codec, chunk_nbytes: int):
    """Compress a segment's bytes chunk by chunk.

    Returns ``(comp_nbytes, crc32, flags, chunks)``: per-chunk uint32 sizes and CRCs, uint8 flags (1 = stored), and
    the list of chunk byte strings (memoryview slices of ``raw`` for stored chunks).
    """
    n = -(-len(raw) // chunk_nbytes) if len(raw) else 0
    store_all = codec.codec_id == "raw"

    def work(span):
        lo, hi = span
        out = []
        for i in range(lo, hi):
            src = raw[i * chunk_nbytes : (i + 1) * chunk_nbytes]
            data = None if store_all else codec.encode_chunk(src)
            if data is None or len(data) >= len(src):
                out.append((src, 1, zlib.crc32(src)))
            else:
                out.append((data, 0, zlib.crc32(data)))
        return out

    results = [r for part in _run(_batches(n, len(raw)), work, len(raw)) for r in part]
    comp = np.fromiter((len(r[0]) for r in results), dtype=np.uint32, count=n)
    flags = np.fromiter((r[1] for r in results), dtype=np.uint8, count=n)
    crc = np.fromiter((r[2] for r in results), dtype=np.uint32, count=n)
    return comp, crc, flags, [r[0] for r in results]


def decode_segments(jobs) -> None:
    """Decode ``(payload, segment, out)`` jobs: ``out`` is a writable uint8 memoryview of ``segment.raw_nbytes``.

    Every job's chunks go through one parallel pass. Chunk CRCs were verified when the container was parsed.
    """
    work_items = []
    total = 0
    for payload, seg, out in jobs:
        if len(out) != seg.raw_nbytes:
            raise ValueError(f"segment {seg.name!r}: output holds {len(out)} bytes, expected {seg.raw_nbytes}")
        total += seg.raw_nbytes
        for lo, hi in _batches(seg.n_chunks, seg.raw_nbytes):
            work_items.append((payload, seg, out, lo, hi))

    def work(item):
        payload, seg, out, lo, hi = item
        offs = seg.chunk_offsets
        sizes = seg.table.comp_nbytes
        flags = seg.table.flags
        c = seg.chunk_nbytes
        raw_total = seg.raw_nbytes
        for i in range(lo, hi):
            o, s = int(offs[i]), int(sizes[i])
            src = payload[o : o + s]
            dst = out[i * c : min((i + 1) * c, raw_total)]
            if flags[i]:
                dst[:] = src
                continue
            try:
                seg.codec.decode_chunk_into(src, dst)
            except FormatError as exc:
                raise FormatError(f"segment {seg.name!r} chunk {i}: {exc}") from exc
            except (MemoryError, OSError) as exc:  # pragma: no cover
                raise BackendError(f"segment {seg.name!r} chunk {i}: {exc}") from exc

    _run(work_items, work, total)


def as_bytes(arr) -> memoryview:
    """A flat uint8 memoryview of a C-contiguous NumPy array (any dtype, ml_dtypes included)."""
    a = np.ascontiguousarray(arr)
    return memoryview(a.reshape(-1).view(np.uint8))


def as_bytes_view(arr) -> memoryview:
    """A writable flat uint8 view of a C-contiguous NumPy array (the buffer a segment decodes into)."""
    if not arr.flags.c_contiguous:
        raise ValueError("a decode target must be C-contiguous")
    return memoryview(arr.reshape(-1).view(np.uint8))
