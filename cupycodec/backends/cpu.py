"""CPU backend: chunks compressed and decompressed in parallel threads with zstandard, zlib and cramjam.

The libraries release the GIL while they work, so a thread pool spreads chunks over every core; the chunks of a
whole batch of arrays go through the pool in one pass (:func:`run`). Decoders write straight into the output
array (cramjam's ``*_into``), bounded by each chunk's size from the table. Byte planes are split and merged one
block of words at a time in per-thread scratch (:mod:`._planes`), so neither side ever holds whole planes.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import zlib
from concurrent.futures import BrokenExecutor, Future, ThreadPoolExecutor

import numpy as np

from ..errors import BackendError, ChecksumError, FormatError
from ..layout import table_nbytes
from ._planes import planes_for

__all__ = ["CopyChunks", "DecodePlanes", "DecodeSegment", "EncodePlanes", "EncodeSegment", "Work", "address", "crc32",
           "decode_segments", "encode_segment", "executor", "num_threads", "run", "submit"]

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_INLINE_NBYTES = 1 << 20  # below this, threads cost more than they save
_GROUP_MIN_NBYTES = 1 << 20  # the smallest group of steps :func:`run` hands a thread
_GROUP_MAX_NBYTES = 16 << 20  # and the largest
_RELEASE_NBYTES = 1 << 20  # compressed bytes a worker decodes between drops of a mapped file's pages
_memmove = ctypes.memmove  # a foreign call: copies without holding the GIL


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


def submit(fn, *args, pool: ThreadPoolExecutor | None = None) -> Future | None:
    """``pool.submit(fn, *args)`` (default: :func:`executor`), or None where the pool takes no more work: Python
    shuts its thread pools down before it runs ``atexit`` handlers, so work from one ("save on exit") is refused,
    and the caller runs it in its own thread instead. A broken pool is still an error."""
    try:
        return (pool or executor()).submit(fn, *args)
    except BrokenExecutor:  # a RuntimeError too: never a refusal to take work
        raise
    except RuntimeError:  # submit raises nothing else: shut down (the pool, or every pool at exit)
        return None


def reset_after_fork() -> None:
    """Forget the pool in a forked child: its threads were not copied, so jobs queued to it would never run (and
    its lock may have been held by another thread at the fork). The child builds a fresh pool on first use."""
    global _executor, _lock
    _executor = None
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # DataLoader workers and multiprocessing fork by default on Linux
    os.register_at_fork(after_in_child=reset_after_fork)


# -- checksums -----------------------------------------------------------------------------------------------------


@functools.cache
def _crc32_impl():
    # zlib's CRC-32 (the container's), from ISA-L when python-isal is installed: ~13 GB/s a core against zlib's
    # ~2.3 GB/s on the 2-core machine of benchmarks/RESULTS.md, where zlib's took a fifth of a bf16 decode.
    try:
        from isal import isal_zlib
    except ImportError:
        return zlib.crc32
    return isal_zlib.crc32


def crc32(data) -> int:
    """zlib.crc32 of a bytes-like object (ISA-L's implementation when installed: same values, ~6x faster)."""
    return _crc32_impl()(data)


# -- running work in the pool ----------------------------------------------------------------------------------------


class Work:
    """``n`` independent steps (chunks, or blocks of plane chunks) of about ``nbytes / n`` bytes each.

    :func:`run` spreads the steps of every piece of work it is given over the pool in one pass, so a batch of
    small arrays keeps every core busy as one large array does.
    """

    n: int = 0
    nbytes: int = 0

    def run(self, lo: int, hi: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def _segment_nbytes(results) -> int:
    """Payload bytes of one segment's chunk results (its table and its chunks, each padded to 16)."""
    return table_nbytes(len(results)) + sum(-(-len(r[0]) // 16) * 16 for r in results)


def run(works) -> None:
    """Run every step of ``works``: inline when there is little to do, else in shrinking groups (:func:`_groups`)
    that one task per thread takes in turn from a shared list.

    Pulling keeps the threads busy until the last group (a fixed share per future left one thread idle while the
    other finished a group of 1-2 MiB blocks); a group that raises stops there, the others still run, and the first
    error in list order is raised once every thread is done, so no worker still writes into a caller's buffer. An
    exception in the caller's own wait (KeyboardInterrupt) stops the handing out of groups and is raised once the
    groups in flight are done, for the same reason.
    """
    works = [w for w in works if w.n]
    total = sum(w.nbytes for w in works)
    threads = num_threads()
    if total < _INLINE_NBYTES or threads == 1:
        for w in works:
            w.run(0, w.n)
        return
    groups = _groups(works, total, threads)
    if len(groups) < 2:
        for w, lo, hi in groups[0]:
            w.run(lo, hi)
        return
    queue, futures = _Queue(groups), []
    try:
        for _ in range(min(threads, len(groups))):
            future = submit(_drain, queue)
            if future is None:  # the pool takes no more work: the groups left run here
                _drain(queue)
                break
            futures.append(future)
        for f in futures:
            f.result()
    except BaseException:  # KeyboardInterrupt in the caller: the caller's buffers are still being written
        queue.stop()
        raise
    if queue.errors:
        raise min(queue.errors, key=lambda e: e[0])[1]


class _Queue:
    """The groups of one :func:`run`, handed out one at a time, and how many of them are in flight.

    The count, not the futures, tells :meth:`stop` when the workers are done: an interrupt inside ``submit`` loses
    the future of a task that may already be running a group.
    """

    def __init__(self, groups):
        self.todo, self.cond, self.busy, self.errors = iter(enumerate(groups)), threading.Condition(), 0, []

    def take(self):
        """The next ``(index, group)``, or None when none is left."""
        with self.cond:  # one group per taker: the GIL alone would not promise it on a free-threaded Python
            item = next(self.todo, None)
            self.busy += item is not None
            return item

    def done(self) -> None:
        with self.cond:
            self.busy -= 1
            if not self.busy:
                self.cond.notify_all()

    def stop(self) -> None:
        """Hand out no more groups and wait for those in flight, so that an interrupted :func:`run` leaves no worker
        writing into the caller's buffers, nor the pool busy for the next call."""
        with self.cond:
            self.todo = iter(())
            self.cond.wait_for(lambda: not self.busy)


def _drain(queue: _Queue) -> None:
    while (item := queue.take()) is not None:
        i, group = item
        try:
            for w, lo, hi in group:
                w.run(lo, hi)
        except BaseException as exc:  # handed to the caller by run()
            queue.errors.append((i, exc))
        finally:
            queue.done()


def _groups(works, total: int, threads: int) -> list[list]:
    """Cut the steps of ``works`` (in order) into groups that shrink as the work left does: each about a
    ``2 * threads``-th of what is left, within :data:`_GROUP_MIN_NBYTES` and :data:`_GROUP_MAX_NBYTES` (guided
    scheduling). The last groups are single steps, so the threads finish together, and there are few groups in all
    (each costs a task's setup: 64 groups of 1 MiB slowed sorted int32 decoding by 10 %)."""
    groups, cur, acc, left = [], [], 0, total
    target = _group_target(left, threads)
    for w in works:
        per = max(1, w.nbytes // w.n)
        lo = 0
        while lo < w.n:
            hi = min(w.n, lo + max(1, -(-(target - acc) // per)))
            cur.append((w, lo, hi))
            acc += (hi - lo) * per
            lo = hi
            if acc >= target:
                groups.append(cur)
                left -= acc
                cur, acc = [], 0
                target = _group_target(left, threads)
    if cur:
        groups.append(cur)
    return groups


def _group_target(left: int, threads: int) -> int:
    return min(_GROUP_MAX_NBYTES, max(_GROUP_MIN_NBYTES, left // (2 * threads)))


# -- encoding --------------------------------------------------------------------------------------------------------


class EncodeSegment(Work):
    """Compress a segment's bytes chunk by chunk; :meth:`table` gives the result once run."""

    def __init__(self, raw: memoryview, codec, chunk_nbytes: int):
        self.raw, self.codec, self.chunk = raw, codec, chunk_nbytes
        self.nbytes = len(raw)
        self.n = -(-len(raw) // chunk_nbytes) if len(raw) else 0
        self.results: list = [None] * self.n

    def run(self, lo: int, hi: int) -> None:
        raw, c, codec, res = self.raw, self.chunk, self.codec, self.results
        encode = None if codec.codec_id == "raw" else codec.chunk_encoder()
        crc = _crc32_impl()
        for i in range(lo, hi):
            src = raw[i * c : (i + 1) * c]
            data = None if encode is None else encode(src)
            if data is None or len(data) >= len(src):
                res[i] = (src, 1, crc(src))
            else:
                res[i] = (data, 0, crc(data))

    def payload_nbytes(self) -> int:
        """Bytes this segment takes in the payload, once run."""
        return _segment_nbytes(self.results)

    def table(self):
        """``(comp_nbytes, crc32, flags, chunks)``: per-chunk uint32 sizes and CRCs, uint8 flags (1 = stored), and
        the chunk byte strings (memoryview slices of the input for stored chunks)."""
        return _table(self.results)


def _table(results):
    n = len(results)
    comp = np.fromiter((len(r[0]) for r in results), dtype=np.uint32, count=n)
    flags = np.fromiter((r[1] for r in results), dtype=np.uint8, count=n)
    crc = np.fromiter((r[2] for r in results), dtype=np.uint32, count=n)
    return comp, crc, flags, [r[0] for r in results]


class EncodePlanes(Work):
    """Split an array's bytes into format v1's byte planes and compress them, one block of ``chunk_nbytes`` words
    (one chunk of every plane) per step, in per-thread scratch: no whole-plane buffer is ever made."""

    def __init__(self, raw: np.ndarray, k: int, rotate: bool, big: bool, codec, chunk_nbytes: int):
        self.raw, self.k, self.codec, self.chunk = raw, k, codec, chunk_nbytes
        self.planes = planes_for(k, rotate, big)
        self.words = raw.size // k
        self.nbytes = raw.size
        self.n = -(-self.words // chunk_nbytes) if self.words else 0
        self.results: list[list] = [[None] * self.n for _ in range(k)]

    def run(self, lo: int, hi: int) -> None:
        raw, k, c, codec, res = self.raw, self.k, self.chunk, self.codec, self.results
        crc = _crc32_impl()
        split = self.planes.split
        encoders = [codec.chunk_encoder(top_plane=True)] + [codec.chunk_encoder()] * (k - 1)
        for i in range(lo, hi):
            src = raw[i * c * k : min((i + 1) * c, self.words) * k]
            for j, plane in enumerate(split(src)):
                data = encoders[j](plane)
                if data is None or len(data) >= len(plane):
                    data = _owned_copy(plane)  # the scratch is reused by the next block
                    res[j][i] = (data, 1, crc(data))
                else:
                    res[j][i] = (data, 0, crc(data))

    def payload_nbytes(self) -> int:
        """Bytes the plane segments take in the payload, once run."""
        return sum(_segment_nbytes(r) for r in self.results)

    def tables(self) -> list:
        """One :meth:`EncodeSegment.table` tuple per plane, plane 0 first."""
        return [_table(r) for r in self.results]


def _owned_copy(view) -> np.ndarray:
    """A copy of a bytes-like object, made without the GIL (``bytes(view)`` holds it for the whole copy, which kept
    the other worker waiting on every stored 512 KiB plane chunk)."""
    out = np.empty(len(view), np.uint8)
    _memmove(out.ctypes.data, address(view), len(view))
    return out


class CopyChunks(Work):
    """Copy chunks (bytes, or other contiguous bytes-like objects) to their offsets in a buffer at ``base``, one
    chunk per step, without the GIL: the last stage of a compression, once the chunk sizes fix the layout."""

    def __init__(self, base: int, items):
        self.base, self.items = base, items  # [(offset, chunk)]
        self.n, self.nbytes = len(items), sum(len(d) for _, d in items)

    def run(self, lo: int, hi: int) -> None:
        base = self.base
        for off, data in self.items[lo:hi]:
            _memmove(base + off, data if type(data) is bytes else address(data), len(data))


def encode_segment(raw: memoryview, codec, chunk_nbytes: int):
    """Compress one segment's bytes chunk by chunk (:meth:`EncodeSegment.table`)."""
    work = EncodeSegment(raw, codec, chunk_nbytes)
    run([work])
    return work.table()


# -- decoding --------------------------------------------------------------------------------------------------------


def _check(seg, i: int, src, crc) -> None:
    got = crc(src)
    want = int(seg.table.crc32[i])
    if got != want:
        raise ChecksumError(seg.name, want, got, chunk=i)


def address(buf) -> int:
    """The address of a contiguous bytes-like object's first byte (read-only ones too)."""
    return np.frombuffer(buf, np.uint8).ctypes.data


def _bad_stored_size(seg, i: int, s: int, n: int) -> None:
    raise FormatError(f"segment {seg.name!r} chunk {i}: stored chunk holds {s} bytes, expected {n}")


def _decode_view(seg, i: int, src: memoryview, dst: memoryview) -> None:
    """Decode chunk ``i`` of ``seg`` with the codec's memoryview decoder (codecs without an address-level one, and
    frames that one leaves to it)."""
    try:
        seg.codec.decode_chunk_into(src, dst)
    except FormatError as exc:
        raise FormatError(f"segment {seg.name!r} chunk {i}: {exc}") from exc
    except (MemoryError, OSError) as exc:  # pragma: no cover
        raise BackendError(f"segment {seg.name!r} chunk {i}: {exc}") from exc


def _columns(seg, lo: int, hi: int):
    """Chunks ``lo..hi`` of ``seg`` as Python lists (offsets, sizes, flags) and its address-level decoder."""
    return (seg, seg.chunk_offsets[lo:hi].tolist(), seg.table.comp_nbytes[lo:hi].tolist(),
            seg.table.flags[lo:hi].tolist(), seg.codec.decode_chunk_at)


def _drop(release, columns, first: int, last: int) -> None:
    """Drop the mapped file pages of a worker's chunks ``first..last`` (indices into its group's lists), per segment
    read (``columns``: (offsets, sizes)). Workers call it every :data:`_RELEASE_NBYTES` they read and at the end."""
    for offs, sizes in columns:
        release(offs[first], offs[last] + sizes[last])


# Each chunk is decoded (or, when stored, copied) between addresses by a foreign call, so without the GIL: a
# memoryview slice assignment holds it for the whole copy (a stored 512 KiB plane chunk kept the other worker
# waiting). Stored chunk sizes are checked against the output's at parse time; a copy between addresses checks
# again rather than trust it.


class DecodeSegment(Work):
    """Decode a segment's chunks into ``out`` (a writable uint8 memoryview of ``seg.raw_nbytes``); with ``verify``,
    each chunk's CRC is checked right before it is decoded (:class:`~cupycodec.ChecksumError` names the chunk)."""

    def __init__(self, payload, seg, out, verify: bool, release=None):
        if len(out) != seg.raw_nbytes:
            raise ValueError(f"segment {seg.name!r}: output holds {len(out)} bytes, expected {seg.raw_nbytes}")
        self.payload, self.seg, self.out, self.verify, self.release = payload, seg, out, verify, release
        self.n, self.nbytes = seg.n_chunks, seg.raw_nbytes

    def run(self, lo: int, hi: int) -> None:
        payload, out = self.payload, self.out
        seg, offs, sizes, flags, at = _columns(self.seg, lo, hi)
        c, total = seg.chunk_nbytes, self.nbytes
        base, out_base = address(payload), address(out)
        crc = _crc32_impl() if self.verify else None
        release, start, pending = self.release, 0, 0
        for j, (o, s, stored) in enumerate(zip(offs, sizes, flags)):
            i = lo + j
            if crc is not None:
                _check(seg, i, payload[o : o + s], crc)
            a = i * c
            n = min(total, a + c) - a
            if stored:
                if s != n:
                    _bad_stored_size(seg, i, s, n)
                _memmove(out_base + a, base + o, n)
            elif not at(base + o, s, out_base + a, n):
                _decode_view(seg, i, payload[o : o + s], out[a : a + n])
            pending += s
            if release is not None and pending >= _RELEASE_NBYTES:
                _drop(release, ((offs, sizes),), start, j)
                start, pending = j + 1, 0
        if release is not None and start < len(offs):
            _drop(release, ((offs, sizes),), start, len(offs) - 1)


class DecodePlanes(Work):
    """Decode byte-plane segments block by block straight into ``out`` (uint8, the array's bytes): each step
    decodes chunk ``i`` of every plane into per-thread scratch and merges it into its place in ``out``."""

    def __init__(self, payload, segs, out: np.ndarray, k: int, rotate: bool, big: bool, verify: bool, release=None):
        chunk = segs[0].chunk_nbytes
        self.payload, self.segs, self.out, self.k, self.chunk = payload, segs, out, k, chunk
        self.verify, self.release = verify, release
        self.words = out.size // k
        self.planes = planes_for(k, rotate, big)
        self.n, self.nbytes = segs[0].n_chunks, out.size

    def run(self, lo: int, hi: int) -> None:
        payload, k, c, out = self.payload, self.k, self.chunk, self.out
        planes = self.planes
        crc = _crc32_impl() if self.verify else None
        base, out_base = address(payload), out.ctypes.data
        cols = [_columns(s, lo, hi) for s in self.segs]
        release, start, pending = self.release, 0, 0
        for i in range(lo, hi):
            m = min(c, self.words - i * c)
            j = i - lo
            for p, ((seg, offs, sizes, flags, at), dst) in enumerate(zip(cols, planes.slots(m))):
                o, s = offs[j], sizes[j]
                if crc is not None:
                    _check(seg, i, payload[o : o + s], crc)
                if flags[j]:
                    if s != m:
                        _bad_stored_size(seg, i, s, m)
                    _memmove(dst, base + o, m)
                elif not at(base + o, s, dst, m):
                    _decode_view(seg, i, payload[o : o + s], planes.rows(m)[p])
                pending += s
            a = i * c * k
            planes.merge_into(out[a : a + m * k], out_base + a)
            if release is not None and pending >= _RELEASE_NBYTES:
                _drop(release, [col[1:3] for col in cols], start, j)
                start, pending = j + 1, 0
        if release is not None and start < hi - lo:
            _drop(release, [col[1:3] for col in cols], start, hi - lo - 1)


def decode_segments(jobs, verify: bool = False) -> None:
    """Decode ``(payload, segment, out)`` jobs (``out``: a writable uint8 memoryview of ``segment.raw_nbytes``) in
    one parallel pass; with ``verify``, every chunk's CRC is checked before it is decoded."""
    run([DecodeSegment(payload, seg, out, verify) for payload, seg, out in jobs])


def as_bytes(arr) -> memoryview:
    """A flat uint8 memoryview of a C-contiguous NumPy array (any dtype, ml_dtypes included)."""
    a = np.ascontiguousarray(arr)
    return memoryview(a.reshape(-1).view(np.uint8))


def as_bytes_array(arr) -> np.ndarray:
    """A flat uint8 NumPy view of a C-contiguous array (a copy only when it is not contiguous)."""
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8)


def as_bytes_view(arr) -> memoryview:
    """A writable flat uint8 view of a C-contiguous NumPy array (the buffer a segment decodes into)."""
    if not arr.flags.c_contiguous:
        raise ValueError("a decode target must be C-contiguous")
    return memoryview(arr.reshape(-1).view(np.uint8))
