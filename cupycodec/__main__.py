"""Command line: ``python -m cupycodec`` (or ``cupycodec``) info | demo | bench | compress | decompress |
compress-model | inspect."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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
              f"median of up to {args.repeat} after a warm-up (slow codecs fewer); rows appear as they finish",
              flush=True)
        print(bench.format_header(), flush=True)
        rows = bench.run(arrays, codecs, device=device, repeat=args.repeat,
                         on_row=lambda r: print(bench.format_row(r), flush=True))
        if not all(r.exact for r in rows if r.nbytes):
            print("ERROR: a round trip was not bit-exact", file=sys.stderr)
            return 1
    if not gpu.get("available"):
        print(f"\nGPU codecs not run: {gpu.get('reason')}")
    if not args.no_llm:
        return _llm_demo("cuda" if gpu.get("available") and not args.cpu_only else "cpu")
    return 0


def _llm_demo(device: str) -> int:
    """The PyTorch integration on an LLM, when torch and transformers are installed."""
    import importlib.util

    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"\nPyTorch integration not shown: {' and '.join(missing)} not installed (see README)")
        return 0
    from .integrations.torch import demo

    phases = demo.run(device=device)
    for p in phases:
        if p.name.startswith("lossless") and p.text != phases[0].text:
            print(f"ERROR: the {p.name} model's text differs from the baseline's", file=sys.stderr)
            return 1
    return 0


def _cmd_bench(args) -> int:
    import ml_dtypes
    import numpy as np

    from . import bench

    if args.device == "cuda":
        from .backends import _nvcomp_lib

        _nvcomp_lib.require()  # BackendUnavailableError naming the fix, not a traceback

    n = int(args.size_mib * 2**20 / 2)
    if n < 1:  # a table of an empty array, exit 0
        raise ValueError(f"--size-mib {args.size_mib:g} is less than one bfloat16 value (2 bytes); give a larger size")
    w = (0.02 * np.random.default_rng(0).standard_t(5, n)).astype(ml_dtypes.bfloat16)
    codecs = args.codecs or (GPU_CODECS if args.device == "cuda" else CPU_CODECS)
    rows = bench.run({f"bf16 {args.size_mib:g} MiB": w}, codecs, device=args.device, repeat=args.repeat)
    print(bench.format_table(rows))
    if args.json:
        from ._files import atomic_write

        # a codec that did not run has no ratio: null, not Infinity (which strict JSON parsers refuse)
        text = json.dumps([r.__dict__ | {"ratio": r.ratio if r.nbytes else None} for r in rows], indent=2,
                          allow_nan=False).encode()
        atomic_write(args.json, lambda f: f.write(text))
    return 0


def _shown(path: str) -> str:
    """A file name as printed: bytes that are not UTF-8 (kept by Python as surrogates) as ``\\xNN``, which every
    stdout encodes (a strict UTF-8 one raised after the file was written, and the command reported a failure)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _writable_json(args) -> None:
    """A ``--json PATH`` is checked before the work, not after it (a missing directory failed once a whole run, or
    a checkpoint's compression, was done); an empty OUTPUT too (it failed after the work, naming a hidden file)."""
    if getattr(args, "output", None) == "":
        raise FileNotFoundError("OUTPUT '': give a file or directory name")
    path = getattr(args, "json", None)
    if not isinstance(path, str):
        return
    if not path:  # an empty name wrote nothing, silently, after the run
        raise FileNotFoundError("--json '': give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--json {path}: no directory {folder!r} to write it into")
    if os.path.isdir(path) or not os.access(folder, os.W_OK):
        raise PermissionError(f"--json {path}: cannot write a file there")


def _distinct(source: str, output: str) -> None:
    """Refuse an output that is the input file (a name, a link or a hard link to it), as cp does."""
    with contextlib.suppress(OSError):
        if os.path.samefile(source, output):
            raise ValueError(f"{output!r} is the input file {source!r}; name another output")


def _cmd_compress(args) -> int:
    import numpy as np

    import cupycodec as cc

    from ._files import open_regular

    _distinct(args.input, args.output)
    with open_regular(args.input, ".npy arrays", "save the array with numpy.save to a file first") as f:
        # not open(): a FIFO with no writer would wait for one forever
        if f.read(6) != b"\x93NUMPY":
            raise ValueError(f"{args.input} is not a .npy file (the format numpy.save writes); save the array with "
                             "numpy.save first")
    try:
        x = np.load(args.input, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:  # NumPy's words name neither the file nor the cause a user can act on
        raise ValueError(f"{args.input}: cannot read it as a .npy array ({exc}): a truncated file, or one holding "
                         "Python objects (object arrays cannot be compressed)") from None
    if x.dtype.kind == "V" and x.dtype.fields is None:  # what np.save writes for ml_dtypes' bfloat16 and float8
        if args.dtype is None:
            raise ValueError(f"{args.input} holds raw {x.dtype.itemsize}-byte records ({x.dtype.str}), as numpy.save "
                             "writes ml_dtypes' bfloat16 and float8 arrays; name their dtype, e.g. --dtype bfloat16")
        if x.dtype.itemsize not in (1, 2, 4, 8):  # no dtype --dtype could name reads them: say so now
            raise ValueError(f"{args.input} holds raw {x.dtype.itemsize}-byte records ({x.dtype.str}), which no "
                             "dtype cupycodec stores has (1, 2, 4 or 8 bytes); save the array in its own dtype")
        x = x.view(f"u{x.dtype.itemsize}")
    options = {}
    if args.level is not None:
        if args.codec in (None, "auto"):
            raise ValueError("--level sets a codec's level: name the codec too, e.g. --codec zstd --level 5 (auto "
                             "chooses its own)")
        options["level"] = args.level
    c = cc.compress(np.asarray(x), codec=args.codec, chunk_nbytes=args.chunk_nbytes, dtype=args.dtype,
                    filters=args.filter or None, quantize=args.quantize, granularity=args.granularity or "channel",
                    group_size=128 if args.group_size is None else args.group_size, **options)
    cc.save(args.output, c)
    print(f"{_shown(args.input)} -> {_shown(args.output)}: {c.raw_nbytes} -> {c.nbytes} bytes, ratio {c.ratio:.3f} "
          f"({c.codec})")
    return 0


def _cmd_decompress(args) -> int:
    import numpy as np

    import cupycodec as cc

    from ._files import atomic_write

    _distinct(args.input, args.output)
    c = cc.load(args.input, trusted=args.trusted)
    limit = None if args.max_output_nbytes == 0 else args.max_output_nbytes
    kwargs = {} if args.max_output_nbytes is None else {"max_output_nbytes": limit}
    try:
        y = cc.decompress(c, device="cpu", **kwargs)
    except cc.UntrustedError as exc:  # the library's text names keyword arguments: name the flag here
        raise ValueError(f"{args.input} came from outside and its codec ({c.codec}) has no decoder hardened against "
                         "crafted input, so it is not decoded; if you made the file, pass --trusted") from exc
    except cc.DecompressionBombError as exc:  # the library's text names a keyword argument: name the flag here
        raise ValueError(f"the container decompresses to {exc.nbytes} bytes, more than the limit of {exc.limit}; "
                         "pass --max-output-nbytes N (or 0 for no limit) if you trust this file") from exc
    if y.dtype.kind == "V" or type(y.dtype).__module__.startswith("ml_dtypes") or "bfloat16" in str(y.dtype):
        print(f"note: .npy has no {c.dtype_name} dtype; writing its bits as {y.dtype.itemsize * 8}-bit unsigned ints")
        y = y.view(f"u{y.dtype.itemsize}")
    atomic_write(args.output, lambda f: np.lib.format.write_array(f, y, allow_pickle=False))  # exactly this path
    print(f"{_shown(args.input)} -> {_shown(args.output)}: {y.shape} {c.dtype_name}")
    return 0


def _cmd_inspect(args) -> int:
    import cupycodec as cc

    c = cc.load(args.input, verify=not args.no_verify)
    print(json.dumps(cc.container._thaw(c.header), indent=2))
    print(f"# {c!r}")
    if not args.no_verify:  # load checks the header; the chunks' CRCs wait for a decode, which inspect never runs
        c.verify()  # a mismatch raises ChecksumError: the CLI prints it and exits 2
        print("# every chunk CRC matches")
    return 0


def _cmd_compress_model(args) -> int:
    import importlib.util

    # accelerate: transformers places a model with a device_map through it
    missing = [m for m in ("torch", "transformers", "safetensors", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"cupycodec compress-model: error: needs {', '.join(missing)}: pip install 'cupycodec[torch]' "
              "transformers accelerate", file=sys.stderr)
        return 2
    from .integrations.torch import compress_checkpoint

    report = compress_checkpoint(args.input, args.output, mode=args.mode, granularity=args.granularity,
                                 group_size=args.group_size, codec=args.codec, modules_to_convert=args.filter,
                                 modules_to_not_convert=args.skip, device=args.device,
                                 max_shard_size=args.max_shard_size, progress=not args.quiet)
    print(report)
    if args.json:
        from ._files import atomic_write

        text = report.to_json().encode()
        atomic_write(args.json, lambda f: f.write(text))
    return 0


_DESCRIPTION = ("Compress NumPy arrays into cupycodec containers and back, inspect containers, measure codecs on "
                "this machine, and compress Hugging Face models into compressed checkpoints. Commands: info, demo, "
                "bench, compress, decompress, compress-model, inspect.")


def _positive(kind, *, zero: bool = False):
    """An argparse type: ``kind`` (int or float) greater than 0 (or equal to it, with ``zero``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if not (value >= 0 if zero else value > 0) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be {'0 or more' if zero else 'greater than 0'}"
                                             f"{' and finite' if kind is float else ''}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    from . import registry

    codecs = ["auto", *sorted(registry.registered_codecs())]
    p = argparse.ArgumentParser(prog="cupycodec", description=_DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="versions, GPU, nvCOMP and which codecs run where")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    s.set_defaults(fn=_cmd_info)

    s = sub.add_parser("demo", help="compress real arrays with every codec and print ratios and speeds")
    s.add_argument("--size-mib", type=_positive(float), default=32.0, help="size of the synthetic data if no real "
                   "weights (default: %(default)s)")
    s.add_argument("--codecs", nargs="*", choices=codecs, metavar="CODEC", help="codecs to run (default: "
                   f"{', '.join(CPU_CODECS)} on the CPU, and every GPU codec on a GPU; any of {', '.join(codecs)})")
    s.add_argument("--repeat", type=_positive(int), default=3, help="timed runs per measurement (default: "
                   "%(default)s)")
    s.add_argument("--cpu-only", action="store_true", help="skip the GPU even when one is usable")
    s.add_argument("--no-llm", action="store_true", help="skip the PyTorch part (compress_model on an LLM)")
    s.set_defaults(fn=_cmd_demo)

    s = sub.add_parser("bench", help="ratio and speed per codec on weight-like bf16 data")
    s.add_argument("--size-mib", type=_positive(float), default=64.0, help="data size (default: %(default)s)")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run (default: %(default)s)")
    s.add_argument("--codecs", nargs="*", choices=codecs, metavar="CODEC", help="codecs to run (default: "
                   f"{', '.join(CPU_CODECS)} on the CPU, and every GPU codec on a GPU; any of {', '.join(codecs)})")
    s.add_argument("--repeat", type=_positive(int), default=5, help="timed runs per measurement (default: "
                   "%(default)s)")
    s.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    s.set_defaults(fn=_cmd_bench)

    s = sub.add_parser("compress", help="compress a .npy file into a container")
    s.add_argument("input", help="a .npy file (numpy.save)")
    s.add_argument("output", help="the container file to write (atomically)")
    s.add_argument("--codec", default="auto", choices=codecs, metavar="CODEC",
                   help=f"one of {', '.join(codecs)} (default: %(default)s: the best lossless choice here)")
    s.add_argument("--level", type=int, help="compression level, for codecs that have one (zstd: 1-22, or "
                   "negative for its fast modes; deflate, gzip: 0-9; lz4: 1-12, its high-compression mode); default: "
                   "the codec's")
    s.add_argument("--chunk-nbytes", type=int, metavar="N", help="uncompressed bytes per chunk, a multiple of 16 "
                   "up to 16 MiB (default: per codec and dtype, e.g. zstd on the CPU: 512 KiB for floats, 128 KiB "
                   "otherwise)")
    s.add_argument("--dtype", help="logical dtype of a bit view, e.g. bfloat16 for a uint16 .npy (or for the raw "
                   "2-byte records a .npy of ml_dtypes' bfloat16 holds)")
    s.add_argument("--filter", action="append", help="pipeline filter id (repeatable), e.g. byteplane")
    s.add_argument("--quantize", choices=["int8"], help="lossy INT8 quantization (default: lossless)")
    s.add_argument("--granularity", choices=["channel", "group", "tensor"],
                   help="with --quantize: one scale per channel (default), per group or per tensor")
    s.add_argument("--group-size", type=_positive(int), help="with --quantize --granularity group: elements per "
                   "group (default: 128)")
    s.set_defaults(fn=_cmd_compress)

    s = sub.add_parser("decompress", help="decompress a container into a .npy file")
    s.add_argument("input", help="a container file")
    s.add_argument("output", help="the .npy file to write, at exactly this path (atomically)")
    s.add_argument("--max-output-nbytes", type=_positive(int, zero=True), metavar="N",
                   help="refuse to produce more than N bytes (default: max(1 GiB, 1024 x the file's size); "
                   "0: no limit)")
    s.add_argument("--trusted", action="store_true", help="you made this file: let nvCOMP's decoders read it "
                   "(needed for ans, cascaded, bitcomp and gdeflate chunks)")
    s.set_defaults(fn=_cmd_decompress)

    s = sub.add_parser("compress-model", help="compress a Hugging Face model directory into a compressed checkpoint")
    s.add_argument("input", help="a transformers model directory (config.json and safetensors weights)")
    s.add_argument("output", help="the directory to write (created; an earlier checkpoint there is replaced)")
    s.add_argument("--mode", required=True, choices=["lossless", "int8", "int8+entropy"],
                   help="lossless: bit-exact weights; int8: INT8 codes and scales; int8+entropy: INT8 codes coded")
    s.add_argument("--filter", action="append", metavar="REGEX", help="compress only the Linear layers whose name "
                   "matches (repeatable; default: all but the output head and weights tied to embeddings)")
    s.add_argument("--skip", action="append", metavar="NAME", help="leave this layer (name, prefix or pattern) "
                   "uncompressed (repeatable)")
    s.add_argument("--granularity", choices=["channel", "group"], default="channel",
                   help="INT8 scales per output channel or per group of inputs (default: %(default)s)")
    s.add_argument("--group-size", type=_positive(int), default=128, help="inputs per group (default: %(default)s)")
    s.add_argument("--codec", help="payload codec (default: ans on a GPU, zstd-based on the CPU)")
    s.add_argument("--device", help="where to load and compress (default: cuda when usable, else cpu)")
    s.add_argument("--max-shard-size", default="50GB",
                   help="largest shard, in bytes or e.g. 5GB or 500MiB (default: %(default)s)")
    s.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=_cmd_compress_model)

    s = sub.add_parser("inspect", help="print a container's header and check its chunk CRCs, without decompressing")
    s.add_argument("input", help="a container file")
    s.add_argument("--no-verify", action="store_true", help="print the header only: skip the chunk CRC pass")
    s.set_defaults(fn=_cmd_inspect)
    return p


_SIGTERM = 15


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread as KeyboardInterrupt is for SIGINT (not an Exception: no handler of
    errors may swallow it)."""


@contextlib.contextmanager
def _terminate_as_interrupt():
    """While the command runs, SIGTERM (kill, a service manager, a job's time limit) unwinds it as Ctrl-C does, so
    that an atomic write under way removes its temporary file: killed at once (Python's default), the hidden
    ``.<output>.<hex>.tmp`` was left behind. The handler it replaces is put back after. Left alone: a SIGTERM that
    was ignored (``nohup``-style launchers), and a call from another thread, which cannot set handlers."""
    import signal
    import threading

    def terminated(signum, frame):
        raise _Terminated

    old = signal.getsignal(signal.SIGTERM)
    if old is signal.SIG_IGN or threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "compress" and args.quantize is None and (args.granularity or args.group_size is not None):
        parser.error("--granularity and --group-size apply to --quantize int8 only")
    from .errors import CupycodecError

    try:
        with _terminate_as_interrupt():
            _writable_json(args)
            return args.fn(args)
    except _Terminated:
        print(f"cupycodec {args.command}: terminated", file=sys.stderr)
        return 128 + _SIGTERM
    except KeyboardInterrupt:  # Ctrl-C: one line, as other tools; writes are atomic, so nothing partial is left
        print(f"cupycodec {args.command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError as exc:
        print(f"cupycodec {args.command}: error: out of memory ({exc or type(exc).__name__}); try a smaller size",
              file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as other tools do
        with contextlib.suppress(OSError, ValueError):  # no second error when Python flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (CupycodecError, OSError, ValueError, TypeError) as exc:
        print(f"cupycodec {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
