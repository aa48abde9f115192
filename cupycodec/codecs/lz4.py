"""The ``lz4`` and ``snappy`` codecs: raw LZ4 blocks and raw Snappy streams, one per chunk."""

from __future__ import annotations

from ._cpu import decode_exact
from .base import NVCOMP_DATA_TYPES, Codec, Option, check_data_type, fit_data_type, int_range, natural_data_type

__all__ = ["LZ4", "Snappy"]

_LZ4_TYPES = ("|i1", "|u1", "<i2", "<u2", "<i4", "<u4")  # 8-byte types fail round trips (nvcomp issue #97)


class LZ4(Codec):
    """LZ4 block format without a size prefix (``lz4.block.decompress(x, uncompressed_size=n)`` reads a chunk).

    Parameters
    ----------
    level : int, optional
        CPU only: None for LZ4's fast mode, 1-12 for its high-compression mode.
    data_type : str, optional
        GPU only: the word size nvCOMP's match finder works on (``'|u1'`` when None); the stream is plain LZ4.
    """

    codec_id = "lz4"
    untrusted_ok = True  # zstandard/cramjam/zlib decoders: bounds-checked and fuzzed upstream
    version = 1
    nvcomp_algorithm = "LZ4"
    options = {
        "level": Option(None, int_range(1, 12), "CPU high-compression level"),
        "data_type": Option(None, check_data_type, "nvCOMP match word type"),
    }

    def resolve(self, spec):
        if self.data_type is None:
            return self
        if self.data_type == "auto":
            return type(self)(level=self.level, data_type=natural_data_type(spec, _LZ4_TYPES, floats=False))
        fit_data_type(self, self.data_type, spec, _LZ4_TYPES)
        return self

    def encode_chunk(self, src: memoryview) -> bytes:
        # python-lz4 (liblz4's own block API): cramjam 2.14's compress_block ignores mode= and compression=, so
        # every level gave fast mode's bytes; python-lz4's fast mode was also 1.7-2.7x faster (2-core machine)
        import lz4.block

        if self.level is None:
            return lz4.block.compress(src, store_size=False)
        return lz4.block.compress(src, mode="high_compression", compression=self.level, store_size=False)

    def decode_chunk_into(self, src: memoryview, dst: memoryview) -> None:
        import cramjam

        decode_exact("lz4", lambda s, d: cramjam.lz4.decompress_block_into(s, d, output_len=len(d)), src, dst)

    def nvcomp_params(self) -> dict[str, int]:
        return {"data_type": NVCOMP_DATA_TYPES[self.data_type or "|u1"]}


class Snappy(Codec):
    """Snappy raw format (no framing): ``snappy.decompress`` / ``cramjam.snappy.decompress_raw`` read a chunk."""

    codec_id = "snappy"
    untrusted_ok = True  # zstandard/cramjam/zlib decoders: bounds-checked and fuzzed upstream
    version = 1
    nvcomp_algorithm = "Snappy"

    def encode_chunk(self, src: memoryview) -> bytes:
        import cramjam

        return bytes(cramjam.snappy.compress_raw(src))

    def decode_chunk_into(self, src: memoryview, dst: memoryview) -> None:
        import cramjam

        decode_exact("snappy", cramjam.snappy.decompress_raw_into, src, dst)
