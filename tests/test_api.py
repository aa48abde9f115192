"""compress/decompress on the CPU: round-trip properties, out=, device=, bounds, files, errors."""

from __future__ import annotations

import os
import sys

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import cupycodec as cc

CPU_CODECS = ["raw", "zstd", "deflate", "gzip", "lz4", "snappy", "auto"]
GPU_ONLY = ["ans", "cascaded"]

_DTYPES = [np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
           np.float16, np.float32, np.float64, np.complex64, np.complex128, np.longdouble]


def _dtypes():
    base = st.sampled_from(_DTYPES).map(np.dtype)
    swapped = base.filter(lambda d: d.itemsize > 1 and d.type is not np.longdouble).map(
        lambda d: d.newbyteorder(">"))
    return st.one_of(base, swapped)


def _same(x, y) -> bool:
    return (y.dtype == x.dtype and y.shape == x.shape
            and np.ascontiguousarray(y).tobytes() == np.ascontiguousarray(x).tobytes())


def _layout(data, x):
    kind = data.draw(st.sampled_from(["c", "f", "neg", "step"]))
    if kind == "f":
        return np.asfortranarray(x)
    if kind == "neg" and x.ndim:
        return x[::-1]
    if kind == "step" and x.ndim and x.shape[0] > 1:
        return x[::2]
    return x


@settings(deadline=None)
@given(data=st.data())
def test_roundtrip_property(data):
    """Any dtype x shape x layout x codec x chunk size comes back bit for bit (NaN payloads and -0.0 included)."""
    dtype = data.draw(_dtypes())
    x = data.draw(hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=9)))
    x = _layout(data, x)
    codec = data.draw(st.sampled_from(CPU_CODECS))
    chunk = data.draw(st.sampled_from([None, 16, 48, 4096]))
    c = cc.compress(x, codec=codec, chunk_nbytes=chunk) if codec != "auto" or chunk is None else cc.compress(x)
    assert c.shape == x.shape and c.dtype == x.dtype
    y = cc.decompress(c)
    assert _same(x, y)
    assert _same(x, cc.decompress(c.to_bytes()))


@settings(deadline=None)
@given(raw=st.binary(min_size=0, max_size=3000), codec=st.sampled_from(CPU_CODECS),
       chunk=st.sampled_from([16, 32, 256, 1024]))
def test_arbitrary_bit_patterns(raw, codec, chunk):
    """NaN payloads, signalling NaNs, -0.0, subnormals: raw bytes reinterpreted as floats survive unchanged."""
    raw = raw[: len(raw) // 8 * 8]
    for dtype in ("<f8", ">f4", "<f2", "<c8"):
        x = np.frombuffer(raw, dtype=dtype)
        kwargs = {} if codec == "auto" else {"codec": codec, "chunk_nbytes": chunk}
        assert _same(x, cc.decompress(cc.compress(x, **kwargs).to_bytes()))


def test_nan_payloads_and_negative_zero():
    x = np.array([0x7FC00001, 0xFFC12345, 0x7F800001, 0x80000000, 0x00000001], dtype=np.uint32).view(np.float32)
    for codec in CPU_CODECS:
        y = cc.decompress(cc.compress(x, codec=codec))
        assert y.view(np.uint32).tolist() == x.view(np.uint32).tolist()


@pytest.mark.parametrize("codec", CPU_CODECS)
def test_bfloat16_and_float8(codec):
    rng = np.random.default_rng(0)
    for dt in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2):
        x = (rng.standard_normal((33, 65)) * 0.05).astype(dt)
        c = cc.compress(x, codec=codec)
        y = cc.decompress(c)
        assert y.dtype == np.dtype(dt) and _same(x, y)
    assert cc.compress(x.astype(ml_dtypes.bfloat16)).dtype_name == "BF16"


def test_bit_view_with_logical_dtype():
    x = (np.random.default_rng(1).standard_normal(100) * 0.02).astype(ml_dtypes.bfloat16)
    c = cc.compress(x.view(np.uint16), dtype="bfloat16")
    assert c.dtype_name == "BF16" and c.dtype == np.dtype(ml_dtypes.bfloat16)
    assert _same(x, cc.decompress(c))
    with pytest.raises(ValueError, match="itemsize"):
        cc.compress(np.zeros(4, np.uint8), dtype="bfloat16")
    # integers of every width and sign hold bits; the input's own dtype named again changes nothing
    assert cc.compress(np.ones(3, np.int32), dtype="float32").dtype_name == "F32"
    assert cc.compress(x, dtype="bfloat16").dtype_name == "BF16"
    big = np.arange(3, dtype=">f4")
    assert _same(big, cc.decompress(cc.compress(big.view(">u4"), dtype=">f4")))


def test_one_filter_may_be_named_alone_and_limits_may_be_numpy_integers():
    x = np.arange(1000, dtype=np.float32)
    for one in ("byteplane", {"id": "byteplane"}):  # a string was read letter by letter: unknown filter 'b'
        c = cc.compress(x, codec="zstd", filters=one)
        assert [f.get_config()["id"] for f in c.pipeline] == ["byteplane"]
        assert _same(x, cc.decompress(c, max_output_nbytes=np.int64(4000)))
    with pytest.raises(cc.DecompressionBombError):
        cc.decompress(c, max_output_nbytes=np.uint32(3999))


@pytest.mark.parametrize("x,dtype,match", [
    (np.array([1, 2, 3], np.float16), "bfloat16", r"input is F16, not integers holding bits"),
    (np.array([1.0], np.float32), "int32", r"input is F32, not integers"),
    (np.array([1.0], np.float32), "bfloat16", r"input is F32"),  # (and of another width)
    (np.arange(3, dtype="<u4"), ">f4", r"byte order '>', but a bit view's byte order is the input's"),
])
def test_a_logical_dtype_never_reinterprets_values(x, dtype, match):
    """dtype= names what a raw bit view's integers hold; it once read float16 values as bfloat16 bits ([1, 2, 3]
    came back as [0.0078, 2, 32]), float bits as integers, and dropped a byte order it could not honour."""
    with pytest.raises((TypeError, ValueError), match=match):
        cc.compress(x, dtype=dtype)


@pytest.mark.parametrize("bad", [np.array([{}], dtype=object), np.zeros(3, dtype="U4"),
                                 np.zeros(3, dtype=[("a", "i4"), ("b", "f4")]), np.zeros(2, dtype="M8[s]"),
                                 np.zeros(2, dtype="V3")])
def test_unsupported_dtypes_raise_type_error(bad):
    with pytest.raises(TypeError, match="supported"):
        cc.compress(bad)
    with pytest.raises(cc.UnsupportedDtypeError):
        cc.compress(bad)


def test_lists_and_scalars():
    assert _same(np.asarray([1, 2, 3]), cc.decompress(cc.compress([1, 2, 3])))
    assert cc.decompress(cc.compress(2.5)).shape == ()
    with pytest.raises(TypeError):
        cc.compress([object()])


def test_dlpack_input():
    class Exporter:  # any DLPack producer on the CPU
        def __init__(self, a):
            self.a = a

        def __dlpack__(self, **kw):
            return self.a.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self.a.__dlpack_device__()

    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert _same(x, cc.decompress(cc.compress(Exporter(x))))


def test_torch_cpu_tensor_input():
    torch = pytest.importorskip("torch")
    t = torch.arange(10, dtype=torch.float32).reshape(2, 5)
    y = cc.decompress(cc.compress(t))
    assert np.array_equal(y, t.numpy())
    bf = torch.randn(8, 8).to(torch.bfloat16)
    c = cc.compress(bf.view(torch.int16), dtype="bfloat16")
    assert np.array_equal(cc.decompress(c).view(np.int16), bf.view(torch.int16).numpy())


# -- out=, device=, bounds ------------------------------------------------------------------------------------


def test_out_is_filled_in_place():
    x = np.arange(5000, dtype=np.int32).reshape(50, 100)
    out = np.empty_like(x)
    y = cc.decompress(cc.compress(x, codec="zstd"), out=out)
    assert y is out and np.array_equal(out, x)
    with pytest.raises(ValueError, match="shape"):
        cc.decompress(cc.compress(x), out=np.empty((100, 50), np.int32))
    with pytest.raises(ValueError, match="dtype"):
        cc.decompress(cc.compress(x), out=np.empty_like(x, dtype=np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        cc.decompress(cc.compress(x), out=np.empty((100, 50), np.int32).T)
    with pytest.raises(TypeError, match="NumPy, CuPy"):
        cc.decompress(cc.compress(x), out=[0] * 5000)


@pytest.mark.parametrize("codec", ["zstd", "auto", "raw"])
def test_a_same_width_integer_out_is_a_bit_view(codec):
    # on the host as on the GPU: a caller without ml_dtypes (the torch loader) decodes bfloat16 into int16
    x = (np.random.default_rng(3).standard_normal((64, 80)) * 0.02).astype(ml_dtypes.bfloat16)
    blob = cc.compress(x, codec=codec).to_bytes()
    for dt in (np.int16, np.uint16):
        out = np.empty(x.shape, dt)
        assert cc.decompress(blob, out=out) is out and out.tobytes() == x.tobytes()
    with pytest.raises(ValueError, match=r"out is a >i2 bit view of BF16; the container's byte order is '<'"):
        cc.decompress(blob, out=np.empty(x.shape, ">i2"))
    with pytest.raises(ValueError, match="out has dtype I32, expected BF16"):  # another width is no bit view
        cc.decompress(blob, out=np.empty(x.shape, np.int32))
    with pytest.raises(ValueError, match="out has dtype F16, expected BF16"):  # nor another float
        cc.decompress(blob, out=np.empty(x.shape, np.float16))


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_bit_view_out_gets_bits_through_every_entry_point(dtype, quantize):
    # the result written into a same-width integer buffer must be the bits of the float result, never its values
    # cast to integers (an INT8 container dequantized into int16 once came back as 0, 1, -1, ...)
    x = (np.random.default_rng(4).standard_normal((48, 96)) * 3).astype(dtype)
    c = cc.compress(x, quantize=quantize)
    want = cc.decompress(c)
    assert want.dtype == x.dtype
    for dt in (np.int16, np.uint16):
        one, many = np.empty(x.shape, dt), np.empty(x.shape, dt)
        assert cc.decompress(c, out=one) is one
        assert cc.decompress_many([c, c], out=[many, None])[0] is many
        assert one.tobytes() == many.tobytes() == want.tobytes()


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("order", ["<", ">"])
def test_a_bit_view_out_has_the_containers_byte_order(order, quantize):
    # lossless and INT8 alike: a bit view in the container's byte order gets the float result's bytes in that order;
    # one in the other order is refused (an INT8 decode once wrote native bits read as the other order's integers)
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(4, 16).astype(order + "f4")
    c = cc.compress(x, quantize=quantize)
    want = cc.decompress(c)
    assert want.dtype == x.dtype
    for kind in "ui":
        out = np.zeros(x.shape, order + kind + "4")
        assert cc.decompress(c, out=out) is out and out.tobytes() == want.tobytes()
        other = "<>"[order == "<"]
        with pytest.raises(ValueError, match=rf"out is a \{other}{kind}4 bit view of F32; the container's byte "
                                             rf"order is '\{order}'"):
            cc.decompress(c, out=np.zeros(x.shape, other + kind + "4"))

@pytest.mark.parametrize("scales_dtype", ["<f4", "<u4", ">f4", ">u4"])
def test_int8_scales_out_has_the_containers_byte_order(scales_dtype):
    # out=(codes, scales) with a big-endian scales buffer was filled with the little-endian bytes: scales off by
    # ~1e34, no error (or, for a zero row's scale 1.0, a "corrupt or crafted" FormatError on a valid container)
    x = np.array([[1.0, -0.5], [2.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    c = cc.compress(x, quantize="int8", codec="zstd")
    want = cc.decompress(c, dequantize=False)
    codes, scales = np.empty((3, 2), np.int8), np.empty(3, scales_dtype)
    if scales_dtype[0] == ">":
        with pytest.raises(ValueError, match="another byte order than the container's scales"):
            cc.decompress(c, dequantize=False, out=(codes, scales))
        return
    got = cc.decompress(c, dequantize=False, out=(codes, scales))
    assert np.array_equal(codes, want.codes) and scales.tobytes() == want.scales.tobytes() and got.scales is scales


def test_out_with_filters():
    x = (np.random.default_rng(2).standard_normal((64, 64)) * 0.02).astype(np.float32)
    out = np.empty_like(x)
    assert cc.decompress(cc.compress(x, codec="auto"), out=out) is out
    assert np.array_equal(out, x)


def test_device_argument_on_cpu_machine():
    x = np.arange(10)
    c = cc.compress(x)
    assert isinstance(cc.decompress(c, device="cpu"), np.ndarray)
    with pytest.raises(ValueError, match="device must be"):
        cc.decompress(c, device="tpu")


def test_max_output_nbytes():
    x = np.zeros(1 << 22, dtype=np.uint8)  # 4 MiB of zeros compress ~1000x
    c = cc.compress(x, codec="zstd", chunk_nbytes=1 << 20)
    with pytest.raises(cc.DecompressionBombError, match="max_output_nbytes"):
        cc.decompress(c, max_output_nbytes=1 << 20)
    assert cc.decompress(c).size == x.size  # made here: trusted
    blob = c.to_bytes()
    assert len(blob) * 1024 < (1 << 30)
    cc.decompress(blob)  # 4 MiB is under the 1 GiB floor of the default bound
    with pytest.raises(cc.DecompressionBombError):
        cc.decompress(blob, max_output_nbytes=4096)
    assert cc.decompress(blob, max_output_nbytes=None).size == x.size


def test_default_bound_stops_bombs():
    # 1 GiB + 1 MiB of zeros is ~35 KB of zstd: refuse by default, before allocating anything.
    n = (1 << 30) + (1 << 20)
    c = cc.compress(np.zeros(1, np.uint8), codec="raw")
    # forge the header of a container claiming n bytes of zstd-compressed zeros (a real one takes a while to build)
    import json
    import struct
    import zlib

    blob = c.to_bytes()
    hlen = struct.unpack_from("<Q", blob, 8)[0]
    header = json.loads(blob[24 : 24 + hlen])
    header["array"]["shape"] = [n]
    seg = header["segments"][0]
    seg.update(shape=[n], raw_nbytes=n, codec={"id": "zstd", "version": 1}, chunk_nbytes=1 << 24,
               n_chunks=-(-n // (1 << 24)))
    k = seg["n_chunks"]
    frame = __import__("zstandard").ZstdCompressor().compress(bytes(1 << 24))
    last = __import__("zstandard").ZstdCompressor().compress(bytes(n - (k - 1) * (1 << 24)))
    sizes = [len(frame)] * (k - 1) + [len(last)]
    chunks = [frame] * (k - 1) + [last]
    table = struct.pack(f"<{k}I{k}I{k}B", *sizes, *[zlib.crc32(f) for f in chunks], *([0] * k))
    table += bytes(-len(table) % 16)
    data = b"".join(f + bytes(-len(f) % 16) for f in chunks)
    seg.update(offset=0, nbytes=len(table) + len(data), table_crc32=zlib.crc32(table))
    text = json.dumps(header).encode()
    text += b" " * (-(24 + len(text)) % 64)
    forged = struct.pack("<4sHHQI4x", b"CPCC", 1, 0, len(text), zlib.crc32(text)) + text + table + data
    assert len(forged) < 200_000
    with pytest.raises(cc.DecompressionBombError, match="exceeds max_output_nbytes"):
        cc.decompress(forged)


def test_compress_many_and_decompress_many():
    xs = [np.arange(n, dtype=np.float32) for n in (0, 1, 1000, 70000)]
    cs = cc.compress_many(xs, codec="zstd", metadata=[{"i": i} for i in range(4)])
    assert [c.metadata["i"] for c in cs] == [0, 1, 2, 3]
    outs = [np.empty_like(x) for x in xs]
    ys = cc.decompress_many(cs, out=outs)
    assert all(y is o and np.array_equal(y, x) for x, y, o in zip(xs, ys, outs))
    assert all(np.array_equal(a, b) for a, b in zip(xs, cc.decompress_many([c.to_bytes() for c in cs])))
    with pytest.raises(TypeError, match="sequence"):
        cc.compress_many(np.arange(3))
    with pytest.raises(ValueError, match="out buffers"):
        cc.decompress_many(cs, out=[None])


def test_compressor_reuse():
    comp = cc.Compressor(codec="deflate", level=1, chunk_nbytes=1024)
    xs = [np.arange(3000, dtype=np.int16), np.ones((40, 40))]
    for c, x in zip(comp.compress_many(xs), xs):
        assert c.codec == "deflate" and c.segments[0].chunk_nbytes == 1024 and np.array_equal(cc.decompress(c), x)
    assert comp.compress(xs[0]) == cc.compress(xs[0], codec="deflate", level=1, chunk_nbytes=1024)
    # metadata and stream are per call; given to the constructor they read as the codec's unknown options
    for kw in ({"metadata": {"a": 1}}, {"stream": None}):
        with pytest.raises(TypeError, match=f"{next(iter(kw))} go to each call"):
            cc.Compressor(codec="zstd", **kw)
    assert cc.Compressor(codec="zstd").compress(xs[0], metadata={"a": 1}).metadata == {"a": 1}


# -- codecs, options, backends ----------------------------------------------------------------------------------


def test_codec_options_are_validated():
    with pytest.raises(TypeError, match="unknown option"):
        cc.compress(np.ones(3), codec="zstd", speed=3)
    with pytest.raises(ValueError, match="level"):
        cc.compress(np.ones(3), codec="zstd", level=99)
    with pytest.raises(TypeError, match="has no level"):
        cc.compress(np.ones(3), codec="snappy", level=3)
    with pytest.raises(cc.UnknownCodecError, match="unknown codec 'brotli'; registered: ans, auto, bitcomp"):
        cc.compress(np.ones(3), codec="brotli")
    with pytest.raises(ValueError, match="chunk_nbytes"):
        cc.compress(np.ones(3), codec="zstd", chunk_nbytes=100)
    with pytest.raises(ValueError, match="chunk_nbytes"):
        cc.compress(np.ones(3), codec="zstd", chunk_nbytes=32 << 20)
    with pytest.raises(ValueError, match="quantize"):
        cc.compress(np.ones(3), quantize="int4")
    with pytest.raises(ValueError, match="backend="):
        cc.compress(np.ones(3), backend="tpu")
    with pytest.raises(ValueError, match="multiple of 4"):
        cc.compress(np.ones(3, np.uint8), codec="ans", data_type="<f4")
    with pytest.raises(ValueError, match="data_type"):
        cc.compress(np.ones(3, np.uint8), codec="ans", data_type="<i8")


def test_codec_objects_and_configs():
    c1 = cc.compress(np.arange(100), codec=cc.get_codec({"id": "zstd", "level": 5}))
    c2 = cc.compress(np.arange(100), codec={"id": "zstd", "level": 5})
    c3 = cc.compress(np.arange(100), codec="zstd", level=5)
    assert c1 == c2 == c3 and c1.codecs["data"] == {"id": "zstd", "version": 1, "level": 5}
    with pytest.raises(TypeError, match="not both"):
        cc.compress(np.arange(3), codec=cc.get_codec("zstd"), level=3)


@pytest.mark.parametrize("codec", GPU_ONLY)
def test_gpu_only_codec_on_cpu_machine(codec, monkeypatch):
    from cupycodec import backends

    if backends.nvcomp_available():
        pytest.skip("a GPU with nvCOMP is present")
    with pytest.raises(cc.BackendUnavailableError, match="runs only on a GPU.*'zstd'"):
        cc.compress(np.ones(100, np.float32), codec=codec)
    with pytest.raises(cc.BackendUnavailableError, match="no CPU implementation"):
        cc.compress(np.ones(100, np.float32), codec=codec, backend="cpu")
    with pytest.raises(cc.BackendUnavailableError, match="nvcomp"):
        cc.compress(np.ones(100, np.float32), codec="zstd", backend="nvcomp")
    monkeypatch.setenv("CUPYCODEC_BACKEND", "nvcomp")
    with pytest.raises(cc.BackendUnavailableError):
        cc.compress(np.ones(100, np.float32), codec="zstd")
    monkeypatch.setenv("CUPYCODEC_BACKEND", "gpu")
    with pytest.raises(ValueError, match="CUPYCODEC_BACKEND"):
        cc.compress(np.ones(100, np.float32), codec="zstd")


def test_gpu_written_fixture_with_gpu_only_codec_on_cpu(tmp_path):
    from cupycodec import backends

    if backends.nvcomp_available():
        pytest.skip("a GPU with nvCOMP is present")
    path = os.path.join(os.path.dirname(__file__), "fixtures", "v1", "gpu_ans_bf16_weights.cc")
    if not os.path.exists(path):
        pytest.skip("GPU fixture not generated yet")
    with pytest.raises(cc.UntrustedError, match="'ans'"):  # from a file: nothing reaches nvCOMP unvouched for
        cc.decompress(cc.load(path))
    with pytest.raises(cc.BackendUnavailableError, match="decodes only on a GPU"):
        cc.decompress(cc.load(path, trusted=True))


def test_auto_picks_byteplane_zstd_for_floats_on_cpu():
    x = (np.random.default_rng(3).standard_t(5, 100_000) * 0.02).astype(ml_dtypes.bfloat16)
    c = cc.compress(x)
    assert [f.get_config()["id"] for f in c.pipeline] == ["byteplane"]
    assert c.codec == "zstd" and c.ratio > 1.4
    assert cc.compress(np.arange(100)).pipeline == ()


# -- files -----------------------------------------------------------------------------------------------------


def test_save_load(tmp_path):
    x = np.random.default_rng(4).standard_normal((300, 300))
    c = cc.compress(x, codec="zstd", metadata={"name": "w"})
    path = tmp_path / "w.cc"
    cc.save(path, c)
    assert path.stat().st_size == c.nbytes
    d = cc.load(path)
    assert d == c and d.metadata["name"] == "w"
    assert np.array_equal(cc.decompress(d), x)
    assert np.array_equal(cc.decompress(cc.load(str(path), mmap=False)), x)
    with pytest.raises(FileExistsError):
        cc.save(path, c, overwrite=False)
    assert [p.name for p in tmp_path.iterdir()] == ["w.cc"]  # no temp files left


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "w.cc"
    cc.save(path, cc.compress(np.arange(10)))
    before = path.read_bytes()

    class Boom(Exception):
        pass

    def fail(*a, **k):
        raise Boom

    monkeypatch.setattr(cc.CompressedArray, "write_to", fail)
    with pytest.raises(Boom):
        cc.save(path, cc.compress(np.arange(20)))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.cc"]


def test_save_without_overwrite_never_replaces_a_file_made_while_it_writes(tmp_path, monkeypatch):
    # another writer creates the file after the existence check: overwrite=False must still not replace it
    path = tmp_path / "w.cc"
    c = cc.compress(np.arange(10))
    write_to = cc.CompressedArray.write_to

    def racing(self, f, **kw):
        path.write_bytes(b"the other writer's")
        return write_to(self, f, **kw)

    monkeypatch.setattr(cc.CompressedArray, "write_to", racing)
    with pytest.raises(FileExistsError):
        cc.save(path, c, overwrite=False)
    assert path.read_bytes() == b"the other writer's"
    assert [p.name for p in tmp_path.iterdir()] == ["w.cc"]  # no temporary file left
    monkeypatch.undo()
    other = tmp_path / "v.cc"
    cc.save(other, c, overwrite=False)  # a new file: written whole, with a plain write's permissions
    assert cc.load(other) == c and [p.name for p in sorted(tmp_path.iterdir())] == ["v.cc", "w.cc"]
    umask = os.umask(0)
    os.umask(umask)
    assert other.stat().st_mode & 0o777 == 0o666 & ~umask

@pytest.mark.parametrize("name", ["w" * 252 + ".cc", "w" * 237 + ".cc", "\u00e9" * 126 + ".cc"])
def test_save_takes_every_name_the_file_system_takes(tmp_path, name):
    # the temporary file is named after the target: a name near NAME_MAX (255 bytes here) made it too long to create
    assert len(os.fsencode(name)) <= os.pathconf(tmp_path, "PC_NAME_MAX")
    c = cc.compress(np.arange(10))
    cc.save(tmp_path / name, c)
    cc.save(tmp_path / name, c, overwrite=True)
    assert cc.load(tmp_path / name) == c
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left


def test_save_takes_a_bytes_path_as_load_does(tmp_path):
    c = cc.compress(np.arange(10))
    path = os.fsencode(tmp_path / "w.cc")
    cc.save(path, c)
    cc.save(path, c)  # over the file it made
    assert cc.load(path) == c
    with pytest.raises(FileExistsError):
        cc.save(path, c, overwrite=False)
    with pytest.raises(TypeError, match="expected str, bytes or os.PathLike"):
        cc.save(3, c)


def test_load_truncated_file(tmp_path):
    path = tmp_path / "w.cc"
    cc.save(path, cc.compress(np.arange(1000)))
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    with pytest.raises(cc.FormatError):
        cc.load(path)
    path.write_bytes(b"")
    with pytest.raises(cc.FormatError, match="at least 24"):
        cc.load(path)


def test_pickle_roundtrip():
    import pickle

    c = cc.compress(np.arange(100.0), codec="lz4")
    assert pickle.loads(pickle.dumps(c)) == c


def test_a_header_only_container_pickles_and_deep_copies_with_its_trust():
    import copy
    import pickle

    c = cc.compress(np.arange(1000.0), codec="zstd", metadata={"layer": [1, 2]})
    for src in (c, cc.CompressedArray.from_bytes(c.to_bytes())):  # trusted (made here), and untrusted (from outside)
        h = src.without_payload()
        assert copy.deepcopy(h) is h  # immutable, no memory: shared
        back = pickle.loads(pickle.dumps(h))
        assert back.header == h.header and back.trusted == src.trusted and back.shape == (1000,)
        assert back.header_bytes() == h.header_bytes()
        again = back.with_payload(np.frombuffer(src.host_payload(), np.uint8).copy())
        assert np.array_equal(cc.decompress(again), np.arange(1000.0)) and again.trusted == src.trusted
        with pytest.raises(ValueError, match="header only"):
            back.to_bytes()


def test_decompress_rejects_wrong_types(tmp_path):
    with pytest.raises(TypeError, match="load"):
        cc.decompress(str(tmp_path / "x.cc"))
    with pytest.raises(TypeError, match="bytes-like"):
        cc.decompress(12)
    with pytest.raises(TypeError, match="already a CompressedArray"):
        cc.compress(cc.compress(np.ones(2)))


def test_compressed_array_properties():
    x = np.ones((10, 20), np.float32)
    c = cc.compress(x, codec="zstd")
    assert (c.shape, c.ndim, c.size, c.raw_nbytes, c.dtype, c.codec) == ((10, 20), 2, 200, 800, np.float32, "zstd")
    assert c.nbytes == len(c.to_bytes()) and c.ratio == pytest.approx(800 / c.nbytes)
    assert c.device == "cpu" and not c.on_device and c.lossless and len(c) == 10
    assert "CompressedArray shape=(10, 20)" in repr(c)
    assert c.to_host() is c


def test_info_runs():
    data = cc.info()
    assert data["cupycodec"] == cc.__version__ and "zstd" in data["codecs"]
    assert data["blake3"]  # a dependency: signed containers need it
    assert data["codecs"]["zstd"]["cpu"] and not data["codecs"]["ans"]["cpu"]


def test_import_does_not_pull_heavy_modules():
    import subprocess

    code = ("import sys, cupycodec, cupycodec.codecs, cupycodec.filters, cupycodec.kernels.int8, "
            "cupycodec.kernels.byteplane, cupycodec.kernels.chunks, cupycodec.backends._nvcomp_lib, "
            "cupycodec.engine, cupycodec.engine.encode, cupycodec.engine.decode, cupycodec.interop, cupycodec.layout;"
            "heavy = {'torch', 'cupy', 'nvidia', 'zstandard', 'cramjam', 'ml_dtypes', 'blake3'} & "
            "{m.split('.')[0] for m in sys.modules};"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_decode_errors_name_the_item_segment_and_chunk():
    # a plan's rows are grouped by codec; its errors map the first bad row back to item, segment and chunk
    from cupycodec.engine.decode import DecodePlan

    plan = object.__new__(DecodePlan)
    plan._rows = [(0, 0, "data", np.array([0, 1, 3], np.uint64) * 4096, 4096),
                  (3, 2, "scale", np.array([0, 5], np.uint64) * 16, 16)]  # (row, item, segment, outputs, chunk)
    err = plan._error(1, 2, 0)
    assert isinstance(err, cc.BackendError)
    assert "1 chunk(s); first: item 0, segment 'data', chunk 3" in str(err) and "differs from the chunk table" in str(err)
    assert "item 2, segment 'scale', chunk 5" in str(plan._error(2, 4, 12)) and "CannotDecompress" in str(plan._error(2, 4, 12))


def test_plain_codec_ids_follow_re_registration():
    # compress() keeps one codec instance per plain id; registering another class under the id must take effect
    from cupycodec import _config, registry
    from cupycodec.codecs import Zstd

    class MyZstd(Zstd):
        pass

    assert type(_config.parse_codec("zstd", None, {})) is Zstd
    registry.register_codec(MyZstd, replace=True)
    try:
        assert type(_config.parse_codec("zstd", None, {})) is MyZstd
    finally:
        registry.register_codec(Zstd, replace=True)
    assert type(_config.parse_codec("zstd", None, {})) is Zstd


def test_backend_environment_variable_is_read_on_every_call(monkeypatch):
    from cupycodec import backends

    assert backends.requested_backend(None) == "auto"
    monkeypatch.setenv("CUPYCODEC_BACKEND", "cpu")
    assert backends.requested_backend(None) == "cpu"
    monkeypatch.setenv("CUPYCODEC_BACKEND", "bogus")
    with pytest.raises(ValueError, match="CUPYCODEC_BACKEND"):
        backends.requested_backend(None)
    monkeypatch.delenv("CUPYCODEC_BACKEND")
    assert backends.requested_backend(None) == "auto"
    monkeypatch.setenv("CUPYCODEC_BACKEND", "")  # empty means unset, as for CUPYCODEC_NUM_THREADS
    assert backends.requested_backend(None) == "auto"
    assert np.array_equal(cc.decompress(cc.compress(np.arange(5))), np.arange(5))


def test_bad_dtype_and_metadata_arguments_are_named_as_arguments():
    # dtype="FOO" said "unknown dtype name 'FOO' in header", and metadata="abc" "got 3 metadata mappings"
    x = np.arange(4, dtype=np.uint16)
    with pytest.raises(ValueError, match=r"dtype='FOO' is not a dtype name") as info:
        cc.compress(x, dtype="FOO")
    assert not isinstance(info.value, cc.FormatError)
    for bad in ("abc", 3, b"ab"):
        with pytest.raises(TypeError, match="metadata must be a mapping"):
            cc.compress(x, metadata=bad)
    with pytest.raises(TypeError, match="metadata must be a mapping, or a sequence of one mapping per array"):
        cc.compress_many([x, x], metadata="ab")
    with pytest.raises(ValueError, match="got 3 metadata mappings for 2 arrays"):
        cc.compress_many([x, x], metadata=[{}, {}, {}])


def test_fortran_order_comes_back_c_contiguous_and_equal():
    x = np.asfortranarray(np.arange(600, dtype=np.float32).reshape(20, 30))
    y = cc.decompress(cc.compress(x, codec="zstd"))
    assert y.flags.c_contiguous and np.array_equal(y, x)  # documented: the layout is not recorded


@pytest.mark.parametrize("kw", [{"codec": "zstd"}, {"codec": "zstd", "filters": ["byteplane"]},
                                {"quantize": "int8", "codec": "zstd"}])
def test_out_errors_come_before_any_work(kw, monkeypatch):
    from cupycodec.backends import cpu

    x = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    c = cc.compress(x, **kw)
    monkeypatch.setattr(cpu, "decode_segments", lambda *a: pytest.fail("decoded before checking out"))
    read_only = np.empty_like(x)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        cc.decompress(c, out=read_only)
    with pytest.raises(ValueError, match="shape"):
        cc.decompress(c, out=np.empty((32, 64), np.float32))
    with pytest.raises(TypeError, match="max_output_nbytes"):
        cc.decompress(c, max_output_nbytes=1.5)


@pytest.mark.parametrize("axis", [-3, -4, 2, 5])
def test_an_int8_axis_out_of_range_is_refused_not_wrapped(axis):
    """axis=-3 on a 2-D array was stored as -1 (per column), -4 as 0: another axis than asked, silently."""
    x = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    with pytest.raises(ValueError, match=rf"axis={axis} is out of range for a 2-D array \(axes -2 to 1\)"):
        cc.compress(x, quantize="int8", axis=axis)


def test_int8_takes_numpy_integers_for_its_parameters():
    x = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    for kw in ({"axis": np.int64(-1)}, {"granularity": "group", "group_size": np.int32(64)}):
        c = cc.compress(x, quantize="int8", **kw)
        config = c.pipeline[0].get_config()
        assert all(type(v) is int for k, v in config.items() if k in ("axis", "group_size"))
        assert config.get("axis", 1) == 1


def test_decompress_many_names_the_item_and_refuses_an_array_of_bytes():
    blob = cc.compress(np.arange(100)).to_bytes()
    with pytest.raises(TypeError, match="decompress_many takes a sequence of items"):
        cc.decompress_many(np.frombuffer(blob, np.uint8))  # read byte by byte before: "need at least 24 bytes"
    with pytest.raises(cc.FormatError, match=r"^item 2: "):
        cc.decompress_many([blob, blob, blob[:-8] + b"\0" * 8 + b"x"])


def test_a_compressor_checks_the_chunk_size_for_auto_too():
    with pytest.raises(ValueError, match="chunk_nbytes must be a multiple of 16"):
        cc.Compressor(chunk_nbytes=24)  # accepted with codec="auto" before, refused at the first write


def test_every_library_error_crosses_a_process_boundary():
    """Errors whose constructors take other arguments than a message failed to unpickle (TypeError about __init__),
    so a process pool or Dask's process scheduler turned a corrupt chunk into a broken pool or a TypeError."""
    import multiprocessing
    import pickle

    from cupycodec import errors

    made = [
        errors.UnknownCodecError("nope", ["zstd", "lz4"]),
        errors.UnsupportedDtypeError("object", ["float32"], hint="cast it"),
        errors.UnsupportedVersionError("container", 9, 1),
        errors.ChecksumError("data", 1, 2, chunk=3),
        errors.UntrustedError("ans"),
        errors.DecompressionBombError(10, 5),
        errors.FormatError("bad bytes"),
        errors.UnknownCodecInFileError("shuffle9", ["byteplane"], "filter"),
        errors.UnsupportedDtypeInFileError("FLD128M112", ["float32"], hint="read it where it was written"),
    ]
    errors.prefix_message(made[3], "chunk 'c/0'")
    for exc in made:
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc) and back.__dict__ == exc.__dict__
    with multiprocessing.get_context("spawn").Pool(1) as pool, \
            pytest.raises(errors.ChecksumError, match="chunk 'c/0'") as info:
        pool.apply(_raise, (made[3],))
    assert (info.value.segment, info.value.stored, info.value.computed, info.value.chunk) == ("data", 1, 2, 3)


def _raise(exc):
    raise exc


def test_crafted_headers_give_library_errors():
    """From a core bug hunt: each of these headers raised a foreign exception (ValueError from json, OverflowError
    from NumPy) or was taken (1e999 as infinity)."""
    c = cc.compress(np.arange(64, dtype=np.float32), codec="zstd", metadata={"x": 1.5})
    for old, new in [('"x":1.5', '"x":1e999'), ('"x":1.5', '"x":' + "9" * 5000),
                     ('"dtype":"F32"', '"dtype":"FLD\u00b9\u00b2\u2078M63"')]:
        with pytest.raises(cc.FormatError):
            cc.CompressedArray.from_bytes(_edited(c, old, new))
    q = cc.compress(np.ones((4, 64), np.float32), quantize="int8", granularity="group", group_size=16, codec="raw")
    with pytest.raises(cc.FormatError, match="group_size must be an int from 1 to 2"):
        cc.CompressedArray.from_bytes(_edited(q, '"group_size":16', '"group_size":' + str(2**63)))


def test_metadata_keys_group_sizes_and_payload_bytes_at_write():
    with pytest.raises(TypeError, match="metadata key 0 under 'layer' is not a string"):
        cc.compress(np.ones(3), metadata={"layer": {0: "q_proj"}})  # read back as {"0": ...}
    with pytest.raises(ValueError, match="group_size must be an int from 1 to 2"):
        cc.compress(np.ones((2, 2), np.float32), quantize="int8", granularity="group", group_size=2**62 + 1)
    x = np.linspace(-1, 1, 60, dtype=np.float32).reshape(3, 20)
    want = cc.decompress(cc.compress(x, quantize="int8", granularity="group", group_size=20))
    q = cc.compress(x, quantize="int8", granularity="group", group_size=2**62)  # the maximum: one partial group
    np.testing.assert_array_equal(cc.decompress(cc.CompressedArray.from_bytes(q.to_bytes())), want)
    c = cc.compress(np.arange(64, dtype=np.float32), codec="zstd")
    payload = bytes(c.to_bytes()[len(c.header_bytes()):])  # bytes went through as_array as one |S string
    assert np.array_equal(cc.decompress(c.with_payload(payload)), np.arange(64, dtype=np.float32))


def _edited(c, old: str, new: str) -> bytes:
    """``c``'s bytes with ``old`` replaced by ``new`` in its header JSON text, the prelude's length and header CRC
    recomputed (what an attacker does; the payload and its CRCs are untouched)."""
    import struct
    import zlib

    prelude = struct.Struct("<4sHHQI4x")
    blob = c.to_bytes()
    magic, version, flags, n, _ = prelude.unpack_from(blob)
    text = blob[prelude.size : prelude.size + n].rstrip(b" ")
    assert old.encode() in text
    text = text.replace(old.encode(), new.encode(), 1)
    text += b" " * (-len(text) % 8)
    return prelude.pack(magic, version, flags, len(text), zlib.crc32(text)) + text + blob[prelude.size + n :]


def test_small_int8_groups_count_their_scales_against_the_output_bound():
    """max_output_nbytes bounded the output alone: group_size=1 scales (four bytes per element) and the decode's
    float32 work took 12.5x a bound equal to the fp16 output."""
    x = np.ones((64, 64), np.float16)
    c = cc.CompressedArray.from_bytes(cc.compress(x, quantize="int8", granularity="group", group_size=1).to_bytes())
    with pytest.raises(cc.DecompressionBombError):
        cc.decompress(c, max_output_nbytes=x.nbytes)
    assert np.array_equal(cc.decompress(c, max_output_nbytes=5 * x.size), x)


# --- outputs that share memory, mappings, masked arrays and subclasses, streams without CuPy ---------------------

def _pair():
    a = np.random.default_rng(7).standard_normal(1 << 18).astype(np.float32)
    return a, cc.compress(a), cc.compress(-a)


def test_decompress_many_refuses_outputs_that_share_memory():
    """Items decode at the same time: two items into one buffer left a mix of both (11 of 20 runs in a bug hunt)."""
    a, ca, cb = _pair()
    o = np.empty_like(a)
    with pytest.raises(ValueError, match="out buffer of item 0 and the out buffer of item 1 share memory"):
        cc.decompress_many([ca, cb], out=[o, o])
    big = np.zeros(2 * a.size, np.float32)
    with pytest.raises(ValueError, match="share memory"):  # partly overlapping views
        cc.decompress_many([ca, cb], out=[big[: a.size], big[1000 : 1000 + a.size]])
    assert not big.any()  # refused before any work
    cc.decompress_many([ca, cb], out=[big[: a.size], big[a.size :]])  # side by side is fine
    np.testing.assert_array_equal(big, np.concatenate([a, -a]))
    # one container twice (its bytes shared) is fine, into two buffers or none
    o1, o2 = np.empty_like(a), np.empty_like(a)
    cc.decompress_many([ca, ca], out=[o1, o2])
    np.testing.assert_array_equal(o1, a), np.testing.assert_array_equal(o2, a)
    assert all(np.array_equal(y, a) for y in cc.decompress_many([ca, ca]))


@pytest.mark.parametrize("codec", ["raw", "lz4"])
def test_decoding_into_the_containers_own_bytes_is_refused(codec):
    """An out that is a view of the bytes being decoded overwrote them: a false ChecksumError, or (verify=False)
    wrong data."""
    a = np.arange(1 << 16, dtype=np.float32)
    buf = bytearray(cc.compress(a, codec=codec).to_bytes())
    c = cc.CompressedArray.from_bytes(buf)
    inside = np.frombuffer(buf, np.float32, count=a.size, offset=len(buf) - a.nbytes)
    for verify in (True, False):
        with pytest.raises(ValueError, match="container's bytes and the out buffer share memory"):
            cc.decompress(c, out=inside, verify=verify)
    np.testing.assert_array_equal(cc.decompress(c), a)  # nothing was written


def test_many_refuses_mappings_and_single_buffers():
    a, ca, _ = _pair()
    with pytest.raises(TypeError, match=r"got a mapping; pass list\(d.values\(\)\)"):
        cc.compress_many({"w": a})
    with pytest.raises(TypeError, match="got a mapping"):
        cc.decompress_many({"w": ca})
    for one in (memoryview(a), a.tobytes(), "x.cc"):  # compressed as one 0-d array per byte or element before
        with pytest.raises(TypeError, match="use compress"):
            cc.compress_many(one)
    with pytest.raises(TypeError, match="use decompress"):
        cc.decompress_many("x.cc")


def test_masked_arrays_are_refused_while_something_is_masked():
    m = np.ma.masked_array([1.0, 2.0, 3.0], mask=[0, 1, 0])
    with pytest.raises(TypeError, match="masked array.*would drop the mask"):
        cc.compress(m)
    with pytest.raises(TypeError, match="masked array"):
        cc.decompress(cc.compress(np.zeros(3)), out=np.ma.masked_array(np.zeros(3), mask=[1, 0, 0]))
    np.testing.assert_array_equal(cc.decompress(cc.compress(np.ma.masked_array([1.0, 2.0]))), [1.0, 2.0])


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix's own
@pytest.mark.parametrize("codec", ["zstd", "auto", "raw"])
def test_an_ndarray_subclass_is_a_valid_out(codec):
    """np.matrix stays 2-D under reshape(-1): the byte view of it was 1 x N, and a decode into it failed."""
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = np.matrix(np.zeros((3, 4), np.float32))
    cc.decompress(cc.compress(x, codec=codec), out=out)
    np.testing.assert_array_equal(np.asarray(out), x)


def test_a_stream_handle_with_host_work():
    """Device-agnostic code passes a stream; host work ignores it (without CuPy it raised ModuleNotFoundError)."""
    x = np.arange(100, dtype=np.float32)
    c = cc.compress(x, stream=0)
    np.testing.assert_array_equal(cc.decompress(c, stream=0), x)
    np.testing.assert_array_equal(cc.decompress_many([c], stream=0)[0], x)


def test_a_meta_tensor_is_refused_clearly():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="not in CPU or CUDA memory"):
        cc.compress(torch.empty(4, device="meta"))


def test_argument_errors_name_the_argument_before_any_work(tmp_path):
    c = cc.compress(np.arange(8, dtype=np.float32))
    with pytest.raises(ValueError, match="max_output_nbytes must be a non-negative int"):  # a value: ValueError
        cc.decompress(c.to_bytes(), max_output_nbytes=-1)
    with pytest.raises(TypeError, match="max_output_nbytes must be"):
        cc.decompress(c.to_bytes(), max_output_nbytes="1")
    with pytest.raises(TypeError, match="trusted must be True or False"):  # ignored for a CompressedArray before
        cc.decompress(c, trusted="yes")
    path = tmp_path / "x.cc"
    cc.save(path, c)
    before = path.read_bytes()
    with pytest.raises(TypeError, match="overwrite must be True or False"):  # "no" is truthy: it overwrote
        cc.save(path, cc.compress(np.zeros(4)), overwrite="no")
    assert path.read_bytes() == before
    with pytest.raises(TypeError, match=r"dtype='bogus' is not a dtype"):  # NumPy's error named no argument
        cc.compress(np.arange(4, dtype=np.uint16), dtype="bogus")
    with pytest.raises(TypeError, match="key must be bytes"):  # the argument first, not "carries no MAC"
        cc.CompressedArray.from_bytes(c.to_bytes(), key="secret")


def test_a_container_of_one_value_is_truthy_and_has_no_length():
    # len() of a 0-d container was 0, so `c or fallback` took the fallback
    one = cc.compress(np.float32(3))
    assert bool(one) and bool(cc.compress(np.zeros(0, np.float32)))
    with pytest.raises(TypeError, match="0-d"):
        len(one)
    assert len(cc.compress(np.zeros((5, 2), np.float32))) == 5
