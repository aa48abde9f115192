"""cupycodec.interop on a GPU: CUDA DLPack imports (torch, CuPy), aliasing outputs, streams and real device ordinals."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from helpers import DLPackOnly

from cupycodec._cuda import external_stream
from cupycodec.interop import as_array, as_output, parse_device, stream_handle

pytestmark = pytest.mark.gpu


class CAIOnly:
    def __init__(self, arr):
        self.__cuda_array_interface__ = arr.__cuda_array_interface__
        self._arr = arr


def _host_bytes(result) -> bytes:
    import cupy

    return cupy.ascontiguousarray(result.array).get().tobytes()


@pytest.mark.torch
@pytest.mark.parametrize(("name", "want", "bits"), [
    ("bfloat16", "BF16", np.uint16), ("float8_e4m3fn", "F8_E4M3", np.uint8), ("float8_e5m2", "F8_E5M2", np.uint8),
    ("float32", "F32", np.float32), ("bool", "BOOL", np.bool_), ("complex64", "C64", np.complex64),
])
@pytest.mark.parametrize("view", ["contiguous", "every_other_column", "transposed", "scalar", "empty"])
def test_torch_cuda_tensors(name, want, bits, view):
    torch = pytest.importorskip("torch")
    dtype = getattr(torch, name)
    base = torch.randn(4, 6, device="cuda").mul(4).to(dtype)
    t = {"contiguous": base, "every_other_column": base[:, ::2], "transposed": base.T, "scalar": base[1, 2],
         "empty": base[:0]}[view]
    result = as_array(t)
    assert (result.on_device, result.device, result.dtype_name) == (True, t.device.index, want)
    assert result.array.dtype == bits and result.array.shape == tuple(t.shape)
    want_bytes = t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert _host_bytes(result) == want_bytes


@pytest.mark.torch
def test_torch_cuda_parameter_and_output_aliasing():
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(3, 4, device="cuda", dtype=torch.bfloat16))
    out = as_output(p)
    out.array[...] = 0x3F80  # bfloat16 1.0
    torch.cuda.synchronize()
    assert p.detach().float().cpu().tolist() == [[1.0] * 4] * 3
    with pytest.raises(ValueError, match=r"tensor\.contiguous\(\)"):
        as_output(torch.zeros(4, 6, device="cuda")[:, ::2])


@pytest.mark.torch
def test_torch_cuda_memory_outlives_the_tensor():
    torch = pytest.importorskip("torch")
    t = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
    result = as_array(t)
    del t
    gc.collect()
    torch.full((1 << 20,), 7.0, device="cuda")  # would reuse the block had it been freed
    np.testing.assert_array_equal(result.array.get(), np.arange(1 << 20, dtype=np.float32))


def test_cupy_arrays_and_cupy_dlpack_views():
    import cupy

    x = cupy.arange(24, dtype=cupy.int32).reshape(4, 6)
    assert as_array(x).array is x and as_array(x).device == x.device.id
    view = x[::-1, ::2]
    result = as_array(DLPackOnly(view))
    assert result.array.strides == view.strides and result.keep is not None
    cupy.testing.assert_array_equal(result.array, view)
    as_output(DLPackOnly(x)).array[...] = 5
    assert int(x.sum()) == 5 * 24


def test_cuda_array_interface_objects():
    import cupy

    x = cupy.arange(6, dtype=cupy.float16)
    result = as_array(CAIOnly(x))
    assert result.on_device and result.dtype_name == "F16" and result.array.data.ptr == x.data.ptr


def test_real_devices_and_streams():
    import cupy

    count = cupy.cuda.runtime.getDeviceCount()
    assert parse_device("cuda") == ("cuda", cupy.cuda.Device().id)
    assert parse_device(f"cuda:{count - 1}") == ("cuda", count - 1)
    with pytest.raises(ValueError, match=f"device='cuda:{count}' does not exist: this machine has {count}"):
        parse_device(f"cuda:{count}")
    s = cupy.cuda.Stream(non_blocking=True)
    assert stream_handle(s) == s.ptr
    assert stream_handle(external_stream(s.ptr)) == s.ptr


@pytest.mark.torch
def test_torch_streams_and_devices():
    torch = pytest.importorskip("torch")
    s = torch.cuda.Stream()
    assert stream_handle(s) == s.cuda_stream
    assert parse_device(torch.device("cuda", 0)) == ("cuda", 0)
