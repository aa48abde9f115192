"""The nvCOMP backend on a real GPU: round trips, CPU<->GPU interchange, batching, plans, CRCs, big arrays."""

from __future__ import annotations

import zlib

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import cupycodec as cc

pytestmark = [pytest.mark.gpu, pytest.mark.nvcomp]

ALL = ["raw", "lz4", "snappy", "gdeflate", "deflate", "zstd", "gzip", "cascaded", "bitcomp", "ans"]
CPU_READABLE = ["raw", "lz4", "snappy", "deflate", "zstd", "gzip", "gdeflate", "bitcomp"]  # last two: host libs


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


def weights(n, seed=0, dtype=ml_dtypes.bfloat16):
    rng = np.random.default_rng(seed)
    return (0.02 * rng.standard_t(5, n)).astype(np.float32).astype(dtype)


def _same(a, b) -> bool:
    import cupy

    a = cupy.asnumpy(a) if not isinstance(a, np.ndarray) else a
    b = cupy.asnumpy(b) if not isinstance(b, np.ndarray) else b
    return a.shape == b.shape and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


@pytest.mark.parametrize("codec", ALL)
@pytest.mark.parametrize("dtype", ["uint8", "int16", "float16", "float32", "int64", "complex64", "bool"])
def test_roundtrip_on_gpu(cp, codec, dtype):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((257, 129)) * 50).astype(dtype)
    x[::7] = 0
    g = cp.asarray(x)
    c = cc.compress(g, codec=codec, chunk_nbytes=4096)
    assert c.on_device and c.producer["backend"] == "nvcomp"
    y = cc.decompress(c)
    assert isinstance(y, cp.ndarray) and y.dtype == g.dtype and y.shape == g.shape
    assert _same(y, x)
    # the container is valid bytes: header, tables and every GPU-computed CRC check out on the CPU
    again = cc.CompressedArray.from_bytes(c.to_bytes(), verify=True, trusted=True)
    assert _same(cc.decompress(again, device="cuda"), x)
    untrusted = cc.CompressedArray.from_bytes(c.to_bytes())
    if codec in ("cascaded", "bitcomp", "ans", "gdeflate") and any(s.table.n_encoded for s in c.segments):
        with pytest.raises(cc.UntrustedError, match=codec):
            cc.decompress(untrusted, device="cuda")
    else:  # hardened CPU decoders, then uploaded
        y = cc.decompress(untrusted, device="cuda")
        assert isinstance(y, cp.ndarray) and _same(y, x)


@pytest.mark.parametrize("codec", ALL)
@pytest.mark.parametrize("shape", [(0,), (3, 0), (), (1,), (17,), (65537,)])
def test_edge_shapes_on_gpu(cp, codec, shape):
    x = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    c = cc.compress(cp.asarray(x), codec=codec)
    assert _same(cc.decompress(c), x)


def test_noncontiguous_and_negative_strides(cp):
    x = cp.arange(10000, dtype=cp.float64).reshape(100, 100)
    for view in (x[:, ::3], x[::-1], x.T, x[10:20, 5:]):
        c = cc.compress(view, codec="zstd")
        assert _same(cc.decompress(c), cp.asnumpy(view))


@pytest.mark.parametrize("codec", CPU_READABLE)
def test_gpu_written_decodes_on_cpu(cp, codec):
    x = weights(300_000, seed=2)
    c = cc.compress(cp.asarray(x.view(np.uint16)), dtype="bfloat16", codec=codec, chunk_nbytes=65536)
    assert c.dtype_name == "BF16"
    y = cc.decompress(c.to_bytes(), backend="cpu", trusted=True)  # gdeflate/bitcomp's host decoders need trust
    assert y.dtype == ml_dtypes.bfloat16 and _same(y, x)
    # and each encoded chunk is a standard stream of its format
    if codec in ("zstd", "deflate", "gzip"):
        seg = c.segments[0]
        payload = c.host_payload()
        i = int(np.flatnonzero(seg.table.flags == 0)[0])
        o, s = int(seg.chunk_offsets[i]), int(seg.table.comp_nbytes[i])
        chunk = bytes(payload[o : o + s])
        raw = x.view(np.uint8)[i * 65536 : (i + 1) * 65536].tobytes()
        if codec == "zstd":
            import zstandard

            assert zstandard.ZstdDecompressor().decompress(chunk, max_output_size=65536) == raw
        else:
            assert zlib.decompress(chunk, -15 if codec == "deflate" else 31) == raw


@pytest.mark.parametrize("codec", CPU_READABLE)
@pytest.mark.parametrize("level", [None, 1, 9])
def test_cpu_written_decodes_on_gpu(cp, codec, level):
    x = weights(300_000, seed=3, dtype=np.float16)
    kwargs = {"level": level} if level is not None and codec in ("zstd", "deflate", "gzip", "gdeflate") else {}
    c = cc.compress(x, codec=codec, backend="cpu", **kwargs)
    assert c.producer["backend"] == "cpu"
    y = cc.decompress(c, device="cuda")
    assert isinstance(y, cp.ndarray) and _same(y, x)


@pytest.mark.parametrize("codec", ["ans", "cascaded"])
def test_gpu_only_codecs_from_host_data(cp, codec):
    x = np.arange(100_000, dtype=np.int32) % 1000
    c = cc.compress(x, codec=codec)  # host input, GPU-only codec: runs on the GPU, result on the host
    assert not c.on_device and c.producer["backend"] == "nvcomp"
    assert _same(cc.decompress(c), x)  # decodes on the GPU, returns NumPy
    assert isinstance(cc.decompress(c), np.ndarray)
    with pytest.raises(cc.BackendUnavailableError, match="no CPU decoder"):
        cc.decompress(c, backend="cpu")


def test_ans_float_mode_ratio(cp):
    x = weights(8 << 20, seed=4)  # 16 MiB of bf16
    c = cc.compress(cp.asarray(x.view(np.uint16)), dtype="bfloat16", codec="ans")
    assert c.codecs["data"]["data_type"] == "<f2"
    assert c.ratio > 1.40
    assert _same(cc.decompress(c), x)
    auto = cc.compress(cp.asarray(x.view(np.uint16)), dtype="bfloat16")
    assert auto.codec == "ans"


def test_auto_tries_integer_codecs_on_samples(cp):
    ids = cp.sort(cp.random.RandomState(0).randint(0, 1 << 20, 4 << 20, dtype=cp.int32))
    c = cc.compress(ids)
    assert c.codec in ("cascaded", "bitcomp") and c.ratio > 5, (c.codec, c.ratio)
    assert _same(cc.decompress(c), cp.asnumpy(ids))
    noise = cp.random.RandomState(1).randint(0, 40, 4 << 20, dtype=cp.int32).astype(cp.uint8)
    n = cc.compress(noise)
    assert n.ratio >= max(cc.compress(noise, codec=k).ratio for k in ("ans", "cascaded", "bitcomp")) * 0.97
    small = cc.compress(cp.arange(1000, dtype=cp.int64))
    assert small.codec == "ans"  # below 1 MiB: no trial


@pytest.mark.parametrize("codec", ["ans", "zstd", "lz4"])
def test_byteplane_on_gpu_matches_cpu_bytes(cp, codec):
    x = weights(200_003, seed=5)
    g = cc.compress(cp.asarray(x.view(np.uint16)), dtype="bfloat16", codec=codec, filters=["byteplane"])
    assert _same(cc.decompress(g), x.view(np.uint16))
    if codec != "ans":
        h = cc.compress(x, codec=codec, filters=["byteplane"], backend="cpu")
        # same planes on both sides: decoded segment bytes agree, and each decodes the other's container
        assert _same(cc.decompress(h, device="cuda"), x.view(np.uint16))
        assert _same(cc.decompress(g.to_bytes(), backend="cpu"), x)  # zstd/lz4 decode untrusted on the CPU


@settings(deadline=None, max_examples=40)
@given(data=st.data())
def test_byteplane_kernel_matches_reference(cp, data):
    from cupycodec.filters.byteplane import merge_planes, split_planes
    from cupycodec.kernels import byteplane as kern

    k = data.draw(st.sampled_from([2, 4, 8]))
    n = data.draw(st.integers(0, 5000))
    rotate = data.draw(st.booleans())
    raw = data.draw(hnp.arrays(np.uint8, n * k))
    ref = split_planes(raw, k, rotate, False)
    planes = kern.split(cp.asarray(raw), k, rotate)
    for j in range(k):
        assert np.array_equal(cp.asnumpy(planes[j]), ref[j])
    spec = cc.dtypes.ArraySpec({2: "U16", 4: "U32", 8: "U64"}[k], "<", (n,))
    merged = kern.merge(planes, k, rotate, spec)
    back = np.empty(n * k, np.uint8)
    merge_planes(ref, k, rotate, False, back)
    assert np.array_equal(cp.asnumpy(merged).view(np.uint8), back)


def test_compress_many_and_decompress_many_with_out(cp):
    arrays = [cp.asarray(weights(n, seed=n).view(np.uint16)) for n in (4096 * 3, 11008 * 2, 777, 0)]
    cs = cc.compress_many(arrays, codec="ans", dtype="bfloat16")
    outs = [cp.empty_like(a) for a in arrays]
    res = cc.decompress_many(cs, out=outs)
    for a, o, r in zip(arrays, outs, res):
        assert r is o and _same(o, a)
    # second call reuses the cached plan and still writes the data
    for o in outs:
        o.fill(0)
    cc.decompress_many(cs, out=outs)
    for a, o in zip(arrays, outs):
        assert _same(o, a)


def test_decode_plan_async(cp):
    arrays = [cp.asarray(weights(1 << 20, seed=s).view(np.uint16)) for s in range(7)]
    cs = cc.compress_many(arrays, codec="ans", dtype="bfloat16")
    outs = [cp.empty_like(a) for a in arrays]
    plan = cc.decode_plan(cs, outs)
    stream = cp.cuda.Stream(non_blocking=True)
    plan.run(stream)
    plan.check(stream)
    for a, o in zip(arrays, outs):
        assert _same(o, a)


def test_plan_reports_bad_chunks(cp):
    x = cp.asarray(weights(1 << 18, seed=9).view(np.uint16))
    c = cc.compress(x, codec="ans", dtype="bfloat16", chunk_nbytes=65536)
    out = cp.empty_like(x)
    plan = cc.decode_plan([c], [out])
    # lie about one chunk's size inside the plan's (trusted) device tables: nvCOMP must report it
    raw_sizes = plan._ptrs[3]  # device address of the expected decoded sizes, one u64 per encoded chunk
    row = cp.ndarray((plan._n_enc,), cp.uint64, cp.cuda.MemoryPointer(
        cp.cuda.UnownedMemory(raw_sizes, 8 * plan._n_enc, plan), 0))
    row[1] -= 16
    plan.run()
    with pytest.raises(cc.BackendError):
        plan.check()


def test_int8_pipeline_on_gpu(cp):
    from cupycodec.quant import reference

    w = weights((256 * 512), seed=6).reshape(256, 512)
    c = cc.compress(cp.asarray(w.view(np.uint16)), dtype="bfloat16", quantize="int8", codec="ans")
    y = cc.decompress(c)
    q, s = reference.quantize_int8(w, granularity="channel", axis=0)
    ref = reference.dequantize_int8(q, s, granularity="channel", axis=0, dtype=ml_dtypes.bfloat16)
    assert _same(cp.asnumpy(y).view(ml_dtypes.bfloat16), ref)
    qz = cc.decompress(c, dequantize=False)
    assert _same(qz.codes, q) and _same(qz.scales, s)
    # with a CPU-readable codec the same quantization decodes on the CPU to the same bits
    z = cc.compress(cp.asarray(w.view(np.uint16)), dtype="bfloat16", quantize="int8", codec="zstd")
    assert _same(cc.decompress(z.to_bytes(), backend="cpu"), ref)


def test_big_array_over_4gib_and_2_31_elements(cp):
    n = (4 << 30) + (1 << 29) + 12345  # 4.5 GiB of uint8: > 4 GiB and > 2**31 elements
    x = (cp.arange(n, dtype=cp.uint64) % 251).astype(cp.uint8)
    c = cc.compress(x, codec="lz4", chunk_nbytes=1 << 20)
    assert c.raw_nbytes == n and c.ratio > 10
    y = cc.decompress(c)
    assert y.size == n and bool((y == x).all())
    del y, c
    c = cc.compress(x, codec="ans")
    assert bool((cc.decompress(c) == x).all())


def test_crc32_kernel_matches_zlib(cp):
    from cupycodec.kernels import crc32

    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    d = cp.asarray(data)
    sizes = np.array([0, 1, 15, 16, 4096, 65536, 300_001], dtype=np.uint64)
    offs = np.array([0, 7, 100, 1000, 20000, 100000, 400000], dtype=np.uint64)
    table = cp.asarray(np.concatenate([offs + np.uint64(d.data.ptr), sizes]))
    out = cp.empty(len(sizes), np.uint32)
    crc32.crc32_batch(table[: len(sizes)], table[len(sizes) :], out, len(sizes),
                      crc32.shape_for(int(sizes.max()), int(sizes.sum())))
    crcs = out.get()
    for o, s, c in zip(offs, sizes, crcs):
        assert int(c) == zlib.crc32(data[int(o) : int(o + s)].tobytes())


def _chunk_crcs_ok(c) -> bool:
    """Every chunk CRC in the tables equals zlib's over the chunk bytes, read from the host copy."""
    payload = bytes(c.host_payload())
    for seg in c.segments:
        for off, n, crc in zip(seg.chunk_offsets.tolist(), seg.table.comp_nbytes.tolist(), seg.table.crc32.tolist()):
            if zlib.crc32(payload[off : off + n]) != crc:
                return False
    return True


@pytest.mark.parametrize("codec", ["raw", "lz4", "ans", "bitcomp", "zstd"])
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_lazy_chunk_crcs_are_zlibs(cp, codec, quantize):
    # GPU compression writes chunk CRCs into the device tables after packing; the host reads them on first use
    x = cp.asarray(weights(300_001, seed=3).view(np.uint16))
    c = cc.compress(x, codec=codec, dtype="bfloat16", quantize=quantize, chunk_nbytes=65536)
    assert _chunk_crcs_ok(c)
    blob = c.to_bytes()
    assert cc.CompressedArray.from_bytes(blob, verify=True) == c  # table CRCs and chunk CRCs verify
    assert cc.decompress(blob, backend="nvcomp", trusted=True).shape == x.shape


def test_lazy_crcs_survive_the_stream_and_host_results(cp):
    x = cp.asarray(weights(1 << 18, seed=4).view(np.uint16))
    s = cp.cuda.Stream(non_blocking=True)
    c = cc.compress(x, codec="ans", dtype="bfloat16", stream=s)
    del s  # the CRCs are read after an event, not from the (gone) stream
    assert _chunk_crcs_ok(c) and c.ratio > 1
    h = cc.compress(cp.asnumpy(x), codec="lz4", backend="nvcomp")  # GPU compression of host data -> host result
    assert not h.on_device and _chunk_crcs_ok(h)
    m = cc.compress(x, codec="lz4", metadata={"layer": 3})  # metadata: the header is encoded at once
    assert m.header["metadata"] == {"layer": 3} and _chunk_crcs_ok(m)
    many = cc.compress_many([x, x[:1000], x[:0]], codec="bitcomp")
    assert all(_chunk_crcs_ok(k) for k in many)
    assert [cc.CompressedArray.from_bytes(k.to_bytes()) == k for k in many] == [True] * 3


def _mixed(n, seed):
    """Bytes whose chunks partly compress and partly do not (so both stored and encoded chunks occur)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, n, dtype=np.uint8)
    x[: n // 2] = (np.arange(n // 2) // 64 % 4).astype(np.uint8)  # runs of 2-bit symbols: every codec shrinks it
    return x


@pytest.mark.parametrize("codec", ALL)
@pytest.mark.parametrize("case", ["tiny", "odd", "mixed", "weights", "weights-16k"])
def test_one_array_and_a_batch_write_the_same_bytes(cp, codec, case):
    # compress() of one array and compress_many() of it among others share one engine, whose encode plans batch
    # every chunk of a codec config into one nvCOMP call: the container of an array must not depend on its company,
    # and fresh decodes, out= decodes (twice: the second reuses the plan kept with the container) and CPU-verified
    # bytes must all give the input back.
    data = {"tiny": np.arange(5, dtype=np.int16), "odd": np.arange(70_001, dtype=np.int32) % 977,
            "mixed": _mixed(300_000, 11), "weights": weights(1 << 19, seed=12).view(np.uint16),
            "weights-16k": weights(100_000, seed=13).view(np.uint16)}[case]
    chunk = 16384 if case == "weights-16k" else None
    g = cp.asarray(data)
    alone = cc.compress(g, codec=codec, chunk_nbytes=chunk)
    batch = cc.compress_many([cp.asarray(_mixed(70_000, 3)), g, g[: len(g) // 2]], codec=codec, chunk_nbytes=chunk)
    assert alone.to_bytes() == batch[1].to_bytes()
    assert _chunk_crcs_ok(alone) and all(_chunk_crcs_ok(b) for b in batch)
    if case == "mixed" and codec != "raw":  # random chunks are stored, the compressible ones encoded
        flags = alone.segments[0].table.flags
        assert 0 < int(flags.sum()) < len(flags)
    assert _same(cc.decompress(alone), data)
    out = cp.empty_like(g)
    for _ in range(2):  # the second call reuses the plan kept with the container
        out[...] = 0
        assert cc.decompress(alone, out=out) is out and _same(out, data)
    assert _same(cc.decompress(cc.CompressedArray.from_bytes(alone.to_bytes(), trusted=True), device="cuda"), data)
    h = cc.compress(data, codec=codec, backend="nvcomp", chunk_nbytes=chunk)  # host data, GPU compression
    assert not h.on_device and h.to_bytes() == alone.to_bytes() and _chunk_crcs_ok(h)


@pytest.mark.parametrize("codec", ["ans", "lz4"])
def test_one_shot_decodes_report_bad_chunks(cp, codec):
    # Lie about one chunk's decoded size in the rows the decoders trust: the fresh-output decode and the plan kept
    # for decompress(out=) must raise, naming the chunk, never return the short output.
    x = cp.asarray(np.arange(1 << 17, dtype=np.int32) % 977)  # 512 KiB that both codecs shrink
    c = cc.compress(x, codec=codec, chunk_nbytes=65536)
    seg = c.segments[0]
    rows = seg.decode_rows
    assert rows.n_stored == 0 and rows.n_encoded == 8
    raw = rows.enc_raw.copy()
    raw[1] -= 16
    object.__setattr__(seg, "_rows", rows._replace(enc_raw=raw))
    with pytest.raises(cc.BackendError, match="failed to decode 1 chunk.*item 0, segment 'data', chunk 1"):
        cc.decompress(c)
    out = cp.empty_like(x)
    with pytest.raises(cc.BackendError, match="failed to decode 1 chunk"):
        cc.decompress(c, out=out)
    object.__setattr__(seg, "_rows", rows)
    c2 = cc.CompressedArray.from_bytes(c.to_bytes(), trusted=True).to_device()  # fresh plans from true rows
    assert _same(cc.decompress(c2), x) and _same(cc.decompress(c2, out=cp.empty_like(x)), x)


def test_raw_one_segment_round_trip_does_not_wait(cp):
    # raw: compression and a fresh decode enqueue copies only; the result is ready in stream order
    x = cp.arange(1 << 18, dtype=cp.float32)
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        c = cc.compress(x, codec="raw")
        y = cc.decompress(c)
        z = y * 2
    s.synchronize()
    assert _same(z, cp.asnumpy(x) * 2) and _chunk_crcs_ok(c)


@pytest.mark.parametrize("codec", [c for c in ALL if c != "raw"])
def test_gpu_compression_is_deterministic_whatever_the_pool_holds(cp, codec):
    # The container is deterministic: the same input gives the same bytes, whatever garbage the memory pool hands
    # nvCOMP as output scratch (a codec that leaves bytes of its output unwritten must have them zeroed first).
    x = cp.asarray(np.arange(70_001, dtype=np.int32) % 977)
    w = cp.asarray(weights(1 << 18, seed=5).view(np.uint16))
    blobs = []
    pool = cp.get_default_memory_pool()
    for fill in (0x00, 0xFF, 0x5A):
        pool.free_all_blocks()
        junk = cp.full(64 << 20, fill, dtype=cp.uint8)
        del junk  # back to the pool, dirty: the next allocations reuse it
        blobs.append([cc.compress(a, codec=codec).to_bytes() for a in (x, w)]
                     + [b.to_bytes() for b in cc.compress_many([x, w], codec=codec)])
    for k in range(4):
        if blobs[1][k] != blobs[0][k] or blobs[2][k] != blobs[0][k]:
            a = cc.CompressedArray.from_bytes(blobs[0][k])
            b = cc.CompressedArray.from_bytes(blobs[1][k])
            seg_a, seg_b = a.segments[0], b.segments[0]
            pa, pb = bytes(a.host_payload()), bytes(b.host_payload())
            where = []
            for i, (o, n) in enumerate(zip(seg_a.chunk_offsets.tolist(), seg_a.table.comp_nbytes.tolist())):
                diff = [j for j in range(n) if pa[o + j] != pb[o + j]] if len(pa) == len(pb) else []
                if diff:
                    where.append((i, n, diff[:8], len(diff)))
            same_sizes = seg_a.table.comp_nbytes.tolist() == seg_b.table.comp_nbytes.tolist()
            pytest.fail(f"{codec} blob {k}: bytes depend on pool contents; same sizes {same_sizes}; "
                        f"chunks (index, size, first diffs, count): {where[:4]}")
