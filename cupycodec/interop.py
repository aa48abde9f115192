"""Turn objects from any array framework into arrays, output buffers, stream handles and device ordinals.

NumPy and CuPy arrays pass through. Everything else is read by protocol, never by importing its framework: DLPack
first (torch tensors, JAX arrays, ...), then ``__cuda_array_interface__``, then ``numpy.asarray``. DLPack capsules
are parsed here with ``ctypes`` rather than by ``numpy.from_dlpack``/``cupy.from_dlpack``, because NumPy (and CuPy
without ml_dtypes support) refuse the dtypes weights are stored in: bfloat16 and float8. CuPy and ml_dtypes are
imported inside the functions that need them.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any, NamedTuple

import numpy as np

from .dtypes import SUPPORTED, dtype_name, extent_nbytes, itemsize, numpy_dtype, storage_dtype
from .errors import BackendUnavailableError, UnsupportedDtypeError

__all__ = ["Array", "as_array", "as_output", "parse_device", "require_cuda", "stream_handle"]

_NO_GPU = ('CUDA devices need CuPy and a visible CUDA GPU; install a GPU build with pip install "cupycodec[cu12]" '
           '(or "cupycodec[cu13]" for CUDA 13; torch users: match torch.version.cuda)')


class Array(NamedTuple):
    """An input or output buffer as cupycodec sees it (returned by :func:`as_array` and :func:`as_output`)."""

    array: Any  # numpy.ndarray, or cupy.ndarray holding the bits (uint16 for BF16, uint8 for F8) of a DLPack import
    on_device: bool
    device: int | None  # CUDA ordinal of a device array
    dtype_name: str  # the logical dtype in the container vocabulary ("BF16", "F32", "F8_E4M3", ...)
    keep: Any  # must stay alive while `array` is used (owns DLPack memory), or None


def as_array(obj, *, what: str = "input") -> Array:
    """Read any array-like object without copying where the producer allows it.

    Parameters
    ----------
    obj : array-like
        NumPy or CuPy array (returned as is), an object implementing DLPack (``torch.Tensor``, including
        ``nn.Parameter`` with ``requires_grad``, JAX arrays, ...), an object with ``__cuda_array_interface__``,
        or anything ``numpy.asarray`` accepts. Strided and negatively strided views are kept as views.
    what : str
        How error messages name the argument.

    Returns
    -------
    Array
        Device arrays of BF16/F8 data hold the bits as unsigned integers (CuPy may lack those dtypes); host arrays
        carry the logical dtype (``ml_dtypes.bfloat16`` and so on). Device data imported through DLPack is ordered
        after the producer's pending work on CuPy's current stream.

    Raises
    ------
    UnsupportedDtypeError
        A dtype the container cannot name (object arrays, vector types, float8 variants other than e4m3fn/e5m2).
    TypeError
        A :class:`~cupycodec.CompressedArray`, or memory that is neither CPU nor CUDA.
    """
    return _convert(obj, what, output=False)


def as_output(obj, *, what: str = "out") -> Array:
    """Like :func:`as_array`, for a buffer cupycodec writes into: it aliases the caller's memory and never copies.

    A tensor with ``requires_grad`` is detached first; ``detach()`` shares its storage, so the writes land in it
    (autograd does not see them). Lists and other objects ``numpy.asarray`` would copy are refused.

    Raises
    ------
    ValueError
        The buffer is read-only or not C-contiguous.
    TypeError
        The object cannot be written in place.
    """
    result = _convert(obj, what, output=True)
    arr = result.array
    if not result.on_device and not arr.flags.writeable:
        raise ValueError(f"{what} is read-only; pass a writable buffer")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous to be written in place, got strides {arr.strides} for shape "
                         f"{arr.shape}; pass a contiguous buffer (tensor.contiguous(), numpy.ascontiguousarray or "
                         "cupy.ascontiguousarray) and copy it into your view afterwards")
    return result


def _convert(obj, what: str, output: bool) -> Array:
    if isinstance(obj, np.ndarray):
        if type(obj) is not np.ndarray:
            obj = _plain(obj, what)
        return Array(obj, False, None, dtype_name(obj.dtype)[0], None)
    cp = sys.modules.get("cupy")  # a CuPy array can only exist once cupy is imported
    if cp is not None and isinstance(obj, cp.ndarray):
        return Array(obj, True, obj.device.id, dtype_name(obj.dtype)[0], None)
    from .container import CompressedArray  # lazy: container sits above this module

    if isinstance(obj, CompressedArray):
        raise TypeError("this is already a CompressedArray; pass it to decompress() instead")
    # DLPack before __cuda_array_interface__: torch's CAI has no bfloat16 typestr and raises for requires_grad
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        return _from_dlpack(_resolved_torch_view(obj, what, output), what)
    if hasattr(obj, "__cuda_array_interface__"):
        return _from_cai(obj)
    if type(obj).__name__ == "PyCapsule":  # np.asarray made it an object array, refused as Python references
        raise TypeError(f"{what} is a bare DLPack capsule (or another PyCapsule): cupycodec reads DLPack through the "
                        "producer's __dlpack__, so pass the array it came from, or one made from the capsule "
                        "(torch.from_dlpack, cupy.from_dlpack)")
    arr = _host_alias(obj, what) if output else np.asarray(obj)
    if arr.dtype == object:
        raise UnsupportedDtypeError(arr.dtype, ["numeric arrays"], "object arrays hold Python references, not data")
    return Array(arr, False, None, dtype_name(arr.dtype)[0], None)


def _plain(obj: np.ndarray, what: str) -> np.ndarray:
    """An ndarray subclass as a plain ndarray over the same memory (``np.matrix`` stays 2-D under ``reshape``, which
    the byte views below rely on), except a masked array with masked elements: the mask is not data, and would be
    lost silently."""
    if np.ma.is_masked(obj):
        raise TypeError(f"{what} is a masked array; cupycodec stores plain arrays and would drop the mask: pass "
                        "np.ma.getdata(a) and np.ma.getmaskarray(a) as two arrays, or np.ma.filled(a, fill_value)")
    return obj.view(np.ndarray)


def _host_alias(obj, what: str) -> np.ndarray:
    # np.asarray copies lists and scalars; only the buffer protocol and __array_interface__ alias the caller's memory
    try:
        return np.asarray(memoryview(obj))
    except TypeError:
        if hasattr(obj, "__array_interface__"):
            return np.asarray(obj)
    raise TypeError(f"{what} must be an array cupycodec can write in place (NumPy, CuPy, a DLPack tensor such as "
                    f"torch.Tensor, or a writable buffer), got {type(obj).__name__}")


def _from_cai(obj) -> Array:
    typestr = obj.__cuda_array_interface__["typestr"]
    if np.dtype(typestr).kind == "V":
        raise UnsupportedDtypeError(typestr, SUPPORTED, "raw bytes have no dtype; pass a same-width unsigned-integer "
                                    "view (uint16 for bfloat16) plus dtype='bfloat16'")
    arr = _cupy().asarray(obj)  # zero-copy: CuPy keeps `obj` as the memory's owner
    return Array(arr, True, arr.device.id, dtype_name(arr.dtype)[0], None)


# DLPack (legacy unversioned capsules: dlpack.h, DLManagedTensor)

_CPU, _CUDA, _CUDA_HOST, _CUDA_MANAGED = 1, 2, 3, 13  # DLDeviceType

# (DLDataTypeCode, bits) -> name. Code 8 (float8_e4m3, with infinities) is a different format from e4m3fn (10).
_DL_NAMES = {
    (0, 8): "I8", (0, 16): "I16", (0, 32): "I32", (0, 64): "I64",
    (1, 8): "U8", (1, 16): "U16", (1, 32): "U32", (1, 64): "U64",
    (2, 16): "F16", (2, 32): "F32", (2, 64): "F64", (4, 16): "BF16", (5, 64): "C64", (5, 128): "C128",
    (6, 8): "BOOL", (10, 8): "F8_E4M3", (12, 8): "F8_E5M2",
}
_DL_CODES = ("int", "uint", "float", "opaque handle", "bfloat", "complex", "bool", "float8_e3m4", "float8_e4m3",
             "float8_e4m3b11fnuz", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
             "float8_e8m0fnu", "float6_e2m3fn", "float6_e3m2fn", "float4_e2m1fn")

# torch dtype -> (our name, torch integer dtype of the same width), for torch builds whose DLPack export refuses it
_TORCH_BITS = {
    "torch.bfloat16": ("BF16", "int16"), "torch.float8_e4m3fn": ("F8_E4M3", "uint8"),
    "torch.float8_e5m2": ("F8_E5M2", "uint8"), "torch.uint16": ("U16", "int16"),
    "torch.uint32": ("U32", "int32"), "torch.uint64": ("U64", "int64"), "torch.bool": ("BOOL", "uint8"),
}


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32), ("dtype", _DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


# Private prototypes, so that we never change the shared ctypes.pythonapi functions' argtypes for other libraries.
_get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi))
_set_name = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.c_char_p)(("PyCapsule_SetName", ctypes.pythonapi))
_USED = b"used_dltensor"  # the capsule keeps this pointer: a module constant outlives every capsule
# PYFUNCTYPE keeps the GIL held during the deleter: some producers' deleters (NumPy's) touch Python objects.
_Deleter = ctypes.PYFUNCTYPE(None, ctypes.c_void_p)


class _DLPackOwner:
    """Owns one consumed DLManagedTensor and calls its deleter exactly once, when the last view of it is gone."""

    __slots__ = ("__weakref__", "_managed")

    def __init__(self, managed: int):
        self._managed = managed

    def __del__(self, _managed_tensor=_DLManagedTensor, _deleter_type=_Deleter):
        # the types are bound here: a view that lives until interpreter exit outlives this module's globals
        managed, self._managed = self._managed, None
        if managed:
            deleter = _managed_tensor.from_address(managed).deleter
            if deleter:  # the spec allows NULL when the producer has nothing to free
                _deleter_type(deleter)(managed)


def _from_dlpack(obj, what: str) -> Array:
    if getattr(obj, "requires_grad", False) and hasattr(obj, "detach"):
        obj = obj.detach()  # torch refuses to export tensors that require grad; detach() shares the storage
    try:
        dev_type, dev_id = (int(v) for v in obj.__dlpack_device__())
    except (BufferError, RuntimeError, TypeError, ValueError) as exc:  # torch's meta tensors: "Unknown device type"
        raise TypeError(f"{what} ({type(obj).__name__}) is not in CPU or CUDA memory ({exc}); copy it to the CPU or "
                        "a CUDA device first") from None
    if dev_type not in (_CPU, _CUDA_HOST, _CUDA, _CUDA_MANAGED):
        raise TypeError(f"{what} ({type(obj).__name__}) lives on DLPack device type {dev_type}, not CPU or CUDA "
                        "memory; copy it to the CPU or a CUDA device first")
    cupy = _cupy() if dev_type in (_CUDA, _CUDA_MANAGED) else None
    name = None
    try:
        capsule = _export(obj, cupy, dev_id)
    except (BufferError, RuntimeError, TypeError, ValueError) as exc:
        bits = _torch_bit_view(obj)
        if bits is None:
            raise TypeError(f"cannot read {what} ({type(obj).__name__}) through DLPack: {exc}") from exc
        name, view = bits
        capsule = _export(view, cupy, dev_id)
    return _consume(capsule, name, cupy is not None)


def _export(obj, cupy, device_id: int):
    if cupy is None:
        return obj.__dlpack__()  # host memory takes no stream; some producers reject even stream=None there
    with cupy.cuda.Device(device_id):  # torch exports only from the current device; CuPy's streams are per device
        # The producer orders its pending work before our current stream. DLPack: 1 is the legacy default stream.
        return obj.__dlpack__(stream=cupy.cuda.get_current_stream().ptr or 1)


def _resolved_torch_view(obj, what: str, output: bool):
    """A torch tensor with a lazy negation or conjugation (``t._neg_view()``, ``complex_t.conj().imag``) read
    through its resolved copy: torch's DLPack export drops the negation bit, which would give the stored values
    with the wrong sign. As an output it is refused: writes into its storage would read back negated."""
    torch = sys.modules.get("torch")  # only a torch the caller already imported; cupycodec never imports it
    if torch is None or not isinstance(obj, torch.Tensor):
        return obj
    if str(obj.dtype) in _TORCH_SUB_BYTE:  # DLPack labels them int8/uint8: they came back as those, values changed
        raise UnsupportedDtypeError(obj.dtype, SUPPORTED, "torch's sub-byte integer types (int1-7, uint1-7) have no "
                                    "container dtype; pass their storage as uint8 (t.view(torch.uint8)) and keep "
                                    "the dtype yourself")
    if not (obj.is_neg() or obj.is_conj()):
        return obj
    if output:
        raise ValueError(f"{what} is a lazily negated or conjugated torch view, which cannot be written in place; "
                         "pass a plain tensor (e.g. torch.empty_like(t)) and copy it into your view afterwards")
    return obj.resolve_conj().resolve_neg()


_TORCH_SUB_BYTE = frozenset(f"torch.{s}int{n}" for s in ("", "u") for n in range(1, 8))


def _torch_bit_view(obj):
    """``(name, same-width integer view)`` of a torch tensor whose dtype this torch cannot export, else None."""
    torch = sys.modules.get("torch")  # only a torch the caller already imported; cupycodec never imports it
    if torch is None or not isinstance(obj, torch.Tensor) or str(obj.dtype) not in _TORCH_BITS:
        return None
    name, bits = _TORCH_BITS[str(obj.dtype)]
    return name, obj.view(getattr(torch, bits))


def _consume(capsule, name: str | None, on_device: bool) -> Array:
    managed = _get_pointer(capsule, b"dltensor")
    _set_name(capsule, _USED)  # the producer's capsule destructor now leaves the deleter to us
    owner = _DLPackOwner(managed)
    t = _DLManagedTensor.from_address(managed).dl_tensor
    code, bits, lanes = t.dtype.code, t.dtype.bits, t.dtype.lanes
    dl_name = _DL_NAMES.get((code, bits)) if lanes == 1 else None
    if dl_name is None:
        label = _DL_CODES[code] if code < len(_DL_CODES) else f"code {code}"
        raise UnsupportedDtypeError(f"DLPack {label} (bits={bits}, lanes={lanes})", SUPPORTED)
    name = name or dl_name
    size = itemsize(name)
    shape = tuple(t.shape[i] for i in range(t.ndim))
    if extent_nbytes(shape, size) >= 2**63:  # an empty torch tensor may have such a shape; no NumPy/CuPy array can
        raise ValueError(f"shape {shape} of {name}: its non-zero dimensions span 2**63 bytes or more, which no "
                         "NumPy or CuPy array (and no container reader) can hold; use a smaller shape")
    if t.strides:  # DLPack strides count elements; see _byte_stride
        strides = tuple(_byte_stride(t.strides[i], size) for i in range(t.ndim))
    else:  # NULL strides mean C-contiguous (DLPack < 1.2)
        strides = tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) * size for i in range(t.ndim))
    ptr = (t.data or 0) + t.byte_offset
    if on_device:
        arr = _device_array(ptr, shape, strides, name, t.device.device_id, owner)
        return Array(arr, True, t.device.device_id, name, owner)
    return Array(_host_array(ptr, shape, strides, name, owner), False, None, name, owner)


def _byte_stride(elements: int, size: int) -> int:
    """A DLPack stride in bytes, read modulo 2**64 as a signed number.

    CuPy 14 exports a negative stride as the unsigned quotient (2**64 - bytes) // itemsize (x[::-1] of int32 gives
    2**62 - 1 for -1; seen on an H200 host, CuPy 14.2.0). Multiplying back modulo 2**64 recovers -bytes exactly for
    power-of-two item sizes, and leaves every honest stride (|bytes| < 2**63) as it is."""
    b = (elements * size) & 0xFFFF_FFFF_FFFF_FFFF
    return b - (1 << 64) if b >= 1 << 63 else b


def _extent(shape, strides, size: int) -> tuple[int, int]:
    """Byte offsets of the lowest and one past the highest byte of a non-empty strided array, from element 0."""
    lo = sum((n - 1) * s for n, s in zip(shape, strides) if s < 0)
    hi = sum((n - 1) * s for n, s in zip(shape, strides) if s > 0) + size
    return lo, hi


def _host_array(ptr: int, shape, strides, name: str, owner) -> np.ndarray:
    try:
        dtype = numpy_dtype(name)
    except UnsupportedDtypeError:  # no ml_dtypes: hand over the bits
        dtype = storage_dtype(name)
    if 0 in shape:  # the data pointer may be NULL; nothing to alias
        return np.empty(shape, dtype)
    lo, hi = _extent(shape, strides, dtype.itemsize)
    buf = (ctypes.c_char * (hi - lo)).from_address(ptr + lo)
    buf.owner = owner  # the array's base chain keeps the DLPack owner, and so the producer's memory, alive
    return np.ndarray(shape, dtype, buffer=buf, offset=-lo, strides=strides)


def _device_array(ptr: int, shape, strides, name: str, device_id: int, owner):
    cupy = _cupy()
    dtype = storage_dtype(name)
    with cupy.cuda.Device(device_id):
        if 0 in shape:
            return cupy.empty(shape, dtype)
        lo, hi = _extent(shape, strides, dtype.itemsize)
        mem = cupy.cuda.UnownedMemory(ptr + lo, hi - lo, owner, device_id)
        return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(mem, -lo), strides)


# Streams and devices


def stream_handle(stream) -> int | None:
    """The raw ``cudaStream_t`` of a stream object, or None for "the current stream".

    Accepts None, a non-negative int (a handle), objects implementing the CUDA stream protocol
    (``__cuda_stream__() -> (version, handle)``), objects with an int ``cuda_stream`` attribute
    (``torch.cuda.Stream``) and CuPy ``Stream``/``ExternalStream`` (``.ptr``).
    """
    if stream is None:
        return None
    if isinstance(stream, int) and not isinstance(stream, bool):
        if stream < 0:
            raise ValueError(f"stream must be a non-negative CUDA stream handle, got {stream}")
        return stream
    if hasattr(stream, "__cuda_stream__"):
        _version, handle = stream.__cuda_stream__()
        return int(handle)
    handle = getattr(stream, "cuda_stream", None)
    if isinstance(handle, int):
        return handle
    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(stream, (cp.cuda.Stream, cp.cuda.ExternalStream)):
        return int(stream.ptr)
    raise TypeError("stream must be None, an int handle, a CuPy Stream, a torch.cuda.Stream or an object with "
                    f"__cuda_stream__(), got {type(stream).__name__}")


def parse_device(device) -> tuple[str, int | None]:
    """Normalise a device argument to ``("auto" | "cpu", None)`` or ``("cuda", ordinal)``.

    Accepts ``"auto"``, ``"cpu"``, ``"cuda"`` (the current device), ``"cuda:N"``, an int N, and objects with
    ``type`` and ``index`` attributes (``torch.device``). CUDA ordinals are checked against the devices present.

    Raises
    ------
    BackendUnavailableError
        A CUDA device was asked for and CuPy or a CUDA device is missing.
    ValueError
        An unknown device string or an ordinal that does not exist.
    TypeError
        Any other kind of object.
    """
    forms = "'auto', 'cpu', 'cuda', 'cuda:N', an int N or a torch.device"
    if isinstance(device, str):
        if device in ("auto", "cpu"):
            return device, None
        if device == "cuda":
            return "cuda", _current_device()
        if device.startswith("cuda:") and device[5:].isdigit():
            return "cuda", _check_ordinal(int(device[5:]), device)
        raise ValueError(f"device must be {forms}, got {device!r}")
    if isinstance(device, int) and not isinstance(device, bool):
        if device < 0:
            raise ValueError(f"device must be {forms}, got {device}")
        return "cuda", _check_ordinal(device, device)
    kind, index = getattr(device, "type", None), getattr(device, "index", -1)
    if isinstance(kind, str) and (index is None or isinstance(index, int)):
        if kind == "cpu":
            return "cpu", None
        if kind == "cuda":
            return "cuda", _current_device() if index is None else _check_ordinal(index, device)
        raise ValueError(f"device type {kind!r} is not supported; use {forms}")
    raise TypeError(f"device must be {forms}, got {type(device).__name__}")


def require_cuda() -> None:
    """Raise :class:`~cupycodec.BackendUnavailableError` (naming the fix) unless CuPy sees a CUDA device."""
    _device_count()


def _cupy():
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailableError(_NO_GPU) from exc
    return cupy


def _device_count() -> int:
    cupy = _cupy()
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:  # no driver, or no device visible
        raise BackendUnavailableError(f"{_NO_GPU} ({exc})") from exc
    if count == 0:
        raise BackendUnavailableError(_NO_GPU)
    return count


def _current_device() -> int:
    _device_count()
    return _cupy().cuda.runtime.getDevice()


def _check_ordinal(ordinal: int, device) -> int:
    count = _device_count()
    if not 0 <= ordinal < count:
        have = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise ValueError(f"device={device!r} does not exist: this machine has {count} CUDA "
                         f"device{'s' if count > 1 else ''} ({have})")
    return ordinal
