"""The batched CRC-32 kernel against zlib, bit for bit: every length class, alignment, batch shape."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cupycodec.kernels import crc32 as k

pytestmark = pytest.mark.gpu


def _run(chunks: list[bytes], offsets=None):
    import cupy

    offsets = offsets or [0] * len(chunks)
    layout, pos = [], 0
    for c, o in zip(chunks, offsets):
        pos = (pos + 255) // 256 * 256 + o
        layout.append(pos)
        pos += len(c)
    host = np.zeros(max(pos, 1), np.uint8)
    for c, p in zip(chunks, layout):
        host[p : p + len(c)] = np.frombuffer(c, np.uint8)
    dev = cupy.asarray(host)
    ptrs = cupy.asarray(np.array(layout, np.uint64) + np.uint64(dev.data.ptr))
    sizes = cupy.asarray(np.array([len(c) for c in chunks], np.uint64))
    out = cupy.empty(len(chunks), np.uint32)
    shape = k.shape_for(max(len(c) for c in chunks), sum(len(c) for c in chunks))
    k.crc32_batch(ptrs, sizes, out, len(chunks), shape)
    got = out.get().tolist()
    # a second launch on the same work buffer must agree (the kernel re-zeroes its counters)
    return got, shape


@pytest.mark.parametrize("n", [0, 1, 3, 4, 15, 16, 17, 63, 64, 65, 8191, 8192, 8193, 65535, 65536, 65537,
                               (1 << 20) - 5, 1 << 20, 3 << 20, (16 << 20) + 7])
@pytest.mark.parametrize("offset", [0, 3])
def test_single_chunk(n, offset):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    got, _ = _run([data], [offset])
    assert got == [zlib.crc32(data)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 300_000), min_size=1, max_size=40), st.integers(0, 2**32 - 1),
       st.booleans())
def test_batches_match_zlib(lengths, seed, misalign):
    rng = np.random.default_rng(seed)
    chunks = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in lengths]
    offsets = [int(rng.integers(0, 16)) if misalign else 0 for _ in lengths]
    got, _ = _run(chunks, offsets)
    assert got == [zlib.crc32(c) for c in chunks]


def test_many_parts_and_reuse_of_work():
    import cupy

    rng = np.random.default_rng(5)
    chunks = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (5 << 20, 1, 0, 77777, 2 << 20)]
    devs = [cupy.asarray(np.frombuffer(c, np.uint8)) if c else cupy.empty(0, np.uint8) for c in chunks]
    ptrs = cupy.asarray(np.array([d.data.ptr if d.size else 0 for d in devs], np.uint64))
    sizes = cupy.asarray(np.array([len(c) for c in chunks], np.uint64))
    shape = k.shape_for(5 << 20, sum(map(len, chunks)))
    assert shape[0] > 32  # exercises the lane folding (r > 1)
    work = cupy.zeros(k.work_words(len(chunks), shape[0]), np.uint32)
    want = [zlib.crc32(c) for c in chunks]
    for _ in range(3):
        out = cupy.full(len(chunks), 0xDEADBEEF, np.uint32)
        k.crc32_batch(ptrs, sizes, out, len(chunks), shape, work=work)
        assert out.get().tolist() == want
    assert int(work[: len(chunks)].sum()) == 0


def test_large_batch_throughput_shape():
    import cupy

    data = cupy.random.RandomState(0).randint(0, 256, 64 << 20, dtype=cupy.uint8)
    chunk = 1 << 16
    n = data.size // chunk
    ptrs = cupy.asarray(np.uint64(data.data.ptr) + np.arange(n, dtype=np.uint64) * np.uint64(chunk))
    sizes = cupy.full(n, chunk, dtype=cupy.uint64)
    out = cupy.empty(n, np.uint32)
    k.crc32_batch(ptrs, sizes, out, n, k.shape_for(chunk, data.size))
    host = data.get()
    got = out.get()
    for i in (0, 1, n // 2, n - 1):
        assert int(got[i]) == zlib.crc32(host[i * chunk : (i + 1) * chunk].tobytes())


def _copy_run(lengths, src_offsets, dst_misalign, seed, shape_max=None, tables=None):
    """The packing mode: copy + zero-pad + CRC in one launch, plus the chunk-table copies that skip the CRC slots.

    ``tables`` splits the chunks into consecutive groups (default: one), each with its own table placed ahead of
    its chunks in the destination, as a container lays out its segments."""
    import cupy

    rng = np.random.default_rng(seed)
    n = len(lengths)
    tables = tables or [n]
    assert sum(tables) == n and all(t > 0 for t in tables)
    chunks = [rng.integers(0, 256, L, dtype=np.uint8) for L in lengths]
    src_pos, pos = [], 0
    for L, o in zip(lengths, src_offsets):
        pos = (pos + 255) // 256 * 256 + o
        src_pos.append(pos)
        pos += L
    src_host = np.zeros(max(pos, 1), np.uint8)
    for c, p in zip(chunks, src_pos):
        src_host[p : p + len(c)] = c
    dst_pos, slot_pos, tab_pos, tab_bytes, pos, i = [], [], [], [], 0, 0
    for kk in tables:  # a table of kk chunks, then its chunks
        tn = (9 * kk + 15) // 16 * 16
        tab_pos.append(pos)
        tab_bytes.append(rng.integers(0, 256, tn, dtype=np.uint8))
        slot_pos.extend(pos + 4 * kk + 4 * j for j in range(kk))
        pos += tn
        for L in lengths[i : i + kk]:
            pos = (pos + 15) // 16 * 16 + dst_misalign
            dst_pos.append(pos)
            pos += (L + 15) // 16 * 16 + 16  # a 16-byte gap after each padded chunk must stay untouched
        pos = (pos + 15) // 16 * 16
        i += kk
    src = cupy.asarray(src_host)
    dst = cupy.full(pos + 16, 0xAB, dtype=cupy.uint8)
    d_tables = [cupy.asarray(t) for t in tab_bytes]
    sp, dp = np.uint64(src.data.ptr), np.uint64(dst.data.ptr)
    rows = np.concatenate([np.array(dst_pos, np.uint64) + dp, np.array(lengths, np.uint64),
                           np.array(src_pos, np.uint64) + sp, np.array(slot_pos, np.uint64) + dp])
    descs = np.array([[t.data.ptr, int(dp) + tp, t.size // 4, kk] for t, tp, kk in zip(d_tables, tab_pos, tables)],
                     np.uint64).reshape(-1)
    shape = k.shape_for(shape_max or max(max(lengths), 1), max(sum(lengths), 1))
    words = k.work_words(n, shape[0])
    d_rows = cupy.asarray(np.concatenate([rows, descs, np.zeros((words + 1) // 2, np.uint64)]))  # + zeroed work
    r = d_rows.data.ptr
    w = r + 32 * n + 8 * descs.size
    args = k.packed_args(n, shape, ptrs=r, sizes=r + 8 * n, out_addrs=r + 24 * n, work=w if words else 0,
                         src=r + 16 * n, tabs=r + 32 * n, n_tabs=len(tables))
    d_args = cupy.asarray(np.array(args, np.uint64))  # the launch reads its arguments from device memory
    k.crc32_batch_packed(d_args.data.ptr, n * shape[0])
    got = dst.get()
    crcs = [int(got[q : q + 4].view(np.uint32)[0]) for q in slot_pos]
    assert crcs == [zlib.crc32(c.tobytes()) for c in chunks]
    for t, tp, kk in zip(tab_bytes, tab_pos, tables):
        keep = np.r_[0 : 4 * kk, 8 * kk : t.size]
        assert (got[tp : tp + t.size][keep] == t[keep]).all()  # each table, its CRC slots excepted
    for c, p in zip(chunks, dst_pos):
        L, L16 = len(c), (len(c) + 15) // 16 * 16
        assert (got[p : p + L] == c).all()
        assert (got[p + L : p + L16] == 0).all() and (got[p + L16 : p + L16 + 16] == 0xAB).all()


@pytest.mark.parametrize("tables", [[1, 2, 1], [5, 1, 2, 1, 3]])
def test_packing_mode_copies_several_tables(tables):
    lengths = [(97 * i * i + 13) % 70_001 for i in range(sum(tables))]
    _copy_run(lengths, [3 * (i % 2) for i in range(len(lengths))], 0, seed=7, tables=tables)


@pytest.mark.parametrize("lengths", [[0], [1], [15, 16, 17], [63, 64, 65, 127, 128, 129], [8191, 8192, 8193],
                                     [65536] * 16, [70_001, 3, 0, 65_535], [1 << 20, 5, (1 << 20) + 9]])
@pytest.mark.parametrize("misalign", [(0, 0), (5, 0), (0, 4), (13, 12)])
def test_packing_mode_copies_pads_and_checksums(lengths, misalign):
    src_off, dst_off = misalign
    _copy_run(lengths, [src_off * (i % 2) for i in range(len(lengths))], dst_off, seed=len(lengths))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 200_000), min_size=1, max_size=30), st.integers(0, 2**32 - 1), st.booleans())
def test_packing_mode_matches_zlib_with_oversized_shape(lengths, seed, misalign):
    # encode plans size the launch for the raw chunks, which bound the packed ones: extra parts must be harmless
    rng = np.random.default_rng(seed)
    offs = [int(rng.integers(0, 16)) if misalign else 0 for _ in lengths]
    _copy_run(lengths, offs, 0, seed, shape_max=4 * max(max(lengths), 1))


@pytest.mark.nvcomp
def test_concurrent_first_compressions_in_threads_all_verify():
    # The first GPU compressions of a process may come from many threads at once (Zarr's encodes run in worker
    # threads): each container's chunk CRCs must still match its bytes, with small allocations in between that
    # would take over a constants table freed under a launch.
    import threading

    import cupy as cp

    import cupycodec as cc

    k._FUNCTIONS.clear()  # a fresh process's first use, as far as this module knows
    for cached in (getattr(k, "packed_launcher", None),):
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
    xs = [cp.asarray((np.sin(np.arange(1 << 14) / 301.0 + i) * 40).astype(np.float32)) for i in range(12)]
    start, errors = threading.Barrier(len(xs)), []

    def work(i):
        start.wait()
        for _ in range(5):
            blob = cc.compress_many([xs[i]], codec="ans")[0].to_bytes()
            junk = cp.full(2176, 0xA5A5A5A5, cp.uint32)  # 8704 bytes: the size of the constants table
            try:
                cc.CompressedArray.from_bytes(blob).verify()
            except cc.ChecksumError as exc:
                errors.append(exc)
            del junk

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
