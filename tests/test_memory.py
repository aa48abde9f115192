"""Peak memory of CPU decoding: planes merge block by block into the output, and chunk CRCs are checked as chunks
are decoded, so a decode needs about the output's memory (measured as the peak RSS of fresh subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import cupycodec as cc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NBYTES = 256 << 20
_LIMIT = 1.3  # peak RSS over the baseline, in units of the output

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
@pytest.mark.parametrize("mode", ["bytes", "load", "out"])
def test_decode_peak_memory_is_about_the_output(container_path, mode):
    res = subprocess.run([sys.executable, "-c", _CHILD, ROOT, mode, container_path], capture_output=True,
                         text=True, check=True)
    extra = int(res.stdout.split()[-1])
    # into a caller's buffer the decode adds scratch and the mapped file pages in flight (dropped group by group)
    limit = 0.35 * _NBYTES if mode == "out" else _LIMIT * _NBYTES
    assert extra <= limit, f"{mode}: the decode added {extra / 2**20:.0f} MiB for a {_NBYTES >> 20} MiB output"
