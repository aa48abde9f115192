"""examples/dask_zarr.py on a LocalCluster of worker processes: 256 MiB of float32 into a Zarr store and back."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")
pytest.importorskip("dask.distributed")
from dask.distributed import Client, LocalCluster  # noqa: E402

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "examples", "dask_zarr.py")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("dask_zarr_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dask_local_cluster_round_trip(tmp_path, example):
    store = str(tmp_path / "field.zarr")
    # Worker processes (not threads): each one unpickles the codec and imports cupycodec on its own.
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster):
        result = example.run(store, 256)
    assert result["ok"]
    assert result["nbytes"] == 256 * 2**20 and result["chunks"] == 64
    assert result["ratio"] > 1.3
    z = zarr.open_array(store)
    assert z.metadata.codecs[0].to_dict()["name"] == "cupycodec"
    assert z[5000:5003, 7].tobytes() == example._field_block({None: {"array-location": [(5000, 5003), (7, 8)]}}) \
        .tobytes()
    assert np.isfinite(z[-1, -1])


@pytest.mark.parametrize("argv", [["--workers", "0"], ["--mib", "0"], ["--mib", "-3"]])
def test_sizes_below_one_are_refused_before_any_work(example, argv, capsys):
    """--workers 0 started a cluster of no worker and waited for one forever; --mib 0 "compressed" nothing."""
    with pytest.raises(SystemExit) as exc:
        example.main(argv)
    assert exc.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_write_stores_irregular_blocks_whole(tmp_path, example):
    """write() took the largest block as the Zarr chunk: with blocks of 7 and 5, tasks rewrote each other's chunks
    without a lock and about 40 % of the elements were lost."""
    import dask
    import dask.array as da

    a = np.random.default_rng(0).standard_normal(1200).astype(np.float32)
    x = da.from_array(a, chunks=((7, 5) * 100,))
    with dask.config.set(scheduler="threads", num_workers=8):
        example.write(x, str(tmp_path / "irregular.zarr"))
    assert zarr.open_array(str(tmp_path / "irregular.zarr"))[:].tobytes() == a.tobytes()
