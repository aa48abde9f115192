"""Batched CRC-32 (zlib's) of device byte ranges in one launch. Reference: :func:`crc32_reference` and zlib.

nvCOMP's ``nvcompBatchedCRC32Async`` (which the first version used) reads 0.97-1.15 TB/s on 256 MiB and needs a
host-side heuristic query per shape; this kernel reads 1.58-1.67 TB/s there and matches it on 1 MiB (14 us against
15-17 us of GPU time; H200, benchmarks/RESULTS.md run 12). It spreads every chunk over many blocks and combines the
partial CRCs with GF(2) polynomial arithmetic, as zlib's ``crc32_combine`` does, and can write each CRC to its own
address (a slot in a container's chunk table).

The math, in zlib's reflected representation (bit 31 is x^0; ``mulmod`` is zlib's ``multmodp``):

* CRCs are linear: with ``raw(M)`` the CRC register after M from a zero start, ``raw(A || B) = raw(A) x^(8|B|) +
  raw(B)``, and trailing zeros multiply by ``x^8`` each, so ``raw(M) = raw(M || 0^z) x^(-8z)``.
* Starting the register at 0xFFFFFFFF (zlib's init) only changes the first piece's start value, and the final
  ``^ 0xFFFFFFFF`` is applied once at the end.
* A chunk of L bytes is cut into ``parts`` parts of P = 2^p bytes (P a multiple of the stripe, 8 KiB), the last
  part padded with zeros. A block of T = 128 threads walks its part in stripes of T x Q (Q = 64 bytes); thread t
  folds its pieces with ``acc = acc x^(8 T Q) + crc(piece)``, and a tree over threads (constants x^(8 Q 2^k))
  gives the part's CRC. The last block of a chunk to finish (an atomic counter) folds the parts in a warp, then
  removes the padding with ``x^(-8z)``: every power is a product of precomputed ``x^(+-2^k)``.
"""

from __future__ import annotations

import functools
import os
import threading
import zlib

import numpy as np

from .chunks import _launch

POLY = 0xEDB88320
ONE = 0x80000000  # the polynomial 1
THREADS = 128
PIECE = 64
STRIPE = THREADS * PIECE  # 8 KiB
_LOG2_PIECE_BITS = 9  # log2(8 * PIECE)
_LOG2_WARP_BITS = 14  # log2(8 * 32 * PIECE)
_LOG2_STRIPE_BITS = 16  # log2(8 * STRIPE)

_SOURCE = r"""
#define CRC_T 128
#define CRC_Q 64
#define CRC_S (CRC_T * CRC_Q)
#define POLY 0xEDB88320u
#define ONE 0x80000000u
#define XP(k) consts[2048 + (k)]
#define XI(k) consts[2112 + (k)]

// a * b mod P (zlib's multmodp), branch-free over all 32 bits
__device__ __forceinline__ unsigned mulmod(unsigned a, unsigned b)
{
    unsigned p = 0u;
    #pragma unroll
    for (int i = 0; i < 32; ++i) {
        p ^= b & (0u - ((a >> (31 - i)) & 1u));
        b = (b >> 1) ^ (POLY & (0u - (b & 1u)));
    }
    return p;
}

// slice-by-8: 8 bytes (w0 = bytes 0-3, w1 = bytes 4-7, little-endian) into the register
__device__ __forceinline__ unsigned step8(const unsigned* t, unsigned crc, unsigned w0, unsigned w1)
{
    const unsigned a = w0 ^ crc;
    return t[7 * 256 + (a & 0xffu)] ^ t[6 * 256 + ((a >> 8) & 0xffu)] ^ t[5 * 256 + ((a >> 16) & 0xffu)]
         ^ t[4 * 256 + (a >> 24)] ^ t[3 * 256 + (w1 & 0xffu)] ^ t[2 * 256 + ((w1 >> 8) & 0xffu)]
         ^ t[1 * 256 + ((w1 >> 16) & 0xffu)] ^ t[w1 >> 24];
}

// consts: [0, 2048) slice-by-8 tables; [2048, 2112) x^(2^k); [2112, 2176) x^-(2^k).
// work (parts > 1): n zeroed counters, then n * parts partial CRCs.
// Copy mode (src != 0, for packing): chunk c's bytes are read from src[c], written to ptrs[c] and zero-padded there
// to a multiple of 16 while their CRC is taken. Block t < n_tabs also copies chunk table t, described by tabs[4t ..
// 4t + 3] = {source, destination, 4-byte words, chunks k}, except its words [k, 2k): the CRC slots, which the
// chunks' last blocks fill (at any time). Every table has at least one chunk, so there are enough blocks.
__device__ __forceinline__ void
crc32_body(const unsigned long long* __restrict__ ptrs, const unsigned long long* __restrict__ sizes,
           unsigned* __restrict__ out, const unsigned long long* __restrict__ out_addrs, long long n,
           int parts, int log2_part, int log2_r, unsigned* __restrict__ work,
           const unsigned* __restrict__ consts, const unsigned long long* __restrict__ src,
           const unsigned long long* __restrict__ tabs, long long n_tabs)
{
    __shared__ unsigned tab[8 * 256];
    __shared__ unsigned warp_crc[CRC_T / 32];
    __shared__ unsigned part_crc;
    __shared__ int is_last;
    if ((long long)blockIdx.x < n_tabs) {
        const unsigned long long* t = tabs + 4 * blockIdx.x;
        const unsigned* tab_src = (const unsigned*)t[0];
        unsigned* tab_dst = (unsigned*)t[1];
        const long long words = (long long)t[2], k = (long long)t[3];
        for (long long i = threadIdx.x; i < words; i += CRC_T)
            if (i < k || i >= 2 * k) tab_dst[i] = tab_src[i];
    }
    const long long c = (long long)blockIdx.x / parts;
    const int j = (int)((long long)blockIdx.x % parts);
    if (c >= n) return;
    for (int i = threadIdx.x; i < 2048; i += CRC_T) tab[i] = consts[i];
    __syncthreads();

    const unsigned long long addr = ptrs[c];
    const unsigned long long from = src != 0 ? src[c] : addr;
    const unsigned char* base = (const unsigned char*)from;
    unsigned char* dst = src != 0 ? (unsigned char*)addr : 0;
    const unsigned long long L = sizes[c];
    const unsigned long long L16 = (L + 15ull) & ~15ull;
    const unsigned long long start = (unsigned long long)j << log2_part;
    const int stripes = (int)((1ull << log2_part) / CRC_S);
    const bool aligned = ((addr | from) & 15ull) == 0ull;
    const unsigned xs = XP(16);  // x^(8 * CRC_S)
    unsigned acc = 0u;
    for (int s = 0; s < stripes; ++s) {
        const unsigned long long off = start + (unsigned long long)s * CRC_S + (unsigned long long)threadIdx.x * CRC_Q;
        unsigned crc = off == 0ull ? 0xFFFFFFFFu : 0u;
        if (off < L) {
            if (aligned && off + CRC_Q <= L) {
                const uint4* p = reinterpret_cast<const uint4*>(base + off);
                uint4 v[CRC_Q / 16];
                #pragma unroll
                for (int q = 0; q < CRC_Q / 16; ++q) v[q] = p[q];
                if (dst != 0) {
                    uint4* d = reinterpret_cast<uint4*>(dst + off);
                    #pragma unroll
                    for (int q = 0; q < CRC_Q / 16; ++q) d[q] = v[q];
                }
                #pragma unroll
                for (int q = 0; q < CRC_Q / 16; ++q) {
                    crc = step8(tab, crc, v[q].x, v[q].y);
                    crc = step8(tab, crc, v[q].z, v[q].w);
                }
            } else {  // unaligned chunk, or the piece holding the chunk's end (bytes past it count as zeros)
                for (int b = 0; b < CRC_Q; ++b) {
                    const unsigned byte = off + b < L ? (unsigned)base[off + b] : 0u;
                    if (dst != 0 && off + b < L16) dst[off + b] = (unsigned char)byte;  // the pad gets zeros
                    crc = tab[(crc ^ byte) & 0xffu] ^ (crc >> 8);
                }
            }
        }
        acc = s == 0 ? crc : (mulmod(acc, xs) ^ crc);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    #pragma unroll
    for (int k = 0; k < 5; ++k) {
        const unsigned other = __shfl_down_sync(0xffffffffu, acc, 1 << k);
        if ((lane & ((2 << k) - 1)) == 0) acc = mulmod(acc, XP(9 + k)) ^ other;
    }
    if (lane == 0) warp_crc[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned v = warp_crc[0];
        #pragma unroll
        for (int w = 1; w < CRC_T / 32; ++w) v = mulmod(v, XP(14)) ^ warp_crc[w];
        part_crc = v;
        if (parts == 1) {
            is_last = 1;
        } else {
            work[n + c * parts + j] = v;
            __threadfence();
            is_last = atomicAdd(&work[c], 1u) == (unsigned)(parts - 1);
        }
    }
    __syncthreads();
    if (!is_last || warp != 0) return;
    __threadfence();

    // One part: the chunk counts as P bytes, zero-padded at the end. Several: lane l folds parts [l r, (l + 1) r),
    // then a tree over lanes; the chunk counts as 32 r P bytes.
    unsigned v = part_crc;
    unsigned long long padded = 1ull << log2_part;
    if (parts > 1) {
        const int r = 1 << log2_r;
        const unsigned xpart = XP(3 + log2_part);
        v = 0u;
        for (int q = 0; q < r; ++q) {
            const int jj = lane * r + q;
            const unsigned pc = jj < parts ? __ldcg(&work[n + c * parts + jj]) : 0u;
            v = mulmod(v, xpart) ^ pc;
        }
        #pragma unroll
        for (int k = 0; k < 5; ++k) {
            const unsigned other = __shfl_down_sync(0xffffffffu, v, 1 << k);
            if ((lane & ((2 << k) - 1)) == 0) v = mulmod(v, XP(3 + log2_part + log2_r + k)) ^ other;
        }
        padded = 32ull << (log2_part + log2_r);
    }
    // x^(-8z) for z = padded - L: lane b contributes x^-(2^b) and x^-(2^(b+32)) for the set bits of 8z
    const unsigned long long e = (padded - L) * 8ull;
    unsigned f = ((e >> lane) & 1ull) ? XI(lane) : ONE;
    if ((e >> (lane + 32)) & 1ull) f = mulmod(f, XI(lane + 32));
    #pragma unroll
    for (int k = 0; k < 5; ++k) f = mulmod(f, __shfl_xor_sync(0xffffffffu, f, 1 << k));
    if (lane == 0) {
        unsigned* dst = out_addrs != 0 ? (unsigned*)out_addrs[c] : out + c;  // out_addrs: one address per chunk
        *dst = L == 0ull ? 0u : (mulmod(v, f) ^ 0xFFFFFFFFu);
        if (parts > 1) work[c] = 0u;  // leave the counter zeroed for reuse
    }
}

extern "C" __global__ void __launch_bounds__(CRC_T)
cupycodec_crc32(const unsigned long long* __restrict__ ptrs, const unsigned long long* __restrict__ sizes,
                unsigned* __restrict__ out, const unsigned long long* __restrict__ out_addrs, long long n,
                int parts, int log2_part, int log2_r, unsigned* __restrict__ work,
                const unsigned* __restrict__ consts, const unsigned long long* __restrict__ src,
                const unsigned long long* __restrict__ tabs, long long n_tabs)
{
    crc32_body(ptrs, sizes, out, out_addrs, n, parts, log2_part, log2_r, work, consts, src, tabs, n_tabs);
}

// The same work with its arguments in device memory (12 u64: ptrs, sizes, out_addrs, n, parts, log2_part, log2_r,
// work, src, tabs, n_tabs, 0), uploaded with the rows they point to: a launch of two arguments costs the host
// about half of one with fourteen.
extern "C" __global__ void __launch_bounds__(CRC_T)
cupycodec_crc32_packed(const unsigned long long* __restrict__ a, const unsigned* __restrict__ consts)
{
    crc32_body((const unsigned long long*)a[0], (const unsigned long long*)a[1], 0,
               (const unsigned long long*)a[2], (long long)a[3], (int)a[4], (int)a[5], (int)a[6],
               (unsigned*)a[7], consts, (const unsigned long long*)a[8], (const unsigned long long*)a[9],
               (long long)a[10]);
}
"""


# -- host-side math (also the reference the tests use) ------------------------------------------------------------


def mulmod(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial, reflected (zlib's multmodp)."""
    p = 0
    for i in range(32):
        if a & (ONE >> i):
            p ^= b
        b = (b >> 1) ^ POLY if b & 1 else b >> 1
    return p


X_INV = 0xDB710641  # x^-1 = (P(x) + 1) / x, reflected; checked in consts()


@functools.cache
def consts() -> np.ndarray:
    """uint32[2176]: slice-by-8 tables, x^(2^k) and x^-(2^k) for k < 64."""
    t0 = np.zeros(256, np.uint64)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ POLY if c & 1 else c >> 1
        t0[i] = c
    tables = [t0]
    for _ in range(7):
        prev = tables[-1]
        tables.append((prev >> np.uint64(8)) ^ t0[(prev & np.uint64(0xFF)).astype(np.int64)])
    xp, xi = [0x40000000], [X_INV]
    if mulmod(X_INV, 0x40000000) != ONE:  # pragma: no cover - a constant typo would be caught here
        raise AssertionError("x^-1 is wrong")
    for _ in range(63):
        xp.append(mulmod(xp[-1], xp[-1]))
        xi.append(mulmod(xi[-1], xi[-1]))
    return np.concatenate([np.concatenate(tables), np.array(xp + xi, np.uint64)]).astype(np.uint32)


def _power(e: int, base: int) -> int:
    """Product of the table entries consts()[base + b] over the set bits b of e (the kernel's square-multiply)."""
    c = consts()
    r = ONE
    for b in range(64):
        if (e >> b) & 1:
            r = mulmod(r, int(c[base + b]))
    return r


def xpow(e: int) -> int:
    """x^e mod P (e >= 0), from the tables of x^(2^k)."""
    return _power(e, 2048)


def xpow_inv(e: int) -> int:
    """x^-e mod P (e >= 0), from the tables of x^-(2^k)."""
    return _power(e, 2112)


def launch_shape(max_nbytes: int, total_nbytes: int, sm_count: int) -> tuple[int, int, int]:
    """(parts, log2_part, log2_r) for a batch: about 4 blocks per SM, parts of 8 KiB up to the largest chunk."""
    want = -(-max(int(total_nbytes), 1) // (4 * max(sm_count, 1)))
    cap = max(STRIPE, 1 << (max(int(max_nbytes), 1) - 1).bit_length())
    part = min(max(STRIPE, 1 << (want - 1).bit_length()), cap)
    parts = max(1, -(-int(max_nbytes) // part))
    log2_r = max(0, (-(-parts // 32) - 1).bit_length())
    return parts, part.bit_length() - 1, log2_r


def crc32_reference(data: bytes, *, piece: int = PIECE, threads: int = THREADS, part: int | None = None) -> int:
    """The kernel's decomposition in plain Python (any piece/threads/part sizes), for testing the math on a CPU.

    Equals ``zlib.crc32(data)`` for every input; the GPU test pins the kernel to zlib directly.
    """
    L = len(data)
    stripe = piece * threads
    part = part or stripe
    assert part % stripe == 0 and part & (part - 1) == 0 and piece & (piece - 1) == 0
    parts = max(1, -(-L // part))
    log2_r = max(0, (-(-parts // 32) - 1).bit_length())
    r = 1 << log2_r
    partials = []
    for j in range(parts):
        accs = []
        for t in range(threads):
            acc = 0
            for s in range(part // stripe):
                off = j * part + s * stripe + t * piece
                crc = 0xFFFFFFFF if off == 0 else 0
                if off < L:
                    buf = data[off : off + piece].ljust(piece, b"\0")
                    crc = zlib.crc32(buf, crc ^ 0xFFFFFFFF) ^ 0xFFFFFFFF  # raw register update
                acc = crc if s == 0 else mulmod(acc, xpow(8 * stripe)) ^ crc
            accs.append(acc)
        v = accs[0]
        for acc in accs[1:]:  # a left fold equals the kernel's tree (the constants compose)
            v = mulmod(v, xpow(8 * piece)) ^ acc
        partials.append(v)
    if parts == 1:
        v, padded = partials[0], part
    else:
        lanes = []
        for lane in range(32):
            v = 0
            for q in range(r):
                jj = lane * r + q
                v = mulmod(v, xpow(8 * part)) ^ (partials[jj] if jj < parts else 0)
            lanes.append(v)
        v = lanes[0]
        for x in lanes[1:]:
            v = mulmod(v, xpow(8 * r * part)) ^ x
        padded = 32 * r * part
    if L == 0:
        return 0
    z = padded - L
    return mulmod(v, xpow_inv(8 * z)) ^ 0xFFFFFFFF


# -- launcher -------------------------------------------------------------------------------------------------------


_FUNCTIONS: dict[int, tuple] = {}
_FUNCTIONS_LOCK = threading.Lock()


def _function(device: int):
    """(kernel, the constants on this device and their address, SM count, the kernel with its arguments in device
    memory), built exactly once per device.

    Once, under a lock, not ``functools.cache``: on concurrent first calls (Zarr encodes in worker threads) that
    runs the body in every thread and keeps the last result, so another thread's constants table could be freed
    while a launch still uses its address. The table's upload is waited for, so a launch on any stream reads it
    whole (its copy runs on the first caller's stream, which need not be ordered with the launch's)."""
    f = _FUNCTIONS.get(device)
    if f is None:
        with _FUNCTIONS_LOCK:
            f = _FUNCTIONS.get(device)
            if f is None:
                f = _FUNCTIONS[device] = _build(device)
    return f


def _after_fork_in_child() -> None:
    # CUDA objects of the parent are unusable in a forked child, and a parent thread may have held the lock
    global _FUNCTIONS_LOCK
    _FUNCTIONS.clear()
    _FUNCTIONS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _build(device: int) -> tuple:
    import cupy  # lazy: importing this module must not import cupy

    mod = cupy.RawModule(code=_SOURCE, options=("--std=c++14",))
    table = cupy.asarray(consts())
    cupy.cuda.get_current_stream().synchronize()
    return (mod.get_function("cupycodec_crc32"), table, np.uint64(table.data.ptr),
            cupy.cuda.runtime.getDeviceProperties(device)["multiProcessorCount"],
            mod.get_function("cupycodec_crc32_packed"))


def work_words(n: int, parts: int) -> int:
    """uint32 words of scratch a launch needs: n counters (zeroed) + n * parts partials; 0 when parts == 1."""
    return 0 if parts == 1 else n + n * parts


def shape_for(max_nbytes: int, total_nbytes: int) -> tuple[int, int, int]:
    import cupy

    return launch_shape(max_nbytes, total_nbytes, _function(cupy.cuda.runtime.getDevice())[3])


def crc32_batch(ptrs, sizes, out, n: int, shape: tuple[int, int, int], work=None, stream=None,
                out_addrs=None) -> None:
    """CRC-32 of ``n`` device byte ranges: ``ptrs``/``sizes`` are device uint64 arrays (or raw pointers), ``out``
    a device uint32 array, or None with ``out_addrs`` (a device uint64 array: where each chunk's CRC goes, 4-byte
    aligned); ``shape`` from :func:`shape_for`. ``work`` is device scratch of :func:`work_words` uint32 words whose
    first ``n`` are zero (the kernel leaves them zero); allocated here when None. (Packing and checksumming in one
    pass: :func:`crc32_batch_packed`.)"""
    import cupy

    if n == 0:
        return
    fn, _, table_ptr, _, _ = _function(cupy.cuda.runtime.getDevice())
    parts, log2_part, log2_r = shape
    words = work_words(n, parts)
    if words and work is None:
        work = cupy.zeros(words, np.uint32)
    zero = np.uint64(0)
    args = (_p(ptrs), _p(sizes), zero if out is None else _p(out), zero if out_addrs is None else _p(out_addrs),
            np.int64(n), np.int32(parts), np.int32(log2_part), np.int32(log2_r), _p(work) if words else zero,
            table_ptr, zero, zero, np.int64(0))  # no copy, no tables
    _launch(fn, (n * parts,), (THREADS,), args, stream)


PACKED_ARGS = 12  # u64 arguments of cupycodec_crc32_packed


def packed_args(n: int, shape: tuple[int, int, int], *, ptrs: int, sizes: int, out_addrs: int, work: int, src: int,
                tabs: int, n_tabs: int) -> list[int]:
    """The 12 u64 arguments of :func:`crc32_batch_packed` (addresses as ints; ``work`` 0 when it needs none).

    Chunk ``i`` (``ptrs``/``sizes``/``src``/``out_addrs``: device uint64 arrays of ``n``) is copied from ``src[i]``
    to ``ptrs[i]``, zero-padded there to a multiple of 16, and its CRC-32 is written at ``out_addrs[i]``. ``tabs``
    holds ``n_tabs`` chunk tables to copy, 4 uint64 each: source and destination addresses (4-byte aligned), the
    table's 4-byte words, and its chunk count k; words [k, 2k) (the CRC slots, where ``out_addrs`` may point) are
    skipped. Every table needs at least one chunk in the launch (``n_tabs <= n``)."""
    if n_tabs > n:
        raise ValueError(f"{n_tabs} tables for {n} chunks: a table without chunks has nothing to copy")
    parts, log2_part, log2_r = shape
    return [ptrs, sizes, out_addrs, n, parts, log2_part, log2_r, work, src, tabs, n_tabs, 0]


@functools.cache
def packed_launcher(device: int) -> tuple:
    """(:func:`cupycodec._cuda.launch` handle of the packing kernel on ``device``, its constants' address, threads
    per block, the constants table itself): what :func:`crc32_batch_packed` launches, for callers that launch per
    call on a raw stream. The tuple holds the table, so the cached address can never outlive it."""
    from .._cuda import kernel_handle

    f = _function(device)
    return kernel_handle(f[4], device), int(f[2]), THREADS, f[1]


def crc32_batch_packed(args_ptr: int, n_blocks: int, stream=None) -> None:
    """:func:`crc32_batch` in packing mode with its arguments already in device memory at ``args_ptr`` (the u64s of
    :func:`packed_args`, uploaded with the rows they point to); ``n_blocks`` = n * parts. Two launch arguments
    instead of fourteen save the host several microseconds per launch."""
    import cupy

    f = _function(cupy.cuda.runtime.getDevice())
    _launch(f[4], (n_blocks,), (THREADS,), (np.uint64(args_ptr), f[2]), stream)


def _p(x):
    return np.uint64(x) if isinstance(x, (int, np.integer)) else np.uint64(x.data.ptr)
