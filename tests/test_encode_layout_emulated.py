"""The GPU encode plan's payload layout, checked on a machine without a GPU.

A subprocess runs the real GPU compression code on ``benchmarks/fakecupy`` (device memory is host memory), with a
stand-in nvCOMP whose "compression" keeps the first 7/8 of each chunk, and with the packing kernel replaced by a
Python emulation of what ``kernels.crc32.packed_args`` documents: copy each chunk to its place, zero its padding,
write its CRC-32 into its table slot, and copy each chunk table except its CRC words. The containers it makes are
then read back on the CPU: every chunk CRC must match its bytes, and ``raw`` containers (stored chunks only) must
decode to the input exactly. This pins the layout arithmetic of ``engine.encode`` (offsets, tables, CRC slots, items
and segments of a batch) without a GPU; the kernel itself is pinned to ``crc32_reference`` by the GPU tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(r'''
    import ctypes, sys, zlib
    import numpy as np
    import cupy  # the stand-in
    import fake_nvcomp
    assert "fake" in cupy.__version__
    import cupycodec as cc
    from cupycodec.backends import _nvcomp_lib as nv
    from cupycodec.engine import encode
    from cupycodec.kernels import crc32

    U64 = ctypes.c_uint64

    def u64s(p, n):
        return list((U64 * n).from_address(p)) if n else []

    fake_nvcomp.install(nv, copy=True)  # compression keeps 7/8 of each chunk, and writes those bytes

    def packed(p, n_blocks, stream=None):  # what crc32.packed_args documents the packing kernel does
        a = u64s(p, crc32.PACKED_ARGS)
        ptrs, sizes, outs, n, _parts, _lp, _lr, _work, srcs, tabs, n_tabs, _ = a
        P, S, O, SR = u64s(ptrs, n), u64s(sizes, n), u64s(outs, n), u64s(srcs, n)
        for i in range(n):
            data = ctypes.string_at(SR[i], S[i])
            ctypes.memmove(P[i], data, S[i])
            ctypes.memset(P[i] + S[i], 0, -S[i] % 16)
            ctypes.c_uint32.from_address(O[i]).value = zlib.crc32(data)
        for t in range(n_tabs):
            src, dst, words, k = u64s(tabs + 32 * t, 4)
            for w in range(words):
                if not k <= w < 2 * k:
                    ctypes.memmove(dst + 4 * w, src + 4 * w, 4)

    crc32.crc32_batch_packed = packed
    if hasattr(encode, "launch"):  # a launcher imported into the module calls the kernel directly
        encode.launch = lambda handle, grid, block, args, device, sp: packed(args[0], grid)

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(n).astype(np.float32) for n in (1 << 16, 3000, 1 << 18, 77, 16)]
    arrays.append(np.zeros(0, np.float32))
    dev = [cupy.asarray(a) for a in arrays]
    views = [cupy.asarray(np.sin(np.arange(256 * 192) / 301.0).reshape(256, 192).astype(np.float32))[i:i + 64, j:j + 64]
             for i in range(0, 256, 64) for j in range(0, 192, 64)]
    checked = 0
    for codec, kw in (("raw", {}), ("ans", {}), ("bitcomp", {}), ("raw", {"chunk_nbytes": 4096}),
                      ("ans", {"chunk_nbytes": 4096})):
        for batch in (dev[:1], dev, dev[1:4], views):
            for c, x in zip(cc.compress_many(batch, codec=codec, **kw), batch):
                assert c.device_id == 0
                blob = c.to_bytes()
                back = cc.CompressedArray.from_bytes(blob, verify=True)
                back.verify()  # every chunk's CRC against its bytes, on the host
                if codec == "raw":
                    got = cc.decompress(back, backend="cpu", device="cpu")
                    assert np.array_equal(got, cupy.asnumpy(x) if hasattr(cupy, "asnumpy") else x.get())
                checked += 1
    print("checked", checked)
''')


def test_gpu_encode_layout_on_the_cpu_emulation():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "benchmarks", "fakecupy"), ROOT])
    env.pop("CUPYCODEC_BACKEND", None)
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "checked 110" in res.stdout, res.stdout
