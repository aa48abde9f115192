"""CRC32s of device byte ranges, checked on their GPU: chunk CRCs of containers whose payloads are there
(:func:`verify_on_device`), and any ranges a caller names (:func:`device_crc32`: the torch checkpoint loader checks the
tensors it placed on a GPU with it). One launch of kernels.crc32 per size class of range, one download of the CRCs.

``from_bytes(verify=True)`` defers the check of each chunk's CRC until the chunk is used. Bytes bound for a GPU decode
used to be checked on the host first, one container at a time (ISA-L's CRC at 11-14 GB/s a core where installed,
zlib's at about 2 GB/s otherwise), and a device payload was even copied back to the host for it; the kernel reads
at over 1 TB/s, after the upload the decode needs anyway.
"""

from __future__ import annotations

import numpy as np

from ..errors import ChecksumError
from ..kernels import crc32
from . import engine, launching_on, stream_ptr

__all__ = ["device_crc32", "verify_on_device"]

_U64 = np.uint64
_SMALL_NBYTES = 1 << 20  # ranges up to this and larger ones go to separate launches (a launch splits every range
# into as many parts as its largest needs, so a 64 KiB chunk beside a 45 MB tensor would get idle blocks)


def device_crc32(ptrs, sizes, device: int, stream: int | None = None) -> np.ndarray:
    """zlib's CRC32 of each device byte range ``[ptrs[i], ptrs[i] + sizes[i])`` on CUDA device ``device``, on
    ``stream`` (a raw handle; default CuPy's current stream there), as a host uint32 array; waits for them. The
    caller keeps the ranges' memory alive and vouches for their bounds."""
    import cupy

    ptrs, sizes = np.asarray(ptrs, dtype=_U64).reshape(-1), np.asarray(sizes, dtype=_U64).reshape(-1)
    n = len(ptrs)
    if n == 0:
        return np.zeros(0, np.uint32)
    order = np.argsort(sizes > _SMALL_NBYTES, kind="stable")  # small ranges first, then large ones
    classes = np.searchsorted(sizes[order] > _SMALL_NBYTES, True)
    groups = [(lo, hi) for lo, hi in ((0, int(classes)), (int(classes), n)) if hi > lo]
    p, s = ptrs[order], sizes[order]
    sp = stream_ptr(stream, device)
    eng = engine(device)
    with launching_on(device, sp):
        shapes = [crc32.shape_for(int(s[lo:hi].max()), int(s[lo:hi].sum())) for lo, hi in groups]
        works = [crc32.work_words(hi - lo, shape[0]) for (lo, hi), shape in zip(groups, shapes)]
        # one buffer: ptrs, sizes (u64), the CRCs (u32), then each launch's scratch (zeroed counters first)
        buf = cupy.zeros(2 * n + (n + 1) // 2 + sum((w + 1) // 2 for w in works), dtype=_U64)
        eng.upload(buf.data.ptr, np.concatenate([p, s]), sp)
        out = buf[2 * n : 2 * n + (n + 1) // 2].view(np.uint32)[:n]
        at = 2 * n + (n + 1) // 2
        for (lo, hi), shape, words in zip(groups, shapes, works):
            work = buf[at : at + (words + 1) // 2].view(np.uint32) if words else None
            at += (words + 1) // 2
            crc32.crc32_batch(buf[lo:hi], buf[n + lo : n + hi], out[lo:hi], hi - lo, shape, work, stream=sp)
        got = eng.download(out.data.ptr, 4 * n, sp).view(np.uint32)
    result = np.empty(n, np.uint32)
    result[order] = got
    return result


def verify_on_device(items, device: int, stream: int | None = None) -> None:
    """Check every chunk CRC32 of ``items`` (containers with payloads on CUDA device ``device``) on that device, on
    ``stream`` (a raw handle; default CuPy's current stream there), and wait for the result. Raises
    :class:`~cupycodec.ChecksumError` naming the segment and chunk of the first mismatch, in ``items`` order; marks
    every container verified when all match."""
    ptrs, sizes, want, where = [], [], [], []  # where: (segment name, its first row) per segment
    rows = 0
    for c in items:
        base = _U64(c._payload.data.ptr)
        for seg in c.segments:
            if seg.n_chunks:
                where.append((seg.name, rows))
                rows += seg.n_chunks
                ptrs.append(seg.chunk_offsets.astype(_U64) + base)
                sizes.append(seg.table.comp_nbytes.astype(_U64))
                want.append(seg.table.crc32)
    if ptrs:
        want_h = np.concatenate(want).astype(np.uint32)
        got = device_crc32(np.concatenate(ptrs), np.concatenate(sizes), device, stream)
        bad = np.flatnonzero(got != want_h)
        if bad.size:
            row = int(bad[0])
            name, first = [w for w in where if w[1] <= row][-1]
            raise ChecksumError(name, int(want_h[row]), int(got[row]), chunk=row - first)
    for c in items:
        c._cache.pop("unverified", None)
