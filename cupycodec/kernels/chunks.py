"""CUDA kernels that move and check chunks: batched copies (packing, stored chunks) and nvCOMP status checks."""

from __future__ import annotations

import functools

import numpy as np

from .._cuda import external_stream, kernel_handle

# Pointer tables hold raw device addresses (unsigned long long). One launch copies every chunk of a batch; each
# chunk is split over `parts` blocks. With `pad` set the destination is zero-filled up to the next multiple of 16,
# which keeps the container's padding bytes deterministic without a separate memset.
_SOURCE = r"""
extern "C" __global__
void cupycodec_chunks_copy(const unsigned long long* __restrict__ src,
                           const unsigned long long* __restrict__ dst,
                           const unsigned long long* __restrict__ nbytes,
                           long long n_chunks, int parts, int pad)
{
    const long long chunk = (long long)blockIdx.x / parts;
    const int part = blockIdx.x % parts;
    if (chunk >= n_chunks) return;
    const unsigned char* s = (const unsigned char*)src[chunk];
    unsigned char* d = (unsigned char*)dst[chunk];
    const unsigned long long nb = nbytes[chunk];
    const unsigned long long end = pad ? ((nb + 15ull) & ~15ull) : nb;
    const bool vec = ((src[chunk] | dst[chunk]) & 15ull) == 0ull;
    const unsigned long long nvec = vec ? nb / 16ull : 0ull;
    const unsigned long long stride = (unsigned long long)blockDim.x * parts;
    const unsigned long long first = (unsigned long long)part * blockDim.x + threadIdx.x;
    for (unsigned long long i = first; i < nvec; i += stride)
        ((uint4*)d)[i] = ((const uint4*)s)[i];
    for (unsigned long long i = nvec * 16ull + first; i < end; i += stride)
        d[i] = i < nb ? s[i] : (unsigned char)0;
}

// err[0] counts bad chunks; err[1] keeps min((index << 16) | (status & 0xffff)) so the first bad chunk and its
// nvCOMP status survive (status 0 there means "decoded to the wrong size"). Errors accumulate until read.
extern "C" __global__
void cupycodec_chunks_check(const int* __restrict__ status,
                            const unsigned long long* __restrict__ actual,
                            const unsigned long long* __restrict__ expected,
                            long long n, long long index_base,
                            unsigned long long* err)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int st = status[i];
    if (st != 0 || (actual != 0 && actual[i] != expected[i])) {
        atomicAdd(&err[0], 1ull);
        const unsigned long long key = ((unsigned long long)(i + index_base) << 16) | ((unsigned)st & 0xffffu);
        atomicMin(&err[1], key);
    }
}
"""


@functools.cache
def _function(device: int, name: str):
    # Cached per device and name: RawModule.get_function costs ~8 us per call, a small decode's budget.
    import cupy  # lazy: importing this module must not import cupy

    return cupy.RawModule(code=_SOURCE, options=("--std=c++14",)).get_function(name)


def _ptr(x):
    """Kernel argument for a device array or a raw device address (an int)."""
    return np.uint64(x) if isinstance(x, (int, np.integer)) else x


def copy_parts(n: int, max_nbytes: int, threads: int = 256) -> int:
    """Blocks per chunk: enough for ~600 blocks in all (about 4 per SM) but at least 16 KiB of work each."""
    by_size = -(-max(int(max_nbytes), 1) // (threads * 16 * 4))
    return max(1, min(by_size, 1024, -(-600 // max(n, 1))))


def copy_args(src_ptrs, dst_ptrs, nbytes, *, n: int, max_nbytes: int, pad: bool) -> tuple:
    """(kernel name, grid, block, arguments) of :func:`copy_chunks`."""
    threads = 256
    parts = copy_parts(n, max_nbytes, threads)
    return "cupycodec_chunks_copy", n * parts, threads, (_ptr(src_ptrs), _ptr(dst_ptrs), _ptr(nbytes), np.int64(n),
                                                        np.int32(parts), np.int32(1 if pad else 0))


def check_args(status, actual, expected, err, *, n: int, index_base: int = 0) -> tuple:
    """(kernel name, grid, block, arguments) of :func:`check_statuses`."""
    return "cupycodec_chunks_check", -(-n // 256), 256, (
        _ptr(status), _ptr(actual) if actual is not None else np.uint64(0), _ptr(expected), np.int64(n),
        np.int64(index_base), _ptr(err))


@functools.cache
def handle(device: int, name: str) -> tuple:
    """The :func:`cupycodec._cuda.launch` handle of kernel ``name`` on ``device`` (for plans that launch per run)."""
    return kernel_handle(_function(device, name), device)


def copy_chunks(src_ptrs, dst_ptrs, nbytes, *, max_nbytes: int, pad: bool, stream=None, n: int | None = None) -> None:
    """Copy ``nbytes[i]`` bytes from ``src_ptrs[i]`` to ``dst_ptrs[i]`` (device uint64 arrays, or their device
    addresses with ``n`` given) in one launch."""
    n = int(src_ptrs.size) if n is None else int(n)
    if n == 0:
        return
    name, grid, block, args = copy_args(src_ptrs, dst_ptrs, nbytes, n=n, max_nbytes=max_nbytes, pad=pad)
    _launch(_function(_device(), name), (grid,), (block,), args, stream)


def check_statuses(status, actual, expected, err, *, index_base: int = 0, stream=None, n: int | None = None) -> None:
    """Accumulate bad chunks (status != 0 or actual size != expected) into ``err`` (device uint64[2]); arrays or
    device addresses (with ``n``)."""
    n = int(status.size) if n is None else int(n)
    if n == 0:
        return
    name, grid, block, args = check_args(status, actual, expected, err, n=n, index_base=index_base)
    _launch(_function(_device(), name), (grid,), (block,), args, stream)


def _device() -> int:
    import cupy

    return cupy.cuda.runtime.getDevice()


def _launch(kernel, grid, block, args, stream):
    """Launch on ``stream`` (None: CuPy's current stream; a cupy Stream; or a raw cudaStream_t int).

    Through CuPy's RawKernel call, for one-off launches; plans, which launch the same kernels on every run, use
    :func:`cupycodec._cuda.launch` (a ctypes ``cuLaunchKernel`` measured slower than CuPy's call on an H200 host,
    19 against 10 us, but CuPy's own driver binding with reused argument slots faster, 4.6 against 7.9 us).
    """
    if stream is not None:
        import cupy

        if isinstance(stream, int):
            if stream != cupy.cuda.get_current_stream().ptr:
                with external_stream(stream):
                    kernel(grid, block, args)
                return
        else:
            with stream:
                kernel(grid, block, args)
            return
    kernel(grid, block, args)
