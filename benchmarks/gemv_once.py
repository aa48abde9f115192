"""Launch each GEMV variant once on one shape, for a profiler (``ncu``) to read its counters (GPU).

bf16 ``F.linear`` (cuBLAS) comes first, then the int8 kernels ``fma`` and ``mma`` (their default shapes); every
launch follows a warm-up launch of the same kernel, so a profiler sees compiled, warm kernels. Usage (device_run.sh's
``ncu`` stage):

    ncu --clock-control none --section SpeedOfLight ... python benchmarks/gemv_once.py --shape 11008x4096 --m 1
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv=None) -> int:
    from cupycodec.integrations.torch import CompressedLinear, ops

    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="11008x4096")
    p.add_argument("--m", type=int, default=1)
    args = p.parse_args(argv)
    n, k = map(int, args.shape.split("x"))
    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    cl = CompressedLinear.from_linear(lin, "int8")
    x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
    t = (x, cl.qweight, cl.scale, None, "channel", 128)
    variants = [("bf16", lambda: torch.nn.functional.linear(x, lin.weight)),
                ("fma", lambda: ops.gemv_linear(*t, kernel="fma")),
                ("mma", lambda: ops.gemv_linear(*t, kernel="mma"))]
    with torch.no_grad():
        for name, fn in variants:
            fn()
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_push(name)
            fn()
            torch.cuda.nvtx.range_pop()
            torch.cuda.synchronize()
            print(name, "ran", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
