"""Command line: ``python -m cupycodec`` (or ``cupycodec``) info | demo | bench | compress | decompress | inspect."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]

CPU_CODECS = ["raw", "lz4", "snappy", "deflate", "gzip", "zstd", "auto"]
GPU_CODECS = ["raw", "lz4", "snappy", "gdeflate", "deflate", "gzip", "zstd", "cascaded", "bitcomp", "ans", "auto"]


def _cmd_info(args) -> int:
    from .info import format_info, info

    data = info()
    print(json.dumps(data, indent=2, default=str) if args.json else format_info(data))
    return 0


def _cmd_demo(args) -> int:
    from . import bench
    from .info import info

    arrays, source = bench.demo_arrays(args.size_mib)
    gpu = info()["gpu"]
    print(f"cupycodec demo: {source}")
    devices = ["cpu"] + (["cuda"] if gpu.get("available") and not args.cpu_only else [])
    for device in devices:
        where = f"GPU {gpu.get('name')} (nvCOMP {gpu.get('nvcomp')})" if device == "cuda" else "CPU"
        codecs = args.codecs or (GPU_CODECS if device == "cuda" else CPU_CODECS)
        print(f"\n{where}: ratio = raw bytes / container bytes; speeds in GB/s of raw data; "
              f"median of {args.repeat} after a warm-up")
        rows = bench.run(arrays, codecs, device=device, repeat=args.repeat)
        print(bench.format_table(rows))
        if not all(r.exact for r in rows if r.nbytes):
            print("ERROR: a round trip was not bit-exact", file=sys.stderr)
            return 1
    if not gpu.get("available"):
        print(f"\nGPU codecs not run: {gpu.get('reason')}")
    return 0


def _cmd_bench(args) -> int:
    import ml_dtypes
    import numpy as np

    from . import bench

    n = int(args.size_mib * 2**20 / 2)
    w = (0.02 * np.random.default_rng(0).standard_t(5, n)).astype(ml_dtypes.bfloat16)
    codecs = args.codecs or (GPU_CODECS if args.device == "cuda" else CPU_CODECS)
    rows = bench.run({f"bf16 {args.size_mib:g} MiB": w}, codecs, device=args.device, repeat=args.repeat)
    print(bench.format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ | {"ratio": r.ratio} for r in rows], f, indent=2)
    return 0


def _cmd_compress(args) -> int:
    import numpy as np

    import cupycodec as cc

    x = np.load(args.input, mmap_mode="r", allow_pickle=False)
    options = {}
    if args.level is not None:
        options["level"] = args.level
    c = cc.compress(np.asarray(x), codec=args.codec, chunk_nbytes=args.chunk_nbytes, dtype=args.dtype,
                    filters=args.filter or None, quantize=args.quantize, granularity=args.granularity,
                    group_size=args.group_size, **options)
    cc.save(args.output, c)
    print(f"{args.input} -> {args.output}: {c.raw_nbytes} -> {c.nbytes} bytes, ratio {c.ratio:.3f} ({c.codec})")
    return 0


def _cmd_decompress(args) -> int:
    import numpy as np

    import cupycodec as cc

    c = cc.load(args.input)
    limit = None if args.max_output_nbytes == 0 else args.max_output_nbytes
    kwargs = {} if args.max_output_nbytes is None else {"max_output_nbytes": limit}
    y = cc.decompress(c, device="cpu", **kwargs)
    if y.dtype.kind == "V" or type(y.dtype).__module__.startswith("ml_dtypes") or "bfloat16" in str(y.dtype):
        print(f"note: .npy has no {c.dtype_name} dtype; writing its bits as {y.dtype.itemsize * 8}-bit unsigned ints")
        y = y.view(f"u{y.dtype.itemsize}")
    np.save(args.output, y, allow_pickle=False)
    print(f"{args.input} -> {args.output}: {y.shape} {c.dtype_name}")
    return 0


def _cmd_inspect(args) -> int:
    import cupycodec as cc

    c = cc.load(args.input, verify=not args.no_verify)
    print(json.dumps(cc.container._thaw(c.header), indent=2))
    print(f"# {c!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cupycodec", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="versions, GPU, nvCOMP and which codecs run where")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_info)

    s = sub.add_parser("demo", help="compress real arrays with every codec and print ratios and speeds")
    s.add_argument("--size-mib", type=float, default=32.0, help="size of the synthetic data if no real weights")
    s.add_argument("--codecs", nargs="*")
    s.add_argument("--repeat", type=int, default=3)
    s.add_argument("--cpu-only", action="store_true")
    s.set_defaults(fn=_cmd_demo)

    s = sub.add_parser("bench", help="ratio and speed per codec on weight-like bf16 data")
    s.add_argument("--size-mib", type=float, default=64.0)
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    s.add_argument("--codecs", nargs="*")
    s.add_argument("--repeat", type=int, default=5)
    s.add_argument("--json", metavar="PATH")
    s.set_defaults(fn=_cmd_bench)

    s = sub.add_parser("compress", help="compress a .npy file into a container")
    s.add_argument("input")
    s.add_argument("output")
    s.add_argument("--codec", default="auto")
    s.add_argument("--level", type=int)
    s.add_argument("--chunk-nbytes", type=int)
    s.add_argument("--dtype", help="logical dtype of a bit view, e.g. bfloat16 for a uint16 .npy")
    s.add_argument("--filter", action="append", help="pipeline filter id (repeatable), e.g. byteplane")
    s.add_argument("--quantize", choices=["int8"])
    s.add_argument("--granularity", default="channel", choices=["channel", "group", "tensor"])
    s.add_argument("--group-size", type=int, default=128)
    s.set_defaults(fn=_cmd_compress)

    s = sub.add_parser("decompress", help="decompress a container into a .npy file")
    s.add_argument("input")
    s.add_argument("output")
    s.add_argument("--max-output-nbytes", type=int, help="bound on the output (0: none; default: 1024x the file)")
    s.set_defaults(fn=_cmd_decompress)

    s = sub.add_parser("inspect", help="print a container's header without decompressing")
    s.add_argument("input")
    s.add_argument("--no-verify", action="store_true", help="skip the chunk CRC pass")
    s.set_defaults(fn=_cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import CupycodecError

    try:
        return args.fn(args)
    except (CupycodecError, OSError, ValueError, TypeError) as exc:
        print(f"cupycodec {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
