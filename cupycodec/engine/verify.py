"""Chunk CRC32s of containers whose payloads are on a GPU, checked there: one launch of kernels.crc32 over every
chunk of every container, one download of the CRCs, compared on the host.

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

__all__ = ["verify_on_device"]

_U64 = np.uint64


def verify_on_device(items, device: int, stream: int | None = None) -> None:
    """Check every chunk CRC32 of ``items`` (containers with payloads on CUDA device ``device``) on that device, on
    ``stream`` (a raw handle; default CuPy's current stream there), and wait for the result. Raises
    :class:`~cupycodec.ChecksumError` naming the segment and chunk of the first mismatch, in ``items`` order; marks
    every container verified when all match."""
    import cupy

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
        ptrs_h, sizes_h, want_h = np.concatenate(ptrs), np.concatenate(sizes), np.concatenate(want).astype(np.uint32)
        n = len(ptrs_h)
        sp = stream_ptr(stream, device)
        eng = engine(device)
        with launching_on(device, sp):
            shape = crc32.shape_for(int(sizes_h.max()), int(sizes_h.sum()))
            words = crc32.work_words(n, shape[0])
            buf = cupy.zeros(2 * n + (n + 1) // 2 + (words + 1) // 2, dtype=_U64)  # ptrs, sizes, CRCs, work
            eng.upload(buf.data.ptr, np.concatenate([ptrs_h, sizes_h]), sp)
            out = buf[2 * n :].view(np.uint32)[:n]
            work = buf[2 * n + (n + 1) // 2 :].view(np.uint32) if words else None
            crc32.crc32_batch(buf[:n], buf[n : 2 * n], out, n, shape, work, stream=sp)
            got = eng.download(out.data.ptr, 4 * n, sp).view(np.uint32)
            bad = np.flatnonzero(got != want_h)
        if bad.size:
            row = int(bad[0])
            name, first = [w for w in where if w[1] <= row][-1]
            raise ChecksumError(name, int(want_h[row]), int(got[row]), chunk=row - first)
    for c in items:
        c._cache.pop("unverified", None)
