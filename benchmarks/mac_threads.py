"""How fast does a host check a checkpoint's tensors: keyed BLAKE3, HMAC-SHA256 and CRC32, on 1..N threads?

A compressed checkpoint's load checks every tensor on worker threads while the main thread places the tensors
(integrations/torch/checkpoint.py, ``Checks``). This script writes a file of random bytes (page cache warm), maps it
afresh for each trial (so page faults are paid, as in a load), cuts it into tensor-sized pieces and checks them on a
thread pool of 1, 2, 4, 8 and 16 workers, each algorithm in turn, rounds rotating the algorithms' order. The MAC
calls are the library's own (``container.compute_mac`` with threads=1, as a checkpoint's checks make them).

Usage: python benchmarks/mac_threads.py [--mib 1400] [--piece-mib 9] [--rounds 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _algs():
    import cupycodec as cc
    from cupycodec.backends import cpu
    from cupycodec.container import compute_mac

    header = cc.compress(np.zeros(4, np.float32), codec="zstd")._header
    key = bytes(range(32))
    return {
        "blake3": lambda view: compute_mac(key, header, view, "BLAKE3", threads=1),
        "hmac-sha256": lambda view: compute_mac(key, header, view, "HMAC-SHA256"),
        "crc32": lambda view: cpu.crc32(view),
        "touch": lambda view: int(np.frombuffer(view, np.uint8)[::4096].sum()),  # page faults only
    }


def trial(path: str, nbytes: int, piece: int, fn, workers: int) -> float:
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), nbytes, access=mmap.ACCESS_READ)
    try:
        view = memoryview(m)
        t = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fn, [view[i : i + piece] for i in range(0, nbytes, piece)]))
        dt = time.perf_counter() - t
        view.release()
    finally:
        m.close()
    return dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1400)
    ap.add_argument("--piece-mib", type=float, default=9.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", default="1,2,4,8,16")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    nbytes, piece = args.mib << 20, int(args.piece_mib * 2**20)
    algs = _algs()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "data.bin")
        rng = np.random.default_rng(0)
        with open(path, "wb") as f:
            for _ in range(0, nbytes, 64 << 20):
                f.write(rng.integers(0, 256, min(64 << 20, nbytes), dtype=np.uint8).tobytes())
        nbytes = os.path.getsize(path)
        names = list(algs)
        for workers in [int(w) for w in args.workers.split(",")]:
            times = {a: [] for a in names}
            for r in range(args.rounds):
                for a in names[r % len(names):] + names[: r % len(names)]:
                    times[a].append(trial(path, nbytes, piece, algs[a], workers))
            for a in names:
                s = statistics.median(times[a])
                row = {"alg": a, "workers": workers, "s": s, "gbps": nbytes / s / 1e9, "rounds": times[a]}
                rows.append(row)
                print(f"{a:12s} workers {workers:2d}: {s * 1e3:8.1f} ms  {row['gbps']:6.2f} GB/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu_count": os.cpu_count(), "nbytes": nbytes, "piece": piece, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
