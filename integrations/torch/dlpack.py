"""Torch tensors to and from compressed arrays: bf16 and float8 included, zero-copy where possible.

Compression reads tensors through DLPack (:mod:`cupycodec.interop`), so a CUDA tensor is compressed where it lies and
a ``Parameter`` needs no ``detach()``. Decompression writes into a tensor torch allocated, so torch's memory counters
see it, on torch's current stream.
"""

from __future__ import annotations

import torch

import cupycodec as cc

__all__ = ["TORCH_DTYPES", "current_stream", "dtype_name", "from_compressed", "host_bits", "to_compressed",
           "torch_dtype", "usable_device"]

TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "C64": torch.complex64, "C128": torch.complex128, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):  # torch >= 2.3
    if hasattr(torch, _attr):
        TORCH_DTYPES[_name] = getattr(torch, _attr)
_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a container dtype name (``"BF16"`` -> ``torch.bfloat16``)."""
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise cc.UnsupportedDtypeError(name, sorted(TORCH_DTYPES), "torch has no such dtype") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The container dtype name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise cc.UnsupportedDtypeError(dtype, sorted(map(str, TORCH_DTYPES.values()))) from None


def usable_device(device) -> torch.device:
    """``device`` as a ``torch.device``, refused where this machine cannot run on it (torch fails later, with an
    assertion, once a model is being loaded there): ValueError for no device name or an index past the devices,
    :class:`~cupycodec.BackendUnavailableError` for CUDA where torch sees none. Every ``device=`` of the torch
    integration goes through here. A bare ``"cuda"`` is the current CUDA device."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a torch device ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise cc.BackendUnavailableError(f"device {str(dev)!r}: no CUDA device is usable here "
                                             "(torch.cuda.is_available() is False); use the CPU ('cpu')")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(dev)!r}: there are {torch.cuda.device_count()} CUDA devices")
    return dev


def current_stream(device: torch.device) -> int | None:
    """torch's current stream on ``device`` as a raw handle (None on the CPU)."""
    if device.type != "cuda":
        return None
    return raw_stream(device.index if device.index is not None else torch.cuda.current_device())


# torch's current stream as an int without building a Stream object: what code compiled by inductor calls per launch
# (a host microsecond against several for torch.cuda.current_stream); the public call where a build lacks it
_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def raw_stream(index: int) -> int:
    """torch's current stream on CUDA device ``index`` as a raw handle."""
    if _RAW_STREAM is not None:
        return _RAW_STREAM(index)
    return torch.cuda.current_stream(index).cuda_stream


def stream_of(sp: int, device: torch.device) -> torch.cuda.Stream:
    """The torch stream whose raw handle is ``sp`` on CUDA ``device``, for torch calls that take a stream (a stream
    context for a copy, ``record_stream``): torch's default stream for handle 0, an ``ExternalStream`` otherwise.

    Never ``torch.cuda.ExternalStream(0)``: torch reads a null handle there as "no stream given" and returns a new
    stream from its pool, which the default stream does not wait for. A copy put on it raced the kernel after it on
    the default stream: under load the kernel read the copy's destination before the copy landed (the wide
    dequantization's descriptors, benchmarks/RESULTS.md, sixteenth GPU session)."""
    if sp == 0:
        return torch.cuda.default_stream(device)
    return torch.cuda.ExternalStream(sp, device=device)


def to_compressed(tensor: torch.Tensor, **kwargs) -> cc.CompressedArray:
    """Compress a tensor as it is (any dtype, device, strides; a Parameter too) with :func:`cupycodec.compress`'s
    keywords; CUDA tensors are compressed on their device, on torch's current stream."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"to_compressed takes a torch.Tensor, got {type(tensor).__name__}")
    kwargs.setdefault("stream", current_stream(tensor.device))
    return cc.compress(tensor, **kwargs)


def from_compressed(c: cc.CompressedArray | bytes | bytearray | memoryview, *, device=None,
                    out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decompress into a torch tensor: ``out`` if given, else a new tensor from torch's allocator on ``device``
    (default: where the payload is). INT8 containers are dequantized into ``dtype`` (default: the original dtype);
    a lossless one decodes exactly, so a ``dtype`` other than its own is refused (convert the result with ``.to``).
    ``c`` may also be a container's bytes (read untrusted, as :func:`cupycodec.decompress` reads them). Runs on
    torch's current stream; a CUDA result is ready in that stream's order when this returns."""
    if out is not None and not isinstance(out, torch.Tensor):  # its dtype was compared with torch's and blamed
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__} (NumPy and CuPy buffers: "
                        "cupycodec.decompress(c, out=...))")
    if isinstance(c, (bytes, bytearray, memoryview)):
        c = cc.CompressedArray.from_bytes(c)
    elif not isinstance(c, cc.CompressedArray):
        raise TypeError(f"from_compressed takes a CompressedArray or its bytes, got {type(c).__name__}")
    if c.lossless and dtype is not None and dtype != torch_dtype(c.dtype_name):
        raise ValueError(f"dtype={dtype} for a lossless {c.dtype_name} container: it decodes exactly, into its own "
                         f"dtype; decode it, then convert the result (.to({dtype}))")
    want = dtype if dtype is not None else out.dtype if out is not None else None
    if want is not None and not c.lossless and not want.is_floating_point:
        raise ValueError(f"an INT8 container dequantizes to floats: {want} is not one (pass float32, float16, "
                         "bfloat16 or float64; its codes and scales: cupycodec.decompress(c, dequantize=False))")
    if out is not None and c.lossless and out.dtype != torch_dtype(c.dtype_name):
        raise ValueError(f"out is {out.dtype} for a lossless {c.dtype_name} container: it decodes exactly, into its "
                         f"own dtype; pass an out of {torch_dtype(c.dtype_name)}")
    if out is not None and dtype is not None and out.dtype != dtype:
        raise ValueError(f"dtype={dtype} and out of {out.dtype}: the result is out, in out's dtype; pass one of them "
                         "(or an out of that dtype)")
    if out is not None and out.requires_grad and out.is_leaf:
        raise ValueError("out is a leaf tensor that requires grad, which torch does not let anything write in "
                         "place; pass out.detach() (it shares the storage) or a tensor without requires_grad")
    if out is None:
        if device is None:
            device = f"cuda:{c.device_id}" if c.on_device else "cpu"
        device = usable_device(device)
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"from_compressed decodes onto the CPU or a CUDA device, got {device}")
        out = torch.empty(c.shape, dtype=dtype or torch_dtype(c.dtype_name), device=device)
    cc.decompress(c, out=out, stream=current_stream(out.device))
    return out


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def host_bits(t: torch.Tensor):
    """A NumPy view of CPU tensor ``t`` to decode into: in its dtype, or a same-width integer bit view for bfloat16
    and float8, which NumPy lacks (cupycodec decodes into those; ml_dtypes' types would cost ~0.6 s of import per
    process, paid by a checkpoint load or a first forward)."""
    try:
        return t.numpy()
    except TypeError:
        return t.view(_BITS[t.element_size()]).numpy()

