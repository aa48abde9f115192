"""Each CPU codec writes standard streams, one per chunk, that the format's reference library reads."""

from __future__ import annotations

import gzip
import zlib

import numpy as np
import pytest

import cupycodec as cc


def _chunks(c: cc.CompressedArray, name: str = "data"):
    seg = next(s for s in c.segments if s.name == name)
    payload = c.host_payload()
    for i in range(seg.n_chunks):
        o, n = int(seg.chunk_offsets[i]), int(seg.table.comp_nbytes[i])
        yield i, bool(seg.table.flags[i]), bytes(payload[o : o + n]), seg


def _raw(x: np.ndarray, seg, i: int) -> bytes:
    b = x.tobytes()
    return b[i * seg.chunk_nbytes : (i + 1) * seg.chunk_nbytes]


DECODERS = {
    "zstd": lambda b, n: __import__("zstandard").ZstdDecompressor().decompress(b, max_output_size=n),
    "deflate": lambda b, n: zlib.decompress(b, -15),
    "gzip": lambda b, n: gzip.decompress(b),
    "lz4": lambda b, n: bytes(__import__("cramjam").lz4.decompress_block(b, output_len=n)),
    "snappy": lambda b, n: bytes(__import__("cramjam").snappy.decompress_raw(b)),
}


@pytest.mark.parametrize("codec", sorted(DECODERS))
def test_chunks_are_standard_streams(codec):
    x = np.tile(np.arange(1000, dtype=np.int32), 50)
    c = cc.compress(x, codec=codec, chunk_nbytes=8192)
    seen_encoded = False
    for i, stored, data, seg in _chunks(c):
        raw = _raw(x, seg, i)
        if stored:
            assert data == raw
        else:
            seen_encoded = True
            assert DECODERS[codec](data, len(raw)) == raw
    assert seen_encoded


def test_zstd_frames_carry_content_size_and_level():
    import zstandard

    x = np.zeros(10000, np.uint8)
    c = cc.compress(x, codec="zstd", level=19, chunk_nbytes=4096)
    _, _, data, _ = next(_chunks(c))
    assert zstandard.frame_content_size(data) == 4096


def test_lz4_levels_are_its_high_compression_mode():
    """level=1-12 runs LZ4's high-compression mode (cramjam's encoder ignored the level: every level wrote fast
    mode's bytes), and every stream decodes with the format's reference decoder, as fast mode's does."""
    rng = np.random.default_rng(0)
    x = np.cumsum(rng.integers(-3, 4, 1 << 16), dtype=np.int32)  # smooth: room for the HC match finder
    sizes = {}
    for level in (None, 1, 9, 12):
        c = cc.compress(x, codec="lz4", level=level, chunk_nbytes=1 << 16)
        assert np.array_equal(cc.decompress(c), x)
        sizes[level] = sum(len(data) for _, _, data, _ in _chunks(c))
        for i, stored, data, seg in _chunks(c):
            raw = _raw(x, seg, i)
            assert data == raw if stored else DECODERS["lz4"](data, len(raw)) == raw
    assert sizes[12] <= sizes[9] < min(sizes[1], sizes[None])


def test_incompressible_chunks_are_stored():
    x = np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8)
    for codec in DECODERS:
        c = cc.compress(x, codec=codec, chunk_nbytes=16384)
        assert all(stored for _, stored, _, _ in _chunks(c)), codec
        assert c.nbytes < x.nbytes + 2048  # never expands beyond table and header
        assert np.array_equal(cc.decompress(c), x)


@pytest.mark.parametrize("codec", sorted(DECODERS))
def test_corrupt_stream_with_valid_crc_raises_format_error(codec):
    """A chunk that passes its CRC but does not decode (a buggy writer) is a FormatError, never garbage."""
    import json
    import struct

    x = np.tile(np.arange(256, dtype=np.uint8), 64)
    c = cc.compress(x, codec=codec, chunk_nbytes=16384)
    blob = bytearray(c.to_bytes())
    n = struct.unpack_from("<Q", blob, 8)[0]
    header = json.loads(blob[24 : 24 + n])
    seg = c.segments[0]
    o = 24 + n + int(seg.chunk_offsets[0])
    size = int(seg.table.comp_nbytes[0])
    for j in range(size // 2, size):
        blob[o + j] ^= 0x5A
    crc = zlib.crc32(bytes(blob[o : o + size]))
    t = 24 + n + seg.offset
    k = seg.n_chunks
    struct.pack_into("<I", blob, t + 4 * k, crc)
    table = bytes(blob[t : t + (-(-9 * k // 16) * 16)])
    header["segments"][0]["table_crc32"] = zlib.crc32(table)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (n - len(text))
    blob[24 : 24 + n] = text
    struct.pack_into("<I", blob, 16, zlib.crc32(text))
    try:
        y = cc.decompress(bytes(blob))
    except cc.FormatError:
        return
    assert np.array_equal(y, x)  # the flipped bits happened to be in an unused part of the stream


def test_registry_contents_and_configs():
    codecs = cc.registered_codecs()
    assert set(codecs) == {"raw", "zstd", "deflate", "gzip", "lz4", "snappy", "gdeflate", "cascaded", "bitcomp",
                           "ans"}
    for cid, cls in codecs.items():
        codec = cls()
        cfg = codec.get_config()
        assert cfg["id"] == cid and cfg["version"] >= 1
        assert cc.get_codec(json_roundtrip(cfg)) == codec
    config = {"id": "zstd", "level": 4}
    cc.get_codec(config)
    assert config == {"id": "zstd", "level": 4}  # not mutated
    with pytest.raises(cc.UnknownCodecError):
        cc.get_codec("nope")
    with pytest.raises(TypeError):
        cc.get_codec({"level": 3})
    with pytest.raises(ValueError, match="already registered"):
        cc.register_codec(type("Z2", (cc.Codec,), {"codec_id": "zstd"}))
    with pytest.raises(ValueError, match="lowercase"):
        cc.register_codec(type("Bad", (cc.Codec,), {"codec_id": "Bad"}))


def json_roundtrip(obj):
    import json

    return json.loads(json.dumps(obj))


def test_third_party_codec_registration():
    class Xor(cc.Codec):
        """A toy codec: xor with 0x55 and store as zstd frames (exercises the registry, not compression)."""

        codec_id = "test-xor"

        def encode_chunk(self, src):
            import zstandard

            return zstandard.ZstdCompressor().compress(bytes(b ^ 0x55 for b in bytes(src)))

        def decode_chunk_into(self, src, dst):
            import zstandard

            dst[:] = bytes(b ^ 0x55 for b in zstandard.ZstdDecompressor().decompress(bytes(src), len(dst)))

    cc.register_codec(Xor)
    x = np.zeros(5000, np.uint8)
    c = cc.compress(x, codec="test-xor")
    assert c.codec == "test-xor" and np.array_equal(cc.decompress(c.to_bytes(), trusted=True), x)
    with pytest.raises(cc.UntrustedError, match="test-xor"):  # a plug-in's decoder is not known to be hardened
        cc.decompress(c.to_bytes())


def test_zstd_decodes_straight_into_the_chunk_with_libzstd():
    import zstandard

    from cupycodec.backends.cpu import address
    from cupycodec.codecs._cpu import _libzstd, zstd_decode_at

    if _libzstd() is None:
        pytest.skip("blosc2's shared library (which exports libzstd's API) is not installed")

    def decode_into(src: bytes, dst) -> bool:
        return zstd_decode_at(address(src), len(src), address(dst), len(dst))

    data = np.random.default_rng(0).integers(0, 8, 100_000, dtype=np.uint8).tobytes()
    frame = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(data)
    dst = bytearray(len(data))
    assert decode_into(frame, dst) and bytes(dst) == data
    # a frame that does not hold exactly this chunk, or says nothing of its size, or is followed by another frame:
    # left to the exact path
    assert not decode_into(frame, bytearray(len(data) - 1))
    unsized = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(data)
    assert not decode_into(unsized, bytearray(len(data)))
    guard = bytearray(len(data) + 64)
    assert not decode_into(frame + frame, memoryview(guard)[: len(data)]) and guard[len(data) :] == bytes(64)
    for at in (0, 5, len(frame) // 2, len(frame) - 1):  # corrupt frames: no crash, no write past the chunk
        bad = bytearray(frame)
        bad[at] ^= 0xFF
        guard = bytearray(len(data) + 64)
        decode_into(bytes(bad), memoryview(guard)[: len(data)])
        assert guard[len(data) :] == bytes(64)


@pytest.mark.parametrize("filters", [[], [{"id": "byteplane", "rotate": False}], [{"id": "byteplane", "rotate": True}]])
def test_cpu_zstd_chunks_decode_between_addresses(monkeypatch, filters):
    # every zstd chunk (plain segments and byte planes, stored chunks among them) goes through decode_chunk_at:
    # the memoryview path, with its bytes object and copy per chunk, is only the fallback
    from cupycodec.codecs._cpu import _libzstd
    from cupycodec.codecs.zstd import Zstd

    if _libzstd() is None:
        pytest.skip("blosc2's shared library (which exports libzstd's API) is not installed")
    rng = np.random.default_rng(3)
    x = np.concatenate([np.sin(np.arange(300_000) / 50).astype(np.float32), rng.random(200_000, np.float32)])
    c = cc.compress(x, codec="zstd", level=1, filters=filters, chunk_nbytes=65536)
    assert any(seg.table.flags.any() for seg in c.segments) or not filters  # planes: some chunks are stored

    def refuse(self, src, dst):
        raise AssertionError("decode_chunk_into called for a chunk libzstd decodes")

    monkeypatch.setattr(Zstd, "decode_chunk_into", refuse)
    np.testing.assert_array_equal(cc.decompress(c), x)
    np.testing.assert_array_equal(cc.decompress(cc.CompressedArray.from_bytes(c.to_bytes(), verify=True)), x)


def test_chunk_encoder_is_encode_chunk():
    # the CPU workers take a codec's chunk_encoder once per group of chunks: same frames as encode_chunk
    from cupycodec.codecs import LZ4, Zstd

    data = memoryview(np.random.default_rng(1).integers(0, 9, 200_000, dtype=np.uint8).tobytes())
    for codec in (Zstd(level=1), Zstd(), LZ4()):
        assert codec.chunk_encoder()(data) == codec.encode_chunk(data)
