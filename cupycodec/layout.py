"""Chunk-table arithmetic of format v1: where every chunk of a segment lies, raw and packed (the one owner of it).

A segment of ``raw_nbytes`` is cut into ``n = ceil(raw_nbytes / chunk)`` chunks; its payload is the chunk table
(``n`` u32 compressed sizes, ``n`` u32 CRC32s, ``n`` u8 flags, zero-padded to 16) followed by the chunks, each at a
multiple of 16 from the segment start and zero-padded to 16 (docs/FORMAT.md). The container, the CPU backend and
the GPU engine all take their offsets from here, so the layout is written down once.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

__all__ = [
    "CHUNK_ALIGN",
    "FLAG_ENCODED",
    "FLAG_STORED",
    "MAX_CHUNK_NBYTES",
    "DecodeRows",
    "align",
    "chunk_offsets",
    "data_nbytes",
    "decode_rows",
    "geometry",
    "n_chunks",
    "raw_chunk_sizes",
    "table_nbytes",
]

CHUNK_ALIGN = 16
FLAG_ENCODED, FLAG_STORED = 0, 1
MAX_CHUNK_NBYTES = 16 * 2**20
_U64 = np.uint64


def align(n: int, a: int = CHUNK_ALIGN) -> int:
    return (n + a - 1) // a * a


def n_chunks(raw_nbytes: int, chunk_nbytes: int) -> int:
    return -(-raw_nbytes // chunk_nbytes) if raw_nbytes else 0


def table_nbytes(n: int) -> int:
    """Bytes of a chunk table of ``n`` chunks, padded (9 bytes a chunk)."""
    return align(9 * n)


def raw_chunk_sizes(raw_nbytes: int, chunk_nbytes: int) -> np.ndarray:
    """Uncompressed size of each chunk (int64, a fresh array)."""
    return geometry(raw_nbytes, chunk_nbytes)[0].astype(np.int64)


@functools.lru_cache(maxsize=512)
def geometry(raw_nbytes: int, chunk_nbytes: int) -> tuple[np.ndarray, np.ndarray]:
    """(raw chunk sizes, raw chunk offsets), both uint64 and read-only, of ``raw_nbytes`` cut into chunks."""
    n = n_chunks(raw_nbytes, chunk_nbytes)
    sizes = np.full(n, chunk_nbytes, dtype=_U64)
    if n:
        sizes[-1] = raw_nbytes - (n - 1) * chunk_nbytes
    offsets = np.arange(n, dtype=_U64) * _U64(chunk_nbytes)
    sizes.flags.writeable = offsets.flags.writeable = False
    return sizes, offsets


def padded(comp_nbytes: np.ndarray) -> np.ndarray:
    """Each chunk's bytes in the payload: its size rounded up to 16 (uint64)."""
    return (comp_nbytes.astype(_U64) + _U64(CHUNK_ALIGN - 1)) & ~_U64(CHUNK_ALIGN - 1)


def chunk_offsets(comp_nbytes: np.ndarray) -> np.ndarray:
    """Offset of each chunk from the end of its segment's table (uint64, multiples of 16)."""
    p = padded(comp_nbytes)
    return np.cumsum(p) - p


def data_nbytes(comp_nbytes: np.ndarray) -> int:
    """Bytes the chunks of a segment occupy after its table."""
    return int(padded(comp_nbytes).sum())


def segment_nbytes(comp_nbytes: np.ndarray) -> int:
    return table_nbytes(len(comp_nbytes)) + data_nbytes(comp_nbytes)


def crc_slots(n: int) -> np.ndarray:
    """Offsets of the chunks' CRC32 slots from the start of their table (uint64)."""
    return _U64(4 * n) + np.arange(n, dtype=_U64) * _U64(4)


class DecodeRows(NamedTuple):
    """What a decoder needs of one segment, relative to its payload and its output (uint64 arrays).

    Encoded chunks (flag 0): payload offset, compressed size, output offset and raw size of each, with the largest
    and the total raw size (nvCOMP's temp sizes depend on them). Stored chunks (flag 1): payload offset, output
    offset and size of each, with the largest. (A named tuple, not a frozen dataclass: one is built per segment on
    every small compression, where a frozen dataclass's ten ``object.__setattr__`` calls cost microseconds.)
    """

    enc_src: np.ndarray
    enc_comp: np.ndarray
    enc_dst: np.ndarray
    enc_raw: np.ndarray
    enc_max: int
    enc_total: int
    st_src: np.ndarray
    st_dst: np.ndarray
    st_size: np.ndarray
    st_max: int

    @property
    def n_encoded(self) -> int:
        return len(self.enc_src)

    @property
    def n_stored(self) -> int:
        return len(self.st_src)


_EMPTY = np.zeros(0, dtype=_U64)
_EMPTY.flags.writeable = False


def decode_rows(src: np.ndarray, comp: np.ndarray, flags: np.ndarray, raw_nbytes: int, chunk: int) -> DecodeRows:
    """Rows of a segment whose chunks lie at payload offsets ``src`` with sizes ``comp`` and ``flags``."""
    raw, dst = geometry(raw_nbytes, chunk)
    src, comp = src.astype(_U64, copy=False), comp.astype(_U64, copy=False)
    stored = flags.view(bool)
    n_st = int(np.count_nonzero(stored))
    if n_st == 0:
        return DecodeRows(src, comp, dst, raw, int(raw.max()) if len(raw) else 0, raw_nbytes,
                          _EMPTY, _EMPTY, _EMPTY, 0)
    if n_st == len(raw):
        return DecodeRows(_EMPTY, _EMPTY, _EMPTY, _EMPTY, 0, 0, src, dst, raw, int(raw.max()))
    enc = ~stored
    r = raw[enc]
    return DecodeRows(src[enc], comp[enc], dst[enc], r, int(r.max()), int(r.sum()),
                      src[stored], dst[stored], raw[stored], int(raw[stored].max()))
