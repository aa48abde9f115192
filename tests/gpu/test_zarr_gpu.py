"""The Zarr and numcodecs codecs on the GPU (``zarr.config.enable_gpu()``): portable chunks both ways, one decode
plan per batch of chunks, NVIDIA-only codecs for trusted stores, INT8, CuPy buffers in the numcodecs codec."""

from __future__ import annotations

import sys

import ml_dtypes
import numpy as np
import pytest

import cupycodec as cc
from cupycodec.quant.reference import sqnr

pytestmark = [pytest.mark.gpu, pytest.mark.nvcomp]

RNG = np.random.default_rng(7)
X = (np.sin(np.arange(256 * 192) / 301.0).reshape(256, 192) * 40 + RNG.standard_normal((256, 192)) * 0.01) \
    .astype(np.float32)


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


@pytest.fixture(scope="module")
def zarr():
    if sys.version_info < (3, 11):
        pytest.skip("zarr 3 needs Python >= 3.11")
    import zarr  # the test extra installs it: a missing zarr is an error here, not a skip

    return zarr


@pytest.fixture(autouse=True)
def _default_trust():
    from cupycodec.integrations import trust

    assert trust.current() == trust.Policy()
    yield
    trust.configure(trusted=False, key=None)


def _create(path, x, chunks=(64, 64), **codec):
    import zarr

    from cupycodec.integrations.zarr import CupycodecCodec

    return zarr.create_array(store=str(path), shape=x.shape, chunks=chunks, dtype=x.dtype,
                             serializer=CupycodecCodec(**codec), compressors=None)


def _chunk(path, key="c/0/0") -> cc.CompressedArray:
    return cc.CompressedArray.from_bytes((path / key).read_bytes())


def test_gpu_written_auto_chunks_are_portable(tmp_path, cp, zarr):
    with zarr.config.enable_gpu():
        z = _create(tmp_path, X)
        z[:] = cp.asarray(X)
        y = zarr.open_array(str(tmp_path))[:]
        assert isinstance(y, cp.ndarray)
        assert y.get().tobytes() == X.tobytes()
    c = _chunk(tmp_path)
    assert c.codec == "zstd" and [f.get_config()["id"] for f in c.pipeline] == ["byteplane"]  # never ANS
    assert zarr.open_array(str(tmp_path))[:].tobytes() == X.tobytes()  # read untrusted on the CPU


def test_cpu_written_chunks_read_into_device_memory(tmp_path, cp, zarr):
    _create(tmp_path, X)[:] = X
    with zarr.config.enable_gpu():
        y = zarr.open_array(str(tmp_path))[17:200, 3:150]  # untrusted: hardened CPU decode, then one upload
        assert isinstance(y, cp.ndarray)
        assert y.get().tobytes() == np.ascontiguousarray(X[17:200, 3:150]).tobytes()


def test_a_batch_of_trusted_chunks_is_one_decode_plan(tmp_path, cp, zarr, monkeypatch):
    from cupycodec.engine import decode as engine_decode
    from cupycodec.integrations import trust

    _create(tmp_path, X, codec="zstd", trusted=True)[:] = X  # 12 chunks
    plans, batches = [], []
    real_init, real_many = engine_decode.DecodePlan.__init__, cc.decompress_many

    def counting_init(self, *a, **kw):  # on the class: every module that imported it builds through here
        plans.append(1)
        real_init(self, *a, **kw)

    def many(items, *a, **kw):
        batches.append(len(items))
        return real_many(items, *a, **kw)

    monkeypatch.setattr(engine_decode.DecodePlan, "__init__", counting_init)
    monkeypatch.setattr(cc, "decompress_many", many)
    with zarr.config.enable_gpu(), zarr.config.set({"codec_pipeline.batch_size": 64}), \
            trust.settings(trusted="metadata"):
        y = zarr.open_array(str(tmp_path))[:]
    assert batches == [12] and plans == [1]
    assert y.get().tobytes() == X.tobytes()


@pytest.mark.parametrize("zdtype", ["float32", "bfloat16"])
def test_ans_for_trusted_stores(tmp_path, cp, zarr, zdtype):
    from cupycodec.integrations import trust

    x = X if zdtype == "float32" else X.astype(ml_dtypes.bfloat16).view(np.uint16)
    kw = {"dtype": "bfloat16"} if zdtype == "bfloat16" else {}
    with zarr.config.enable_gpu():
        z = _create(tmp_path, x, codec="ans", trusted=True, **kw)
        z[:] = cp.asarray(x)
        with pytest.raises(cc.UntrustedError, match=r"^chunk '.*c/\d+/\d+': .*codec 'ans'"):
            zarr.open_array(str(tmp_path))[:]
        with trust.settings(trusted="metadata"):
            y = zarr.open_array(str(tmp_path))[:]
    assert y.get().tobytes() == x.tobytes()
    assert z.nbytes_stored() < x.nbytes


def test_int8_on_the_gpu_matches_the_cpu(tmp_path, cp, zarr):
    from cupycodec.integrations import trust

    w = (RNG.standard_normal((256, 384)) * 0.02).astype(np.float32)
    with zarr.config.enable_gpu(), trust.settings(trusted=True):  # trusted: nvCOMP and the dequantize kernel
        _create(tmp_path / "gpu", w, chunks=(128, 128), quantize="int8")[:] = cp.asarray(w)
        on_gpu = zarr.open_array(str(tmp_path / "gpu"))[:].get()
    _create(tmp_path / "cpu", w, chunks=(128, 128), quantize="int8")[:] = w
    on_cpu = zarr.open_array(str(tmp_path / "cpu"))[:]
    assert on_gpu.tobytes() == on_cpu.tobytes()  # the kernels match the NumPy reference bit for bit
    assert sqnr(w, on_cpu) > 35


def test_numcodecs_codec_with_cupy_buffers(cp):
    from cupycodec.integrations.numcodecs import Cupycodec

    codec = Cupycodec()
    x = cp.asarray(X)
    enc = codec.encode(x)
    assert cc.CompressedArray.from_bytes(enc).codec == "zstd"  # portable, written on the GPU
    y = codec.decode(cp.frombuffer(enc, dtype=cp.uint8))
    assert isinstance(y, cp.ndarray) and y.get().tobytes() == X.tobytes()
    out = cp.empty_like(x)
    assert codec.decode(enc, out=out) is out and out.get().tobytes() == X.tobytes()
    flat = cp.empty(X.nbytes, cp.uint8)
    codec.decode(enc, out=flat)
    assert flat.get().tobytes() == X.tobytes()
    assert np.array_equal(codec.decode(enc), X)  # host bytes in: a NumPy result
