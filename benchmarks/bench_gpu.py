"""GPU benchmark: cupycodec beside direct nvidia.nvcomp.Codec use, in one run, on one card.

Data: 256 MiB of bf16 weight-like values (0.02 * Student-t(5)) and their per-row INT8 codes (rows of 4096).
Reports, per codec: ratio, compress GB/s, decode GB/s (cupycodec DecodePlan into preallocated buffers, and the
one-shot cc.decompress), and direct nvCOMP (NVCOMP_NATIVE, 64 KiB chunks) ratio and decode GB/s; a chunk-size
sweep; the 1 MiB round-trip latency; a TinyLlama block decoded and dequantized to bf16 by one plan.run (and
replayed in a CUDA graph); a no-sync check; the device copy bandwidth. All GB/s count uncompressed bytes; timings
are CUDA-event medians after a warm-up.

Usage: python benchmarks/bench_gpu.py [--mib 256] [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import traceback

import numpy as np

import cupycodec as cc
from cupycodec.bench import median_seconds

CODECS = ["lz4", "snappy", "gdeflate", "deflate", "zstd", "gzip", "cascaded", "bitcomp", "ans"]
NVCOMP_NAMES = {"lz4": "LZ4", "snappy": "Snappy", "gdeflate": "GDeflate", "deflate": "Deflate", "zstd": "Zstd",
                "gzip": "Gzip", "cascaded": "Cascaded", "bitcomp": "Bitcomp", "ans": "ANS"}


def events_median(fn, reps=10, warmup=2):
    return median_seconds(fn, reps, gpu=True, warmup=warmup)


def wall_median(fn, reps=20, warmup=3, sync=True):
    """Median wall-clock seconds of ``fn``; with ``sync`` each call includes waiting for the device (else only
    its host time, the device drained before and after)."""
    import cupy

    for _ in range(warmup):
        fn()
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        if sync:
            cupy.cuda.Device().synchronize()
        times.append(time.perf_counter() - t)
    cupy.cuda.Device().synchronize()
    return float(np.median(times))


def make_data(mib):
    import cupy

    n = mib * 2**20 // 2
    rs = cupy.random.RandomState(0)
    f = (0.02 * rs.standard_t(5, n)).astype(cupy.float32)
    u = f.view(cupy.uint32)
    bf16 = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(cupy.uint16)  # round to nearest even
    rows = f.reshape(-1, 4096)
    scale = cupy.abs(rows).max(axis=1, keepdims=True) / 127
    int8 = cupy.clip(cupy.rint(rows / scale), -127, 127).astype(cupy.int8).reshape(-1)
    return {"bf16": (bf16, "bfloat16"), "int8": (int8, None)}


def plan_decode_gbps(c, reps=10):
    import cupy

    out = cupy.empty(c.shape, dtype=c.dtype if c.dtype_name != "BF16" else np.uint16)
    plan = cc.decode_plan([c], [out])
    t = events_median(plan.run, reps)
    plan.check()
    return c.raw_nbytes / t / 1e9, out


def bench_codecs(data, chunk_sizes, rows_out, direct=True):
    import cupy

    for dname, (arr, logical) in data.items():
        for codec in ["raw", *CODECS]:
            for chunk in chunk_sizes:
                row = {"data": dname, "codec": codec, "chunk": chunk}
                try:
                    kw = {"chunk_nbytes": chunk} if chunk else {}
                    c = cc.compress(arr, codec=codec, dtype=logical, **kw)
                    row["chunk"] = c.segments[0].chunk_nbytes
                    row["options"] = c.segments[0].codec.get_config()
                    row["ratio"] = c.ratio
                    row["compress_gbps"] = arr.nbytes / wall_median(
                        lambda a=arr, k=codec, d=logical, kw=kw: cc.compress(a, codec=k, dtype=d, **kw),
                        reps=3, warmup=1) / 1e9
                    row["decode_gbps"], out = plan_decode_gbps(c)
                    row["exact"] = bool((out.reshape(-1).view(cupy.uint8) == arr.reshape(-1).view(cupy.uint8)).all())
                    o2 = cupy.empty_like(out)
                    row["decompress_oneshot_gbps"] = arr.nbytes / events_median(
                        lambda c=c, o=o2: cc.decompress(c, out=o), reps=5) / 1e9
                except Exception as exc:  # keep going: one codec's failure must not hide the others
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    traceback.print_exc()
                rows_out.append(row)
                print(json.dumps(row), flush=True)
            if direct and codec != "raw":
                rows_out.append(bench_direct(dname, arr, codec))
                print(json.dumps(rows_out[-1]), flush=True)
            cupy.get_default_memory_pool().free_all_blocks()


def bench_direct(dname, arr, codec):
    """nvidia.nvcomp.Codec, NATIVE bitstream, 64 KiB chunks, same data type option as cupycodec's default."""
    import cupy
    from nvidia import nvcomp

    row = {"data": dname, "codec": codec, "direct_nvcomp": True, "chunk": 65536}
    try:
        kwargs = {"algorithm": NVCOMP_NAMES[codec], "uncomp_chunk_size": 65536,
                  "cuda_stream": cupy.cuda.get_current_stream().ptr}
        if codec == "ans":
            kwargs["data_type"] = "<f2" if dname == "bf16" else "|i1"
        elif codec in ("cascaded", "bitcomp"):
            kwargs["data_type"] = "<u2" if dname == "bf16" else "|i1"
        codec_obj = nvcomp.Codec(**kwargs)
        src = nvcomp.as_array(arr.reshape(-1).view(cupy.uint8))
        enc = codec_obj.encode(src)
        enc_nbytes = int(enc.buffer_size)
        row["ratio"] = arr.nbytes / enc_nbytes
        out = cupy.empty(arr.nbytes, dtype=cupy.uint8)
        try:
            dcfg = codec_obj.decompression_config(enc)
            fn = lambda: codec_obj.decode(enc, out=out, decompression_config=dcfg)  # noqa: E731
            fn()
            row["mode"] = "decode(out=, decompression_config=)"
        except Exception as exc:
            row["mode_fallback"] = f"{type(exc).__name__}: {exc}"
            fn = lambda: cupy.asarray(codec_obj.decode(enc))  # noqa: E731
        row["decode_gbps"] = arr.nbytes / events_median(fn, reps=10) / 1e9
        res = cupy.asarray(codec_obj.decode(enc)).view(cupy.uint8).reshape(-1)
        row["exact"] = bool((res == arr.reshape(-1).view(cupy.uint8)).all())
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    return row


def bench_latency(results):
    import cupy

    x = cupy.asarray((np.random.default_rng(0).standard_normal(1 << 19) * 0.02).astype(np.float16))  # 1 MiB
    for codec, chunk in (("auto", None), ("ans", None), ("ans", 262144), ("ans", 16384), ("lz4", None),
                         ("lz4", 16384), ("zstd", 16384), ("raw", None), ("bitcomp", 16384)):
        kw = {"chunk_nbytes": chunk} if chunk else {}

        def rt(codec=codec, kw=kw):
            return cc.decompress(cc.compress(x, codec=codec, **kw))

        c = cc.compress(x, codec=codec, **kw)
        out = cupy.empty_like(x)
        row = {"latency_1mib": codec, "chunk": c.segments[0].chunk_nbytes, "ratio": c.ratio,
               "roundtrip_us": wall_median(rt, reps=200) * 1e6,
               "compress_us": wall_median(lambda codec=codec, kw=kw: cc.compress(x, codec=codec, **kw), reps=200) * 1e6,
               "decompress_us": wall_median(lambda c=c, o=out: cc.decompress(c, out=o), reps=200) * 1e6,
               "decompress_fresh_us": wall_median(lambda c=c: cc.decompress(c), reps=200) * 1e6}
        results.append(row)
        print(json.dumps(row), flush=True)


def profile_compress(results):
    """Where the host time of a small compress goes (cProfile, 50 calls)."""
    import cProfile
    import io
    import pstats

    import cupy

    x = cupy.asarray((np.random.default_rng(0).standard_normal(1 << 19) * 0.02).astype(np.float16))
    for codec in ("raw", "ans"):
        cc.compress(x, codec=codec)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(50):
            cc.compress(x, codec=codec)
        cupy.cuda.Device().synchronize()
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(14)
        text = "\n".join(line for line in buf.getvalue().splitlines() if line.strip())[-2500:]
        results.append({"profile": codec, "text": text})
        print(f"--- profile compress 1 MiB {codec} x50 ---\n{text}", flush=True)


TINYLLAMA_BLOCK = [(2048, 2048), (256, 2048), (256, 2048), (2048, 2048), (5632, 2048), (5632, 2048), (2048, 5632)]


def _weights(shape, rs):
    import cupy

    f = (0.02 * rs.standard_t(5, shape)).astype(cupy.float32)
    u = f.view(cupy.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(cupy.uint16)  # bf16 bits, round to nearest even


def _graph_replay_seconds(plan, reps=50):
    """GPU time of one replay of ``plan.run`` captured in a CuPy CUDA graph (the launches as one unit)."""
    import cupy

    s = cupy.cuda.Stream(non_blocking=True)
    plan.run(s)  # warm: kernels compiled and loaded before capture
    s.synchronize()
    s.begin_capture()
    plan.run(s)
    graph = s.end_capture()
    with s:
        t = gpu_only_seconds(lambda: graph.launch(s), reps)
    plan.check(s)
    return t


def _dequantize_alone_seconds(n: int) -> float:
    """The dequantize kernel alone over n codes (rows of 2048) into bf16: its share of a block's data time."""
    import cupy

    from cupycodec.kernels import int8 as k8

    codes = (cupy.arange(n) % 255 - 127).astype(cupy.int8).reshape(-1, 2048)
    scales = cupy.full(codes.shape[0], 0.01, cupy.float32)
    y = cupy.empty(codes.shape, cupy.uint16)
    return gpu_only_seconds(lambda: k8.dequantize_int8(codes, scales, dtype_name="BF16", out=y))


def bench_block(results, decode_gbps_by_codec, copy_gbps):
    """A TinyLlama-1.1B block (q, k, v, o, gate, up, down: 44.0 M params) decoded by one plan.run: INT8 + ANS
    decoded and dequantized to bf16 (the torch layers' case), INT8 codes alone, and lossless bf16 (ANS '<f2').

    Bytes moved = compressed bytes read + output written (what any decoder must move); the stage data time is the
    same bytes at the large-array rates measured in this run (ANS INT8 decode from the codecs section, the
    dequantize kernel alone on one 44 MB array), and overhead is the plan's GPU time beyond it."""
    import cupy

    rs = cupy.random.RandomState(1)
    weights = [_weights(s, rs) for s in TINYLLAMA_BLOCK]
    n = sum(w.size for w in weights)
    t_dq = _dequantize_alone_seconds(n)
    ans_rate = decode_gbps_by_codec.get("ans")
    for label, kw, dequantize in (("int8+ans -> bf16", {"quantize": "int8", "codec": "ans"}, True),
                                  ("int8+ans codes", {"quantize": "int8", "codec": "ans"}, False),
                                  ("int8+ans 64 KiB -> bf16", {"quantize": "int8", "codec": "ans",
                                                                "chunk_nbytes": 65536}, True),
                                  ("int8+ans 256 KiB -> bf16", {"quantize": "int8", "codec": "ans",
                                                                 "chunk_nbytes": 262144}, True),
                                  # the codes as pairs of bytes: ANS's 16-bit float mode (two byte streams)
                                  ("int8+ans<f2 -> bf16", {"quantize": "int8",
                                                           "codec": {"id": "ans", "data_type": "<f2"}}, True),
                                  ("int8+ans<f2 256 KiB -> bf16", {"quantize": "int8", "chunk_nbytes": 262144,
                                                                    "codec": {"id": "ans", "data_type": "<f2"}}, True),
                                  ("bf16 lossless ans", {"codec": "ans"}, True)):
        try:
            cs = cc.compress_many(weights, dtype="bfloat16", **kw)
            if dequantize:
                outs = [cupy.empty(w.shape, cupy.uint16) for w in weights]
            else:
                outs = [(cupy.empty(w.shape, cupy.int8), cupy.empty((w.shape[0],), cupy.float32)) for w in weights]
            plan = cc.decode_plan(cs, outs, dequantize=dequantize)
            t = gpu_only_seconds(plan.run, reps=50)
            plan.check()
            if dequantize:
                want = [cc.decompress(c) for c in cs]
                exact = all(bool((o == w.view(cupy.uint16)).all()) for o, w in zip(outs, want))
            else:
                want = [cc.decompress(c, dequantize=False) for c in cs]
                exact = all(bool((o[0] == q.codes).all()) and bool((o[1] == q.scales).all())
                            for o, q in zip(outs, want))
            t_graph = _graph_replay_seconds(plan)
            cupy.cuda.Device().synchronize()
            t0 = time.perf_counter()
            for _ in range(50):
                plan.run()
            enqueue = (time.perf_counter() - t0) / 50
            cupy.cuda.Device().synchronize()
            comp = sum(c.nbytes for c in cs)
            written = sum(o.nbytes for o in outs) if dequantize else sum(a.nbytes + b.nbytes for a, b in outs)
            moved = comp + written
            row = {"block": label, "chunk": cs[0].segments[0].chunk_nbytes, "params": n, "compressed_nbytes": comp,
                   "written_nbytes": written, "ratio_vs_bf16": 2 * n / comp, "plan_run_gpu_us": t * 1e6,
                   "graph_replay_gpu_us": t_graph * 1e6, "plan_enqueue_host_us": enqueue * 1e6, "exact": exact,
                   "moved_gbps": moved / t / 1e9, "moved_of_copy": moved / t / 1e9 / copy_gbps,
                   "copy_gbps": copy_gbps, "plan_nbytes": plan.nbytes}
            if kw.get("quantize") and ans_rate:
                data_time = n / (ans_rate * 1e9) + (t_dq if dequantize else 0.0)
                row.update(data_time_us=data_time * 1e6, overhead_us=(t - data_time) * 1e6,
                           graph_overhead_us=(t_graph - data_time) * 1e6, dequantize_alone_us=t_dq * 1e6)
        except Exception as exc:  # keep going: one configuration's failure must not hide the others
            row = {"block": label, "error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
        results.append(row)
        print(json.dumps(row), flush=True)
        cupy.get_default_memory_pool().free_all_blocks()


def check_no_sync(results):
    """Enqueue a ~50 ms spin kernel, then plan.run(): if run() returned before the spin ended, it did not sync."""
    import cupy

    spin = cupy.RawKernel(r"""
    extern "C" __global__ void spin(long long cycles) {
        long long t0 = clock64(); while (clock64() - t0 < cycles) {}
    }""", "spin")
    x = cupy.arange(1 << 22, dtype=cupy.int32)
    c = cc.compress(x, codec="ans")
    out = cupy.empty_like(x)
    plan = cc.decode_plan([c], [out])
    plan.run()
    plan.check()
    clock = cupy.cuda.runtime.getDeviceProperties(0)["clockRate"] * 1e3
    spin((1,), (1,), (np.int64(clock * 0.05),))
    t0 = time.perf_counter()
    plan.run()
    returned = time.perf_counter() - t0
    plan.check()
    total = time.perf_counter() - t0
    row = {"no_sync_check": True, "run_returned_ms": returned * 1e3, "until_done_ms": total * 1e3,
           "run_did_not_wait": returned < 0.5 * total}
    results.append(row)
    print(json.dumps(row), flush=True)


def bench_split(results, data, copy_gbps):
    """The byte-plane split/merge kernels on 256 MiB of bf16: GB/s of bytes read + written, beside the copy."""
    import cupy

    from cupycodec.dtypes import ArraySpec
    from cupycodec.kernels import byteplane

    arr, _ = data["bf16"]
    raw = arr.reshape(-1).view(cupy.uint8)
    planes = byteplane.split(raw, 2, True)
    out = cupy.empty_like(arr)
    spec = ArraySpec("BF16", "<", arr.shape)
    t_split = events_median(lambda: byteplane.split(raw, 2, True), reps=20)
    t_merge = events_median(lambda: byteplane.merge(planes, 2, True, spec, out=out), reps=20)
    exact = bool((out == arr).all())
    row = {"split_gbps": 2 * raw.nbytes / t_split / 1e9, "merge_gbps": 2 * raw.nbytes / t_merge / 1e9,
           "copy_gbps": copy_gbps, "exact": exact}
    row["split_of_copy"] = row["split_gbps"] / copy_gbps
    row["merge_of_copy"] = row["merge_gbps"] / copy_gbps
    results.append(row)
    print(json.dumps(row), flush=True)


@functools.cache
def _spin_kernel():
    import cupy

    return cupy.RawKernel(r"""extern "C" __global__ void spin(long long cycles)
    { const long long t = clock64(); while (clock64() - t < cycles) { } }""", "spin")


def gpu_only_seconds(fn, reps=20):
    """GPU time of an asynchronous ``fn`` with host launch costs hidden: a ~1 ms spin kernel is queued first, so
    ``fn``'s launches are all waiting when the GPU reaches them and the events bracket GPU work alone."""
    import cupy

    spin = _spin_kernel()
    fn()
    s, e = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(reps):
        spin((1,), (1,), (np.int64(2_000_000),))
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(cupy.cuda.get_elapsed_time(s, e) / 1e3)
    return float(np.median(times))


def bench_crc(results):
    """GPU time of the chunk checksums (CRC32): cupycodec's kernel (kernels.crc32) beside nvCOMP's
    nvcompBatchedCRC32Async on the same chunks, 1 MiB split different ways and 256 MiB (compress's checksum pass)."""
    import zlib

    import cupy

    from cupycodec.backends import _nvcomp_lib as nvcomp
    from cupycodec.kernels import crc32

    sp = cupy.cuda.get_current_stream().ptr
    for total, chunk in ((1 << 20, 1 << 20), (1 << 20, 1 << 18), (1 << 20, 1 << 16), (1 << 20, 1 << 14),
                         (256 << 20, 1 << 16), (256 << 20, 1 << 18)):
        data = cupy.random.RandomState(0).randint(0, 256, total, dtype=cupy.uint8)
        n = total // chunk
        ptrs = np.uint64(data.data.ptr) + np.arange(n, dtype=np.uint64) * np.uint64(chunk)
        table = cupy.asarray(np.concatenate([ptrs, np.full(n, chunk, dtype=np.uint64)]))
        shape = crc32.shape_for(chunk, total)
        work = cupy.zeros(max(crc32.work_words(n, shape[0]), 1), np.uint32)
        ours, theirs = cupy.empty(n, np.uint32), cupy.empty(n, np.uint32)

        def run_ours(table=table, n=n, shape=shape, work=work, out=ours):
            crc32.crc32_batch(table.data.ptr, table.data.ptr + 8 * n, out, n, shape, work=work)

        def run_nvcomp(table=table, n=n, chunk=chunk, out=theirs):
            nvcomp.nvcomp_crc32_async(table.data.ptr, table.data.ptr + 8 * n, out.data.ptr, n, chunk, sp)

        t_ours, t_nv = gpu_only_seconds(run_ours), gpu_only_seconds(run_nvcomp)
        first = zlib.crc32(data[:chunk].get().tobytes())
        row = {"crc_total": total, "crc_chunk": chunk, "cupycodec_us": t_ours * 1e6,
               "cupycodec_gbps": total / t_ours / 1e9, "nvcomp_us": t_nv * 1e6, "nvcomp_gbps": total / t_nv / 1e9,
               "equal": bool((ours == theirs).all()) and int(ours[0]) == first}
        results.append(row)
        print(json.dumps(row), flush=True)


def copy_bandwidth():
    import cupy

    a = cupy.empty(1 << 30, dtype=cupy.uint8)
    a.fill(1)
    b = cupy.empty_like(a)
    t = events_median(lambda: b.__setitem__(Ellipsis, a), reps=10)
    return 2 * a.nbytes / t / 1e9


def bench_cpu_decode(results, data):
    """CPU decode of GPU-written standard streams, chunks spread over all cores."""
    from cupycodec.backends import cpu

    arr, logical = data["bf16"]
    for codec in ("zstd", "lz4", "deflate"):
        c = cc.compress(arr, codec=codec, dtype=logical).to_host()
        out = np.empty(c.shape, dtype=c.dtype)
        t = min(timeit_cpu(lambda c=c, o=out: cc.decompress(c, out=o, backend="cpu")) for _ in range(3))
        results.append({"cpu_decode": codec, "threads": cpu.num_threads(), "gbps": c.raw_nbytes / t / 1e9,
                        "ratio": c.ratio})
        print(json.dumps(results[-1]), flush=True)


def timeit_cpu(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None):
    import cupy

    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--sweep-mib", type=int, default=128)
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sections", default="env,codecs,sweep,split,crc,profile,latency,block,nosync,cpu")
    args = p.parse_args(argv)
    sections = set(args.sections.split(","))
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    info = cc.info()
    env = {"gpu": name, "driver": cupy.cuda.runtime.driverGetVersion(), "cuda_runtime":
           cupy.cuda.runtime.runtimeGetVersion(), "cupy": cupy.__version__, "nvcomp": info["gpu"].get("nvcomp"),
           "cupycodec": cc.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    results = {"env": env, "codecs": [], "sweep": [], "latency": [], "block": [], "nosync": [], "cpu": [],
               "profile": [], "split": [], "crc": []}
    print(json.dumps(env), flush=True)
    if "env" in sections:
        env["copy_gbps_read_plus_write"] = copy_bandwidth()
        print(f"device copy bandwidth: {env['copy_gbps_read_plus_write']:.0f} GB/s", flush=True)
    data = make_data(args.mib)
    if "codecs" in sections:
        bench_codecs(data, [None], results["codecs"], direct=True)
    if "sweep" in sections and not args.quick:
        del data
        cupy.get_default_memory_pool().free_all_blocks()
        sweep_data = make_data(args.sweep_mib)
        bench_codecs(sweep_data, [16384, 65536, 262144, 1 << 20], results["sweep"], direct=False)
        del sweep_data
        data = make_data(args.mib)
    gbps = {r["codec"]: r.get("decode_gbps") for r in results["codecs"]
            if r["data"] == "int8" and not r.get("direct_nvcomp")}
    for section, fn in (("split", lambda: bench_split(results["split"], data,
                                                      env.get("copy_gbps_read_plus_write", 0) or copy_bandwidth())),
                        ("crc", lambda: bench_crc(results["crc"])),
                        ("profile", lambda: profile_compress(results["profile"])),
                        ("latency", lambda: bench_latency(results["latency"])),
                        ("block", lambda: bench_block(results["block"], gbps,
                                                      env.get("copy_gbps_read_plus_write", 0) or copy_bandwidth())),
                        ("nosync", lambda: check_no_sync(results["nosync"])),
                        ("cpu", lambda: bench_cpu_decode(results["cpu"], data))):
        if section in sections:
            try:
                fn()
            except Exception:
                traceback.print_exc()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
