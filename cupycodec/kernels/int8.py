"""CUDA kernels for symmetric absmax int8 quantization. Reference: :mod:`cupycodec.quant.reference`.

Every result (codes, scales, dequantized values) is bit-identical to the reference; ``tests/gpu/test_kernels_int8.py``
pins them together. Importing this module does not import CuPy: the source is compiled on first use.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading

import numpy as np

from .._cuda import kernel_handle, launch
from ..errors import UnsupportedDtypeError

__all__ = ["dequantize_int8", "quantize_int8"]

# Arithmetic matches quant.reference bit for bit: absmax is an exact max, scale = RN(absmax / 127) (computed as
# absmax * (1 / 127) in double, which rounds to the same float; see cc_scale), scales below 2**-126 become 1,
# code = rintf(x / scale) (IEEE division, round half to even) clamped to [-127, 127], y = __fmul_rn(code, scale) (never
# contracted into an FMA). Where one scale covers a whole vector, rintf(x / scale) is computed from x * (1 / scale)
# and values within 2**-15 of a tie are redone with the division; cc_codes_packed proves the codes identical. Keep it
# that way: no --use_fast_math (NVRTC's defaults are -prec-div=true -ftz=false). No #include either (NVRTC include
# paths differ between CUDA 12 and 13): fp16 converts with inline PTX, bf16 with integer bit operations, or the sm_80+
# pair conversions for output.
#
# Layout vocabulary shared by all kernels: the C-contiguous input is a sequence of *segments* (runs of elements that
# share a scale). Rows of n elements are cut into ng segments of g elements (the last one may be shorter); segment s
# starts at (s / ng) * n + (s % ng) * g and uses scale (s % C). This covers
#   tensor:                 n = g = numel, ng = 1, C = 1
#   channel (outer, C, inner) view:  n = g = inner, ng = 1, scale of segment s is s % C
#   group:                  n = shape[-1], g = min(group_size, n), ng = ceil(n / g), C = rows * ng
# Divisions by these launch constants use a precomputed multiplier (cc_div).
#
# Kernels (V = 16 bytes of input: 4 float32 or 8 half; bytes per element below for bf16 input). The fast ones keep
# several 16-byte loads in flight per thread, find maxima on the integer "abs bits" of the input (no conversions; a
# NaN or an out-of-domain value shows up in the same max, so the domain check is one compare per tile), write codes
# with 4- or 8-byte stores built without conversion instructions, and run on a persistent grid sized from the SM
# count and the kernel's register use:
#   quantize_flat   one pass, 3 B/elem (2 read + 1 written): equal segments of 2**k whole vectors laid end to end
#                   (groups with n % g == 0, leading-axis channel rows up to 128 vectors). Warp tiles of 4 x 512
#                   bytes; a reduce-scatter across each segment's lanes leaves one scale per lane to compute.
#   quantize_team   one pass: segments of <= 32 vectors that are not a power of two or do not tile the rows.
#   quantize_warp   one pass, the same traffic plus an L1 re-read: the general (ragged, unaligned) short segment.
#   quantize_block  one pass; a block per long contiguous segment (channel rows of a C-contiguous array, long groups),
#                   up to 4 vectors per thread held in registers (else re-read from L1/L2); 64..1024 threads.
#   absmax_all +    per-tensor, aligned, two passes (5 B/elem in all: the whole tensor's max comes before any code):
#   quantize_all    a grid-stride max with 8 loads in flight per thread and one atomic per block, then the codes,
#                   walking the tensor backwards so that its first reads hit what pass 1 left in L2.
#   absmax_seg      pass 1 of 2 when segments are few and long (or a tensor is not aligned): 512-thread blocks reduce
#                   chunks, atomicMax on float bits.
#   absmax_col      pass 1 of 2 for channel axes with a short inner extent (e.g. per-column scales): each lane keeps
#                   the max of V columns over a strip of rows, 8 warps merge in shared memory, atomicMax per channel.
#   finalize        absmax -> scale in place (the scales buffer holds absmax bits during pass 1).
#   quantize_apply  pass 2: elementwise, scale index from the flat index.
#   dequantize      elementwise, 16 codes per thread and step, scale index from the flat index; 1 + 2 B/elem to bf16.
# atomicMax on the bits of non-negative floats orders them like the floats, so pass 1 is deterministic. The optional
# domain check (|x| < 2**127, finite) runs inside whichever kernel reads the input first; only a thread that has seen
# such a value records its smallest offending flat index with atomicMin and raises a flag in pinned host memory
# (cc_flag), so an in-domain call costs one stream synchronization and nothing else. Vector accesses need every base
# pointer 16-byte aligned (else the scalar variants run); segment heads and tails that are not vector-aligned are
# handled element by element.
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
/* Abs bits: an element's bits with the sign cleared (16 bits for half types). They order like |x|, with inf above every
   finite value and NaN above inf, so an integer max over them is the absmax and flags NaN too: |x| is out of the domain
   (NaN, inf, |x| >= 2**127) iff its abs bits are >= BAD. absbits() is the max over a 16-byte vector (half types: two
   at a time with __vmaxu2, one instruction on sm_90), absval() the float32 value of abs bits. */
#define CC_ABS2 0x7fff7fffu
__device__ __forceinline__ unsigned int cc_umax(unsigned int a, unsigned int b) { return a > b ? a : b; }
__device__ __forceinline__ unsigned int cc_absbits_half(const cc_v16& r) {
    const unsigned int a = __vmaxu2(__vmaxu2(r.w[0] & CC_ABS2, r.w[1] & CC_ABS2), __vmaxu2(r.w[2] & CC_ABS2, r.w[3] & CC_ABS2));
    return cc_umax(a & 0xffffu, a >> 16);
}

struct cc_in_f32 {
    typedef float T;
    enum { V = 4 };
    static const unsigned int BAD = 0x7f000000u;
    static __device__ __forceinline__ float cvt(float v) { return v; }
    static __device__ __forceinline__ unsigned int absbits(const cc_v16& r) {
        return cc_umax(cc_umax(r.w[0] & 0x7fffffffu, r.w[1] & 0x7fffffffu), cc_umax(r.w[2] & 0x7fffffffu, r.w[3] & 0x7fffffffu));
    }
    static __device__ __forceinline__ unsigned int absbits1(float v) { return __float_as_uint(v) & 0x7fffffffu; }
    static __device__ __forceinline__ float absval(unsigned int b) { return __uint_as_float(b); }
    static __device__ __forceinline__ void unpack(const cc_v16& r, float* f) {
        for (int j = 0; j < 4; ++j) f[j] = __uint_as_float(r.w[j]);
    }
};
struct cc_in_f16 {
    typedef unsigned short T;
    enum { V = 8 };
    static const unsigned int BAD = 0x7c00u; /* inf; every finite half is below 2**127 */
    static __device__ __forceinline__ float cvt(unsigned short v) { return cc_f16_to_f32(v); }
    static __device__ __forceinline__ unsigned int absbits(const cc_v16& r) { return cc_absbits_half(r); }
    static __device__ __forceinline__ unsigned int absbits1(unsigned short v) { return v & 0x7fffu; }
    static __device__ __forceinline__ float absval(unsigned int b) { return cc_f16_to_f32((unsigned short)b); }
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
    static const unsigned int BAD = 0x7f00u; /* 2**127 */
    static __device__ __forceinline__ float cvt(unsigned short v) { return __uint_as_float(((unsigned int)v) << 16); }
    static __device__ __forceinline__ unsigned int absbits(const cc_v16& r) { return cc_absbits_half(r); }
    static __device__ __forceinline__ unsigned int absbits1(unsigned short v) { return v & 0x7fffu; }
    static __device__ __forceinline__ float absval(unsigned int b) { return __uint_as_float(b << 16); }
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
/* RN(absmax / 127) without a float division: absmax * RN64(1 / 127) in double, rounded to float. 1 / 127 repeats with
   a period of 7 bits, so absmax / 127 is either a float or at least 2**-33 (relative) away from every float rounding
   boundary (subnormal ones included), while the double product is within 2**-52 of it: both round to the same float.
   A brute force over every finite non-negative float agrees. */
__device__ __forceinline__ float cc_scale(float absmax) {
    const float s = __double2float_rn(__dmul_rn((double)absmax, 1.0 / 127.0));
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
/* The domain check's record of an out-of-domain element i (the rare path): bad[0] keeps the smallest such flat index
   (atomicMin from all ones), and the host-mapped word at address bad[2] (pinned host memory, which unified addressing
   lets kernels write through its host pointer) becomes 1, so the host learns after its stream synchronization that
   there is an index to fetch, without copying anything back when there is none. */
__device__ __forceinline__ void cc_flag(u64* bad, u64 i) {
    atomicMin(bad, i);
    *reinterpret_cast<volatile unsigned int*>(bad[2]) = 1u;
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
                cc_flag(bad, (u64)(i + e));
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
   codes equal cc_code's bit for bit. Any rcp within half an ulp of 1 / scale keeps these bounds. __fmul_rn /
   __fadd_rn / __fsub_rn: no FMA contraction.
   N = 4 or 8 codes come packed four to a word (element e in byte e % 4 of word e / 4), without conversion
   instructions: r = RN(p + 1.5 * 2**23) is 1.5 * 2**23 + rint(p) (round half to even) for |p| < 2**22, so the low byte
   of its bits is rint(p) mod 256, and r - 1.5 * 2**23 = rint(p) exactly for the tie test. In-domain |p| < 127.00001
   rounds into [-127, 127], so no clamp is needed; with out-of-domain input (check=False) p is still within that range
   or NaN, and the code is then unspecified but never -128. */
#define CC_MAGIC 12582912.0f
template <int N>
__device__ __forceinline__ void cc_codes_packed(const float* v, float scale, float rcp, unsigned int* w) {
    unsigned int b[N];
    bool near = false;
    for (int e = 0; e < N; ++e) {
        const float p = __fmul_rn(v[e], rcp);
        const float r = __fadd_rn(p, CC_MAGIC);
        near |= fabsf(__fsub_rn(p, __fsub_rn(r, CC_MAGIC))) > 0.499969482421875f; /* 0.5 - 2**-15 */
        b[e] = __float_as_uint(r);
    }
    if (near) {
        for (int e = 0; e < N; ++e) b[e] = (unsigned int)cc_code(v[e], scale);
    }
    for (int j = 0; j < N / 4; ++j)
        w[j] = __byte_perm(__byte_perm(b[4 * j], b[4 * j + 1], 0x0040), __byte_perm(b[4 * j + 2], b[4 * j + 3], 0x0040),
                           0x5410);
}
/* N == 1: one code; N == 4 or 8: codes of aligned vectors, one 4- or 8-byte store */
template <int N>
__device__ __forceinline__ void cc_quantize_store(const float* v, float scale, float rcp, signed char* q) {
    if (N == 1) {
        q[0] = (signed char)cc_code(v[0], scale);
    } else if (N == 4) {
        unsigned int w[1];
        cc_codes_packed<4>(v, scale, rcp, w);
        *reinterpret_cast<unsigned int*>(q) = w[0];
    } else {
        cc_v8 o;
        cc_codes_packed<8>(v, scale, rcp, o.w);
        *reinterpret_cast<cc_v8*>(q) = o;
    }
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

/* max of abs bits over the block; blockDim.x is a multiple of 32; every thread gets the result */
__device__ __forceinline__ unsigned int cc_block_umax(unsigned int m, unsigned int* red) {
    for (int o = 16; o > 0; o >>= 1) m = cc_umax(m, __shfl_xor_sync(CC_FULL, m, o));
    const int lane = threadIdx.x & 31;
    if (lane == 0) red[threadIdx.x >> 5] = m;
    __syncthreads();
    m = lane < (int)(blockDim.x >> 5) ? red[lane] : 0u;
    for (int o = 16; o > 0; o >>= 1) m = cc_umax(m, __shfl_xor_sync(CC_FULL, m, o));
    __syncthreads(); /* red is reused by the next call */
    return m;
}

/* The domain check's slow path, taken only when a thread's abs-bits max is >= D::BAD: record the first out-of-domain
   element among its K aligned vectors raw[k] at vector index v0 + k * step (ascending) below nvec. */
template <class D, int K>
__device__ __forceinline__ void cc_flag_first(const cc_v16* raw, i64 v0, i64 step, i64 nvec, u64* bad) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const i64 v = v0 + k * step;
        if (v >= nvec) return;
        float f[D::V];
        D::unpack(raw[k], f);
        for (int e = 0; e < D::V; ++e) {
            if (!(fabsf(f[e]) < CC_LIMIT)) {
                cc_flag(bad, (u64)(v * D::V + e));
                return;
            }
        }
    }
}

/* One pass over nvec aligned vectors (16-byte-aligned x and q) that form equal segments of GV = 2**LOG_GV vectors, laid
   end to end with scale s for segment s (groups with n % g == 0; channel rows of a leading axis). A warp takes tiles of
   32 * K vectors, lane l loading vectors l, l + 32, ... of its tile: each load is one coalesced 512-byte run and a lane
   has K of them in flight. A tile holds G whole segment slots: GV <= 32 gives teams of TPG = GV lanes, slot j of a team
   being its load j; GV > 32 makes the warp one team and slot j its loads j * R .. j * R + R - 1 (R = GV / 32), merged in
   the lane first. The team max of the G slots is a reduce-scatter over the top S = min(log2 TPG, log2 G) lane bits
   (each step swaps half of the slots with the partner lane) and then a butterfly over the other bits, so each lane
   ends up with H = G / 2**S slots (a chunk), computes their scales and reciprocals alone, stores them (one lane per
   chunk) and the team fetches them with shuffles: per tile and lane, one scale instead of G. The domain check costs
   one compare per tile. Codes go out as 8-byte (half types) or 4-byte (float32) stores. The tile loop bound is uniform
   per warp, so every lane reaches the shuffles. */
#define CC_FLAT_K 4 /* loads per lane and tile; a power of two */
#define CC_FLAT_LOG_K 2
template <class D, int LOG_GV>
__device__ void cc_quantize_flat(const typename D::T* __restrict__ x, signed char* __restrict__ q,
                                 float* __restrict__ scale, i64 nvec, u64* bad) {
    enum {
        V = D::V,
        K = CC_FLAT_K,
        LOG_TPG = LOG_GV < 5 ? LOG_GV : 5,
        TPG = 1 << LOG_TPG,
        R = LOG_GV > 5 ? 1 << (LOG_GV - 5) : 1,
        LOG_G = LOG_GV > 5 ? CC_FLAT_LOG_K - (LOG_GV - 5) : CC_FLAT_LOG_K,
        G = 1 << LOG_G,
        S = LOG_TPG < LOG_G ? LOG_TPG : LOG_G,
        H = G >> S,
        LOW = LOG_TPG - S /* lane bits below the chunk bits */
    };
    const int lane = threadIdx.x & 31, team = lane & ~(TPG - 1);
    const int chunk = (lane & (TPG - 1)) >> LOW; /* this lane's slots: chunk * H .. chunk * H + H - 1 */
    const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const i64 nwarps = ((i64)gridDim.x * blockDim.x) >> 5;
    const i64 ntiles = (nvec + 32 * K - 1) / (32 * K);
    for (i64 tile = warp; tile < ntiles; tile += nwarps) {
        const i64 t0 = tile * (32 * K), v0 = t0 + lane;
        cc_v16 raw[K];
#pragma unroll
        for (int k = 0; k < K; ++k) {
            if (v0 + 32 * k < nvec) {
                raw[k] = *reinterpret_cast<const cc_v16*>(x + (v0 + 32 * k) * V);
            } else {
                for (int j = 0; j < 4; ++j) raw[k].w[j] = 0u;
            }
        }
        unsigned int m[G], all = 0u;
#pragma unroll
        for (int j = 0; j < G; ++j) {
            m[j] = D::absbits(raw[j * R]);
            for (int r = 1; r < R; ++r) m[j] = cc_umax(m[j], D::absbits(raw[j * R + r]));
            all = cc_umax(all, m[j]);
        }
        if (bad && all >= D::BAD) cc_flag_first<D, K>(raw, v0, 32, nvec, bad);
#pragma unroll
        for (int t = 0; t < S; ++t) { /* reduce-scatter: keep the half of the slots that the lane bit selects */
            const int b = LOG_TPG - 1 - t, half = G >> (t + 1);
            const bool upper = (lane >> b) & 1;
#pragma unroll
            for (int i = 0; i < half; ++i) {
                const unsigned int keep = upper ? m[half + i] : m[i], send = upper ? m[i] : m[half + i];
                m[i] = cc_umax(keep, __shfl_xor_sync(CC_FULL, send, 1 << b));
            }
        }
        float hsc[H], hrcp[H];
#pragma unroll
        for (int i = 0; i < H; ++i) {
            for (int o = (1 << LOW) >> 1; o > 0; o >>= 1) m[i] = cc_umax(m[i], __shfl_xor_sync(CC_FULL, m[i], o));
            hsc[i] = cc_scale(D::absval(m[i]));
            hrcp[i] = 1.0f / hsc[i];
            const i64 first = t0 + 32 * R * (chunk * H + i) + team; /* first vector of the slot's segment */
            if ((lane & ((1 << LOW) - 1)) == 0 && first < nvec) scale[first >> LOG_GV] = hsc[i];
        }
#pragma unroll
        for (int j = 0; j < G; ++j) {
            float sc = hsc[j % H], rcp = hrcp[j % H];
            if (S > 0) {
                const int src = team | ((j / H) << LOW);
                sc = __shfl_sync(CC_FULL, sc, src);
                rcp = __shfl_sync(CC_FULL, rcp, src);
            }
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const i64 v = v0 + 32 * (j * R + r);
                if (v < nvec) {
                    float f[V];
                    D::unpack(raw[j * R + r], f);
                    cc_quantize_store<V>(f, sc, rcp, q + v * V);
                }
            }
        }
    }
}

/* Per-tensor pass 1 over 16-byte-aligned x: the max abs bits of all numel elements (nvec = numel / V vectors, then the
   scalar tail in block 0), merged as float32 bits into *ws with one atomicMin of the complement per block (ws starts at
   0xffffffff, so ~*ws is the absmax bits after the pass). Chunks of blockDim * CC_ALL_K vectors, grid-stride; a thread
   has CC_ALL_K loads in flight; the domain check costs one compare per chunk. */
#define CC_ALL_K 8
template <class D>
__device__ void cc_absmax_all(const typename D::T* __restrict__ x, i64 numel, unsigned int* ws, u64* bad) {
    enum { V = D::V, K = CC_ALL_K };
    __shared__ unsigned int red[32];
    const i64 nvec = numel / V, per = (i64)blockDim.x * K, nchunks = (nvec + per - 1) / per;
    unsigned int m = 0u;
    for (i64 c = blockIdx.x; c < nchunks; c += gridDim.x) {
        const i64 v0 = c * per + threadIdx.x;
        cc_v16 raw[K];
#pragma unroll
        for (int k = 0; k < K; ++k) {
            if (v0 + (i64)k * blockDim.x < nvec) {
                raw[k] = *reinterpret_cast<const cc_v16*>(x + (v0 + (i64)k * blockDim.x) * V);
            } else {
                for (int j = 0; j < 4; ++j) raw[k].w[j] = 0u;
            }
        }
        unsigned int mc = 0u;
#pragma unroll
        for (int k = 0; k < K; ++k) mc = cc_umax(mc, D::absbits(raw[k]));
        if (bad && mc >= D::BAD) cc_flag_first<D, K>(raw, v0, blockDim.x, nvec, bad);
        m = cc_umax(m, mc);
    }
    if (blockIdx.x == 0 && threadIdx.x < numel - nvec * V) { /* fewer than V elements left over */
        const i64 i = nvec * V + threadIdx.x;
        const unsigned int b = D::absbits1(x[i]);
        if (bad && b >= D::BAD) cc_flag(bad, (u64)i);
        m = cc_umax(m, b);
    }
    m = cc_block_umax(m, red);
    if (threadIdx.x == 0 && m != 0u) atomicMin(ws, ~__float_as_uint(D::absval(m)));
}

/* Per-tensor pass 2: the scale from ~*ws (block 0 stores it), codes for every element. Chunks run from the end of the
   tensor back, so the first input read is what pass 1 read last, which may still be in L2. */
template <class D>
__device__ void cc_quantize_all(const typename D::T* __restrict__ x, signed char* __restrict__ q,
                                float* __restrict__ scale, i64 numel, const unsigned int* ws) {
    enum { V = D::V, K = CC_FLAT_K };
    const float sc = cc_scale(__uint_as_float(~*ws)), rcp = 1.0f / sc;
    if (blockIdx.x == 0 && threadIdx.x == 0) scale[0] = sc;
    const i64 nvec = numel / V, per = (i64)blockDim.x * K, nchunks = (nvec + per - 1) / per;
    for (i64 c = blockIdx.x; c < nchunks; c += gridDim.x) {
        const i64 v0 = (nchunks - 1 - c) * per + threadIdx.x;
        cc_v16 raw[K];
#pragma unroll
        for (int k = 0; k < K; ++k) {
            const i64 v = v0 + (i64)k * blockDim.x;
            if (v < nvec) raw[k] = *reinterpret_cast<const cc_v16*>(x + v * V);
        }
#pragma unroll
        for (int k = 0; k < K; ++k) {
            const i64 v = v0 + (i64)k * blockDim.x;
            if (v < nvec) {
                float f[V];
                D::unpack(raw[k], f);
                cc_quantize_store<V>(f, sc, rcp, q + v * V);
            }
        }
    }
    if (blockIdx.x == 0 && threadIdx.x < numel - nvec * V) {
        const i64 i = nvec * V + threadIdx.x;
        q[i] = (signed char)cc_code(D::cvt(x[i]), sc);
    }
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
    __shared__ unsigned int ured[32];
    for (i64 s = blockIdx.x; s < nseg; s += gridDim.x) {
        i64 start, end;
        cc_segment(s, mp, start, end);
        if (V > 1 && reg) { /* start % V == 0 here */
            const i64 v0 = start / V + threadIdx.x, vend = end / V;
            cc_v16 raw[CC_BLOCK_K];
            unsigned int m = 0u;
#pragma unroll
            for (int k = 0; k < CC_BLOCK_K; ++k) {
                if (v0 + (i64)k * blockDim.x < vend) {
                    raw[k] = *reinterpret_cast<const cc_v16*>(x + (v0 + (i64)k * blockDim.x) * V);
                    m = cc_umax(m, D::absbits(raw[k]));
                }
            }
            if (bad && m >= D::BAD) cc_flag_first<D, CC_BLOCK_K>(raw, v0, blockDim.x, vend, bad);
            const float sc = cc_scale(D::absval(cc_block_umax(m, ured))), rcp = 1.0f / sc;
            if (threadIdx.x == 0) scale[s] = sc;
#pragma unroll
            for (int k = 0; k < CC_BLOCK_K; ++k) {
                const i64 v = v0 + (i64)k * blockDim.x;
                if (v < vend) {
                    float f[D::V]; /* V == D::V in this branch */
                    D::unpack(raw[k], f);
                    cc_quantize_store<D::V>(f, sc, rcp, q + v * D::V);
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
            cc_quantize_store<V>(f, sc, 1.0f / sc, q + i);
        } else {
            float s[V];
            cc_scales_of<V>(scale, i, mp, s);
            for (int e = 0; e < V; ++e) c[e] = cc_code(f[e], s[e]);
            cc_store_codes<V>(q + i, c);
        }
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

/* V == 16 (16-byte code loads) or 1; blocks blk of nblk share the work (a launch's grid, or a share of one) */
template <class O, int V>
__device__ void cc_dequantize(const signed char* __restrict__ q, const float* __restrict__ scale,
                              typename O::T* __restrict__ y, i64 numel, cc_map mp, i64 blk, i64 nblk) {
    const i64 nvec = numel / V, tid = blk * blockDim.x + threadIdx.x;
    const i64 stride = nblk * blockDim.x;
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

/* 16-byte-aligned input only (the launcher picks the general kernels otherwise) */
#define CC_ALIGNED_KERNELS(NAME, D)                                                                                 \
    extern "C" __global__ void __launch_bounds__(256) cupycodec_int8_absmax_all_##NAME(                             \
        const D::T* x, i64 numel, unsigned int* ws, u64* bad) {                                                     \
        cc_absmax_all<D>(x, numel, ws, bad);                                                                        \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256) cupycodec_int8_quantize_all_##NAME(                           \
        const D::T* x, signed char* q, float* scale, i64 numel, const unsigned int* ws) {                           \
        cc_quantize_all<D>(x, q, scale, numel, ws);                                                                 \
    }                                                                                                               \
    CC_FLAT_KERNEL(NAME, D, 1, 0)                                                                                   \
    CC_FLAT_KERNEL(NAME, D, 2, 1)                                                                                   \
    CC_FLAT_KERNEL(NAME, D, 4, 2)                                                                                   \
    CC_FLAT_KERNEL(NAME, D, 8, 3)                                                                                   \
    CC_FLAT_KERNEL(NAME, D, 16, 4)                                                                                  \
    CC_FLAT_KERNEL(NAME, D, 32, 5)                                                                                  \
    CC_FLAT_KERNEL(NAME, D, 64, 6)                                                                                  \
    CC_FLAT_KERNEL(NAME, D, 128, 7)
/* segments of GV vectors */
#define CC_FLAT_KERNEL(NAME, D, GV, LOG_GV)                                                                         \
    extern "C" __global__ void __launch_bounds__(256) cupycodec_int8_quantize_flat##GV##_##NAME(                    \
        const D::T* x, signed char* q, float* scale, i64 nvec, u64* bad) {                                          \
        cc_quantize_flat<D, LOG_GV>(x, q, scale, nvec, bad);                                                        \
    }

CC_ALIGNED_KERNELS(f32, cc_in_f32)
CC_ALIGNED_KERNELS(f16, cc_in_f16)
CC_ALIGNED_KERNELS(bf16, cc_in_bf16)

/* Several dequantizations in one launch (a decode plan's stage): desc holds CC_DESC u64 words per tensor: codes,
   scales, output, numel, the 8 map words, vec, its first block and its block count. Blocks find their tensor by a
   scan (tensors are few: a transformer block's matrices) and run the same element code as the single kernel. */
#define CC_DESC 16
template <class O>
__device__ void cc_dequantize_many(const u64* __restrict__ desc, int items) {
    int k = 0;
    while (k + 1 < items && desc[CC_DESC * (k + 1) + 13] <= (u64)blockIdx.x) ++k;
    const u64* d = desc + CC_DESC * k;
    const cc_map mp = {{(i64)d[4], d[5]}, {(i64)d[6], d[7]}, {(i64)d[8], d[9]}, {(i64)d[10], d[11]}};
    const i64 blk = (i64)blockIdx.x - (i64)d[13], nblk = (i64)d[14];
    if (blk >= nblk) return;
    const signed char* q = (const signed char*)d[0];
    const float* scale = (const float*)d[1];
    typename O::T* y = (typename O::T*)d[2];
    if (d[12]) cc_dequantize<O, 16>(q, scale, y, (i64)d[3], mp, blk, nblk);
    else cc_dequantize<O, 1>(q, scale, y, (i64)d[3], mp, blk, nblk);
}

#define CC_OUTPUT_KERNEL(NAME, O)                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) cupycodec_int8_dequantize_##NAME(                             \
        const signed char* q, const float* scale, O::T* y, i64 numel, CC_MAP_PARAMS, int vec) {                    \
        const cc_map mp = CC_MAP;                                                                                   \
        if (vec) cc_dequantize<O, 16>(q, scale, y, numel, mp, blockIdx.x, gridDim.x);                              \
        else cc_dequantize<O, 1>(q, scale, y, numel, mp, blockIdx.x, gridDim.x);                                   \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256) cupycodec_int8_dequantize_many_##NAME(                        \
        const u64* desc, int items) {                                                                               \
        cc_dequantize_many<O>(desc, items);                                                                         \
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
_F32_DTYPE, _U16_DTYPE, _I8_DTYPE = np.dtype(np.float32), np.dtype(np.uint16), np.dtype(np.int8)
_INPUT_HELP = "float32, float16, bfloat16 (an ml_dtypes dtype, or uint16/int16 bits with dtype_name='BF16')"
_BLOCK = 256
_NO_BAD = 0xFFFF_FFFF_FFFF_FFFF
_SMALL_TENSOR = 1 << 16  # elements; a smaller tensor is quantized in one pass by a single block
_SHORT_SEGMENT = 4096  # elements; longer segments, fewer than 2 per SM, take two passes spread over many blocks
_COLUMN_INNER = 1024  # channel axes whose inner extent is shorter use the column-strip absmax kernel
_TEAM_K = 4  # CC_TEAM_K: segments per team and step in quantize_team
_BLOCK_K = 4  # CC_BLOCK_K: vectors per thread held in registers by quantize_block
_FLAT_K = 4  # CC_FLAT_K: loads per lane and tile in quantize_flat and quantize_all
_ALL_K = 8  # CC_ALL_K: loads per thread and chunk in absmax_all
_NULL = np.uint64(0)  # a null pointer by value: older CuPy passes None as a null *argument address*
_MEMSET_SCALES = "memset scales"  # a plan step: zero the scales buffer (it collects absmax bits in pass 1)
_FLAGS = threading.local()  # per thread: {(device, stream): (flags, ws, pinned host word)}
_RETIRED_FLAGS: list = []  # entries of interrupted calls (see _drop_flags)


@functools.cache
def _module():
    import cupy  # lazy: importing this module must not import cupy

    # Compiled on first get_function; CuPy memoizes per device and on disk ($HOME/.cupy/kernel_cache).
    return cupy.RawModule(code=_SOURCE)


def _kernel(name: str):
    import cupy

    return _kernel_on(cupy.cuda.runtime.getDevice(), name)


@functools.cache
def _kernel_on(device: int, name: str):
    return _module().get_function(name)  # compiled once per device, on first launch; a Function is per device


@functools.cache
def _sm_count(device_id: int) -> int:
    import cupy

    runtime = cupy.cuda.runtime
    return int(runtime.deviceGetAttribute(runtime.cudaDevAttrMultiProcessorCount, device_id))


@functools.cache
def _resident_blocks(name: str, threads: int) -> int:
    """Blocks of `threads` that fit on one SM at once, from the kernel's register count (64K registers, 2048 threads
    and 32 blocks per SM on sm_80 and sm_90; a smaller SM only makes a persistent grid run in two waves)."""
    regs = int(getattr(_kernel(name), "num_regs", 64))  # a CuPy without the attribute; compile errors propagate
    per_block = _ceil_div(max(regs, 1), 8) * 8 * threads
    return max(1, min(2048 // threads, 32, 65536 // per_block))


def _params(shape, granularity, axis, group_size):
    """reference.check_params plus the scale shape, memoized on the (typed) arguments: parameter checks are the same
    Python code as the reference's, run once per distinct call signature."""
    key = (shape, granularity, type(granularity), axis, type(axis), group_size, type(group_size))
    try:
        return _params_cached(key)
    except TypeError:  # unhashable arguments: check_params rejects them with its own message
        return _params_uncached(shape, granularity, axis, group_size)


@functools.lru_cache(maxsize=1024)
def _params_cached(key):
    shape, granularity, _, axis, _, group_size, _ = key
    return _params_uncached(shape, granularity, axis, group_size)


def _params_uncached(shape, granularity, axis, group_size):
    from ..quant import reference  # the specification: parameter rules and scale shapes

    granularity, axis, group_size = reference.check_params(shape, granularity, axis, group_size)
    return granularity, axis, group_size, reference.scale_shape(shape, granularity, axis or 0, group_size or 1)


def _flags(cupy, device: int, stream_ptr: int):
    """(key, flags, ws, host): device words for this thread, device and stream, kept between calls.

    flags is uint64[3]: flags[0] collects the first out-of-domain flat index (atomicMin from all ones), the low half of
    flags[1] (the view ws) the per-tensor absmax (atomicMin of complemented bits from all ones), and flags[2] holds the
    address of host, a pinned word that a kernel sets to 1 when it records an index (see cc_flag). A call that found
    nothing leaves flags[0] and host as they were and resets ws, so the common path neither copies back nor clears
    anything; a call that found something clears both before it raises. Calls on one stream from one thread are
    ordered and each thread has its own buffers; a dropped entry's memory goes back to CuPy's pool, which reuses it in
    stream order.
    """
    cache = getattr(_FLAGS, "cache", None)
    if cache is None:
        cache = _FLAGS.cache = {}
    key = (device, stream_ptr)
    entry = cache.get(key)
    if entry is None:
        if len(cache) >= 16:  # streams come and go
            cache.clear()
        runtime = cupy.cuda.runtime
        host = np.frombuffer(cupy.cuda.alloc_pinned_memory(8), dtype=np.uint64, count=1)
        host[0] = 0
        flags = cupy.empty(3, dtype=np.uint64)
        runtime.memsetAsync(flags.data.ptr, 0xFF, 16, stream_ptr)
        address = np.array([host.ctypes.data], dtype=np.uint64)  # pageable: copied before memcpyAsync returns
        runtime.memcpyAsync(flags.data.ptr + 16, address.ctypes.data, 8, runtime.memcpyHostToDevice, stream_ptr)
        entry = cache[key] = (flags, flags[1:2], host)
    return (key, *entry)


def _drop_flags(key) -> None:
    """Forget the entry of a call that failed or was interrupted. It is kept alive, never freed: a kernel of that
    call may still be running and write the pinned word."""
    cache = getattr(_FLAGS, "cache", None)
    if cache is not None and key is not None and key in cache:
        _RETIRED_FLAGS.append(cache.pop(key))


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
    if dt is _F32_DTYPE and dtype_name in (None, "F32"):  # identity of NumPy's builtin dtypes: dt.name is slow
        return "F32"
    if dt is _U16_DTYPE and dtype_name == "BF16":
        return "BF16"
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
    dt = out.dtype
    if (dt is not allocate and dt.name not in dtypes) or out.shape != tuple(shape) or not out.flags.c_contiguous:
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
        stream synchronization (when the input is in the domain, nothing is copied back). With ``check=False`` the
        call does not synchronize, and out-of-domain input gives unspecified codes (never -128).
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
    leading one, and segments too few to fill the GPU. A per-tensor quantization, or ``check=True``, uses three
    8-byte device words and one pinned host word, kept per thread, device and stream between calls.
    """
    import cupy

    _require_cupy(cupy, x, "x")
    name = _input_name(x, dtype_name)
    granularity, axis, group_size, sshape = _params(x.shape, granularity, axis, group_size)
    _require_contiguous(x, "x")
    if out is None:
        out = (None, None)
    if not isinstance(out, tuple) or len(out) != 2:
        raise ValueError("out must be a (codes, scales) tuple; either may be None")
    with _on(stream):
        codes = _output(cupy, out[0], x.shape, ("int8",), _I8_DTYPE, "out[0] (codes)")
        scales = _output(cupy, out[1], sshape, ("float32",), _F32_DTYPE, "out[1] (scales)")
        if x.size == 0:
            if scales.size:
                scales.fill(1)  # channels without elements: absmax 0, scale 1 (the reference's rule)
            return codes, scales
        runtime = cupy.cuda.runtime
        device = runtime.getDevice()
        steps, needs_ws = _quantize_plan(
            x.shape, _INPUTS[name], x.dtype.itemsize, granularity, axis, group_size, _aligned(x, codes), device
        )
        stream_obj = cupy.cuda.get_current_stream()
        sptr = stream_obj.ptr
        key = flags = None
        if check or needs_ws:
            key, flags, ws, host = _flags(cupy, device, sptr)
        try:
            args = {"x": x, "q": codes, "s": scales, "bad": flags if check else _NULL, "ws": ws if needs_ws else _NULL}
            for step in steps:
                if step is _MEMSET_SCALES:
                    runtime.memsetAsync(scales.data.ptr, 0, scales.nbytes, sptr)
                    continue
                kernel, grid, block, template = step
                _kernel(kernel)((grid,), (block,), tuple(args[a] if type(a) is str else a for a in template))
            if needs_ws:
                runtime.memsetAsync(ws.data.ptr, 0xFF, 8, sptr)  # ready for the next call on this stream
            first = _NO_BAD
            if check:
                stream_obj.synchronize()  # the only synchronization; host[0] is 1 if a kernel recorded an index
                if host[0]:
                    first = int(flags[:1].get()[0])
                    runtime.memsetAsync(flags.data.ptr, 0xFF, 8, sptr)
                    host[0] = 0
                    stream_obj.synchronize()
        except BaseException:
            _drop_flags(key)  # a launch failed or was interrupted: the flags may be dirty
            raise
        if first != _NO_BAD:
            from ..quant import reference  # the domain error text

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


def _flat_log(g: int, V: int, n: int, vec: bool) -> int | None:
    """log2(g / V) when quantize_flat applies: aligned, rows of whole segments, g / V a power of two <= 32 * K."""
    if not vec or n % g or g % V:
        return None
    gv = g // V
    if gv & (gv - 1) or gv > 32 * _FLAT_K:
        return None
    return gv.bit_length() - 1


@functools.lru_cache(maxsize=512)
def _quantize_plan(shape, suffix, itemsize, granularity, axis, group_size, vec, device) -> tuple[tuple, bool]:
    """The launches of one quantize_int8 call, as (steps, needs_ws).

    A step is _MEMSET_SCALES or (kernel name, grid, block, arguments), where the strings "x", "q", "s", "bad" and "ws"
    in the arguments stand for the input, codes, scales, domain-check flag and per-tensor workspace of the call.
    """
    numel = math.prod(shape)
    sms = _sm_count(device)
    V = 16 // itemsize if vec else 1
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
        log_gv = _flat_log(g, V, n, vec)
        if log_gv is not None:
            kernel = f"cupycodec_int8_quantize_flat{1 << log_gv}_{suffix}"
            nvec = numel // V
            blocks = _ceil_div(_ceil_div(nvec, 32 * _FLAT_K), _BLOCK // 32)
            grid = min(blocks, sms * _resident_blocks(kernel, _BLOCK))
            return ((kernel, grid, _BLOCK, ("x", "q", "s", _i64(nvec), "bad")),), False
        seg = (_i64(nseg), *_map_args(n, g, ng, nseg))
        if whole_vectors and g <= 32 * V:
            tpg = _pow2_at_least(g // V)
            warps = _ceil_div(nseg, (32 // tpg) * _TEAM_K)
            grid = min(_ceil_div(warps * 32, _BLOCK), sms * 32)
            step = (f"cupycodec_int8_quantize_team_{suffix}", grid, _BLOCK, ("x", "q", "s", *seg, np.int32(tpg), "bad"))
        elif g <= 32 * max(V, 4) * 2:
            tpg = min(32, _pow2_at_least(_ceil_div(g, V)))
            grid = min(_ceil_div(nseg * tpg, _BLOCK), sms * 64)
            step = (f"cupycodec_int8_quantize_warp_{suffix}", grid, _BLOCK,
                    ("x", "q", "s", *seg, np.int32(tpg), np.int32(vec), "bad"))
        else:
            block = min(1024, max(64, _pow2_at_least(_ceil_div(g, V * _BLOCK_K))))
            reg = whole_vectors and g <= block * V * _BLOCK_K
            grid = min(nseg, sms * 32)
            step = (f"cupycodec_int8_quantize_block_{suffix}", grid, block,
                    ("x", "q", "s", *seg, np.int32(reg), np.int32(vec), "bad"))
        return (step,), False

    if granularity == "tensor" and vec:
        # two passes over aligned input: absmax into the workspace (complemented bits, from 0xffffffff), then codes
        absmax, apply = f"cupycodec_int8_absmax_all_{suffix}", f"cupycodec_int8_quantize_all_{suffix}"
        nvec = numel // V
        grid1 = min(_ceil_div(nvec, _BLOCK * _ALL_K), sms * _resident_blocks(absmax, _BLOCK))
        grid2 = min(_ceil_div(nvec, _BLOCK * _FLAT_K), sms * _resident_blocks(apply, _BLOCK))
        return (
            (absmax, grid1, _BLOCK, ("x", _i64(numel), "ws", "bad")),
            (apply, grid2, _BLOCK, ("x", "q", "s", _i64(numel), "ws")),
        ), True

    # two passes: absmax into the scales buffer (as float bits, from zero), absmax -> scale, then quantize
    steps: list = [_MEMSET_SCALES]
    if granularity == "channel" and outer > 1 and n < _COLUMN_INNER:
        P = C * n
        vcol = vec and P % V == 0
        Vc = V if vcol else 1
        ntiles = _ceil_div(P // Vc, 32)
        nchunks = max(1, min(_ceil_div(outer, 8), _ceil_div(sms * 16, ntiles)))
        rpc = _ceil_div(outer, nchunks)
        nchunks = _ceil_div(outer, rpc)
        grid = min(ntiles * nchunks, 2**31 - 1)
        steps.append((f"cupycodec_int8_absmax_col_{suffix}", grid, _BLOCK,
                      ("x", "s", _i64(outer), _i64(P), *_divisor(n), *_divisor(ntiles), _i64(rpc), _i64(nchunks),
                       np.int32(vcol), "bad")))
    else:
        block = 512
        chunks = max(1, min(_ceil_div(g, block * V * 4), _ceil_div(sms * 8, nseg)))
        chunk_len = _ceil_div(_ceil_div(g, chunks), 64) * 64
        chunks = _ceil_div(g, chunk_len)
        grid = min(nseg * chunks, sms * 32)
        steps.append((f"cupycodec_int8_absmax_seg_{suffix}", grid, block,
                      ("x", "s", _i64(nseg), *_map_args(n, g, ng, C), *_divisor(chunks), _i64(chunk_len),
                       np.int32(vec), "bad")))
    nscales = C  # one scale per segment class
    steps.append(("cupycodec_int8_finalize_f32", min(_ceil_div(nscales, _BLOCK), sms * 8), _BLOCK,
                  ("s", _i64(nscales))))
    grid = min(max(1, _ceil_div(numel // V, _BLOCK)), sms * 64)
    steps.append((f"cupycodec_int8_quantize_apply_{suffix}", grid, _BLOCK,
                  ("x", "q", "s", _i64(numel), *_map_args(n, g, ng, C), np.int32(vec))))
    return tuple(steps), False


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
    _, storage, allocate = _OUTPUTS[dtype_name]
    with _on(stream):
        y = _output(cupy, out, codes.shape, storage, allocate, "out")
        dequantize_raw(codes.data.ptr, scales.data.ptr, y.data.ptr, codes.shape, granularity=granularity, axis=axis,
                       group_size=group_size, dtype_name=dtype_name, device=cupy.cuda.runtime.getDevice())
    return y


def dequantize_raw(codes_ptr: int, scales_ptr: int, out_ptr: int, shape, *, granularity: str, axis, group_size,
                   dtype_name: str, device: int, stream_ptr: int | None = None) -> None:
    """:func:`dequantize_int8` on raw device addresses (C-contiguous codes, scales and output), launched on
    ``device`` and the raw stream ``stream_ptr`` (default: the current device and stream): what a framework's
    forward calls without converting its tensors. Parameters are the already-checked ones
    (``reference.check_params``)."""
    vec = codes_ptr % 16 == 0 and out_ptr % 16 == 0
    launch_args = _dequantize_config(tuple(shape), granularity, axis, group_size, dtype_name, device, vec)
    if launch_args is None:
        return
    name, grid, tail = launch_args
    if stream_ptr is None:
        import cupy

        stream_ptr = cupy.cuda.get_current_stream().ptr
    launch(handle(device, name), grid, _BLOCK, (codes_ptr, scales_ptr, out_ptr, *tail), device, stream_ptr)


@functools.lru_cache(maxsize=1024)
def _dequantize_config(shape: tuple, granularity: str, axis, group_size, dtype_name: str, device: int, vec: bool):
    """(kernel name, grid, the arguments after the three pointers) of one :func:`dequantize_raw` signature, or None
    for an empty array: worked out once per layer shape, so a forward costs a lookup and a launch."""
    numel = math.prod(shape)
    if numel == 0:
        return None
    suffix = _OUTPUTS[dtype_name][0]
    n, g, ng, C = _layout(shape, granularity, axis, group_size)
    V = 16 if vec else 1
    grid = min(max(1, _ceil_div(numel // V, _BLOCK)), _sm_count(device) * 64)
    return f"cupycodec_int8_dequantize_{suffix}", grid, (_i64(numel), *_map_args(n, g, ng, C), np.int32(vec))


DEQUANT_DESC_WORDS = 16  # CC_DESC: u64 words per tensor of cupycodec_int8_dequantize_many


def dequantize_desc(codes_ptr: int, scales_ptr: int, out_ptr: int, shape, *, granularity: str, axis, group_size,
                    first_block: int, device: int) -> tuple[np.ndarray, int]:
    """The descriptor of one tensor for :func:`dequantize_many` (a decode plan's dequantize stage) and the blocks
    it takes, starting at ``first_block``. Codes and output must be C-contiguous; 16-byte alignment of both (and of
    nothing else) selects the vectorized element code, exactly as :func:`dequantize_int8` does."""
    granularity, axis, group_size, _ = _params(tuple(shape), granularity, axis, group_size)
    numel = math.prod(shape)
    n, g, ng, C = _layout(tuple(shape), granularity, axis, group_size) if numel else (1, 1, 1, 1)
    vec = codes_ptr % 16 == 0 and out_ptr % 16 == 0
    V = 16 if vec else 1
    blocks = min(max(1, _ceil_div(numel // V, _BLOCK)), _sm_count(device) * 64) if numel else 0
    words = [codes_ptr, scales_ptr, out_ptr, numel, *(int(v) for v in _map_args(n, g, ng, C)), int(vec),
             first_block, blocks, 0]
    return np.array(words, dtype=np.uint64), blocks


def dequantize_many(dtype_name: str, desc_ptr: int, items: int, blocks: int) -> None:
    """Dequantize ``items`` tensors described at ``desc_ptr`` (device memory, :func:`dequantize_desc` words) into
    ``dtype_name`` ("F32", "F16", "BF16", "F64") in one launch on the current device and stream."""
    if blocks:
        name, grid, block, args = dequantize_many_args(dtype_name, desc_ptr, items, blocks)
        _kernel(name)((grid,), (block,), args)


def dequantize_many_args(dtype_name: str, desc_ptr: int, items: int, blocks: int) -> tuple:
    """(kernel name, grid, block, arguments) of :func:`dequantize_many`, for plans that launch it per run."""
    return (f"cupycodec_int8_dequantize_many_{_OUTPUTS[dtype_name][0]}", blocks, _BLOCK,
            (np.uint64(desc_ptr), np.int32(items)))


@functools.cache
def handle(device: int, name: str) -> tuple:
    """The :func:`cupycodec._cuda.launch` handle of kernel ``name`` on ``device``."""
    return kernel_handle(_kernel_on(device, name), device)
