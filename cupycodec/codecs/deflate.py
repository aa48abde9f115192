"""The ``deflate`` and ``gzip`` codecs: raw DEFLATE streams and gzip members, one per chunk."""

from __future__ import annotations

import zlib

from ._cpu import decode_exact
from .base import Codec, Option, int_range

__all__ = ["Deflate", "Gzip"]

_OPTIONS = {
    "level": Option(None, int_range(0, 9), "zlib compression level for the CPU backend (default 6)"),
    "algorithm": Option(None, int_range(0, 5), "nvCOMP algorithm for the GPU backend (0 fastest .. 5 best; 1)"),
}


class Deflate(Codec):
    """Raw DEFLATE (RFC 1951, no zlib header): what nvCOMP's Deflate writes and ``zlib.decompress(x, -15)`` reads.

    Parameters
    ----------
    level : int, optional
        zlib level for the CPU backend (0-9; zlib's default 6 when None).
    algorithm : int, optional
        nvCOMP's Deflate algorithm for the GPU backend (0-5; nvCOMP's default 1 when None).
    """

    codec_id = "deflate"
    untrusted_ok = True  # zstandard/cramjam/zlib decoders: bounds-checked and fuzzed upstream
    version = 1
    nvcomp_algorithm = "Deflate"
    options = _OPTIONS
    _wbits = -15

    def encode_chunk(self, src: memoryview) -> bytes:
        level = 6 if self.level is None else self.level
        comp = zlib.compressobj(level, zlib.DEFLATED, self._wbits)
        return comp.compress(src) + comp.flush()

    def decode_chunk_into(self, src: memoryview, dst: memoryview) -> None:
        import cramjam

        decode_exact(self.codec_id, cramjam.deflate.decompress_into, src, dst)

    def nvcomp_params(self) -> dict[str, int]:
        return {"algorithm": 1 if self.algorithm is None else self.algorithm}


class Gzip(Deflate):
    """gzip (RFC 1952) members, one per chunk: ``gzip.decompress`` reads each. Options as :class:`Deflate`."""

    codec_id = "gzip"
    version = 1
    nvcomp_algorithm = "Gzip"
    _wbits = 31

    def decode_chunk_into(self, src: memoryview, dst: memoryview) -> None:
        import cramjam

        decode_exact(self.codec_id, cramjam.gzip.decompress_into, src, dst)
