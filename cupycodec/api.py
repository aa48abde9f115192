"""The public entry points: compress, decompress (one array or many), save, load and info.

One-shot functions cover the common case; :class:`Compressor` keeps a parsed configuration for loops, and
:class:`cupycodec.DecodePlan` (via :func:`decode_plan`) keeps everything a repeated GPU decode needs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

from . import backends, registry
from .backends import cpu, nvcomp
from .codecs import Codec
from .codecs.base import GPU_ONLY_HINT
from .container import (
    ChunkTable,
    CompressedArray,
    Header,
    Segment,
    build_segments,
    producer_info,
)
from .dtypes import ArraySpec, gpu_dtype, is_float
from .errors import (
    BackendUnavailableError,
    DecompressionBombError,
    UnsupportedDtypeError,
)
from .filters import Byteplane, Filter, Int8

__all__ = [
    "Compressor",
    "Quantized",
    "compress",
    "compress_many",
    "decompress",
    "decompress_many",
    "default_max_output_nbytes",
    "load",
    "save",
]

_UNSET: Any = object()


class Quantized(NamedTuple):
    """INT8 codes and float32 scales, returned by ``decompress(..., dequantize=False)``."""

    codes: Any
    scales: Any
    granularity: str
    axis: int | None
    group_size: int | None
    dtype: str  # the original dtype's name ("BF16", "F16", "F32")


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------


def _is_cupy_array(obj) -> bool:
    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(obj, cp.ndarray):
        return True
    return type(obj).__module__.split(".")[0] == "cupy" and hasattr(obj, "__cuda_array_interface__")


def _as_array(obj) -> tuple[Any, bool]:
    """(array, on_device) for NumPy, CuPy, __cuda_array_interface__, DLPack and array-like inputs."""
    if isinstance(obj, np.ndarray):
        return obj, False
    if isinstance(obj, CompressedArray):
        raise TypeError("this is already a CompressedArray; pass it to decompress() instead")
    if _is_cupy_array(obj):
        return obj, True
    if hasattr(obj, "__cuda_array_interface__"):
        import cupy

        return cupy.asarray(obj), True
    if hasattr(obj, "__dlpack_device__"):
        dev = int(obj.__dlpack_device__()[0])
        try:
            if dev in (2, 13):  # kDLCUDA, kDLCUDAManaged
                import cupy

                return cupy.from_dlpack(obj), True
            if dev in (1, 3):  # kDLCPU, kDLCUDAHost
                return np.from_dlpack(obj), False
        except (TypeError, ValueError, RuntimeError, BufferError) as exc:
            raise TypeError(f"cannot import {type(obj).__name__} through DLPack ({exc}); for bfloat16 pass a 16-bit "
                            "integer view and dtype='bfloat16'") from exc
        raise TypeError(f"DLPack device type {dev} is neither CPU nor CUDA")
    arr = np.asarray(obj)
    if arr.dtype == object:
        raise UnsupportedDtypeError(arr.dtype, ["numeric arrays"], "object arrays hold Python references, not data")
    return arr, False


def _contiguous(arr, on_device: bool):
    if on_device:
        import cupy

        arr = cupy.ascontiguousarray(arr)
        if arr.size and arr.data.ptr % 256:  # nvCOMP needs aligned chunk pointers
            arr = arr.copy()
        return arr
    return np.ascontiguousarray(arr)


def _flat_bytes(arr, on_device: bool):
    if on_device:
        return arr.reshape(-1).view("u1")
    return cpu.as_bytes(arr)


# ----------------------------------------------------------------------------------------------------------------
# Configuration parsing
# ----------------------------------------------------------------------------------------------------------------


def _parse_codec(codec, level, options) -> Codec | None:
    """A codec instance, or None for ``codec="auto"``."""
    if type(codec) is str and not options and level is None:  # codecs are immutable: one instance per plain id
        hit = _PLAIN_CODECS.get(codec)
        if hit is None or type(hit) is not registry._codecs.get(codec):  # (re-registered with replace=True)
            if codec == "auto":
                return None
            hit = _PLAIN_CODECS[codec] = registry.get_codec(codec)
        return hit
    if isinstance(codec, Codec):
        if level is not None or options:
            raise TypeError("pass options either on the Codec instance or as keywords, not both")
        return codec
    if isinstance(codec, Mapping):
        if level is not None or options:
            raise TypeError("pass options either in the codec config or as keywords, not both")
        return registry.get_codec(codec)
    if not isinstance(codec, str):
        raise TypeError(f"codec must be a string id, a config mapping or a Codec, got {type(codec).__name__}")
    if codec == "auto":
        if options or level is not None:
            raise TypeError("codec='auto' takes no options; name a codec to pass level or options")
        return None
    cls = type(registry.get_codec(codec))
    kwargs = dict(options)
    if level is not None:
        if "level" not in cls.options:
            raise TypeError(f"codec {codec!r} has no level; its options: {', '.join(cls.options) or 'none'}")
        kwargs["level"] = level
    return cls(**kwargs)


_PLAIN_CODECS: dict[str, Codec] = {}


def _parse_filters(filters, quantize, granularity, axis, group_size) -> list[Filter]:
    out: list[Filter] = []
    if quantize is not None:
        if quantize != "int8":
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        out.append(Int8(granularity=granularity, axis=axis, group_size=group_size))
    for f in filters or ():
        if isinstance(f, Filter):
            out.append(f)
        elif isinstance(f, (str, Mapping)):
            out.append(registry.get_filter(f))
        else:
            raise TypeError(f"filters take Filter instances, ids or config mappings, got {type(f).__name__}")
    return out


def _auto(spec: ArraySpec, on_gpu: bool, quantized: bool) -> tuple[Codec, list[Filter]]:
    """The best lossless choice for this data on this machine (measured: benchmarks/RESULTS.md)."""
    from .codecs import Zstd

    if on_gpu:
        return _gpu_auto(), []  # ANS picks its float data type from the dtype ('<f2' for bf16/fp16)
    if not quantized and (is_float(spec.dtype) or spec.dtype in ("C64", "C128")) and spec.itemsize in (2, 4, 8, 16) \
            and not spec.dtype.startswith(("FLD", "CLD")):
        return Zstd(level=AUTO_ZSTD_LEVEL), [Byteplane(rotate=True)]
    return Zstd(level=AUTO_ZSTD_LEVEL), []


@functools.cache
def _gpu_auto() -> Codec:
    """The codec auto picks on a GPU: one ANS() for every call (codecs are immutable; its resolutions memoize)."""
    from .codecs import ANS

    return ANS()


AUTO_ZSTD_LEVEL = 1  # on exponent planes zstd-1 beats levels 2-12 (benchmarks/RESULTS.md)
_ANS_FLOAT_MODES = ("F16", "BF16", "F32", "F8_E4M3")  # nvCOMP's ANS has a float mode for these: no trial needed
_TRIAL_BLOCK = 256 * 1024
_TRIAL_MIN_NBYTES = 1 << 20


def _gpu_trial(arr, spec: ArraySpec) -> Codec:
    """codec="auto" on the GPU for data without an ANS float mode (integers, bytes, float64, complex): compress four
    256 KiB samples spread over the array with ANS, Cascaded and Bitcomp in one batched call and keep the smallest
    (ANS on ties: it decodes fastest). Sorted or repetitive integers go to Cascaded/Bitcomp (10-40x where ANS gets
    1.6x, benchmarks/RESULTS.md); noisy bytes stay with ANS. Costs one extra synchronization."""
    import cupy

    from .codecs import ANS, Bitcomp, Cascaded

    flat = arr.reshape(-1).view("u1")
    n = int(flat.size)
    if n < _TRIAL_MIN_NBYTES:
        return ANS()
    starts = [(i * (n - _TRIAL_BLOCK) // 3) // 16 * 16 for i in range(4)]
    sample = cupy.concatenate([flat[s : s + _TRIAL_BLOCK] for s in starts])
    sample_spec = ArraySpec(spec.dtype, spec.byteorder, (sample.size // spec.itemsize,))
    candidates = [c.resolve(sample_spec) for c in (ANS(), Cascaded(), Bitcomp())]
    outs = nvcomp.compress_segments([nvcomp.SegmentInput(sample, c, c.default_chunk()) for c in candidates])
    sizes = [int(o.comp_nbytes.astype(np.int64).sum()) for o in outs]
    best = min(range(len(candidates)), key=lambda i: (sizes[i], i))
    return (ANS(), Cascaded(), Bitcomp())[best]


_SMALL_MIN_CHUNKS = 16  # on the GPU, small segments get at least this many chunks ...
_SMALL_MIN_CHUNK_NBYTES = 64 * 1024  # ... of no less than this


def gpu_default_chunk(codec: Codec, nbytes: int) -> int:
    """The GPU's default chunk for a segment of ``nbytes``: the codec's default, smaller for small segments.

    nvCOMP gives each chunk to a few thread blocks, so a 1 MiB array in four 256 KiB ANS chunks leaves most of the
    GPU idle: measured on an H200, 64 KiB chunks cut a 1 MiB ANS round trip by about 100 us (compress) and 17 us
    (decode) for about 2% of ratio (benchmarks/RESULTS.md). Segments under 16 default chunks therefore use the
    largest power-of-two chunk that still gives 16 chunks, but never less than 64 KiB (nor more than the default).
    """
    default = codec.default_chunk()
    if nbytes >= _SMALL_MIN_CHUNKS * default:
        return default
    want = max(_SMALL_MIN_CHUNK_NBYTES, 1 << max(0, (max(nbytes, 1) // _SMALL_MIN_CHUNKS).bit_length() - 1))
    return min(default, want)


def _check_chunk(chunk_nbytes, codec: Codec, nbytes: int | None = None) -> int:
    """The chunk size to use: the caller's (validated) or the default (the GPU's for ``nbytes`` when given)."""
    if chunk_nbytes is None:
        return codec.default_chunk() if nbytes is None else gpu_default_chunk(codec, nbytes)
    if isinstance(chunk_nbytes, bool) or not isinstance(chunk_nbytes, int):
        raise TypeError(f"chunk_nbytes must be an int, got {chunk_nbytes!r}")
    if chunk_nbytes % 16 or not 16 <= chunk_nbytes <= codec.max_chunk_nbytes:
        raise ValueError(f"chunk_nbytes must be a multiple of 16 between 16 and {codec.max_chunk_nbytes} "
                         f"(16 MiB), got {chunk_nbytes}")
    return chunk_nbytes


def _stream_ctx(stream):
    if stream is None:
        return contextlib.nullcontext()
    import cupy

    return cupy.cuda.ExternalStream(stream) if isinstance(stream, int) else stream


# ----------------------------------------------------------------------------------------------------------------
# compress
# ----------------------------------------------------------------------------------------------------------------


class _Job:
    __slots__ = ("arrays", "backend", "chunk", "codec", "keep_on_device", "metadata", "pipeline", "spec", "specs")


def _prepare(x, *, codec, filters, chunk_nbytes, dtype, backend, metadata) -> _Job:
    arr, on_device = _as_array(x)
    spec = ArraySpec.of(arr, _dtype_override(dtype))
    pipeline = list(filters)
    quantized = any(not f.lossless for f in pipeline)
    trial = False
    if codec is None:
        where = backends.select(backend, on_device=on_device, codecs=[])
        codec, extra = _auto(spec, where == "nvcomp", quantized)
        if not pipeline:
            pipeline = extra
        trial = where == "nvcomp" and not pipeline and spec.dtype not in _ANS_FLOAT_MODES
    else:
        _validate(spec, pipeline, codec, chunk_nbytes)  # option errors before backend errors
        where = backends.select(backend, on_device=on_device, codecs=[codec])
    gpu = where == "nvcomp"
    if gpu and not on_device:
        import cupy

        host = np.ascontiguousarray(arr)
        if spec.byteorder == ">" and not pipeline:  # CuPy holds native order only: ship the exact bytes
            arr = cupy.asarray(host.reshape(-1).view(np.uint8))
        else:  # filters work on values, which do not depend on the byte order
            arr = cupy.asarray(host.astype(host.dtype.newbyteorder("="), copy=False).view(_storage_dtype(spec)))
    elif on_device and not gpu:
        arr = arr.get()
        if spec.dtype != ArraySpec.of(arr).dtype:  # a raw bit view of bf16/f8: give NumPy the logical dtype
            arr = arr.view(spec.numpy_dtype())
    elif not on_device and dtype is not None:
        arr = np.ascontiguousarray(arr).view(spec.numpy_dtype())
    arr = _contiguous(arr, gpu)
    if trial:
        codec = _gpu_trial(arr, spec)
    specs: dict[str, ArraySpec] = {"data": spec}
    arrays: dict[str, Any] = {"data": arr}
    resolved = []
    for f in pipeline:
        f = f.resolve(specs)
        out_specs = f.specs(specs)
        arrays = f.encode(arrays, specs, gpu)
        specs = out_specs
        resolved.append(f)
    job = _Job()
    job.arrays, job.specs, job.pipeline, job.spec = arrays, specs, resolved, spec
    job.codec = codec
    job.chunk = chunk_nbytes
    job.backend = where
    job.keep_on_device = on_device and gpu
    job.metadata = _check_metadata(metadata)
    return job


def _validate(spec: ArraySpec, pipeline: list[Filter], codec: Codec, chunk_nbytes) -> None:
    specs = {"data": spec}
    for f in pipeline:
        f = f.resolve(specs)
        specs = f.specs(specs)
    for s in specs.values():
        _check_chunk(chunk_nbytes, _resolved(codec, s))


def _dtype_override(dtype) -> str | None:
    if dtype is None:
        return None
    from .dtypes import dtype_name

    if isinstance(dtype, str) and dtype.lower() in ("bfloat16", "bf16"):
        return "BF16"
    if isinstance(dtype, str) and dtype.isupper():
        return dtype
    import ml_dtypes  # noqa: F401  (so "float8_e4m3fn" style names resolve)

    return dtype_name(np.dtype(dtype))[0]


def _storage_dtype(spec: ArraySpec) -> np.dtype:
    from .dtypes import storage_dtype

    return storage_dtype(spec.dtype)


def _check_metadata(metadata) -> dict:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise TypeError("metadata must be a mapping with string keys (stored as JSON)")
    return dict(metadata)


def _segment_codecs(job: _Job, gpu: bool = False) -> list[tuple[str, ArraySpec, Codec, int]]:
    out = []
    for name, spec in job.specs.items():
        codec = _resolved(job.codec, spec)
        out.append((name, spec, codec, _check_chunk(job.chunk, codec, spec.nbytes if gpu else None)))
    return out


def _resolved(codec: Codec, spec: ArraySpec) -> Codec:
    """codec.resolve(spec), memoized per codec config, dtype and size modulo 8 (all that resolving looks at; it
    rebuilds the codec from its config, which costs more than the lookup)."""
    key = (codec.config_key(), spec.dtype, spec.byteorder, spec.nbytes % 8)
    hit = _RESOLVED.get(key)
    if hit is None:
        hit = codec.resolve(spec)
        if len(_RESOLVED) > 256:
            _RESOLVED.clear()
        _RESOLVED[key] = hit
    return hit


_RESOLVED: dict = {}


def _compress_cpu(job: _Job) -> CompressedArray:
    pieces, blobs = [], []
    for name, spec, codec, chunk in _segment_codecs(job):
        comp, crc, flags, chunks = cpu.encode_segment(_flat_bytes(job.arrays[name], False), codec, chunk)
        pieces.append((name, spec, codec, chunk, ChunkTable.build(comp, crc, flags)))
        blobs.append(chunks)
    segments = build_segments(pieces)
    header = Header(job.spec, tuple(job.pipeline), segments, producer_info("cpu"), job.metadata)
    payload = bytearray(header.payload_nbytes)
    mv = memoryview(payload)
    for seg, chunks in zip(segments, blobs):
        table = seg.table.to_bytes()
        mv[seg.offset : seg.offset + len(table)] = table
        for off, data in zip(seg.chunk_offsets.tolist(), chunks):
            mv[off : off + len(data)] = data
    return CompressedArray(header, mv)


def _compress_gpu(jobs: list[_Job]) -> list[CompressedArray]:
    import cupy

    if len(jobs) == 1 and len(jobs[0].specs) == 1 and _ONE_SEGMENT_PATH:
        job = jobs[0]
        ((name, spec, codec, chunk),) = _segment_codecs(job, gpu=True)
        if nvcomp.fits_one(codec, spec.nbytes, chunk):
            return [_compress_gpu_one(job.arrays[name], job.spec, tuple(job.pipeline), codec, chunk,
                                      job.keep_on_device, job.metadata, name=name, seg_spec=spec)]
    inputs, owners = [], []
    for j, job in enumerate(jobs):
        for name, spec, codec, chunk in _segment_codecs(job, gpu=True):
            data = job.arrays[name]  # C-contiguous (prepared or freshly made by a filter)
            if data.nbytes and data.data.ptr % 256:
                data = data.copy()
            nvcomp.warn_ignored_level(codec)
            inputs.append(nvcomp.SegmentInput(data, codec, chunk))
            owners.append((j, name, spec, codec, chunk))
    outputs = nvcomp.compress_segments(inputs)
    results, pending = [], []
    event = cupy.cuda.Event(block=False, disable_timing=True)
    first = 0
    for job in jobs:
        n_seg = len(job.specs)
        idx = range(first, first + n_seg)
        first += n_seg
        crcs = [nvcomp.PendingCRC() for _ in idx]  # filled on the device by pack_payload, read on first use
        pieces = [(owners[i][1], owners[i][2], owners[i][3], owners[i][4],
                   ChunkTable.build(outputs[i].comp_nbytes, crc, outputs[i].flags)) for i, crc in zip(idx, crcs)]
        segments = build_segments(pieces)
        header = Header(job.spec, tuple(job.pipeline), segments, producer_info("nvcomp"), job.metadata)
        payload = cupy.empty(header.payload_nbytes, dtype=np.uint8)
        # Each chunk's CRC goes to its slot in its segment's table: comp sizes (u32 x n), then the CRCs.
        crc_slots = [seg.offset + 4 * seg.n_chunks + 4 * np.arange(seg.n_chunks, dtype=np.uint64) for seg in segments]
        cat = _first if len(segments) == 1 else np.concatenate  # the common single segment needs no copies
        nvcomp.pack_payload(payload, [(seg.offset, seg.table.bytes_without_crcs()) for seg in segments],
                            cat([outputs[i].src_ptrs for i in idx]), cat([seg.chunk_offsets for seg in segments]),
                            cat([outputs[i].comp_nbytes for i in idx]), cat(crc_slots))
        pending.append((payload, header, crcs))
    event.record()
    for job, (payload, header, crcs) in zip(jobs, pending):
        if not job.keep_on_device:
            payload = memoryview(payload.get()).cast("B")
        for seg, crc in zip(header.segments, crcs):
            crc.bind(payload, seg.offset + 4 * seg.n_chunks, seg.n_chunks, event)
        results.append(CompressedArray(header, payload))
    # No sync: every launch above is ordered on this stream, and CuPy's pool reuses freed scratch only in that
    # order, so the payload is complete for any later work on the stream. The chunk CRCs reach the host when first
    # needed (to_bytes, save, header, nbytes), after the event recorded above.
    return results


def _first(arrays):
    return arrays[0]


_ONE_SEGMENT_PATH = True  # tests turn it off to check that both paths write the same bytes


def _compress_gpu_one(data, spec: ArraySpec, pipeline: tuple, codec: Codec, chunk: int, keep_on_device: bool,
                      metadata, *, name: str = "data", seg_spec: ArraySpec | None = None) -> CompressedArray:
    """One segment (``data``: C-contiguous device array; ``codec`` resolved; ``chunk`` checked) through
    nvcomp.compress_one, which packs in a few host calls; the header is built straight from what it returns (the
    bytes equal the general path's)."""
    if data.nbytes and data.data.ptr % 256:
        data = data.copy()
    nvcomp.warn_ignored_level(codec)
    packed = nvcomp.compress_one(data, codec, chunk)
    payload = packed.payload
    seg = Segment(name, seg_spec or spec, codec, chunk, 0, int(payload.nbytes),
                  ChunkTable(packed.comp_nbytes, packed.crc, packed.flags))
    nvcomp.remember_rows(seg, packed.rows)
    header = Header(spec, pipeline, (seg,), producer_info("nvcomp"), metadata or _NO_METADATA)
    if not keep_on_device:
        payload = memoryview(payload.get()).cast("B")
        packed.crc.bind(payload, 4 * seg.n_chunks, seg.n_chunks, None)
    return CompressedArray(header, payload)


_NO_METADATA: Mapping = MappingProxyType({})


def compress(arr, *, codec="auto", level=None, chunk_nbytes=None, filters=None, quantize=None,
             granularity="channel", axis=0, group_size=128, dtype=None, backend=None, metadata=None, stream=None,
             **options) -> CompressedArray:
    """Compress an array into a :class:`CompressedArray` (lossless unless ``quantize`` is set).

    Parameters
    ----------
    arr : array-like
        A NumPy or CuPy array, or anything with ``__cuda_array_interface__``, DLPack or the NumPy array protocol;
        any shape (0-d and empty included), any strides and byte order. Device input stays on the device.
    codec : str, mapping or Codec
        ``"auto"`` (the best lossless choice for the data and machine: on a GPU ANS for floats and the smallest of
        ANS/Cascaded/Bitcomp on samples otherwise; on a CPU byte planes + zstd for floats, zstd otherwise), or one
        of ``"raw"``, ``"lz4"``, ``"snappy"``, ``"gdeflate"``, ``"deflate"``, ``"zstd"``, ``"gzip"``,
        ``"cascaded"``, ``"bitcomp"``, ``"ans"``; codec options go in ``**options`` (e.g. ``data_type="<f2"``).
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
    stream : cupy Stream or int, optional
        CUDA stream for device work (default: CuPy's current stream).

    Returns
    -------
    CompressedArray
        On the device when the input was, else in host memory.

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
    if (filters is None and quantize is None and dtype is None and backend is None and metadata is None
            and stream is None and level is None and not options and _is_cupy_array(arr)):
        c = _compress_device_plain(arr, codec, chunk_nbytes)
        if c is not None:
            return c
    return compress_many([arr], codec=codec, level=level, chunk_nbytes=chunk_nbytes, filters=filters,
                         quantize=quantize, granularity=granularity, axis=axis, group_size=group_size, dtype=dtype,
                         backend=backend, metadata=metadata, stream=stream, **options)[0]


def _compress_device_plain(arr, codec, chunk_nbytes) -> CompressedArray | None:
    """compress() of a C-contiguous CuPy array with no filters, options or overrides, on the GPU: the same checks
    and the same bytes as compress_many, with less host work in between. None when the case does not apply (the
    general path then handles it, errors included)."""
    codec_obj = _parse_codec(codec, None, {})
    if not arr.flags.c_contiguous or backends.requested_backend(None) == "cpu" or not nvcomp.available():
        return None
    if chunk_nbytes is not None and type(chunk_nbytes) is not int:
        return None  # the general path raises the TypeError
    key = (id(codec_obj), arr.dtype, arr.shape, chunk_nbytes)
    hit = _PLAIN_JOBS.get(key)
    if hit is None or hit[0] is not codec_obj:
        hit = (codec_obj, _plain_job(codec_obj, arr, chunk_nbytes))
        if len(_PLAIN_JOBS) >= 256:
            _PLAIN_JOBS.clear()
        _PLAIN_JOBS[key] = hit  # (the entry keeps codec_obj alive, so its id is not reused while cached)
    job = hit[1]
    if job is None:
        return None
    spec, resolved, chunk = job
    return _compress_gpu_one(arr, spec, (), resolved, chunk, True, None)


def _plain_job(codec_obj, arr, chunk_nbytes):
    """(spec, resolved codec, chunk) of a plain device compression, or None when the general path must run it."""
    spec = ArraySpec.of(arr)
    if codec_obj is None:
        if spec.dtype not in _ANS_FLOAT_MODES:  # auto on other data samples codecs first (_gpu_trial)
            return None
        codec_obj = _auto(spec, True, False)[0]
    elif codec_obj.nvcomp_algorithm is None and codec_obj.codec_id != "raw":
        return None
    resolved = _resolved(codec_obj, spec)
    chunk = _check_chunk(chunk_nbytes, resolved, spec.nbytes)  # _validate's checks, for the one segment
    if not nvcomp.fits_one(resolved, spec.nbytes, chunk):
        return None  # very large: the general path compresses in bounded rounds
    return spec, resolved, chunk


_PLAIN_JOBS: dict = {}


def compress_many(arrays: Sequence, *, codec="auto", level=None, chunk_nbytes=None, filters=None, quantize=None,
                  granularity="channel", axis=0, group_size=128, dtype=None, backend=None, metadata=None,
                  stream=None, **options) -> list[CompressedArray]:
    """Compress several arrays with one configuration; device arrays share one batched nvCOMP call.

    Takes the same keywords as :func:`compress`; ``metadata`` may also be a sequence with one mapping per array.
    """
    if isinstance(arrays, (np.ndarray, CompressedArray)) or _is_cupy_array(arrays):
        raise TypeError("compress_many takes a sequence of arrays; use compress() for one array")
    arrays = list(arrays)
    codec_obj = _parse_codec(codec, level, options)
    pipeline = _parse_filters(filters, quantize, granularity, axis, group_size)
    if metadata is None or isinstance(metadata, Mapping):
        metas = [metadata] * len(arrays)
    else:
        metas = list(metadata)
        if len(metas) != len(arrays):
            raise ValueError(f"got {len(metas)} metadata mappings for {len(arrays)} arrays")
    with _stream_ctx(stream):
        jobs = [_prepare(a, codec=codec_obj, filters=pipeline, chunk_nbytes=chunk_nbytes, dtype=dtype,
                         backend=backend, metadata=m) for a, m in zip(arrays, metas)]
        out: list[CompressedArray | None] = [None] * len(jobs)
        gpu = [i for i, j in enumerate(jobs) if j.backend == "nvcomp"]
        if gpu:
            for i, c in zip(gpu, _compress_gpu([jobs[i] for i in gpu])):
                out[i] = c
        for i, j in enumerate(jobs):
            if j.backend == "cpu":
                out[i] = _compress_cpu(j)
    return out  # type: ignore[return-value]


class Compressor:
    """A reusable compression configuration: parse once, compress many (zstandard's ``ZstdCompressor`` shape).

    Takes the keywords of :func:`compress`. ``compress(x)`` and ``compress_many(xs)`` behave like the functions.

    Examples
    --------
    >>> import numpy as np, cupycodec as cc
    >>> comp = cc.Compressor(codec="zstd", level=1)
    >>> [c.codec for c in comp.compress_many([np.ones(10), np.zeros(5)])]
    ['zstd', 'zstd']
    """

    def __init__(self, *, codec="auto", level=None, chunk_nbytes=None, filters=None, quantize=None,
                 granularity="channel", axis=0, group_size=128, dtype=None, backend=None, **options):
        self._codec = _parse_codec(codec, level, options)
        self._filters = _parse_filters(filters, quantize, granularity, axis, group_size)
        self._chunk = chunk_nbytes
        self._dtype = dtype
        self._backend = backends.requested_backend(backend) if backend is not None else None
        if self._codec is not None:
            _check_chunk(chunk_nbytes, self._codec)

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


def _as_compressed(data, verify: bool) -> tuple[CompressedArray, bool]:
    if isinstance(data, CompressedArray):
        return data, bool(data._cache.get("external"))
    if isinstance(data, (str, os.PathLike)):
        raise TypeError("decompress takes a CompressedArray or bytes; use cupycodec.load(path) for files")
    try:
        memoryview(data)
    except TypeError:
        raise TypeError(f"decompress takes a CompressedArray or a bytes-like object, got {type(data).__name__}") \
            from None
    return CompressedArray.from_bytes(data, verify=verify), True


def _target(device, out, c: CompressedArray) -> tuple[str, int | None]:
    """('cpu', None) or ('cuda', ordinal)."""
    if out is not None:
        first = out[0] if isinstance(out, tuple) else out
        if isinstance(first, np.ndarray):
            return "cpu", None
        if _is_cupy_array(first):
            return "cuda", first.device.id
        raise TypeError(f"out must be a NumPy or CuPy array, got {type(first).__name__}")
    if device == "auto":
        return ("cuda", c._payload.device.id) if c.on_device else ("cpu", None)
    if device == "cpu":
        return "cpu", None
    if isinstance(device, str) and (device == "cuda" or device.startswith("cuda:")):
        if device == "cuda":
            import cupy

            return "cuda", cupy.cuda.Device().id
        try:
            return "cuda", int(device[5:])
        except ValueError:
            pass
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _int8_filter(c: CompressedArray) -> Int8 | None:
    for f in c.pipeline:
        if isinstance(f, Int8):
            return f
    return None


class _DecodeJob:
    __slots__ = ("dequantize", "external", "gpu", "item", "out", "result", "seg_out", "target")


def decompress(data, *, device="auto", out=None, max_output_nbytes=_UNSET, dequantize=True, backend=None,
               verify=True, stream=None):
    """Decompress a :class:`CompressedArray` (or container bytes) back into an array, bit for bit.

    Parameters
    ----------
    data : CompressedArray or bytes-like
        Bytes are parsed and fully validated first (``verify=True`` checks every chunk CRC).
    device : {"auto", "cpu", "cuda", "cuda:N"}
        Where the result lives; ``"auto"`` follows the compressed data (host -> NumPy, device -> CuPy).
    out : array, optional
        A C-contiguous NumPy or CuPy array of the right shape and dtype to fill (it decides the location);
        for ``dequantize=False`` a ``(codes, scales)`` pair. Nothing else is allocated when it is given and the
        data has no filters.
    max_output_nbytes : int or None
        Refuse (before allocating) to produce more bytes. Default: unbounded for arrays this process compressed,
        :func:`default_max_output_nbytes` for bytes from outside (from_bytes, load, bytes arguments).
    dequantize : bool
        For INT8 data: return the dequantized array in the original dtype (True) or a :class:`Quantized` tuple of
        codes and scales (False).
    backend : {None, "auto", "cpu", "nvcomp"}
        Force a decoder; by default the GPU decodes device-bound data and the CPU host-bound data (GPU-only codecs
        use the GPU when one is usable, else raise BackendUnavailableError naming what would work).
    stream : cupy Stream or int, optional
        CUDA stream for device work. Device output is ready on that stream when this returns; the call waits for
        it only to check nvCOMP's per-chunk statuses (use :func:`decode_plan` for fully asynchronous decoding).

    Returns
    -------
    numpy.ndarray, cupy.ndarray or Quantized
        bfloat16 on the CPU is an ``ml_dtypes.bfloat16`` array; on the GPU a uint16 array of its bits.

    Examples
    --------
    >>> import numpy as np, cupycodec as cc
    >>> blob = cc.compress(np.float32([1.5, -0.0, np.nan])).to_bytes()
    >>> cc.decompress(blob)
    array([ 1.5, -0. ,  nan], dtype=float32)
    """
    if out is None and device == "auto" and backend is None and stream is None and isinstance(data, CompressedArray):
        y = _decompress_device_plain(data, max_output_nbytes)
        if y is not None:
            return y
    outs = None if out is None else [out]
    return decompress_many([data], out=outs, device=device, max_output_nbytes=max_output_nbytes,
                           dequantize=dequantize, backend=backend, verify=verify, stream=stream)[0]


def _decompress_device_plain(c: CompressedArray, max_output_nbytes):
    """decompress() of a device-resident container of one plain segment into a fresh CuPy array: the checks and
    the result of decompress_many with less host work in between. None when the case does not apply."""
    if not c.on_device or c.pipeline or len(c.segments) != 1 or c.spec.byteorder == ">" \
            or backends.requested_backend(None) == "cpu":
        return None
    limit = max_output_nbytes
    if limit is _UNSET:
        limit = default_max_output_nbytes(c.nbytes) if c._cache.get("external") else None
    if limit is not None and c.raw_nbytes > limit:
        raise DecompressionBombError(c.raw_nbytes, int(limit))
    return _decode_fresh(c)


def _decode_fresh(c: CompressedArray):
    """A plain one-segment device container decoded into a fresh CuPy array (nvcomp.decode_one)."""
    import cupy

    out = cupy.empty(c.shape, dtype=gpu_dtype(c.spec.dtype))  # pool memory: 256-byte aligned, as nvCOMP needs
    nvcomp.decode_one(c._payload, c.segments[0], out)
    return out


def decompress_many(items: Sequence, *, out=None, device="auto", max_output_nbytes=_UNSET, dequantize=True,
                    backend=None, verify=True, stream=None) -> list:
    """Decompress several containers; all GPU-bound chunks go through one batched nvCOMP call per codec.

    Takes the keywords of :func:`decompress`; ``out`` is a list with one buffer (or None) per item. Repeated calls
    with the same items and ``out`` buffers reuse a cached :class:`~cupycodec.DecodePlan`, so they allocate nothing.
    """
    if isinstance(items, (CompressedArray, bytes, bytearray, memoryview)):
        raise TypeError("decompress_many takes a sequence of items; use decompress() for one")
    items = list(items)
    outs = [None] * len(items) if out is None else list(out)
    if len(outs) != len(items):
        raise ValueError(f"got {len(outs)} out buffers for {len(items)} items")
    choice = backends.requested_backend(backend)
    jobs = []
    for item, o in zip(items, outs):
        c, external = _as_compressed(item, verify)
        job = _DecodeJob()
        job.item, job.out, job.external = c, o, external
        int8 = _int8_filter(c)
        job.dequantize = dequantize or int8 is None
        if not job.dequantize and o is not None and not (isinstance(o, tuple) and len(o) == 2):
            raise TypeError("with dequantize=False, out must be a (codes, scales) pair")
        nbytes = c.raw_nbytes if job.dequantize else sum(s.raw_nbytes for s in c.segments)
        limit = max_output_nbytes
        if limit is _UNSET:
            limit = default_max_output_nbytes(c.nbytes) if external else None
        if limit is not None and nbytes > limit:
            raise DecompressionBombError(nbytes, int(limit))
        job.target = _target(device, o, c)
        job.gpu = _decode_on_gpu(c, job.target, choice)
        jobs.append(job)
    with _stream_ctx(stream):
        gpu_jobs = [j for j in jobs if j.gpu]
        if gpu_jobs:
            _decode_gpu(gpu_jobs)
        for j in jobs:
            if not j.gpu:
                _decode_cpu(j)
    return [j.result for j in jobs]


def _needs_gpu(c: CompressedArray) -> str | None:
    for seg in c.segments:
        if seg.table.n_encoded and not seg.codec.cpu_usable():
            return seg.codec.codec_id
    return None


def _decode_on_gpu(c: CompressedArray, target, choice: str) -> bool:
    if choice == "cpu":
        codec = _needs_gpu(c)
        if codec:
            raise BackendUnavailableError(f"codec {codec!r} has no CPU decoder, so backend='cpu' cannot decode this "
                                          f"container; {GPU_ONLY_HINT}")
        if target[0] == "cuda":
            raise ValueError("backend='cpu' cannot write to a GPU; pass device='cpu' or a NumPy out")
        return False
    if choice == "nvcomp" or target[0] == "cuda":

        nvcomp.require() if any(s.table.n_encoded for s in c.segments) else _require_cupy()
        return True
    if c.on_device and backends.nvcomp_available():
        return True
    codec = _needs_gpu(c)
    if codec:
        if backends.nvcomp_available():
            return True

        raise BackendUnavailableError(f"codec {codec!r} decodes only on a GPU with nvCOMP, which is not usable here "
                                      f"({nvcomp.unavailable_reason()}); {GPU_ONLY_HINT}")
    return False


def _require_cupy() -> None:
    try:
        import cupy

        if cupy.is_available():
            return
    except ImportError:
        pass
    raise BackendUnavailableError("decoding to a GPU needs CuPy and a CUDA device; pip install 'cupycodec[cu12]'")


def _check_out(o, shape, dtype: np.dtype, gpu: bool, what: str = "out"):
    """Validate a caller's output buffer. On the GPU a same-width bit view is accepted for BF16/F8 (a uint16 array
    for bfloat16, say), since older CuPy has no ml_dtypes support."""
    if (_is_cupy_array(o) if gpu else isinstance(o, np.ndarray)) is False:
        raise TypeError(f"{what} must be a {'CuPy' if gpu else 'NumPy'} array")
    if tuple(o.shape) != tuple(shape):
        raise ValueError(f"{what} has shape {tuple(o.shape)}, expected {tuple(shape)}")
    want, got = np.dtype(dtype), np.dtype(o.dtype)
    bit_view = gpu and got.itemsize == want.itemsize and got.kind in "uiV" and want.kind in "uiV"
    if got != want and not bit_view:
        raise ValueError(f"{what} has dtype {got}, expected {want}")
    if not o.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous")
    return o


def _seg_dtype(spec: ArraySpec, gpu: bool) -> np.dtype:
    if gpu:
        from .dtypes import storage_dtype

        return storage_dtype(spec.dtype)
    return spec.numpy_dtype()


def _decode_cpu(job: _DecodeJob) -> None:
    assert job.target[0] == "cpu", "device-bound data decodes on the GPU"
    c = job.item
    payload = c.host_payload()
    seg_arrays = _segment_buffers(job, gpu=False)
    cpu.decode_segments([(payload, seg, _flat_bytes(seg_arrays[seg.name], False)) for seg in c.segments])
    job.result = _run_filters(job, seg_arrays, gpu=False)


def _segment_buffers(job: _DecodeJob, gpu: bool) -> dict[str, Any]:
    """Buffers the segments decode into: the caller's out when no filter stands between, else fresh ones."""
    c = job.item
    xp = _xp(gpu)
    final_on_target = job.target[0] == ("cuda" if gpu else "cpu")
    bufs = {}
    if not c.pipeline and job.out is not None and final_on_target:
        bufs["data"] = _check_out(job.out, c.shape, _seg_dtype(c.spec, gpu), gpu)
        return bufs
    if not job.dequantize and job.out is not None and final_on_target:
        codes, scales = job.out
        specs = {s.name: s.spec for s in c.segments}
        bufs["data"] = _check_out(codes, specs["data"].shape, np.int8, gpu, "out codes")
        bufs["scale"] = _check_out(scales, specs["scale"].shape, np.float32, gpu, "out scales")
        return bufs
    if not gpu:
        for seg in c.segments:
            bufs[seg.name] = xp.empty(seg.spec.shape, dtype=_seg_dtype(seg.spec, gpu))
        return bufs
    # On the GPU all segments share one allocation at 256-byte aligned offsets (byte planes then sit at one
    # stride, which the merge kernel reads in place).
    offsets, total = [], 0
    for seg in c.segments:
        offsets.append(total)
        total += (seg.raw_nbytes + 255) // 256 * 256
    block = xp.empty(max(total, 1), dtype=np.uint8)
    for seg, off in zip(c.segments, offsets):
        dt = _seg_dtype(seg.spec, gpu)
        bufs[seg.name] = block[off : off + seg.raw_nbytes].view(dt).reshape(seg.spec.shape)
    return bufs


def _xp(gpu: bool):
    if gpu:
        import cupy

        return cupy
    return np


def _run_filters(job: _DecodeJob, arrays: dict[str, Any], gpu: bool):
    c = job.item
    specs_chain = [{"data": c.spec}]
    for f in c.pipeline:
        specs_chain.append(f.specs(specs_chain[-1]))
    final_on_target = job.target[0] == ("cuda" if gpu else "cpu")
    for k in range(len(c.pipeline) - 1, -1, -1):
        f = c.pipeline[k]
        if isinstance(f, Int8) and not job.dequantize:
            return _finish(job, Quantized(arrays["data"], arrays["scale"], f.granularity, f.axis, f.group_size,
                                          specs_chain[k]["data"].dtype), gpu)
        out = None
        if k == 0 and job.out is not None and final_on_target:
            out = {"data": _check_out(job.out, c.shape, _seg_dtype(c.spec, gpu), gpu)}
        arrays = f.decode(arrays, specs_chain[k], gpu, out=out)
    return _finish(job, arrays["data"], gpu)


def _finish(job: _DecodeJob, result, gpu: bool):
    """Move the result to the target, restore the logical dtype and byte order."""
    c = job.item
    if isinstance(result, Quantized):
        if gpu and job.target[0] == "cpu":
            codes, scales = result.codes.get(), result.scales.get()
            if job.out is not None:
                job.out[0][...] = codes
                job.out[1][...] = scales
                codes, scales = job.out
            result = result._replace(codes=codes, scales=scales)
        elif job.out is not None:
            result = result._replace(codes=job.out[0], scales=job.out[1])
        return result
    if not gpu:  # decoded in place into out, or into a fresh array of the logical dtype
        return job.out if job.out is not None else result.reshape(c.shape)
    if c.spec.byteorder == ">" and not c.pipeline:  # CuPy holds native order only: swap on the device
        result = _byteswap_gpu(result, c.spec.itemsize)
    result = result.reshape(c.shape)
    if job.target[0] == "cuda":
        from .dtypes import gpu_dtype

        if job.out is None and result.dtype != gpu_dtype(c.spec.dtype):
            result = result.view(gpu_dtype(c.spec.dtype))
        if job.out is not None and result.data.ptr != job.out.data.ptr:
            job.out[...] = result
        return job.out if job.out is not None else result
    host = result.get().view(c.spec.numpy_dtype().newbyteorder("="))
    if c.spec.byteorder == ">":
        host = host.astype(c.spec.numpy_dtype())
    if job.out is not None:
        job.out[...] = host
        return job.out
    return host


def _byteswap_gpu(arr, k: int):
    if k == 1:
        return arr
    flat = arr.reshape(-1).view("u1").reshape(-1, k)[:, ::-1]
    import cupy

    return cupy.ascontiguousarray(flat).reshape(-1).view(arr.dtype)


# -- GPU decode with a plan cache ---------------------------------------------------------------------------------


class _PlanCache:
    """Plans keyed by the items, output pointers and stream; an item's plans go when the item is collected."""

    def __init__(self, size: int = 64):
        self._plans: OrderedDict = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
            return plan

    def put(self, key, plan, items) -> None:
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > self._size:
                self._plans.popitem(last=False)
        for it in items:
            weakref.finalize(it, self._drop, id(it))

    def _drop(self, item_id: int) -> None:
        with self._lock:
            for key in [k for k in self._plans if item_id in k[0]]:
                del self._plans[key]

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()


_plans = _PlanCache()


def _decode_gpu(jobs: list[_DecodeJob]) -> None:
    import cupy

    if len(jobs) == 1 and _decode_plain_on_device(jobs[0]):
        return
    payloads = []
    for j in jobs:
        c = j.item
        payloads.append(c._payload if c.on_device else cupy.asarray(np.frombuffer(c._payload, dtype=np.uint8)))
    bufs = [_segment_buffers(j, gpu=True) for j in jobs]
    seg_jobs = []
    for j, payload, b in zip(jobs, payloads, bufs):
        for seg in j.item.segments:
            buf = b[seg.name]
            flat = buf.reshape(-1).view("u1")
            if flat.size and flat.data.ptr % 16:  # nvCOMP output alignment: decode to scratch, then copy
                scratch = cupy.empty(flat.size, dtype=np.uint8)
                b[seg.name] = _Scratch(scratch, buf)
                flat = scratch
            seg_jobs.append((payload, seg, flat))
    # Plans are cached only when every item lives on the device and decodes straight into the caller's buffers:
    # then the same call again reuses the plan and allocates nothing.
    cacheable = all(j.item.on_device and j.out is not None and not j.item.pipeline for j in jobs)
    key = None
    if cacheable:
        key = _plan_key([j.item for j in jobs], [f for _, _, f in seg_jobs])
    plan = _plans.get(key) if cacheable else None
    if plan is None:
        plan = nvcomp.DecodePlan(seg_jobs, sync=False)  # built and run on this stream
        if cacheable:
            _plans.put(key, plan, [j.item for j in jobs])
    plan.run_and_wait()
    for j, b in zip(jobs, bufs):
        for name, v in list(b.items()):
            if isinstance(v, _Scratch):
                v.target.reshape(-1).view("u1")[...] = v.scratch
                b[name] = v.target
        j.result = _run_filters(j, b, gpu=True)


def _plan_key(items, outs) -> tuple:
    """Cache key of a decode plan: the items, where and how much each output buffer is, and the stream."""
    import cupy

    return (tuple(id(c) for c in items), tuple((int(o.data.ptr) if o.size else 0, int(o.nbytes)) for o in outs),
            cupy.cuda.get_current_stream().ptr)


def _decode_plain_on_device(job: _DecodeJob) -> bool:
    """The common small case without staging views: one device-resident array of one segment, no filters, native
    byte order, decoded straight into ``out`` or a fresh array of its shape. False when it does not apply."""
    c = job.item
    if not c.on_device or c.pipeline or len(c.segments) != 1 or c.spec.byteorder == ">" or job.target[0] != "cuda":
        return False
    if job.out is None:  # a fresh output: one allocation, upload and nvCOMP call, a host-side status check
        job.result = _decode_fresh(c)
        return True
    out = _check_out(job.out, c.shape, _seg_dtype(c.spec, True), True)
    if out.size and out.data.ptr % 16:
        return False
    key = _plan_key([c], [out])  # the caller's buffer makes the plan reusable: the next call allocates nothing
    plan = _plans.get(key)
    if plan is None:
        plan = nvcomp.DecodePlan([(c._payload, c.segments[0], out)], sync=False)
        _plans.put(key, plan, [c])
    plan.run_and_wait()
    job.result = out
    return True


class _Scratch(NamedTuple):
    scratch: Any
    target: Any


def decode_plan(items: Sequence[CompressedArray], out: Sequence, stream=None):
    """Build a reusable :class:`~cupycodec.DecodePlan` that decodes ``items`` (device-resident, no filters) into
    ``out`` (C-contiguous CuPy arrays of their shapes) with one asynchronous batched launch per codec.

    ``plan.run(stream)`` enqueues the decode and returns at once; ``plan.check(stream)`` waits and raises if nvCOMP
    reported any bad chunk. Keep ``items`` and ``out`` alive while the plan is used.
    """

    jobs = []
    for c, o in zip(items, out, strict=True):
        if not isinstance(c, CompressedArray) or not c.on_device:
            raise ValueError("decode_plan takes device-resident CompressedArrays; call c.to_device() first")
        if c.pipeline:
            raise ValueError("decode_plan decodes plain containers; decompress(dequantize=False) handles filters")
        _check_out(o, c.shape, _seg_dtype(c.spec, True), True)
        flat = o.reshape(-1).view("u1")
        if flat.size and flat.data.ptr % 16:
            raise ValueError("out buffers must be 16-byte aligned")
        for seg in c.segments:
            jobs.append((c._payload, seg, flat))
    with _stream_ctx(stream):
        return nvcomp.DecodePlan(jobs)


# ----------------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------------


def save(path, c: CompressedArray, *, overwrite: bool = True) -> None:
    """Write a container to ``path`` atomically (a temporary file in the same directory, then ``os.replace``)."""
    if not isinstance(c, CompressedArray):
        raise TypeError(f"save takes a CompressedArray, got {type(c).__name__}; compress the array first")
    path = os.fspath(path)
    if not overwrite and os.path.exists(path):
        raise FileExistsError(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".cc.tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            c.write_to(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load(path, *, verify: bool = True, mmap: bool = True) -> CompressedArray:
    """Read a container file. With ``mmap=True`` the file is memory-mapped, so it never needs to fit in memory
    at once; the result keeps the mapping open. Contents from files count as untrusted (see ``max_output_nbytes``).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if mmap and size:
            import mmap as _mmap

            buf: Any = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ)
        else:
            buf = f.read()
    return CompressedArray.from_bytes(buf, verify=verify)
