"""CPU implementations of GDeflate and Bitcomp from nvCOMP's own host libraries (no GPU or driver needed).

The nvidia-libnvcomp wheel (pulled in by the cu12/cu13 extras, or installed alone) ships ``libnvcomp_cpu.so.6``
with nvCOMP's CPU GDeflate codec and ``libnvcomp.so.6`` with Bitcomp's host API. Both read and write the same
chunk formats as the GPU codecs (checked on an H200: tests/gpu/test_nvcomp_backend.py).

Why GDeflate goes through Itanium-mangled C++ symbols: nvCOMP 6.x declares its CPU GDeflate only as C++ functions,
``nvcomp::gdeflate::{compressCPU, decompressCPU, compressCPUGetMaxOutputChunkSize}`` in
``include/nvcomp/native/gdeflate_cpu.h``, with no C entry point. (``libnvcomp_cpu.so.6`` also exports C-linkage
``libdeflate_gdeflate_*`` functions of a bundled libdeflate, but no nvCOMP header declares them, so they are not an
API we can pin.) Mangled names change when a signature or namespace does (5.x spelled the namespace ``gdeflate::``),
so they are pinned to the 6.x major: the libraries are loaded only through the version gate of
``backends._nvcomp_lib.library()``, and tests/test_nvcomp_binding.py checks that the names demangle to the header's
declarations and are exported by the installed library.

Those functions report errors by throwing ``nvcomp::NVCompException``. An exception cannot cross ctypes: it
terminates the whole process (SIGABRT), with no Python exception to catch. So they are only called on input that
cannot make them throw. Compression: chunks of 1 byte to 64 KiB and levels 0-12, checked here before the call.
Decompression: only chunks of *trusted* containers. A chunk's CRC32 is verified before it is decoded, which catches
accidental corruption, but a crafted container can carry a valid CRC over a bad GDeflate stream and abort the
process: do not decode GDeflate on the CPU from containers you do not trust. Bitcomp's host API is C and returns
status codes.
"""

from __future__ import annotations

import ctypes
import functools
import os

from ..errors import BackendUnavailableError, FormatError

__all__ = ["available", "bitcomp_decode", "bitcomp_encode", "gdeflate_decode", "gdeflate_encode"]

_GDEFLATE_DECOMPRESS = "_ZN6nvcomp8gdeflate13decompressCPUEPKPKvPKmmPKPvPmSA_"
_GDEFLATE_COMPRESS = "_ZN6nvcomp8gdeflate11compressCPUEPKPKvPKmmmPKPvPmi"
_GDEFLATE_BOUND = "_ZN6nvcomp8gdeflate32compressCPUGetMaxOutputChunkSizeEmPm"
GDEFLATE_CPU_MAX_CHUNK = 1 << 16  # nvCOMP's CPU GDeflate compressor takes chunks of at most 64 KiB
_BITCOMP_TYPES = {"|u1": 0, "|i1": 1, "<u2": 2, "<i2": 3, "<u4": 4, "<i4": 5, "<u8": 6, "<i8": 7,
                  "<f2": 2, "<f4": 4, "<f8": 6}  # lossless: floats are coded as words of their width
_P = ctypes.c_void_p
_SZ = ctypes.c_size_t


# argtypes as in the headers (restype None: the C++ functions return void).
_GDEFLATE_API = {
    _GDEFLATE_DECOMPRESS: [_P, _P, _SZ, _P, _P, _P],
    _GDEFLATE_COMPRESS: [_P, _P, _SZ, _SZ, _P, _P, ctypes.c_int],
    _GDEFLATE_BOUND: [_SZ, _P],
}
# (argtypes, restype) from include/nvcomp/native/bitcomp.h: enums are C ints, handles and buffers pointers.
_BITCOMP_API = {
    "bitcompCreatePlan": ([_P, _SZ, ctypes.c_int, ctypes.c_int, ctypes.c_int], ctypes.c_int),
    "bitcompCreatePlanFromCompressedData": ([_P, _P], ctypes.c_int),
    "bitcompDestroyPlan": ([_P], ctypes.c_int),
    "bitcompHostUncompress": ([_P, _P, _P], ctypes.c_int),
    "bitcompHostCompressLossless": ([_P, _P, _P], ctypes.c_int),
    "bitcompGetUncompressedSize": ([_P, _P], ctypes.c_int),
    "bitcompGetCompressedSize": ([_P, _P], ctypes.c_int),
    "bitcompMaxBuflen": ([_SZ], _SZ),
}


@functools.cache
def _libs():
    try:
        import nvidia.libnvcomp as libnvcomp
    except ImportError as exc:
        raise BackendUnavailableError(
            "gdeflate and bitcomp run on the CPU through nvCOMP's host libraries: pip install "
            "nvidia-libnvcomp-cu12 (or cupycodec[cu12]/[cu13]); no GPU is needed") from exc
    from ..backends import _nvcomp_lib

    lib = _nvcomp_lib.library()  # the 6.x version gate: the mangled names below are 6.x's
    cpu = ctypes.CDLL(os.path.join(os.path.dirname(libnvcomp.__file__), "lib64", "libnvcomp_cpu.so.6"),
                      mode=ctypes.RTLD_LOCAL)
    for name, args in _GDEFLATE_API.items():
        fn = getattr(cpu, name)
        fn.argtypes, fn.restype = args, None
    for name, (args, res) in _BITCOMP_API.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib, cpu


@functools.cache
def available() -> bool:
    try:
        _libs()
        return True
    except (BackendUnavailableError, OSError, AttributeError):
        return False


def _addr(buf) -> int:
    """Address of a C-contiguous buffer (memoryview of bytes/bytearray/numpy memory)."""
    import numpy as np

    return np.frombuffer(buf, dtype=np.uint8).ctypes.data if len(buf) else 0


def gdeflate_decode(src: memoryview, dst: memoryview) -> None:
    if not len(src):  # nvCOMP would dereference the NULL address of an empty buffer
        raise FormatError("empty gdeflate chunk")
    _, cpu = _libs()
    in_ptr, in_n = (_P * 1)(_addr(src)), (_SZ * 1)(len(src))
    out_ptr, cap, got = (_P * 1)(_addr(dst)), (_SZ * 1)(len(dst)), (_SZ * 1)(0)
    getattr(cpu, _GDEFLATE_DECOMPRESS)(in_ptr, in_n, 1, out_ptr, cap, got)
    if got[0] != len(dst):
        raise FormatError(f"gdeflate stream decoded to {got[0]} bytes, the chunk table says {len(dst)}")


def gdeflate_encode(src: memoryview, level: int) -> bytes:
    # Outside these bounds compressCPU throws (or, for 0 bytes, divides by zero), which would kill the process.
    if len(src) > GDEFLATE_CPU_MAX_CHUNK:
        raise ValueError(f"nvCOMP's CPU GDeflate compressor takes chunks of at most 64 KiB; pass chunk_nbytes<="
                         f"{GDEFLATE_CPU_MAX_CHUNK} (or compress on a GPU)")
    if not len(src) or not 0 <= level <= 12:
        raise ValueError(f"nvCOMP's CPU GDeflate compressor takes 1 byte to 64 KiB at levels 0-12, got {len(src)} "
                         f"bytes at level {level}")
    _, cpu = _libs()
    bound = (_SZ * 1)(0)
    getattr(cpu, _GDEFLATE_BOUND)(len(src), bound)
    out = bytearray(bound[0])
    in_ptr, in_n = (_P * 1)(_addr(src)), (_SZ * 1)(len(src))
    out_ptr, got = (_P * 1)(_addr(memoryview(out))), (_SZ * 1)(0)
    getattr(cpu, _GDEFLATE_COMPRESS)(in_ptr, in_n, len(src), 1, out_ptr, got, level)
    return bytes(out[: got[0]])


def bitcomp_decode(src: memoryview, dst: memoryview) -> None:
    lib, _ = _libs()
    size = _SZ(0)
    if lib.bitcompGetUncompressedSize(_addr(src), ctypes.byref(size)) != 0 or size.value != len(dst):
        raise FormatError(f"bitcomp chunk header promises {size.value} bytes, the chunk table says {len(dst)}")
    handle = _P()
    status = lib.bitcompCreatePlanFromCompressedData(ctypes.byref(handle), _addr(src))
    if status != 0:
        raise FormatError(f"bitcomp chunk does not decode (bitcompResult {status})")
    try:
        status = lib.bitcompHostUncompress(handle, _addr(src), _addr(dst))
    finally:
        lib.bitcompDestroyPlan(handle)
    if status != 0:
        raise FormatError(f"bitcomp chunk does not decode (bitcompResult {status})")


def bitcomp_encode(src: memoryview, data_type: str, algorithm: int) -> bytes:
    lib, _ = _libs()
    handle = _P()
    status = lib.bitcompCreatePlan(ctypes.byref(handle), len(src), _BITCOMP_TYPES[data_type], 0, algorithm)
    if status != 0:
        raise ValueError(f"bitcomp cannot compress {len(src)} bytes as {data_type} (bitcompResult {status})")
    try:
        out = bytearray(lib.bitcompMaxBuflen(len(src)))
        status = lib.bitcompHostCompressLossless(handle, _addr(src), _addr(memoryview(out)))
        size = _SZ(0)
        if status == 0:
            status = lib.bitcompGetCompressedSize(_addr(memoryview(out)), ctypes.byref(size))
    finally:
        lib.bitcompDestroyPlan(handle)
    if status != 0:
        raise ValueError(f"bitcomp host compression failed (bitcompResult {status})")
    return bytes(out[: size.value])
