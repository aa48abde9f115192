"""Bad chunks in a Zarr store: errors keep their cupycodec type and name the chunk's key; trust and keys per chunk."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr
from fuzzing import recompute_crcs

import cupycodec as cc
from cupycodec.codecs import _nvcomp_host
from cupycodec.integrations import trust
from cupycodec.integrations.zarr import CupycodecCodec

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "v1")
KEY = bytes(range(32))
X = (np.arange(128 * 96, dtype=np.float32).reshape(128, 96) % 977) / 7


@pytest.fixture(autouse=True)
def _default_trust():
    assert trust.current() == trust.Policy()
    yield
    trust.configure(trusted=False, key=None)


@pytest.fixture
def store(tmp_path):
    z = zarr.create_array(store=str(tmp_path), shape=X.shape, chunks=(32, 48), dtype="float32",
                          serializer=CupycodecCodec(codec="zstd"), compressors=None)
    z[:] = X  # 4 x 2 chunks
    return tmp_path


def _rewrite(path, edit):
    with open(path, "rb") as f:
        blob = bytearray(f.read())
    blob = edit(blob)
    with open(path, "wb") as f:
        f.write(bytes(blob))


def _flip(i):
    def edit(b):
        b[i] ^= 0x10
        return b
    return edit


@pytest.mark.parametrize("batch_size", [1, 64])
def test_a_corrupt_chunk_names_its_key(store, batch_size):
    _rewrite(store / "c" / "2" / "1", _flip(-3))
    with zarr.config.set({"codec_pipeline.batch_size": batch_size}):
        z = zarr.open_array(str(store))
        with pytest.raises(cc.ChecksumError, match=r"^chunk 'file://.*/c/2/1': checksum mismatch in segment") \
                as info:
            z[:]
        assert info.value.chunk_key.endswith("/c/2/1'")
        assert isinstance(info.value, cc.FormatError) and isinstance(info.value, ValueError)
        assert info.value.segment.startswith("data")  # the original error's attributes are kept
        assert isinstance(info.value.__cause__, cc.ChecksumError)
        np.testing.assert_array_equal(z[:64, :], X[:64, :])  # the other chunks still read


def test_a_flipped_header_byte_and_a_truncated_chunk(store):
    _rewrite(store / "c" / "0" / "0", _flip(40))
    _rewrite(store / "c" / "3" / "1", lambda b: b[: len(b) // 2])
    z = zarr.open_array(str(store))
    with pytest.raises(cc.ChecksumError, match=r"c/0/0': checksum mismatch in the header|c/0/0': .*header"):
        z[:32, :48]
    with pytest.raises(cc.FormatError, match=r"^chunk 'file://.*/c/3/1': "):
        z[100:, 50:]


def test_garbage_and_a_chunk_of_another_array(store, tmp_path_factory):
    (store / "c" / "1" / "0").write_bytes(b"not a chunk" * 10)
    other = tmp_path_factory.mktemp("other")
    zarr.create_array(store=str(other), shape=(32, 48), chunks=(32, 48), dtype="int32",
                      serializer=CupycodecCodec(), compressors=None)[:] = 1
    (store / "c" / "1" / "1").write_bytes((other / "c" / "0" / "0").read_bytes())
    z = zarr.open_array(str(store))
    with pytest.raises(cc.FormatError, match=r"c/1/0': not a cupycodec container"):
        z[32:64, :48]
    with pytest.raises(cc.FormatError, match=r"c/1/1': the chunk holds int32 .* says float32 .* another array") \
            as info:
        z[32:64, 48:]
    assert info.value.chunk_key.endswith("/c/1/1'")  # as every chunk error has (it had none)


def test_a_partial_write_over_a_corrupt_chunk(store):
    # read-modify-write: zarr fetches the bytes and calls the batched decode, so the key is not known there
    _rewrite(store / "c" / "0" / "0", _flip(-1))
    z = zarr.open_array(str(store))
    with pytest.raises(cc.ChecksumError, match=r"^chunk 0 of a batch of 1 \(zarr did not pass its key\)"):
        z[0, 0] = 5


def _fixture_store(tmp_path, name, **codec):
    """A one-chunk Zarr array whose chunk is a committed (GPU-written) container."""
    c = cc.load(os.path.join(FIXTURES, name + ".cc"))
    zarr.create_array(store=str(tmp_path), shape=c.shape, chunks=c.shape, dtype=c.dtype,
                      serializer=CupycodecCodec(**codec), compressors=None)
    key = tmp_path / "c" / "/".join("0" * len(c.shape))
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_bytes(c.to_bytes())
    return zarr.open_array(str(tmp_path)), np.load(os.path.join(FIXTURES, name + ".npy"))


@pytest.mark.parametrize("name", ["gpu_ans_f32_weights", "gpu_cascaded_i64_2d"])
def test_gpu_only_chunks_on_a_cpu_reader(tmp_path, name):
    codec = name.split("_")[1]
    z, want = _fixture_store(tmp_path, name, codec=codec, trusted=True)
    with pytest.raises(cc.UntrustedError, match=rf"^chunk '.*/c/0/0': .*codec '{codec}'.*trust.configure") as info:
        z[:]  # the store declares trusted: true, but a store cannot vouch for itself
    assert "from_bytes" not in str(info.value)  # the core's fix, which a zarr reader cannot apply, came first
    with trust.settings(trusted="metadata"):
        if cc.backends.nvcomp_available():
            np.testing.assert_array_equal(z[:], want)
            return
        with pytest.raises(cc.BackendUnavailableError,
                           match=rf"^chunk '.*/c/0/0': codec '{codec}' decodes only on a GPU.*'zstd', 'deflate'"):
            z[:]
    undeclared, _ = _fixture_store(tmp_path / "undeclared", name, codec=codec)
    with trust.settings(trusted="metadata"), pytest.raises(cc.UntrustedError, match="c/0/0"):
        undeclared[:]


@pytest.mark.skipif(not _nvcomp_host.available(), reason="nvidia-libnvcomp is not installed")
def test_nvcomp_host_chunks_decode_when_trusted(tmp_path):
    z, want = _fixture_store(tmp_path, "gpu_bitcomp_i64_2d", codec="bitcomp")
    with pytest.raises(cc.UntrustedError, match="codec 'bitcomp'"):
        z[:]
    with trust.settings(trusted=True):
        np.testing.assert_array_equal(z[:], want)


@pytest.mark.parametrize("name", ["gpu_zstd_bf16_weights", "gpu_deflate_i64_2d", "gpu_lz4_f32_weights"])
def test_gpu_written_standard_chunks_read_untrusted_on_the_cpu(tmp_path, name):
    c = cc.load(os.path.join(FIXTURES, name + ".cc"))
    if c.dtype_name == "BF16":
        zarr.create_array(store=str(tmp_path), shape=c.shape, chunks=c.shape, dtype="uint16",
                          serializer=CupycodecCodec(dtype="bfloat16"), compressors=None)
        want = np.load(os.path.join(FIXTURES, name + ".bits.npy"))
    else:
        zarr.create_array(store=str(tmp_path), shape=c.shape, chunks=c.shape, dtype=c.dtype,
                          serializer=CupycodecCodec(), compressors=None)
        want = np.load(os.path.join(FIXTURES, name + ".npy"))
    (tmp_path / "c" / "0").mkdir(parents=True)
    (tmp_path / "c" / "0" / "0").write_bytes(c.to_bytes())
    got = zarr.open_array(str(tmp_path))[:]
    assert got.tobytes() == want.tobytes()


def test_writing_a_gpu_only_codec_on_a_cpu(tmp_path):
    if cc.backends.nvcomp_available():
        pytest.skip("this machine compresses ans on its GPU")
    z = zarr.create_array(store=str(tmp_path), shape=(64,), chunks=(64,), dtype="float32",
                          serializer=CupycodecCodec(codec="ans"), compressors=None)
    with pytest.raises(cc.BackendUnavailableError, match="codec 'ans' .*'zstd', 'deflate'"):
        z[:] = 1.0


def test_signed_chunks(store, tmp_path_factory):
    path = tmp_path_factory.mktemp("signed")
    with trust.settings(key=KEY):
        z = zarr.create_array(store=str(path), shape=X.shape, chunks=(32, 48), dtype="float32",
                              serializer=CupycodecCodec(codec="zstd"), compressors=None)
        z[:] = X
        np.testing.assert_array_equal(zarr.open_array(str(path))[:], X)  # verified, trusted
        # unsigned chunks are refused while a key is set, with a fix a zarr reader can apply (the core's named
        # load() arguments)
        with pytest.raises(cc.AuthenticationError, match=r"^chunk '.*/c/0/0': this chunk carries no MAC.*"
                                                         r"trust.configure\(key=None\)"):
            zarr.open_array(str(store))[:32, :48]
    blob = (path / "c" / "0" / "0").read_bytes()
    assert cc.CompressedArray.from_bytes(blob, key=KEY).signed
    np.testing.assert_array_equal(zarr.open_array(str(path))[:], X)  # without a key: untrusted, standard codec
    with trust.settings(key=bytes(32)), pytest.raises(cc.AuthenticationError, match=r"c/0/0': MAC mismatch"):
        zarr.open_array(str(path))[:32, :48]
    # an attacker who changes a chunk can fix every CRC, but not the MAC
    forged = bytearray(blob)
    forged[-8] ^= 0xFF
    (path / "c" / "3" / "1").write_bytes(recompute_crcs(bytes(forged)))
    with trust.settings(key=KEY), pytest.raises(cc.AuthenticationError, match=r"c/3/1': MAC mismatch"):
        zarr.open_array(str(path))[:]


def test_options_every_write_would_refuse_are_refused_when_the_array_is_made(tmp_path):
    # a chunk size auto's codecs cannot take was accepted, and the array created: now the codec itself refuses it
    with pytest.raises(ValueError, match="chunk_nbytes must be a multiple of 16"):
        CupycodecCodec(chunk_nbytes=24)
    with pytest.raises(ValueError, match=r"axis=5 is out of range for this 2-D array"):
        zarr.create_array(str(tmp_path / "a.zarr"), shape=(8, 8), chunks=(4, 4), dtype="f4",
                          serializer=CupycodecCodec(quantize="int8", axis=5), compressors=None)
    assert not (tmp_path / "a.zarr" / "zarr.json").exists()


@pytest.mark.parametrize("shape, zdtype, kwargs, error, match", [
    ((8,), "i4", {"filters": ["int8"]}, TypeError, "int8"),
    ((8, 8), "f4", {"filters": [{"id": "int8", "axis": 5}]}, ValueError, "axis"),
    ((8,), "f4", {"filters": ["byteplane"], "quantize": "int8"}, ValueError, ""),
    ((8,), "f4", {"filters": ["byteplane", "byteplane"]}, ValueError, ""),
    ((), "f4", {"quantize": "int8"}, ValueError, ""),
])
def test_filters_every_write_would_refuse_are_refused_when_the_array_is_made(tmp_path, shape, zdtype, kwargs, error,
                                                                              match):
    """Only quantize= was checked: the same options given as filters, or channel scales of a 0-d array, made an
    array (and its zarr.json) that no write could fill."""
    with pytest.raises(error, match=f"every write of this array would fail.*{match}"):
        zarr.create_array(str(tmp_path / "a.zarr"), shape=shape, dtype=zdtype, serializer=CupycodecCodec(**kwargs),
                          compressors=None)
    assert not (tmp_path / "a.zarr" / "zarr.json").exists()


@pytest.mark.parametrize("kwargs", [{"quantize": "int8", "granularity": "tensor"},
                                    {"filters": [{"id": "int8", "granularity": "tensor"}]}])
def test_a_nan_fill_value_under_int8_names_itself_when_a_write_pads(kwargs):
    # with the int8 filter (not quantize=) the error named a NaN at an element the user never wrote
    z = zarr.create_array(store={}, shape=(10, 10), chunks=(8, 8), dtype="f4", fill_value=np.nan,
                          serializer=CupycodecCodec(**kwargs), compressors=None)
    z[:8, :8] = np.ones((8, 8), np.float32)  # a whole chunk: no padding, so it quantizes
    assert np.array_equal(z[:8, :8], np.ones((8, 8), np.float32))
    with pytest.raises(ValueError, match=r"fill_value .*nan.* is not finite.*finite fill_value"):
        z[:] = np.ones((10, 10), np.float32)
