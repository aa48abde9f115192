"""CUDA kernels for symmetric absmax int8 quantization. Reference: :mod:`cupycodec.quant.reference`.

Every result (codes, scales, dequantized values) is bit-identical to the reference; ``tests/gpu/test_kernels_int8.py``
pins them together. Importing this module does not import CuPy: the source is compiled on first use.
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np

from ..errors import UnsupportedDtypeError

__all__ = ["dequantize_int8", "quantize_int8"]

# Arithmetic matches quant.reference bit for bit: absmax is an exact max, scale = absmax / 127.0f (an IEEE division:
# NVRTC's defaults are -prec-div=true -ftz=false), scales below 2**-126 become 1, code = rintf(x / scale) (IEEE
# division, round half to even) clamped to [-127, 127], y = __fmul_rn(code, scale) (never contracted into an FMA).
# Where one scale covers a whole vector, rintf(x / scale) is computed as rintf(x * (1 / scale)) and values within
# 2**-15 of a tie are redone with the division; cc_codes proves the codes identical. Keep it that way: no
# --use_fast_math. No #include either (NVRTC include paths differ between CUDA 12 and 13): fp16 converts with inline
# PTX, bf16 with integer bit operations, or the sm_80+ pair conversions for output.
#
# Layout vocabulary shared by all kernels: the C-contiguous input is a sequence of *segments* (runs of elements that
# share a scale). Rows of n elements are cut into ng segments of g elements (the last one may be shorter); segment s
# starts at (s / ng) * n + (s % ng) * g and uses scale (s % C). This covers
#   tensor:                 n = g = numel, ng = 1, C = 1
#   channel (outer, C, inner) view:  n = g = inner, ng = 1, scale of segment s is s % C
#   group:                  n = shape[-1], g = min(group_size, n), ng = ceil(n / g), C = rows * ng
# Divisions by these launch constants use a precomputed multiplier (cc_div).
#
# Kernels (V = 16 bytes of input: 4 float32 or 8 half; bytes per element below for bf16 input):
#   quantize_team   one pass, 3 B/elem (2 read + 1 written). A team of tpg = g / V lanes (<= 32) per segment, each
#                   lane holding one 16-byte vector in registers; 4 segments per team per step for loads in flight.
#                   Groups of <= 256 bf16/f16 or 128 float32 whose rows and groups are whole vectors. 256 threads.
#   quantize_warp   one pass, the same traffic plus an L1 re-read: the general (ragged, unaligned) short segment.
#   quantize_block  one pass; one block per long contiguous segment (channel rows of a C-contiguous array, long
#                   groups), up to 4 vectors per thread held in registers (else re-read from L1/L2); 64..1024 threads.
#   absmax_seg      pass 1 of 2 (5 B/elem in all) when segments are few and long, or for the whole tensor, which needs
#                   its max before any code can be written: 512-thread blocks reduce chunks, atomicMax on float bits.
#   absmax_col      pass 1 of 2 for channel axes with a short inner extent (e.g. per-column scales): each lane keeps
#                   the max of V columns over a strip of rows, 8 warps merge in shared memory, atomicMax per channel.
#   finalize        absmax -> scale in place (the scales buffer holds absmax bits during pass 1).
#   quantize_apply  pass 2: elementwise, scale index from the flat index.
#   dequantize      elementwise, 16 codes per thread and step, scale index from the flat index; 1 + 2 B/elem to bf16.
# atomicMax on the bits of non-negative floats orders them like the floats, so pass 1 is deterministic. The optional
# domain check (|x| < 2**127, finite) runs inside whichever kernel reads the input first and records the smallest
# offending flat index with atomicMin. Vector accesses need every base pointer 16-byte aligned (else the scalar
# variants run); segment heads and tails that are not vector-aligned are handled element by element.
_SOURCE = r"""
typedef long long i64;
typedef unsigned long long u64;

struct alignas(16) cc_v16 { unsigned int w[4]; };
struct alignas(8) cc_v8 { unsigned int w[2]; };

#define CC_LIMIT __int_as_float(0x7f000000)  /* 2**127: |x| must be below it */
#define CC_TINY __int_as_float(0x00800000)   /* 2**-126: smaller scales become 1 */
#define CC_FULL 0xffffffffu

/* Division by a launch-invariant divisor d >= 1 with m = ceil(2**64 / d) (any value when d == 1): for a, d < 2**32,
   a * m / 2**64 = a / d + a * r / (d * 2**64) with 0 <= r < d, and a * r < 2**64 keeps the floor exact. */
struct cc_divisor {
    i64 d;
    u64 m;
};
__device__ __forceinline__ i64 cc_div(i64 a, cc_divisor v) { /* a >= 0 */
    if (v.d == 1) return a;
    if ((((u64)a | (u64)v.d) >> 32) == 0) return (i64)__umul64hi((u64)a, v.m);
    return a / v.d;
}
__device__ __forceinline__ i64 cc_mod(i64 a, cc_divisor v) { return a < v.d ? a : a - cc_div(a, v) * v.d; }

/* The segment map (see the Python header comment): rows of n elements cut into ng segments of g elements; the scale
   of segment s is s % C. */
struct cc_map {
    cc_divisor n, g, ng, C;
};
__device__ __forceinline__ void cc_segment(i64 s, const cc_map& mp, i64& start, i64& end) {
    const i64 r = cc_div(s, mp.ng), k = s - r * mp.ng.d;
    start = r * mp.n.d + k * mp.g.d;
    end = start + (mp.n.d - k * mp.g.d < mp.g.d ? mp.n.d - k * mp.g.d : mp.g.d);
}

__device__ __forceinline__ float cc_f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ unsigned short cc_f32_to_f16(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
/* Round half to even on the bits, as ml_dtypes does (NaN -> 0x7fc0 / 0xffc0, like ml_dtypes). */
__device__ __forceinline__ unsigned int cc_f32_to_bf16_bits(float f) {
    const unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u & 0x80000000u) ? 0xffc0u : 0x7fc0u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
/* Two floats to a packed pair, lo in the low half. sm_80+ has one instruction for the pair; it rounds finite values
   exactly like the fallback (NaN becomes the canonical 0x7fff there; dequantization never produces NaN from the
   finite scales quantize_int8 writes). */
__device__ __forceinline__ unsigned int cc_pack_f16x2(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned int r;
    asm("cvt.rn.f16x2.f32 %0, %2, %1;" : "=r"(r) : "f"(lo), "f"(hi));
    return r;
#else
    return (unsigned int)cc_f32_to_f16(lo) | ((unsigned int)cc_f32_to_f16(hi) << 16);
#endif
}
__device__ __forceinline__ unsigned int cc_pack_bf16x2(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned int r;
    asm("cvt.rn.bf16x2.f32 %0, %2, %1;" : "=r"(r) : "f"(lo), "f"(hi));
    return r;
#else
    return cc_f32_to_bf16_bits(lo) | (cc_f32_to_bf16_bits(hi) << 16);
#endif
}
__device__ __forceinline__ unsigned short cc_f32_to_bf16(float f) { return (unsigned short)cc_pack_bf16x2(f, 0.0f); }

/* input element types: storage type T, V elements per 16-byte vector */
struct cc_in_f32 {
    typedef float T;
    enum { V = 4 };
    static __device__ __forceinline__ float cvt(float v) { return v; }
    static __device__ __forceinline__ void unpack(const cc_v16& r, float* f) {
        for (int j = 0; j < 4; ++j) f[j] = __uint_as_float(r.w[j]);
    }
};
struct cc_in_f16 {
    typedef unsigned short T;
    enum { V = 8 };
    static __device__ __forceinline__ float cvt(unsigned short v) { return cc_f16_to_f32(v); }
    static __device__ __forceinline__ void unpack(const cc_v16& r, float* f) {
        for (int j = 0; j < 4; ++j) {
            f[2 * j] = cc_f16_to_f32((unsigned short)(r.w[j] & 0xffffu));
            f[2 * j + 1] = cc_f16_to_f32((unsigned short)(r.w[j] >> 16));
        }
    }
};
struct cc_in_bf16 {
    typedef unsigned short T;
    enum { V = 8 };
    static __device__ __forceinline__ float cvt(unsigned short v) { return __uint_as_float(((unsigned int)v) << 16); }
    static __device__ __forceinline__ void unpack(const cc_v16& r, float* f) {
        for (int j = 0; j < 4; ++j) {
            f[2 * j] = __uint_as_float(r.w[j] << 16);
            f[2 * j + 1] = __uint_as_float(r.w[j] & 0xffff0000u);
        }
    }
};

/* N == 1: one element; N == D::V: one aligned 16-byte vector */
template <class D, int N>
__device__ __forceinline__ void cc_load(const typename D::T* p, float* f) {
    if (N == 1) {
        f[0] = D::cvt(p[0]);
    } else {
        const cc_v16 r = *reinterpret_cast<const cc_v16*>(p);
        D::unpack(r, f);
    }
}

__device__ __forceinline__ int cc_code(float v, float scale) {
    return (int)fminf(fmaxf(rintf(v / scale), -127.0f), 127.0f);
}
__device__ __forceinline__ float cc_scale(float absmax) {
    const float s = absmax / 127.0f;
    return s < CC_TINY ? 1.0f : s;
}
__device__ __forceinline__ unsigned int cc_pack4(const int* c) {
    return (unsigned int)(c[0] & 0xff) | ((unsigned int)(c[1] & 0xff) << 8) | ((unsigned int)(c[2] & 0xff) << 16) |
           ((unsigned int)(c[3] & 0xff) << 24);
}
template <int N>
__device__ __forceinline__ void cc_store_codes(signed char* q, const int* c) {
    if (N == 1) {
        q[0] = (signed char)c[0];
    } else if (N == 4) {
        *reinterpret_cast<unsigned int*>(q) = cc_pack4(c);
    } else {
        cc_v8 v;
        v.w[0] = cc_pack4(c);
        v.w[1] = cc_pack4(c + 4);
        *reinterpret_cast<cc_v8*>(q) = v;
    }
}
/* absmax of N values; flags the first out-of-domain one (NaN fails the test too), one branch per vector */
template <int N>
__device__ __forceinline__ float cc_absmax(const float* v, i64 i, u64* bad, float m) {
    bool out = false;
    for (int e = 0; e < N; ++e) {
        const float a = fabsf(v[e]);
        out |= !(a < CC_LIMIT);
        m = fmaxf(m, a);
    }
    if (out && bad) {
        for (int e = 0; e < N; ++e) {
            if (!(fabsf(v[e]) < CC_LIMIT)) {
                atomicMin(bad, (u64)(i + e));
                break;
            }
        }
    }
    return m;
}

/* Codes of N values sharing one scale, without a division per element. With rcp = 1.0f / scale (IEEE) and
   p = RN(v * rcp): for in-domain v (|v| <= absmax, so |v / scale| < 127.00001), |p - v / scale| < 2**-16 and
   |RN(v / scale) - v / scale| <= 2**-18, so p and the reference's RN(v / scale) are within 2**-15 of each other. When
   p is at least 2**-15 away from every half-integer, no half-integer separates them and both round to rint(p). The
   rare values closer than that to a tie (|p - rint(p)| > 0.5 - 2**-15) are redone with the IEEE division, so the
   codes equal cc_code's bit for bit. __fmul_rn / __fsub_rn: no FMA contraction. */
template <int N>
__device__ __forceinline__ void cc_codes(const float* v, float scale, float rcp, int* c) {
    bool near = false;
    for (int e = 0; e < N; ++e) {
        const float p = __fmul_rn(v[e], rcp);
        const float t = rintf(p);
        near |= fabsf(__fsub_rn(p, t)) > 0.499969482421875f; /* 0.5 - 2**-15 */
        c[e] = (int)fminf(fmaxf(t, -127.0f), 127.0f);
    }
    if (near) {
        for (int e = 0; e < N; ++e) c[e] = cc_code(v[e], scale);
    }
}
template <int N>
__device__ __forceinline__ void cc_quantize_store(const float* v, float scale, float rcp, signed char* q) {
    int c[N];
    cc_codes<N>(v, scale, rcp, c);
    cc_store_codes<N>(q, c);
}

struct cc_absmax_op {
    float m;
    u64* bad;
    template <int N>
    __device__ __forceinline__ void run(i64 i, const float* v) { m = cc_absmax<N>(v, i, bad, m); }
};
struct cc_quant_op {
    float scale, rcp;
    signed char* q;
    template <int N>
    __device__ __forceinline__ void run(i64 i, const float* v) { cc_quantize_store<N>(v, scale, rcp, q + i); }
};

/* Apply op to elements [start, end) with thread t of nt: scalar head up to a multiple of V, V-wide body, scalar tail.
   Element index i is vector-aligned iff i % V == 0 (base pointers are 16-byte aligned when V > 1). */
template <class D, int V, class Op>
__device__ __forceinline__ void cc_range(const typename D::T* __restrict__ x, i64 start, i64 end, int t, int nt,
                                         Op& op) {
    i64 body = start, body_end = end;
    if (V > 1) {
        body = (start + V - 1) / V * V;
        if (body > end) body = end;
        body_end = body + (end - body) / V * V;
        for (i64 i = start + t; i < body; i += nt) {
            float f[1];
            cc_load<D, 1>(x + i, f);
            op.template run<1>(i, f);
        }
        for (i64 i = body_end + t; i < end; i += nt) {
            float f[1];
            cc_load<D, 1>(x + i, f);
            op.template run<1>(i, f);
        }
    }
#pragma unroll 4
    for (i64 i = body + (i64)t * V; i < body_end; i += (i64)nt * V) {
        float f[V];
        cc_load<D, V>(x + i, f);
        op.template run<V>(i, f);
    }
}

/* max over the block; blockDim.x is a multiple of 32; every thread gets the result */
__device__ __forceinline__ float cc_block_max(float m, float* red) {
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(CC_FULL, m, o));
    const int lane = threadIdx.x & 31;
    if (lane == 0) red[threadIdx.x >> 5] = m;
    __syncthreads();
    m = lane < (int)(blockDim.x >> 5) ? red[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(CC_FULL, m, o));
    __syncthreads(); /* red is reused by the next call */
    return m;
}

/* One pass, a team of tpg lanes per segment, each lane holding at most one vector of it in registers: needs
   16-byte-aligned x and q, n % V == 0, g % V == 0 and g <= tpg * V. Each team takes K segments per step, so that a
   lane has K loads in flight. */
#define CC_TEAM_K 4
template <class D>
__device__ void cc_quantize_team(const typename D::T* __restrict__ x, signed char* __restrict__ q,
                                 float* __restrict__ scale, i64 nseg, cc_map mp, int tpg, u64* bad) {
    enum { V = D::V };
    const int lane = threadIdx.x & 31, sub = lane & (tpg - 1);
    const i64 per_warp = 32 / tpg, team = lane / tpg;
    const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const i64 nwarps = ((i64)gridDim.x * blockDim.x) >> 5;
    /* the loop bound is uniform per warp, so every lane reaches the shuffles */
    for (i64 base = warp * per_warp * CC_TEAM_K; base < nseg; base += nwarps * per_warp * CC_TEAM_K) {
        cc_v16 raw[CC_TEAM_K];
        i64 pos[CC_TEAM_K];
        for (int k = 0; k < CC_TEAM_K; ++k) {
            const i64 s = base + k * per_warp + team;
            pos[k] = -1;
            if (s < nseg) {
                i64 start, end;
                cc_segment(s, mp, start, end);
                if (start + sub * V < end) {
                    pos[k] = start + sub * V;
                    raw[k] = *reinterpret_cast<const cc_v16*>(x + pos[k]);
                }
            }
        }
        for (int k = 0; k < CC_TEAM_K; ++k) {
            float f[V];
            float m = 0.0f;
            if (pos[k] >= 0) {
                D::unpack(raw[k], f);
                m = cc_absmax<V>(f, pos[k], bad, m);
            }
            for (int o = tpg >> 1; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(CC_FULL, m, o));
            const float sc = cc_scale(m);
            const i64 s = base + k * per_warp + team;
            if (s < nseg && sub == 0) scale[s] = sc;
            if (pos[k] >= 0) cc_quantize_store<V>(f, sc, 1.0f / sc, q + pos[k]);
        }
    }
}

/* One pass, a team of tpg lanes per segment of any length and alignment: absmax, then quantize re-reading the
   segment (an L1 hit). */
template <class D, int V>
__device__ void cc_quantize_warp(const typename D::T* __restrict__ x, signed char* __restrict__ q,
                                 float* __restrict__ scale, i64 nseg, cc_map mp, int tpg, u64* bad) {
    const int lane = threadIdx.x & 31, sub = lane & (tpg - 1);
    const i64 per_warp = 32 / tpg;
    const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const i64 nwarps = ((i64)gridDim.x * blockDim.x) >> 5;
    for (i64 base = warp * per_warp; base < nseg; base += nwarps * per_warp) {
        const i64 s = base + lane / tpg;
        i64 start = 0, end = 0;
        if (s < nseg) cc_segment(s, mp, start, end);
        cc_absmax_op am = {0.0f, bad};
        cc_range<D, V>(x, start, end, sub, tpg, am);
        float m = am.m;
        for (int o = tpg >> 1; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(CC_FULL, m, o));
        const float sc = cc_scale(m);
        if (s < nseg && sub == 0) scale[s] = sc;
        cc_quant_op qo = {sc, 1.0f / sc, q};
        cc_range<D, V>(x, start, end, sub, tpg, qo);
    }
}

/* One pass, one block per segment. reg: the segment fits in registers, at most CC_BLOCK_K aligned vectors per thread
   (16-byte-aligned x and q, n % V == 0, g % V == 0, g <= blockDim * V * CC_BLOCK_K); otherwise the segment is read
   twice (the second time from L1/L2). */
#define CC_BLOCK_K 4
template <class D, int V>
__device__ void cc_quantize_block(const typename D::T* __restrict__ x, signed char* __restrict__ q,
                                  float* __restrict__ scale, i64 nseg, cc_map mp, int reg, u64* bad) {
    __shared__ float red[32];
    for (i64 s = blockIdx.x; s < nseg; s += gridDim.x) {
        i64 start, end;
        cc_segment(s, mp, start, end);
        if (V > 1 && reg) {
            cc_v16 raw[CC_BLOCK_K];
            for (int k = 0; k < CC_BLOCK_K; ++k) {
                const i64 i = start + ((i64)k * blockDim.x + threadIdx.x) * V;
                if (i < end) raw[k] = *reinterpret_cast<const cc_v16*>(x + i);
            }
            float m = 0.0f;
            for (int k = 0; k < CC_BLOCK_K; ++k) {
                const i64 i = start + ((i64)k * blockDim.x + threadIdx.x) * V;
                if (i < end) {
                    float f[V];
                    D::unpack(raw[k], f);
                    m = cc_absmax<V>(f, i, bad, m);
                }
            }
            const float sc = cc_scale(cc_block_max(m, red)), rcp = 1.0f / sc;
            if (threadIdx.x == 0) scale[s] = sc;
            for (int k = 0; k < CC_BLOCK_K; ++k) {
                const i64 i = start + ((i64)k * blockDim.x + threadIdx.x) * V;
                if (i < end) {
                    float f[V];
                    D::unpack(raw[k], f);
                    cc_quantize_store<V>(f, sc, rcp, q + i);
                }
            }
        } else {
            cc_absmax_op am = {0.0f, bad};
            cc_range<D, V>(x, start, end, threadIdx.x, blockDim.x, am);
            const float sc = cc_scale(cc_block_max(am.m, red));
            if (threadIdx.x == 0) scale[s] = sc;
            cc_quant_op qo = {sc, 1.0f / sc, q};
            cc_range<D, V>(x, start, end, threadIdx.x, blockDim.x, qo);
        }
    }
}

template <class D, int V>
__device__ void cc_absmax_seg(const typename D::T* __restrict__ x, unsigned int* bits, i64 nseg, cc_map mp,
                              cc_divisor chunks, i64 chunk_len, u64* bad) {
    __shared__ float red[32];
    const i64 items = nseg * chunks.d;
    for (i64 w = blockIdx.x; w < items; w += gridDim.x) {
        const i64 s = cc_div(w, chunks), c = w - s * chunks.d;
        i64 start, end;
        cc_segment(s, mp, start, end);
        const i64 lo = start + c * chunk_len;
        const i64 hi = lo + chunk_len < end ? lo + chunk_len : end;
        cc_absmax_op am = {0.0f, bad};
        cc_range<D, V>(x, lo, hi, threadIdx.x, blockDim.x, am);
        const float m = cc_block_max(am.m, red);
        if (threadIdx.x == 0 && m > 0.0f) atomicMax(bits + cc_mod(s, mp.C), __float_as_uint(m));
    }
}

/* rows x P matrix (P = C * inner), blockDim.x == 256: 8 warps share a tile of 32 * V columns and split a chunk of
   rpc rows; work item w = (row chunk, tile). Channel of column j is j / inner. */
template <class D, int V>
__device__ void cc_absmax_col(const typename D::T* __restrict__ x, unsigned int* bits, i64 rows, i64 P,
                              cc_divisor inner, cc_divisor ntiles, i64 rpc, i64 nchunks, u64* bad) {
    __shared__ float red[8 * V * 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const i64 ncv = P / V; /* V > 1 only when P % V == 0 */
    for (i64 w = blockIdx.x; w < ntiles.d * nchunks; w += gridDim.x) {
        const i64 rc = cc_div(w, ntiles), tile = w - rc * ntiles.d;
        const i64 cv = tile * 32 + lane;
        const bool valid = cv < ncv;
        const i64 col0 = cv * V;
        float m[V];
        for (int e = 0; e < V; ++e) m[e] = 0.0f;
        if (valid) {
            const i64 r1 = (rc + 1) * rpc < rows ? (rc + 1) * rpc : rows;
            for (i64 r = rc * rpc + warp; r < r1; r += 8) {
                const i64 i = r * P + col0;
                float f[V];
                cc_load<D, V>(x + i, f);
                cc_absmax<V>(f, i, bad, 0.0f); /* the domain check; the max is per column here */
                for (int e = 0; e < V; ++e) m[e] = fmaxf(m[e], fabsf(f[e]));
            }
        }
        for (int e = 0; e < V; ++e) red[(warp * V + e) * 32 + lane] = m[e];
        __syncthreads();
        if (warp == 0) {
            for (int k = 1; k < 8; ++k)
                for (int e = 0; e < V; ++e) m[e] = fmaxf(m[e], red[(k * V + e) * 32 + lane]);
            if (V > 1 && inner.d % V == 0) {
                /* the V columns of a lane share a channel: merge runs of equal channels across the warp */
                float mm = m[0];
                for (int e = 1; e < V; ++e) mm = fmaxf(mm, m[e]);
                const i64 ch = valid ? cc_div(col0, inner) : -1;
                for (int o = 1; o < 32; o <<= 1) {
                    const float om = __shfl_down_sync(CC_FULL, mm, o);
                    const i64 och = __shfl_down_sync(CC_FULL, ch, o);
                    if (lane + o < 32 && och == ch) mm = fmaxf(mm, om);
                }
                const i64 prev = __shfl_up_sync(CC_FULL, ch, 1);
                if (valid && (lane == 0 || prev != ch) && mm > 0.0f) atomicMax(bits + ch, __float_as_uint(mm));
            } else if (valid) {
                i64 ch = cc_div(col0, inner), left = (ch + 1) * inner.d - col0; /* columns left in channel ch */
                float run = 0.0f;
                for (int e = 0; e < V; ++e) {
                    if (left == 0) {
                        if (run > 0.0f) atomicMax(bits + ch, __float_as_uint(run));
                        ++ch;
                        left = inner.d;
                        run = 0.0f;
                    }
                    run = fmaxf(run, m[e]);
                    --left;
                }
                if (run > 0.0f) atomicMax(bits + ch, __float_as_uint(run));
            }
        }
        __syncthreads(); /* red is reused by the next work item */
    }
}

/* scale index of element i, and how many elements from i on (i included) share it */
__device__ __forceinline__ void cc_locate(i64 i, const cc_map& mp, i64& idx, i64& left, i64& segend) {
    if (mp.C.d == 1) {
        idx = 0;
        left = 0x7fffffffffffffffLL;
        segend = mp.n.d;
        return;
    }
    const i64 r = cc_div(i, mp.n), col = i - r * mp.n.d;
    const i64 k = mp.ng.d == 1 ? 0 : cc_div(col, mp.g);
    idx = cc_mod(r * mp.ng.d + k, mp.C);
    segend = (k + 1) * mp.g.d < mp.n.d ? (k + 1) * mp.g.d : mp.n.d;
    left = segend - col;
}
/* step to the next segment (its index is one more, so its scale index is one more modulo C) */
__device__ __forceinline__ void cc_next(const cc_map& mp, i64& idx, i64& left, i64& segend) {
    const i64 start = segend == mp.n.d ? 0 : segend;
    segend = start + mp.g.d < mp.n.d ? start + mp.g.d : mp.n.d;
    left = segend - start;
    idx = idx + 1 == mp.C.d ? 0 : idx + 1;
}
template <int N>
__device__ __forceinline__ void cc_scales_of(const float* __restrict__ scale, i64 i, const cc_map& mp, float* s) {
    i64 idx, left, segend;
    cc_locate(i, mp, idx, left, segend);
    float sc = scale[idx];
    if (left >= N) {
        for (int e = 0; e < N; ++e) s[e] = sc;
    } else {
        for (int e = 0; e < N; ++e) {
            if (left == 0) {
                cc_next(mp, idx, left, segend);
                sc = scale[idx];
            }
            s[e] = sc;
            --left;
        }
    }
}

template <class D, int V>
__device__ void cc_quantize_apply(const typename D::T* __restrict__ x, signed char* __restrict__ q,
                                  const float* __restrict__ scale, i64 numel, cc_map mp) {
    const i64 nvec = numel / V, tid = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 w = tid; w < nvec; w += stride) {
        const i64 i = w * V;
        float f[V];
        int c[V];
        cc_load<D, V>(x + i, f);
        i64 idx, left, segend;
        cc_locate(i, mp, idx, left, segend);
        if (left >= V) { /* one scale for the whole vector: one division per vector */
            const float sc = scale[idx];
            cc_codes<V>(f, sc, 1.0f / sc, c);
        } else {
            float s[V];
            cc_scales_of<V>(scale, i, mp, s);
            for (int e = 0; e < V; ++e) c[e] = cc_code(f[e], s[e]);
        }
        cc_store_codes<V>(q + i, c);
    }
    const i64 i = nvec * V + tid; /* fewer than V left over */
    if (i < numel) {
        float f[1], s[1];
        cc_load<D, 1>(x + i, f);
        cc_scales_of<1>(scale, i, mp, s);
        q[i] = (signed char)cc_code(f[0], s[0]);
    }
}

/* output element types: one element, or 8 of them (16-bit: one 16-byte store; f32: two; f64: four) */
struct cc_out_f32 {
    typedef float T;
    static __device__ __forceinline__ float cvt(float y) { return y; }
    static __device__ __forceinline__ void store8(float* p, const float* y) {
        cc_v16 a, b;
        for (int j = 0; j < 4; ++j) {
            a.w[j] = __float_as_uint(y[j]);
            b.w[j] = __float_as_uint(y[4 + j]);
        }
        reinterpret_cast<cc_v16*>(p)[0] = a;
        reinterpret_cast<cc_v16*>(p)[1] = b;
    }
};
struct cc_out_f16 {
    typedef unsigned short T;
    static __device__ __forceinline__ unsigned short cvt(float y) { return cc_f32_to_f16(y); }
    static __device__ __forceinline__ void store8(unsigned short* p, const float* y) {
        cc_v16 a;
        for (int j = 0; j < 4; ++j) a.w[j] = cc_pack_f16x2(y[2 * j], y[2 * j + 1]);
        *reinterpret_cast<cc_v16*>(p) = a;
    }
};
struct cc_out_bf16 {
    typedef unsigned short T;
    static __device__ __forceinline__ unsigned short cvt(float y) { return cc_f32_to_bf16(y); }
    static __device__ __forceinline__ void store8(unsigned short* p, const float* y) {
        cc_v16 a;
        for (int j = 0; j < 4; ++j) a.w[j] = cc_pack_bf16x2(y[2 * j], y[2 * j + 1]);
        *reinterpret_cast<cc_v16*>(p) = a;
    }
};
struct cc_out_f64 {
    typedef double T;
    static __device__ __forceinline__ double cvt(float y) { return (double)y; }
    static __device__ __forceinline__ void store8(double* p, const float* y) {
        for (int k = 0; k < 4; ++k) {
            const u64 lo = (u64)__double_as_longlong((double)y[2 * k]);
            const u64 hi = (u64)__double_as_longlong((double)y[2 * k + 1]);
            cc_v16 a;
            a.w[0] = (unsigned int)lo;
            a.w[1] = (unsigned int)(lo >> 32);
            a.w[2] = (unsigned int)hi;
            a.w[3] = (unsigned int)(hi >> 32);
            reinterpret_cast<cc_v16*>(p)[k] = a;
        }
    }
};

/* V == 16 (16-byte code loads) or 1 */
template <class O, int V>
__device__ void cc_dequantize(const signed char* __restrict__ q, const float* __restrict__ scale,
                              typename O::T* __restrict__ y, i64 numel, cc_map mp) {
    const i64 nvec = numel / V, tid = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 w = tid; w < nvec; w += stride) {
        const i64 i = w * V;
        float s[V], v[V];
        cc_scales_of<V>(scale, i, mp, s);
        if (V == 1) {
            v[0] = __fmul_rn((float)q[i], s[0]);
            y[i] = O::cvt(v[0]);
        } else {
            const cc_v16 r = *reinterpret_cast<const cc_v16*>(q + i);
            for (int e = 0; e < V; ++e) {
                const int c = (int)(signed char)((r.w[e >> 2] >> (8 * (e & 3))) & 0xffu);
                v[e] = __fmul_rn((float)c, s[e]);
            }
            O::store8(y + i, v);
            O::store8(y + i + 8, v + 8);
        }
    }
    const i64 i = nvec * V + tid;
    if (i < numel) {
        float s[1];
        cc_scales_of<1>(scale, i, mp, s);
        y[i] = O::cvt(__fmul_rn((float)q[i], s[0]));
    }
}

/* kernel parameters of a segment map: (n, m_n, g, m_g, ng, m_ng, C, m_C), m_* = ceil(2**64 / *) */
#define CC_MAP_PARAMS i64 n, u64 mn, i64 g, u64 mg, i64 ng, u64 mng, i64 C, u64 mC
#define CC_MAP {{n, mn}, {g, mg}, {ng, mng}, {C, mC}}

#define CC_INPUT_KERNELS(NAME, D)                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) cupycodec_int8_quantize_team_##NAME(                          \
        const D::T* x, signed char* q, float* scale, i64 nseg, CC_MAP_PARAMS, int tpg, u64* bad) {                 \
        const cc_map mp = CC_MAP;                                                                                   \
        cc_quantize_team<D>(x, q, scale, nseg, mp, tpg, bad);                                                       \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256) cupycodec_int8_quantize_warp_##NAME(                          \
        const D::T* x, signed char* q, float* scale, i64 nseg, CC_MAP_PARAMS, int tpg, int vec, u64* bad) {        \
        const cc_map mp = CC_MAP;                                                                                   \
        if (vec) cc_quantize_warp<D, D::V>(x, q, scale, nseg, mp, tpg, bad);                                       \
        else cc_quantize_warp<D, 1>(x, q, scale, nseg, mp, tpg, bad);                                              \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(1024) cupycodec_int8_quantize_block_##NAME(                        \
        const D::T* x, signed char* q, float* scale, i64 nseg, CC_MAP_PARAMS, int reg, int vec, u64* bad) {        \
        const cc_map mp = CC_MAP;                                                                                   \
        if (vec) cc_quantize_block<D, D::V>(x, q, scale, nseg, mp, reg, bad);                                      \
        else cc_quantize_block<D, 1>(x, q, scale, nseg, mp, 0, bad);                                               \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(512) cupycodec_int8_absmax_seg_##NAME(                             \
        const D::T* x, unsigned int* bits, i64 nseg, CC_MAP_PARAMS, i64 chunks, u64 mchunks, i64 chunk_len,         \
        int vec, u64* bad) {                                                                                        \
        const cc_map mp = CC_MAP;                                                                                   \
        const cc_divisor ch = {chunks, mchunks};                                                                    \
        if (vec) cc_absmax_seg<D, D::V>(x, bits, nseg, mp, ch, chunk_len, bad);                                    \
        else cc_absmax_seg<D, 1>(x, bits, nseg, mp, ch, chunk_len, bad);                                           \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256) cupycodec_int8_absmax_col_##NAME(                             \
        const D::T* x, unsigned int* bits, i64 rows, i64 P, i64 inner, u64 minner, i64 ntiles, u64 mntiles,         \
        i64 rpc, i64 nchunks, int vec, u64* bad) {                                                                  \
        const cc_divisor in = {inner, minner}, nt = {ntiles, mntiles};                                              \
        if (vec) cc_absmax_col<D, D::V>(x, bits, rows, P, in, nt, rpc, nchunks, bad);                              \
        else cc_absmax_col<D, 1>(x, bits, rows, P, in, nt, rpc, nchunks, bad);                                     \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256) cupycodec_int8_quantize_apply_##NAME(                         \
        const D::T* x, signed char* q, const float* scale, i64 numel, CC_MAP_PARAMS, int vec) {                    \
        const cc_map mp = CC_MAP;                                                                                   \
        if (vec) cc_quantize_apply<D, D::V>(x, q, scale, numel, mp);                                               \
        else cc_quantize_apply<D, 1>(x, q, scale, numel, mp);                                                      \
    }

CC_INPUT_KERNELS(f32, cc_in_f32)
CC_INPUT_KERNELS(f16, cc_in_f16)
CC_INPUT_KERNELS(bf16, cc_in_bf16)

#define CC_OUTPUT_KERNEL(NAME, O)                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) cupycodec_int8_dequantize_##NAME(                             \
        const signed char* q, const float* scale, O::T* y, i64 numel, CC_MAP_PARAMS, int vec) {                    \
        const cc_map mp = CC_MAP;                                                                                   \
        if (vec) cc_dequantize<O, 16>(q, scale, y, numel, mp);                                                     \
        else cc_dequantize<O, 1>(q, scale, y, numel, mp);                                                          \
    }

CC_OUTPUT_KERNEL(f32, cc_out_f32)
CC_OUTPUT_KERNEL(f16, cc_out_f16)
CC_OUTPUT_KERNEL(bf16, cc_out_bf16)
CC_OUTPUT_KERNEL(f64, cc_out_f64)

extern "C" __global__ void __launch_bounds__(256) cupycodec_int8_finalize_f32(float* scale, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        scale[i] = cc_scale(scale[i]); /* the buffer held absmax (as float bits) during pass 1 */
}
"""

_INPUTS = {"F32": "f32", "F16": "f16", "BF16": "bf16"}
_OUTPUTS = {  # dtype_name -> (kernel suffix, storage dtypes accepted for out=, the one allocated)
    "F32": ("f32", ("float32",), np.float32),
    "F16": ("f16", ("float16", "uint16", "int16"), np.float16),
    "BF16": ("bf16", ("uint16", "int16", "bfloat16"), np.uint16),
    "F64": ("f64", ("float64",), np.float64),
}
_INPUT_HELP = "float32, float16, bfloat16 (an ml_dtypes dtype, or uint16/int16 bits with dtype_name='BF16')"
_BLOCK = 256
_NO_BAD = 0xFFFF_FFFF_FFFF_FFFF
_SMALL_TENSOR = 1 << 16  # elements; a smaller tensor is quantized in one pass by a single block
_SHORT_SEGMENT = 4096  # elements; longer segments, fewer than 2 per SM, take two passes spread over many blocks
_COLUMN_INNER = 1024  # channel axes whose inner extent is shorter use the column-strip absmax kernel
_TEAM_K = 4  # CC_TEAM_K: segments per team and step in quantize_team
_BLOCK_K = 4  # CC_BLOCK_K: vectors per thread held in registers by quantize_block


@functools.cache
def _module():
    import cupy  # lazy: importing this module must not import cupy

    # Compiled on first get_function; CuPy memoizes per device and on disk ($HOME/.cupy/kernel_cache).
    return cupy.RawModule(code=_SOURCE)


@functools.cache
def _kernel(name: str):
    return _module().get_function(name)  # a RawKernel: compiled once per device, on first launch


@functools.cache
def _sm_count(device_id: int) -> int:
    import cupy

    runtime = cupy.cuda.runtime
    return int(runtime.deviceGetAttribute(runtime.cudaDevAttrMultiProcessorCount, device_id))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _i64(v: int) -> np.int64:
    return np.int64(v)


def _on(stream):
    return contextlib.nullcontext() if stream is None else stream


def _aligned(*arrays) -> bool:
    return all(a.data.ptr % 16 == 0 for a in arrays)


def _require_cupy(cupy, arr, what: str):
    if not isinstance(arr, cupy.ndarray):
        raise TypeError(f"{what} must be a cupy.ndarray, got {type(arr).__name__}; use cupy.asarray() first")


def _require_contiguous(arr, what: str):
    if not arr.flags.c_contiguous:
        raise ValueError(
            f"{what} must be C-contiguous (RawKernels ignore strides), got strides {arr.strides}; "
            "pass cupy.ascontiguousarray(...)"
        )


def _input_name(x, dtype_name) -> str:
    dt = x.dtype
    if dtype_name is None:
        if dt == np.float32:
            return "F32"
        if dt == np.float16:
            return "F16"
        if dt.name == "bfloat16":
            return "BF16"
        hint = "for bfloat16 bits pass dtype_name='BF16'" if dt in (np.uint16, np.int16) else ""
        raise UnsupportedDtypeError(dt, [_INPUT_HELP], hint)
    if dtype_name not in _INPUTS:
        raise ValueError(f"dtype_name must be 'F32', 'F16' or 'BF16', got {dtype_name!r}")
    storage = {"F32": ("float32",), "F16": ("float16", "uint16", "int16"), "BF16": ("uint16", "int16", "bfloat16")}
    if dt.name not in storage[dtype_name]:
        raise UnsupportedDtypeError(
            dt, [_INPUT_HELP], f"dtype_name={dtype_name!r} needs an array of {' or '.join(storage[dtype_name])}"
        )
    return dtype_name


def _output(cupy, out, shape, dtypes: tuple[str, ...], allocate, what: str):
    if out is None:
        return cupy.empty(shape, dtype=allocate)
    _require_cupy(cupy, out, what)
    if out.dtype.name not in dtypes or out.shape != tuple(shape) or not out.flags.c_contiguous:
        raise ValueError(
            f"{what} must be a C-contiguous cupy array of dtype {' or '.join(dtypes)} and shape {tuple(shape)}, "
            f"got {out.dtype} of shape {out.shape} (c_contiguous={out.flags.c_contiguous})"
        )
    return out


def _layout(shape, granularity: str, axis, group_size) -> tuple[int, int, int, int]:
    """(n, g, ng, C) of the segment vocabulary in _SOURCE's header comment, for a non-empty array."""
    numel = math.prod(shape)
    if granularity == "tensor":
        return numel, numel, 1, 1
    if granularity == "channel":
        inner = math.prod(shape[axis + 1 :])
        return inner, inner, 1, shape[axis]
    n = shape[-1]
    g = min(group_size, n)
    ng = _ceil_div(n, g)
    return n, g, ng, numel // n * ng


def _host_value(raw: np.ndarray, name: str) -> np.float32:
    """The float32 value of one element copied back from the device, for the error message."""
    if name == "F32":
        return raw.view(np.float32)[0]
    bits = raw.view(np.uint16)
    if name == "F16":
        return bits.view(np.float16).astype(np.float32)[0]
    return (bits.astype(np.uint32) << 16).view(np.float32)[0]


def quantize_int8(
    x,
    *,
    granularity: str = "channel",
    axis: int = 0,
    group_size: int = 128,
    dtype_name: str | None = None,
    check: bool = True,
    stream=None,
    out=None,
):
    """Device twin of :func:`cupycodec.quant.reference.quantize_int8`, bit-identical to it.

    Parameters
    ----------
    x : cupy.ndarray
        C-contiguous float32 or float16, or bfloat16 (an ml_dtypes dtype where CuPy has one, else its bits as
        uint16/int16 with ``dtype_name="BF16"``).
    granularity, axis, group_size
        As for the reference.
    dtype_name : {"F32", "F16", "BF16"}, optional
        The logical dtype of `x`; defaults from ``x.dtype``.
    check : bool
        Check the domain (finite, ``|x| < 2**127``) on the device, inside the first kernel that reads `x`; costs one
        synchronization. With ``check=False`` out-of-domain input gives unspecified codes.
    stream : cupy.cuda.Stream, optional
        Stream to run on; the current stream by default.
    out : tuple of (cupy.ndarray or None, cupy.ndarray or None), optional
        Preallocated ``(codes, scales)``: C-contiguous int8 of ``x.shape`` and float32 of the reference's scale
        shape. They are overwritten even if the domain check then fails.

    Returns
    -------
    (codes, scales) : tuple of cupy.ndarray

    Raises
    ------
    TypeError
        If `x` is not a cupy array; :class:`~cupycodec.errors.UnsupportedDtypeError` for an unsupported dtype.
    ValueError
        For bad parameters, non-contiguous input, a bad `out`, or (``check=True``) input outside the domain, with the
        reference's message naming the first offending element.

    Notes
    -----
    Contiguous segments (groups; channels along axis 0; small tensors) take one pass over the input: a warp team or a
    block computes the segment's absmax, then quantizes it from registers (or re-reading it from L1/L2 when it is
    long or not vector-aligned). A large per-tensor quantization needs the whole tensor's max before writing any
    code, so it reads the input twice (a reduction, then an elementwise pass); so do channel axes other than the
    leading one, and segments too few to fill the GPU.
    """
    import cupy

    from ..quant import reference  # the specification: parameter rules, shapes and the domain error text

    _require_cupy(cupy, x, "x")
    name = _input_name(x, dtype_name)
    granularity, axis, group_size = reference.check_params(x.shape, granularity, axis, group_size)
    _require_contiguous(x, "x")
    sshape = reference.scale_shape(x.shape, granularity, axis or 0, group_size or 1)
    if out is None:
        out = (None, None)
    if not isinstance(out, tuple) or len(out) != 2:
        raise ValueError("out must be a (codes, scales) tuple; either may be None")
    with _on(stream):
        codes = _output(cupy, out[0], x.shape, ("int8",), np.int8, "out[0] (codes)")
        scales = _output(cupy, out[1], sshape, ("float32",), np.float32, "out[1] (scales)")
        if x.size == 0:
            if scales.size:
                scales.fill(1)  # channels without elements: absmax 0, scale 1 (the reference's rule)
            return codes, scales
        bad = np.uint64(0)  # a null pointer by value: older CuPy passes None as a null *argument address*
        if check:
            bad = cupy.empty(1, dtype=np.uint64)
            cupy.cuda.runtime.memsetAsync(bad.data.ptr, 0xFF, 8, cupy.cuda.get_current_stream().ptr)
        _launch_quantize(cupy, x, codes, scales, _INPUTS[name], granularity, axis, group_size, bad)
        if check:
            first = int(bad.get()[0])
            if first != _NO_BAD:
                index = tuple(int(i) for i in np.unravel_index(first, x.shape))
                raw = x.reshape(-1)[first : first + 1].get()
                raise reference._domain_error(index, _host_value(raw, name))
    return codes, scales


def _magic(d: int) -> np.uint64:
    """ceil(2**64 / d), the multiplier of cc_div (unused for d == 1)."""
    return np.uint64(0 if d <= 1 else -(-(1 << 64) // d))


def _divisor(d: int) -> tuple[np.int64, np.uint64]:
    return np.int64(d), _magic(d)


def _map_args(n: int, g: int, ng: int, C: int) -> tuple:
    return (*_divisor(n), *_divisor(g), *_divisor(ng), *_divisor(C))


def _launch_quantize(cupy, x, codes, scales, suffix, granularity, axis, group_size, bad):
    shape, numel = x.shape, x.size
    sms = _sm_count(cupy.cuda.Device().id)
    vec = _aligned(x, codes)
    V = 16 // x.dtype.itemsize if vec else 1
    n, g, ng, C = _layout(shape, granularity, axis, group_size)
    nseg = numel // n * ng
    outer = numel // (n * C) if granularity == "channel" else 1
    contiguous = granularity == "group" or (granularity == "channel" and outer == 1)
    if granularity == "tensor":
        fused = numel <= _SMALL_TENSOR
    else:
        fused = contiguous and (nseg >= 2 * sms or g <= _SHORT_SEGMENT)
    # every segment starts on a vector boundary and holds whole vectors: the register-resident kernels apply
    whole_vectors = vec and n % V == 0 and g % V == 0

    if fused:  # one pass; the scale index of segment s is s
        seg = (_i64(nseg), *_map_args(n, g, ng, nseg))
        if whole_vectors and g <= 32 * V:
            tpg = _pow2_at_least(g // V)
            warps = _ceil_div(nseg, (32 // tpg) * _TEAM_K)
            grid = min(_ceil_div(warps * 32, _BLOCK), sms * 32)
            _kernel(f"cupycodec_int8_quantize_team_{suffix}")(
                (grid,), (_BLOCK,), (x, codes, scales, *seg, np.int32(tpg), bad)
            )
        elif g <= 32 * max(V, 4) * 2:
            tpg = min(32, _pow2_at_least(_ceil_div(g, V)))
            grid = min(_ceil_div(nseg * tpg, _BLOCK), sms * 64)
            _kernel(f"cupycodec_int8_quantize_warp_{suffix}")(
                (grid,), (_BLOCK,), (x, codes, scales, *seg, np.int32(tpg), np.int32(vec), bad)
            )
        else:
            block = min(1024, max(64, _pow2_at_least(_ceil_div(g, V * _BLOCK_K))))
            reg = whole_vectors and g <= block * V * _BLOCK_K
            grid = min(nseg, sms * 32)
            _kernel(f"cupycodec_int8_quantize_block_{suffix}")(
                (grid,), (block,), (x, codes, scales, *seg, np.int32(reg), np.int32(vec), bad)
            )
        return

    # two passes: absmax into the scales buffer (as float bits, from zero), absmax -> scale, then quantize
    cupy.cuda.runtime.memsetAsync(scales.data.ptr, 0, scales.nbytes, cupy.cuda.get_current_stream().ptr)
    if granularity == "channel" and outer > 1 and n < _COLUMN_INNER:
        P = C * n
        vcol = vec and P % V == 0
        Vc = V if vcol else 1
        ntiles = _ceil_div(P // Vc, 32)
        nchunks = max(1, min(_ceil_div(outer, 8), _ceil_div(sms * 16, ntiles)))
        rpc = _ceil_div(outer, nchunks)
        nchunks = _ceil_div(outer, rpc)
        grid = min(ntiles * nchunks, 2**31 - 1)
        _kernel(f"cupycodec_int8_absmax_col_{suffix}")(
            (grid,), (_BLOCK,),
            (x, scales, _i64(outer), _i64(P), *_divisor(n), *_divisor(ntiles), _i64(rpc), _i64(nchunks),
             np.int32(vcol), bad),
        )
    else:
        block = 512
        chunks = max(1, min(_ceil_div(g, block * V * 4), _ceil_div(sms * 8, nseg)))
        chunk_len = _ceil_div(_ceil_div(g, chunks), 64) * 64
        chunks = _ceil_div(g, chunk_len)
        grid = min(nseg * chunks, sms * 32)
        _kernel(f"cupycodec_int8_absmax_seg_{suffix}")(
            (grid,), (block,),
            (x, scales, _i64(nseg), *_map_args(n, g, ng, C), *_divisor(chunks), _i64(chunk_len), np.int32(vec), bad),
        )
    nscales = scales.size
    _kernel("cupycodec_int8_finalize_f32")(
        (min(_ceil_div(nscales, _BLOCK), sms * 8),), (_BLOCK,), (scales, _i64(nscales))
    )
    grid = min(max(1, _ceil_div(numel // V, _BLOCK)), sms * 64)
    _kernel(f"cupycodec_int8_quantize_apply_{suffix}")(
        (grid,), (_BLOCK,), (x, codes, scales, _i64(numel), *_map_args(n, g, ng, C), np.int32(vec))
    )


def dequantize_int8(
    codes,
    scales,
    *,
    granularity: str = "channel",
    axis: int = 0,
    group_size: int = 128,
    dtype_name: str = "F32",
    out=None,
    stream=None,
):
    """Device twin of :func:`cupycodec.quant.reference.dequantize_int8`, bit-identical to it.

    Parameters
    ----------
    codes : cupy.ndarray
        C-contiguous int8.
    scales : cupy.ndarray
        C-contiguous float32 of the reference's scale shape for ``codes.shape``.
    granularity, axis, group_size
        The values the codes were quantized with.
    dtype_name : {"F32", "F16", "BF16", "F64"}
        Output dtype. ``"BF16"`` is returned as its uint16 bits (round half to even, as ml_dtypes).
    out : cupy.ndarray, optional
        C-contiguous, of ``codes.shape`` and the storage dtype (float32, float16, uint16 for BF16, float64); then
        nothing is allocated.
    stream : cupy.cuda.Stream, optional
        Stream to run on; the current stream by default.

    Returns
    -------
    cupy.ndarray

    Raises
    ------
    TypeError
        If an argument is not a cupy array; :class:`~cupycodec.errors.UnsupportedDtypeError` for codes that are not
        int8 or an unknown `dtype_name`.
    ValueError
        For bad parameters, non-contiguous arrays, scales of the wrong dtype or shape, or a bad `out`.
    """
    import cupy

    from ..quant import reference

    _require_cupy(cupy, codes, "codes")
    _require_cupy(cupy, scales, "scales")
    if codes.dtype != np.int8:
        raise UnsupportedDtypeError(codes.dtype, ["int8"], "dequantize_int8 reads the codes quantize_int8 returns")
    if dtype_name not in _OUTPUTS:
        raise UnsupportedDtypeError(dtype_name, list(_OUTPUTS), "dtype_name names the output dtype")
    granularity, axis, group_size = reference.check_params(codes.shape, granularity, axis, group_size)
    _require_contiguous(codes, "codes")
    sshape = reference.scale_shape(codes.shape, granularity, axis or 0, group_size or 1)
    if scales.dtype != np.float32 or scales.shape != sshape:
        raise ValueError(
            f"scales must be float32 of shape {sshape} for codes of shape {codes.shape} and "
            f"granularity={granularity!r}, got {scales.dtype} of shape {scales.shape}; "
            "pass the scales quantize_int8 returned with the same parameters"
        )
    _require_contiguous(scales, "scales")
    suffix, storage, allocate = _OUTPUTS[dtype_name]
    with _on(stream):
        y = _output(cupy, out, codes.shape, storage, allocate, "out")
        numel = codes.size
        if numel == 0:
            return y
        n, g, ng, C = _layout(codes.shape, granularity, axis, group_size)
        vec = _aligned(codes, y)
        V = 16 if vec else 1
        grid = min(max(1, _ceil_div(numel // V, _BLOCK)), _sm_count(cupy.cuda.Device().id) * 64)
        _kernel(f"cupycodec_int8_dequantize_{suffix}")(
            (grid,), (_BLOCK,), (codes, scales, y, _i64(numel), *_map_args(n, g, ng, C), np.int32(vec))
        )
    return y
