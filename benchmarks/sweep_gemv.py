"""Sweep the tensor-core GEMV's launch parameters (GPU): warps per 16-row tile (W) and 64-code steps in flight per
warp (U), per Llama shape, at M = 1, 8 and 16, against bf16 ``F.linear``, the default choice and the FMA kernel,
timed as bench_torch times a layer (CUDA-graph replays over enough copies of the layer to defeat L2). Row keys:
``u{U}_w{W}_us``. Variants tried here and dropped (RESULTS.md, 2026-12-02): a cp.async-pipelined one (a ring of 2-4
steps per warp in shared memory), 1.3-1.6x slower; one that loaded activations when a step is used instead of
holding them in flight (fewer registers), 1.03-1.25x slower on 16 of 18 rows; and one with a stage of loads in
flight while the previous stage is multiplied, on a grid of one wave (``mma_ahead``), 1.1-1.3x slower on the tall
shapes. The codes' streaming loads (no L1 place, a 256-byte L2 prefetch) won, 4-9 %, and are the kernel's now.
A bulk-copy variant for sm_90 (``cp.async.bulk`` of 256-byte row segments into a ring of 2-8 shared-memory stages per
warp, a warp per contiguous 1/W of K; tenth session) was exact but 1.2-1.5x slower at its best (2 stages, 8 warps)
and slower still with more stages (results/2026-12-02j-h200-call4-sweep-gemv-bulk.json). A stream-K split (one wave
of blocks, equal contiguous ranges of 64-code steps per warp, partial tiles summed in a workspace by their last
contributor; twenty-third session, try_streamk.py at c96fe02) was exact but 1.10-1.35x slower at M <= 8.

Warps per tile need not divide 8: a block is then one tile's W warps (``gemv.tiles_per_block``), so W can be chosen
for the number of blocks the GPU holds at once (its occupancy, printed per kernel) rather than from 1, 2, 4 or 8.

Usage: python benchmarks/sweep_gemv.py [--json PATH] [--warps 2,4,8] [--unrolls 2,4] [--shapes 4096x4096,...]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from bench_torch import L2_DEFEAT_BYTES, copy_gbps, graph_us

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (5632, 2048), (2048, 5632)]


def occupancy(warps, unrolls) -> dict:
    """Per tensor-core kernel instance (bf16, channel scales, M <= 8 and <= 16): registers per thread and blocks
    per SM, from the CUDA occupancy calculator."""
    import cupy

    from cupycodec.kernels import gemv

    out = {}
    for mm in (8, 16):
        for u in unrolls:
            for w in warps:
                fn = gemv._function(0, "mma", "BF16", mm, w, False, u)  # a CuPy RawKernel
                threads = 32 * w * gemv.tiles_per_block(w)
                row = out[f"m{mm}_u{u}_w{w}"] = {"regs": getattr(fn, "num_regs", None), "threads": threads}
                try:  # a figure to read beside the times, not one the sweep depends on
                    blocks = cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, threads, 0)
                    row.update(blocks_per_sm=blocks, warps_per_sm=blocks * threads // 32)
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"
    return out


def main(argv=None) -> int:
    from cupycodec.integrations.torch import CompressedLinear, ops

    p = argparse.ArgumentParser()
    p.add_argument("--json")
    p.add_argument("--warps", default="2,4,8", help="warps per tile to sweep (1-16)")
    p.add_argument("--unrolls", default="2,4", help="64-code steps in flight to sweep (2, 4, 8)")
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    p.add_argument("--ms", default="1,8,16")
    args = p.parse_args(argv)
    warps = [int(v) for v in args.warps.split(",")]
    unrolls = [int(v) for v in args.unrolls.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    bw = copy_gbps()
    env = {"gpu": torch.cuda.get_device_name(), "copy_gbps_read_plus_write": bw}
    env["occupancy"] = occupancy(warps, unrolls)
    print(json.dumps(env), flush=True)
    rows = []
    for n, k in shapes:
        copies = max(2, -(-L2_DEFEAT_BYTES // (2 * n * k)))
        lins = [torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        cls = [CompressedLinear.from_linear(lin, "int8") for lin in lins]
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            a = [(x, cl.qweight, cl.scale, None, "channel", 128) for cl in cls]
            read = n * k + n * 4 + m * k * 2
            with torch.no_grad():
                row = {"shape": f"{n}x{k}", "m": m,
                       "bf16_us": graph_us([lambda lin=lin, x=x: torch.nn.functional.linear(x, lin.weight)
                                            for lin in lins]),
                       "default_us": graph_us([lambda t=t: ops.gemv_linear(*t) for t in a]),
                       "fma_us": graph_us([lambda t=t: ops.gemv_linear(*t, kernel="fma") for t in a])}
                for u in unrolls:
                    for w in warps:
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
