"""The fuzzing tools (tests/fuzzing.py) and crafted containers against the CPU decoders.

A crafted container has edited payload bytes and recomputed CRCs, so it passes ``from_bytes(verify=True)``: what
an attacker sends. The CPU decoders (zstd, deflate, gzip, lz4, snappy, raw) must turn any of them into our errors or
an array of the right shape, never a crash or a foreign exception. gdeflate and bitcomp are not decoded here: their
CPU decoders are nvCOMP's host C++ code, which may throw through ctypes and abort the process, which is why untrusted
containers of those codecs are refused instead.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import struct
import zlib

import ml_dtypes
import numpy as np
import pytest
from fuzzing import chunks, mutate, recompute_crcs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cupycodec as cc

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "v1")
CPU_CODECS = ["zstd", "deflate", "gzip", "lz4", "snappy", "raw"]


def _host_codec_usable(codec: str) -> bool:
    return cc.get_codec(codec).cpu_usable()


def int_data(n: int, seed: int = 0) -> np.ndarray:
    """Compressible int32 data (a ramp modulo 977 plus a little noise): every codec encodes its chunks."""
    rng = np.random.default_rng(seed)
    return ((np.arange(n) % 977) + rng.integers(0, 4, n)).astype(np.int32)


def bf16_weights(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.02 * rng.standard_t(5, n)).astype(np.float32).astype(ml_dtypes.bfloat16)


def _payload_start(blob: bytes) -> int:
    return 24 + struct.unpack_from("<Q", blob, 8)[0]


def _chunk_diffs(a: bytes, b: bytes) -> list[int]:
    """Positions (relative to the payload) where two containers' chunk bytes differ (tables are skipped)."""
    pa, pb = _payload_start(a), _payload_start(b)
    assert len(a) - pa == len(b) - pb, "the payload size changed"
    ca, cb = chunks(a), chunks(b)
    assert [(c.start - pa, c.stop - pa, c.flag) for c in ca] == [(c.start - pb, c.stop - pb, c.flag) for c in cb]
    diffs = []
    for c in ca:
        lo, hi = c.start - pa, c.stop - pa
        x = np.frombuffer(a, np.uint8, hi - lo, pa + lo)
        y = np.frombuffer(b, np.uint8, hi - lo, pb + lo)
        diffs.extend((lo + np.flatnonzero(x != y)).tolist())
    return diffs


# -- recompute_crcs -----------------------------------------------------------------------------------------------

def _cpu_sources() -> dict[str, bytes]:
    x = int_data(20_000)
    w = bf16_weights(12_000)
    out = {}
    for codec in CPU_CODECS:
        out[f"{codec}-i32"] = cc.compress(x, codec=codec, chunk_nbytes=4096).to_bytes()
        out[f"{codec}-byteplane"] = cc.compress(w, codec=codec, filters=["byteplane"], chunk_nbytes=2048).to_bytes()
        out[f"{codec}-int8"] = cc.compress(w.astype(np.float32).reshape(60, 200), codec=codec, quantize="int8",
                                           chunk_nbytes=1024).to_bytes()
    out["zstd-unicode-metadata"] = cc.compress(x[:100], codec="zstd", metadata={
        "名前": "重み", "emoji": "🧪", "nested": {"ü": [1, 2.5, None, True, "\u2028"]}}).to_bytes()
    out["zstd-empty"] = cc.compress(np.zeros((0, 3), np.float32), codec="zstd").to_bytes()
    out["zstd-scalar"] = cc.compress(np.float64(3.5), codec="zstd").to_bytes()
    out["zstd-bigendian"] = cc.compress(x.astype(">i4"), codec="zstd", chunk_nbytes=1024).to_bytes()
    for codec in ("gdeflate", "bitcomp"):  # compressing with nvCOMP's host libraries is safe; decoding is not
        if _host_codec_usable(codec):
            out[f"{codec}-i32"] = cc.compress(x, codec=codec, chunk_nbytes=4096).to_bytes()
    return out


@functools.cache
def cpu_sources() -> dict[str, bytes]:
    return _cpu_sources()


@pytest.mark.parametrize("name", sorted(_cpu_sources()))
def test_recompute_crcs_leaves_a_valid_container_unchanged(name):
    blob = cpu_sources()[name]
    assert recompute_crcs(blob) == blob


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(FIXTURES, "*.cc"))), ids=os.path.basename)
def test_recompute_crcs_leaves_committed_fixtures_unchanged(path):
    """The fixtures include GPU-written containers of every nvCOMP codec."""
    with open(path, "rb") as f:
        blob = f.read()
    assert recompute_crcs(blob) == blob


def test_recompute_crcs_makes_an_edited_payload_pass_verification():
    blob = cpu_sources()["zstd-i32"]
    c = next(c for c in chunks(blob) if c.flag == 0)
    edited = bytearray(blob)
    edited[c.start + 3] ^= 0x40
    with pytest.raises(cc.ChecksumError):
        cc.CompressedArray.from_bytes(bytes(edited)).verify()
    crafted = recompute_crcs(bytes(edited))
    assert len(crafted) == len(blob) and crafted[c.start + 3] == edited[c.start + 3]
    cc.CompressedArray.from_bytes(crafted, verify=True).verify()  # every CRC matches again


def _encode(header: dict, pad_to: int) -> bytes:
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    n = -(-(24 + len(text)) // pad_to) * pad_to - 24
    text += b" " * (n - len(text))
    return struct.pack("<4sHHQI4x", b"CPCC", 1, 0, n, zlib.crc32(text)) + text


def _split(blob: bytes) -> tuple[dict, bytes]:
    n = struct.unpack_from("<Q", blob, 8)[0]
    return json.loads(blob[24 : 24 + n]), blob[24 + n :]


def test_recompute_crcs_grows_a_full_header_to_the_next_multiple_of_64():
    """A header whose JSON fills it exactly, with a short wrong table_crc32: the right CRC needs more digits."""
    x = int_data(2000)
    for pad in range(64):
        header, payload = _split(cc.compress(x, codec="zstd", metadata={"p": "x" * pad}).to_bytes())
        header["segments"][0]["table_crc32"] = 7
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if (24 + len(text)) % 64 == 0:
            break
    else:  # pragma: no cover
        pytest.fail("no metadata length filled the header exactly")
    forged = _encode(header, 64) + payload
    n_before = struct.unpack_from("<Q", forged, 8)[0]
    assert n_before == len(text)  # no padding left
    fixed = recompute_crcs(forged)
    n_after = struct.unpack_from("<Q", fixed, 8)[0]
    assert n_after == n_before + 64 and (24 + n_after) % 64 == 0
    c = cc.CompressedArray.from_bytes(fixed, verify=True).verify()
    np.testing.assert_array_equal(cc.decompress(c), x)
    assert recompute_crcs(fixed) == fixed


def test_recompute_crcs_keeps_a_header_padded_to_a_multiple_of_8():
    """Readers require only N % 8 == 0; a header padded that way keeps its length when the new JSON fits."""
    header, payload = _split(cpu_sources()["zstd-i32"])
    for seg in header["segments"]:
        seg["table_crc32"] = 1_000_000_000 + seg["table_crc32"] % 10  # ten digits, wrong
    blob = _encode(header, 8) + payload
    n = struct.unpack_from("<Q", blob, 8)[0]
    fixed = recompute_crcs(blob)
    assert struct.unpack_from("<Q", fixed, 8)[0] == n
    cc.CompressedArray.from_bytes(fixed, verify=True).verify()


@pytest.mark.parametrize("bad", [b"", b"CPC", b"XXXX" + bytes(60), b"CPCC\x01\x00\x00\x00" + struct.pack("<Q", 999)
                                 + bytes(8)], ids=["empty", "short", "magic", "header-overruns"])
def test_recompute_crcs_rejects_what_is_not_a_container(bad):
    with pytest.raises(ValueError):
        recompute_crcs(bad)


# -- mutate -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["zstd-i32", "lz4-byteplane", "deflate-int8", "zstd-unicode-metadata"])
@pytest.mark.parametrize("n_bytes", [1, 3, 8])
def test_mutate_changes_exactly_n_encoded_bytes_and_passes_verification(name, n_bytes):
    blob = cpu_sources()[name]
    crafted = mutate(blob, np.random.default_rng(n_bytes), n_bytes)
    cc.CompressedArray.from_bytes(crafted, verify=True).verify()
    diffs = _chunk_diffs(blob, crafted)
    assert len(diffs) == n_bytes
    pa = _payload_start(blob)
    encoded = [(c.start - pa, c.stop - pa) for c in chunks(blob) if c.flag == 0]
    assert all(any(lo <= d < hi for lo, hi in encoded) for d in diffs)


def test_mutate_is_deterministic_for_a_seed():
    blob = cpu_sources()["zstd-i32"]
    a = mutate(blob, np.random.default_rng(5), 4)
    assert a == mutate(blob, np.random.default_rng(5), 4) != mutate(blob, np.random.default_rng(6), 4)


def test_mutate_falls_back_to_stored_chunks_when_none_is_encoded():
    blob = cpu_sources()["raw-i32"]
    assert all(c.flag == 1 for c in chunks(blob))
    crafted = mutate(blob, np.random.default_rng(0), 6)
    assert len(_chunk_diffs(blob, crafted)) == 6
    y = cc.decompress(cc.CompressedArray.from_bytes(crafted, verify=True))
    assert np.count_nonzero(y.view(np.uint8) != int_data(20_000).view(np.uint8)) == 6


def test_mutate_where_any_reaches_stored_chunks_too():
    blob = cpu_sources()["zstd-byteplane"]  # the mantissa planes of bf16 weights do not compress: stored
    pa = _payload_start(blob)
    stored = [(c.start - pa, c.stop - pa) for c in chunks(blob) if c.flag == 1]
    assert stored
    hits = set()
    for seed in range(20):
        for d in _chunk_diffs(blob, mutate(blob, np.random.default_rng(seed), 8, where="any")):
            hits.add(any(lo <= d < hi for lo, hi in stored))
    assert hits == {True, False}


def test_mutate_refuses_impossible_requests():
    blob = cc.compress(np.arange(4, dtype=np.uint8), codec="raw").to_bytes()
    with pytest.raises(ValueError, match="cannot change 5 bytes"):
        mutate(blob, np.random.default_rng(0), 5)
    with pytest.raises(ValueError, match="where"):
        mutate(blob, np.random.default_rng(0), 1, where="header")
    assert mutate(blob, np.random.default_rng(0), 0) == blob


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(codec=st.sampled_from(CPU_CODECS), n=st.integers(1, 5000), chunk_kib=st.sampled_from([1, 2, 4, 64]),
       n_bytes=st.integers(1, 8), seed=st.integers(0, 2**32 - 1), bf16=st.booleans())
def test_mutate_properties(codec, n, chunk_kib, n_bytes, seed, bf16):
    x = bf16_weights(n, seed % 97) if bf16 else int_data(n, seed % 97)
    blob = cc.compress(x, codec=codec, chunk_nbytes=chunk_kib * 1024).to_bytes()
    assert recompute_crcs(blob) == blob
    available = sum(c.stop - c.start for c in chunks(blob))
    n_bytes = min(n_bytes, available)
    crafted = mutate(blob, np.random.default_rng(seed), n_bytes)
    cc.CompressedArray.from_bytes(crafted, verify=True).verify()
    assert len(_chunk_diffs(blob, crafted)) == n_bytes


# -- crafted containers against the CPU decoders ------------------------------------------------------------------

@functools.cache
def decode_sources(codec: str, scale: int = 1) -> tuple[tuple[bytes, np.ndarray], ...]:
    """Containers whose chunks are mostly encoded, and their decoded arrays (plain, byte planes, INT8)."""
    x = int_data(4096 * scale, seed=scale)
    w = bf16_weights(4096 * scale, seed=scale)
    blobs = [
        cc.compress(x, codec=codec, chunk_nbytes=1024 * scale).to_bytes(),
        cc.compress(w, codec=codec, filters=["byteplane"], chunk_nbytes=512 * scale).to_bytes(),
        cc.compress(w.astype(np.float32).reshape(32 * scale, 128), codec=codec, quantize="int8",
                    chunk_nbytes=512 * scale).to_bytes(),
    ]
    return tuple((b, cc.decompress(b)) for b in blobs)


def _decode_crafted_on_cpu(codec: str, which: int, seed: int, scale: int = 1) -> None:
    blob, original = decode_sources(codec, scale)[which]
    rng = np.random.default_rng(seed)
    crafted = mutate(blob, rng, int(rng.integers(1, 9)))
    # Crafted INT8 scales (NaN, Inf, 3e38) are a FormatError too: the reader checks them before dequantizing, so no
    # NumPy overflow warning (an exception under -W error) can escape.
    try:
        y = cc.decompress(crafted)
    except cc.CupycodecError:  # FormatError and friends: the only thing allowed to escape
        return
    assert isinstance(y, np.ndarray) and y.shape == original.shape and y.dtype == original.dtype


_CPU_FUZZ = settings(max_examples=max(200, settings().max_examples), deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("codec", CPU_CODECS)
@_CPU_FUZZ
@given(which=st.integers(0, 2), seed=st.integers(0, 2**32 - 1))
def test_crafted_containers_decode_on_cpu_or_raise_our_errors(codec, which, seed):
    _decode_crafted_on_cpu(codec, which, seed)


@pytest.mark.slow
@pytest.mark.parametrize("codec", CPU_CODECS)
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, 2), seed=st.integers(0, 2**32 - 1))
def test_crafted_containers_decode_on_cpu_or_raise_our_errors_thorough(codec, which, seed):
    _decode_crafted_on_cpu(codec, which, seed, scale=16)
