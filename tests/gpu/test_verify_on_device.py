"""Chunk CRCs that from_bytes deferred, checked on the GPU (engine.verify): zlib's values, one launch for a batch,
and the same ChecksumError (segment and chunk) as the host check, from every way device bytes get decoded."""

from __future__ import annotations

import numpy as np
import pytest

import cupycodec as cc
from cupycodec.engine.verify import verify_on_device

pytestmark = pytest.mark.gpu


def _stored(seed: int, **kw):
    """(array, container bytes) of a 300,000-element fp16 array in 64 KiB chunks (several per segment)."""
    import cupy

    x = cupy.asarray((np.random.default_rng(seed).standard_normal(300_000) * 0.02).astype(np.float16))
    return x, cc.compress(x, chunk_nbytes=65536, **kw).to_bytes()


def _corrupt(blob: bytes, segment: str, chunk: int) -> bytes:
    """``blob`` with one byte of a chunk's stored bytes flipped (its CRC in the table left as it was)."""
    c = cc.CompressedArray.from_bytes(blob)
    seg = next(s for s in c.segments if s.name == segment)
    at = len(c._prefix) + int(seg.chunk_offsets[chunk]) + int(seg.table.comp_nbytes[chunk]) // 2
    out = bytearray(blob)
    out[at] ^= 0x5A
    return bytes(out)


CASES = [({"codec": "ans"}, "data"), ({"codec": "zstd"}, "data"), ({"codec": "raw"}, "data"),
         ({"codec": "zstd", "filters": ["byteplane"]}, "data.p1")]


@pytest.mark.parametrize(("kw", "segment"), CASES)
def test_clean_bytes_pass_and_decode_exactly(kw, segment):
    import cupy

    x, blob = _stored(1, **kw)
    c = cc.CompressedArray.from_bytes(blob, trusted=True)
    assert not c.verified
    y = cc.decompress(c, device="cuda")
    assert c.verified and bool(cupy.array_equal(y.view(cupy.uint16), x.view(cupy.uint16)))
    d = cc.CompressedArray.from_bytes(blob).to_device()
    assert d.verified and d.on_device
    assert cc.CompressedArray.from_bytes(blob).with_payload(d._payload).verify().verified


@pytest.mark.parametrize(("kw", "segment"), CASES)
@pytest.mark.parametrize("chunk", [0, 2, 4])
def test_a_corrupt_chunk_is_named_by_every_device_path(kw, segment, chunk):
    import cupy

    x, blob = _stored(2, **kw)
    bad = _corrupt(blob, segment, chunk)
    expect = dict(match=rf"checksum mismatch in segment '{segment}', chunk {chunk}:")
    with pytest.raises(cc.ChecksumError, **expect) as e:
        cc.decompress(cc.CompressedArray.from_bytes(bad, trusted=True), device="cuda")
    assert (e.value.segment, e.value.chunk) == (segment, chunk)
    with pytest.raises(cc.ChecksumError, **expect):
        cc.CompressedArray.from_bytes(bad).to_device()
    host = cc.CompressedArray.from_bytes(bad)
    dev = host.with_payload(cupy.asarray(np.frombuffer(host._payload, np.uint8)))
    with pytest.raises(cc.ChecksumError, **expect):
        dev.verify()
    assert not dev.verified
    with pytest.raises(cc.ChecksumError, **expect):  # the host check says the same
        cc.CompressedArray.from_bytes(bad).verify()
    # in a batch: the clean items before it do not hide it, and the error names its chunk
    _, clean = _stored(3, **kw)
    items = [cc.CompressedArray.from_bytes(b, trusted=True) for b in (clean, clean, bad)]
    with pytest.raises(cc.ChecksumError, **expect):
        cc.decompress_many(items, device="cuda")


def test_one_launch_checks_a_batch_against_zlib():
    # containers from several codecs and segment counts in one call; a GPU CRC that differed from zlib's in any
    # chunk would raise here
    blobs = [_stored(s, **kw)[1] for s, (kw, _) in enumerate(CASES * 2)]
    items = [cc.CompressedArray.from_bytes(b).to_device() for b in blobs]  # verified, one by one, on the way
    again = [cc.CompressedArray.from_bytes(b).with_payload(d._payload) for b, d in zip(blobs, items)]
    assert not any(c.verified for c in again)
    verify_on_device(again, again[0].device_id)
    assert all(c.verified for c in again)
