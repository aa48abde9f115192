"""A fused INT8 dequantize-GEMV for small batches: ``y = x @ dequantize(codes, scales).T (+ bias)``.

Reference: ``reference.dequantize_int8`` to float32, then a float64 matrix product (tests compare with a tolerance:
the kernel sums in float32 in its own order, as every GEMM does). Importing this module does not import CuPy.

Decode at batch 1-8 is bound by reading the weights (the torch integration uses this kernel up to M = 8). This
kernel reads each INT8 code once (half the bytes of bf16 weights, and no dequantized copy written and read back),
multiplies in float32 and writes bf16, fp16 or fp32:

* W warps per output row n (W = 1, 2, 4 or 8, split K; partial sums meet in shared memory), a block of 8 warps per
  8 / W rows; a lane takes 16 codes with one 16-byte load and issues 4 such loads before using any (8 measured
  slower on an H200), so that bytes are in flight when a matrix has few rows; activations (M rows of K,
  bf16/fp16/fp32) come through the read-only cache (a row of x is reused by every warp);
* codes become floats by a byte permute under the exponent of 2^23 and one subtraction (exact), not by I2F;
* per-channel scales multiply the row's sum once at the end; per-group scales (group size a multiple of 16, so a
  16-code vector never straddles two groups) multiply each vector's partial sum;
* M (1..16) partial sums live in registers; a warp shuffle reduces them; lane 0 adds the bias in float32 and rounds
  once to the output type (round to nearest even).

The launcher takes raw device addresses and a stream, so any framework can call it (the torch integration does).
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["MAX_M", "gemv_int8", "supported"]

MAX_M = 16
_THREADS = 256

_SOURCE = r"""
typedef long long i64;
typedef unsigned long long u64;

__device__ __forceinline__ float cc_bf16_to_f(unsigned short b) { return __uint_as_float(((unsigned)b) << 16); }
__device__ __forceinline__ unsigned short cc_f_to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);  /* round to nearest even */
    return (unsigned short)(u >> 16);
}
__device__ __forceinline__ float cc_f16_to_f(unsigned short h) {
    float f; asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ unsigned short cc_f_to_f16(float f) {
    unsigned short h; asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(h) : "f"(f)); return h;
}

struct cc_bf16 { typedef unsigned short T;
    __device__ static float load(const T* p) { return cc_bf16_to_f(p[0]); }
    __device__ static void load16(const T* p, float* v) {
        const uint4 a = reinterpret_cast<const uint4*>(p)[0], b = reinterpret_cast<const uint4*>(p)[1];
        const unsigned w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
        #pragma unroll
        for (int i = 0; i < 8; ++i) { v[2 * i] = __uint_as_float(w[i] << 16); v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u); }
    }
    __device__ static T store(float f) { return cc_f_to_bf16(f); }
};
struct cc_f16 { typedef unsigned short T;
    __device__ static float load(const T* p) { return cc_f16_to_f(p[0]); }
    __device__ static void load16(const T* p, float* v) {
        const uint4 a = reinterpret_cast<const uint4*>(p)[0], b = reinterpret_cast<const uint4*>(p)[1];
        const unsigned w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
        #pragma unroll
        for (int i = 0; i < 8; ++i) {
            v[2 * i] = cc_f16_to_f((unsigned short)(w[i] & 0xffffu)); v[2 * i + 1] = cc_f16_to_f((unsigned short)(w[i] >> 16));
        }
    }
    __device__ static T store(float f) { return cc_f_to_f16(f); }
};
struct cc_f32 { typedef float T;
    __device__ static float load(const T* p) { return p[0]; }
    __device__ static void load16(const T* p, float* v) {
        #pragma unroll
        for (int q = 0; q < 4; ++q) {
            const float4 a = reinterpret_cast<const float4*>(p)[q];
            v[4 * q] = a.x; v[4 * q + 1] = a.y; v[4 * q + 2] = a.z; v[4 * q + 3] = a.w;
        }
    }
    __device__ static T store(float f) { return f; }
};

/* y[m, n] = sum_k x[m, k] * code[n, k] * scale(n, k) + bias[n]; x is M x K (row stride ldx elements), codes N x K,
   scales per row (group == 0) or per group of `group` codes (N x ngroups); K % 16 == 0 and every row of x and of the
   codes 16-byte aligned (the launcher checks). W warps share a row (split K, partial sums meet in shared memory),
   so that a matrix of few rows still keeps every SM busy; a block of 8 warps takes 8 / W rows at a time. */
template <class X, int MM, int W>
__device__ void cc_gemv(const typename X::T* __restrict__ x, i64 ldx, const signed char* __restrict__ q,
                        const float* __restrict__ scale, const typename X::T* __restrict__ bias,
                        typename X::T* __restrict__ y, int M, i64 K, i64 N, i64 group, i64 ngroups) {
    constexpr int U = 4;  /* 16-byte loads a lane issues before using any (8 measured slower on an H200) */
    constexpr int RPB = 8 / W;
    __shared__ float part[8][MM];
    const int lane = threadIdx.x & 31, wib = threadIdx.x >> 5;
    const int r_local = wib / W, slice = wib % W;
    const i64 step = (i64)32 * 16 * W;
    const i64 row_groups = (N + RPB - 1) / RPB;
    for (i64 g = blockIdx.x; g < row_groups; g += gridDim.x) {  /* uniform per block: __syncthreads below */
        const i64 n = g * RPB + r_local;
        float acc[MM];
        #pragma unroll
        for (int m = 0; m < MM; ++m) acc[m] = 0.0f;
        if (n < N) {
            const signed char* row = q + n * K;
            for (i64 k0 = ((i64)slice * 32 + lane) * 16; k0 < K; k0 += step * U) {
                uint4 c[U];
                #pragma unroll
                for (int u = 0; u < U; ++u) {
                    const i64 k = k0 + u * step;
                    c[u] = k < K ? __ldg(reinterpret_cast<const uint4*>(row + k)) : make_uint4(0u, 0u, 0u, 0u);
                }
                #pragma unroll
                for (int u = 0; u < U; ++u) {
                    const i64 k = k0 + u * step;
                    if (k < K) {
                        /* codes to floats without I2F (a quarter-rate instruction that bounded the kernel):
                           byte b ^ 0x80 = code + 128 goes under the exponent of 2^23 (one PRMT), and subtracting
                           2^23 + 128 leaves the code, exactly */
                        const unsigned cw[4] = {c[u].x ^ 0x80808080u, c[u].y ^ 0x80808080u,
                                                c[u].z ^ 0x80808080u, c[u].w ^ 0x80808080u};
                        float w[16];
                        #pragma unroll
                        for (int e = 0; e < 16; ++e)
                            w[e] = __uint_as_float(__byte_perm(cw[e >> 2], 0x4B000000u, 0x7540u | (e & 3))) - 8388736.0f;
                        const float gs = group ? __ldg(scale + n * ngroups + k / group) : 1.0f;
                        #pragma unroll
                        for (int m = 0; m < MM; ++m) {
                            if (m < M) {
                                float v[16];
                                X::load16(x + m * ldx + k, v);
                                float s = 0.0f;
                                #pragma unroll
                                for (int e = 0; e < 16; ++e) s = fmaf(w[e], v[e], s);
                                acc[m] = fmaf(s, gs, acc[m]);
                            }
                        }
                    }
                }
            }
        }
        #pragma unroll
        for (int m = 0; m < MM; ++m) {
            #pragma unroll
            for (int o = 16; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], o);
        }
        if (W > 1) {
            if (lane == 0) {
                #pragma unroll
                for (int m = 0; m < MM; ++m) part[wib][m] = acc[m];
            }
            __syncthreads();
            if (lane == 0 && slice == 0) {
                #pragma unroll
                for (int m = 0; m < MM; ++m) {
                    float t = part[wib][m];
                    #pragma unroll
                    for (int s = 1; s < W; ++s) t += part[wib + s][m];
                    acc[m] = t;
                }
            }
            __syncthreads();  /* part is rewritten by the next row group */
        }
        if (lane == 0 && slice == 0 && n < N) {
            const float cs = group ? 1.0f : __ldg(scale + n);
            const float b = bias ? X::load(bias + n) : 0.0f;
            #pragma unroll
            for (int m = 0; m < MM; ++m)
                if (m < M) y[(i64)m * N + n] = X::store(fmaf(acc[m], cs, b));
        }
    }
}

#define CC_GEMV(NAME, X, MM, W)                                                                                     \
extern "C" __global__ void __launch_bounds__(256) cupycodec_gemv_int8_##NAME##_m##MM##_w##W(                        \
    const X::T* x, i64 ldx, const signed char* q, const float* scale, const X::T* bias, X::T* y, int M, i64 K,      \
    i64 N, i64 group, i64 ngroups) {                                                                               \
    cc_gemv<X, MM, W>(x, ldx, q, scale, bias, y, M, K, N, group, ngroups);                                         \
}
"""

_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4}
_SUFFIX = {"BF16": "bf16", "F16": "f16", "F32": "f32"}
_X = {"BF16": "cc_bf16", "F16": "cc_f16", "F32": "cc_f32"}


@functools.cache
def _function(device: int, dtype_name: str, mm: int, w: int):
    """The kernel for one (activation dtype, M bound, warps per row), compiled on first use (one instance per module:
    a model's shapes need a few of the 60, and each compiles in well under a second)."""
    import cupy  # lazy: importing this module must not import cupy

    suffix = _SUFFIX[dtype_name]
    code = f"{_SOURCE}\nCC_GEMV({suffix}, {_X[dtype_name]}, {mm}, {w})\n"
    with cupy.cuda.Device(device):
        mod = cupy.RawModule(code=code, options=("--std=c++14",))
        return mod.get_function(f"cupycodec_gemv_int8_{suffix}_m{mm}_w{w}")


def warps_per_row(n: int, k: int, sm_count: int) -> int:
    """W for an N x K matrix: enough warps for half of every SM's warp slots (32 of 64 on Hopper), but no more
    than K's 512-code steps give work to (a warp's lanes read 512 codes per step)."""
    w = 1
    while w < 8 and n * w < 32 * sm_count and 512 * 2 * w <= k:
        w *= 2
    return w


@functools.cache
def _sm_count(device: int) -> int:
    import cupy

    return int(cupy.cuda.runtime.deviceGetAttribute(cupy.cuda.runtime.cudaDevAttrMultiProcessorCount, device))


def supported(dtype_name: str, m: int, k: int, granularity: str, group_size: int | None) -> bool:
    """Whether :func:`gemv_int8` takes this case (else dequantize and use a GEMM): bf16/fp16/fp32 activations,
    1 <= M <= 16, K a multiple of 16, channel scales along the output axis or groups of a multiple of 16 codes."""
    if dtype_name not in _ITEMSIZE or not 1 <= m <= MAX_M or k % 16:
        return False
    if granularity == "channel":
        return True
    return granularity == "group" and group_size is not None and group_size % 16 == 0


def gemv_int8(x_ptr: int, ldx: int, codes_ptr: int, scales_ptr: int, bias_ptr: int, y_ptr: int, *, m: int, k: int,
              n: int, dtype_name: str, granularity: str, group_size: int | None, device: int, stream_ptr: int,
              warps: int | None = None) -> None:
    """Launch ``y[m, n] = sum_k x[m, k] * codes[n, k] * scale + bias[n]`` on ``stream_ptr`` (never waits).

    ``x``: M rows of K activations of ``dtype_name`` with row stride ``ldx`` elements; ``codes``: N x K int8
    (row-major); ``scales``: float32, N (channel) or N x ceil(K / group_size) (group); ``bias``: N values of
    ``dtype_name`` or 0; ``y``: M x N of ``dtype_name``. Every row start 16-byte aligned; see :func:`supported`.
    ``warps``: warps per row (1, 2, 4 or 8; default :func:`warps_per_row`), a parameter for tests and benchmarks.
    """
    from .._cuda import launching_on

    if not supported(dtype_name, m, k, granularity, group_size):
        raise ValueError(f"gemv_int8 does not take M={m}, K={k}, {dtype_name}, {granularity} (see supported())")
    isz = _ITEMSIZE[dtype_name]
    if (x_ptr | codes_ptr) % 16 or (ldx * isz) % 16:
        raise ValueError("gemv_int8 needs 16-byte aligned activations and codes (rows included)")
    mm = next(v for v in (1, 2, 4, 8, 16) if v >= m)
    group = group_size if granularity == "group" else 0
    ngroups = -(-k // group) if group else 0
    if warps not in (None, 1, 2, 4, 8):
        raise ValueError(f"warps per row must be 1, 2, 4 or 8, got {warps!r}")
    sms = _sm_count(device)
    w = warps_per_row(n, k, sms) if warps is None else warps
    rows_per_block = _THREADS // 32 // w
    grid = max(1, -(-n // rows_per_block))  # a block per row group: the hardware balances them as they finish
    fn = _function(device, dtype_name, mm, w)
    with launching_on(device, stream_ptr):
        fn((grid,), (_THREADS,), (np.uint64(x_ptr), np.int64(ldx), np.uint64(codes_ptr), np.uint64(scales_ptr),
                                  np.uint64(bias_ptr), np.uint64(y_ptr), np.int32(m), np.int64(k), np.int64(n),
                                  np.int64(group), np.int64(ngroups)))
