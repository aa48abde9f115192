"""The host (Python) cost of cupycodec's GPU path for a 1 MiB round trip, measured on a machine without a GPU.

A stand-in CuPy (``benchmarks/fakecupy``: device memory is host memory, copies are memmove, kernels and syncs do
nothing) and a stand-in nvCOMP (its size queries, and compression that reports 7/8 of each chunk without writing
it) let the real compress/decompress code run end to end, so what is timed is our own Python and NumPy between
CUDA calls: the part of a small round trip that the GPU host's slow CPU multiplies. It is a proxy for that host
time, not a GPU measurement (CuPy's own calls cost more there), and the decoded bytes are meaningless. Works on
the pre-engine code too (``--path``), for before/after comparisons of host cost.

Usage: python benchmarks/host_cost.py [--reps 2000] [--path CHECKOUT] [--profile]
"""
import argparse
import os
import sys
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_args = argparse.ArgumentParser()
_args.add_argument("--reps", type=int, default=2000)
_args.add_argument("--path", default=os.path.dirname(_HERE), help="checkout whose cupycodec is timed")
_args.add_argument("--profile", action="store_true", help="cProfile the auto round trip as well")
ARGS = _args.parse_args()
sys.path[:0] = [os.path.join(_HERE, "fakecupy"), os.path.abspath(ARGS.path)]
import cupy  # noqa: E402  (the stand-in)

assert "fake" in cupy.__version__
from fake_nvcomp import install  # noqa: E402  (beside the stand-in CuPy)

import cupycodec as cc  # noqa: E402

try:
    from cupycodec.backends import _nvcomp_lib as nv
except ImportError:  # the pre-engine code
    from cupycodec.backends import nvcomp as nv

install(nv)


def med(fn, reps):
    for _ in range(20):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e6


def main():
    reps = ARGS.reps
    print(f"cupycodec from {os.path.dirname(cc.__file__)}: medians of {reps} calls, microseconds of host time")
    x = cupy.asarray((np.random.default_rng(0).standard_normal(1 << 19) * 0.02).astype(np.float16))
    for codec in ("auto", "raw"):
        c = cc.compress(x, codec=codec)
        assert "cpu" not in repr(c), c
        out = cupy.empty_like(x)
        cc.decompress(c, out=out)
        r = {"compress": med(lambda codec=codec: cc.compress(x, codec=codec), reps),
             "decompress(out=)": med(lambda c=c, out=out: cc.decompress(c, out=out), reps),
             "decompress": med(lambda c=c: cc.decompress(c), reps),
             "round trip": med(lambda codec=codec: cc.decompress(cc.compress(x, codec=codec)), reps)}
        print(f"{codec:5s} ({c.segments[0].codec.codec_id}, {c.segments[0].chunk_nbytes // 1024} KiB chunks): "
              + "  ".join(f"{k} {v:.1f}" for k, v in r.items()))
    if ARGS.profile:
        import cProfile
        import pstats
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(reps):
            cc.decompress(cc.compress(x))
        pr.disable()
        st = pstats.Stats(pr)
        st.sort_stats("tottime").print_stats(25)
        st.sort_stats("cumulative").print_stats("cupycodec", 60)



if __name__ == "__main__":
    main()
