"""nvCOMP's batched C API through ctypes: load libnvcomp, prove it is the ABI transcribed here, declare what we call.

The opts structs are passed by value, so a wrong size or offset would not fail loudly: nvCOMP would read options
from the wrong bytes. Every struct is therefore checked at load against ``_LAYOUT`` (numbers taken from nvCOMP 6.0's
``include/nvcomp/*.h``; tests/test_nvcomp_binding.py compiles those headers and compares), and the library's major
version must be one of ``SUPPORTED_MAJORS``, because nvCOMP changes structs and symbols between majors.
Nothing here creates a CUDA context: the size queries are host-only.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable

from .._lru import LRU
from ..errors import BackendError, BackendUnavailableError

__all__ = [
    "LEAVES_GAPS", "SUPPORTED_MAJORS", "available", "clear_caches", "codec_opts", "compress_fn", "compress_sizes",
    "decompress_fn", "decompress_temp", "library", "nvcomp_crc32_async", "require", "status_name",
    "unavailable_reason", "version", "version_string",
]

SUPPORTED_MAJORS = (6,)
# nvCOMP encoders that leave some bytes of their output chunks unwritten (measured on nvCOMP 6.0, H200: runs of a
# few bytes inside ANS and GDeflate chunks held whatever the memory pool held). Callers zero their output scratch,
# so the container stays deterministic (tests/gpu: test_gpu_compression_is_deterministic_whatever_...).
LEAVES_GAPS = frozenset({"ANS", "GDeflate"})
_INSTALL = 'pip install "cupycodec[cu12]" (CUDA 12) or "cupycodec[cu13]" (CUDA 13)'

_I, _U8, _U32, _U64, _D = ctypes.c_int, ctypes.c_uint8, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_double
_B, _SZ, _P = ctypes.c_bool, ctypes.c_size_t, ctypes.c_void_p


class _Opts(ctypes.Structure):
    """Base of the opts structs: ctypes zero-fills, and nvCOMP requires the reserved bytes to be zero."""


def _struct(name, *fields):
    return type(name, (_Opts,), {"_fields_": list(fields)})


def _res(n):
    return ("reserved", ctypes.c_char * n)


# Field names and C types as in the headers (enums are C ints); class names are the C typedef names.
_Props = _struct("nvcompProperties_t", ("version", _U32), ("cudart_version", _U32))
_CascadedCommon = _struct("nvcompCascadedCommonOpts_t", ("data_type", _I), ("mode", _I),
                          ("terminal_codec_flags", _U64), ("coarse_grained_encoding_flags", _U64))
_CRC32Spec = _struct("nvcompCRC32Spec_t", ("poly", _U32), ("init", _U32), ("ref_in", _B), ("ref_out", _B),
                     ("xorout", _U32), _res(16))
_CRC32Conf = _struct("nvcompCRC32KernelConf_t", ("kernel_kind", _I), ("bytes_per_read", ctypes.c_int32),
                     ("blocks_per_msg", ctypes.c_int32), _res(20))
_CRC32Opts = _struct("nvcompBatchedCRC32Opts_t", ("spec", _CRC32Spec), ("kernel_conf", _CRC32Conf), _res(64))
_BACKEND, _SORT = ("backend", _I), ("sort_before_hw_decompress", _I)
_OPTS = {algo: (_struct(f"nvcompBatched{algo}CompressOpts_t", *c), _struct(f"nvcompBatched{algo}DecompressOpts_t", *d))
         for algo, c, d in [
    ("LZ4", [("data_type", _I), ("bitshuffle_mode", _I), _res(56)],
     [_BACKEND, _SORT, ("data_type", _I), ("bitshuffle_mode", _I), _res(48)]),
    ("Snappy", [_res(64)], [_BACKEND, _SORT, _res(56)]),
    ("Deflate", [("algorithm", _I), _res(60)], [_BACKEND, _SORT, _res(56)]),
    ("Gdeflate", [("algorithm", _I), _res(60)], [_BACKEND, _res(60)]),
    ("Gzip", [("algorithm", _I), _res(60)], [_BACKEND, ("algorithm", _I), _SORT, _res(52)]),
    ("Zstd", [_res(64)], [_BACKEND, _res(60)]),
    ("Cascaded", [("common_opts", _CascadedCommon), ("fine_grained_encoding_flags", _U64),
                  ("compression_level", _U8), _res(31)],
     [_BACKEND, ("common_opts", _CascadedCommon), _res(32)]),
    ("Bitcomp", [("algorithm", _I), ("data_type", _I), ("delta", _D), ("mode", _I), _res(44)], [_BACKEND, _res(60)]),
    ("ANS", [("type", _I), ("data_type", _I), ("max_sub_chunk_count", _U8), ("states_per_lane", _U8),
             ("histogram_reduction_log2", _U8), _res(53)],
     [_BACKEND, ("data_type", _I), ("max_sub_chunk_count", _U8), ("states_per_lane", _U8), ("skip_validate", _U8),
      _res(53)]),
]}
_STRUCTS = (_Props, _CascadedCommon, _CRC32Spec, _CRC32Conf, _CRC32Opts, *(s for pair in _OPTS.values() for s in pair))
_C_NAME = {"GDeflate": "Gdeflate"}  # our algorithm names -> nvCOMP's C symbol infix

# sizeof and field offsets from nvCOMP 6.0's headers, written out by hand (not computed by ctypes) so that the load
# check below compares two independent sources. Every opts struct is 64 bytes; the CRC32 ones are 32, 32 and 128.
_R0, _A4, _B4 = {"reserved": 0}, {"algorithm": 0, "reserved": 4}, {"backend": 0, "reserved": 4}
_B8 = {"backend": 0, "sort_before_hw_decompress": 4, "reserved": 8}
_LAYOUT = {
    "nvcompProperties_t": (8, {"version": 0, "cudart_version": 4}),
    "nvcompCascadedCommonOpts_t": (24, {"data_type": 0, "mode": 4, "terminal_codec_flags": 8,
                                        "coarse_grained_encoding_flags": 16}),
    "nvcompCRC32Spec_t": (32, {"poly": 0, "init": 4, "ref_in": 8, "ref_out": 9, "xorout": 12, "reserved": 16}),
    "nvcompCRC32KernelConf_t": (32, {"kernel_kind": 0, "bytes_per_read": 4, "blocks_per_msg": 8, "reserved": 12}),
    "nvcompBatchedCRC32Opts_t": (128, {"spec": 0, "kernel_conf": 32, "reserved": 64}),
    **{f"nvcompBatched{name}Opts_t": (64, fields) for name, fields in [
        ("LZ4Compress", {"data_type": 0, "bitshuffle_mode": 4, "reserved": 8}),
        ("LZ4Decompress", {"backend": 0, "sort_before_hw_decompress": 4, "data_type": 8, "bitshuffle_mode": 12,
                           "reserved": 16}),
        ("SnappyCompress", _R0), ("SnappyDecompress", _B8), ("DeflateCompress", _A4), ("DeflateDecompress", _B8),
        ("GdeflateCompress", _A4), ("GdeflateDecompress", _B4), ("GzipCompress", _A4),
        ("GzipDecompress", {"backend": 0, "algorithm": 4, "sort_before_hw_decompress": 8, "reserved": 12}),
        ("ZstdCompress", _R0), ("ZstdDecompress", _B4),
        ("CascadedCompress", {"common_opts": 0, "fine_grained_encoding_flags": 24, "compression_level": 32,
                              "reserved": 33}),
        ("CascadedDecompress", {"backend": 0, "common_opts": 8, "reserved": 32}),
        ("BitcompCompress", {"algorithm": 0, "data_type": 4, "delta": 8, "mode": 16, "reserved": 20}),
        ("BitcompDecompress", _B4),
        ("ANSCompress", {"type": 0, "data_type": 4, "max_sub_chunk_count": 8, "states_per_lane": 9,
                         "histogram_reduction_log2": 10, "reserved": 11}),
        ("ANSDecompress", {"backend": 0, "data_type": 4, "max_sub_chunk_count": 8, "states_per_lane": 9,
                           "skip_validate": 10, "reserved": 11}),
    ]},
}

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
    """nvCOMP's name for an ``nvcompStatus_t`` value."""
    return _STATUS.get(int(code), f"nvcompStatus({int(code)})")


# -- loading ---------------------------------------------------------------------------------------------------------

_lock = threading.Lock()
# (library, version), set in one assignment once every check passed; a failure leaves it None, so a later call retries.
_loaded: tuple[ctypes.CDLL, tuple[int, int, int]] | None = None


def _check_layout() -> None:
    # ctypes lays structs out by the platform's C rules, which is what the headers assume; this fails on a platform
    # (or a transcription edit) where the two disagree, before nvCOMP can read options from the wrong bytes.
    if {s.__name__ for s in _STRUCTS} != set(_LAYOUT):
        raise BackendUnavailableError(f"nvCOMP binding bug: structs {sorted(s.__name__ for s in _STRUCTS)} "
                                      f"!= layout table {sorted(_LAYOUT)}")
    for cls in _STRUCTS:
        nbytes, offsets = _LAYOUT[cls.__name__]
        got = {name: getattr(cls, name).offset for name, _ in cls._fields_}
        names = [*offsets, *(f for f in got if f not in offsets)]
        checks = [("sizeof", ctypes.sizeof(cls), nbytes)] + [(f, got.get(f), offsets.get(f)) for f in names]
        for field, ours, header in checks:
            if ours != header:
                raise BackendUnavailableError(
                    f"ctypes struct {cls.__name__} does not match nvCOMP 6.0's header: {field} is {ours} in ctypes, "
                    f"{header} in the header; cupycodec cannot pass nvCOMP options safely on this platform")


def _declare(lib, name: str, argtypes, restype=_I) -> None:
    try:
        fn = getattr(lib, name)
    except AttributeError as exc:
        raise BackendUnavailableError(f"libnvcomp has no {name}; {_INSTALL}") from exc
    fn.argtypes, fn.restype = argtypes, restype


def _read_version(lib) -> tuple[int, int, int]:
    props = _Props()
    status = lib.nvcompGetProperties(ctypes.byref(props))
    if status != 0:
        raise BackendUnavailableError(f"nvcompGetProperties failed ({status_name(status)})")
    v = props.version  # NVCOMP_VER: major * 1000 + minor * 100 + patch (include/nvcomp/version.h)
    return v // 1000, v % 1000 // 100, v % 100


def library() -> ctypes.CDLL:
    """The loaded, checked libnvcomp with every function we call declared; raises BackendUnavailableError."""
    return (_loaded or _load())[0]


def version() -> tuple[int, int, int]:
    """(major, minor, patch) of the loaded libnvcomp, from ``nvcompGetProperties``."""
    return (_loaded or _load())[1]


def version_string() -> str:
    return ".".join(map(str, version()))


def _load() -> tuple[ctypes.CDLL, tuple[int, int, int]]:
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        try:
            import nvidia.libnvcomp as libnvcomp
        except ImportError as exc:
            raise BackendUnavailableError(f"nvCOMP is not installed; {_INSTALL}") from exc
        try:
            lib = libnvcomp.load_library()
        except OSError as exc:
            raise BackendUnavailableError(f"libnvcomp failed to load ({exc}); reinstall it: {_INSTALL}") from exc
        if lib is None:
            raise BackendUnavailableError(f"nvidia-libnvcomp is installed but libnvcomp could not be loaded; "
                                          f"reinstall it: {_INSTALL}")
        _check_layout()
        _declare(lib, "nvcompGetProperties", [ctypes.POINTER(_Props)])
        found = _read_version(lib)
        if found[0] not in SUPPORTED_MAJORS:
            cuda = getattr(libnvcomp, "__cuda_version__", "12")
            lo, hi = min(SUPPORTED_MAJORS), max(SUPPORTED_MAJORS) + 1
            raise BackendUnavailableError(
                f"cupycodec supports nvCOMP {' or '.join(f'{m}.x' for m in SUPPORTED_MAJORS)}; found "
                f"{'.'.join(map(str, found))}: pip install 'nvidia-libnvcomp-cu{cuda}>={lo},<{hi}'")
        size_out = ctypes.POINTER(_SZ)
        for algo, (copts, dopts) in _OPTS.items():
            p = f"nvcompBatched{algo}"
            _declare(lib, p + "CompressGetTempSize", [_SZ, _SZ, copts, size_out, _SZ, _P])
            _declare(lib, p + "CompressGetMaxOutputChunkSize", [_SZ, copts, size_out])
            _declare(lib, p + "CompressAsync", [_P, _P, _SZ, _SZ, _P, _SZ, _P, _P, copts, _P, _P])
            _declare(lib, p + "DecompressGetTempSize", [_SZ, _SZ, dopts, size_out, _SZ, _P])
            _declare(lib, p + "DecompressAsync", [_P, _P, _P, _P, _SZ, _P, _SZ, _P, dopts, _P, _P])
        _declare(lib, "nvcompBatchedCRC32Async", [_P, _P, _SZ, _P, _CRC32Opts, _I, _P, _P])
        _declare(lib, "nvcompBatchedCRC32GetHeuristicConf", [_P, _SZ, ctypes.POINTER(_CRC32Conf), _SZ, _P])
        _loaded = lib, found
        return _loaded


# available() sits on the path of every compress call, and re-probing a failure costs ~25 us (a failing
# `import cupy`) or a CUDA call, so a failure is reused for _RETRY_S seconds; it is never pinned for the process
# (a device can come back, a package can be installed). Success is kept until clear_caches().
_RETRY_S = 2.0
_clock = time.monotonic
_reason: tuple[str | None, float] | None = None


def _probe() -> str | None:
    try:
        import cupy
    except ImportError:
        return f"CuPy is not installed; {_INSTALL}"
    try:
        if not cupy.is_available():
            return "no usable CUDA device (cupy.is_available() is False)"
        library()
    except BackendUnavailableError as exc:
        return str(exc)
    except OSError as exc:
        return f"libnvcomp failed to load: {exc}"
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        return f"CUDA is not usable: {exc}"
    return None


def unavailable_reason() -> str | None:
    """None when CuPy, a usable CUDA device and libnvcomp all work here; else why not, with the fix."""
    global _reason
    cached = _reason
    if cached is not None and (cached[0] is None or _clock() - cached[1] < _RETRY_S):
        return cached[0]
    reason = _probe()
    _reason = (reason, _clock())
    return reason


def available() -> bool:
    return unavailable_reason() is None


def require() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise BackendUnavailableError(f'backend "nvcomp" cannot run here: {reason}')


# -- per-codec options and size queries ------------------------------------------------------------------------------


# bounded memos keyed by codec config and geometry, never by object ids
_opts_cache, _compress_cache, _decompress_cache, _decoder_cache = LRU(256), LRU(1024), LRU(1024), LRU(256)


def _cname(codec) -> str:
    return _C_NAME.get(codec.nvcomp_algorithm, codec.nvcomp_algorithm)


def _call(name: str, *args) -> None:
    status = getattr(library(), name)(*args)
    if status != 0:
        raise BackendError(f"{name} failed", status_name(status))


def _make_opts(algo: str, p: dict):
    copts_cls, dopts_cls = _OPTS[algo]
    c, d = copts_cls(), dopts_cls()
    if algo == "LZ4":
        c.data_type = d.data_type = p.get("data_type", 1)
    elif algo in ("Deflate", "Gdeflate", "Gzip"):
        c.algorithm = p.get("algorithm", 1)
    elif algo == "Cascaded":
        # mode ASYMMETRIC, terminal BITPACK, fine-grained DELTA|RLE|FOR: nvCOMP's defaults spelled out (cascaded.h).
        c.common_opts.data_type, c.common_opts.mode, c.common_opts.terminal_codec_flags = p["data_type"], 1, 1
        c.fine_grained_encoding_flags, c.compression_level = 7, p.get("compression_level", 3)
        d.common_opts.data_type = 0xFF  # NVCOMP_TYPE_BITS with mode UNSPECIFIED: read everything from the stream
    elif algo == "Bitcomp":
        c.algorithm, c.data_type = p.get("algorithm", 0), p["data_type"]  # mode 0: BITCOMP_LOSSLESS
    elif algo == "ANS":
        c.data_type = d.data_type = p["data_type"]  # naming the type lets nvCOMP launch its specialized kernel
        d.skip_validate = 0  # nvCOMP validates every ANS chunk: containers may come from anywhere
    return c, d


def codec_opts(codec) -> tuple[ctypes.Structure, ctypes.Structure]:
    """(compress opts, decompress opts) for a resolved codec, built once per config; shared, so never mutate them."""
    return _opts_cache.get(codec.config_key(), lambda: _make_opts(_cname(codec), codec.nvcomp_params()))


def compress_sizes(codec, n: int, max_chunk: int, total: int) -> tuple[int, int]:
    """nvCOMP's temp bytes and worst-case output chunk bytes for compressing ``n`` chunks (host-only queries)."""

    def query():
        algo, copts = _cname(codec), codec_opts(codec)[0]
        temp, max_out = _SZ(0), _SZ(0)
        _call(f"nvcompBatched{algo}CompressGetTempSize", n, max_chunk, copts, ctypes.byref(temp), total, None)
        _call(f"nvcompBatched{algo}CompressGetMaxOutputChunkSize", max_chunk, copts, ctypes.byref(max_out))
        return int(temp.value), int(max_out.value)

    return _compress_cache.get((codec.config_key(), n, max_chunk, total), query)


def decompress_temp(codec, n: int, max_chunk: int, total: int) -> int:
    """nvCOMP's temp bytes for decompressing ``n`` chunks (a host-only query)."""

    def query():
        temp = _SZ(0)
        _call(f"nvcompBatched{_cname(codec)}DecompressGetTempSize", n, max_chunk, codec_opts(codec)[1],
              ctypes.byref(temp), total, None)
        return int(temp.value)

    return _decompress_cache.get((codec.config_key(), n, max_chunk, total), query)


def compress_fn(codec) -> tuple[Callable, str]:
    """The declared ``nvcompBatched<Algo>CompressAsync`` for a codec, and its name (for error messages)."""
    name = f"nvcompBatched{_cname(codec)}CompressAsync"
    return getattr(library(), name), name


def decompress_fn(codec) -> tuple[Callable, str]:
    name = f"nvcompBatched{_cname(codec)}DecompressAsync"
    return getattr(library(), name), name


def decoder(codec) -> tuple[Callable, str, ctypes.Structure]:
    """(``nvcompBatched<Algo>DecompressAsync``, its name, the decompress opts) of a resolved codec, looked up once
    per config: a one-shot decode builds a plan per call."""
    return _decoder_cache.get(codec.config_key(), lambda: (*decompress_fn(codec), codec_opts(codec)[1]))


def nvcomp_crc32_async(ptrs, sizes, out, n: int, max_nbytes: int, stream_ptr: int) -> None:
    """nvCOMP's own batched CRC32, kept for benchmarks/bench_gpu.py to measure kernels.crc32 against."""
    opts = _CRC32Opts()
    opts.spec.poly, opts.spec.init, opts.spec.ref_in, opts.spec.ref_out = 0x04C11DB7, 0xFFFFFFFF, True, True
    opts.spec.xorout = 0xFFFFFFFF  # standard CRC-32 = zlib.crc32
    # Sizes NULL (nvcompCRC32IgnoredInputChunkBytes): the heuristic then picks from max_nbytes alone.
    _call("nvcompBatchedCRC32GetHeuristicConf", None, n, ctypes.byref(opts.kernel_conf), max_nbytes, None)
    _call("nvcompBatchedCRC32Async", ptrs, sizes, n, out, opts, 0, None, stream_ptr)


def clear_caches() -> None:
    """Forget the loaded library, the availability answer and every memo (tests; after fork in the child)."""
    global _loaded, _reason, _lock
    # Locks are replaced, not taken: in a forked child, a lock that another parent thread held is never released.
    _lock, _loaded, _reason = threading.Lock(), None, None
    for cache in (_opts_cache, _compress_cache, _decompress_cache):
        cache.clear()
