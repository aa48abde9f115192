"""CUDA kernels splitting words into byte planes and merging them back. Reference: cupycodec.filters.byteplane."""

from __future__ import annotations

import functools

import numpy as np

from .._cuda import kernel_handle, launch

# One thread per word. Words are read native-endian (CuPy arrays are little-endian), rotated left by one bit when
# ROTATE (sign to the bottom, exponent to the top byte), and byte j of the plane layout is bits 8*(K-1-j).. of the
# rotated word: exactly split_planes/merge_planes. Planes live in one buffer, `stride` bytes apart.
_SOURCE = r"""
template <typename T, int K, bool ROTATE>
__device__ __forceinline__ void split_impl(const T* __restrict__ words, unsigned char* __restrict__ planes,
                                           long long n, long long stride, long long start = 0)
{
    for (long long i = start + (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        T w = words[i];
        if (ROTATE) w = (T)((w << 1) | (w >> (8 * K - 1)));
        #pragma unroll
        for (int j = 0; j < K; ++j) planes[j * stride + i] = (unsigned char)(w >> (8 * (K - 1 - j)));
    }
}

template <typename T, int K, bool ROTATE>
__device__ __forceinline__ void merge_impl(const unsigned char* __restrict__ planes, T* __restrict__ words,
                                           long long n, long long stride, long long start = 0)
{
    for (long long i = start + (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        T w = 0;
        #pragma unroll
        for (int j = 0; j < K; ++j) w = (T)((w << 8) | (T)planes[j * stride + i]);
        if (ROTATE) w = (T)((w >> 1) | (w << (8 * K - 1)));
        words[i] = w;
    }
}

// Vectorized forms: a thread moves 8 words, i.e. one 16-byte load per 2 bytes of word size, and one 8-byte store
// per plane (coalesced: a warp writes 256 contiguous bytes of each plane). Words must be 16-byte aligned and planes
// 8-byte aligned; the launcher falls back to the scalar kernels otherwise. Words from n - n % 8 on go scalar.
template <typename T, int K, bool ROTATE>
__device__ __forceinline__ void split_vec(const T* __restrict__ words, unsigned char* __restrict__ planes,
                                          long long n, long long stride)
{
    const long long nvec = n / 8;
    for (long long v = (long long)blockIdx.x * blockDim.x + threadIdx.x; v < nvec;
         v += (long long)gridDim.x * blockDim.x) {
        __align__(16) T x[8];
        const uint4* src = reinterpret_cast<const uint4*>(words + v * 8);
        #pragma unroll
        for (int q = 0; q < K / 2; ++q) reinterpret_cast<uint4*>(x)[q] = src[q];
        #pragma unroll
        for (int e = 0; e < 8; ++e) if (ROTATE) x[e] = (T)((x[e] << 1) | (x[e] >> (8 * K - 1)));
        #pragma unroll
        for (int j = 0; j < K; ++j) {
            unsigned long long out = 0ull;
            #pragma unroll
            for (int e = 0; e < 8; ++e)
                out |= (unsigned long long)(unsigned char)(x[e] >> (8 * (K - 1 - j))) << (8 * e);
            *reinterpret_cast<unsigned long long*>(planes + j * stride + v * 8) = out;
        }
    }
    split_impl<T, K, ROTATE>(words, planes, n, stride, nvec * 8);
}

template <typename T, int K, bool ROTATE>
__device__ __forceinline__ void merge_vec(const unsigned char* __restrict__ planes, T* __restrict__ words,
                                          long long n, long long stride)
{
    const long long nvec = n / 8;
    for (long long v = (long long)blockIdx.x * blockDim.x + threadIdx.x; v < nvec;
         v += (long long)gridDim.x * blockDim.x) {
        __align__(16) T x[8];
        #pragma unroll
        for (int e = 0; e < 8; ++e) x[e] = 0;
        #pragma unroll
        for (int j = 0; j < K; ++j) {
            const unsigned long long in = *reinterpret_cast<const unsigned long long*>(planes + j * stride + v * 8);
            #pragma unroll
            for (int e = 0; e < 8; ++e) x[e] = (T)((x[e] << 8) | (T)((in >> (8 * e)) & 0xffull));
        }
        #pragma unroll
        for (int e = 0; e < 8; ++e) if (ROTATE) x[e] = (T)((x[e] >> 1) | (x[e] << (8 * K - 1)));
        uint4* dst = reinterpret_cast<uint4*>(words + v * 8);
        #pragma unroll
        for (int q = 0; q < K / 2; ++q) dst[q] = reinterpret_cast<const uint4*>(x)[q];
    }
    merge_impl<T, K, ROTATE>(planes, words, n, stride, nvec * 8);
}

#define CUPYCODEC_BYTEPLANE(K, T)                                                                            \
extern "C" __global__ void cupycodec_byteplane_split_u##K(const T* w, unsigned char* p, long long n,        \
                                                           long long s, int rot)                          \
{ if (rot) split_impl<T, K, true>(w, p, n, s); else split_impl<T, K, false>(w, p, n, s); }                  \
extern "C" __global__ void cupycodec_byteplane_merge_u##K(const unsigned char* p, T* w, long long n,        \
                                                           long long s, int rot)                          \
{ if (rot) merge_impl<T, K, true>(p, w, n, s); else merge_impl<T, K, false>(p, w, n, s); }                  \
extern "C" __global__ void cupycodec_byteplane_splitv_u##K(const T* w, unsigned char* p, long long n,       \
                                                            long long s, int rot)                         \
{ if (rot) split_vec<T, K, true>(w, p, n, s); else split_vec<T, K, false>(w, p, n, s); }                    \
extern "C" __global__ void cupycodec_byteplane_mergev_u##K(const unsigned char* p, T* w, long long n,       \
                                                            long long s, int rot)                         \
{ if (rot) merge_vec<T, K, true>(p, w, n, s); else merge_vec<T, K, false>(p, w, n, s); }

CUPYCODEC_BYTEPLANE(2, unsigned short)
CUPYCODEC_BYTEPLANE(4, unsigned int)
CUPYCODEC_BYTEPLANE(8, unsigned long long)
"""

_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


@functools.cache
def _module():
    import cupy  # lazy: importing this module must not import cupy

    return cupy.RawModule(code=_SOURCE, options=("--std=c++14",))


@functools.cache
def _function(device: int, name: str):  # get_function costs ~8 us a call: cache it per device
    return _module().get_function(name)


def _grid(n: int) -> tuple[int]:
    return (max(1, min(-(-n // 256), 65535 * 8)),)


def _kernel(op: str, k: int, words_ptr: int, planes_ptr: int, stride: int, device: int | None = None):
    """The vectorized kernel when the pointers allow it, else the scalar one (same results)."""
    vec = words_ptr % 16 == 0 and planes_ptr % 8 == 0 and stride % 8 == 0
    if device is None:
        import cupy

        device = cupy.cuda.runtime.getDevice()
    name = f"cupycodec_byteplane_{op}{'v' if vec else ''}_u{k}"
    return _function(device, name), vec


def merge_launch(planes_ptr: int, stride: int, words_ptr: int, n: int, k: int, rotate: bool, device: int):
    """(launch handle, grid, block, args) merging ``k`` planes of ``n`` bytes at ``planes_ptr`` (``stride`` apart) into
    ``n`` native-endian words at ``words_ptr``: built once, launched by a decode plan on each run."""
    kern, vec = _kernel("merge", k, words_ptr, planes_ptr, stride, device)
    grid = _grid(-(-n // 8) if vec else n)
    return kernel_handle(kern, device), grid[0], 256, (np.uint64(planes_ptr), np.uint64(words_ptr), np.int64(n),
                                                       np.int64(stride), np.int32(1 if rotate else 0))


def plane_stride(n: int) -> int:
    """Bytes between planes in the shared buffer: 256-aligned so every plane suits nvCOMP's alignment."""
    return (n + 255) // 256 * 256


def split(raw, k: int, rotate: bool):
    """Device twin of split_planes for native-endian words: ``raw`` uint8 (n*k bytes) -> k plane views of n bytes."""
    import cupy

    if k not in _UINT:
        raise ValueError(f"byteplane words are 2, 4 or 8 bytes, got {k}")
    if not raw.flags.c_contiguous or raw.dtype != np.uint8 or raw.size % k:
        raise ValueError("expected a C-contiguous uint8 array whose size is a multiple of the word size")
    n = raw.size // k
    stride = plane_stride(n)
    planes = cupy.empty(k * stride, dtype=np.uint8)
    if n:
        words = raw.view(_UINT[k])
        if words.data.ptr % k:  # misaligned words: copy to an aligned buffer first
            words = words.copy()
        kern, vec = _kernel("split", k, words.data.ptr, planes.data.ptr, stride)
        grid = _grid(-(-n // 8) if vec else n)
        kern(grid, (256,), (words, planes, np.int64(n), np.int64(stride), np.int32(1 if rotate else 0)))
    return [planes[j * stride : j * stride + n] for j in range(k)]


def merge(planes: list, k: int, rotate: bool, spec, out=None):
    """Device twin of merge_planes: k plane arrays (n bytes each) -> native-endian words of ``spec``'s storage dtype.

    When the planes sit at a common stride (as :func:`split` and the decoder lay them out) no copy is made.
    """
    import cupy

    from ..dtypes import storage_dtype

    n = planes[0].size if planes else 0
    dtype = storage_dtype(spec.dtype)
    if out is None:
        out = cupy.empty(spec.shape, dtype=dtype)
    if n == 0:
        return out
    ptrs = [p.data.ptr for p in planes]
    stride = ptrs[1] - ptrs[0] if k > 1 else 0
    if k > 1 and (stride <= 0 or any(ptrs[j + 1] - ptrs[j] != stride for j in range(k - 1))):
        stride = plane_stride(n)
        packed = cupy.empty(k * stride, dtype=np.uint8)
        for j, p in enumerate(planes):
            packed[j * stride : j * stride + n] = p
        ptrs = [packed.data.ptr]
        planes = [packed]  # keep it alive until the launch is enqueued
    words = out.reshape(-1).view(_UINT[k])
    device = cupy.cuda.runtime.getDevice()
    h, grid, block, args = merge_launch(ptrs[0], stride, words.data.ptr, n, k, rotate, device)
    launch(h, grid, block, args, device, cupy.cuda.get_current_stream().ptr)
    return out
