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
        _declare(lib, "nvcompBatchedCRC32Async", [_ptr, _ptr, _c_size, _ptr, _CRC32Opts, _I, _ptr, _ptr])
        _declare(lib, "nvcompBatchedCRC32GetHeuristicConf", [_ptr, _c_size, ctypes.POINTER(_CRC32Conf), _c_size,
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
    params = codec.nvcomp_params()
    return _opts(tuple(sorted(codec.get_config().items(), key=str)), _cname(codec), tuple(sorted(params.items())))


# --------------------------------------------------------------------------------------------------------------
# Compression
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SegmentInput:
    """One segment to compress: its bytes on the device (uint8, 256-byte aligned), codec and chunk size."""

    data: object
    codec: object
    chunk_nbytes: int


@dataclass
class SegmentOutput:
    comp_nbytes: np.ndarray  # uint32 per chunk
    crc32: np.ndarray
    flags: np.ndarray
    src_ptrs: np.ndarray  # uint64 per chunk: device address of the bytes to store (compressed or raw)
    keepalive: list


@functools.lru_cache(maxsize=128)
def _crc32_opts(device: int, n_bucket: int, max_bucket: int):
    # The heuristic depends on the GPU, the chunk count and the largest chunk; it is host-synchronous and not free,
    # so it is asked once per (device, power-of-two bucket of each).
    opts = _CRC32Opts()
    opts.spec.poly, opts.spec.init, opts.spec.ref_in, opts.spec.ref_out = 0x04C11DB7, 0xFFFFFFFF, True, True
    opts.spec.xorout = 0xFFFFFFFF  # standard CRC-32 = zlib.crc32
    conf = _CRC32Conf()
    _call("nvcompBatchedCRC32GetHeuristicConf", None, n_bucket, ctypes.byref(conf), max_bucket, None)
    opts.conf = conf
    return opts


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _crc32(ptrs, sizes, out, n: int, max_nbytes: int, stream_ptr: int) -> None:
    import cupy

    opts = _crc32_opts(cupy.cuda.Device().id, _pow2(n), _pow2(max(int(max_nbytes), 1)))
    _call("nvcompBatchedCRC32Async", ptrs.data.ptr, sizes.data.ptr, n, out.data.ptr, opts, 0, None, stream_ptr)


def crc32_chunks(ptrs_host: np.ndarray, sizes_host: np.ndarray, stream=None):
    """CRC32 of device byte ranges (host arrays of pointers and sizes) -> device uint32 array (async)."""
    import cupy

    n = len(ptrs_host)
    out = cupy.empty(n, dtype=np.uint32)
    if n:
        table = cupy.asarray(np.concatenate([ptrs_host.astype(np.uint64), sizes_host.astype(np.uint64)]))
        _crc32(table[:n], table[n:], out, n, int(sizes_host.max()), _stream_ptr(stream))
    return out


_BATCH_SCRATCH_NBYTES = 1 << 30  # bound on nvCOMP temp + output scratch per compression call


_BATCH_SCRATCH_NBYTES = 1 << 30  # bound on nvCOMP temp + output scratch per compression call
_SPECULATIVE_CRC_NBYTES = 64 << 20  # below this, raw-chunk CRCs are computed up front to save a second sync


class _Batch:
    """One nvCOMP compression call: chunks of one codec config, their scratch and their device results."""

    __slots__ = ("codec", "done", "index", "n", "out_ptrs", "owner", "raw_sizes", "res", "scratch", "stride")


def compress_segments(segments: list[SegmentInput], stream=None) -> list[SegmentOutput]:
    """Compress every chunk of every segment and checksum the result, with one synchronization in the common case.

    One nvCOMP call per distinct codec config (split when its scratch would exceed 1 GiB); CRC32s on the device; the
    compressed sizes, statuses and CRCs come back in one copy. Chunks that do not shrink are stored: their CRC covers
    the raw bytes, computed up front for inputs under 64 MiB and in a second pass otherwise. Returns per-segment
    tables plus device pointers to the bytes to pack (:func:`pack_payload`); the scratch those point into is kept
    alive by the outputs.
    """

    require()
    sp = _stream_ptr(stream)
    raw_sizes = [_raw_sizes(s.data.size, s.chunk_nbytes) for s in segments]
    raw_ptrs = [(s.data.data.ptr if s.data.size else 0)
                + np.arange(len(raw_sizes[i]), dtype=np.uint64) * np.uint64(s.chunk_nbytes)
                for i, s in enumerate(segments)]
    total_raw = sum(int(r.sum()) for r in raw_sizes)
    speculative = total_raw <= _SPECULATIVE_CRC_NBYTES
    comp = [r.copy() for r in raw_sizes]
    crcs = [np.zeros(len(r), np.uint32) for r in raw_sizes]
    ptrs = [p.copy() for p in raw_ptrs]
    keep: list = []

    groups: dict[tuple, list[int]] = {}
    for i, seg in enumerate(segments):
        if seg.codec.nvcomp_algorithm is not None and seg.data.size:
            groups.setdefault(tuple(sorted(seg.codec.get_config().items(), key=str)), []).append(i)
    batches: list[_Batch] = []
    for members in groups.values():
        codec = segments[members[0]].codec
        owner = np.concatenate([np.full(len(raw_sizes[i]), i) for i in members])
        index = np.concatenate([np.arange(len(raw_sizes[i])) for i in members])
        in_ptrs = np.concatenate([raw_ptrs[i] for i in members])
        in_sizes = np.concatenate([raw_sizes[i] for i in members]).astype(np.uint64)
        splits = _split_batches(codec, in_sizes, sp)
        for lo, hi in splits:
            b = _launch_batch(codec, in_ptrs[lo:hi], in_sizes[lo:hi], sp, speculative)
            b.owner, b.index = owner[lo:hi], index[lo:hi]
            if len(splits) > 1:  # large input: settle and compact this batch before the next one allocates
                _finish_batch(b, sp, compact=True)
            batches.append(b)
    # Raw CRCs of segments that nvCOMP does not touch (codec "raw", or empty groups) go in the same round trip.
    plain = [i for i, s in enumerate(segments) if (s.codec.nvcomp_algorithm is None or not s.data.size)
             and len(raw_sizes[i])]
    plain_crc = None
    if plain:
        plain_crc = crc32_chunks(np.concatenate([raw_ptrs[i] for i in plain]),
                                 np.concatenate([raw_sizes[i] for i in plain]).astype(np.uint64), stream)
    pending = [b for b in batches if not b.done]
    if pending or plain_crc is not None:
        _sync(sp)
    for b in pending:
        _finish_batch(b, sp, compact=False)
    if plain_crc is not None:
        host = plain_crc.get()
        start = 0
        for i in plain:
            crcs[i][:] = host[start : start + len(raw_sizes[i])]
            start += len(raw_sizes[i])

    missing: dict[int, np.ndarray] = {}  # segment -> stored chunks whose raw CRC was not computed up front
    for b in batches:
        sizes, status, crc_comp, crc_raw = b.res
        bad = np.flatnonzero(status != 0)
        if bad.size:
            raise BackendError(f"nvCOMP {b.codec.codec_id} compression failed for {bad.size} chunk(s)",
                               status_name(int(status[bad[0]])))
        shrank = sizes < b.raw_sizes
        for i in np.unique(b.owner).tolist():  # per segment, not per chunk: vectorized over its chunks
            mine = b.owner == i
            c, keep_c = b.index[mine], shrank[mine]
            comp[i][c[keep_c]] = sizes[mine][keep_c]
            crcs[i][c[keep_c]] = crc_comp[mine][keep_c]
            ptrs[i][c[keep_c]] = b.out_ptrs[mine][keep_c]
            if crc_raw is not None:
                crcs[i][c[~keep_c]] = crc_raw[mine][~keep_c]
            elif (~keep_c).any():
                missing[i] = np.concatenate([missing.get(i, np.empty(0, np.int64)), c[~keep_c]])
        keep.append(b.scratch)
    if missing:
        order = list(missing)
        d_crc = crc32_chunks(np.concatenate([raw_ptrs[i][missing[i]] for i in order]),
                             np.concatenate([raw_sizes[i][missing[i]] for i in order]).astype(np.uint64), stream)
        _sync(sp)
        host = d_crc.get()
        start = 0
        for i in order:
            crcs[i][missing[i]] = host[start : start + missing[i].size]
            start += missing[i].size
    outputs = []
    for i, seg in enumerate(segments):
        flags = (comp[i] == raw_sizes[i]).astype(np.uint8)
        outputs.append(SegmentOutput(comp[i].astype(np.uint32), crcs[i], flags, ptrs[i], [seg.data, *keep]))
    return outputs


def _split_batches(codec, sizes: np.ndarray, sp: int) -> list[tuple[int, int]]:
    """Chunk ranges whose nvCOMP temp + output scratch stays under _BATCH_SCRATCH_NBYTES."""
    n = len(sizes)
    temp, max_out = _compress_sizes(codec, n, int(sizes.max()), int(sizes.sum()), sp)
    per_chunk = (temp + n * max_out) / max(n, 1)
    step = max(1, min(n, int(_BATCH_SCRATCH_NBYTES // max(per_chunk, 1))))
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def _compress_sizes(codec, n: int, max_chunk: int, total: int, sp: int) -> tuple[int, int]:
    algo = _cname(codec)
    copts, _ = codec_opts(codec)
    temp, max_out = _c_size(0), _c_size(0)
    _call(f"nvcompBatched{algo}CompressGetTempSize", n, max_chunk, copts, ctypes.byref(temp), total, sp)
    _call(f"nvcompBatched{algo}CompressGetMaxOutputChunkSize", max_chunk, copts, ctypes.byref(max_out))
    return int(temp.value), int(max_out.value)


def _launch_batch(codec, in_ptrs: np.ndarray, in_sizes: np.ndarray, sp: int, speculative: bool) -> _Batch:
    """Enqueue compression + CRC32s of one batch with one upload; results land in one device buffer (no sync)."""
    import cupy

    algo = _cname(codec)
    copts, _ = codec_opts(codec)
    n = len(in_ptrs)
    max_chunk = int(in_sizes.max())
    temp_n, max_out = _compress_sizes(codec, n, max_chunk, int(in_sizes.sum()), sp)
    stride = (max_out + 255) // 256 * 256
    b = _Batch()
    b.codec, b.n, b.stride, b.raw_sizes = codec, n, stride, in_sizes
    b.scratch = cupy.empty(n * stride + max(temp_n, 1), dtype=np.uint8)
    b.out_ptrs = np.uint64(b.scratch.data.ptr) + np.arange(n, dtype=np.uint64) * np.uint64(stride)
    temp_ptr = b.scratch.data.ptr + n * stride
    # One buffer, one upload. u64 words: [in_ptrs | in_sizes | out_ptrs | in_ptrs | comp_sizes | in_sizes], then
    # n i32 statuses and 2n u32 CRCs. [out_ptrs | in_ptrs] with [comp_sizes | in_sizes] is one CRC32 call over the
    # compressed chunks and (speculatively, for small inputs) the raw chunks together: one kernel's latency, not two.
    ptrs64 = in_ptrs.astype(np.uint64)
    sizes64 = in_sizes.astype(np.uint64)
    host = np.concatenate([ptrs64, sizes64, b.out_ptrs, ptrs64, np.zeros(n, np.uint64), sizes64])
    buf = cupy.empty(48 * n + 12 * n, dtype=np.uint8)
    buf[: 48 * n].set(host.view(np.uint8))
    words = buf[: 48 * n].view(np.uint64)
    status = buf[48 * n : 52 * n].view(np.int32)
    crc = buf[52 * n :].view(np.uint32)
    _call(f"nvcompBatched{algo}CompressAsync", words.data.ptr, words.data.ptr + 8 * n, max_chunk, n, temp_ptr,
          temp_n, words.data.ptr + 16 * n, words.data.ptr + 32 * n, copts, status.data.ptr, sp)
    m = 2 * n if speculative else n
    _crc32(words[2 * n : 2 * n + m], words[4 * n : 4 * n + m], crc[:m], m, max(stride, max_chunk), sp)
    b.res, b.done = (buf, speculative), False
    return b


def _finish_batch(b: _Batch, sp: int, compact: bool) -> None:
    """Read a batch's results (the caller synchronized, or compact=True which syncs); optionally compact."""
    import cupy

    from ..kernels import chunks

    buf, speculative = b.res
    if compact:
        _sync(sp)
    n = b.n
    host = buf[32 * n :].get()  # comp_sizes, in_sizes, statuses, CRCs: one copy
    sizes = host[: 8 * n].view(np.uint64).copy()
    status = host[16 * n : 20 * n].view(np.int32).copy()
    crc = host[20 * n :].view(np.uint32)
    raw_crc = crc[n : 2 * n].copy() if speculative else None
    b.res, b.done = (sizes, status, crc[:n].copy(), raw_crc), True
    if not compact:
        return
    # Move the chunks that shrank out of the worst-case scratch, so the next batch can reuse the memory.
    shrank = sizes < b.raw_sizes
    padded = np.where(shrank, (sizes + 15) // 16 * 16, 0).astype(np.uint64)
    offs = np.zeros(n, dtype=np.uint64)
    if n > 1:
        np.cumsum(padded[:-1], out=offs[1:])
    compact_buf = cupy.empty(max(int(padded.sum()), 1), dtype=np.uint8)
    new_ptrs = np.uint64(compact_buf.data.ptr) + offs
    if shrank.any():
        sel = np.flatnonzero(shrank)
        arr = cupy.asarray(np.stack([b.out_ptrs[sel], new_ptrs[sel], sizes[sel]]))
        chunks.copy_chunks(arr[0], arr[1], arr[2], max_nbytes=int(sizes[sel].max()), pad=False)
        _sync(sp)
    b.out_ptrs = np.where(shrank, new_ptrs, b.out_ptrs)
    b.scratch = compact_buf


def _sync(stream_ptr: int) -> None:
    import cupy

    cupy.cuda.runtime.streamSynchronize(stream_ptr)


def _raw_sizes(nbytes: int, chunk: int) -> np.ndarray:
    n = -(-nbytes // chunk) if nbytes else 0
    sizes = np.full(n, chunk, dtype=np.int64)
    if n:
        sizes[-1] = nbytes - (n - 1) * chunk
    return sizes


def pack_payload(payload, tables: list[tuple[int, bytes]], src_ptrs: np.ndarray, dst_offsets: np.ndarray,
                 nbytes: np.ndarray) -> None:
    """Fill a device payload in one upload and one launch: ``tables`` are (offset, bytes) host pieces; the chunks
    are (src_ptrs[i], dst_offsets[i], nbytes[i]) device copies. Every piece is zero-padded to 16 bytes."""
    import cupy

    from ..kernels import chunks

    blob = b"".join(t for _, t in tables)
    m = len(tables) + len(src_ptrs)
    if m == 0:
        return
    base = np.uint64(payload.data.ptr)
    staging_nbytes = 24 * m
    d_staging = cupy.empty(staging_nbytes + len(blob), dtype=np.uint8)
    table_src = np.uint64(d_staging.data.ptr + staging_nbytes) + np.cumsum(
        [0] + [len(t) for _, t in tables[:-1]], dtype=np.uint64)[: len(tables)]
    desc = np.stack([
        np.concatenate([table_src, np.asarray(src_ptrs, np.uint64)]),
        np.concatenate([np.array([o for o, _ in tables], np.uint64), np.asarray(dst_offsets, np.uint64)]) + base,
        np.concatenate([np.array([len(t) for _, t in tables], np.uint64), np.asarray(nbytes, np.uint64)]),
    ])
    staging = np.empty(staging_nbytes + len(blob), dtype=np.uint8)
    staging[:staging_nbytes] = desc.reshape(-1).view(np.uint8)
    staging[staging_nbytes:] = np.frombuffer(blob, dtype=np.uint8)
    d_staging.set(staging)
    d_desc = d_staging[:staging_nbytes].view(np.uint64)
    # Freeing d_staging after the launch is safe: CuPy's pool reuses memory only in this stream's order.
    chunks.copy_chunks(d_desc[:m], d_desc[m : 2 * m], d_desc[2 * m :], max_nbytes=int(desc[2].max()), pad=True)


class _Group:
    __slots__ = ("algo", "d_actual", "d_comp_ptrs", "d_comp_sizes", "d_out_ptrs", "d_raw_sizes", "d_status", "dopts",
                 "index_base", "max_chunk", "n", "temp", "temp_nbytes")


class DecodePlan:
    """A reusable, allocation-free batched decode of many segments into fixed output buffers.

    ``jobs`` are ``(payload, segment, out)`` triples: a device payload (uint8 CuPy array) holding ``segment``'s
    chunks at the offsets of its table, and a device uint8 buffer of ``segment.raw_nbytes`` bytes to fill. Building
    the plan uploads pointer tables and allocates nvCOMP's temporary memory once; :meth:`run` then issues one nvCOMP
    call per distinct codec config, one copy launch for stored chunks and one status-check launch, all on the given
    (or current) stream, without synchronizing. Bad statuses accumulate on the device until :meth:`check` (which
    synchronizes) reads them.

    A plan holds raw device pointers: the payloads and outputs must stay allocated while it is used, and one plan
    must not run on two streams at once (its temporary buffer is shared by its launches).
    """

    def __init__(self, jobs, stream=None):
        import cupy

        self._keep = [p for p, _, _ in jobs]
        groups: dict[tuple, list] = {}
        copies = []
        for payload, seg, out in jobs:
            if seg.raw_nbytes == 0:
                continue
            base = payload.data.ptr
            obase = out.data.ptr
            offs = seg.chunk_offsets.astype(np.uint64) + np.uint64(base)
            raw = seg.raw_chunk_nbytes
            dst = np.uint64(obase) + np.arange(seg.n_chunks, dtype=np.uint64) * np.uint64(seg.chunk_nbytes)
            stored = seg.table.flags == 1
            if stored.any():
                copies.append(np.stack([offs[stored], dst[stored], raw[stored].astype(np.uint64)], axis=1))
            enc = ~stored
            if enc.any():
                if seg.codec.nvcomp_algorithm is None:  # pragma: no cover - the reader rejects this
                    raise BackendError(f"segment {seg.name!r}: codec {seg.codec.codec_id!r} has no GPU decoder")
                key = tuple(sorted(seg.codec.get_config().items(), key=str))
                groups.setdefault(key, []).append(
                    (seg.codec, offs[enc], seg.table.comp_nbytes[enc].astype(np.uint64), dst[enc],
                     raw[enc].astype(np.uint64)))
        self._groups = []
        index_base = 0
        if groups:
            require()
        for parts in groups.values():
            codec = parts[0][0]
            g = _Group()
            g.algo = _cname(codec)
            g.dopts = codec_opts(codec)[1]
            comp_ptrs = np.concatenate([p[1] for p in parts])
            comp_sizes = np.concatenate([p[2] for p in parts])
            out_ptrs = np.concatenate([p[3] for p in parts])
            raw_sizes = np.concatenate([p[4] for p in parts])
            g.n = len(comp_ptrs)
            g.max_chunk = int(raw_sizes.max())
            table = cupy.asarray(np.concatenate([comp_ptrs, comp_sizes, out_ptrs, raw_sizes]))
            g.d_comp_ptrs, g.d_comp_sizes, g.d_out_ptrs, g.d_raw_sizes = (table[j * g.n : (j + 1) * g.n]
                                                                          for j in range(4))
            g.d_actual = cupy.empty(g.n, dtype=np.uint64)
            g.d_status = cupy.empty(g.n, dtype=np.int32)
            temp_n = _c_size(0)
            _call(f"nvcompBatched{g.algo}DecompressGetTempSize", g.n, g.max_chunk, g.dopts, ctypes.byref(temp_n),
                  int(raw_sizes.sum()), _stream_ptr(stream))
            g.temp_nbytes = int(temp_n.value)
            g.temp = cupy.empty(max(g.temp_nbytes, 1), dtype=np.uint8)
            g.index_base = index_base
            index_base += g.n
            self._groups.append(g)
        if copies:
            arr = np.concatenate(copies).astype(np.uint64)
            table = cupy.asarray(arr.T.copy())
            self._copy = (table[0], table[1], table[2], int(arr[:, 2].max()))
        else:
            self._copy = None
        self._err = cupy.asarray(np.array([0, 2**64 - 1], dtype=np.uint64))
        self.n_chunks = index_base + (0 if self._copy is None else int(self._copy[0].size))

    def run(self, stream=None) -> None:
        """Enqueue the decode on ``stream`` (default: CuPy's current stream); does not synchronize."""
        from ..kernels import chunks

        sp = _stream_ptr(stream)
        lib = _library()
        for g in self._groups:
            status = getattr(lib, f"nvcompBatched{g.algo}DecompressAsync")(
                g.d_comp_ptrs.data.ptr, g.d_comp_sizes.data.ptr, g.d_raw_sizes.data.ptr, g.d_actual.data.ptr, g.n,
                g.temp.data.ptr, g.temp_nbytes, g.d_out_ptrs.data.ptr, g.dopts, g.d_status.data.ptr, sp)
            if status != 0:
                raise BackendError(f"nvcompBatched{g.algo}DecompressAsync failed", status_name(status))
        ctx = _stream_ctx(stream)
        with ctx:
            for g in self._groups:
                chunks.check_statuses(g.d_status, g.d_actual, g.d_raw_sizes, self._err, index_base=g.index_base)
            if self._copy is not None:
                src, dst, nb, mx = self._copy
                chunks.copy_chunks(src, dst, nb, max_nbytes=mx, pad=False)

    def check(self, stream=None) -> None:
        """Synchronize ``stream`` and raise :class:`~cupycodec.BackendError` if any chunk failed since the last
        check (the error state is then cleared)."""
        _sync(_stream_ptr(stream))
        err = self._err.get()
        if int(err[0]):
            key = int(err[1])
            index, status = key >> 16, key & 0xFFFF
            self._err.set(np.array([0, 2**64 - 1], dtype=np.uint64))
            what = status_name(status) if status else "decoded size differs from the chunk table"
            raise BackendError(f"nvCOMP failed to decode {int(err[0])} chunk(s); first: batch chunk {index}", what)


def _stream_ctx(stream):
    import contextlib

    import cupy

    if stream is None:
        return contextlib.nullcontext()
    if isinstance(stream, int):
        return cupy.cuda.ExternalStream(stream)
    return stream


_warned_level = False


def warn_ignored_level(codec) -> None:
    """nvCOMP has no compression levels: say so once per process when a level was set."""
    global _warned_level
    if getattr(codec, "level", None) is not None and not _warned_level:
        _warned_level = True
        warnings.warn(f"codec {codec.codec_id!r}: level={codec.level} applies to the CPU backend only; nvCOMP "
                      "ignores it", UserWarning, stacklevel=4)
