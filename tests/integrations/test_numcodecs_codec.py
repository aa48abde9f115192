"""The numcodecs codec: configuration round trips, registry lookup in a fresh interpreter, bfloat16, INT8, ``out=``
and errors (numcodecs' own conformance helpers: test_numcodecs_conformance.py)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from importlib.metadata import entry_points

import ml_dtypes
import numcodecs
import numpy as np
import pytest

import cupycodec as cc
from cupycodec.integrations import trust
from cupycodec.integrations.numcodecs import Cupycodec
from cupycodec.quant.reference import sqnr

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")

LOSSLESS = [
    Cupycodec(),
    Cupycodec(codec="zstd", level=5),
    Cupycodec(codec="lz4"),
    Cupycodec(codec="deflate", chunk_nbytes=4096),
    Cupycodec(codec="zstd", filters=["byteplane"]),
    Cupycodec(codec="raw"),
]
CONFIGS = [
    *[c.get_config() for c in LOSSLESS],
    {"id": "cupycodec", "codec": "ans", "data_type": "<f2", "trusted": True},
    {"id": "cupycodec", "codec": "zstd", "quantize": "int8", "granularity": "group", "group_size": 64},
    {"id": "cupycodec", "codec": "auto", "quantize": "int8", "granularity": "channel", "axis": 1},
    {"id": "cupycodec", "codec": "zstd", "dtype": "bfloat16", "filters": [{"id": "byteplane", "rotate": True}]},
]

RNG = np.random.default_rng(13)
ARRAYS = [
    np.linspace(-3, 3, 10_000, dtype=np.float32),
    np.linspace(-3, 3, 12_000).reshape(120, 100),
    np.asfortranarray(RNG.standard_normal((64, 48)).astype(np.float32)),
    np.arange(5_000, dtype=np.int64).reshape(50, 100),
    (np.arange(7_777) % 256).astype(np.uint8),
    RNG.integers(-(2**15), 2**15, size=3_000).astype(">i2"),
    np.array([1.5, np.nan, -np.inf, -0.0], dtype=np.float16),
    RNG.random(500) < 0.3,
    (RNG.standard_normal(600) + 1j * RNG.standard_normal(600)).astype(np.complex64),
    np.zeros(0, dtype=np.float32),
]


@pytest.fixture(autouse=True)
def _default_trust():
    assert trust.current() == trust.Policy()
    yield
    trust.configure(trusted=False, key=None)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: json.dumps(c, sort_keys=True))
def test_config_round_trips_through_json(config):
    codec = numcodecs.get_codec(config)
    assert isinstance(codec, Cupycodec)
    again = json.loads(json.dumps(codec.get_config()))
    assert again == {k: v for k, v in codec.get_config().items()}
    assert numcodecs.get_codec(again) == codec
    assert Cupycodec.from_config(again) == codec
    assert pickle.loads(pickle.dumps(codec)) == codec
    for key, value in config.items():
        if key != "id":
            assert codec.get_config()[key] == value


def test_filter_instances_become_their_configs():
    from cupycodec.filters import Byteplane

    codec = Cupycodec(codec="zstd", filters=[Byteplane(rotate=True)])
    assert codec.get_config()["filters"] == [{"id": "byteplane", "rotate": True, "version": 1}]


def test_get_config_is_canonical_and_from_config_does_not_mutate():
    codec = Cupycodec(codec="zstd", level=3, quantize="int8", granularity="tensor")
    assert codec.get_config() == {"id": "cupycodec", "codec": "zstd", "trusted": False, "level": 3,
                                  "quantize": "int8", "granularity": "tensor"}
    assert Cupycodec().get_config() == {"id": "cupycodec", "codec": "auto", "trusted": False}
    config = {"id": "cupycodec", "codec": "lz4"}
    Cupycodec.from_config(config)
    assert config == {"id": "cupycodec", "codec": "lz4"}
    assert repr(Cupycodec(codec="lz4")) == "Cupycodec(codec='lz4', trusted=False)"


@pytest.mark.parametrize("kwargs, error, match", [
    ({"codec": "nope"}, cc.UnknownCodecError, "unknown codec 'nope'"),
    ({"codec": "auto", "level": 3}, TypeError, "auto"),
    ({"codec": "zstd", "chunk_nbytes": 100}, ValueError, "multiple of 16"),
    ({"codec": "zstd", "quantize": "int4"}, ValueError, "quantize must be None or 'int8'"),
    ({"codec": "zstd", "filters": "byteplane"}, TypeError, "list of filter ids"),
    ({"codec": "zstd", "trusted": "yes"}, TypeError, "trusted must be a bool"),
    ({"codec": ["zstd"]}, TypeError, "codec id string"),
    ({"codec": "zstd", "level": 1.5}, TypeError, "level must be an int"),
    ({"codec": "ans", "data_type": object()}, TypeError, "JSON scalar"),
    ({"codec": "zstd", "dtype": "bfloat17"}, TypeError, "not a NumPy"),
    ({"codec": "zstd", "filters": [3]}, TypeError, "filters take ids"),
])
def test_bad_configs_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        Cupycodec(**kwargs)


def test_registry_lookup_in_a_fresh_interpreter(tmp_path):
    # The entry point exists only for an installed cupycodec (pip install -e . here; pip install . in CI).
    eps = entry_points(group="numcodecs.codecs", name="cupycodec")
    assert eps, 'cupycodec is not installed, so its numcodecs entry point is missing: pip install -e ".[test]"'
    code = (
        "import sys, numcodecs, numpy as np\n"
        "assert 'cupycodec' not in sys.modules\n"
        "c = numcodecs.get_codec({'id': 'cupycodec', 'codec': 'zstd', 'level': 2})\n"
        "assert type(c).__module__ == 'cupycodec.integrations.numcodecs', type(c)\n"
        "x = np.arange(1000, dtype=np.float32)\n"
        "assert np.array_equal(c.decode(c.encode(x)), x)\n"
        "heavy = {'torch', 'cupy', 'zarr', 'dask'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    # run elsewhere: `python -c` puts the working directory first on sys.path, and the source tree's cupycodec/
    # has no integrations/ (the installed package maps it in)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_decode_returns_the_logical_array_and_keeps_bfloat16():
    x = RNG.standard_normal((32, 64)).astype(ml_dtypes.bfloat16)
    codec = Cupycodec()
    y = codec.decode(codec.encode(x))
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.tobytes() == x.tobytes()
    bits = Cupycodec(dtype="bfloat16")  # integer bit patterns with the logical dtype bf16
    enc = bits.encode(x.view(np.uint16))
    assert cc.CompressedArray.from_bytes(enc).dtype_name == "BF16"
    assert bits.decode(enc).view(np.uint16).tobytes() == x.view(np.uint16).tobytes()
    out = np.empty(x.shape, np.uint16)
    assert bits.decode(enc, out=out) is out and out.tobytes() == x.view(np.uint16).tobytes()


def test_decode_into_out_buffers():
    x = np.arange(2_000, dtype=np.float64).reshape(40, 50)
    codec = Cupycodec(codec="zstd")
    enc = codec.encode(x)
    same = np.empty_like(x)
    assert codec.decode(enc, out=same) is same and np.array_equal(same, x)
    flat = bytearray(x.nbytes)
    assert codec.decode(enc, out=flat) is flat and bytes(flat) == x.tobytes()
    fortran = np.empty((50, 40), order="F")
    codec.decode(enc, out=fortran)
    assert fortran.tobytes(order="A") == x.tobytes()
    with pytest.raises(ValueError, match="out holds 8 bytes"):
        codec.decode(enc, out=np.empty(1))


def test_int8_quantization_is_accurate_and_deterministic():
    w = (RNG.standard_normal((256, 384)) * 0.02).astype(np.float32)
    codec = numcodecs.get_codec({"id": "cupycodec", "quantize": "int8", "granularity": "channel"})
    enc = codec.encode(w)
    assert enc == codec.encode(w)  # deterministic bytes
    assert len(enc) < w.nbytes / 3
    y = codec.decode(enc)
    assert y.dtype == np.float32 and y.shape == w.shape
    assert sqnr(w, y) > 35
    assert codec.decode(enc).tobytes() == y.tobytes()  # deterministic decode
    group = Cupycodec(quantize="int8", granularity="group", group_size=64)
    assert sqnr(w, group.decode(group.encode(w))) > 35
    half = w.astype(np.float16)
    assert sqnr(half.astype(np.float32), codec.decode(codec.encode(half)).astype(np.float32)) > 35
    with pytest.raises(cc.UnsupportedDtypeError, match="int8 quantization takes floating-point"):
        codec.encode(np.arange(10, dtype=np.int32))


def test_corrupt_buffers_raise_format_errors_that_say_where():
    codec = Cupycodec(codec="zstd")
    enc = bytearray(codec.encode(np.arange(10_000, dtype=np.int32)))
    enc[-5] ^= 0x40
    with pytest.raises(cc.ChecksumError, match="^numcodecs buffer: checksum mismatch in segment 'data'"):
        codec.decode(bytes(enc))
    with pytest.raises(cc.FormatError, match="^numcodecs buffer: "):
        codec.decode(bytes(enc[:100]))
    with pytest.raises(cc.FormatError, match="not a cupycodec container"):
        codec.decode(b"\x00" * 64)


def test_nvidia_only_chunks_need_trust_and_a_gpu():
    with open(os.path.join(FIXTURES, "v1", "gpu_ans_f32_weights.cc"), "rb") as f:
        blob = f.read()
    codec = Cupycodec(codec="ans", trusted=True)
    # The config's trusted flag is the writer's declaration: believed only when the reader says so.
    with pytest.raises(cc.UntrustedError, match="codec 'ans'.*trust.configure"):
        codec.decode(blob)
    with trust.settings(trusted="metadata"):
        if cc.backends.nvcomp_available():
            assert codec.decode(blob).dtype == np.float32
        else:
            with pytest.raises(cc.BackendUnavailableError, match="decodes only on a GPU.*'zstd'"):
                codec.decode(blob)
    with trust.settings(trusted="metadata"), pytest.raises(cc.UntrustedError):
        Cupycodec(codec="ans").decode(blob)  # no declaration: "metadata" does not trust it


@pytest.mark.parametrize("shape,axis", [((64, 40), 0), ((64, 40), -1), ((6, 8, 10), 1)])
def test_a_fortran_ordered_chunk_is_quantized_along_its_own_axes(shape, axis):
    """An F-ordered chunk (zarr format 2, order='F') was flattened to 1-D first: "per channel" became a scale per
    element (16,328 bytes for 64 x 64 float32, against 4,952 in C order)."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    codec = Cupycodec(quantize="int8", axis=axis)
    c_blob, f_blob = codec.encode(x), codec.encode(np.asfortranarray(x))
    assert len(f_blob) == len(c_blob)
    c_back = np.asarray(codec.decode(c_blob)).reshape(-1)
    f_back = np.asarray(codec.decode(f_blob)).reshape(-1)  # the F-ordered chunk's bytes, in memory order
    assert np.array_equal(f_back, np.asfortranarray(c_back.reshape(shape)).ravel(order="K"))
    with pytest.raises(ValueError, match="group quantization runs along an array's last axis"):
        Cupycodec(quantize="int8", granularity="group", group_size=8).encode(np.asfortranarray(x))
