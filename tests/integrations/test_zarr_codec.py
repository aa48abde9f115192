"""The Zarr v3 codec on the CPU: metadata, registry, every dtype, fill values, partial chunks, INT8, batching."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from importlib.metadata import entry_points

import ml_dtypes
import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec

import cupycodec as cc
from cupycodec.integrations import trust
from cupycodec.integrations.numcodecs import Cupycodec
from cupycodec.integrations.zarr import CupycodecCodec
from cupycodec.quant.reference import sqnr

RNG = np.random.default_rng(3)
HAS_FUSED = hasattr(__import__("zarr.core.codec_pipeline").core.codec_pipeline, "FusedCodecPipeline")


@pytest.fixture(autouse=True)
def _default_trust():
    assert trust.current() == trust.Policy()
    yield
    trust.configure(trusted=False, key=None)


def _create(path, shape, zdtype, chunks, fill_value=0, **kwargs):
    """A Zarr v3 array of data type ``zdtype`` with the codec; ``kwargs`` configure the codec."""
    return zarr.create_array(store=str(path), shape=shape, chunks=chunks, dtype=zdtype, fill_value=fill_value,
                             serializer=CupycodecCodec(**kwargs), compressors=None)


def _same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# -- metadata and registry ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {},
    {"codec": "zstd", "level": 7, "chunk_nbytes": 65536},
    {"codec": "lz4", "filters": ["byteplane"]},
    {"codec": "zstd", "quantize": "int8", "granularity": "group", "group_size": 32},
    {"codec": "ans", "data_type": "<f4", "trusted": True},
    {"codec": "zstd", "dtype": "bfloat16"},
])
def test_metadata_round_trips(tmp_path, kwargs):
    codec = CupycodecCodec(**kwargs)
    assert CupycodecCodec.from_dict(codec.to_dict()) == codec
    assert CupycodecCodec.from_dict(json.loads(json.dumps(codec.to_dict()))) == codec
    # the same configuration as the numcodecs codec's, less its "id"
    assert codec.to_dict()["configuration"] == {k: v for k, v in Cupycodec(**kwargs).get_config().items()
                                                if k != "id"}
    dtype = "uint16" if "dtype" in kwargs else "float32"
    _create(tmp_path, (8, 8), dtype, (8, 8), **kwargs)
    with open(tmp_path / "zarr.json") as f:
        meta = json.load(f)
    assert meta["codecs"] == [codec.to_dict()]
    assert zarr.open_array(str(tmp_path)).metadata.codecs == (codec,)


def test_the_defaults_in_zarr_json(tmp_path):
    _create(tmp_path, (4,), "int32", (4,))
    with open(tmp_path / "zarr.json") as f:
        assert json.load(f)["codecs"] == [{"name": "cupycodec", "configuration": {"codec": "auto", "trusted": False}}]
    assert CupycodecCodec.from_dict({"name": "cupycodec"}) == CupycodecCodec()


def test_a_newer_writers_option_is_ignored_with_a_warning(tmp_path):
    # zarr.json holding an option this cupycodec does not know made the array unreadable (a bare TypeError)
    x = np.arange(600, dtype=np.float32).reshape(20, 30)
    z = _create(tmp_path, x.shape, "float32", (16, 16), codec="zstd")
    z[:] = x
    with open(tmp_path / "zarr.json") as f:
        meta = json.load(f)
    meta["codecs"][0]["configuration"]["future_opt"] = 1
    with open(tmp_path / "zarr.json", "w") as f:
        json.dump(meta, f)
    with pytest.warns(UserWarning, match="'future_opt' ignored"):
        z = zarr.open_array(str(tmp_path))
    assert np.array_equal(z[:], x) and z.metadata.codecs == (CupycodecCodec(codec="zstd"),)
    with pytest.warns(UserWarning, match="'future_opt' ignored"):
        assert Cupycodec.from_config({"id": "cupycodec", "codec": "zstd", "level": 3, "future_opt": 1}) == \
            Cupycodec(codec="zstd", level=3)
    with pytest.raises(TypeError, match="unknown option"):  # a caller's own keyword is a typo: refused
        CupycodecCodec(codec="zstd", future_opt=1)
    # a filter's option likewise (Byteplane.__init__'s TypeError made the array unreadable)
    stored = {"id": "cupycodec", "codec": "zstd", "filters": [{"id": "byteplane", "version": 1, "future_opt": 1}]}
    with pytest.warns(UserWarning, match="byteplane.future_opt ignored"):
        assert Cupycodec.from_config(stored) == Cupycodec(codec="zstd", filters=[{"id": "byteplane", "version": 1}])
    # and what this version writes reads back as it was, without a warning (backend= is the core's, passed on)
    import warnings

    for codec in (Cupycodec(codec="zstd", backend="cpu"), CupycodecCodec(codec="zstd", backend="cpu")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            back = pickle.loads(pickle.dumps(codec)) if isinstance(codec, Cupycodec) else \
                CupycodecCodec.from_dict(codec.to_dict())
        assert back == codec


def test_registry_lookup_in_a_fresh_interpreter(tmp_path):
    assert entry_points(group="zarr.codecs", name="cupycodec"), \
        'cupycodec is not installed, so its zarr entry point is missing: pip install -e ".[test]"'
    x = np.arange(1000, dtype=np.float64).reshape(10, 100)
    _create(tmp_path, x.shape, x.dtype, (5, 50))[:] = x
    code = (
        "import sys, numpy as np, zarr\n"
        f"z = zarr.open_array({str(tmp_path)!r})\n"
        "assert type(z.metadata.codecs[0]).__module__ == 'cupycodec.integrations.zarr'\n"
        "np.testing.assert_array_equal(z[:], np.arange(1000.0).reshape(10, 100))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)  # not the source tree (see numcodecs')
    assert zarr.registry.get_codec_class("cupycodec") is CupycodecCodec


# -- what it stores -------------------------------------------------------------------------------------------------

DTYPES = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32",
          "float64", "complex64", "complex128", ">f4", ">i8", ">u2"]


def _data(dtype, shape):
    dt = np.dtype(dtype)
    n = int(np.prod(shape))
    if dt.kind == "b":
        return (RNG.random(shape) < 0.3).astype(dt)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return RNG.integers(max(info.min, -1000), min(info.max, 1000), size=shape).astype(dt)
    if dt.kind == "c":
        return (RNG.standard_normal(shape) + 1j * RNG.standard_normal(shape)).astype(dt)
    x = (np.sin(np.arange(n) / 37.0) * 50 + RNG.standard_normal(n)).astype(dt).reshape(shape)
    x.flat[::97] = np.nan  # NaNs survive bit for bit
    x.flat[5] = -0.0
    return x


@pytest.mark.parametrize("codec", ["auto", "zstd", "lz4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_round_trips_bit_for_bit(tmp_path, dtype, codec):
    x = _data(dtype, (70, 45))  # partial chunks on both axes
    z = _create(tmp_path, x.shape, dtype, (32, 16), codec=codec)
    z[:] = x
    y = zarr.open_array(str(tmp_path))[:]
    assert y.shape == x.shape
    assert y.astype(y.dtype.newbyteorder("=")).tobytes() == x.astype(x.dtype.newbyteorder("=")).tobytes()


def test_bfloat16_through_integer_bit_patterns(tmp_path):
    # zarr has no bfloat16 data type (ml_dtypes' bfloat16 is refused); uint16 arrays of bf16 bits with
    # dtype="bfloat16" give the codec the logical dtype (byte planes split the exponent out, INT8 works).
    with pytest.raises((ValueError, TypeError)):
        zarr.create_array(store={}, shape=(4,), dtype=ml_dtypes.bfloat16, serializer=CupycodecCodec(),
                          compressors=None)
    w = (RNG.standard_normal((256, 512)) * 0.05).astype(ml_dtypes.bfloat16)
    z = _create(tmp_path / "auto", w.shape, "uint16", (128, 256), dtype="bfloat16")
    z[:] = w.view(np.uint16)
    assert _same_bits(zarr.open_array(str(tmp_path / "auto"))[:], w.view(np.uint16))
    plain = _create(tmp_path / "plain", w.shape, "uint16", (128, 256), codec="zstd", level=1)
    plain[:] = w.view(np.uint16)
    assert z.nbytes_stored() < plain.nbytes_stored()  # the exponent planes are what compresses
    q = _create(tmp_path / "int8", w.shape, "uint16", (128, 256), dtype="bfloat16", quantize="int8")
    q[:] = w.view(np.uint16)
    back = zarr.open_array(str(tmp_path / "int8"))[:].view(ml_dtypes.bfloat16)
    assert sqnr(w.astype(np.float32), back.astype(np.float32)) > 35


@pytest.mark.parametrize("zdtype, logical, values", [
    (">u2", "bfloat16", np.array([1.0, 2.0, -3.5, 0.5], ml_dtypes.bfloat16)),
    (">i2", "bfloat16", np.array([1.0, 2.0, -3.5, 0.5], ml_dtypes.bfloat16)),
    (">u4", "float32", np.array([1.0, 2.0, -3.5, 0.5], np.float32)),
])
def test_a_big_endian_array_with_a_logical_dtype_reads_back_its_bits(tmp_path, zdtype, logical, values):
    # the chunks decode big-endian; their bits used to be read as a native-order integer (byte-swapped values)
    bits = values.view(np.dtype(zdtype).newbyteorder("=")).astype(zdtype)
    for kwargs in ({}, {"quantize": "int8", "granularity": "tensor"}):
        z = _create(tmp_path / f"{zdtype}{len(kwargs)}", (4,), zdtype, (4,), dtype=logical, **kwargs)
        z[:] = bits
        back = np.asarray(z[:]).astype(np.dtype(zdtype).newbyteorder("=")).view(values.dtype).astype(np.float32)
        if kwargs:
            np.testing.assert_allclose(back, values.astype(np.float32), atol=3.5 / 127)
        else:
            assert back.tobytes() == values.astype(np.float32).tobytes()


def test_fill_values_and_missing_chunks(tmp_path):
    z = _create(tmp_path, (100, 100), "float32", (25, 25), fill_value=np.nan)
    z[30:40, 60:70] = 1.5  # one chunk written
    z[:25, :25] = np.nan  # all fill: not stored (write_empty_chunks is off)
    keys = sorted(p.relative_to(tmp_path / "c").as_posix() for p in (tmp_path / "c").rglob("*") if p.is_file())
    assert keys == ["1/2"]
    y = zarr.open_array(str(tmp_path))[:]
    want = np.full((100, 100), np.nan, np.float32)
    want[30:40, 60:70] = 1.5
    assert _same_bits(y, want)
    ints = _create(tmp_path / "i", (10,), "int16", (4,), fill_value=-7)
    ints[5] = 3
    assert ints[:].tolist() == [-7, -7, -7, -7, -7, 3, -7, -7, -7, -7]


def test_scalar_and_empty_arrays(tmp_path):
    z = _create(tmp_path / "scalar", (), "float64", ())
    z[...] = 3.25
    assert zarr.open_array(str(tmp_path / "scalar"))[...] == 3.25
    e = _create(tmp_path / "empty", (0, 5), "int16", (2, 5))
    e[:] = np.zeros((0, 5), np.int16)
    assert zarr.open_array(str(tmp_path / "empty"))[:].shape == (0, 5)


def test_partial_chunks_reads_and_writes(tmp_path):
    x = _data("float64", (203, 117))
    z = _create(tmp_path, x.shape, "float64", (50, 40))
    z[:] = x
    z = zarr.open_array(str(tmp_path))
    for sel in [np.s_[:], np.s_[3:77, 5:6], np.s_[200:, 100:], np.s_[::7, ::3], np.s_[150, :], np.s_[-1, -1]]:
        assert _same_bits(z[sel], x[sel])
    z[10:20, 30:90] = -1.0  # read-modify-write of partial chunks
    x[10:20, 30:90] = -1.0
    assert _same_bits(z[:], x)
    assert _same_bits(z.oindex[[0, 5, 202], [1, 116]], x[np.ix_([0, 5, 202], [1, 116])])


def test_other_layouts_and_pipelines(tmp_path):
    x = _data("float32", (96, 80))
    # Fortran-ordered chunks in memory
    f = zarr.create_array(store=str(tmp_path / "f"), shape=x.shape, chunks=(32, 30), dtype="float32",
                          config={"order": "F"}, serializer=CupycodecCodec(), compressors=None)
    f[:] = x
    assert _same_bits(zarr.open_array(str(tmp_path / "f"), config={"order": "F"})[:], x)
    # inside shards: the inner chunks of a shard are one batch
    s = zarr.create_array(store=str(tmp_path / "s"), shape=x.shape, chunks=(16, 16), shards=(48, 80),
                          dtype="float32", serializer=CupycodecCodec(), compressors=None)
    s[:] = x
    assert _same_bits(zarr.open_array(str(tmp_path / "s"))[:], x)
    # followed by another codec: zarr fetches the bytes and calls the batched decode
    two = zarr.create_array(store=str(tmp_path / "two"), shape=x.shape, chunks=(32, 30), dtype="float32",
                            serializer=CupycodecCodec(), compressors=ZstdCodec())
    two[:] = x
    assert _same_bits(zarr.open_array(str(tmp_path / "two"))[:], x)
    # Zarr format 2 with the numcodecs codec as compressor
    v2 = zarr.create_array(store=str(tmp_path / "v2"), shape=x.shape, chunks=(32, 30), dtype="float32",
                           zarr_format=2, compressors=Cupycodec(codec="zstd"))
    v2[:] = x
    assert _same_bits(zarr.open_array(str(tmp_path / "v2"))[:], x)


@pytest.mark.parametrize("granularity", ["channel", "group", "tensor"])
def test_int8_quantization(tmp_path, granularity):
    w = (RNG.standard_normal((300, 256)) * 0.02).astype(np.float32)
    z = _create(tmp_path, w.shape, "float32", (128, 128), quantize="int8", granularity=granularity, group_size=64)
    z[:] = w
    y1 = zarr.open_array(str(tmp_path))[:]
    y2 = zarr.open_array(str(tmp_path))[:]
    assert sqnr(w, y1) > 35
    assert y1.tobytes() == y2.tobytes()  # decoding is deterministic
    assert z.nbytes_stored() < w.nbytes / 3
    with pytest.raises(TypeError, match="quantize='int8' takes float32"):
        _create(tmp_path / "i", (4,), "int32", (4,), quantize="int8")


# zarr's own datetime64 metadata code warns under NumPy >= 2.5 (not cupycodec's: the refusal is what is tested)
@pytest.mark.filterwarnings("ignore:The 'generic' unit for NumPy timedelta:DeprecationWarning")
def test_data_types_the_codec_cannot_store_are_refused_at_creation():
    with pytest.raises(TypeError, match="cannot store zarr data type"):
        zarr.create_array(store={}, shape=(4,), dtype="datetime64[s]", serializer=CupycodecCodec(), compressors=None)
    with pytest.raises(TypeError, match="reinterprets integer chunks of 2 bytes"):
        zarr.create_array(store={}, shape=(4,), dtype="float32", serializer=CupycodecCodec(dtype="bfloat16"),
                          compressors=None)
    with pytest.raises(TypeError, match="splits 2-, 4- or 8-byte words"):
        zarr.create_array(store={}, shape=(4,), dtype="uint8", serializer=CupycodecCodec(filters=["byteplane"]),
                          compressors=None)
    with pytest.raises(cc.UnknownCodecError):
        CupycodecCodec(codec="nope")


# -- batching -------------------------------------------------------------------------------------------------------


@pytest.fixture
def calls(monkeypatch):
    """Record the batch size of every decompress_many and compress_many call."""
    seen = {"decompress_many": [], "compress_many": []}
    for name in seen:
        real = getattr(cc, name)

        def spy(items, *a, _real=real, _name=name, **kw):
            seen[_name].append(len(items))
            return _real(items, *a, **kw)

        monkeypatch.setattr(cc, name, spy)
    return seen


def test_one_decompress_many_per_batch(tmp_path, calls):
    x = _data("float32", (128, 128))
    _create(tmp_path, x.shape, "float32", (32, 32))[:] = x  # 16 chunks
    z = zarr.open_array(str(tmp_path))
    assert _same_bits(z[:], x)
    assert sorted(calls["decompress_many"]) == [1] * 16  # zarr's default: batches of one chunk
    assert sorted(calls["compress_many"]) == [1] * 16
    calls["decompress_many"].clear()
    calls["compress_many"].clear()
    with zarr.config.set({"codec_pipeline.batch_size": 64}):
        z = zarr.open_array(str(tmp_path))
        assert _same_bits(z[:], x)
        assert calls["decompress_many"] == [16]  # every chunk of the read in one call
        assert _same_bits(z[40:90, 10:20], x[40:90, 10:20])
        assert calls["decompress_many"] == [16, 2]
        z[:] = x[::-1]
        assert calls["compress_many"] == [16]


@pytest.mark.skipif(not HAS_FUSED, reason=f"zarr {zarr.__version__} has no FusedCodecPipeline (zarr >= 3.3)")
def test_fused_pipeline_hands_over_every_chunk_of_a_read(tmp_path, calls):
    x = _data("float32", (128, 128))
    _create(tmp_path, x.shape, "float32", (32, 32))[:] = x
    with zarr.config.set({"codec_pipeline.path": "zarr.core.codec_pipeline.FusedCodecPipeline"}):
        assert _same_bits(zarr.open_array(str(tmp_path))[:], x)
    assert calls["decompress_many"][-1] == 16


def test_complex_arrays_take_byte_planes_as_the_core_does():
    # byte planes split complex numbers by component; the v3 codec refused complex128 ("2-, 4- or 8-byte words"),
    # and since zarr checks codecs on every open, a store written with it before that check could not be read
    x = (np.arange(64) + 0.5j * np.arange(64)[::-1]).astype(np.complex128)
    z = zarr.create_array(store={}, shape=x.shape, chunks=(16,), dtype="complex128",
                          serializer=CupycodecCodec(codec="zstd", filters=["byteplane"]), compressors=None)
    z[:] = x
    assert np.array_equal(z[:], x)


def test_numpy_integers_as_codec_options():
    # an axis computed from arr.ndim - 1 (a NumPy integer) failed json.dumps; level and chunk_nbytes were refused
    from cupycodec.integrations.numcodecs import Cupycodec

    kw = {"codec": "zstd", "quantize": "int8", "axis": np.int64(1), "level": np.int32(3),
          "chunk_nbytes": np.int64(4096)}
    for codec in (CupycodecCodec(**kw), Cupycodec(**kw)):
        text = json.dumps(codec.to_dict() if hasattr(codec, "to_dict") else codec.get_config())
        assert '"axis": 1' in text and '"level": 3' in text and '"chunk_nbytes": 4096' in text
    assert CupycodecCodec(quantize="int8", granularity="group", group_size=np.int64(64)).to_dict() == \
        CupycodecCodec(quantize="int8", granularity="group", group_size=64).to_dict()
