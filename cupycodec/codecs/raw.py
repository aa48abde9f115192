"""The ``raw`` codec: chunks are stored as they are (useful for incompressible data and as a baseline)."""

from __future__ import annotations

from .base import Codec, MiB

__all__ = ["Raw"]


class Raw(Codec):
    """Store the bytes unchanged. Every chunk is written as a stored chunk; both backends only copy."""

    codec_id = "raw"
    untrusted_ok = True  # stored chunks are copied within bounds the reader checked
    version = 1
    default_chunk_nbytes = 1 * MiB

    def encode_chunk(self, src: memoryview) -> bytes:
        return bytes(src)

    def decode_chunk_into(self, src: memoryview, dst: memoryview) -> None:  # pragma: no cover - stored chunks
        dst[:] = src
