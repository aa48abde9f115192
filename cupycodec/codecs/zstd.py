"""The ``zstd`` codec: Zstandard frames, one per chunk; CPU via zstandard/cramjam, GPU via nvCOMP."""

from __future__ import annotations

from ._cpu import decode_exact, per_thread, zstd_decode_at
from .base import Codec, Option, int_range

__all__ = ["TOP_PLANE_HASH_LOG", "TOP_PLANE_LEVELS", "Zstd"]

TOP_PLANE_LEVELS = (1, 2, 3)  # the fast levels, where the tuned top-plane encoder was measured to win
TOP_PLANE_HASH_LOG = 8


class Zstd(Codec):
    """Zstandard. Each chunk is a standard zstd frame (with its content size), so ``zstd -d`` reads it.

    Parameters
    ----------
    level : int, optional
        Compression level for the CPU backend (1-22, negative levels for speed; zstandard's default 3 when None).
        nvCOMP has no levels: the GPU backend ignores it and warns once when it is set.
    """

    codec_id = "zstd"
    untrusted_ok = True  # zstandard/cramjam/zlib decoders: bounds-checked and fuzzed upstream
    version = 1
    nvcomp_algorithm = "Zstd"
    options = {"level": Option(None, int_range(-(1 << 17), 22), "CPU compression level")}

    def encode_chunk(self, src: memoryview) -> bytes:
        return self.chunk_encoder()(src)

    def chunk_encoder(self, *, top_plane: bool = False):
        import zstandard

        level = 3 if self.level is None else self.level
        if top_plane and level in TOP_PLANE_LEVELS:
            # A float's sign-and-exponent plane holds a few byte values in short runs: entropy coding is most of
            # the win, and zstd's fast strategies spend their time finding short matches there. A 256-entry hash
            # table and 7-byte minimum matches keep the long ones and leave the rest to Huffman. On the MiniLM
            # weights at level 1 (2 threads, same-run A/B): bf16 compression 1.5x as fast, decoding 1.2x, ratio
            # +1.8 %; fp32 1.2-1.3x, 1.2x, +0.7 %; the smooth field and sorted int32 unchanged (benchmarks/
            # RESULTS.md, issue 10). 64 entries gave a better bf16 ratio but slower decoding. Only the encoder
            # differs: the frames are ordinary zstd.
            def make():
                params = zstandard.ZstdCompressionParameters.from_level(
                    level, hash_log=TOP_PLANE_HASH_LOG, min_match=7, write_content_size=True)
                return zstandard.ZstdCompressor(compression_params=params)

            return per_thread(("zstd-c-top", level, TOP_PLANE_HASH_LOG), make).compress
        comp = per_thread(("zstd-c", level), lambda: zstandard.ZstdCompressor(level=level, write_content_size=True))
        return comp.compress

    def decode_chunk_at(self, src: int, src_nbytes: int, dst: int, dst_nbytes: int) -> bool:
        # libzstd straight into place where blosc2's library provides it: one foreign call per chunk, no bytes
        # object, no copy (python-zstandard returns a new bytes object, copied once more: 7-10 % of a bf16 or fp32
        # decode; benchmarks/RESULTS.md, issue 10). False sends the chunk to decode_chunk_into below.
        return zstd_decode_at(src, src_nbytes, dst, dst_nbytes)

    def decode_chunk_into(self, src: memoryview, dst: memoryview) -> None:
        # A per-thread zstandard context (cramjam's decompress_into builds one per call, ~17 us that dominated
        # decoding 64 KiB chunks: benchmarks/RESULTS.md, issue 10). The frame must say it holds exactly this chunk
        # (no allocation a header could inflate); anything unusual takes cramjam's exact path, which words errors.
        import zstandard

        dctx = per_thread(("zstd-d",), zstandard.ZstdDecompressor)
        try:
            if zstandard.frame_content_size(src) == len(dst):
                out = dctx.decompress(src, allow_extra_data=False)
                if len(out) == len(dst):
                    dst[:] = out
                    return
        except zstandard.ZstdError:
            pass  # cramjam reports what is wrong with it
        import cramjam

        decode_exact("zstd", cramjam.zstd.decompress_into, src, dst)
