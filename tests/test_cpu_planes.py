"""The CPU byte-plane engine (backends/_planes.py, backends/cpu.py) against the NumPy reference of format v1."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cupycodec as cc
from cupycodec.backends import cpu
from cupycodec.backends._planes import blosc2_library, planes_for
from cupycodec.filters.byteplane import merge_planes, split_planes

ENGINES = ["numpy", "blosc2"]


def test_blosc2_engine_is_available():
    # blosc2 is a runtime dependency: without its library the CPU path silently runs the slow reference
    assert blosc2_library() is not None


@settings(max_examples=150, deadline=None)
@given(k=st.sampled_from([2, 4, 8]), rotate=st.booleans(), big=st.booleans(), engine=st.sampled_from(ENGINES),
       words=st.integers(1, 5000), seed=st.integers(0, 2**32 - 1))
def test_block_split_and_merge_match_the_reference(k, rotate, big, engine, words, seed):
    raw = np.random.default_rng(seed).integers(0, 256, words * k, dtype=np.uint8)
    eng = planes_for(k, rotate, big, engine=engine)
    ref = split_planes(raw, k, rotate, big)
    got = eng.split(raw)
    assert len(got) == k
    for j in range(k):
        np.testing.assert_array_equal(np.frombuffer(got[j], np.uint8), ref[j])
    for slot, plane in zip(eng.rows(words), ref):
        slot[:] = plane.tobytes()
    out = np.empty_like(raw)
    eng.merge_into(out)
    np.testing.assert_array_equal(out, raw)
    back = np.empty_like(raw)
    merge_planes(list(ref), k, rotate, big, back)  # the reference reads a list of planes as well as a 2-D array
    np.testing.assert_array_equal(back, raw)


_DTYPES = ["<u2", ">u2", "<f2", ">f2", "<i4", ">i4", "<f4", ">f4", "<f8", ">f8", "<i8", "<c8", ">c16"]


@settings(max_examples=80, deadline=None)
@given(dtype=st.sampled_from(_DTYPES), n=st.integers(0, 3000), chunk=st.sampled_from([16, 48, 256, 4096, 65536]),
       rotate=st.booleans(), codec=st.sampled_from(["zstd", "raw", "lz4"]), seed=st.integers(0, 2**32 - 1))
def test_byteplane_containers_hold_the_reference_planes(dtype, n, chunk, rotate, codec, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 3).astype(dtype) if dtype[1] in "fc" else rng.integers(-300, 300, n).astype(dtype)
    c = cc.compress(x, codec=codec, filters=[{"id": "byteplane", "rotate": rotate}], chunk_nbytes=chunk)
    k = x.dtype.itemsize // (2 if dtype[1] == "c" else 1)
    ref = split_planes(x.reshape(-1).view(np.uint8), k, rotate, x.dtype.byteorder == ">")
    assert [s.name for s in c.segments] == [f"data.p{j}" for j in range(k)]
    for j, seg in enumerate(c.segments):  # each plane segment decoded on its own is the reference plane
        plane = np.empty(seg.raw_nbytes, np.uint8)
        cpu.decode_segments([(c.host_payload(), seg, memoryview(plane))])
        np.testing.assert_array_equal(plane, ref[j])
    for blob in (c, c.to_bytes()):
        y = cc.decompress(blob)
        assert y.dtype == x.dtype
        np.testing.assert_array_equal(y.view(np.uint8), x.view(np.uint8))
    out = np.empty_like(x)
    assert cc.decompress(c, out=out) is out
    np.testing.assert_array_equal(out.view(np.uint8), x.view(np.uint8))


def test_planes_chunked_differently_still_decode():
    """Writers chunk every plane alike; a container whose planes differ takes the plane-by-plane path."""
    x = np.linspace(-3, 3, 5000, dtype=np.float32)
    c = cc.compress(x, filters=["byteplane"], codec="zstd", chunk_nbytes=1024)
    d = cc.compress(x, filters=["byteplane"], codec="zstd", chunk_nbytes=2048)
    from cupycodec.container import CompressedArray, Header, build_segments

    segs = [c.segments[0], *d.segments[1:]]
    pieces = [(s.name, s.spec, s.codec, s.chunk_nbytes, s.table) for s in segs]
    payloads = [c.host_payload(), d.host_payload(), d.host_payload(), d.host_payload()]
    built = build_segments(pieces)
    payload = bytearray(sum(s.nbytes for s in built))
    for new, old, src in zip(built, segs, payloads):
        payload[new.offset : new.offset + new.nbytes] = src[old.offset : old.offset + old.nbytes]
    mixed = CompressedArray(Header(c.spec, c.pipeline, built, c.producer, {}), memoryview(payload))
    np.testing.assert_array_equal(cc.decompress(cc.CompressedArray.from_bytes(mixed.to_bytes())), x)


@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_batches_of_many_arrays_decode_in_one_pass(threads, monkeypatch):
    monkeypatch.setenv("CUPYCODEC_NUM_THREADS", threads)
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(int(s)).astype(d) for s, d in
              zip(rng.integers(0, 300_000, 40), ["f4", "f2", "f8", "i4", "u1"] * 8)]
    packed = cc.compress_many(arrays)
    for a, c in zip(arrays, packed):
        assert c.nbytes <= cc.compress(a, codec="raw").nbytes
    blobs = [c.to_bytes() for c in packed]
    for a, y in zip(arrays, cc.decompress_many(blobs)):
        np.testing.assert_array_equal(y, a)
    outs = [np.empty_like(a) for a in arrays]
    cc.decompress_many(packed, out=outs)
    for a, y in zip(arrays, outs):
        np.testing.assert_array_equal(y, a)


@pytest.mark.parametrize("planes", [False, True])
def test_workers_drop_the_mapped_payload_as_they_go(planes):
    """A decoding worker releases the pages of what it has read every ~1 MiB of compressed bytes, not once at the
    end of its group, so the resident part of a memory-mapped file stays near threads x 1 MiB on many cores."""
    from cupycodec.backends import cpu

    rng = np.random.default_rng(5)
    x = rng.standard_normal(8 << 20 >> 2).astype(np.float32)  # 8 MiB, barely compressible
    c = cc.compress(x, codec="zstd", chunk_nbytes=65536, filters=["byteplane"] if planes else None, backend="cpu")
    calls = []
    payload = c._host_payload()
    out = np.empty(x.nbytes, np.uint8)
    if planes:
        k, rotate, big = c.pipeline[0].params(c.spec)
        work = cpu.DecodePlanes(payload, c.segments, out, k, rotate, big, True, lambda a, b: calls.append((a, b)))
    else:
        work = cpu.DecodeSegment(payload, c.segments[0], memoryview(out), True, lambda a, b: calls.append((a, b)))
    work.run(3, work.n)
    first = 3 * 65536 * (4 if planes else 1)  # a plane chunk covers 65536 words; a plain one 65536 bytes
    assert np.array_equal(out[first:].view(np.float32), x[first // 4 :])
    for seg in c.segments:  # per segment: contiguous ranges from chunk 3 to the end, each about 1 MiB or less
        offs, sizes = seg.chunk_offsets, seg.table.comp_nbytes
        mine = [(a, b) for a, b in calls if offs[3] <= a < offs[-1] + sizes[-1]]
        assert mine[0][0] == offs[3] and mine[-1][1] == offs[-1] + sizes[-1]
        assert all(b1 <= a2 for (_, b1), (a2, _) in itertools.pairwise(mine))
        assert len(mine) >= 2
    step = max(b - a for a, b in calls)
    assert step <= cpu._RELEASE_NBYTES + 2 * 65536 + 4096


def test_a_decoding_thread_holds_the_plane_rows_and_a_small_temporary_only():
    """Per-thread scratch is what many threads multiply: decoding (merge) needs the k plane rows of a block and a
    small word temporary, not the rotated block of words that only splitting with rotation uses."""
    import threading

    from cupycodec.backends import _planes

    if blosc2_library() is None:
        pytest.skip("the NumPy reference allocates its own temporaries")
    k, m = 4, 1 << 18
    sizes = {}

    def decode_then_split(rotate):
        p = planes_for(k, rotate, False)
        src = np.arange(k * m, dtype=np.uint8)
        assert len(p.rows(m)) == k and len(p.slots(m)) == k  # what a decoding worker fills
        p.merge_into(np.empty(k * m, np.uint8))
        sizes[("merge", rotate)] = _planes._local.buf.size
        p.split(src)
        sizes[("split", rotate)] = _planes._local.buf.size

    for rotate in (False, True):
        t = threading.Thread(target=decode_then_split, args=(rotate,))  # a fresh thread: a fresh buffer
        t.start()
        t.join()
    small = k * m + min(m, _planes._PIECE) * k
    assert sizes[("merge", False)] == sizes[("merge", True)] == sizes[("split", False)] == small
    assert sizes[("split", True)] == small + k * m


def test_plane_zero_gets_the_codecs_top_plane_encoder_and_the_others_its_plain_one():
    # The sign-and-exponent plane is compressed with the encoder tuned for it; every other plane with the plain one.
    from cupycodec.codecs import Zstd

    calls = []

    class Spy(Zstd):
        def chunk_encoder(self, *, top_plane=False):
            inner = super().chunk_encoder(top_plane=top_plane)

            def encode(src):
                calls.append((top_plane, bytes(src[:1])))
                return inner(src)

            return encode

    x = (np.random.default_rng(0).standard_normal((64, 1024)) * 0.02).astype(np.float32)
    work = cpu.EncodePlanes(x.reshape(-1).view(np.uint8), 4, False, False, Spy(level=1), 16384)
    cpu.run([work])
    top = [c for c in calls if c[0]]
    assert len(top) == work.n and len(calls) == 4 * work.n
    raw = x.reshape(-1).view(np.uint8)  # plane 0 is the most significant byte (little-endian: the 4th)
    assert sorted(b for _, b in top) == sorted(bytes([raw[i * 16384 * 4 + 3]]) for i in range(work.n))


@pytest.mark.parametrize("level", [1, 2, 3, 5])
def test_top_plane_frames_are_plain_zstd_with_their_size(level):
    # Decoders need nothing new, and the fast in-place decoder needs each frame to state its content size.
    import zstandard

    from cupycodec.codecs import Zstd

    plane = (np.random.default_rng(1).standard_normal(1 << 16) * 0.02).astype(np.float32).view(np.uint8)[3::4].copy()
    frame = Zstd(level=level).chunk_encoder(top_plane=True)(memoryview(plane))
    assert zstandard.frame_content_size(frame) == plane.size
    assert zstandard.ZstdDecompressor().decompress(frame) == plane.tobytes()
