"""The public entry points: compress, decompress (one array or many), decode plans, save and load.

One-shot functions cover the common case; :class:`Compressor` keeps a parsed configuration for loops, and
:func:`decode_plan` builds a :class:`~cupycodec.DecodePlan` that decodes (and dequantizes) many containers into
fixed buffers with one asynchronous, allocation-free, graph-capturable ``run``. On the GPU every one-shot call is
"get the plan, run it" (:mod:`cupycodec.engine`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from . import _compress, _config, _decompress, backends, interop
from ._cuda import external_stream
from ._decompress import DecodeJob, Quantized
from ._files import atomic_write, open_regular
from .container import CompressedArray
from .errors import DecompressionBombError, UntrustedError, prefix_message
from .quant.reference import _is_int

__all__ = [
    "Compressor",
    "Quantized",
    "clear_caches",
    "compress",
    "compress_many",
    "decode_plan",
    "decompress",
    "decompress_many",
    "default_max_output_nbytes",
    "load",
    "save",
]

_UNSET: Any = object()


@contextlib.contextmanager
def _on_stream(stream: int | None):
    """Make ``stream`` CuPy's current stream while inputs are read (DLPack producers order their work before it)."""
    if stream is None or not _cupy_installed():  # no CuPy: no device data to order; host work ignores the stream
        yield
        return

    with external_stream(stream):
        yield


def _cupy_installed() -> bool:
    return "cupy" in sys.modules or _cupy_found()


@functools.cache
def _cupy_found() -> bool:
    try:
        return importlib.util.find_spec("cupy") is not None
    except (ImportError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------------------------
# compress
# ----------------------------------------------------------------------------------------------------------------


def compress(arr, *, codec="auto", level=None, chunk_nbytes=None, filters=None, quantize=None,
             granularity="channel", axis=0, group_size=128, dtype=None, backend=None, metadata=None, stream=None,
             **options) -> CompressedArray:
    """Compress an array into a :class:`CompressedArray` (lossless unless ``quantize`` is set).

    Parameters
    ----------
    arr : array-like
        A NumPy or CuPy array, a torch tensor (any dtype, ``nn.Parameter`` and views included), or anything with
        DLPack, ``__cuda_array_interface__`` or the NumPy array protocol; any shape (0-d and empty included), any
        strides and byte order. Device input stays on its device.
    codec : str, mapping or Codec
        ``"auto"`` (the best lossless choice for the data and machine: on a GPU ANS for floats and the smallest of
        ANS/Cascaded/Bitcomp on samples otherwise; on a CPU byte planes + zstd or plain zstd, whichever compresses
        samples of the array smaller; never a container bigger than ``"raw"``'s), or one of ``"raw"``, ``"lz4"``,
        ``"snappy"``, ``"gdeflate"``, ``"deflate"``, ``"zstd"``, ``"gzip"``, ``"cascaded"``, ``"bitcomp"``,
        ``"ans"``; codec options go in ``**options`` (e.g. ``data_type="<f2"``).
    level : int, optional
        Compression level, for codecs that have one (CPU backends).
    chunk_nbytes : int, optional
        Uncompressed bytes per independently compressed chunk (multiple of 16, at most 16 MiB); default per codec.
    filters : sequence, optional
        Pipeline stages before the codec, e.g. ``["byteplane"]`` (exponent-aware byte planes for floats).
    quantize : {None, "int8"}
        Lossy INT8 quantization with ``granularity`` (``"channel"`` along ``axis``, ``"group"`` of ``group_size``
        along the last axis, or ``"tensor"``); decompress returns the dequantized array in the original dtype.
    dtype : str, optional
        The logical dtype of a raw bit view, e.g. ``dtype="bfloat16"`` for a uint16/int16 CuPy array of bf16 bits.
    backend : {None, "auto", "cpu", "nvcomp"}
        Where to run (``None``: ``$CUPYCODEC_BACKEND`` or ``"auto"``). An explicit backend is never replaced.
    metadata : mapping, optional
        JSON-able data stored in the header.
    stream : CuPy stream, torch stream or int handle, optional
        CUDA stream for device work (default: CuPy's current stream on the input's device).

    Returns
    -------
    CompressedArray
        On the input's device when the input was on one, else in host memory.

    Raises
    ------
    TypeError
        Unsupported dtype (object, structured, strings, datetimes) or argument types.
    ValueError
        Bad options (unknown quantize, chunk size, data_type that does not fit the data, NaN/Inf when quantizing).
    BackendUnavailableError
        The codec or backend cannot run here; the message names what would.

    See Also
    --------
    compress_many : many arrays in one batched call; Compressor : a reusable configuration.

    Examples
    --------
    >>> import numpy as np, cupycodec as cc
    >>> x = np.arange(1000, dtype=np.int64).reshape(10, 100)
    >>> c = cc.compress(x, codec="zstd", level=3)
    >>> np.array_equal(cc.decompress(c), x)
    True
    """
    return compress_many([arr], codec=codec, level=level, chunk_nbytes=chunk_nbytes, filters=filters,
                         quantize=quantize, granularity=granularity, axis=axis, group_size=group_size, dtype=dtype,
                         backend=backend, metadata=metadata, stream=stream, **options)[0]


def compress_many(arrays: Sequence, *, codec="auto", level=None, chunk_nbytes=None, filters=None, quantize=None,
                  granularity="channel", axis=0, group_size=128, dtype=None, backend=None, metadata=None,
                  stream=None, **options) -> list[CompressedArray]:
    """Compress several arrays with one configuration; the device arrays of each GPU share one encode plan (one
    nvCOMP call per codec config for the whole batch).

    Takes the same keywords as :func:`compress`; ``metadata`` may also be a sequence with one mapping per array.
    """
    if isinstance(arrays, (np.ndarray, CompressedArray, bytes, bytearray, memoryview, str)) \
            or hasattr(arrays, "__dlpack__") or hasattr(arrays, "__cuda_array_interface__"):
        raise TypeError("compress_many takes a sequence of arrays; use compress() for one array")
    if isinstance(arrays, Mapping):  # iterating would give the keys (a state dict's names)
        raise TypeError("compress_many takes a sequence of arrays, got a mapping; pass list(d.values()) and zip the "
                        "containers with d's keys")
    arrays = list(arrays)
    codec_obj = _config.parse_codec(codec, level, options)
    pipeline = _config.parse_filters(filters, quantize, granularity, axis, group_size)
    if metadata is None or isinstance(metadata, Mapping):
        metas = [metadata] * len(arrays)
    else:
        metas = _per_array(metadata, len(arrays))
    sp = interop.stream_handle(stream)
    with _on_stream(sp):
        jobs = [_compress.prepare(a, codec=codec_obj, filters=pipeline, chunk_nbytes=chunk_nbytes, dtype=dtype,
                                  backend=backend, metadata=m, stream=sp) for a, m in zip(arrays, metas)]
    return _compress.compress_jobs(jobs, sp)


def _per_array(metadata, n: int) -> list:
    """``metadata`` given as one mapping per array (a string is no such sequence: it would give one per letter)."""
    if isinstance(metadata, (str, bytes, bytearray, memoryview)) or not isinstance(metadata, Iterable):
        raise TypeError(f"metadata must be a mapping, or a sequence of one mapping per array, got "
                        f"{type(metadata).__name__}")
    metas = list(metadata)
    if len(metas) != n:
        raise ValueError(f"got {len(metas)} metadata mappings for {n} arrays")
    return metas


class Compressor:
    """A reusable compression configuration: parse once, compress many (zstandard's ``ZstdCompressor`` shape).

    Takes the keywords of :func:`compress` but ``metadata`` and ``stream``, which are per call: ``compress(x, *,
    metadata=None, stream=None)`` and ``compress_many(xs, ...)`` take them and behave like the functions.

    Examples
    --------
    >>> import numpy as np, cupycodec as cc
    >>> comp = cc.Compressor(codec="zstd", level=1)
    >>> [c.codec for c in comp.compress_many([np.ones(10), np.zeros(5)])]
    ['zstd', 'zstd']
    """

    def __init__(self, *, codec="auto", level=None, chunk_nbytes=None, filters=None, quantize=None,
                 granularity="channel", axis=0, group_size=128, dtype=None, backend=None, **options):
        per_call = sorted({"metadata", "stream"} & options.keys())
        if per_call:  # else the codec reported them as unknown options of its own
            raise TypeError(f"{' and '.join(per_call)} go to each call: Compressor(...).compress(x, "
                            f"{per_call[0]}=...) or .compress_many(xs, {per_call[0]}=...)")
        self._codec = _config.parse_codec(codec, level, options)
        self._filters = _config.parse_filters(filters, quantize, granularity, axis, group_size)
        self._chunk = chunk_nbytes
        self._dtype = dtype
        self._backend = backends.requested_backend(backend) if backend is not None else None
        # auto's codecs share the rule (a multiple of 16, 16 B to 16 MiB): checked now for them too, so that a Zarr
        # array is refused when it is created, not at its first write
        _config.check_chunk(chunk_nbytes, self._codec if self._codec is not None else _config.cpu_auto())

    def compress(self, arr, *, metadata=None, stream=None) -> CompressedArray:
        return self.compress_many([arr], metadata=metadata, stream=stream)[0]

    def compress_many(self, arrays, *, metadata=None, stream=None) -> list[CompressedArray]:
        return compress_many(arrays, codec=self._codec if self._codec is not None else "auto",
                             chunk_nbytes=self._chunk, filters=self._filters, dtype=self._dtype,
                             backend=self._backend, metadata=metadata, stream=stream)

    def __repr__(self):
        return f"Compressor(codec={self._codec or 'auto'!r}, filters={self._filters!r})"


# ----------------------------------------------------------------------------------------------------------------
# decompress
# ----------------------------------------------------------------------------------------------------------------

_MIN_DEFAULT_LIMIT = 1 << 30
_RATIO_DEFAULT_LIMIT = 1024


def default_max_output_nbytes(compressed_nbytes: int) -> int:
    """The decompression bound applied to bytes from outside: max(1 GiB, 1024 x the compressed size).

    Real data stays far below 1024x (all-zero arrays reach it); pass ``max_output_nbytes=None`` to lift it.
    """
    return max(_MIN_DEFAULT_LIMIT, _RATIO_DEFAULT_LIMIT * compressed_nbytes)


def _as_compressed(data, verify: bool, trusted: bool) -> tuple[CompressedArray, bool]:
    if not isinstance(trusted, bool):  # for a CompressedArray too, which does not read it: "yes" was ignored there
        raise TypeError(f"trusted must be True or False, got {trusted!r}")
    if isinstance(data, CompressedArray):
        return data, bool(data._cache.get("external"))
    if isinstance(data, (str, os.PathLike)):
        raise TypeError("decompress takes a CompressedArray or bytes; use cupycodec.load(path) for files")
    try:
        memoryview(data)
    except TypeError:
        raise TypeError(f"decompress takes a CompressedArray or a bytes-like object, got {type(data).__name__}") \
            from None
    return CompressedArray.from_bytes(data, verify=verify, trusted=trusted), True


def decompress(data, *, device="auto", out=None, max_output_nbytes=_UNSET, dequantize=True, backend=None,
               verify=True, trusted=False, stream=None):
    """Decompress a :class:`CompressedArray` (or container bytes) back into an array, bit for bit.

    Parameters
    ----------
    data : CompressedArray or bytes-like
        Bytes are parsed and fully validated first (``verify=True`` checks every chunk CRC) and are untrusted
        unless ``trusted=True`` (see :meth:`CompressedArray.from_bytes`).
    device : {"auto", "cpu", "cuda", "cuda:N"}, int or torch.device
        Where the result lives; ``"auto"`` follows the compressed data (host -> NumPy, device -> CuPy on the
        payload's device). ``"cuda:N"`` allocates and decodes on device N whatever the current device is.
    out : array, optional
        A C-contiguous, writable buffer of the right shape and dtype to fill: NumPy, CuPy, a torch tensor or any
        DLPack/``__cuda_array_interface__`` object (it decides the location); for ``dequantize=False`` a
        ``(codes, scales)`` pair. For INT8 data, a float32/float16/bfloat16/float64 ``out`` receives the values in
        its own dtype. Called again with the same container and buffer, a GPU decode reuses its plan. A decode
        writes ``out`` as it goes: after an error (a chunk failing its CRC, say) its contents are undefined.
    max_output_nbytes : int or None
        Refuse (before allocating) to produce more bytes. Default: unbounded for arrays this process compressed,
        :func:`default_max_output_nbytes` for bytes from outside (from_bytes, load, bytes arguments).
    dequantize : bool
        For INT8 data: return the dequantized array (True) or a :class:`Quantized` named tuple: ``.codes`` and
        ``.scales``, with the ``granularity``, ``axis``, ``group_size`` and ``dtype`` that go with them (six
        fields: ``codes, scales = ...`` does not unpack it).
    backend : {None, "auto", "cpu", "nvcomp"}
        Force a decoder; by default the GPU decodes device-bound data and the CPU host-bound data (GPU-only codecs
        use the GPU when one is usable, else raise BackendUnavailableError naming what would work). Untrusted
        containers decode on the CPU (hardened decoders) whatever the target.
    trusted : bool
        For bytes: vouch for them (they then may reach nvCOMP's GPU decoders).
    stream : CuPy stream, torch stream or int handle, optional
        CUDA stream for device work. Device output is ready on that stream when this returns; the call waits for
        it only to check nvCOMP's per-chunk statuses (use :func:`decode_plan` for fully asynchronous decoding).

    Returns
    -------
    numpy.ndarray, cupy.ndarray, ``out`` itself, or Quantized
        bfloat16 on the CPU is an ``ml_dtypes.bfloat16`` array; on the GPU CuPy's bfloat16 where it has one, else
        a uint16 array of its bits. A fresh result is C-contiguous: the container records the shape, dtype and byte
        order, not the input's memory layout, so a Fortran-order or strided input comes back equal element for
        element, in C order.

    Examples
    --------
    >>> import numpy as np, cupycodec as cc
    >>> blob = cc.compress(np.float32([1.5, -0.0, np.nan])).to_bytes()
    >>> cc.decompress(blob)
    array([ 1.5, -0. ,  nan], dtype=float32)
    """
    outs = None if out is None else [out]
    return decompress_many([data], out=outs, device=device, max_output_nbytes=max_output_nbytes,
                           dequantize=dequantize, backend=backend, verify=verify, trusted=trusted, stream=stream)[0]


def decompress_many(items: Sequence, *, out=None, device="auto", max_output_nbytes=_UNSET, dequantize=True,
                    backend=None, verify=True, trusted=False, stream=None) -> list:
    """Decompress several containers; those bound for one GPU go through one decode plan (one nvCOMP call per
    codec config, filters included).

    Takes the keywords of :func:`decompress`; ``out`` is a list with one buffer (or None) per item.
    """
    if isinstance(items, (CompressedArray, bytes, bytearray, memoryview, np.ndarray, str, os.PathLike)):
        raise TypeError("decompress_many takes a sequence of items; use decompress() for one (and "
                        "cupycodec.load(path) for a file)")
    if isinstance(items, Mapping):  # iterating would give the keys
        raise TypeError("decompress_many takes a sequence of items, got a mapping; pass list(d.values()) and zip the "
                        "results with d's keys")
    items = list(items)
    outs = [None] * len(items) if out is None else list(out)
    if len(outs) != len(items):
        raise ValueError(f"got {len(outs)} out buffers for {len(items)} items")
    choice = backends.requested_backend(backend)
    sp = interop.stream_handle(stream)
    jobs = []
    with _on_stream(sp):
        for i, (item, o) in enumerate(zip(items, outs)):
            try:
                c, external = _as_compressed(item, verify, trusted)
                job = DecodeJob(c, o, dequantize)
                job.check_out()
            except Exception as exc:
                if len(items) > 1:  # which of many: the item's own error, its index before the message
                    prefix_message(exc, f"item {i}")
                raise
            limit = max_output_nbytes
            if limit is _UNSET:
                limit = default_max_output_nbytes(c.nbytes) if external else None
            elif limit is not None and not _is_int(limit):
                raise TypeError(f"max_output_nbytes must be a non-negative int or None, got {limit!r}")
            elif limit is not None and limit < 0:  # a bad value, as chunk_nbytes=0 is: ValueError
                raise ValueError(f"max_output_nbytes must be a non-negative int or None, got {limit!r}")
            if limit is not None and job.out_nbytes > limit:
                raise DecompressionBombError(job.out_nbytes, int(limit))
            job.target = _decompress.target_of(device, job)
            job.gpu = _decompress.route(c, job.target, choice)
            jobs.append(job)
        _decompress.check_disjoint(jobs)
    _decompress.decode_jobs(jobs, sp)
    return [j.result for j in jobs]


def decode_plan(items: Sequence[CompressedArray], out: Sequence, *, dequantize=True, stream=None, alloc=None):
    """Build a reusable :class:`~cupycodec.DecodePlan` that decodes ``items`` into ``out`` on their GPU.

    One ``plan.run(stream)`` enqueues everything (one nvCOMP call per codec config, byte-plane merges, INT8
    dequantization) and returns at once: no host synchronization, no allocation, no Python work per chunk, so it
    can be captured in a CUDA graph. ``plan.check(stream)`` waits and raises if nvCOMP reported a bad chunk.

    Parameters
    ----------
    items : sequence of CompressedArray
        Device-resident (``c.to_device()``), all on one GPU, trusted (compressed here, or loaded with
        ``trusted=True`` or a matching ``key``): an untrusted container raises :class:`~cupycodec.UntrustedError`
        unless every chunk of it is stored (then the plan only copies, within the validated table's bounds).
    out : sequence
        One buffer per item, on the items' GPU: C-contiguous, 16-byte aligned, of the item's shape. Any framework
        (CuPy, torch, DLPack, ``__cuda_array_interface__``). A lossless item needs its dtype (or a same-width
        integer bit view); an INT8 item, with ``dequantize=True``, a float32, float16, bfloat16 or float64 buffer
        (the values are written in that dtype), else a ``(codes, scales)`` pair.
    dequantize : bool
        For INT8 items: dequantize into ``out`` (True) or write codes and scales (False).
    stream : CuPy stream, torch stream or int handle, optional
        The stream the plan's tables are uploaded on (the plan waits for them once, so it may run on any stream).
    alloc : callable, optional
        ``alloc(nbytes)`` returns the device buffer the plan keeps its tables, nvCOMP's temporary memory and its
        intermediate segments in (e.g. ``lambda n: torch.empty(n, dtype=torch.uint8, device="cuda")``, so that
        the framework's allocator accounts for it); CuPy's pool by default. ``plan.nbytes`` is its size.

    Keep ``items`` and ``out`` alive while the plan is used. Build the plan before any CUDA-graph capture of its
    stream (:class:`~cupycodec.CaptureError` inside one).
    """
    from .engine import engine, stream_ptr
    from .engine.decode import DecodePlan, Target, kind_of

    items, outs = list(items), list(out)
    if len(items) != len(outs):
        raise ValueError(f"got {len(outs)} out buffers for {len(items)} items")
    devices = set()
    targets = []
    for i, (c, o) in enumerate(zip(items, outs)):
        if not isinstance(c, CompressedArray):
            raise TypeError(f"items[{i}] is a {type(c).__name__}; decode_plan takes CompressedArrays")
        if not c.trusted and any(s.table.n_encoded for s in c.segments):  # plans run nvCOMP: no untrusted chunk
            raise UntrustedError(next(s.codec.codec_id for s in c.segments if s.table.n_encoded),
                                 "put it in a decode plan")
        if not c.on_device:
            raise ValueError(f"items[{i}] lives on the host; decode_plan takes device-resident CompressedArrays "
                             "(call c.to_device() first)")
        c.verify()  # CRCs still pending (from_bytes, then with_payload over device bytes): checked once, here
        devices.add(c.device_id)
        kind = kind_of(c.pipeline, dequantize)
        if kind == "plain" and c.spec.byteorder == ">":
            raise ValueError(f"items[{i}] is big-endian; decode plans write native byte order (use decompress())")
        job = DecodeJob(c, o, dequantize)
        views = job.views
        for v in views:
            if not v.on_device or v.device != c.device_id:
                raise ValueError(f"out[{i}] must be on cuda:{c.device_id}, where items[{i}] is")
            if v.array.size and v.array.data.ptr % 16:
                raise ValueError(f"out[{i}] must be 16-byte aligned (fresh allocations are)")
        job.check_out(f"out[{i}]")
        dtype = None if kind == "codes" else _decompress._out_dtype(job) if kind == "dequantize" else c.spec.dtype
        targets.append(Target(c, kind, tuple(v.array.data.ptr for v in views), dtype))
    if len(devices) > 1:
        raise ValueError(f"decode_plan items live on several devices ({sorted(devices)}); build one plan per device")
    device = devices.pop() if devices else interop.parse_device("cuda")[1]
    sp = stream_ptr(interop.stream_handle(stream), device)
    return DecodePlan(engine(device), targets, stream_ptr=sp, alloc=alloc, sync=True)


def clear_caches() -> None:
    """Forget every cached plan, nvCOMP size query and staging buffer (they are rebuilt on demand); plans kept by
    live containers for ``decompress(c, out=...)`` go with their containers."""
    from .engine import clear_caches as _clear

    _clear()


# ----------------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------------


def save(path, c: CompressedArray, *, overwrite: bool = True, key=None) -> None:
    """Write a container to ``path`` atomically (a temporary file in the same directory, then ``os.replace``), with
    the permissions a plain write would give (an existing file's mode is kept; a new one gets 0o666 less the umask).
    With ``overwrite=False`` an existing file raises :class:`FileExistsError`, also one that another writer creates
    while this one writes (the temporary file is hard-linked into place instead of renamed).

    With ``key`` (a secret of at least 16 bytes, e.g. ``os.urandom(32)`` kept by you) the file carries a MAC of
    the container (keyed BLAKE3, docs/FORMAT.md): ``load(path, key=key)`` then trusts it, and a file changed or made
    by someone without the key fails to load with :class:`~cupycodec.AuthenticationError`.
    """
    if not isinstance(c, CompressedArray):
        raise TypeError(f"save takes a CompressedArray, got {type(c).__name__}; compress the array first")
    if not isinstance(overwrite, bool):  # overwrite="no" is truthy: it replaced the file it was meant to keep
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    atomic_write(path, lambda f: c.write_to(f, key=key), overwrite=overwrite)


def load(path, *, verify: bool = True, mmap: bool = True, trusted: bool = False, key=None) -> CompressedArray:
    """Read a container file. With ``mmap=True`` the file is memory-mapped, so it never needs to fit in memory
    at once; the result keeps the mapping open. Do not truncate or rewrite the file in place while the result is
    in use: reading a mapped page past a shortened file's end kills the process (SIGBUS). :func:`save` replaces
    a file atomically, which is safe; ``mmap=False`` reads the file into memory instead.

    A file is untrusted (it decodes only through hardened CPU decoders, see
    :meth:`CompressedArray.from_bytes`) unless ``trusted=True``, or ``key`` is the secret it was saved with.

    With ``verify=True`` each chunk's CRC32 is checked as the chunk is decoded (see
    :meth:`CompressedArray.from_bytes`), and the CPU decoder drops the file pages it has decoded from the
    process's resident set, so decoding a memory-mapped file needs about the output's memory.
    """
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if mmap and size:
            import mmap as _mmap

            buf: Any = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ)
        else:
            buf = f.read()
    c = CompressedArray.from_bytes(buf, verify=verify, trusted=trusted, key=key)
    if mmap and size and hasattr(buf, "madvise") and hasattr(_mmap, "MADV_DONTNEED"):
        c._cache["mmap"] = (buf, c.nbytes - c._header.payload_nbytes)  # the CPU decoder drops decoded pages
    return c
