"""Peak memory of CPU decoding: planes merge block by block into the output, and chunk CRCs are checked as chunks
are decoded, so a decode needs about the output's memory (measured as the peak RSS of fresh subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import resident_pages

import cupycodec as cc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NBYTES = 256 << 20
_LIMIT = 1.3  # peak RSS over the baseline, in units of the output, besides the per-thread part
_PER_THREAD = 6 << 20  # a worker's plane rows, temporary, file pages of its block and decoder state

_CHILD = r"""
import resource, sys
sys.path.insert(0, sys.argv[1])
import numpy as np, cupycodec as cc
mode, path = sys.argv[2], sys.argv[3]
if mode == "bytes":
    with open(path, "rb") as f:
        c = cc.CompressedArray.from_bytes(f.read())
else:
    c = cc.load(path)
out = None
if mode == "out":
    out = np.empty(c.shape, c.dtype)
    out[...] = 0  # its pages belong to the baseline: the decode itself should add almost nothing
def kib():
    # VmHWM: this process image's peak RSS. ru_maxrss is the same high-water mark but keeps, across the exec,
    # what the forked parent (pytest, holding the test array) held, which would hide the decode entirely
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
base = kib()
y = cc.decompress(c, out=out, max_output_nbytes=None)
peak = kib()
assert y.nbytes == c.raw_nbytes and float(y.reshape(-1)[123]) == float(np.float32(123 % 977) * 0.5)
print((peak - base) * 1024)
"""


@pytest.fixture(scope="module")
def container_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(_NBYTES // 4) * 0.02).astype(np.float32)
    x[123] = np.float32(123 % 977) * 0.5
    path = str(tmp_path_factory.mktemp("mem") / "x.cc")
    c = cc.compress(x)
    assert c.pipeline  # byte planes: the case whose decode used to stack whole planes (3x the output)
    cc.save(path, c)
    return path


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or sys.platform != "linux", reason="reads VmHWM from /proc")
@pytest.mark.parametrize("threads", [None, 16])  # 16: what a 16-core machine runs, whatever this one has
@pytest.mark.parametrize("mode", ["bytes", "load", "out"])
def test_decode_peak_memory_is_about_the_output(container_path, mode, threads):
    """The decode adds a part of the output (file pages, for ``load``) plus what each worker thread holds: a block's
    plane rows (k x chunk words: 2 MiB for float32), a small temporary, and the file pages of the block it is
    decoding (dropped every 1 MiB read). On the 16-core GPU host a bound without that per-thread part failed (load
    339, out 117 MiB) while 2 cores passed; decoding threads no longer hold the 2 MiB rotation block only splitting
    uses, and a thread's share is bounded at 6 MiB."""
    env = {**os.environ, **({"CUPYCODEC_NUM_THREADS": str(threads)} if threads else {})}
    res = subprocess.run([sys.executable, "-c", _CHILD, ROOT, mode, container_path], capture_output=True,
                         text=True, check=True, env=env)
    extra = int(res.stdout.split()[-1])
    # into a caller's buffer the decode adds only the per-thread part and what the mapping itself costs
    from cupycodec.backends import cpu

    per_thread = (threads or cpu.num_threads()) * _PER_THREAD
    limit = (0.35 * _NBYTES if mode == "out" else _LIMIT * _NBYTES) + per_thread
    assert extra <= limit, f"{mode}: the decode added {extra / 2**20:.0f} MiB for a {_NBYTES >> 20} MiB output"


# -- pages of a mapped file, dropped after a copy (cupycodec._files.release_clean_file_pages) ---------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pagemap and madvise: Linux")
@pytest.mark.parametrize("access", ["read", "copy-on-write"])
def test_unwritten_pages_of_a_mapped_file_leave_the_resident_set_and_read_the_same(tmp_path, access):
    import mmap

    from cupycodec._files import release_clean_file_pages

    page = mmap.PAGESIZE
    data = np.random.default_rng(5).integers(0, 256, 64 * page, dtype=np.uint8)
    path = tmp_path / "codes.bin"
    data.tofile(path)
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ if access == "read" else mmap.ACCESS_COPY)
    a = np.frombuffer(mm, np.uint8)
    addr = a.ctypes.data
    assert int(a.sum()) == int(data.sum()) and resident_pages(addr, a.size).all()
    # bytes 100 .. size - 100: the whole pages inside go, the first and last (partly outside) stay
    assert release_clean_file_pages(addr + 100, a.size - 200) == a.size - 2 * page
    resident = resident_pages(addr, a.size)
    assert resident[0] and resident[-1] and not resident[1:-1].any()
    assert np.array_equal(a, data)  # read back from the page cache
    del a
    mm.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pagemap and madvise: Linux")
def test_written_or_anonymous_pages_are_never_dropped(tmp_path):
    # a written page of a copy-on-write mapping is a private copy: dropping it would give the file's bytes back,
    # losing the write, so nothing of the range goes (even after the byte is written back: still a private copy);
    # anonymous memory would read back as zeros
    import mmap

    from cupycodec._files import release_clean_file_pages

    page = mmap.PAGESIZE
    data = np.random.default_rng(6).integers(0, 256, 16 * page, dtype=np.uint8)
    path = tmp_path / "codes.bin"
    data.tofile(path)
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    a = np.frombuffer(mm, np.uint8)
    a.sum()
    mm[9 * page + 3] = (int(data[9 * page + 3]) + 1) % 256
    assert release_clean_file_pages(a.ctypes.data, a.size) == 0
    assert resident_pages(a.ctypes.data, a.size).all()
    want = data.copy()
    want[9 * page + 3] = (int(data[9 * page + 3]) + 1) % 256
    assert np.array_equal(a, want)
    mm[9 * page + 3] = int(data[9 * page + 3])
    assert release_clean_file_pages(a.ctypes.data, a.size) == 0
    del a
    mm.close()
    anon = data.copy()
    assert release_clean_file_pages(anon.ctypes.data, anon.size) == 0
    assert np.array_equal(anon, data)
    assert release_clean_file_pages(0, 0) == 0
