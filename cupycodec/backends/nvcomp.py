"""GPU backend: nvCOMP's low-level batched C API through ctypes, with CuPy buffers and CuPy's current stream.

Why the C API and not ``nvidia.nvcomp.Codec``: the Python API wraps nvCOMP's high-level managers, which own their
chunking and header, synchronize to read sizes, and allocate per call. The batched C API takes our own chunk
tables (so the container, not nvCOMP, decides the layout, and standard-format chunks stay CPU-readable), writes into
preallocated buffers, and never synchronizes: a whole transformer block decodes in one asynchronous call.

Every entry point's return status is checked and raised as :class:`~cupycodec.BackendError` with nvCOMP's status
name; per-chunk statuses and decoded sizes are checked on the device (kernels.chunks) and read at the next sync.
nvCOMP's decoders have undefined behaviour on corrupt input, so only CRC-verified chunks are ever passed to them.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import BackendError, BackendUnavailableError
from ..kernels import chunks, crc32

__all__ = ["DecodePlan", "available", "compress_segments", "unavailable_reason", "version_string"]

_c_size = ctypes.c_size_t
_ptr = ctypes.c_void_p


class _S(ctypes.Structure):
    """Base for nvCOMP opts structs: zero-initialized (reserved bytes must be zero)."""


def _struct(name, fields):
    return type(name, (_S,), {"_fields_": fields})


_I, _U8, _U32, _U64, _D = ctypes.c_int, ctypes.c_uint8, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_double


def _res(n):
    return ("reserved", ctypes.c_char * n)


_CascadedCommon = _struct("CascadedCommon", [("data_type", _I), ("mode", _I), ("terminal", _U64), ("coarse", _U64)])

# (compress opts, decompress opts) per nvCOMP algorithm, transcribed from nvCOMP 6.0's include/nvcomp/*.h.
_OPTS = {
    "LZ4": (_struct("LZ4C", [("data_type", _I), ("bitshuffle", _I), _res(56)]),
            _struct("LZ4D", [("backend", _I), ("sort", _I), ("data_type", _I), ("bitshuffle", _I), _res(48)])),
    "Snappy": (_struct("SnappyC", [_res(64)]), _struct("SnappyD", [("backend", _I), ("sort", _I), _res(56)])),
    "Deflate": (_struct("DeflateC", [("algorithm", _I), _res(60)]),
                _struct("DeflateD", [("backend", _I), ("sort", _I), _res(56)])),
    "Gdeflate": (_struct("GdeflateC", [("algorithm", _I), _res(60)]),
                 _struct("GdeflateD", [("backend", _I), _res(60)])),
    "Gzip": (_struct("GzipC", [("algorithm", _I), _res(60)]),
             _struct("GzipD", [("backend", _I), ("algorithm", _I), ("sort", _I), _res(52)])),
    "Zstd": (_struct("ZstdC", [_res(64)]), _struct("ZstdD", [("backend", _I), _res(60)])),
    "Cascaded": (_struct("CascadedC", [("common", _CascadedCommon), ("fine", _U64), ("level", _U8), _res(31)]),
                 _struct("CascadedD", [("backend", _I), ("common", _CascadedCommon), _res(32)])),
    "Bitcomp": (_struct("BitcompC", [("algorithm", _I), ("data_type", _I), ("delta", _D), ("mode", _I), _res(44)]),
                _struct("BitcompD", [("backend", _I), _res(60)])),
    "ANS": (_struct("ANSC", [("type", _I), ("data_type", _I), ("max_sub_chunk_count", _U8),
                             ("states_per_lane", _U8), ("histogram_reduction_log2", _U8), _res(53)]),
            _struct("ANSD", [("backend", _I), ("data_type", _I), ("max_sub_chunk_count", _U8),
                             ("states_per_lane", _U8), ("skip_validate", _U8), _res(53)])),
}
_C_NAME = {"GDeflate": "Gdeflate"}  # our algorithm names -> nvCOMP C symbol infix
ANS_SKIP_VALIDATE = int(os.environ.get("CUPYCODEC_ANS_SKIP_VALIDATE", "0"))

_CRC32Spec = _struct("CRC32Spec", [("poly", _U32), ("init", _U32), ("ref_in", ctypes.c_bool),
                                   ("ref_out", ctypes.c_bool), ("xorout", _U32), _res(16)])
_CRC32Conf = _struct("CRC32Conf", [("kind", _I), ("bytes_per_read", ctypes.c_int32),
                                   ("blocks_per_msg", ctypes.c_int32), _res(20)])
_CRC32Opts = _struct("CRC32Opts", [("spec", _CRC32Spec), ("conf", _CRC32Conf), _res(64)])

_STATUS = {
    0: "nvcompSuccess", 10: "nvcompErrorInvalidValue", 11: "nvcompErrorNotSupported",
    12: "nvcompErrorCannotDecompress", 13: "nvcompErrorBadChecksum", 14: "nvcompErrorCannotVerifyChecksums",
    15: "nvcompErrorOutputBufferTooSmall", 16: "nvcompErrorWrongHeaderLength", 17: "nvcompErrorAlignment",
    18: "nvcompErrorChunkSizeTooLarge", 19: "nvcompErrorCannotCompress", 20: "nvcompErrorWrongInputLength",
    21: "nvcompErrorBatchSizeTooLarge", 22: "nvcompErrorSubChunkCountTooLarge",
    23: "nvcompErrorSubChunkCountTooSmall", 24: "nvcompErrorOutputBufferAlignmentTooSmall",
    1000: "nvcompErrorCudaError", 10000: "nvcompErrorInternal",
}


def status_name(code: int) -> str:
    return _STATUS.get(int(code), f"nvcompStatus({int(code)})")


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------

_load_lock = threading.Lock()
_INSTALL = 'pip install "cupycodec[cu12]" (CUDA 12) or "cupycodec[cu13]" (CUDA 13)'


@functools.cache
def _library():
    """Load libnvcomp and declare the functions we call; raises BackendUnavailableError with the fix."""
    with _load_lock:
        try:
            import nvidia.libnvcomp as libnvcomp
        except ImportError as exc:
            raise BackendUnavailableError(f"nvCOMP is not installed; {_INSTALL}") from exc
        lib = libnvcomp.load_library()
        if lib is None:
            raise BackendUnavailableError(f"nvidia-libnvcomp is installed but libnvcomp could not be loaded; "
                                          f"reinstall it: {_INSTALL}")
        lib.nvcompGetProperties.argtypes = [ctypes.c_void_p]
        lib.nvcompGetProperties.restype = _I
        for algo, (copts, dopts) in _OPTS.items():
            p = f"nvcompBatched{algo}"
            _declare(lib, p + "CompressGetTempSize", [_c_size, _c_size, copts, ctypes.POINTER(_c_size), _c_size, _ptr])
            _declare(lib, p + "CompressGetMaxOutputChunkSize", [_c_size, copts, ctypes.POINTER(_c_size)])
            _declare(lib, p + "CompressAsync", [_ptr, _ptr, _c_size, _c_size, _ptr, _c_size, _ptr, _ptr, copts, _ptr,
                                                _ptr])
            _declare(lib, p + "DecompressGetTempSize", [_c_size, _c_size, dopts, ctypes.POINTER(_c_size), _c_size,
                                                        _ptr])
            _declare(lib, p + "DecompressAsync", [_ptr, _ptr, _ptr, _ptr, _c_size, _ptr, _c_size, _ptr, dopts, _ptr,
                                                  _ptr])
        return lib


def _declare(lib, name, argtypes):
    fn = getattr(lib, name)
    fn.argtypes = argtypes
    fn.restype = _I


def _call(name: str, *args) -> None:
    status = getattr(_library(), name)(*args)
    if status != 0:
        raise BackendError(f"{name} failed", status_name(status))


@functools.cache
def unavailable_reason() -> str | None:
    """None when the nvCOMP backend can run here, else why not (with the fix)."""
    try:
        import cupy
    except ImportError:
        return f"CuPy is not installed; {_INSTALL}"
    try:
        if not cupy.is_available():
            return "no usable CUDA device (cupy.is_available() is False)"
    except Exception as exc:  # pragma: no cover - broken CUDA installs
        return f"CUDA is not usable: {exc}"
    try:
        _library()
    except BackendUnavailableError as exc:
        return str(exc)
    except OSError as exc:  # pragma: no cover
        return f"libnvcomp failed to load: {exc}"
    return None


def available() -> bool:
    """Whether nvCOMP, CuPy and a CUDA device are all usable (cheap after the first call)."""
    return unavailable_reason() is None


def require() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise BackendUnavailableError(f'backend "nvcomp" cannot run here: {reason}')


@functools.cache
def version_string() -> str:
    props = (_U32 * 2)()
    _call("nvcompGetProperties", ctypes.addressof(props))
    v = props[0]
    return f"{v // 1000}.{(v % 1000) // 100}.{v % 100}"


def _stream_ptr(stream) -> int:
    import cupy

    if stream is None:
        return cupy.cuda.get_current_stream().ptr
    return stream if isinstance(stream, int) else stream.ptr


# --------------------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------------------


def _cname(codec) -> str:
    return _C_NAME.get(codec.nvcomp_algorithm, codec.nvcomp_algorithm)


@functools.lru_cache(maxsize=256)
def _opts(codec_key: tuple, algo: str, params: tuple):
    p = dict(params)
    copts_cls, dopts_cls = _OPTS[algo]
    c, d = copts_cls(), dopts_cls()
    if algo == "LZ4":
        c.data_type = d.data_type = p.get("data_type", 1)
    elif algo in ("Deflate", "Gdeflate", "Gzip"):
        c.algorithm = p.get("algorithm", 1)
    elif algo == "Cascaded":
        c.common.data_type, c.common.mode, c.common.terminal = p["data_type"], 1, 1
        c.fine, c.level = 7, p.get("compression_level", 3)
        d.common.data_type = 0xFF  # NVCOMP_TYPE_BITS: read everything from the stream
    elif algo == "Bitcomp":
        c.algorithm, c.data_type = p.get("algorithm", 0), p["data_type"]
    elif algo == "ANS":
        c.data_type = d.data_type = p["data_type"]  # naming the type lets nvCOMP launch its specialized kernel
        # Chunks reach nvCOMP only after their CRC32 matched, so its own per-chunk validation is redundant;
        # whether skipping it pays is measured in benchmarks/RESULTS.md.
        d.skip_validate = ANS_SKIP_VALIDATE
    return c, d


def codec_opts(codec):
    """(compress opts, decompress opts) ctypes structs for a resolved codec, built once per codec config."""
    return _opts(codec.config_key(), _cname(codec), _params_of(codec))


@functools.lru_cache(maxsize=256)
def _params_of(codec) -> tuple:  # codecs hash by their cached config key
    return tuple(sorted(codec.nvcomp_params().items()))


# --------------------------------------------------------------------------------------------------------------
# Compression
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SegmentInput:
    """One segment to compress: a C-contiguous device array (its bytes, 256-byte aligned), codec and chunk size."""

    data: object
    codec: object
    chunk_nbytes: int


@dataclass
class SegmentOutput:
    comp_nbytes: np.ndarray  # uint32 per chunk
    flags: np.ndarray  # uint8 per chunk: 1 = stored raw
    src_ptrs: np.ndarray  # uint64 per chunk: device address of the bytes to store (compressed or raw)
    keepalive: list


_BATCH_SCRATCH_NBYTES = 1 << 30  # bound on nvCOMP temp + output scratch per compression call
_H2D, _D2H = 1, 2  # cudaMemcpyKind


# -- staging -----------------------------------------------------------------------------------------------------

_local = threading.local()


def _pinned(nbytes: int) -> np.ndarray:
    """This thread's pinned host buffer (uint8, at least ``nbytes``). Callers synchronize before reusing it."""
    buf = getattr(_local, "pinned", None)
    if buf is None or buf.nbytes < nbytes:
        import cupy

        mem = cupy.cuda.alloc_pinned_memory(max(1 << 16, 1 << (int(nbytes) - 1).bit_length()))
        buf = _local.pinned = np.frombuffer(mem, np.uint8)
        _local.pinned_ptr = buf.ctypes.data
    return buf


def _upload(dst_ptr: int, host: np.ndarray, sp: int) -> None:
    """Enqueue a host -> device copy of ``host`` (pageable: the driver stages it before returning, so ``host`` may
    be dropped at once, and no device synchronization happens). A pinned staging arena was tried for these small
    copies and measured no faster on an H200 host (benchmarks/RESULTS.md, run 13)."""
    import cupy

    if host.nbytes:
        cupy.cuda.runtime.memcpyAsync(dst_ptr, host.ctypes.data, host.nbytes, _H2D, sp)


def _download(src_ptr: int, nbytes: int, sp: int) -> np.ndarray:
    """Copy device bytes into this thread's pinned buffer and wait for them: one copy, one synchronization."""
    import cupy

    host = _pinned(nbytes)
    if nbytes:
        cupy.cuda.runtime.memcpyAsync(_local.pinned_ptr, src_ptr, nbytes, _D2H, sp)
    _sync(sp)
    return host[:nbytes]


# -- CRC32 ----------------------------------------------------------------------------------------------------------


def nvcomp_crc32_async(ptrs, sizes, out, n: int, max_nbytes: int, stream_ptr: int) -> None:
    """nvCOMP's own batched CRC32 (``nvcompBatchedCRC32Async``, nvCOMP >= 5), kept for benchmarks/bench_gpu.py to
    measure kernels.crc32 against; the library itself does not use it."""
    lib = _library()
    if not hasattr(lib, "nvcompBatchedCRC32Async"):
        raise BackendUnavailableError("this nvCOMP has no nvcompBatchedCRC32Async")
    _declare(lib, "nvcompBatchedCRC32Async", [_ptr, _ptr, _c_size, _ptr, _CRC32Opts, _I, _ptr, _ptr])
    _declare(lib, "nvcompBatchedCRC32GetHeuristicConf", [_ptr, _c_size, ctypes.POINTER(_CRC32Conf), _c_size, _ptr])
    opts = _CRC32Opts()
    opts.spec.poly, opts.spec.init, opts.spec.ref_in, opts.spec.ref_out = 0x04C11DB7, 0xFFFFFFFF, True, True
    opts.spec.xorout = 0xFFFFFFFF  # standard CRC-32 = zlib.crc32
    conf = _CRC32Conf()
    _call("nvcompBatchedCRC32GetHeuristicConf", None, n, ctypes.byref(conf), max_nbytes, None)
    opts.conf = conf
    _call("nvcompBatchedCRC32Async", ptrs, sizes, n, out, opts, 0, None, stream_ptr)


# -- compression ----------------------------------------------------------------------------------------------------


# nvCOMP encoders that leave some bytes of their output chunks unwritten (measured on nvCOMP 6.0, H200: runs of a
# few bytes inside ANS and GDeflate chunks followed whatever the memory pool held). Their output scratch is zeroed
# first, so the container stays deterministic (tests/gpu: test_gpu_compression_is_deterministic_whatever_...).
LEAVES_GAPS = frozenset({"ANS", "GDeflate"})


@functools.lru_cache(maxsize=1024)
def _compress_sizes(codec, n: int, max_chunk: int, total: int) -> tuple[int, int]:
    """nvCOMP's temp bytes and worst-case output chunk bytes (host-only queries, cached per codec config)."""
    algo = _cname(codec)
    copts, _ = codec_opts(codec)
    temp, max_out = _c_size(0), _c_size(0)
    _call(f"nvcompBatched{algo}CompressGetTempSize", n, max_chunk, copts, ctypes.byref(temp), total, None)
    _call(f"nvcompBatched{algo}CompressGetMaxOutputChunkSize", max_chunk, copts, ctypes.byref(max_out))
    return int(temp.value), int(max_out.value)


class _Batch:
    """Chunks of one codec config compressed by one nvCOMP call."""

    __slots__ = ("codec", "in_ptrs", "in_sizes", "index", "max_out", "n", "out_ptrs", "owner", "stride", "temp")

    def __init__(self, codec, in_ptrs, in_sizes, owner, index):
        self.codec, self.in_ptrs, self.in_sizes = codec, in_ptrs, in_sizes.astype(np.uint64, copy=False)
        self.owner, self.index, self.n = owner, index, len(in_ptrs)
        self.temp, self.max_out = _compress_sizes(codec, self.n, int(self.in_sizes.max()), int(self.in_sizes.sum()))
        self.stride = (self.max_out + 255) // 256 * 256

    @property
    def scratch_nbytes(self) -> int:
        return self.n * self.stride + (self.temp + 255) // 256 * 256


def _round(batches: list[_Batch], sp: int):
    """Compress every batch (one nvCOMP call each) with one upload, one download and one synchronization.

    Returns (scratch, [(comp_sizes, statuses)] per batch); the batches' ``out_ptrs`` point into ``scratch``.
    """
    import cupy

    M = sum(b.n for b in batches)
    scratch_nbytes = sum(b.scratch_nbytes for b in batches)
    # One allocation (bytes): scratch | in_ptrs u64[M] | in_sizes u64[M] | out_ptrs u64[M] | comp u64[M] | i32[M]
    o_tab = (scratch_nbytes + 255) // 256 * 256
    buf = cupy.empty(o_tab + 36 * M, dtype=np.uint8)
    base, outs = buf.data.ptr, []
    for b in batches:
        b.out_ptrs = np.uint64(base) + np.arange(b.n, dtype=np.uint64) * np.uint64(b.stride)
        outs.append(b.out_ptrs)
        base += b.scratch_nbytes
    t = buf.data.ptr + o_tab
    _upload(t, np.concatenate([*(b.in_ptrs for b in batches), *(b.in_sizes for b in batches), *outs]), sp)
    lib = _library()
    row = 0
    for b in batches:
        algo = _cname(b.codec)
        copts, _ = codec_opts(b.codec)
        temp_ptr = int(b.out_ptrs[0]) + b.n * b.stride
        if b.codec.nvcomp_algorithm in LEAVES_GAPS:
            cupy.cuda.runtime.memsetAsync(int(b.out_ptrs[0]), 0, b.n * b.stride, sp)
        status = getattr(lib, f"nvcompBatched{algo}CompressAsync")(
            t + 8 * row, t + 8 * (M + row), int(b.in_sizes.max()), b.n, temp_ptr, b.temp,
            t + 8 * (2 * M + row), t + 8 * (3 * M + row), copts, t + 32 * M + 4 * row, sp)
        if status != 0:
            raise BackendError(f"nvcompBatched{algo}CompressAsync failed", status_name(status))
        row += b.n
    res = _download(t + 24 * M, 12 * M, sp)  # compressed sizes and statuses
    comp, status = res[: 8 * M].view(np.uint64), res[8 * M :].view(np.int32)
    results, row = [], 0
    for b in batches:
        results.append((comp[row : row + b.n].copy(), status[row : row + b.n].copy()))
        row += b.n
    return buf, results


def compress_segments(segments: list[SegmentInput], stream=None) -> list[SegmentOutput]:
    """Compress every chunk of every segment, with one synchronization (to learn the compressed sizes).

    One nvCOMP call per distinct codec config; the sizes and statuses come back in one copy. When the scratch would
    pass 1 GiB the chunks go in several rounds, each compacted before the next. Chunks that do not shrink are stored
    raw; segments with the ``raw`` codec need no GPU work here at all. Returns per-segment tables plus device
    pointers to the bytes to pack (:func:`pack_payload`, which also checksums them); the scratch those point into
    is kept alive by the outputs.
    """
    require()
    sp = _stream_ptr(stream)
    geo = [_geometry(int(s.data.nbytes), int(s.chunk_nbytes)) for s in segments]
    raw_sizes = [g[0] for g in geo]
    raw_ptrs = [g[1] + np.uint64(s.data.data.ptr if s.data.nbytes else 0) for g, s in zip(geo, segments)]
    keep: list = []

    groups: dict[tuple, list[int]] = {}
    for i, seg in enumerate(segments):
        if len(raw_sizes[i]) and seg.codec.nvcomp_algorithm is not None:
            groups.setdefault(seg.codec.config_key(), []).append(i)
    batches: list[_Batch] = []
    for members in groups.values():
        codec = segments[members[0]].codec
        if len(members) == 1:
            i = members[0]
            owner, index, in_ptrs, in_sizes = i, None, raw_ptrs[i], raw_sizes[i]
        else:
            owner = np.concatenate([np.full(len(raw_sizes[i]), i) for i in members])
            index = np.concatenate([np.arange(len(raw_sizes[i])) for i in members])
            in_ptrs = np.concatenate([raw_ptrs[i] for i in members])
            in_sizes = np.concatenate([raw_sizes[i] for i in members])
        b = _Batch(codec, in_ptrs, in_sizes, owner, index)
        if b.scratch_nbytes <= _BATCH_SCRATCH_NBYTES:
            batches.append(b)
            continue
        if index is None:
            owner, index = np.full(b.n, owner), np.arange(b.n)
        step = max(1, int(_BATCH_SCRATCH_NBYTES // max(b.scratch_nbytes / b.n, 1)))
        batches.extend(_Batch(codec, in_ptrs[lo : lo + step], in_sizes[lo : lo + step], owner[lo : lo + step],
                              index[lo : lo + step]) for lo in range(0, b.n, step))
    rounds: list[tuple[list[_Batch], list]] = []
    if not batches:  # nothing for nvCOMP (codec "raw", or empty segments): no GPU work, no synchronization
        pass
    elif sum(b.scratch_nbytes for b in batches) <= _BATCH_SCRATCH_NBYTES:  # the common case: one round
        scratch, res = _round(batches, sp)
        rounds.append((batches, res))
        keep.append(scratch)
    else:  # large inputs: a round per batch, each compacted so the next can reuse the memory
        for b in batches:
            scratch, res = _round([b], sp)
            keep.append(_compact(b, res[0][0], scratch, sp))
            rounds.append(([b], res))

    # Per segment: every chunk stored raw unless its batch shrank it.
    comp: dict[int, np.ndarray] = {}
    ptrs: dict[int, np.ndarray] = {}
    for bs, res in rounds:
        for b, (sizes, status) in zip(bs, res):
            if status.any():
                bad = np.flatnonzero(status)
                raise BackendError(f"nvCOMP {b.codec.codec_id} compression failed for {bad.size} chunk(s)",
                                   status_name(int(status[bad[0]])))
            shrank = sizes < b.in_sizes
            b_comp = np.where(shrank, sizes, b.in_sizes)
            b_ptrs = np.where(shrank, b.out_ptrs, b.in_ptrs)
            if b.index is None:  # the whole of one segment
                comp[b.owner], ptrs[b.owner] = b_comp, b_ptrs
                continue
            for i in np.unique(b.owner).tolist():
                if i not in comp:
                    comp[i], ptrs[i] = raw_sizes[i].copy(), raw_ptrs[i].copy()
                mine = b.owner == i
                comp[i][b.index[mine]], ptrs[i][b.index[mine]] = b_comp[mine], b_ptrs[mine]
    outputs = []
    for i, seg in enumerate(segments):
        c, p = comp.get(i, raw_sizes[i]), ptrs.get(i, raw_ptrs[i])
        flags = (c == raw_sizes[i]).view(np.uint8)
        outputs.append(SegmentOutput(c.astype(np.uint32), flags, p, [seg.data, *keep]))
    return outputs


@functools.lru_cache(maxsize=512)
def _geometry(nbytes: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(raw chunk sizes, chunk start offsets), both uint64 and read-only, for ``nbytes`` cut in ``chunk``s."""
    n = -(-nbytes // chunk) if nbytes else 0
    sizes = np.full(n, chunk, dtype=np.uint64)
    if n:
        sizes[-1] = nbytes - (n - 1) * chunk
    offsets = np.arange(n, dtype=np.uint64) * np.uint64(chunk)
    sizes.flags.writeable = offsets.flags.writeable = False
    return sizes, offsets


def _compact(b: _Batch, sizes: np.ndarray, scratch, sp: int):
    """Move the chunks of ``b`` that shrank out of the worst-case scratch into a tight buffer (returned)."""
    import cupy

    shrank = sizes < b.in_sizes
    padded = np.where(shrank, (sizes + 15) // 16 * 16, 0).astype(np.uint64)
    offs = np.zeros(b.n, dtype=np.uint64)
    if b.n > 1:
        np.cumsum(padded[:-1], out=offs[1:])
    compact_buf = cupy.empty(max(int(padded.sum()), 1), dtype=np.uint8)
    new_ptrs = np.uint64(compact_buf.data.ptr) + offs
    if shrank.any():
        sel = np.flatnonzero(shrank)
        arr = cupy.asarray(np.stack([b.out_ptrs[sel], new_ptrs[sel], sizes[sel]]))
        chunks.copy_chunks(arr[0], arr[1], arr[2], max_nbytes=int(sizes[sel].max()), pad=False, stream=sp)
        _sync(sp)
    b.out_ptrs = np.where(shrank, new_ptrs, b.out_ptrs)
    del scratch
    return compact_buf


def _sync(stream_ptr: int) -> None:
    import cupy

    cupy.cuda.runtime.streamSynchronize(stream_ptr)


def pack_payload(payload, tables: list[tuple[int, bytes]], src_ptrs: np.ndarray, dst_offsets: np.ndarray,
                 nbytes: np.ndarray, crc_offsets: np.ndarray, stream=None) -> None:
    """Fill a device payload and checksum its chunks: the chunk tables (host bytes, CRC slots still zero) are copied
    in place, then one launch copies every chunk (``src_ptrs[i]`` -> ``dst_offsets[i]``, ``nbytes[i]`` bytes, zero-
    padded to 16) and one writes the CRC32 of each packed chunk at ``crc_offsets[i]`` (its slot in its table)."""
    import cupy

    sp = _stream_ptr(stream)
    base = payload.data.ptr
    for off, table in tables:  # pageable host -> device: staged by the driver, no device synchronization
        if table:
            _upload(base + off, np.frombuffer(table, np.uint8), sp)
    k = len(src_ptrs)
    if k == 0:
        return
    shape = crc32.shape_for(int(nbytes.max()), int(nbytes.sum()))
    words = crc32.work_words(k, shape[0])
    b = np.uint64(base)
    # u64 rows: src | dst | nbytes | crc slot addresses | CRC work (counters zeroed)
    host = np.concatenate([np.asarray(src_ptrs, np.uint64), np.asarray(dst_offsets, np.uint64) + b,
                           np.asarray(nbytes, np.uint64), np.asarray(crc_offsets, np.uint64) + b,
                           np.zeros(-(-words // 2), np.uint64)])
    d = cupy.empty(host.size, dtype=np.uint64)
    t = d.data.ptr
    _upload(t, host, sp)
    # Freeing d after the launches is safe: CuPy's pool reuses memory only in this stream's order.
    chunks.copy_chunks(t, t + 8 * k, t + 16 * k, n=k, max_nbytes=int(nbytes.max()), pad=True, stream=stream)
    crc32.crc32_batch(t + 8 * k, t + 16 * k, None, k, shape, work=t + 32 * k if words else None, stream=stream,
                      out_addrs=t + 24 * k)


class PendingCRC:
    """The CRC32s of a segment's chunks, computed into its table on the device by :func:`pack_payload`; calling
    it waits for them (an event recorded after the kernel) and returns them as a host uint32 array."""

    __slots__ = ("event", "n", "offset", "payload")

    def __init__(self):
        self.payload = self.event = None
        self.offset = self.n = 0

    def bind(self, payload, offset: int, n: int, event) -> None:
        self.payload, self.offset, self.n, self.event = payload, offset, n, event

    def __call__(self) -> np.ndarray:
        if isinstance(self.payload, memoryview):  # the payload was brought to the host: read it there
            return np.frombuffer(self.payload, np.uint32, self.n, self.offset).copy()
        import cupy

        self.event.synchronize()
        out = np.empty(self.n, np.uint32)
        if self.n:
            cupy.cuda.runtime.memcpy(out.ctypes.data, self.payload.data.ptr + self.offset, 4 * self.n, _D2H)
        return out


# -- one segment in few calls (the small-array path) ----------------------------------------------------------


class _OneShape:
    """What compressing one segment of a given codec config, size and chunk needs that does not depend on where
    the data lives: its geometry, nvCOMP's sizes, the layout of the one scratch allocation and the CRC launch
    shape (sized for raw chunks, which bound the packed ones). Built once per shape by :func:`_one_shape`.

    Scratch layout (bytes): nvCOMP's output chunks (``n`` x ``stride``) and temp memory; its tables (u64 input
    pointers, input sizes, output pointers, compressed sizes, then i32 statuses); then the pack region, u64 words:
    the packed kernel's 12 arguments, source pointers, destination pointers and sizes of the chunks, their CRC
    slots, the CRC work words (zeroed), then the chunk table's bytes.
    """

    __slots__ = ("arg_rel", "arg_tpl", "buf_nbytes", "codec", "copts", "crc_rel", "fn", "in_offsets", "max_chunk",
                 "n", "n_blocks", "name", "nv_tpl", "o_pack", "o_tab", "o_temp", "out_offsets", "pack_words", "raw",
                 "raw_stats", "table_nbytes", "table_word", "temp", "zero_out", "zero_status")

    def __init__(self, codec, nbytes: int, chunk: int):
        self.codec = codec
        self.raw, self.in_offsets = _geometry(nbytes, chunk)
        n = self.n = len(self.raw)
        self.max_chunk = int(self.raw.max()) if n else 0
        self.raw_stats = [self.max_chunk, nbytes, None]  # decode rows' (largest chunk, total, decoder cache)
        self.zero_status = bytes(4 * n)
        self.crc_rel = np.uint64(4 * n) + np.arange(n, dtype=np.uint64) * np.uint64(4)  # CRC slots in the table
        self.table_nbytes = tn = (9 * n + 15) // 16 * 16
        self.fn = None
        self.zero_out = False
        self.temp = self.o_temp = 0
        o = 0
        if n and codec.nvcomp_algorithm is not None:
            algo = _cname(codec)
            self.name = f"nvcompBatched{algo}CompressAsync"
            self.fn = getattr(_library(), self.name)
            self.copts = codec_opts(codec)[0]
            self.temp, max_out = _compress_sizes(codec, n, self.max_chunk, nbytes)
            stride = (max_out + 255) // 256 * 256
            self.out_offsets = np.arange(n, dtype=np.uint64) * np.uint64(stride)
            self.o_temp = n * stride
            self.zero_out = codec.nvcomp_algorithm in LEAVES_GAPS
            o = self.o_tab = (self.o_temp + self.temp + 255) // 256 * 256
            o += 36 * n
            # nvCOMP's rows before the two base addresses are added: in_offsets | raw sizes | out_offsets
            self.nv_tpl = np.concatenate([self.in_offsets, self.raw, self.out_offsets])
        shape = crc32.shape_for(max(self.max_chunk, 1), max(nbytes, 1)) if n else (1, 0, 0)
        work_words = crc32.work_words(n, shape[0])
        A = crc32.PACKED_ARGS
        self.pack_words = A + 4 * n + (work_words + 1) // 2 + tn // 8
        self.table_word = self.pack_words - tn // 8
        self.o_pack = (o + 255) // 256 * 256
        self.buf_nbytes = self.o_pack + 8 * self.pack_words
        self.n_blocks = n * shape[0]
        # The packed kernel's arguments relative to the pack region (arg_rel marks those that add its address;
        # the payload's address goes in at index 10).
        w = A + 4 * n
        self.arg_tpl = np.array(crc32.packed_args(n, shape, 8 * (A + n), 8 * (A + 2 * n), 8 * (A + 3 * n),
                                                  8 * w if work_words else 0, 8 * A, 8 * self.table_word, 0, tn),
                                dtype=np.uint64)
        self.arg_rel = np.zeros(A, np.uint64)
        self.arg_rel[[0, 1, 2, 8, 9]] = 1
        if work_words:
            self.arg_rel[7] = 1


def _one_shape(codec, nbytes: int, chunk: int) -> _OneShape:
    """The shape for (codec instance, size, chunk), cached by the codec's identity (callers pass memoized resolved
    codecs, and the entry keeps its codec alive, so an id is never reused while cached)."""
    key = (id(codec), nbytes, chunk)
    sh = _SHAPES.get(key)
    if sh is None or sh.codec is not codec:
        if len(_SHAPES) >= 256:
            _SHAPES.clear()
        sh = _SHAPES[key] = _OneShape(codec, nbytes, chunk)
    return sh


_SHAPES: dict = {}


def fits_one(codec, nbytes: int, chunk: int) -> bool:
    """Whether :func:`compress_one` takes this segment: its scratch (worst-case output of every chunk at once) stays
    within the 1 GiB that :func:`compress_segments` bounds its rounds by; larger segments go there."""
    return _one_shape(codec, int(nbytes), int(chunk)).buf_nbytes <= _BATCH_SCRATCH_NBYTES


class Packed:
    """A segment compressed and packed on the device by :func:`compress_one`."""

    __slots__ = ("comp_nbytes", "crc", "flags", "payload", "rows")

    def __init__(self, comp_nbytes, flags, payload, crc, rows):
        self.comp_nbytes, self.flags, self.payload, self.crc, self.rows = comp_nbytes, flags, payload, crc, rows


def compress_one(data, codec, chunk_nbytes: int, stream=None) -> Packed:
    """Compress one segment (a C-contiguous, 256-byte aligned device array) and pack it into a fresh payload of its
    own (chunk table, then the chunks), with the fewest host calls the job allows.

    For an nvCOMP codec: one upload, one nvCOMP call (after zeroing its output for codecs that leave gaps), one
    download and synchronization (the compressed sizes and statuses); then the payload's allocation, one upload and
    one launch that copies the chunks and the table and writes each chunk's CRC32 into its table slot, and an event
    the CRCs are read after (:class:`PendingCRC`). For ``raw`` (or no data) nothing waits. The bytes equal what
    :func:`compress_segments` and :func:`pack_payload` write for the same segment.
    """
    import cupy

    require()
    sp = _stream_ptr(stream)
    nbytes = int(data.nbytes)
    sh = _one_shape(codec, nbytes, int(chunk_nbytes))
    n = sh.n
    raw = sh.raw
    buf = cupy.empty(max(sh.buf_nbytes, 1), dtype=np.uint8)
    base = buf.data.ptr
    in_base = data.data.ptr if nbytes else 0
    shrank, all_encoded = None, False
    if sh.fn is None:  # raw codec, or nothing to compress: every chunk is stored as is
        comp, src = raw, sh.in_offsets + np.uint64(in_base)
    else:
        t = base + sh.o_tab
        nv_rows = sh.nv_tpl.copy()  # nvCOMP's input pointers | input sizes | output pointers
        nv_rows[:n] += np.uint64(in_base)
        nv_rows[2 * n :] += np.uint64(base)
        if sh.zero_out:
            cupy.cuda.runtime.memsetAsync(base, 0, sh.o_temp, sp)
        _upload(t, nv_rows, sp)
        status = sh.fn(t, t + 8 * n, sh.max_chunk, n, base + sh.o_temp, sh.temp, t + 16 * n, t + 24 * n, sh.copts,
                       t + 32 * n, sp)
        if status != 0:
            raise BackendError(f"{sh.name} failed", status_name(status))
        res = _download(t + 24 * n, 12 * n, sp)
        statuses = res[8 * n :]
        if statuses.tobytes() != sh.zero_status:
            statuses = statuses.view(np.int32)
            bad = np.flatnonzero(statuses)
            raise BackendError(f"nvCOMP {codec.codec_id} compression failed for {bad.size} chunk(s)",
                               status_name(int(statuses[bad[0]])))
        sizes = res[: 8 * n].view(np.uint64)
        shrank = sizes < raw
        all_encoded = bool(shrank.all())
        if all_encoded:  # the usual case
            comp, src = sizes.copy(), nv_rows[2 * n :]
        else:
            comp = np.where(shrank, sizes, raw)  # a chunk that does not shrink is stored as is
            src = np.where(shrank, nv_rows[2 * n :], nv_rows[:n])
    padded = (comp + np.uint64(15)) & np.uint64(0xFFFFFFFFFFFFFFF0)
    ends = padded.cumsum()
    offs = ends - padded + np.uint64(sh.table_nbytes)  # chunk offsets in the payload
    payload = cupy.empty(sh.table_nbytes + (int(ends[-1]) if n else 0), dtype=np.uint8)
    comp32 = comp.astype(np.uint32)
    flags = np.ones(n, np.uint8) if shrank is None else (~shrank).view(np.uint8)
    crc = PendingCRC()
    if n:
        pb = np.uint64(payload.data.ptr)
        p = base + sh.o_pack
        A = crc32.PACKED_ARGS
        host = np.zeros(sh.pack_words, dtype=np.uint64)
        np.add(sh.arg_tpl, sh.arg_rel * np.uint64(p), out=host[:A])
        host[10] = pb
        host[A : A + n], host[A + 2 * n : A + 3 * n] = src, comp
        np.add(offs, pb, out=host[A + n : A + 2 * n])
        np.add(sh.crc_rel, pb, out=host[A + 3 * n : A + 4 * n])
        table = host[sh.table_word :].view(np.uint8)
        table[: 4 * n] = comp32.view(np.uint8)
        table[8 * n : 9 * n] = flags
        _upload(p, host, sp)
        crc32.crc32_batch_packed(p, sh.n_blocks, stream)  # copies chunks and table, writes the CRCs
        event = cupy.cuda.Event(block=False, disable_timing=True)
        event.record(cupy.cuda.ExternalStream(sp) if stream is not None else None)
        crc.bind(payload, 4 * n, n, event)
    else:
        crc.bind(memoryview(b""), 0, 0, None)
    if all_encoded:  # every chunk encoded: the decode rows need no selection
        rows = (offs, comp, sh.in_offsets, raw, sh.raw_stats), None
    else:
        rows = _rows(offs, comp, flags, sh.in_offsets, raw)
    # buf may be freed now: CuPy's pool reuses it only in this stream's order, after the packing launch.
    return Packed(comp32, flags, payload, crc, rows)


_ERR_INIT = np.array([0, 2**64 - 1], dtype=np.uint64)  # [bad chunk count, min (index << 16 | status)]


def _segment_rows(seg):
    """A segment's decode rows relative to its payload and output: (encoded, stored), each None or uint64 arrays
    (chunk offsets, compressed sizes, output offsets, raw sizes, then (largest raw chunk, raw total)) / (chunk
    offsets, output offsets, raw sizes, largest). Computed once per segment (segments are immutable)."""
    rows = seg.__dict__.get("_decode_rows")
    if rows is None:
        rows = seg.__dict__["_decode_rows"] = _rows(
            seg.chunk_offsets.astype(np.uint64), seg.table.comp_nbytes.astype(np.uint64), seg.table.flags,
            np.arange(seg.n_chunks, dtype=np.uint64) * np.uint64(seg.chunk_nbytes),
            seg.raw_chunk_nbytes.astype(np.uint64))
    return rows


def remember_rows(seg, rows) -> None:
    """Record decode rows computed while packing ``seg`` (:attr:`Packed.rows`), so decoding it computes none (kept
    in the segment's instance dict, like its cached properties: segments are immutable)."""
    seg.__dict__["_decode_rows"] = rows


def _rows(offs, comp, flags, dst, raw):
    n = len(offs)
    if n == 0:
        return None, None
    st = flags.view(bool)
    n_st = int(np.count_nonzero(st))
    if n_st == 0:
        return (offs, comp, dst, raw, [int(raw.max()), int(raw.sum()), None]), None
    stored = (offs[st], dst[st], raw[st], int(raw[st].max()))
    if n_st == n:
        return None, stored
    e = ~st
    r = raw[e]
    return (offs[e], comp[e], dst[e], r, [int(r.max()), int(r.sum()), None]), stored


def decode_one(payload, seg, out, stream=None) -> None:
    """Decode one segment from a device ``payload`` into ``out`` (a 16-byte aligned device uint8 buffer of
    ``seg.raw_nbytes``) and check it: one allocation and upload, one nvCOMP call, one copy launch when chunks are
    stored raw, then (only when nvCOMP ran) one download and synchronization, with the per-chunk statuses and
    decoded sizes checked on the host. Nothing waits for a segment whose chunks are all stored."""
    import cupy

    enc, stored = _segment_rows(seg)
    if enc is None and stored is None:
        return
    sp = _stream_ptr(stream)
    pb, ob = np.uint64(payload.data.ptr), np.uint64(out.data.ptr)
    pieces = []
    G = S = temp_n = 0
    if enc is not None:
        if seg.codec.nvcomp_algorithm is None:  # pragma: no cover - the reader rejects this
            raise BackendError(f"segment {seg.name!r}: codec {seg.codec.codec_id!r} has no GPU decoder")
        G = len(enc[0])
        # (codec, nvCOMP function, opts, temp bytes, name, expected sizes' bytes, zero statuses): what depends only
        # on the codec and the raw sizes, so segments of one shape share it (compress_one's rows share the list)
        dec = enc[4][2]
        if dec is None or dec[0] is not seg.codec:
            require()
            name = f"nvcompBatched{_cname(seg.codec)}DecompressAsync"
            dec = enc[4][2] = (seg.codec, getattr(_library(), name), codec_opts(seg.codec)[1],
                               _decompress_temp(seg.codec, G, enc[4][0], enc[4][1]), name, enc[3].tobytes(),
                               bytes(4 * G))
        temp_n = dec[3]
        pieces += [enc[0] + pb, enc[1], enc[2] + ob, enc[3]]
    if stored is not None:
        S = len(stored[0])
        pieces += [stored[0] + pb, stored[1] + ob, stored[2]]
    host = np.concatenate(pieces)
    # One allocation: the rows above, then u64 actual sizes[G] and i32 statuses[G], then nvCOMP's temp memory.
    o_act = 8 * len(host)
    o_temp = (o_act + 12 * G + 255) // 256 * 256
    buf = cupy.empty(o_temp + temp_n, dtype=np.uint8)
    base = buf.data.ptr
    _upload(base, host, sp)
    if G:
        st = dec[1](base, base + 8 * G, base + 24 * G, base + o_act, G, base + o_temp, temp_n, base + 16 * G, dec[2],
                    base + o_act + 8 * G, sp)
        if st != 0:
            raise BackendError(f"{dec[4]} failed", status_name(st))
    if S:
        s0 = base + 32 * G
        chunks.copy_chunks(s0, s0 + 8 * S, s0 + 16 * S, n=S, max_nbytes=stored[3], pad=False, stream=stream)
    if G:
        res = _download(base + o_act, 12 * G, sp)
        if res[8 * G :].tobytes() != dec[6] or res[: 8 * G].tobytes() != dec[5]:
            _raise_bad(res[: 8 * G].view(np.uint64), res[8 * G :].view(np.int32), enc[3])


def _raise_bad(actual, status, expected) -> None:
    """Raise BackendError if any chunk has a nonzero nvCOMP status or decoded to the wrong size."""
    if not status.any() and actual.tobytes() == expected.tobytes():
        return
    idx = np.flatnonzero((status != 0) | (actual != expected))
    if idx.size:
        raise _decode_error(idx.size, int(idx[0]), int(status[idx[0]]))


def _decode_error(count: int, index: int, status: int) -> BackendError:
    """The error for ``count`` bad chunks, the first at batch index ``index`` (nvCOMP status 0: wrong size)."""
    what = status_name(status) if status else "decoded size differs from the chunk table"
    return BackendError(f"nvCOMP failed to decode {count} chunk(s); first: batch chunk {index}", what)


@functools.lru_cache(maxsize=1024)
def _decompress_temp(codec, n: int, max_chunk: int, total: int) -> int:
    temp = _c_size(0)
    _call(f"nvcompBatched{_cname(codec)}DecompressGetTempSize", n, max_chunk, codec_opts(codec)[1], ctypes.byref(temp),
          total, None)
    return int(temp.value)


class DecodePlan:
    """A reusable, allocation-free batched decode of many segments into fixed output buffers.

    ``jobs`` are ``(payload, segment, out)`` triples: a device payload (uint8 CuPy array) holding ``segment``'s
    chunks at the offsets of its table, and a device uint8 buffer of ``segment.raw_nbytes`` bytes to fill. Building
    the plan makes one device allocation (pointer tables and nvCOMP's temporary memory) and one upload; :meth:`run`
    then issues one nvCOMP call per distinct codec config, one status-check launch and (when some chunks are
    stored raw) one copy launch, all on the given (or current) stream, without synchronizing. Bad statuses
    accumulate on the device until :meth:`check` (which synchronizes) reads them.

    A plan holds raw device pointers: the payloads and outputs must stay allocated while it is used, and one plan
    must not run on two streams at once (its temporary buffer is shared by its launches).
    """

    def __init__(self, jobs, stream=None, *, sync: bool = True):
        import cupy

        self._keep = [p for p, _, _ in jobs]
        groups: dict[tuple, list] = {}
        copies = []
        for payload, seg, out in jobs:
            if seg.raw_nbytes == 0:
                continue
            enc, stored = _segment_rows(seg)
            pb, ob = np.uint64(payload.data.ptr), np.uint64(out.data.ptr)
            if stored is not None:
                copies.append((stored[0] + pb, stored[1] + ob, stored[2]))
            if enc is not None:
                if seg.codec.nvcomp_algorithm is None:  # pragma: no cover - the reader rejects this
                    raise BackendError(f"segment {seg.name!r}: codec {seg.codec.codec_id!r} has no GPU decoder")
                groups.setdefault(seg.codec.config_key(), []).append(
                    (seg.codec, enc[0] + pb, enc[1], enc[2] + ob, enc[3]))
        if groups:
            require()
        # One allocation (bytes): u64 rows comp_ptrs[G] | comp_sizes[G] | out_ptrs[G] | raw_sizes[G] | actual[G],
        # i32 statuses[G] (padded to 8 bytes), u64 copy src[S] | dst[S] | nbytes[S] | err[2], then each group's
        # nvCOMP temp memory.
        cols = [[], [], [], []]
        self._groups = []
        row = 0
        for parts in groups.values():
            codec = parts[0][0]
            for k in range(4):
                cols[k].extend(p[k + 1] for p in parts)
            raw_sizes = np.concatenate([p[4] for p in parts]) if len(parts) > 1 else parts[0][4]
            n = len(raw_sizes)
            max_chunk, total = int(raw_sizes.max()), int(raw_sizes.sum())
            temp_n = _decompress_temp(codec, n, max_chunk, total)
            fn = getattr(_library(), f"nvcompBatched{_cname(codec)}DecompressAsync")
            self._groups.append([fn, codec_opts(codec)[1], row, n, temp_n, 0, f"nvcompBatched{_cname(codec)}"])
            row += n
        G = row
        S = sum(len(c[0]) for c in copies)
        h = (G + 1) // 2  # u64 words holding the i32 statuses, right after the actual sizes (one download reads both)
        n_words = 5 * G + h + 3 * S + 2
        o_temp = (8 * n_words + 255) // 256 * 256
        temp_offsets = np.cumsum([0] + [(g[4] + 255) // 256 * 256 for g in self._groups])
        self._buf = cupy.empty(max(o_temp + int(temp_offsets[-1]), 1), dtype=np.uint8)
        base = self._buf.data.ptr
        pieces = [*cols[0], *cols[1], *cols[2], *cols[3], np.zeros(G + h, np.uint64)]
        for k in range(3):
            pieces.extend(c[k] for c in copies)
        pieces.append(_ERR_INIT)
        host = np.concatenate(pieces)
        self._expected = host[3 * G : 4 * G].copy()  # raw chunk sizes, for the host-side check of run_and_wait
        self._err_ptr = base + 8 * (n_words - 2)
        sp = _stream_ptr(stream)
        _upload(base, host, sp)
        if sync:  # the plan may run on other streams: its tables must be on the device first
            _sync(sp)
        self._ptrs = (base, base + 8 * G, base + 16 * G, base + 24 * G, base + 32 * G, base + 40 * G)
        for g, off in zip(self._groups, temp_offsets):
            g[5] = base + o_temp + int(off)
        self._n_enc = G
        self._copy = None
        if S:
            s0 = base + 8 * (5 * G + h)
            self._copy = (s0, s0 + 8 * S, s0 + 16 * S, S, int(host[5 * G + h + 2 * S : 5 * G + h + 3 * S].max()))
        self.n_chunks = G + S

    def run(self, stream=None, *, _check: bool = True) -> None:
        """Enqueue the decode on ``stream`` (default: CuPy's current stream); does not synchronize."""

        sp = _stream_ptr(stream)
        comp_ptrs, comp_sizes, out_ptrs, raw_sizes, actual, status = self._ptrs
        for fn, dopts, row, n, temp_n, temp_ptr, name in self._groups:
            st = fn(comp_ptrs + 8 * row, comp_sizes + 8 * row, raw_sizes + 8 * row, actual + 8 * row, n, temp_ptr,
                    temp_n, out_ptrs + 8 * row, dopts, status + 4 * row, sp)
            if st != 0:
                raise BackendError(f"{name}DecompressAsync failed", status_name(st))
        if self._n_enc and _check:
            chunks.check_statuses(status, actual, raw_sizes, self._err_ptr, n=self._n_enc, stream=stream)
        if self._copy is not None:
            src, dst, nb, n, mx = self._copy
            chunks.copy_chunks(src, dst, nb, n=n, max_nbytes=mx, pad=False, stream=stream)

    def run_and_wait(self, stream=None) -> None:
        """:meth:`run`, then wait and raise :class:`~cupycodec.BackendError` if any chunk failed. The statuses and
        decoded sizes come back in one download and are checked on the host, so no check kernel is launched; a
        plan without nvCOMP chunks (all stored) does not wait at all."""
        self.run(stream, _check=False)
        G = self._n_enc
        if G:
            res = _download(self._ptrs[4], 12 * G, _stream_ptr(stream))
            _raise_bad(res[: 8 * G].view(np.uint64), res[8 * G :].view(np.int32), self._expected)

    def check(self, stream=None) -> None:
        """Synchronize ``stream`` and raise :class:`~cupycodec.BackendError` if any chunk failed since the last
        check (the error state is then cleared)."""
        sp = _stream_ptr(stream)
        err = _download(self._err_ptr, 16, sp).view(np.uint64)
        if int(err[0]):
            count, key = int(err[0]), int(err[1])
            _upload(self._err_ptr, np.array([0, 2**64 - 1], dtype=np.uint64), sp)
            _sync(sp)
            raise _decode_error(count, key >> 16, key & 0xFFFF)


_warned_level = False


def warn_ignored_level(codec) -> None:
    """nvCOMP has no compression levels: say so once per process when a level was set."""
    global _warned_level
    if getattr(codec, "level", None) is not None and not _warned_level:
        _warned_level = True
        warnings.warn(f"codec {codec.codec_id!r}: level={codec.level} applies to the CPU backend only; nvCOMP "
                      "ignores it", UserWarning, stacklevel=4)
