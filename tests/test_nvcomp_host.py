"""GDeflate and Bitcomp on the CPU through nvCOMP's host libraries (nvidia-libnvcomp; no GPU needed)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import cupycodec as cc
from cupycodec.codecs import _nvcomp_host

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "v1")
needs_host = pytest.mark.skipif(not _nvcomp_host.available(), reason="nvidia-libnvcomp is not installed")


@needs_host
@pytest.mark.parametrize("name", ["gpu_gdeflate_u8_ramp", "gpu_bitcomp_i64_2d"])
def test_gpu_written_chunks_decode_on_cpu(name):
    c = cc.load(os.path.join(FIXTURES, name + ".cc"), trusted=True)  # our file: nvCOMP's host decoder may read it
    assert c.producer["backend"] == "nvcomp" and (c.segments[0].table.flags == 0).all()
    y = cc.decompress(c, backend="cpu")
    assert np.array_equal(y, np.load(os.path.join(FIXTURES, name + ".npy")))


@needs_host
@settings(deadline=None, max_examples=30)
@given(x=hnp.arrays(st.sampled_from([np.uint8, np.int16, np.int32, np.float32, np.int64]),
                    hnp.array_shapes(max_dims=2, max_side=3000)),
       codec=st.sampled_from(["gdeflate", "bitcomp"]), chunk=st.sampled_from([256, 4096, 65536]))
def test_cpu_roundtrip(x, codec, chunk):
    c = cc.compress(x, codec=codec, chunk_nbytes=chunk, backend="cpu")
    assert c.producer["backend"] == "cpu"
    assert cc.decompress(c.to_bytes(), trusted=True).tobytes() == x.tobytes()
    if (c.segments[0].table.flags == 0).any():  # nvCOMP's host decoders are not hardened: bytes from outside stop
        with pytest.raises(cc.UntrustedError, match=codec):
            cc.decompress(c.to_bytes())


@needs_host
def test_cpu_gdeflate_chunk_limit():
    with pytest.raises(ValueError, match="64 KiB"):
        cc.compress(np.zeros(1 << 20, np.uint8), codec="gdeflate", chunk_nbytes=1 << 18, backend="cpu")


@needs_host
def test_compresses_real_data():
    x = np.tile(np.arange(1000, dtype=np.int32), 100)
    for codec in ("gdeflate", "bitcomp"):
        c = cc.compress(x, codec=codec, backend="cpu")
        assert c.ratio > 2 and np.array_equal(cc.decompress(c), x)


def test_without_host_libraries(monkeypatch):
    monkeypatch.setattr(_nvcomp_host, "available", lambda: False)
    from cupycodec import backends

    if backends.nvcomp_available():
        pytest.skip("a GPU with nvCOMP is present")
    for codec in ("gdeflate", "bitcomp"):
        with pytest.raises(cc.BackendUnavailableError, match="nvidia-libnvcomp"):
            cc.compress(np.ones(100, np.float32), codec=codec)
        c = cc.load(os.path.join(FIXTURES, f"gpu_{codec}_{'u8_ramp' if codec == 'gdeflate' else 'i64_2d'}.cc"),
                    trusted=True)
        with pytest.raises(cc.BackendUnavailableError, match="decodes only on a GPU"):
            cc.decompress(c)
