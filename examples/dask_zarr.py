"""Compress a large Dask array into a Zarr store with cupycodec's codec on a Dask cluster, then read it back exactly.

On one machine (a ``LocalCluster`` of worker processes, no dashboard):

    python examples/dask_zarr.py --mib 512 --workers 2 --store /tmp/field.zarr

On a multi-node cluster, the same code with the scheduler's address and a store that every worker reaches (an
object-store URL through fsspec, e.g. ``s3://`` with s3fs installed; cupycodec, zarr and the same versions on every
worker):

    python examples/dask_zarr.py --scheduler tcp://scheduler-host:8786 --store s3://bucket/field.zarr

Each worker compresses and decompresses its own chunks; the scheduler only sees task metadata. Needs
``pip install "cupycodec[dask]"``.
"""

from __future__ import annotations

import argparse
import time

import dask.array as da
import numpy as np
import zarr

from cupycodec.integrations.zarr import CupycodecCodec

COLS = 4096
CHUNKS = (1024, 1024)  # 4 MiB of float32 per chunk


def _field_block(block_info=None):
    """One block of a smooth float32 field, computed from its position (the same bits on any worker)."""
    (r0, r1), (c0, c1) = block_info[None]["array-location"]
    i = np.arange(r0, r1, dtype=np.float64)[:, None]
    j = np.arange(c0, c1, dtype=np.float64)[None, :]
    field = 100 * np.sin(i / 731.0) * np.cos(j / 517.0) + 0.001 * ((i * 7 + j * 13) % 101)
    return field.astype(np.float32)


def smooth_field(mib: int) -> da.Array:
    """A (mib * 64) x 4096 float32 Dask array (``mib`` MiB) in 1024 x 1024 chunks, built on the workers."""
    rows = mib * 2**20 // (4 * COLS)
    return da.map_blocks(_field_block, dtype=np.float32, chunks=da.core.normalize_chunks(CHUNKS, (rows, COLS)),
                         meta=np.empty((0, 0), np.float32))


def write(x: da.Array, store: str, **codec) -> zarr.Array:
    """Create a Zarr v3 array at ``store`` with cupycodec's codec (``codec`` configures it) and store ``x`` in it."""
    x = x.rechunk(x.chunksize)  # regular blocks, one Zarr chunk each (a no-op where they already are)
    z = zarr.create_array(store=store, shape=x.shape, chunks=x.chunksize, dtype=x.dtype, overwrite=True,
                          serializer=CupycodecCodec(**codec), compressors=None)
    da.store(x, z, lock=False)  # each task writes whole chunks of its own, so no lock is needed
    return z


def verify(store: str, x: da.Array) -> bool:
    """Read ``store`` back on the workers and compare it with ``x`` bit for bit (NaN payloads included)."""
    y = da.from_zarr(store)
    return bool(da.all(y.view(np.uint32) == x.view(np.uint32)).compute())


def run(store: str, mib: int, **codec) -> dict:
    """Write and verify ``mib`` MiB on the current Dask client; timings and sizes."""
    x = smooth_field(mib)
    t0 = time.perf_counter()
    z = write(x, store, **codec)
    t1 = time.perf_counter()
    ok = verify(store, x)
    t2 = time.perf_counter()
    stored = z.nbytes_stored()
    return {"ok": ok, "nbytes": x.nbytes, "stored_nbytes": stored, "ratio": x.nbytes / stored,
            "chunks": x.npartitions, "write_s": t1 - t0, "read_and_compare_s": t2 - t1}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv=None) -> int:
    from dask.distributed import Client, LocalCluster

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default="field.zarr", help="local path or fsspec URL every worker can reach")
    p.add_argument("--mib", type=positive_int, default=512, help="size of the float32 array in MiB")
    p.add_argument("--scheduler", help="address of a running scheduler (default: start a LocalCluster)")
    p.add_argument("--workers", type=positive_int, default=2, help="LocalCluster worker processes (a cluster of none "
                   "would wait for one forever)")
    p.add_argument("--codec", default="auto", help="cupycodec codec id (auto: byte planes + zstd for floats)")
    args = p.parse_args(argv)
    if args.scheduler:
        with Client(args.scheduler) as client:
            result = run(args.store, args.mib, codec=args.codec)
            workers = len(client.scheduler_info()["workers"])
    else:
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=None) as cluster, \
                Client(cluster):
            result = run(args.store, args.mib, codec=args.codec)
            workers = args.workers
    print(f"{result['nbytes'] / 2**20:.0f} MiB in {result['chunks']} chunks on {workers} workers: ratio "
          f"{result['ratio']:.2f}x, write {result['write_s']:.2f} s, "
          f"read+compare {result['read_and_compare_s']:.2f} s, bit-exact: {result['ok']}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
