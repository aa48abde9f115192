"""cupycodec.interop on the CPU: DLPack parsing, aliasing, lifetimes, stream handles and device strings."""

from __future__ import annotations

import ctypes
import gc
import pathlib
import subprocess
import sys
import types
import weakref

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from helpers import DLPackOnly
from hypothesis import given
from hypothesis import strategies as st

import cupycodec as cc
from cupycodec.interop import Array, as_array, as_output, parse_device, stream_handle

# ----------------------------------------------------------------------------------------------------------------
# Producers
# ----------------------------------------------------------------------------------------------------------------


_CAPSULE_NAME = b"dltensor"  # the capsule keeps a pointer to its name
_capsule_new = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)(
    ("PyCapsule_New", ctypes.pythonapi))


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32), ("dtype", _DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


_DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class HandMade:
    """A DLPack producer written with ctypes, so that the test controls every field and counts deleter calls."""

    def __init__(self, data: np.ndarray, shape, strides=None, *, code=1, bits=8, lanes=1, byte_offset=0,
                 device=(1, 0)):
        self.data, self.device, self.deleted = data, device, 0
        self._shape = (ctypes.c_int64 * max(len(shape), 1))(*shape)
        self._strides = None if strides is None else (ctypes.c_int64 * max(len(strides), 1))(*strides)
        self._deleter = _DELETER(self._delete)
        self._managed = _DLManagedTensor(
            data.ctypes.data, _DLDevice(*device), len(shape), _DLDataType(code, bits, lanes),
            ctypes.cast(self._shape, ctypes.POINTER(ctypes.c_int64)) if shape else None,
            None if strides is None else ctypes.cast(self._strides, ctypes.POINTER(ctypes.c_int64)),
            byte_offset, None, ctypes.cast(self._deleter, ctypes.c_void_p))

    def _delete(self, managed):
        assert managed == ctypes.addressof(self._managed)
        self.deleted += 1

    def __dlpack__(self, stream=None):
        return _capsule_new(ctypes.addressof(self._managed), _CAPSULE_NAME, None)

    def __dlpack_device__(self):
        return self.device


def _collect():
    for _ in range(3):
        gc.collect()


# ----------------------------------------------------------------------------------------------------------------
# torch tensors through DLPack
# ----------------------------------------------------------------------------------------------------------------

_TORCH_NAMES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64",
    "uint16": "U16", "uint32": "U32", "uint64": "U64", "float16": "F16", "bfloat16": "BF16", "float32": "F32",
    "float64": "F64", "complex64": "C64", "complex128": "C128", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}


def _random_tensor(torch, shape, dtype, seed=0):
    """Random bit patterns (NaNs included) for every dtype, 0/1 for bool."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape, size), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def _torch_bytes(t) -> bytes:
    import torch

    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _array_bytes(result: Array) -> bytes:
    return np.ascontiguousarray(result.array).tobytes()


@pytest.mark.torch
@pytest.mark.parametrize("name", sorted(_TORCH_NAMES))
@pytest.mark.parametrize("view", ["contiguous", "scalar", "empty", "every_other_column", "transposed"])
def test_torch_tensor_of_every_named_dtype(name, view):
    torch = pytest.importorskip("torch")
    dtype = getattr(torch, name, None)
    if dtype is None:
        pytest.skip(f"this torch has no {name}")
    base = _random_tensor(torch, (4, 6), dtype)
    t = {"contiguous": base, "scalar": base[1, 2], "empty": base[:0], "every_other_column": base[:, ::2],
         "transposed": base.T}[view]
    result = as_array(t)
    assert result.dtype_name == _TORCH_NAMES[name]
    assert not result.on_device and result.device is None
    assert result.array.shape == tuple(t.shape)
    assert _array_bytes(result) == _torch_bytes(t)
    if view in ("every_other_column", "transposed"):
        assert not result.array.flags.c_contiguous  # a view, not a copy; the caller makes it contiguous
        assert result.array.strides == tuple(s * t.element_size() for s in t.stride())


@pytest.mark.torch
def test_torch_host_arrays_carry_the_logical_dtype():
    torch = pytest.importorskip("torch")
    import ml_dtypes

    t = torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16)
    result = as_array(t)
    assert result.array.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(result.array.astype(np.float32), [1.5, -2.0, 3.25])


@pytest.mark.torch
def test_a_view_dropped_at_interpreter_exit_frees_its_tensor_without_the_modules_globals(monkeypatch):
    # at exit a view can outlive interop's module globals (set to None): its owner still calls the deleter
    torch = pytest.importorskip("torch")
    from cupycodec import interop

    t = torch.arange(6, dtype=torch.float32)
    view = as_array(t)
    assert isinstance(view.keep, interop._DLPackOwner)
    owner = weakref.ref(view.keep)
    monkeypatch.setattr(interop, "_DLManagedTensor", None)
    monkeypatch.setattr(interop, "_Deleter", None)
    del view
    gc.collect()
    assert owner() is None  # collected, and its __del__ did not raise (pytest would report an unraisable error)
    t.add_(1)  # torch's storage is still sound


@pytest.mark.torch
def test_parameter_that_requires_grad():
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.randn(3, 5))
    result = as_array(p)
    assert result.dtype_name == "F32"
    np.testing.assert_array_equal(result.array, p.detach().numpy())


@pytest.mark.torch
def test_torch_dtype_refused_by_dlpack_falls_back_to_an_integer_view():
    torch = pytest.importorskip("torch")

    class NoFloat8(torch.Tensor):  # what older torch does: float8 cannot cross DLPack
        def __dlpack__(self, *args, **kwargs):
            if self.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                raise BufferError("float8 types are not supported by dlpack")
            return super().__dlpack__(*args, **kwargs)

    t = _random_tensor(torch, (3, 4), torch.float8_e5m2).as_subclass(NoFloat8)
    with pytest.raises(BufferError):
        t.__dlpack__()
    result = as_array(t[:, 1:])
    assert result.dtype_name == "F8_E5M2"
    assert _array_bytes(result) == _torch_bytes(t[:, 1:].as_subclass(torch.Tensor))


def test_dlpack_export_failure_names_the_object():
    class Broken(DLPackOnly):
        def __dlpack__(self, stream=None):
            raise BufferError("cannot export this")

    with pytest.raises(TypeError, match=r"cannot read weights \(Broken\) through DLPack: cannot export this"):
        as_array(Broken(np.zeros(3)), what="weights")


# ----------------------------------------------------------------------------------------------------------------
# DLPack parsing (NumPy and hand-made producers)
# ----------------------------------------------------------------------------------------------------------------

_DTYPES = st.sampled_from(["?", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8", "c8", "c16"])
_STEPS = st.sampled_from([1, 2, 3, -1, -2])


@given(st.data())
def test_dlpack_round_trips_random_strided_views(data):
    dtype = np.dtype(data.draw(_DTYPES))
    arr = data.draw(hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)))
    view = arr[(*(slice(None, None, data.draw(_STEPS)) for _ in range(arr.ndim)), ...)]  # "..." keeps 0-d arrays
    if data.draw(st.booleans()):
        view = view.T
    result = as_array(DLPackOnly(view))
    assert result.array.shape == view.shape and result.array.dtype == view.dtype
    assert _array_bytes(result) == np.ascontiguousarray(view).tobytes()
    if view.size:
        assert result.array.strides == view.strides and np.shares_memory(result.array, view)


def test_dlpack_numpy_producer_lives_as_long_as_the_array():
    src = np.arange(12, dtype=np.int32).reshape(3, 4).copy()  # owns its memory, so its weakref tracks it
    alive = weakref.ref(src)
    result = as_array(DLPackOnly(src[:, ::-1]))
    del src
    _collect()
    assert alive() is not None  # the DLPack owner still holds it
    np.testing.assert_array_equal(result.array, np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::-1])
    del result
    _collect()
    assert alive() is None  # the deleter ran when the last view went away


@pytest.mark.torch
def test_torch_memory_outlives_the_tensor():
    torch = pytest.importorskip("torch")
    t = torch.arange(1 << 16, dtype=torch.float32)
    expected = t.clone().numpy()
    result = as_array(t)
    view = result.array[::2]
    del t, result
    _collect()
    torch.zeros(1 << 16).fill_(7)  # would likely reuse the block had it been freed
    np.testing.assert_array_equal(view, expected[::2])


def test_deleter_runs_exactly_once_after_the_last_view():
    data = np.arange(24, dtype=np.int16)
    producer = HandMade(data, (2, 3), (6, 2), code=0, bits=16, byte_offset=4)
    result = as_array(producer)
    np.testing.assert_array_equal(result.array, data[2:14].reshape(2, 6)[:, ::2])
    view = result.array[1]
    del result
    _collect()
    assert producer.deleted == 0
    np.testing.assert_array_equal(view, [8, 10, 12])
    del view
    _collect()
    assert producer.deleted == 1


def test_null_strides_mean_c_contiguous_and_scalars_have_no_shape():
    data = np.arange(6, dtype=np.float32)
    result = as_array(HandMade(data, (2, 3), None, code=2, bits=32))
    np.testing.assert_array_equal(result.array, data.reshape(2, 3))
    scalar = as_array(HandMade(data, (), None, code=2, bits=32, byte_offset=8))
    assert scalar.array.shape == () and scalar.array == 2.0 and scalar.dtype_name == "F32"


@pytest.mark.parametrize(("code", "bits", "lanes", "label"), [
    (2, 32, 4, r"DLPack float \(bits=32, lanes=4\)"),
    (11, 8, 1, r"DLPack float8_e4m3fnuz"),
    (8, 8, 1, r"DLPack float8_e4m3 \(bits=8, lanes=1\)"),  # the variant with infinities, not e4m3fn
    (2, 128, 1, r"DLPack float \(bits=128"),
    (42, 8, 1, r"DLPack code 42"),
])
def test_unnamed_dlpack_dtypes_are_refused_and_still_released(code, bits, lanes, label):
    producer = HandMade(np.zeros(64, np.uint8), (2,), (1,), code=code, bits=bits, lanes=lanes)
    with pytest.raises(cc.UnsupportedDtypeError, match=label):
        as_array(producer)
    _collect()
    assert producer.deleted == 1


def test_pinned_host_memory_is_read_on_the_host():
    data = np.arange(4, dtype=np.uint8)
    result = as_array(HandMade(data, (4,), device=(3, 0)))  # kDLCUDAHost
    assert not result.on_device and result.device is None and result.array.tolist() == [0, 1, 2, 3]


def test_dlpack_device_that_is_neither_cpu_nor_cuda():
    producer = HandMade(np.zeros(4, np.uint8), (4,), device=(4, 0))  # kDLOpenCL
    with pytest.raises(TypeError, match="DLPack device type 4, not CPU or CUDA"):
        as_array(producer)


def test_cuda_dlpack_without_cupy_says_how_to_get_a_gpu_build(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(cc.BackendUnavailableError, match=r"cupycodec\[cu12\]"):
        as_array(HandMade(np.zeros(4, np.uint8), (4,), device=(2, 0)))


# ----------------------------------------------------------------------------------------------------------------
# Other inputs
# ----------------------------------------------------------------------------------------------------------------


def test_numpy_arrays_pass_through():
    arr = np.arange(10.0)[::-3]
    result = as_array(arr)
    assert result.array is arr and tuple(result)[1:] == (False, None, "F64", None)


def test_array_likes_and_object_arrays():
    assert as_array([[1, 2], [3, 4]]).dtype_name == "I64"
    with pytest.raises(cc.UnsupportedDtypeError, match="object arrays hold Python references"):
        as_array([1, "a", None])


def test_compressed_array_is_refused():
    packed = cc.compress(np.arange(4, dtype=np.uint8))
    with pytest.raises(TypeError, match=r"already a CompressedArray; pass it to decompress\(\)"):
        as_array(packed)


def test_cuda_array_interface_with_void_typestr_is_refused_before_cupy():
    class Bfloat16Bits:
        __cuda_array_interface__ = {"shape": (4,), "typestr": "|V2", "data": (0, False), "version": 3}

    with pytest.raises(cc.UnsupportedDtypeError, match=r"uint16 for bfloat16\) plus dtype='bfloat16'"):
        as_array(Bfloat16Bits())


# ----------------------------------------------------------------------------------------------------------------
# Output buffers
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.torch
def test_torch_output_aliases_the_tensor():
    torch = pytest.importorskip("torch")
    t = torch.zeros(2, 3, dtype=torch.bfloat16)
    out = as_output(t)
    out.array[...] = np.arange(6, dtype=np.float32).reshape(2, 3).astype(out.array.dtype)
    assert t.float().tolist() == [[0, 1, 2], [3, 4, 5]]
    p = torch.nn.Parameter(torch.zeros(4))  # detach() shares the storage
    as_output(p).array[:] = 1
    assert p.detach().tolist() == [1, 1, 1, 1]


@pytest.mark.torch
def test_torch_non_contiguous_output_names_the_fix():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"out must be C-contiguous.*tensor\.contiguous\(\)"):
        as_output(torch.zeros(4, 6)[:, ::2])


@pytest.mark.torch
def test_torch_lazily_negated_views_keep_their_sign():
    """torch's DLPack export drops a tensor's negation bit (``t._neg_view()``, ``complex_t.conj().imag``): such an
    input is read through its resolved copy (its sign was silently lost before); as an output it is refused."""
    torch = pytest.importorskip("torch")
    for t in (torch.tensor([1.0, -2.0, 3.0])._neg_view(), torch.tensor([1 + 2j, 3 - 4j]).conj().imag,
              torch.tensor([1.5, 2.5], dtype=torch.bfloat16)._neg_view()):
        assert t.is_neg()
        want = t.resolve_neg().float().numpy()
        assert np.array_equal(cc.decompress(cc.compress(t, codec="zstd")).astype(np.float32), want)
    with pytest.raises(ValueError, match="out is a lazily negated or conjugated torch view"):
        as_output(torch.zeros(3)._neg_view())


def test_dlpack_output_aliases():
    dest = np.zeros(5, np.int64)
    as_output(DLPackOnly(dest)).array[:] = 7
    assert dest.tolist() == [7] * 5


def test_read_only_outputs_are_refused():
    arr = np.zeros(3)
    arr.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only; pass a writable buffer"):
        as_output(arr)
    with pytest.raises(ValueError, match="out is read-only"):
        as_output(memoryview(b"abcd"))


def test_non_contiguous_numpy_output_names_the_fix():
    with pytest.raises(ValueError, match=r"out codes must be C-contiguous.*numpy\.ascontiguousarray"):
        as_output(np.zeros((3, 4))[:, ::2], what="out codes")


def test_outputs_are_never_copies():
    buf = bytearray(4)
    as_output(buf).array[:] = 9
    assert buf == bytearray([9] * 4)
    with pytest.raises(TypeError, match="out must be an array cupycodec can write in place.*got list"):
        as_output([0, 0, 0])


# ----------------------------------------------------------------------------------------------------------------
# Streams
# ----------------------------------------------------------------------------------------------------------------


class _TorchLikeStream:
    cuda_stream = 0x5000


class _ProtocolStream:
    def __cuda_stream__(self):
        return (0, 0x6000)


def test_stream_handles():
    assert stream_handle(None) is None
    assert stream_handle(0) == 0 and stream_handle(0x1234) == 0x1234
    assert stream_handle(_TorchLikeStream()) == 0x5000
    assert stream_handle(_ProtocolStream()) == 0x6000


def test_bad_streams():
    with pytest.raises(ValueError, match="non-negative CUDA stream handle, got -1"):
        stream_handle(-1)
    for bad in ("default", 1.5, True, object()):
        with pytest.raises(TypeError, match="stream must be None, an int handle, a CuPy Stream, a torch.cuda.Stream"):
            stream_handle(bad)


# ----------------------------------------------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------------------------------------------


class _CUDARuntimeError(RuntimeError):
    pass


def _fake_cupy(count: int, current: int = 0, fail: bool = False):
    def get_device_count():
        if fail:
            raise _CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
        return count

    runtime = types.SimpleNamespace(getDeviceCount=get_device_count, getDevice=lambda: current,
                                    CUDARuntimeError=_CUDARuntimeError)
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))


def test_host_devices_need_no_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert parse_device("auto") == ("auto", None)
    assert parse_device("cpu") == ("cpu", None)
    assert parse_device(types.SimpleNamespace(type="cpu", index=None)) == ("cpu", None)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", 0, types.SimpleNamespace(type="cuda", index=None)])
def test_cuda_without_cupy(monkeypatch, device):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(cc.BackendUnavailableError, match=r'pip install "cupycodec\[cu12\]".*cupycodec\[cu13\]'):
        parse_device(device)


def test_cuda_without_a_device(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(0, fail=True))
    with pytest.raises(cc.BackendUnavailableError, match="cudaErrorNoDevice"):
        parse_device("cuda")
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(0))
    with pytest.raises(cc.BackendUnavailableError, match="visible CUDA GPU"):
        parse_device("cuda:0")


def test_cuda_ordinals(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(2, current=1))
    assert parse_device("cuda") == ("cuda", 1)
    assert parse_device("cuda:0") == ("cuda", 0)
    assert parse_device(1) == ("cuda", 1)
    assert parse_device(types.SimpleNamespace(type="cuda", index=0)) == ("cuda", 0)
    assert parse_device(types.SimpleNamespace(type="cuda", index=None)) == ("cuda", 1)
    with pytest.raises(ValueError, match=r"device='cuda:3' does not exist: this machine has 2 CUDA devices "
                                         r"\(cuda:0 to cuda:1\)"):
        parse_device("cuda:3")
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(1))
    with pytest.raises(ValueError, match=r"device=3 does not exist: this machine has 1 CUDA device \(cuda:0\)$"):
        parse_device(3)


@pytest.mark.torch
def test_torch_devices(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(1))
    assert parse_device(torch.device("cpu")) == ("cpu", None)
    assert parse_device(torch.device("cuda")) == ("cuda", 0)
    assert parse_device(torch.device("cuda", 0)) == ("cuda", 0)
    with pytest.raises(ValueError, match=r"device=device\(type='cuda', index=1\) does not exist"):
        parse_device(torch.device("cuda", 1))
    with pytest.raises(ValueError, match="device type 'meta' is not supported"):
        parse_device(torch.device("meta"))


@pytest.mark.parametrize("bad", ["tpu", "cuda:", "cuda:-1", "cuda:x", "CPU", " cpu", -1])
def test_bad_device_values(bad):
    with pytest.raises(ValueError, match=r"device must be 'auto', 'cpu', 'cuda', 'cuda:N', an int N or a torch"):
        parse_device(bad)


@pytest.mark.parametrize("bad", [None, 1.0, True, ("cuda", 0), object()])
def test_bad_device_types(bad):
    with pytest.raises(TypeError, match="device must be 'auto', 'cpu'"):
        parse_device(bad)


# ----------------------------------------------------------------------------------------------------------------
# Import hygiene
# ----------------------------------------------------------------------------------------------------------------


def test_interop_imports_neither_torch_nor_cupy():
    code = ("import sys, cupycodec.interop;"
            "heavy = {'torch', 'cupy', 'ml_dtypes'} & {m.split('.')[0] for m in sys.modules};"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_torch_import_in_the_core():
    root = pathlib.Path(cc.__file__).parent
    offenders = [str(p) for p in root.rglob("*.py")
                 if "import torch" in p.read_text() and "integrations" not in p.relative_to(root).parts]
    assert not offenders  # integrations/torch (installed as cupycodec.integrations.torch) is where torch belongs


def test_dlpack_strides_are_read_modulo_2_64():
    from cupycodec.interop import _byte_stride

    assert [_byte_stride(s, 4) for s in (2, -6, 0)] == [8, -24, 0]
    # CuPy 14.2 exports x[::-1] of int32 with the stride (2**64 - 4) // 4: the same -4 bytes, read back
    assert _byte_stride((2**64 - 24) // 4, 4) == -24 and _byte_stride((2**64 - 16) // 2, 2) == -16


def test_torch_sub_byte_integers_are_refused_not_relabelled():
    # torch's DLPack export labels int4/uint4 (and int1-7, uint1-7) as int8/uint8: they came back as those dtypes
    torch = pytest.importorskip("torch")
    if not hasattr(torch, "int4"):
        pytest.skip("this torch has no sub-byte integer dtypes")
    import cupycodec as cc

    for dtype in (torch.int4, torch.uint4, torch.uint1):
        t = torch.zeros(4, dtype=torch.uint8).view(dtype)
        with pytest.raises(cc.UnsupportedDtypeError, match=r"sub-byte integer.*t.view\(torch.uint8\)"):
            cc.compress(t)


def test_a_bare_dlpack_capsule_is_named():
    # np.asarray(capsule) made an object array, refused as "object arrays hold Python references"
    torch = pytest.importorskip("torch")
    import cupycodec as cc

    with pytest.raises(TypeError, match="bare DLPack capsule.*producer's __dlpack__"):
        cc.compress(torch.zeros(4).__dlpack__())
