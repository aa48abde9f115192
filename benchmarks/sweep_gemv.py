"""Sweep the tensor-core GEMV's launch parameters (GPU): warps per 16-row tile (W) and 64-code steps in flight per
warp (U), per Llama shape, at M = 1, 8 and 16, against bf16 ``F.linear``, the default choice and the FMA kernel,
timed as bench_torch times a layer (CUDA-graph replays over enough copies of the layer to defeat L2). Row keys:
``u{U}_w{W}_us``. Variants tried here and dropped (RESULTS.md, 2026-12-02): a cp.async-pipelined one (a ring of 2-4
steps per warp in shared memory), 1.3-1.6x slower; one that loaded activations when a step is used instead of
holding them in flight (fewer registers), 1.03-1.25x slower on 16 of 18 rows; and one with a stage of loads in
flight while the previous stage is multiplied, on a grid of one wave (``mma_ahead``), 1.1-1.3x slower on the tall
shapes. The codes' streaming loads (no L1 place, a 256-byte L2 prefetch) won, 4-9 %, and are the kernel's now.

Usage: python benchmarks/sweep_gemv.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from bench_torch import L2_DEFEAT_BYTES, copy_gbps, graph_us

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (5632, 2048), (2048, 5632)]


def main(argv=None) -> int:
    from cupycodec.integrations.torch import CompressedLinear, ops

    p = argparse.ArgumentParser()
    p.add_argument("--json")
    args = p.parse_args(argv)
    bw = copy_gbps()
    env = {"gpu": torch.cuda.get_device_name(), "copy_gbps_read_plus_write": bw}
    print(json.dumps(env), flush=True)
    rows = []
    for n, k in SHAPES:
        copies = max(2, -(-L2_DEFEAT_BYTES // (2 * n * k)))
        lins = [torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        cls = [CompressedLinear.from_linear(lin, "int8") for lin in lins]
        for m in (1, 8, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            a = [(x, cl.qweight, cl.scale, None, "channel", 128) for cl in cls]
            read = n * k + n * 4 + m * k * 2
            with torch.no_grad():
                row = {"shape": f"{n}x{k}", "m": m,
                       "bf16_us": graph_us([lambda lin=lin, x=x: torch.nn.functional.linear(x, lin.weight)
                                            for lin in lins]),
                       "default_us": graph_us([lambda t=t: ops.gemv_linear(*t) for t in a]),
                       "fma_us": graph_us([lambda t=t: ops.gemv_linear(*t, kernel="fma") for t in a])}
                for u in (2, 4):
                    for w in (2, 4, 8):
                        row[f"u{u}_w{w}_us"] = graph_us([lambda t=t, u=u, w=w: ops.gemv_linear(
                            *t, kernel="mma", warps=w, unroll=u) for t in a])
            best = min((v, key) for key, v in row.items() if key[0] == "u" and key[1].isdigit())
            row["best"] = best[1]
            row["best_of_copy"] = read / best[0] / 1e3 / bw
            row["default_of_copy"] = read / row["default_us"] / 1e3 / bw
            rows.append(row)
            print(json.dumps(row), flush=True)
        del lins, cls
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
