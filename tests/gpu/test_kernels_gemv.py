"""The fused INT8 GEMV (cupycodec.kernels.gemv) against a float64 reference, for every warps-per-row variant.

The kernel sums in float32 in its own order, so the comparison has a tolerance (as every GEMM's test does); the
shapes make each variant run its edge cases: rows that do not fill the last block, K that is not a multiple of a
step (lanes and whole warps past the end), and a matrix smaller than one block.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from cupycodec.kernels import gemv
from cupycodec.quant import reference

pytestmark = pytest.mark.gpu

ACTS = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
TOL = {"F32": 1e-5, "F16": 1e-3, "BF16": 8e-3}


def _run(x, q, s, bias, *, granularity, group, warps, dtype_name, kernel=None, unroll=None):
    import cupy

    m, k = x.shape
    n = q.shape[0]
    bits = (lambda a: a.view(np.uint16)) if dtype_name == "BF16" else (lambda a: a)
    xd, qd, sd = cupy.asarray(bits(x)), cupy.asarray(q), cupy.asarray(s)
    bd = cupy.asarray(bits(bias)) if bias is not None else None
    yd = cupy.empty((m, n), dtype=xd.dtype)
    gemv.gemv_int8(xd.data.ptr, k, qd.data.ptr, sd.data.ptr, bd.data.ptr if bd is not None else 0, yd.data.ptr,
                   m=m, k=k, n=n, dtype_name=dtype_name, granularity=granularity, group_size=group,
                   device=cupy.cuda.runtime.getDevice(), stream_ptr=cupy.cuda.get_current_stream().ptr, warps=warps,
                   kernel=kernel, unroll=unroll)
    y = yd.get()
    return y.view(ml_dtypes.bfloat16) if dtype_name == "BF16" else y


@pytest.mark.parametrize("kernel", gemv.KERNELS)
@pytest.mark.parametrize("warps", [1, 2, 4, 8])
@pytest.mark.parametrize("n,k", [(1000, 1088), (37, 4096 + 48), (5, 160)])
@pytest.mark.parametrize("granularity,group", [("channel", None), ("group", 64), ("group", 128), ("group", 48)])
@pytest.mark.parametrize("dtype_name", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
def test_every_variant_matches_the_float64_reference(kernel, warps, n, k, granularity, group, dtype_name, m):
    import cupy

    if kernel != "fma" and not gemv.mma_supported(dtype_name, granularity, group, cupy.cuda.runtime.getDevice()):
        with pytest.raises(ValueError, match="mma_supported"):
            gemv.gemv_int8(0, k, 0, 0, 0, 0, m=m, k=k, n=n, dtype_name=dtype_name, granularity=granularity,
                           group_size=group, device=0, stream_ptr=0, kernel=kernel)
        return
    rng = np.random.default_rng(n * 31 + k + m)
    w = (0.05 * rng.standard_normal((n, k))).astype(np.float32)
    q, s = reference.quantize_int8(w, granularity=granularity, axis=0, group_size=group or 128)
    x = rng.standard_normal((m, k)).astype(ACTS[dtype_name])
    bias = rng.standard_normal(n).astype(ACTS[dtype_name]) if m != 3 else None
    y = _run(x, q, s, bias, granularity=granularity, group=group, warps=warps, dtype_name=dtype_name, kernel=kernel)
    wd = reference.dequantize_int8(q, s, granularity=granularity, axis=0, group_size=group or 128, dtype=np.float64)
    ref = x.astype(np.float64) @ wd.T + (bias.astype(np.float64) if bias is not None else 0.0)
    err = np.linalg.norm(y.astype(np.float64) - ref) / np.linalg.norm(ref)
    assert y.shape == (m, n) and err < TOL[dtype_name]


@pytest.mark.parametrize("unroll", [2, 4, 8])
@pytest.mark.parametrize("warps", [1, 2, 3, 5, 8, 12, 16])
@pytest.mark.parametrize("n,k,m", [(1000, 1088, 1), (37, 4096 + 192, 12), (300, 64 * 9, 8)])
@pytest.mark.parametrize("granularity,group", [("channel", None), ("group", 128)])
def test_every_depth_of_the_tensor_core_kernel_matches_the_reference(unroll, warps, n, k, m, granularity, group):
    """Steps in flight change which steps a warp holds at once and which of them lie past the end: every depth
    against the float64 reference, with blocks of 8 warps (1, 2 and 8 warps per tile), of two tiles of 3 warps, and
    of one tile of 5, 12 or 16 warps (warps that split K unevenly, and blocks past 256 threads)."""
    import cupy

    if not gemv.mma_supported("BF16", granularity, group, cupy.cuda.runtime.getDevice()):
        pytest.skip("needs sm_80 for the tensor-core kernels")
    rng = np.random.default_rng(n + k + m + unroll)
    w = (0.05 * rng.standard_normal((n, k))).astype(np.float32)
    q, s = reference.quantize_int8(w, granularity=granularity, axis=0, group_size=group or 128)
    x = rng.standard_normal((m, k)).astype(ml_dtypes.bfloat16)
    bias = rng.standard_normal(n).astype(ml_dtypes.bfloat16)
    y = _run(x, q, s, bias, granularity=granularity, group=group, warps=warps, dtype_name="BF16", kernel="mma",
             unroll=unroll)
    wd = reference.dequantize_int8(q, s, granularity=granularity, axis=0, group_size=group or 128, dtype=np.float64)
    ref = x.astype(np.float64) @ wd.T + bias.astype(np.float64)
    assert np.linalg.norm(y.astype(np.float64) - ref) / np.linalg.norm(ref) < TOL["BF16"]


def test_unroll_is_checked_per_kernel():
    for kernel, bad in (("mma", 3), ("fma", 2)):
        with pytest.raises(ValueError, match="unroll"):
            gemv.gemv_int8(0, 64, 0, 0, 0, 0, m=1, k=64, n=16, dtype_name="BF16", granularity="channel",
                           group_size=None, device=0, stream_ptr=0, kernel=kernel, unroll=bad)


def test_the_default_launch_holds_every_tile_at_once_where_its_rule_assumes_it():
    """The few-tiles rule (16 warps per tile) assumes two such blocks per SM; the launcher checks it with the
    occupancy calculator on the kernel as compiled here, and falls back to 8 warps where it does not hold."""
    import cupy

    dev = cupy.cuda.runtime.getDevice()
    if not gemv.mma_supported("BF16", "channel", None, dev):
        pytest.skip("needs sm_80 for the tensor-core kernel")
    sms = gemv._sm_count(dev)
    n, k = 16 * 2 * sms, 4096
    _, grid, threads, _ = gemv._config(dev, "BF16", 1, k, n, "channel", None, None, None)
    fn = gemv._function(dev, "mma", "BF16", 8, 16, False, 2)
    if gemv._resident_blocks(fn, 512) >= 2:
        assert (grid, threads) == (n // 16, 512)
    else:
        assert threads == 256


def test_mma_takes_every_code_exactly():
    """All 256 codes in every position of a 64-code step, with one-hot activations: each output is one code times
    its scale, so any code the byte permutes convert wrongly shows as a wrong value, not as noise in a tolerance."""
    import cupy

    if not gemv.mma_supported("BF16", "channel", None, cupy.cuda.runtime.getDevice()):
        pytest.skip("needs sm_80 for the tensor-core kernel")
    k, n = 256, 256
    q = ((np.arange(n)[:, None] + np.arange(k)[None, :]) % 256 - 128).astype(np.int8)
    s = np.ones(n, np.float32)
    for kernel in ("mma",):
        for dtype_name in ("BF16", "F16"):
            for col in (0, 1, 2, 3, 17, 63, 64, 255):
                x = np.zeros((1, k), ACTS[dtype_name])
                x[0, col] = 1
                y = _run(x, q, s, None, granularity="channel", group=None, warps=None, dtype_name=dtype_name,
                         kernel=kernel)
                assert np.array_equal(y[0].astype(np.float32), q[:, col].astype(np.float32)), (kernel, dtype_name,
                                                                                               col)


def test_default_variant_choice():
    # a 7B attention matrix on an H200 (132 SMs) splits K over two warps, a wide MLP matrix does not, and a narrow
    # one never splits past what K gives work to
    assert gemv.warps_per_row(4096, 4096, 132) == 2
    assert gemv.warps_per_row(11008, 4096, 132) == 1
    assert gemv.warps_per_row(256, 2048, 132) == 4
    assert gemv.warps_per_row(256, 8192, 132) == 8
    # the tensor-core kernel: 8 warps per 16-row tile where K gives each two 64-code steps; 4 steps in flight
    # while all warps fit on the GPU at once, else 2 (a 11008-row MLP matrix); at most two tiles per SM and K of
    # 2048 or more (a 4096-row matrix), 16 warps per tile at 2 steps
    assert gemv.mma_shape(4096, 4096, 132) == (16, 2)
    assert gemv.mma_shape(11008, 4096, 132) == (8, 2)
    assert gemv.mma_shape(4096, 11008, 132) == (16, 2)
    assert gemv.mma_shape(2048, 5632, 132) == (16, 2)
    assert gemv.mma_shape(5632, 2048, 132) == (8, 2)
    assert gemv.mma_shape(4096, 1024, 132) == (8, 4)
    assert gemv.mma_shape(4096, 4096, 100) == (8, 2)  # 256 tiles on 100 SMs: not few, and not all warps at once
    assert gemv.mma_shape(256, 512, 132) == (4, 4)
    assert gemv.mma_shape(64, 64, 132) == (1, 4)
    # two accumulator tiles (M > 8) hold more registers: two steps in flight whatever the shape
    assert gemv.mma_shape(4096, 4096, 132, m=16) == (8, 2) and gemv.mma_shape(4096, 4096, 132, m=8) == (16, 2)
    with pytest.raises(ValueError, match="1, 2, 4 or 8"):
        gemv.gemv_int8(0, 16, 0, 0, 0, 0, m=1, k=16, n=1, dtype_name="F32", granularity="channel", group_size=None,
                       device=0, stream_ptr=0, warps=3)
    for bad in (0, 17, 2.0):
        with pytest.raises(ValueError, match="from 1 to 16"):
            gemv.gemv_int8(0, 64, 0, 0, 0, 0, m=1, k=64, n=16, dtype_name="BF16", granularity="channel",
                           group_size=None, device=0, stream_ptr=0, kernel="mma", warps=bad)
    assert [gemv.tiles_per_block(w) for w in (1, 2, 3, 4, 5, 8, 12, 16)] == [8, 4, 2, 2, 1, 1, 1, 1]
