"""The v1 container: golden bytes, determinism, each reader rule, and a mutation/truncation fuzz."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cupycodec as cc
from cupycodec.container import MAGIC, PRELUDE_NBYTES

# One small array, codec raw, written by producer version 0.1.0: the exact bytes of format v1.
GOLDEN_HEX = (
    "43504343010000006801000000000000b59918e5000000007b226172726179223a7b22627974656f72646572223a223c222c2264"
    "74797065223a22553136222c227368617065223a5b332c345d7d2c226d65746164617461223a7b7d2c22706970656c696e6522"
    "3a5b5d2c2270726f6475636572223a7b226261636b656e64223a22637075222c226c696272617279223a2263757079636f6465"
    "63222c2276657273696f6e223a22302e312e30227d2c227365676d656e7473223a5b7b22627974656f72646572223a223c222c"
    "226368756e6b5f6e6279746573223a313034383537362c22636f646563223a7b226964223a22726177222c2276657273696f6e"
    "223a317d2c226474797065223a22553136222c226e5f6368756e6b73223a312c226e616d65223a2264617461222c226e627974"
    "6573223a34382c226f6666736574223a302c227261775f6e6279746573223a32342c227368617065223a5b332c345d2c227461"
    "626c655f6372633332223a313031313431373132387d5d7d202018000000afea71b1010000000000000000000100020003000400"
    "050006000700080009000a000b000000000000000000"
)


def _blob(x=None, **kw) -> bytes:
    x = np.arange(64, dtype=np.uint8) if x is None else x
    return cc.compress(x, **{"codec": "raw", **kw}).to_bytes()


def _split(blob: bytes):
    magic, version, flags, n, crc = struct.unpack_from("<4sHHQI4x", blob)
    return n, json.loads(blob[PRELUDE_NBYTES : PRELUDE_NBYTES + n]), blob[PRELUDE_NBYTES + n :]


def _rebuild(header: dict, payload: bytes, *, version=1, flags=0, crc=None, pad_to=64) -> bytes:
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    n = -(-(PRELUDE_NBYTES + len(text)) // pad_to) * pad_to - PRELUDE_NBYTES
    text += b" " * (n - len(text))
    crc = zlib.crc32(text) if crc is None else crc
    return struct.pack("<4sHHQI4x", MAGIC, version, flags, n, crc) + text + payload


def test_golden_bytes():
    x = np.arange(12, dtype="<u2").reshape(3, 4)
    c = cc.compress(x, codec="raw")
    blob = c.to_bytes()
    n, header, payload = _split(blob)
    assert blob[:4] == b"CPCC" and blob[4:6] == b"\x01\x00" and blob[6:8] == b"\x00\x00"
    assert (PRELUDE_NBYTES + n) % 64 == 0
    assert header["array"] == {"byteorder": "<", "dtype": "U16", "shape": [3, 4]}
    assert header["pipeline"] == []
    seg = header["segments"][0]
    assert seg == {
        "name": "data", "dtype": "U16", "byteorder": "<", "shape": [3, 4], "raw_nbytes": 24,
        "codec": {"id": "raw", "version": 1}, "chunk_nbytes": 1048576, "n_chunks": 1, "offset": 0, "nbytes": 48,
        "table_crc32": seg["table_crc32"],
    }
    # table: size 24, CRC of the chunk, flag stored; zero padded to 16; then the chunk padded to 16
    table = struct.pack("<IIB", 24, zlib.crc32(x.tobytes()), 1) + bytes(7)
    assert payload == table + x.tobytes() + bytes(8)
    assert seg["table_crc32"] == zlib.crc32(table)
    assert header["producer"] == {"library": "cupycodec", "version": cc.__version__, "backend": "cpu"}


def test_golden_bytes_exact(monkeypatch):
    import cupycodec.container

    monkeypatch.setattr(cupycodec.container, "__version__", "0.1.0")
    x = np.arange(12, dtype="<u2").reshape(3, 4)
    assert cc.compress(x, codec="raw").to_bytes().hex() == GOLDEN_HEX
    assert np.array_equal(cc.decompress(bytes.fromhex(GOLDEN_HEX)), x)


def test_deterministic():
    x = np.random.default_rng(0).standard_normal((100, 100)).astype(np.float32)
    for codec in ("zstd", "deflate", "gzip", "lz4", "snappy", "raw", "auto"):
        a = cc.compress(x, codec=codec, metadata={"b": 1, "a": [1, 2]}).to_bytes()
        b = cc.compress(x.copy(), codec=codec, metadata={"a": [1, 2], "b": 1}).to_bytes()
        assert a == b, codec


def test_roundtrip_header_view_is_read_only():
    c = cc.compress(np.ones(10), codec="zstd", metadata={"k": [1]})
    with pytest.raises(TypeError):
        c.header["array"] = {}
    with pytest.raises(AttributeError):
        c.foo = 1
    assert c.metadata["k"] == (1,)


# -- reader rules ---------------------------------------------------------------------------------------------


def test_rule1_short_and_magic():
    with pytest.raises(cc.FormatError, match="at least 24 bytes"):
        cc.CompressedArray.from_bytes(b"CPCC")
    with pytest.raises(cc.FormatError, match="not a cupycodec container"):
        cc.CompressedArray.from_bytes(b"XXXX" + _blob()[4:])


def test_rule2_future_version():
    blob = bytearray(_blob())
    blob[4:6] = struct.pack("<H", 2)
    with pytest.raises(cc.UnsupportedVersionError, match="upgrade cupycodec"):
        cc.CompressedArray.from_bytes(bytes(blob))
    blob[4:6] = struct.pack("<H", 0)
    with pytest.raises(cc.FormatError, match="version 0"):
        cc.CompressedArray.from_bytes(bytes(blob))


def test_rule3_flags_and_header_length():
    blob = bytearray(_blob())
    bad = bytearray(blob)
    bad[6:8] = b"\x01\x00"
    with pytest.raises(cc.FormatError, match="unknown flags"):
        cc.CompressedArray.from_bytes(bytes(bad))
    for n in (7, 17 * 2**20, 2**63):
        bad = bytearray(blob)
        bad[8:16] = struct.pack("<Q", n)
        with pytest.raises(cc.FormatError, match="header length"):
            cc.CompressedArray.from_bytes(bytes(bad))
    bad = bytearray(blob)
    bad[8:16] = struct.pack("<Q", len(blob))  # multiple of 8 but overruns
    with pytest.raises(cc.FormatError):
        cc.CompressedArray.from_bytes(bytes(bad))


def test_rule4_header_crc_json_object_duplicates():
    blob = _blob()
    n, header, payload = _split(blob)
    with pytest.raises(cc.ChecksumError, match="segment 'header'"):
        cc.CompressedArray.from_bytes(_rebuild(header, payload, crc=1))
    text = b'{"array":1,"array":2}'
    for body, match in ((b"[1,2,3]", "JSON object"), (b"{not json", "not valid JSON"),
                        (text, "duplicate key"), (b"\xff\xfe", "not valid UTF-8"), (b'{"a":NaN}', "NaN")):
        body = body + b" " * (-(PRELUDE_NBYTES + len(body)) % 8)
        raw = struct.pack("<4sHHQI4x", MAGIC, 1, 0, len(body), zlib.crc32(body)) + body
        with pytest.raises(cc.FormatError, match=match):
            cc.CompressedArray.from_bytes(raw)


@pytest.mark.parametrize("mutate, match", [
    (lambda h: h.pop("array"), "missing 'array'"),
    (lambda h: h["array"].update(dtype="F99"), "unknown dtype name"),
    (lambda h: h["array"].update(shape=[-1]), "shape"),
    (lambda h: h["array"].update(shape=[True]), "shape"),
    (lambda h: h["array"].update(byteorder="?"), "byteorder"),
    (lambda h: h["array"].update(shape=[2**40, 2**40]), "more than any machine"),
    (lambda h: h["array"].update(shape=[65]), "does not match"),
    (lambda h: h["segments"][0].update(raw_nbytes=65), "raw_nbytes"),
    (lambda h: h["segments"][0].update(n_chunks=2), "n_chunks"),
    (lambda h: h["segments"][0].update(chunk_nbytes=15), "chunk_nbytes"),
    (lambda h: h["segments"][0].update(chunk_nbytes=2**25), "chunk_nbytes"),
    (lambda h: h["segments"][0].update(offset=16), "hole"),
    (lambda h: h["segments"][0].update(nbytes=16), "nbytes|chunk"),
    (lambda h: h["segments"][0].update(name="other"), "segments must be"),
    (lambda h: h["segments"][0].update(codec={"id": "zstd", "version": 99}), "newer"),
    (lambda h: h["segments"][0].update(codec={"id": "zstd", "nope": 1}), "invalid config"),
    (lambda h: h["segments"][0].update(table_crc32=0), "checksum"),
    (lambda h: h.update(segments=[]), "segments must be"),
    (lambda h: h.update(pipeline=[{"id": "int8", "version": 1, "granularity": "channel", "axis": 0}]), "pipeline"),
    (lambda h: h.update(pipeline=[{"id": "byteplane", "version": 7}]), "newer"),
    (lambda h: h.update(producer=[]), "producer"),
])
def test_rule5_6_schema(mutate, match):
    n, header, payload = _split(_blob())
    mutate(header)
    with pytest.raises(cc.FormatError, match=match):
        cc.CompressedArray.from_bytes(_rebuild(header, payload))


@pytest.mark.parametrize("shape, ok", [([2**63 - 1, 0], False), ([0, 2**62], False), ([2**31, 0, 2**30], False),
                                       ([2**60, 0], True), ([0, 2**61 - 1, 0], True)])
def test_rule5_an_empty_array_is_bounded_by_its_nonzero_dimensions(shape, ok):
    # NumPy refuses any shape whose non-zero dimensions hold 2**63 bytes or more, empty or not: [2**63 - 1, 0]
    # float32 passed the parser (0 bytes) and decoding raised NumPy's "array is too big"
    n, header, payload = _split(_blob(np.empty((5, 0), np.float32)))
    header["array"]["shape"] = header["segments"][0]["shape"] = shape
    blob = _rebuild(header, payload)
    if ok:
        y = cc.decompress(blob)
        assert y.shape == tuple(shape) and y.dtype == np.float32
    else:
        with pytest.raises(cc.FormatError, match="more than any machine holds"):
            cc.CompressedArray.from_bytes(blob)


def test_the_writer_refuses_an_empty_array_no_reader_could_make():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"shape \(4611686018427387904, 0\).* 2\*\*63 bytes or more"):
        cc.compress(torch.empty((2**62, 0)))
    assert cc.decompress(cc.compress(torch.empty((2**60, 0)))).shape == (2**60, 0)

def _f32():
    return np.linspace(-1, 1, 256, dtype=np.float32).reshape(4, 64)


@pytest.mark.parametrize("blob, part, order", [
    (lambda: _blob(_f32()), "array", "|"),  # plain F32
    (lambda: _blob(_f32()), 0, "|"),
    (lambda: _blob(_f32().astype(np.float16), codec="zstd", filters=["byteplane"]), "array", "|"),
    (lambda: _blob(_f32(), quantize="int8"), "array", "|"),
    (lambda: _blob(_f32(), quantize="int8"), 1, "|"),  # the F32 scales
    (lambda: _blob(), "array", "<"),  # U8
    (lambda: _blob(), 0, ">"),
    (lambda: _blob(_f32(), quantize="int8"), 0, "<"),  # the I8 codes
    (lambda: _blob(np.arange(8) % 2 == 0), "array", "<"),  # BOOL
])
def test_rule5_byteorder_is_bar_exactly_for_one_byte_types(blob, part, order):
    # '|' on a multi-byte type decoded in the host's order, so a file read differently on a big-endian host
    n, header, payload = _split(blob())
    spec = header["array"] if part == "array" else header["segments"][part]
    spec["byteorder"] = order
    with pytest.raises(cc.FormatError, match="byteorder"):
        cc.CompressedArray.from_bytes(_rebuild(header, payload))

@pytest.mark.parametrize("version", [None, 0, -1, 1.0, "1", True])
@pytest.mark.parametrize("where", ["codec", "filter"])
def test_rule6_codec_and_filter_versions_are_ints_from_1(where, version):
    # every writer stores the version; a config without one, or with 0 or a negative one, was taken as version 1
    n, header, payload = _split(_blob(_f32(), codec="zstd", filters=["byteplane"]))
    cfg = header["segments"][0]["codec"] if where == "codec" else header["pipeline"][0]
    assert cfg["version"] == 1
    if version is None:
        del cfg["version"]
    else:
        cfg["version"] = version
    with pytest.raises(cc.FormatError, match="version"):
        cc.CompressedArray.from_bytes(_rebuild(header, payload))

def test_configs_given_by_hand_may_omit_the_version_but_not_give_one_below_1():
    assert cc.get_codec({"id": "zstd"}).get_config()["version"] == 1  # numcodecs-style configs
    assert cc.get_filter({"id": "byteplane"}).get_config()["version"] == 1
    with pytest.raises(ValueError, match=r"codec 'zstd': version must be an int from 1, got 0"):
        cc.get_codec({"id": "zstd", "version": 0})
    with pytest.raises(ValueError, match=r"filter 'byteplane': version must be an int from 1, got -1"):
        cc.get_filter({"id": "byteplane", "version": -1})

def test_rule6_unknown_codec_and_filter():
    # a FormatError (what code guarding untrusted files catches) and an UnknownCodecError alike
    n, header, payload = _split(_blob())
    header["segments"][0]["codec"] = {"id": "brotli", "version": 1}
    with pytest.raises(cc.UnknownCodecError, match="unknown codec 'brotli'; registered: ans, bitcomp") as info:
        cc.CompressedArray.from_bytes(_rebuild(header, payload))
    assert isinstance(info.value, cc.FormatError) and info.value.codec_id == "brotli"
    n, header, payload = _split(_blob())
    header["pipeline"] = [{"id": "shuffle9"}]
    with pytest.raises(cc.FormatError, match="unknown filter") as info:
        cc.CompressedArray.from_bytes(_rebuild(header, payload))
    assert isinstance(info.value, cc.UnknownCodecError) and info.value.codec_id == "shuffle9"
    with pytest.raises(cc.UnknownCodecError) as info:  # a bad argument is no bad file
        cc.compress(np.arange(4), codec="brotli")
    assert not isinstance(info.value, cc.FormatError)


def test_rule6_another_platforms_long_double_is_a_format_error_too():
    n, header, payload = _split(_blob(np.arange(4, dtype=np.longdouble)))
    here = header["array"]["dtype"]
    other = "FLD128M112" if here != "FLD128M112" else "FLD128M63"  # aarch64's IEEE quad, or x86's 80-bit
    header["array"]["dtype"] = header["segments"][0]["dtype"] = other
    c = cc.CompressedArray.from_bytes(_rebuild(header, payload))  # parses: its header can be inspected
    with pytest.raises(cc.FormatError, match=f"this platform's long double is {here}") as info:
        cc.decompress(c)
    assert isinstance(info.value, cc.UnsupportedDtypeError) and isinstance(info.value, TypeError)


def test_rule5_trailing_and_truncated_payload():
    blob = _blob()
    with pytest.raises(cc.FormatError, match="trailing"):
        cc.CompressedArray.from_bytes(blob + bytes(16))
    with pytest.raises(cc.FormatError, match="truncated|overruns"):
        cc.CompressedArray.from_bytes(blob[:-16])


def test_rule7_lying_chunk_table():
    x = np.zeros(100_000, np.uint8)
    n, header, payload = _split(cc.compress(x, codec="zstd", chunk_nbytes=65536).to_bytes())
    seg = header["segments"][0]
    k = seg["n_chunks"]
    table = bytearray(payload[: -(-9 * k // 16) * 16])

    def with_table(t):
        h = json.loads(json.dumps(header))
        h["segments"][0]["table_crc32"] = zlib.crc32(bytes(t))
        return _rebuild(h, bytes(t) + payload[len(t) :])

    bad = bytearray(table)
    struct.pack_into("<I", bad, 0, 70000)  # claims more compressed bytes than the raw chunk
    with pytest.raises(cc.FormatError, match="not smaller"):
        cc.CompressedArray.from_bytes(with_table(bad))
    bad = bytearray(table)
    bad[8 * k] = 7
    with pytest.raises(cc.FormatError, match="unknown chunk flag"):
        cc.CompressedArray.from_bytes(with_table(bad))
    bad = bytearray(table)
    bad[8 * k] = 1  # "stored" but the size is the compressed one
    with pytest.raises(cc.FormatError, match="stored chunk"):
        cc.CompressedArray.from_bytes(with_table(bad))
    bad = bytearray(table)
    struct.pack_into("<I", bad, 0, struct.unpack_from("<I", bad, 0)[0] - 16)  # moves every later chunk
    with pytest.raises(cc.FormatError, match="need"):
        cc.CompressedArray.from_bytes(with_table(bad))


def test_rule8_flipped_payload_bit_is_detected_before_the_chunk_is_used():
    blob = bytearray(cc.compress(np.arange(64, dtype=np.uint8), codec="raw").to_bytes())
    blob[-9] ^= 1  # inside the stored chunk (the last 8 bytes are padding)
    # header and tables are fine, so parsing succeeds; the chunk CRC is checked at first use
    c = cc.CompressedArray.from_bytes(bytes(blob))
    assert not c.verified
    for use in (cc.decompress, lambda c: c.to_bytes(), lambda c: c.verify(), lambda c: c.host_payload(),
                lambda c: c.write_to(io.BytesIO()), lambda c: pickle.dumps(c)):
        with pytest.raises(cc.ChecksumError, match="segment 'data', chunk 0"):
            use(c)
        assert not c.verified
    with pytest.raises(cc.ChecksumError, match="segment 'data', chunk 0"):
        cc.decompress(bytes(blob))
    # verify=False skips the chunk CRCs (the caller vouches for the bytes) but not the structure
    assert cc.CompressedArray.from_bytes(bytes(blob), verify=False).verified


@pytest.mark.parametrize("codec", ["zstd", "raw", "auto", "lz4", "deflate"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.int32])
def test_rule8_every_corrupt_chunk_raises_before_its_decoder_sees_it(codec, dtype, monkeypatch):
    x = (np.arange(40_000) % 251).astype(dtype)
    good = cc.compress(x, codec=codec, chunk_nbytes=4096).to_bytes()
    c = cc.CompressedArray.from_bytes(good)
    assert not c.verified
    np.testing.assert_array_equal(cc.decompress(c), x)
    assert c.verified  # the decode checked every chunk on its way
    seen = []
    for seg in c.segments:
        for i in range(0, seg.n_chunks, max(1, seg.n_chunks // 3)):
            blob = bytearray(good)
            o = c.nbytes - c._header.payload_nbytes + int(seg.chunk_offsets[i])
            blob[o] ^= 0x10
            bad = cc.CompressedArray.from_bytes(bytes(blob))
            with pytest.raises(cc.ChecksumError, match=f"segment '{seg.name}', chunk {i}\\b"):
                cc.decompress(bad)
            with pytest.raises(cc.ChecksumError, match=f"segment '{seg.name}', chunk {i}\\b"):
                bad.verify()
            seen.append((seg.name, i))
    assert seen


def test_codec_raw_cannot_claim_encoded_chunks():
    n, header, payload = _split(cc.compress(np.zeros(1000, np.uint8), codec="zstd").to_bytes())
    header["segments"][0]["codec"] = {"id": "raw", "version": 1}
    with pytest.raises(cc.FormatError, match="encoded chunk"):
        cc.CompressedArray.from_bytes(_rebuild(header, payload))


# -- fuzz -------------------------------------------------------------------------------------------------------

_FUZZ_SOURCES = [
    cc.compress(np.arange(300, dtype=np.int32), codec="zstd", chunk_nbytes=256).to_bytes(),
    cc.compress(np.linspace(0, 1, 500).astype(np.float16), codec="auto").to_bytes(),
    cc.compress(np.linspace(-1, 1, 512).astype(np.float32).reshape(8, 64), quantize="int8", codec="lz4").to_bytes(),
    cc.compress(np.arange(100, dtype=np.uint8), codec="snappy", chunk_nbytes=32).to_bytes(),
    cc.compress(np.arange(100, dtype=np.uint16), codec="deflate", chunk_nbytes=64).to_bytes(),
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_or_truncated_blob_raises_only_our_errors(data):
    src = data.draw(st.sampled_from(_FUZZ_SOURCES))
    blob = bytearray(src)
    for _ in range(data.draw(st.integers(0, 4))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    blob = bytes(blob[:cut])
    try:
        c = cc.CompressedArray.from_bytes(blob)
        y = cc.decompress(c)
    except cc.CupycodecError:
        return
    # Anything that parses and decodes must be the original data (a mutation that only touched padding).
    original = cc.decompress(src)
    assert np.asarray(y).tobytes() == np.asarray(original).tobytes()


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_header_json_fuzz(data):
    """A valid prelude and CRC around altered JSON: our errors only, or (unknown keys) the original data."""
    src = _FUZZ_SOURCES[0]
    n, header, payload = _split(src)
    path = data.draw(st.sampled_from([("array",), ("segments", 0), ("segments", 0, "codec"), ("pipeline",), ()]))
    target = header
    for p in path:
        target = target[p]
    value = data.draw(st.recursive(st.none() | st.booleans() | st.integers(-5, 2**64) | st.text(max_size=5),
                                   lambda s: st.lists(s, max_size=3) | st.dictionaries(st.text(max_size=4), s,
                                                                                       max_size=3), max_leaves=6))
    if isinstance(target, dict):
        target[data.draw(st.sampled_from([*sorted(target), "extra"]))] = value
    else:
        target.append(value)
    try:
        y = cc.decompress(_rebuild(header, payload))
    except cc.CupycodecError:
        return
    assert np.asarray(y).tobytes() == cc.decompress(src).tobytes()


def test_prelude_reserved_bytes_must_be_zero_and_chunk_padding_is_ignored():
    from fuzzing import chunks

    x = np.arange(1001, dtype=np.int32)  # 4004 bytes: the chunk ends 12 bytes short of a multiple of 16
    blob = bytearray(cc.compress(x, codec="raw").to_bytes())
    for i in range(20, 24):  # no CRC covers them: the reader checks them
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(cc.FormatError, match="bytes 20-23 must be zero"):
            cc.CompressedArray.from_bytes(bytes(bad))
    last = chunks(bytes(blob))[-1]
    assert (last.stop - last.start) % 16  # the chunk is followed by padding
    padded = bytearray(blob)
    padded[last.stop] ^= 0xFF  # FORMAT.md: readers ignore padding after a chunk; no decoded value changes
    assert np.array_equal(cc.decompress(bytes(padded)), x)


def test_crafted_int8_scales_are_a_format_error():
    from fuzzing import chunks, recompute_crcs

    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    blob = bytearray(cc.compress(w, quantize="int8", codec="raw").to_bytes())
    scale = next(c for c in chunks(bytes(blob)) if c.segment == "scale")
    for value in (3e38, np.inf, np.nan, 0.0, 1e-40):
        crafted = bytearray(blob)
        crafted[scale.start : scale.start + 4] = np.float32(value).tobytes()
        crafted = recompute_crcs(bytes(crafted))  # what an attacker does: the CRCs cannot tell
        with pytest.raises(cc.FormatError, match="segment 'scale'"):
            cc.decompress(crafted)
        with pytest.raises(cc.FormatError, match="segment 'scale'"):  # handed out as they were, before
            cc.decompress(crafted, dequantize=False)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_header_without_payload_keeps_no_payload_alive(quantize):
    # a parsed chunk table views the payload it came from; a template kept for a model's lifetime (the torch layers
    # keep one per compressed layer) must not keep the host copy of a checkpoint's bytes with it
    x = np.random.default_rng(0).standard_normal((64, 512)).astype(np.float32)
    blob = np.frombuffer(bytearray(cc.compress(x, codec="zstd", quantize=quantize, chunk_nbytes=4096).to_bytes()),
                         np.uint8)
    c = cc.CompressedArray.from_bytes(blob)
    tables = [(s.table.comp_nbytes, s.table.crc32, s.table.flags) for s in c.segments]
    assert any(np.shares_memory(a, blob) for t in tables for a in t)  # what makes the copy necessary
    t = c.without_payload()
    assert not any(np.shares_memory(a, blob) for s in t.segments
                   for a in (s.table.comp_nbytes, s.table.crc32, s.table.flags))
    assert t._header.encode() == c._header.encode() and t.trusted == c.trusted
    y = cc.decompress(t.with_payload(blob[len(c._prefix) :]))  # and it still takes its payload back
    assert y.shape == x.shape
    if quantize is None:
        np.testing.assert_array_equal(y, x)


def test_new_payload_bytes_are_checked_before_they_are_decoded():
    """with_payload() once passed on its container's verified state: bytes given to an untrusted container whose
    own CRCs had been checked decoded unchecked, to wrong values. New bytes are checked now, unless the caller
    vouches for them (a copy it made of a verified payload)."""
    x = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    blob = cc.compress(x, codec="zstd").to_bytes()
    c = cc.CompressedArray.from_bytes(blob).verify()
    payload = np.frombuffer(blob, np.uint8)[len(c.header_bytes()) :].copy()
    bad = payload.copy()
    bad[5000] ^= 0xFF
    for view in (c.with_payload(bad), c.without_payload().with_payload(bad)):
        assert not view.verified
        with pytest.raises(cc.ChecksumError, match="segment 'data', chunk 0"):
            cc.decompress(view)
    good = c.with_payload(payload)
    assert not good.verified and np.array_equal(cc.decompress(good), x) and good.verified
    assert c.with_payload(payload, verified=True).verified  # vouched for: no second pass over the bytes


def test_metadata_a_reader_would_refuse_is_never_written():
    """metadata nested 70 deep was written (and saved); from_bytes and load then refused it (64 levels)."""
    deep: dict = {}
    node = deep
    for _ in range(70):
        node["a"] = {}
        node = node["a"]
    with pytest.raises(ValueError, match="metadata is nested too deeply"):
        cc.compress(np.arange(4), metadata=deep)
    ok: dict = {}
    node = ok
    for _ in range(60):
        node["a"] = {}
        node = node["a"]
    c = cc.compress(np.arange(4), metadata=ok)
    assert cc.CompressedArray.from_bytes(c.to_bytes()).metadata == c.metadata


@pytest.mark.parametrize("levels", [65, 600, 5000])
def test_metadata_nested_past_the_recursion_limit_gets_the_librarys_error(levels):
    # 600 levels raised a RecursionError (freezing the metadata recursed before the depth was checked)
    deep: dict = {}
    node = deep
    for _ in range(levels):
        node["a"] = [{}]
        node = node["a"][0]
    with pytest.raises(ValueError, match="metadata is nested too deeply.* at most 64 levels"):
        cc.compress(np.arange(4), metadata=deep)
    with pytest.raises(ValueError, match="metadata is nested too deeply.* at most 64 levels"):
        cc.compress_many([np.arange(4), np.arange(5)], metadata=[{}, deep])


def test_an_unknown_filter_option_is_named_as_a_codecs_is():
    # Byteplane.__init__() got an unexpected keyword argument 'futur': named no filter and no valid option
    with pytest.raises(TypeError, match=r"filter 'byteplane' got unknown option\(s\) futur; valid options: rotate"):
        cc.compress(np.ones(8, np.float32), filters=[{"id": "byteplane", "futur": 1}])
