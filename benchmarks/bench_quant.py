"""GPU benchmark of the int8 kernels (cupycodec.kernels.int8) against a device-to-device copy in the same run.

Data: weight-like values, 0.02 * Student-t(5), as bf16 (uint16 bits), fp16 and fp32 matrices of ``--mib`` MiB with
rows of ``--cols`` elements. For each dtype: the copy bandwidth (bytes read + written), then quantize (tensor,
channel = one scale per row, groups of ``--group-sizes``) and dequantize to bf16. GB/s count the minimal traffic:
the input read once and the outputs written once (codes, scales, values); "of copy" is that rate over the copy's.
Quantize is timed with the on-device domain check (the default, one synchronization) and without; "check us" is the
difference per call. Quantize alternates between --inputs copies of the input, so that no call starts on data the
previous call left in L2 (the per-tensor second pass walks backwards to reuse what its own first pass left there).
SQNR is computed over the whole tensor.
Timings are medians of CUDA-event intervals over --batch back-to-back calls, after a warm-up.

Usage: python benchmarks/bench_quant.py [--mib 512] [--cols 8192] [--reps 20] [--batch 5] [--group-sizes 32,64,128]
       [--dtypes bf16,f16,f32] [--inputs 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import sys
from pathlib import Path

import numpy as np

try:
    from cupycodec.kernels import int8 as kernels
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cupycodec.kernels import int8 as kernels

DTYPES = {"bf16": (np.uint16, "BF16"), "f16": (np.float16, "F16"), "f32": (np.float32, "F32")}


def granularities(group_sizes: str) -> dict[str, dict]:
    cases = {"tensor": {"granularity": "tensor"}, "channel": {"granularity": "channel", "axis": 0}}
    for g in group_sizes.split(","):
        cases[f"group-{int(g)}"] = {"granularity": "group", "group_size": int(g)}
    return cases


def events_median_ms(fn, reps: int, warmup: int, batch: int) -> float:
    """Median over `reps` of the CUDA-event time of `batch` back-to-back calls, divided by `batch`.

    Batching keeps the GPU busy while Python enqueues the next call, so asynchronous calls are timed by the device
    rather than by the host's launch overhead; calls that synchronize (quantize with check=True) still pay it.
    """
    import cupy

    for _ in range(warmup):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(reps):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(batch):
            fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / batch)
    return float(np.median(times))


def weight_like(shape, seed: int):
    """0.02 * Student-t(5) in float32 on the device: t = z / sqrt(chi2_5 / 5), chi2_5 = 2 * Gamma(5/2)."""
    import cupy

    rng = cupy.random.default_rng(seed)
    z = rng.standard_normal(shape, dtype=np.float32)
    chi2 = 2 * rng.standard_gamma(2.5, size=shape, dtype=np.float32)
    z *= np.float32(0.02) / cupy.sqrt(chi2 / np.float32(5))
    return z


def to_storage(x32, key: str):
    """float32 -> the benchmark dtype's storage; bf16 as uint16 bits rounded half to even."""
    import cupy

    if key == "f32":
        return x32
    if key == "f16":
        return x32.astype(np.float16)
    bits = x32.view(np.uint32)
    return ((bits + cupy.uint32(0x7FFF) + ((bits >> 16) & cupy.uint32(1))) >> 16).astype(np.uint16)


def sqnr_db(x_storage, key: str, y32) -> float:
    """20 log10(||x|| / ||x - y||) in float64 on the device (cupycodec.quant.reference.sqnr's definition)."""
    import cupy

    if key == "bf16":
        x = (x_storage.astype(np.uint32) << 16).view(np.float32)
    else:
        x = x_storage.astype(np.float32)
    signal = noise = 0.0
    step = max(1, x.shape[0] // 16)
    for r in range(0, x.shape[0], step):  # bounded float64 temporaries
        xs = x[r : r + step].astype(np.float64)
        signal += float(cupy.sum(xs * xs))
        d = xs - y32[r : r + step].astype(np.float64)
        noise += float(cupy.sum(d * d))
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def run(args) -> dict:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    env = {
        "gpu": name,
        "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
        "cuda_driver": cupy.cuda.runtime.driverGetVersion(),
        "cupy": cupy.__version__,
        "python": platform.python_version(),
        "mib": args.mib,
        "cols": args.cols,
        "reps": args.reps,
        "batch": args.batch,
        "inputs": args.inputs,
    }
    rows_out = []
    for key in args.dtypes.split(","):
        storage, dtype_name = DTYPES[key]
        itemsize = np.dtype(storage).itemsize
        rows = max(1, args.mib * 2**20 // (itemsize * args.cols))
        shape = (rows, args.cols)
        x = to_storage(weight_like(shape, seed=0), key)
        nbytes = x.nbytes
        inputs = [x] + [x.copy() for _ in range(args.inputs - 1)]

        copy_dst = cupy.empty_like(x)
        stream_ptr = cupy.cuda.get_current_stream().ptr
        kind = cupy.cuda.runtime.memcpyDeviceToDevice

        def copy(dst=copy_dst, src=x, n=nbytes, s=stream_ptr, k=kind):
            cupy.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, n, k, s)

        ms = events_median_ms(copy, args.reps, args.warmup, args.batch)
        copy_gbs = 2 * nbytes / ms / 1e6
        rows_out.append({"dtype": key, "op": "device copy", "granularity": "", "ms": ms, "gb_s": copy_gbs,
                         "of_copy": 1.0, "ms_nocheck": None, "gb_s_nocheck": None, "of_copy_nocheck": None,
                         "sqnr_db": None})
        del copy_dst

        for gname, params in granularities(args.group_sizes).items():
            codes, scales = kernels.quantize_int8(x, dtype_name=dtype_name, **params)
            quant_bytes = nbytes + codes.nbytes + scales.nbytes

            cycle = itertools.cycle(inputs)

            def quantize(check, xs=cycle, name=dtype_name, p=params, c=codes, s=scales):
                kernels.quantize_int8(next(xs), dtype_name=name, check=check, out=(c, s), **p)

            ms = events_median_ms(lambda q=quantize: q(True), args.reps, args.warmup, args.batch)
            ms_nc = events_median_ms(lambda q=quantize: q(False), args.reps, args.warmup, args.batch)
            y32 = kernels.dequantize_int8(codes, scales, dtype_name="F32", **params)
            sq = sqnr_db(x, key, y32)
            del y32
            rows_out.append({"dtype": key, "op": "quantize", "granularity": gname, "ms": ms,
                             "gb_s": quant_bytes / ms / 1e6, "of_copy": quant_bytes / ms / 1e6 / copy_gbs,
                             "ms_nocheck": ms_nc, "gb_s_nocheck": quant_bytes / ms_nc / 1e6,
                             "of_copy_nocheck": quant_bytes / ms_nc / 1e6 / copy_gbs, "sqnr_db": sq})

            y = cupy.empty(shape, dtype=np.uint16)
            deq_bytes = codes.nbytes + scales.nbytes + y.nbytes

            def dequantize(p=params, c=codes, s=scales, out=y):
                kernels.dequantize_int8(c, s, dtype_name="BF16", out=out, **p)

            ms = events_median_ms(dequantize, args.reps, args.warmup, args.batch)
            rows_out.append({"dtype": key, "op": "dequantize -> bf16", "granularity": gname, "ms": ms,
                             "gb_s": deq_bytes / ms / 1e6, "of_copy": deq_bytes / ms / 1e6 / copy_gbs,
                             "ms_nocheck": None, "gb_s_nocheck": None, "of_copy_nocheck": None, "sqnr_db": None})
            del codes, scales, y
        del x, inputs
        cupy.get_default_memory_pool().free_all_blocks()
    return {"env": env, "rows": rows_out}


def markdown(result: dict) -> str:
    env = result["env"]
    lines = [
        f"GPU: {env['gpu']}; CUDA runtime {env['cuda_runtime']}, driver {env['cuda_driver']}; CuPy {env['cupy']}",
        f"Input: {env['mib']} MiB per dtype, rows of {env['cols']}; median of {env['reps']} reps of "
        f"{env['batch']} back-to-back calls; quantize alternates between {env['inputs']} input copies",
        "",
        "| dtype | op | granularity | ms | GB/s | of copy | GB/s (check=False) | of copy (check=False) | check us "
        "| SQNR dB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        nocheck = f"{r['gb_s_nocheck']:.0f}" if r["gb_s_nocheck"] is not None else ""
        nocheck_frac = f"{r['of_copy_nocheck']:.0%}" if r["of_copy_nocheck"] is not None else ""
        sq = f"{r['sqnr_db']:.1f}" if r["sqnr_db"] is not None else ""
        check_us = f"{(r['ms'] - r['ms_nocheck']) * 1e3:.0f}" if r["ms_nocheck"] is not None else ""
        lines.append(f"| {r['dtype']} | {r['op']} | {r['granularity']} | {r['ms']:.3f} | {r['gb_s']:.0f} | "
                     f"{r['of_copy']:.0%} | {nocheck} | {nocheck_frac} | {check_us} | {sq} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="input size per dtype in MiB (>= 256 for the report)")
    parser.add_argument("--cols", type=int, default=8192, help="row length in elements (channel = one scale per row)")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions (median reported; >= 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first")
    parser.add_argument("--batch", type=int, default=5, help="back-to-back calls per timed repetition")
    parser.add_argument("--dtypes", default="bf16,f16,f32", help="comma-separated subset of bf16,f16,f32")
    parser.add_argument("--inputs", type=int, default=2, help="input copies that quantize alternates between (>= 1)")
    parser.add_argument("--group-sizes", default="128", help="comma-separated group sizes, e.g. 32,64,128")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.reps < 10:
        parser.error("--reps must be >= 10")
    if args.batch < 1:
        parser.error("--batch must be >= 1")
    if args.inputs < 1:
        parser.error("--inputs must be >= 1")
    unknown = set(args.dtypes.split(",")) - set(DTYPES)
    if unknown:
        parser.error(f"unknown dtypes {sorted(unknown)}; choose from {', '.join(DTYPES)}")
    result = run(args)
    print(markdown(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
