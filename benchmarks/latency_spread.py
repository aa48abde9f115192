"""Why a small GPU round trip's time varies between runs: per-call times of the 1 MiB ``auto`` round trip (and its
halves) as percentiles, with Python's garbage collector on, off, and with the heap frozen, and how many collections
ran. Not a benchmark of record (latency_ab.py is); a diagnostic for issue 8.

Usage: python benchmarks/latency_spread.py [--reps 2000]
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import numpy as np

import cupycodec as cc


def spread(fn, reps, sync):
    for _ in range(20):
        fn()
    sync()
    ts = np.empty(reps)
    before = [s["collections"] for s in gc.get_stats()]
    for i in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        ts[i] = time.perf_counter() - t
    after = [s["collections"] for s in gc.get_stats()]
    us = ts * 1e6
    return {"p10": np.percentile(us, 10), "p50": np.percentile(us, 50), "p90": np.percentile(us, 90),
            "p99": np.percentile(us, 99), "mean": us.mean(), "gc": [a - b for a, b in zip(after, before)]}


def main():
    import cupy

    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=2000)
    p.add_argument("--json")
    args = p.parse_args()
    x = cupy.asarray((np.random.default_rng(0).standard_normal(1 << 19) * 0.02).astype(np.float16))
    c = cc.compress(x)
    sync = cupy.cuda.Device().synchronize
    cases = {"round trip": lambda: cc.decompress(cc.compress(x)), "compress": lambda: cc.compress(x),
             "decompress": lambda: cc.decompress(c)}
    rows = []
    for mode in ("gc on", "gc off", "gc frozen"):
        gc.enable()
        gc.unfreeze()
        if mode == "gc off":
            gc.disable()
        if mode == "gc frozen":
            gc.collect()
            gc.freeze()
        for name, fn in cases.items():
            r = spread(fn, args.reps, sync)
            r.update(case=name, mode=mode)
            rows.append(r)
            print(f"{mode:9s} {name:10s} " + "  ".join(f"{k} {r[k]:7.1f}" for k in ("p10", "p50", "p90", "p99", "mean"))
                  + f"  collections {r['gc']}", flush=True)
    gc.enable()
    gc.unfreeze()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
