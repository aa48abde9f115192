"""Compress arrays with cupycodec: lossless codecs, bf16 weights, INT8, files, and (with a GPU) batched decoding.

Run: python examples/compress_arrays.py   (CPU only is fine; the GPU part runs when CuPy and nvCOMP are usable)
"""

from __future__ import annotations

import argparse
import os
import tempfile

import ml_dtypes
import numpy as np

import cupycodec as cc

argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="It takes no options.").parse_args()
rng = np.random.default_rng(0)

# 1. Any array, bit for bit: here float32 with NaN payloads and -0.0, in Fortran order.
x = np.asfortranarray(rng.standard_normal((512, 256)).astype(np.float32))
x[0, :3] = [np.nan, -0.0, np.inf]
c = cc.compress(x, codec="zstd", level=3)
y = cc.decompress(c)
assert y.tobytes() == np.ascontiguousarray(x).tobytes()
print(f"float32 {x.shape}: {c.raw_nbytes} -> {c.nbytes} bytes with {c.codec} (ratio {c.ratio:.3f})")

# 2. bf16 weights, lossless: byte planes put the exponent in its own plane; "auto" does this on a CPU.
w = (0.02 * rng.standard_t(5, (1024, 1024))).astype(ml_dtypes.bfloat16)
for codec, filters in (("zstd", None), ("zstd", ["byteplane"]), ("auto", None)):
    c = cc.compress(w, codec=codec, filters=filters)
    assert cc.decompress(c).tobytes() == w.tobytes()
    print(f"bf16 weights, {codec:4s} {'+ byteplane' if filters else '':12s}: ratio {c.ratio:.3f}")

# 3. INT8 per-channel quantization + a codec: 2x from INT8, a little more from entropy coding.
q = cc.compress(w, quantize="int8", granularity="channel", codec="zstd")
wq = cc.decompress(q)  # dequantized, back in bf16
codes = cc.decompress(q, dequantize=False)  # or the codes and float32 scales themselves
err = np.abs(wq.astype(np.float32) - w.astype(np.float32)).max()
print(f"int8 per-channel: ratio {q.ratio:.3f} vs bf16, max |error| {err:.2e}, codes {codes.codes.dtype}")

# 4. Files: atomic writes, memory-mapped reads, everything validated (CRC32 per chunk) before use.
with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "w.cc")
    cc.save(path, q)
    again = cc.load(path)
    assert again == q
    print(f"saved and reloaded {path}: {again!r}")

# 5. Bad input is an exception, never wrong data.
blob = bytearray(c.to_bytes())
blob[-20] ^= 0xFF
try:
    cc.decompress(bytes(blob))
except cc.ChecksumError as exc:
    print(f"corrupted blob rejected: {exc}")

# 6. On a GPU: compress CuPy arrays with nvCOMP and decode a batch into preallocated buffers in one call.
if cc.info()["gpu"]["available"]:
    import cupy

    layers = [cupy.asarray((0.02 * rng.standard_t(5, s)).astype(ml_dtypes.bfloat16)) for s in
              [(2048, 2048), (256, 2048), (256, 2048), (2048, 2048), (5632, 2048), (5632, 2048), (2048, 5632)]]
    packed = cc.compress_many(layers, codec="ans")  # nvCOMP ANS, float mode for bf16
    outs = [cupy.empty_like(a) for a in layers]
    plan = cc.decode_plan(packed, outs)  # allocation-free, asynchronous, reusable
    plan.run()
    plan.check()  # waits and raises if nvCOMP reported any bad chunk
    assert all(bool((o.view(cupy.uint16) == a.view(cupy.uint16)).all()) for o, a in zip(outs, layers))
    ratio = sum(a.nbytes for a in layers) / sum(p.nbytes for p in packed)
    print(f"GPU: 7 bf16 layers with ANS, ratio {ratio:.3f}, decoded in one batched call")
else:
    print(f"GPU part skipped: {cc.info()['gpu']['reason']}")
