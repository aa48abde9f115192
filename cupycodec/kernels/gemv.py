"""A fused INT8 dequantize-GEMV for small batches: ``y = x @ dequantize(codes, scales).T (+ bias)``.

Reference: ``reference.dequantize_int8`` to float32, then a float64 matrix product (tests compare with a tolerance:
the kernel sums in float32 in its own order, as every GEMM does). Importing this module does not import CuPy.

Decode at batch 1-16 is bound by reading the weights (the torch integration uses these kernels up to M = 16). Both
kernels read each INT8 code once (half the bytes of bf16 weights, and no dequantized copy written and read back),
sum in float32 and write bf16, fp16 or fp32. Two kernels, because the faster one does not take every case:

* ``mma`` (bf16/fp16 activations, sm_80+, channel scales or groups of a multiple of 64): codes become bf16/fp16
  exactly by byte permutes and one packed fused multiply-add per two codes, and tensor cores (mma.sync m16n8k16)
  multiply them with the activations, which go to the tensor cores as loaded. A warp takes 16 rows; M <= 8 costs
  what M = 1 does, M <= 16 little more. W warps per 16-row tile split K. The codes are loaded by
  ``ld.global.nc.L1::no_allocate.L2::256B``: no L1 place for bytes read once, and a 256-byte L2 prefetch for the
  row that the tile's warps read side by side (4-9 % faster than ``__ldg`` on an H200, RESULTS.md).
* ``fma`` (everything else: fp32 activations, groups of 16-48): W warps per output row n (W = 1, 2, 4 or 8, split
  K; partial sums meet in shared memory), a block of 8 warps per 8 / W rows; a lane takes 16 codes with one
  16-byte load and issues 4 such loads before using any (8 measured slower on an H200); activations come through
  the read-only cache; codes become floats by a byte permute under the exponent of 2^23 and one subtraction (exact),
  not by I2F; M (1..16) partial sums live in registers and a warp shuffle reduces them.

In both, per-channel scales multiply a row's sum once at the end and per-group scales each group's partial sum;
the bias is added in float32 and the result rounded once to the output type (round to nearest even).

The launcher takes raw device addresses and a stream, so any framework can call it (the torch integration does).
Tried on an H200 and not kept (benchmarks/RESULTS.md): a bulk-copy (TMA) variant, a tiled code layout, a
programmatic dependent launch (blocks scheduled while the kernel before finishes; within 1 % of a plain launch
over a Llama block's layers), and with it an L2 prefetch of each block's first codes (12-16 % slower), and a
stream-K split (one wave, equal contiguous step ranges per warp, partial tiles summed in a workspace; 10-35 % slower
at M <= 8: the partial last wave costs 11008x4096 about 5 %, the loss of a tile's side-by-side row reads more).
"""

from __future__ import annotations

import functools

import numpy as np

from .._cuda import kernel_handle, launch

__all__ = ["KERNELS", "MAX_M", "gemv_int8", "mma_supported", "supported"]

MAX_M = 16
MAX_WARPS = 16  # warps per tile of the tensor-core kernel (the FMA kernel's: 1, 2, 4 or 8)
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

/* ---- Tensor-core variant (bf16/fp16 activations, sm_80+): codes become bf16/fp16 exactly (an int8 has 8
   significant bits) and mma.sync m16n8k16 multiplies them with the activations, products exact, sums in float32.
   A warp takes a tile of 16 rows; lane (g = lane / 4, t = lane % 4) loads 16 codes of rows g and g + 8 at
   k0 + 16 t and, if g < M, 16 activations of row g at the same k: one 64-k step of the tile is four mma steps j,
   step j using bytes 4j..4j+3 of every lane's 16 (the mma's k order is any order A and B share). The 16 rows by
   M <= 8 (MT = 1) or <= 16 (MT = 2) outputs live in the mma's accumulator fragment. */
struct cc_mma_bf16 {
    /* codes c (4 bytes) to two bf16x2: 128 + (c & 127) under the exponent of 2^7, minus 128, or 256 for c < 0 */
    __device__ static void pairs(unsigned w, unsigned& p01, unsigned& p23) {
        const unsigned m = w & 0x7f7f7f7fu, s = w & 0x80808080u;
        const unsigned x01 = __byte_perm(m, 0x43434343u, 0x4140), x23 = __byte_perm(m, 0x43434343u, 0x4342);
        const unsigned s01 = __byte_perm(s, 0xc3c3c3c3u, 0x4140), s23 = __byte_perm(s, 0xc3c3c3c3u, 0x4342);
        asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(p01) : "r"(x01), "r"(0x3f803f80u), "r"(s01));
        asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(p23) : "r"(x23), "r"(0x3f803f80u), "r"(s23));
    }
    __device__ static void mma(float* d, const unsigned* a, unsigned b0, unsigned b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};" : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};
struct cc_mma_f16 {
    /* codes c to two f16x2: c + 128 under the exponent of 2^10 (1024 + c + 128), minus 1152 */
    __device__ static void pairs(unsigned w, unsigned& p01, unsigned& p23) {
        const unsigned u = w ^ 0x80808080u;
        const unsigned x01 = __byte_perm(u, 0x64646464u, 0x4140), x23 = __byte_perm(u, 0x64646464u, 0x4342);
        asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(p01) : "r"(x01), "r"(0x3c003c00u), "r"(0xe480e480u));
        asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(p23) : "r"(x23), "r"(0x3c003c00u), "r"(0xe480e480u));
    }
    __device__ static void mma(float* d, const unsigned* a, unsigned b0, unsigned b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};" : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

/* One 64-k step of a warp's 16-row tile: lane (g, t) holds codes c0 (row g) and c1 (row g + 8) at k .. k + 15 and
   the activations of rows g (xa) and g + 8 (xb, MT = 2) at the same k; with GROUP, the step's partial sums are
   scaled by the rows' group scales (group gi) before they join acc. */
template <class C, int MT, bool GROUP>
__device__ __forceinline__ void cc_tc_step(float (*acc)[4], const uint4 c0, const uint4 c1, const uint4* xa,
                                           const uint4* xb, const float* __restrict__ scale, bool ok0, bool ok1,
                                           i64 r0, i64 r1, i64 ngroups, i64 gi) {
    const unsigned cw0[4] = {c0.x, c0.y, c0.z, c0.w};
    const unsigned cw1[4] = {c1.x, c1.y, c1.z, c1.w};
    const unsigned xw0[8] = {xa[0].x, xa[0].y, xa[0].z, xa[0].w, xa[1].x, xa[1].y, xa[1].z, xa[1].w};
    float part_acc[MT][4];
    float (*d)[4] = GROUP ? part_acc : acc;
    if (GROUP) {
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) { d[mt][0] = d[mt][1] = d[mt][2] = d[mt][3] = 0.0f; }
    }
    #pragma unroll
    for (int j = 0; j < 4; ++j) {
        unsigned a[4];
        C::pairs(cw0[j], a[0], a[2]);  /* row g: k 4j, 4j+1 then 4j+2, 4j+3 */
        C::pairs(cw1[j], a[1], a[3]);  /* row g + 8 */
        C::mma(d[0], a, xw0[2 * j], xw0[2 * j + 1]);
        if (MT == 2) {
            const unsigned xw1[8] = {xb[0].x, xb[0].y, xb[0].z, xb[0].w, xb[1].x, xb[1].y, xb[1].z, xb[1].w};
            C::mma(d[MT - 1], a, xw1[2 * j], xw1[2 * j + 1]);
        }
    }
    if (GROUP) {
        const float s0 = ok0 ? __ldg(scale + r0 * ngroups + gi) : 0.0f;
        const float s1 = ok1 ? __ldg(scale + r1 * ngroups + gi) : 0.0f;
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            acc[mt][0] = fmaf(d[mt][0], s0, acc[mt][0]); acc[mt][1] = fmaf(d[mt][1], s0, acc[mt][1]);
            acc[mt][2] = fmaf(d[mt][2], s1, acc[mt][2]); acc[mt][3] = fmaf(d[mt][3], s1, acc[mt][3]);
        }
    }
}

/* The W warps of a tile add their fragments (shared memory), and slice 0 scales, adds the bias and stores. */
template <class X, int MT, int W, bool GROUP>
__device__ __forceinline__ void cc_tc_finish(float (*acc)[4], float (*part)[32][4 * MT], int wib, int lane,
                                             int slice, int t, bool ok0, bool ok1, i64 r0, i64 r1,
                                             const float* __restrict__ scale, const typename X::T* __restrict__ bias,
                                             typename X::T* __restrict__ y, int M, i64 N) {
    if (W > 1) {
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt)
            #pragma unroll
            for (int e = 0; e < 4; ++e) part[wib][lane][4 * mt + e] = acc[mt][e];
        __syncthreads();
        if (slice == 0) {
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                #pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float v = part[wib][lane][4 * mt + e];
                    #pragma unroll
                    for (int s = 1; s < W; ++s) v += part[wib + s][lane][4 * mt + e];
                    acc[mt][e] = v;
                }
        }
        __syncthreads();  /* part is rewritten by the next tile group */
    }
    if (slice == 0) {
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
            const bool ok = e < 2 ? ok0 : ok1;
            const i64 n = e < 2 ? r0 : r1;
            if (ok) {
                const float cs = GROUP ? 1.0f : __ldg(scale + n);
                const float b = bias ? X::load(bias + n) : 0.0f;
                #pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const int m = 8 * mt + 2 * t + (e & 1);
                    if (m < M) y[(i64)m * N + n] = X::store(fmaf(acc[mt][e], cs, b));
                }
            }
        }
    }
}

/* 16 codes through the read-only path, without a place in L1 (each code is read once) and with a 256-byte L2
   prefetch (the W warps of a tile read a row's 64-byte steps side by side, so the rest of the line is theirs) */
__device__ __forceinline__ uint4 cc_ld_codes(const signed char* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

/* W warps share a tile (split K by 64-k steps, partial fragments meet in shared memory); a block of W * TPB warps
   takes TPB tiles at a time. GROUP: per-group scales, group a multiple of 64, so that a 64-k step lies in one
   group. */
template <class X, class C, int MT, int W, int TPB, bool GROUP, int U>
__device__ void cc_gemv_tc(const typename X::T* __restrict__ x, i64 ldx, const signed char* __restrict__ q,
                           const float* __restrict__ scale, const typename X::T* __restrict__ bias,
                           typename X::T* __restrict__ y, int M, i64 K, i64 N, i64 group, i64 ngroups) {
    /* U: 64-k steps whose loads a warp issues before using any */
    __shared__ float part[W * TPB][32][4 * MT];
    const int lane = threadIdx.x & 31, wib = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int tl = wib / W, slice = wib % W;
    const i64 tiles = (N + 15) / 16, steps = (K + 63) / 64;
    const i64 block_groups = (tiles + TPB - 1) / TPB;
    const bool hx0 = g < M, hx1 = MT == 2 && g + 8 < M;
    const typename X::T* x0 = x + (i64)g * ldx;
    const typename X::T* x1 = x + (i64)(g + 8) * ldx;
    for (i64 bg = blockIdx.x; bg < block_groups; bg += gridDim.x) {  /* uniform per block: __syncthreads below */
        const i64 tile = bg * TPB + tl;
        const i64 r0 = tile * 16 + g, r1 = r0 + 8;
        const bool ok0 = tile < tiles && r0 < N, ok1 = tile < tiles && r1 < N;
        const signed char* q0 = q + (ok0 ? r0 : 0) * K;
        const signed char* q1 = q + (ok1 ? r1 : 0) * K;
        float acc[MT][4];
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) { acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.0f; }
        for (i64 i0 = slice; i0 < steps; i0 += (i64)W * U) {
            uint4 c0[U], c1[U], xa[U][2], xb[U][2];
            #pragma unroll
            for (int u = 0; u < U; ++u) {
                const i64 k = (i0 + (i64)u * W) * 64 + 16 * t;
                const bool in = i0 + (i64)u * W < steps && k < K;
                const uint4 z = make_uint4(0u, 0u, 0u, 0u);
                c0[u] = in && ok0 ? cc_ld_codes(q0 + k) : z;
                c1[u] = in && ok1 ? cc_ld_codes(q1 + k) : z;
                xa[u][0] = in && hx0 ? __ldg(reinterpret_cast<const uint4*>(x0 + k)) : z;
                xa[u][1] = in && hx0 ? __ldg(reinterpret_cast<const uint4*>(x0 + k) + 1) : z;
                if (MT == 2) {
                    xb[u][0] = in && hx1 ? __ldg(reinterpret_cast<const uint4*>(x1 + k)) : z;
                    xb[u][1] = in && hx1 ? __ldg(reinterpret_cast<const uint4*>(x1 + k) + 1) : z;
                }
            }
            #pragma unroll
            for (int u = 0; u < U; ++u) {
                const i64 i = i0 + (i64)u * W;
                if (i < steps)  /* uniform across the warp: every lane takes part in the mma */
                    cc_tc_step<C, MT, GROUP>(acc, c0[u], c1[u], xa[u], xb[u], scale, ok0, ok1, r0, r1, ngroups,
                                             GROUP ? i * 64 / group : 0);
            }
        }
        cc_tc_finish<X, MT, W, GROUP>(acc, part, wib, lane, slice, t, ok0, ok1, r0, r1, scale, bias, y, M, N);
    }
}

#define CC_GEMV_TC(NAME, X, C, MT, W, TPB, GROUP, G, U)                                                           \
extern "C" __global__ void __launch_bounds__(32 * W * TPB)                                                         \
cupycodec_gemv_tc_##NAME##_t##MT##_w##W##x##TPB##_##G##_u##U(                                                      \
    const X::T* x, i64 ldx, const signed char* q, const float* scale, const X::T* bias, X::T* y, int M, i64 K,      \
    i64 N, i64 group, i64 ngroups) {                                                                               \
    cc_gemv_tc<X, C, MT, W, TPB, GROUP, U>(x, ldx, q, scale, bias, y, M, K, N, group, ngroups);                    \
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
_MMA = {"BF16": "cc_mma_bf16", "F16": "cc_mma_f16"}
KERNELS = ("fma", "mma")


@functools.cache
def _function(device: int, kernel: str, dtype_name: str, mm: int, w: int, grouped: bool, unroll: int = 4):
    """One kernel instance, compiled on first use (a model's shapes need a few, each compiles in well under a
    second): ``fma`` for an M bound ``mm``, or ``mma`` for ``mm`` 8 or 16 (one or two 8-column
    tiles), with ``w`` warps per row (tile), per-group scales or not."""
    return _compile(device, *_source(kernel, dtype_name, mm, w, grouped, unroll))


def _source(kernel: str, dtype_name: str, mm: int, w: int, grouped: bool, unroll: int = 4) -> tuple[str, str]:
    """(the instantiation line, the kernel's name) of one kernel instance."""
    suffix = _SUFFIX[dtype_name]
    if kernel == "fma":
        return f"CC_GEMV({suffix}, {_X[dtype_name]}, {mm}, {w})", f"cupycodec_gemv_int8_{suffix}_m{mm}_w{w}"
    mt, g, u, t = mm // 8, "g" if grouped else "c", unroll, tiles_per_block(w)
    code = (f"CC_GEMV_TC({suffix}, {_X[dtype_name]}, {_MMA[dtype_name]}, {mt}, {w}, {t}, {str(grouped).lower()}, "
            f"{g}, {u})")
    return code, f"cupycodec_gemv_tc_{suffix}_t{mt}_w{w}x{t}_{g}_u{u}"


def _compile(device: int, code: str, name: str):
    import cupy  # lazy: importing this module must not import cupy

    with cupy.cuda.Device(device):
        mod = cupy.RawModule(code=f"{_SOURCE}\n{code}\n", options=("--std=c++14",))
        return mod.get_function(name)


@functools.cache
def _compute_capability(device: int) -> int:
    import cupy

    return int(cupy.cuda.Device(device).compute_capability)


def mma_supported(dtype_name: str, granularity: str, group_size: int | None, device: int) -> bool:
    """Whether the tensor-core kernel takes this case: bf16 or fp16 activations on sm_80 or newer, channel scales or
    groups of a multiple of 64 codes (a 64-code step of a tile then lies in one group)."""
    if dtype_name not in _MMA or _compute_capability(device) < 80:
        return False
    return granularity == "channel" or (group_size is not None and group_size % 64 == 0)


def tiles_per_block(w: int) -> int:
    """16-row tiles a block of the tensor-core kernel takes at once with ``w`` warps per tile: blocks of 8 warps
    while ``w`` divides 8, else a block is one tile's ``w`` warps (up to :data:`MAX_WARPS`)."""
    return max(1, 8 // w)


def mma_shape(n: int, k: int, sm_count: int, m: int = 1) -> tuple[int, int]:
    """(W, U) for the tensor-core kernel on an N x K matrix at M activation rows: W warps per 16-row tile (split K)
    and U 64-code steps in flight per warp. Swept on an H200 (benchmarks/sweep_gemv.py, six Llama shapes, W in 1-8 by
    U in 2, 4, 8): the most warps won everywhere, so W = 8 wherever K gives each warp two steps. At M <= 8, U = 4
    (97 registers, two blocks of 8 warps per SM) while every warp fits on the GPU at once, else U = 2 (64-77
    registers, three or four blocks per SM), which keeps more warps resident. At M > 8 (two accumulator tiles, 140
    registers at U = 4) always U = 2: 1.25-1.7x faster than U = 4 on five of the six shapes (2026-12-02, call 1).

    Few tiles (at most two per SM, M <= 8, K of 2048 or more): 16 warps per tile at U = 2, 64 registers, two blocks
    of 16 warps per SM, so every SM holds all its tiles' warps at once and each warp half the steps. In a sweep of
    W = 4-16 (2026-12-02, ninth session) this was 4-8.5 % faster than (8, 4) on the three such Llama shapes
    (4096x4096, 4096x11008, 2048x5632) and within 2 % of the best pair on each; wherever more tiles than that,
    W = 4-16 gained at most 4 % over the rule above. The launcher checks that the GPU holds every tile at once
    (a compiler that gives the kernel more registers halves that) and takes (8, 4) where it does not."""
    w = 8
    while w > 1 and 64 * 2 * w > k:
        w //= 2
    tiles = -(-n // 16)
    if m <= 8 and w == 8 and k >= 64 * 2 * 16 and tiles <= 2 * sm_count:
        return 16, 2
    return w, 4 if m <= 8 and tiles * w <= 16 * sm_count else 2


def warps_per_row(n: int, k: int, sm_count: int) -> int:
    """W for an N x K matrix: enough warps for half of every SM's warp slots (32 of 64 on Hopper), but no more
    than K's 512-code steps give work to (a warp's lanes read 512 codes per step)."""
    w = 1
    while w < 8 and n * w < 32 * sm_count and 512 * 2 * w <= k:
        w *= 2
    return w


def _resident_blocks(fn, threads: int) -> int:
    """Blocks of ``fn`` (a CuPy RawKernel) that one SM holds at once, from the CUDA occupancy calculator."""
    import cupy

    return int(cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, threads, 0))


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
              warps: int | None = None, kernel: str | None = None, unroll: int | None = None) -> None:
    """Launch ``y[m, n] = sum_k x[m, k] * codes[n, k] * scale + bias[n]`` on ``stream_ptr`` (never waits).

    ``x``: M rows of K activations of ``dtype_name`` with row stride ``ldx`` elements; ``codes``: N x K int8
    (row-major); ``scales``: float32, N (channel) or N x ceil(K / group_size) (group); ``bias``: N values of
    ``dtype_name`` or 0; ``y``: M x N of ``dtype_name``. Every row start 16-byte aligned; see :func:`supported`.
    ``warps``: warps per row or tile (1, 2, 4 or 8; default :func:`warps_per_row` or :func:`mma_shape`) and
    ``kernel`` (``"fma"`` or ``"mma"``; default ``"mma"`` where :func:`mma_supported`) and
    ``unroll`` (the tensor-core kernels' 64-code steps in flight per warp: 2, 4 or 8; default :func:`mma_shape`),
    parameters for tests and benchmarks.
    """
    handle, grid, threads, tail = _config(device, dtype_name, m, k, n, granularity, group_size, warps, kernel,
                                          unroll)
    if (x_ptr | codes_ptr) % 16 or (ldx * _ITEMSIZE[dtype_name]) % 16:
        raise ValueError("gemv_int8 needs 16-byte aligned activations and codes (rows included)")
    launch(handle, grid, threads, (x_ptr, ldx, codes_ptr, scales_ptr, bias_ptr, y_ptr, *tail), device, stream_ptr)


@functools.lru_cache(maxsize=1024)
def _config(device: int, dtype_name: str, m: int, k: int, n: int, granularity: str, group_size: int | None,
            warps: int | None, kernel: str | None, unroll: int | None = None) -> tuple:
    """(kernel, grid, threads per block, the arguments after the six pointers) of one call signature: worked out
    once, so that a layer's forward costs one cache lookup and one launch on the host."""
    if not supported(dtype_name, m, k, granularity, group_size):
        raise ValueError(f"gemv_int8 does not take M={m}, K={k}, {dtype_name}, {granularity} (see supported())")
    mma = mma_supported(dtype_name, granularity, group_size, device)
    if kernel is None:
        kernel = "mma" if mma else "fma"
    elif kernel not in KERNELS or (kernel != "fma" and not mma):
        raise ValueError(f"kernel must be one of {KERNELS} ('mma' where mma_supported()), got {kernel!r}")
    if kernel == "fma" and warps not in (None, 1, 2, 4, 8):
        raise ValueError(f"warps per row of the fma kernel must be 1, 2, 4 or 8, got {warps!r}")
    if kernel == "mma" and warps is not None and (type(warps) is not int or not 1 <= warps <= MAX_WARPS):
        raise ValueError(f"warps per tile of the mma kernel must be an int from 1 to {MAX_WARPS}, got {warps!r}")
    if unroll is not None and (kernel == "fma" or unroll not in (2, 4, 8)):
        raise ValueError(f"unroll is the mma kernel's steps in flight: 2, 4 or 8, got {unroll!r} for {kernel!r}")
    group = group_size if granularity == "group" else 0
    ngroups = -(-k // group) if group else 0
    sms = _sm_count(device)
    if kernel != "fma":
        mm = 8 if m <= 8 else 16
        w, u = mma_shape(n, k, sms, m)
        tiles = -(-n // 16)
        if warps is None and unroll is None and w == 16 and _resident_blocks(
                _function(device, kernel, dtype_name, mm, w, bool(group), u), 32 * w) * sms < tiles:
            w, u = 8, 4  # the rule's premise (every tile resident at once) does not hold for this build
        w = w if warps is None else warps
        unroll = unroll or u
        tpb = tiles_per_block(w)
        grid, threads = max(1, -(-tiles // tpb)), 32 * w * tpb  # a block per group of 16-row tiles
    else:
        mm = next(v for v in (1, 2, 4, 8, 16) if v >= m)
        w = warps_per_row(n, k, sms) if warps is None else warps
        grid, threads = max(1, -(-n // (_THREADS // 32 // w))), _THREADS  # a block per row group
    tail = (np.int32(m), np.int64(k), np.int64(n), np.int64(group), np.int64(ngroups))
    fn = _function(device, kernel, dtype_name, mm, w, bool(group), *([unroll] if kernel != "fma" else []))
    return kernel_handle(fn, device), grid, threads, tail
