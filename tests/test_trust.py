"""The trust model: bytes from outside are untrusted unless vouched for, and only hardened decoders see them."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zlib

import numpy as np
import pytest
from fuzzing import mutate, recompute_crcs

import cupycodec as cc
from cupycodec.codecs import _nvcomp_host

KEY = bytes(range(32))
X = (np.arange(50_000) % 251).astype(np.int32)


def _blob(codec="zstd", **kw) -> bytes:
    return cc.compress(X, codec=codec, **kw).to_bytes()


def _edit_header(blob: bytes, edit) -> bytes:
    """Change the header JSON (as an attacker can), then fix every CRC."""
    n = struct.unpack_from("<Q", blob, 8)[0]
    header = json.loads(blob[24 : 24 + n])
    edit(header)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    prelude = struct.pack("<4sHHQI4x", b"CPCC", 1, 0, len(text), zlib.crc32(text))
    return recompute_crcs(prelude + text + blob[24 + n :])


def test_what_is_trusted():
    c = cc.compress(X, codec="zstd")
    assert c.trusted and not c.signed  # made by this process
    blob = c.to_bytes()
    assert not cc.CompressedArray.from_bytes(blob).trusted
    assert not cc.CompressedArray.from_bytes(blob, verify=False).trusted
    assert cc.CompressedArray.from_bytes(blob, trusted=True).trusted
    assert not cc.CompressedArray.from_bytes(blob).to_host().trusted
    with pytest.raises(TypeError, match="trusted must be a bool"):
        cc.CompressedArray.from_bytes(blob, trusted="yes")


@pytest.mark.parametrize("codec", ["zstd", "deflate", "gzip", "lz4", "snappy", "raw"])
def test_untrusted_standard_codecs_decode_on_the_cpu(codec):
    blob = _blob(codec)
    assert np.array_equal(cc.decompress(blob), X)
    assert np.array_equal(cc.decompress(cc.CompressedArray.from_bytes(blob), device="cpu"), X)


@pytest.mark.skipif(not _nvcomp_host.available(), reason="nvidia-libnvcomp is not installed")
@pytest.mark.parametrize("codec", ["gdeflate", "bitcomp"])
def test_untrusted_nvcomp_host_formats_are_refused(codec):
    blob = _blob(codec, backend="cpu")
    with pytest.raises(cc.UntrustedError, match=f"codec '{codec}'.*trusted=True.*key=") as info:
        cc.decompress(blob)
    assert info.value.codec == codec and isinstance(info.value, ValueError)
    assert np.array_equal(cc.decompress(blob, trusted=True), X)


def test_untrusted_containers_never_reach_nvcomp():
    blob = _blob("zstd")
    with pytest.raises(cc.UntrustedError, match="on the GPU"):
        cc.decompress(blob, backend="nvcomp")
    with pytest.raises(cc.UntrustedError, match="decode plan"):
        cc.decode_plan([cc.CompressedArray.from_bytes(blob)], [np.empty_like(X)])


def test_crafted_chunks_raise_only_library_errors_on_the_cpu():
    rng = np.random.default_rng(0)
    good = _blob("zstd", chunk_nbytes=16384)
    for _ in range(50):
        try:
            y = cc.decompress(mutate(good, rng, int(rng.integers(1, 9))))
        except cc.CupycodecError:
            continue
        assert y.shape == X.shape and y.dtype == X.dtype


def test_a_key_signs_and_authenticates(tmp_path):
    c = cc.compress(X, codec="zstd", metadata={"layer": 3})
    path = tmp_path / "w.cc"
    cc.save(path, c, key=KEY)
    assert cc.load(path, key=KEY).trusted and cc.load(path, key=KEY).signed
    assert not cc.load(path).trusted  # without the key it is just bytes from outside
    assert np.array_equal(cc.decompress(cc.load(path, key=KEY)), X)
    blob = c.to_bytes(key=KEY)
    assert blob == path.read_bytes()
    assert cc.CompressedArray.from_bytes(blob, key=KEY) == cc.CompressedArray.from_bytes(blob)
    with pytest.raises(cc.AuthenticationError, match="MAC mismatch"):
        cc.load(path, key=bytes(32))
    with pytest.raises(cc.AuthenticationError, match="carries no MAC"):
        cc.CompressedArray.from_bytes(c.to_bytes(), key=KEY)


def test_a_forged_container_fails_authentication():
    blob = cc.compress(X, codec="zstd", metadata={"layer": 3}).to_bytes(key=KEY)
    rng = np.random.default_rng(1)
    crafted = mutate(blob, rng, 4)  # payload changed, every CRC recomputed: CRCs cannot tell
    cc.CompressedArray.from_bytes(crafted)  # ... and the container parses
    with pytest.raises(cc.AuthenticationError, match="MAC mismatch"):
        cc.CompressedArray.from_bytes(crafted, key=KEY)

    def relabel(header):
        header["metadata"]["layer"] = 4

    with pytest.raises(cc.AuthenticationError, match="MAC mismatch"):
        cc.CompressedArray.from_bytes(_edit_header(blob, relabel), key=KEY)

    def strip(header):
        del header["auth"]

    with pytest.raises(cc.AuthenticationError, match="carries no MAC"):
        cc.CompressedArray.from_bytes(_edit_header(blob, strip), key=KEY)

    def reorder(header):  # the same header spelled differently still authenticates: the MAC covers meaning
        header["producer"] = dict(reversed(list(header["producer"].items())))

    assert cc.CompressedArray.from_bytes(_edit_header(blob, reorder), key=KEY).trusted


def test_a_producer_with_nested_values_signs_saves_and_authenticates(tmp_path):
    # producer is informational and may carry extra keys (FORMAT.md); nested ones made every keyed operation fail
    # ("metadata must be JSON-serializable ... mappingproxy"): the header copied producer one level deep only
    def extra(header):
        header["producer"]["build"] = {"host": {"name": "n1"}, "flags": [1, {"a": 2}]}

    blob = _edit_header(_blob("zstd"), extra)
    c = cc.CompressedArray.from_bytes(blob)
    assert c.header["producer"]["build"]["host"]["name"] == "n1"
    signed = c.to_bytes(key=KEY)
    back = cc.CompressedArray.from_bytes(signed, key=KEY)
    assert back.trusted and back.header["producer"]["build"]["flags"][1]["a"] == 2
    cc.save(tmp_path / "w.cc", c, key=KEY)
    assert cc.load(tmp_path / "w.cc", key=KEY).trusted
    assert bytes(c.to_bytes()) == bytes(blob)

def test_bad_keys_and_mac_fields():
    c = cc.compress(X, codec="raw")
    with pytest.raises(TypeError, match="key must be bytes"):
        c.to_bytes(key="secret")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        c.to_bytes(key=b"short")
    blob = c.to_bytes(key=KEY)

    def bad(header):
        header["auth"]["mac"] = "zz" * 32

    with pytest.raises(cc.FormatError, match="64 lowercase hex"):
        cc.CompressedArray.from_bytes(_edit_header(blob, bad))


def _reference_mac(blob: bytes, secret: bytes, alg: str) -> str:
    """The MAC of a signed container as docs/FORMAT.md ("Authentication") defines it, computed from the file's own
    bytes with blake3 and hmac directly (J: the header without ``auth``, as writers serialize it)."""
    import hashlib
    import hmac

    import blake3

    n = struct.unpack_from("<Q", blob, 8)[0]
    header = json.loads(blob[24 : 24 + n])
    del header["auth"]
    j = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    msg = b"cupycodec container v1\0" + len(j).to_bytes(8, "little") + j + blob[24 + n :]
    if alg == "BLAKE3":
        k = blake3.blake3(secret, derive_key_context="cupycodec 2026-12-03 container MAC key v1").digest()
        return blake3.blake3(msg, key=k).hexdigest()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


@pytest.mark.parametrize("nbytes", [0, 4000, (16 << 20) + 16])  # over 16 MiB: hashed on several threads
def test_writers_sign_with_keyed_blake3_as_the_format_says(nbytes):
    x = np.random.default_rng(nbytes).integers(0, 255, nbytes, dtype=np.uint8)
    blob = cc.compress(x, codec="zstd").to_bytes(key=KEY)
    auth = json.loads(blob[24 : 24 + struct.unpack_from("<Q", blob, 8)[0]])["auth"]
    assert auth == {"alg": "BLAKE3", "mac": _reference_mac(blob, KEY, "BLAKE3")}
    assert cc.CompressedArray.from_bytes(blob, key=KEY).trusted


def test_containers_signed_with_hmac_sha256_still_authenticate():
    # written by the HMAC-SHA256 writer (before 2026-12-03) with KEY, committed, never regenerated
    path = os.path.join(os.path.dirname(__file__), "fixtures", "v1", "cpu_zstd_f32_weights_signed_hmac_sha256.cc")
    with open(path, "rb") as f:
        blob = f.read()
    auth = json.loads(blob[24 : 24 + struct.unpack_from("<Q", blob, 8)[0]])["auth"]
    assert auth == {"alg": "HMAC-SHA256", "mac": _reference_mac(blob, KEY, "HMAC-SHA256")}
    c = cc.load(path, key=KEY)
    assert c.trusted and c.signed
    assert cc.decompress(c).tobytes() == np.load(path[:-3] + ".npy").tobytes()
    assert c.to_bytes() == blob  # kept as written; signing again writes the current algorithm
    again = c.to_bytes(key=KEY)
    assert json.loads(again[24 : 24 + struct.unpack_from("<Q", again, 8)[0]])["auth"]["alg"] == "BLAKE3"
    with pytest.raises(cc.AuthenticationError, match="MAC mismatch"):
        cc.load(path, key=bytes(32))
    crafted = mutate(blob, np.random.default_rng(3), 4)
    with pytest.raises(cc.AuthenticationError, match="MAC mismatch"):
        cc.CompressedArray.from_bytes(crafted, key=KEY)


@pytest.mark.parametrize("to", ["HMAC-SHA256", "BLAKE3"])
def test_a_mac_relabelled_with_another_algorithm_fails(to):
    blob = cc.compress(X, codec="zstd").to_bytes(key=KEY)
    frm = "BLAKE3" if to == "HMAC-SHA256" else "HMAC-SHA256"
    if frm == "HMAC-SHA256":  # a container the old writer signed
        c = cc.CompressedArray.from_bytes(blob)
        blob = c._header.signed(KEY, c.host_payload(), "HMAC-SHA256").encode() + bytes(c.host_payload())
        assert cc.CompressedArray.from_bytes(blob, key=KEY).trusted

    def relabel(header):
        assert header["auth"]["alg"] == frm
        header["auth"]["alg"] = to

    with pytest.raises(cc.AuthenticationError, match="MAC mismatch"):
        cc.CompressedArray.from_bytes(_edit_header(blob, relabel), key=KEY)


def test_an_algorithm_this_version_does_not_know_is_ignored_without_a_key_and_refused_with_one():
    blob = cc.compress(X, codec="zstd").to_bytes(key=KEY)

    def future(header):  # a later writer's MAC, of another length
        header["auth"] = {"alg": "BLAKE3-XOF-512", "mac": "ab" * 64}

    later = _edit_header(blob, future)
    c = cc.CompressedArray.from_bytes(later)  # untrusted, as any container read without a key
    assert c.signed and not c.trusted
    assert np.array_equal(cc.decompress(c), X)
    assert c.to_bytes() == later
    with pytest.raises(cc.AuthenticationError, match="'BLAKE3-XOF-512'.*upgrade cupycodec"):
        cc.CompressedArray.from_bytes(later, key=KEY)
    for auth in ({"alg": "", "mac": "ab" * 32}, {"alg": 7, "mac": "ab" * 32}, {"alg": "BLAKE3", "mac": "ab" * 16},
                 {"alg": "X" * 65, "mac": "ab"}, {"alg": "X", "mac": "AB"}, {"alg": "X", "mac": "a" * 257}, []):

        def bad(header, auth=auth):
            header["auth"] = auth

        with pytest.raises(cc.FormatError, match="header 'auth"):
            cc.CompressedArray.from_bytes(_edit_header(blob, bad))


def test_pickling_keeps_trust():
    blob = _blob("zstd")
    for c in (cc.CompressedArray.from_bytes(blob), cc.CompressedArray.from_bytes(blob, trusted=True),
              cc.compress(X)):
        again = pickle.loads(pickle.dumps(c))
        assert again.trusted == c.trusted and again == c
        assert bool(again._cache.get("external")) == bool(c._cache.get("external"))


def test_parser_bugs_are_not_disguised_as_bad_files(monkeypatch):
    # reader rules raise FormatError themselves; anything else escaping the parser is a bug and must show as one
    from cupycodec import container

    blob = _blob("zstd")

    def broken(obj, where):
        raise KeyError("a bug in the parser")

    monkeypatch.setattr(container, "_spec", broken)
    with pytest.raises(KeyError, match="a bug in the parser"):
        cc.CompressedArray.from_bytes(blob)


def test_deeply_nested_metadata_is_a_format_error():
    deep: dict = {}
    node = deep
    for _ in range(100):
        node["a"] = {}
        node = node["a"]

    def nest(header):
        header["metadata"] = deep

    with pytest.raises(cc.FormatError, match="nested deeper"):
        cc.CompressedArray.from_bytes(_edit_header(_blob("raw"), nest))


@pytest.mark.parametrize("extra_brackets", [0, 200])
def test_nesting_depth_limit_is_exact_whatever_the_bracket_count(extra_brackets):
    # the walk is skipped when the header has too few brackets to nest past the limit; brackets inside strings
    # only make it walk, and the limit itself does not move
    from cupycodec.container import _MAX_JSON_DEPTH

    def nested(levels):  # metadata at depth 2 (the header is 1): a chain of `levels` objects ending in a scalar
        def edit(header):
            node = header["metadata"] = {"pad": "{[" * extra_brackets}
            for _ in range(levels - 1):
                node["a"] = {}
                node = node["a"]
            node["leaf"] = 1
        return edit

    deepest_ok = _MAX_JSON_DEPTH - 2  # the header, then the metadata chain, then the leaf scalar
    c = cc.CompressedArray.from_bytes(_edit_header(_blob("raw"), nested(deepest_ok)))
    assert c.metadata["pad"] == "{[" * extra_brackets
    with pytest.raises(cc.FormatError, match="nested deeper"):
        cc.CompressedArray.from_bytes(_edit_header(_blob("raw"), nested(deepest_ok + 1)))


def test_load_has_a_key_argument(tmp_path):
    path = os.path.join(tmp_path, "x.cc")
    cc.save(path, cc.compress(X, codec="lz4"), key=KEY)
    assert cc.load(path, key=KEY, mmap=False).trusted


def test_remembered_codec_configs_keep_their_value_types():
    # parsed codecs are remembered per config; a value of another type (True for 1) is another config, and its own
    # error still comes
    blob = _blob("zstd", level=1)
    assert cc.CompressedArray.from_bytes(blob).segments[0].codec.level == 1

    def boolean(header):
        header["segments"][0]["codec"]["level"] = True

    with pytest.raises(cc.FormatError, match="invalid config"):
        cc.CompressedArray.from_bytes(_edit_header(blob, boolean))
    assert cc.CompressedArray.from_bytes(blob).segments[0].codec.level == 1
