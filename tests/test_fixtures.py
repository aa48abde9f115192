"""Every committed format-v1 fixture still decodes to its exact array (on the CPU, and on the GPU where present)."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

import cupycodec as cc

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "v1")
FIXTURES = sorted(glob.glob(os.path.join(HERE, "*.cc")))


def _expected(path: str) -> np.ndarray:
    stem = path[:-3]
    if os.path.exists(stem + ".bits.npy"):
        import ml_dtypes

        return np.load(stem + ".bits.npy").view(ml_dtypes.bfloat16)
    return np.load(stem + ".npy")


def test_fixtures_exist():
    assert len([f for f in FIXTURES if os.path.basename(f).startswith("cpu_")]) >= 15


@pytest.mark.parametrize("path", FIXTURES, ids=os.path.basename)
def test_fixture_decodes_on_cpu(path):
    c = cc.load(path, trusted=True)  # our own files
    want = _expected(path)
    untrusted = cc.load(path)
    refused = [s.codec.codec_id for s in c.segments if s.table.n_encoded and not s.codec.untrusted_ok]
    if refused:  # NVIDIA-only formats have no decoder hardened against crafted input
        with pytest.raises(cc.UntrustedError, match=refused[0]):
            cc.decompress(untrusted)
    else:
        assert cc.decompress(untrusted, device="cpu").tobytes() == want.tobytes()
    gpu_only = any(not s.codec.cpu_usable() and (s.table.flags == 0).any() for s in c.segments)
    if gpu_only and not cc.backends.nvcomp_available():
        with pytest.raises(cc.BackendUnavailableError, match="decodes only on a GPU"):
            cc.decompress(c)
        return
    y = cc.decompress(c, device="cpu")
    assert y.dtype == want.dtype and y.shape == want.shape
    assert y.tobytes() == want.tobytes()
    with open(path, "rb") as f:
        assert cc.load(path).to_bytes() == f.read()


@pytest.mark.gpu
@pytest.mark.nvcomp
@pytest.mark.parametrize("path", FIXTURES, ids=os.path.basename)
def test_fixture_decodes_on_gpu(path):
    import cupy

    c = cc.load(path, trusted=True)
    want = _expected(path)
    y = cc.decompress(c, device="cuda")
    assert isinstance(y, cupy.ndarray)
    host = cupy.asnumpy(y)
    assert host.shape == want.shape
    assert host.tobytes() == want.astype(want.dtype.newbyteorder("=")).tobytes()
