"""``codec="auto"`` on the CPU: byte planes or not, rotated or not, chosen by compressing samples of the data.

Measured on the 2-core machine of benchmarks/RESULTS.md (issue 10), zstd level 1: byte planes win on weights
(bf16 1.46x vs 1.28x plain), smooth float fields (1.80x vs 1.10x) and sorted integers (3.8x vs 1.5x); the one-bit
rotation gains 0.5% on weights and loses 4% on smooth fields, and costs ~30% of decode speed (a NumPy pass), so it
is kept only where it saves at least :data:`ROTATE_MARGIN` of the bytes. As on the GPU, a few samples spread over
the array decide; arrays of up to ``_compress._AUTO_TRY_NBYTES`` are compressed whole with every candidate.
"""

from __future__ import annotations

import numpy as np

from .backends import cpu
from .backends._planes import planes_for
from .dtypes import ArraySpec, is_float
from .filters import Byteplane

__all__ = ["ROTATE_MARGIN", "TINY_NBYTES", "candidates", "choose"]

ROTATE_MARGIN = 0.01
TINY_NBYTES = 4096
_PIECES = 4
_MIN_PIECE_WORDS = 2048
_SAMPLE_SHARE = 256  # each piece is 1/256 of the array (4 pieces, 3 candidates: ~5% of a compression's work)
_INTS = ("I16", "U16", "I32", "U32", "I64", "U64")


def candidates(spec: ArraySpec) -> list[list]:
    """The pipelines auto weighs for ``spec``, in order of preference on ties (empty: plain zstd).

    Arrays of at most :data:`TINY_NBYTES` get plain zstd only (then raw, if smaller): byte planes cost a segment
    header (~190 bytes) per plane there, and trying them cost ~100 us per array for next to nothing. On the 65
    norm and bias tensors of all-MiniLM-L6-v2 they won 7 times, by 432 bytes in all, and `compress_many` of those
    tensors took 14.5 ms with them and 8.3 ms without (benchmarks/RESULTS.md, issue 10)."""
    if spec.nbytes <= TINY_NBYTES:
        return [[]]
    floats = (is_float(spec.dtype) or spec.dtype in ("C64", "C128")) and not spec.dtype.startswith(("FLD", "CLD"))
    if floats and spec.itemsize in (2, 4, 8, 16):
        return [[Byteplane(rotate=False)], [Byteplane(rotate=True)], []]
    if spec.dtype in _INTS:
        return [[Byteplane(rotate=False)], []]
    return [[]]


def choose(arr: np.ndarray, spec: ArraySpec, codec, chunk_nbytes: int) -> list:
    """The candidate pipeline whose samples of ``arr`` (host, C-contiguous) compress smallest with ``codec``."""
    options = candidates(spec)
    if len(options) == 1:
        return options[0]
    raw = arr.reshape(-1).view(np.uint8)
    k = options[0][0].params(spec)[0]
    big = spec.byteorder == ">"
    words = raw.size // k
    piece = max(_MIN_PIECE_WORDS, min(chunk_nbytes, words // _SAMPLE_SHARE))
    starts = sorted({(i * max(0, words - piece) // (_PIECES - 1)) for i in range(_PIECES)})
    # the pieces side by side: a candidate splits them into planes once (plane j of the joined pieces is the pieces'
    # planes j one after another), and each piece's part of each plane is compressed on its own, as before
    sample = np.concatenate([raw[s * k : (s + piece) * k] for s in starts])
    trials = _Trials(options, sample, len(starts), k, big, codec)
    cpu.run([trials])  # in the pool when the samples are large: 5-16 % of a compression, left to one thread before
    sizes = list(trials.sizes)
    for i, pipeline in enumerate(options):
        if pipeline and pipeline[0].rotate:
            sizes[i] = int(sizes[i] / (1 - ROTATE_MARGIN))  # rotation must pay for its decode cost
    return options[min(range(len(options)), key=lambda i: (sizes[i], i))]


class _Trials(cpu.Work):
    """Compress the ``pieces`` equal pieces of ``sample`` as every candidate pipeline, each piece (and each of its
    planes) on its own: one candidate per step."""

    def __init__(self, options, sample, pieces: int, k: int, big: bool, codec):
        self.options, self.sample, self.pieces, self.k, self.big, self.codec = options, sample, pieces, k, big, codec
        self.n = len(options)
        self.nbytes = len(options) * sample.size
        self.sizes = [0] * self.n

    def run(self, lo: int, hi: int) -> None:
        plain, top = self.codec.chunk_encoder(), self.codec.chunk_encoder(top_plane=True)
        for t in range(lo, hi):
            pipeline = self.options[t]
            if pipeline:
                planes = planes_for(self.k, pipeline[0].rotate, self.big).split(self.sample)
            else:
                planes = [memoryview(self.sample)]
            total = 0
            for j, plane in enumerate(planes):  # each plane as EncodePlanes compresses it
                encode = top if pipeline and j == 0 else plain
                step = len(plane) // self.pieces
                for p in range(self.pieces):
                    part = plane[p * step : (p + 1) * step]
                    data = encode(part)
                    total += len(part) if data is None else min(len(part), len(data))
            self.sizes[t] = total
