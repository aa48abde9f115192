"""CUDA kernels that move and check chunks: batched copies (packing, stored chunks) and nvCOMP status checks."""

from __future__ import annotations

import functools

import numpy as np

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
def _module():
    import cupy  # lazy: importing this module must not import cupy

    return cupy.RawModule(code=_SOURCE, options=("--std=c++14",))


def copy_chunks(src_ptrs, dst_ptrs, nbytes, *, max_nbytes: int, pad: bool, stream=None) -> None:
    """Copy ``nbytes[i]`` bytes from ``src_ptrs[i]`` to ``dst_ptrs[i]`` (device uint64 arrays) in one launch."""
    n = int(src_ptrs.size)
    if n == 0:
        return
    threads = 256
    parts = max(1, min(64, -(-max(int(max_nbytes), 1) // (threads * 16 * 8))))
    kernel = _module().get_function("cupycodec_chunks_copy")
    _launch(kernel, (n * parts,), (threads,), (src_ptrs, dst_ptrs, nbytes, np.int64(n), np.int32(parts),
                                                 np.int32(1 if pad else 0)), stream)


def check_statuses(status, actual, expected, err, *, index_base: int = 0, stream=None) -> None:
    """Accumulate bad chunks (status != 0 or actual size != expected) into ``err`` (device uint64[2])."""
    n = int(status.size)
    if n == 0:
        return
    kernel = _module().get_function("cupycodec_chunks_check")
    args = (status, actual if actual is not None else np.uint64(0), expected, np.int64(n), np.int64(index_base), err)
    _launch(kernel, (-(-n // 256),), (256,), args, stream)


def _launch(kernel, grid, block, args, stream):
    if stream is None:
        kernel(grid, block, args)
    else:
        import cupy

        with cupy.cuda.ExternalStream(stream) if isinstance(stream, int) else stream:
            kernel(grid, block, args)
