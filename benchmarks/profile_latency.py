"""Where the time of a small (1 MiB) GPU round trip goes: primitive costs, per-stage host timers, cProfile.

Not a benchmark of record (bench_gpu.py is); a tool to decide what to optimize. Prints plain text.

Usage: python benchmarks/profile_latency.py [--codec ans] [--reps 300]
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import inspect
import io
import pstats
import time
from collections import defaultdict

import numpy as np

import cupycodec as cc


def wall(fn, reps, sync=True):
    """Median wall-clock us of ``fn`` (bench_gpu.wall_median; this folder is on sys.path when the script runs)."""
    from bench_gpu import wall_median

    return wall_median(fn, reps, warmup=5, sync=sync) * 1e6


def gpu_us(fn, reps=50):
    """GPU time of an asynchronous ``fn`` in us, host launch costs hidden (bench_gpu.gpu_only_seconds)."""
    from bench_gpu import gpu_only_seconds  # this folder is on sys.path when the script runs

    return gpu_only_seconds(fn, reps) * 1e6


def primitives(x, codec):
    import cupy

    from cupycodec.kernels import chunks

    stream_ptr = cupy.cuda.get_current_stream().ptr
    small = np.zeros(60, np.uint64)
    d_small = cupy.empty(60, np.uint64)
    pinned = cupy.cuda.alloc_pinned_memory(4096)
    pin = np.frombuffer(pinned, np.uint8, 4096)
    rows = {
        "cupy.empty(1 MiB)": wall(lambda: cupy.empty(1 << 20, np.uint8), 500, sync=False),
        "cupy.empty(480 B)": wall(lambda: cupy.empty(480, np.uint8), 500, sync=False),
        "d.set(480 B pageable)": wall(lambda: d_small.set(small), 500, sync=False),
        "d.get(480 B pageable)": wall(lambda: d_small.get(), 500, sync=False),
        "memcpyAsync D2H 480 B pinned + sync": wall(lambda: (
            cupy.cuda.runtime.memcpyAsync(pin.ctypes.data, d_small.data.ptr, 480, 2, stream_ptr),
            cupy.cuda.runtime.streamSynchronize(stream_ptr)), 500, sync=False),
        "memcpyAsync H2D 480 B pinned": wall(lambda: cupy.cuda.runtime.memcpyAsync(
            d_small.data.ptr, pin.ctypes.data, 480, 1, stream_ptr), 500, sync=False),
        "streamSynchronize (idle)": wall(lambda: cupy.cuda.runtime.streamSynchronize(stream_ptr), 500, sync=False),
        "get_current_stream().ptr": wall(lambda: cupy.cuda.get_current_stream().ptr, 500, sync=False),
    }
    src = cupy.asarray(np.array([x.data.ptr], np.uint64))
    buf = cupy.empty(1 << 20, np.uint8)
    dst = cupy.asarray(np.array([buf.data.ptr], np.uint64))
    nb = cupy.asarray(np.array([1 << 20], np.uint64))
    rows["copy_chunks launch (CuPy RawKernel call)"] = wall(lambda: chunks.copy_chunks(
        src, dst, nb, max_nbytes=1 << 20, pad=False), 500, sync=False)
    nop = cupy.RawModule(code=r"""
    extern "C" __global__ void nop1(unsigned long long a) { }
    extern "C" __global__ void nop10(unsigned long long a0, unsigned long long a1, unsigned long long a2,
        unsigned long long a3, unsigned long long a4, unsigned long long a5, unsigned long long a6,
        unsigned long long a7, unsigned long long a8, unsigned long long a9) { }
    """)
    n1, n10 = nop.get_function("nop1"), nop.get_function("nop10")
    arrs = tuple(cupy.empty(1, np.uint64) for _ in range(10))
    for label, fn, args in (("1 np.uint64", n1, (np.uint64(1),)), ("10 np.uint64", n10, (np.uint64(1),) * 10),
                            ("10 Python int", n10, (1,) * 10), ("10 CuPy arrays", n10, arrs),
                            ("1 CuPy array", n1, arrs[:1])):
        rows[f"CuPy launch, {label} args"] = wall(lambda fn=fn, args=args: fn((1,), (32,), args), 500, sync=False)
    rows["copy_chunks 1 MiB GPU"] = gpu_us(lambda: chunks.copy_chunks(src, dst, nb, max_nbytes=1 << 20, pad=False))
    from cupycodec.dtypes import ArraySpec
    from cupycodec.registry import get_codec

    codec_obj = get_codec(codec).resolve(ArraySpec.of(x))
    if codec_obj.nvcomp_algorithm:
        from cupycodec.engine import engine

        eng = engine(cupy.cuda.runtime.getDevice())
        plan = eng.encode_plan([((codec_obj, x.nbytes, 65536),)])
        rows[f"{codec} EncodePlan.compress (upload, nvCOMP, download, sync) wall"] = wall(
            lambda: plan.compress([x], stream_ptr, []), 300, sync=False)
        rows[f"{codec} EncodePlan.run (compress + pack) wall"] = wall(lambda: plan.run([x], stream_ptr), 300,
                                                                       sync=False)
        rows[f"{codec} encode_plan lookup (cached)"] = wall(
            lambda: eng.encode_plan([((codec_obj, x.nbytes, 65536),)]), 500, sync=False)

    for nchunks in (1, 4, 16):
        rows.update(_crc_rows(x, nchunks, stream_ptr))
    c = cc.compress(x, codec=codec)
    out = cupy.empty_like(x)
    cc.decompress(c, out=out)
    plan = cc.decode_plan([c], [out])
    rows["plan.run host"] = wall(plan.run, 300, sync=False)
    rows["plan.run GPU"] = gpu_us(plan.run)
    rows["plan.run + plan.check wall"] = wall(lambda: (plan.run(), plan.check()), 300, sync=False)
    rows["DecodePlan build"] = wall(lambda: cc.decode_plan([c], [out]), 200, sync=False)
    rows["CompressedArray from compress (header build etc.), compress wall"] = wall(
        lambda: cc.compress(x, codec=codec), 200)
    rows["compress host time only (device drained before and after)"] = wall(
        lambda: cc.compress(x, codec=codec), 200, sync=False)
    rows["decompress(c, out=o) wall (cached plan)"] = wall(lambda: cc.decompress(c, out=out), 200)
    rows["decompress(c) wall (alloc, cached? no)"] = wall(lambda: cc.decompress(c), 200)
    rows["round trip wall"] = wall(lambda: cc.decompress(cc.compress(x, codec=codec)), 200)
    for k, v in rows.items():
        print(f"{v:10.1f} us  {k}")


def _crc_rows(x, nchunks, stream_ptr):
    import cupy

    from cupycodec.backends import _nvcomp_lib as nvcomp
    from cupycodec.kernels import crc32

    sizes = np.full(nchunks, (1 << 20) // nchunks, np.uint64)
    ptrs = np.uint64(x.data.ptr) + np.arange(nchunks, dtype=np.uint64) * sizes[0]
    tab = cupy.asarray(np.concatenate([ptrs, sizes]))
    crc_out = cupy.empty(nchunks, np.uint32)
    shape = crc32.shape_for(int(sizes[0]), 1 << 20)

    def ours():
        crc32.crc32_batch(tab.data.ptr, tab.data.ptr + 8 * nchunks, crc_out, nchunks, shape)

    def theirs():
        nvcomp.nvcomp_crc32_async(tab.data.ptr, tab.data.ptr + 8 * nchunks, crc_out.data.ptr, nchunks,
                                  int(sizes[0]), stream_ptr)

    ours()
    mine = crc_out.get().tolist()
    theirs()
    assert crc_out.get().tolist() == mine, "CRC mismatch between nvCOMP and kernels.crc32"
    return {f"nvCOMP CRC32 GPU (1 MiB in {nchunks})": gpu_us(theirs),
            f"kernels.crc32 GPU (1 MiB in {nchunks}, shape {shape})": gpu_us(ours),
            f"kernels.crc32 host launch (1 MiB in {nchunks})": wall(ours, 300, sync=False)}


def chunk_sweep(x):
    """GPU time of nvCOMP-through-cupycodec compress and decode of 1 MiB by chunk size (the ratio cost beside)."""
    import cupy

    for codec in ("ans", "lz4", "bitcomp", "raw"):
        for chunk in (16384, 65536, 262144, None):
            try:
                c = cc.compress(x, codec=codec, chunk_nbytes=chunk)
            except Exception as exc:
                print(codec, chunk, "failed:", exc)
                continue
            out = cupy.empty_like(x)
            plan = cc.decode_plan([c], [out])

            def comp(codec=codec, chunk=chunk):
                return cc.compress(x, codec=codec, chunk_nbytes=chunk)

            def rt(codec=codec, chunk=chunk):
                return cc.decompress(cc.compress(x, codec=codec, chunk_nbytes=chunk))

            label = f"{c.segments[0].chunk_nbytes:7d}{'*' if chunk is None else ' '}"
            print(f"{codec:8s} chunk {label}: ratio {c.ratio:.4f}  compress wall {wall(comp, 100):7.1f} us  "
                  f"plan.run GPU {gpu_us(plan.run):6.1f} us  round trip wall {wall(rt, 100):7.1f} us")


def stage_timers(x, codec, reps):
    """Wrap the functions of the compress/decompress path with host timers (inclusive)."""
    import cupy

    from cupycodec import _compress, _config, _decompress, container, interop
    from cupycodec.engine import Engine, decode, encode

    acc = defaultdict(float)
    cnt = defaultdict(int)
    targets = [(_compress, "prepare"), (_compress, "compress_jobs"), (_compress, "compress_gpu"),
               (_compress, "_segment_codecs"), (_compress, "_smallest"), (_config, "resolved"),
               (encode.EncodePlan, "run"), (encode.EncodePlan, "compress"), (encode.EncodePlan, "_pack"),
               (Engine, "encode_plan"), (Engine, "upload"), (Engine, "download"), (container, "Header"),
               (container, "CompressedArray"), (container, "producer_info"), (_decompress, "route"),
               (_decompress, "decode_jobs"), (_decompress, "_decode_gpu"), (_decompress, "_finish_gpu"),
               (decode, "DecodePlan"), (decode.DecodePlan, "run_and_wait"), (decode.DecodePlan, "run"),
               (interop, "as_array"), (interop, "as_output"), (interop, "stream_handle"),
               (_decompress, "target_of")]
    saved = []
    for mod, name in targets:
        if not hasattr(mod, name):
            continue
        orig = getattr(mod, name)
        if isinstance(orig, type) or isinstance(inspect.getattr_static(mod, name), staticmethod):
            continue

        def make(orig, label):
            @functools.wraps(orig)
            def w(*a, **k):
                t = time.perf_counter()
                try:
                    return orig(*a, **k)
                finally:
                    acc[label] += time.perf_counter() - t
                    cnt[label] += 1
            return w

        label = f"{getattr(mod, '__name__', mod)}.{name}"
        setattr(mod, name, make(orig, label))
        saved.append((mod, name, orig))
    try:
        for what, fn in (("compress", lambda: cc.compress(x, codec=codec)),
                         ("roundtrip", lambda: cc.decompress(cc.compress(x, codec=codec)))):
            for _ in range(5):
                fn()
            cupy.cuda.Device().synchronize()
            acc.clear()
            cnt.clear()
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            cupy.cuda.Device().synchronize()
            total = (time.perf_counter() - t) / reps * 1e6
            print(f"--- stage timers: {what} {codec} 1 MiB, {total:.1f} us per call (timers add ~1 us each) ---")
            for label, v in sorted(acc.items(), key=lambda kv: -kv[1]):
                print(f"{v / reps * 1e6:10.1f} us  x{cnt[label] / reps:.0f}  {label}")
    finally:
        for mod, name, orig in saved:
            setattr(mod, name, orig)


def profile(x, codec, reps):
    import cupy

    for what, fn in (("compress", lambda: cc.compress(x, codec=codec)),
                     ("roundtrip", lambda: cc.decompress(cc.compress(x, codec=codec)))):
        fn()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(reps):
            fn()
        cupy.cuda.Device().synchronize()
        prof.disable()
        for order, n in (("tottime", 30), ("cumulative", 40)):
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats(order).print_stats(n)
            print(f"--- cProfile {what} {codec} x{reps} by {order} ---")
            print("\n".join(line for line in buf.getvalue().splitlines() if line.strip())[-6000:])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--codec", default="ans")
    p.add_argument("--reps", type=int, default=300)
    args = p.parse_args()
    import cupy

    print(cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), "nvcomp", cc.info().get("nvcomp"))
    x = cupy.asarray((np.random.default_rng(0).standard_normal(1 << 19) * 0.02).astype(np.float16))
    chunk_sweep(x)
    for codec in dict.fromkeys([args.codec, "raw"]):
        print(f"===== {codec} =====")
        primitives(x, codec)
        stage_timers(x, codec, args.reps)
    profile(x, args.codec, args.reps)


if __name__ == "__main__":
    main()
