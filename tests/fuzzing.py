"""Crafted containers for fuzzing: change payload bytes, then recompute every CRC as an attacker would.

CRC32 only catches accidents: anyone who edits a container can recompute the checksums, and then
``CompressedArray.from_bytes(verify=True)`` accepts it. :func:`mutate` builds exactly such a container, so that
fuzzing reaches the decoders instead of stopping at the checksum check.

This module knows the container format (docs/FORMAT.md) and nothing of cupycodec's internals: it parses the bytes
itself with struct, json, numpy and zlib. ``tests/test_fuzzing_tools.py`` tests it on the CPU, and
``benchmarks/fuzz_gpu.py`` (the GPU campaign) loads this file by path, so there is one copy of the logic.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass

import numpy as np

__all__ = ["Chunk", "chunks", "mutate", "recompute_crcs"]

_PRELUDE = struct.Struct("<4sHHQI4x")
_MAGIC = b"CPCC"
_ALIGN = 16
_HEADER_ALIGN = 64  # writers pad so that 24 + N is a multiple of 64


@dataclass(frozen=True)
class Chunk:
    """One chunk of a container: its absolute byte range in the blob and its flag (0 encoded, 1 stored)."""

    segment: str
    index: int
    start: int
    stop: int
    flag: int


def _align(n: int, a: int = _ALIGN) -> int:
    return (n + a - 1) // a * a


def _encode_header(header: dict) -> bytes:
    # Exactly what the writer does (container.Header.encode), before padding.
    return json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _parse(blob: bytes) -> tuple[tuple, dict, int]:
    """(prelude fields, header object, payload offset); ValueError when the structure is not a container's."""
    if len(blob) < _PRELUDE.size:
        raise ValueError(f"not a container: {len(blob)} bytes is shorter than the prelude")
    magic, version, flags, n, crc = _PRELUDE.unpack_from(blob)
    if magic != _MAGIC:
        raise ValueError(f"not a container: magic {magic!r}")
    if _PRELUDE.size + n > len(blob):
        raise ValueError(f"header length {n} overruns the {len(blob)}-byte blob")
    try:
        header = json.loads(bytes(blob[_PRELUDE.size : _PRELUDE.size + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("segments"), list):
        raise ValueError("header has no segment list")
    return (magic, version, flags, n, crc), header, _PRELUDE.size + n


def _tables(blob: bytes | bytearray, header: dict, payload_offset: int):
    """Yield (segment json, table start, n_chunks, comp sizes (int64), flags, absolute chunk starts)."""
    for seg in header["segments"]:
        if not isinstance(seg, dict):
            raise ValueError("a segment is not an object")
        try:
            k, offset, nbytes = int(seg["n_chunks"]), int(seg["offset"]), int(seg["nbytes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"segment {seg.get('name')!r} lacks n_chunks/offset/nbytes: {exc}") from exc
        start = payload_offset + offset
        table_len = _align(9 * k)
        if min(k, offset) < 0 or table_len > nbytes or start + nbytes > len(blob):
            raise ValueError(f"segment {seg.get('name')!r} does not fit in the blob")
        table = np.frombuffer(bytes(blob[start : start + table_len]), dtype=np.uint8)
        comp = table[: 4 * k].view("<u4").astype(np.int64)
        flags = table[8 * k : 9 * k].copy()
        padded = (comp + _ALIGN - 1) // _ALIGN * _ALIGN
        starts = np.zeros(k, dtype=np.int64)
        if k > 1:
            np.cumsum(padded[:-1], out=starts[1:])
        starts += start + table_len
        if k and int(starts[-1] + padded[-1]) > start + nbytes:
            raise ValueError(f"segment {seg.get('name')!r}: its chunk sizes overrun the segment")
        yield seg, start, k, comp, flags, starts


def chunks(blob: bytes) -> list[Chunk]:
    """Every chunk of every segment, in payload order, with its absolute byte range (padding excluded)."""
    _, header, payload_offset = _parse(blob)
    out = []
    for seg, _start, k, comp, flags, starts in _tables(blob, header, payload_offset):
        name = str(seg.get("name"))
        for i in range(k):
            out.append(Chunk(name, i, int(starts[i]), int(starts[i] + comp[i]), int(flags[i])))
    return out


def recompute_crcs(blob: bytes) -> bytes:
    """Recompute every chunk CRC, every ``table_crc32`` and the header CRC of a container: what an attacker does.

    The structure must be intact (prelude, header JSON, segment offsets, table sizes and flags); the payload may
    have been edited anywhere. The header is re-encoded exactly as the writer encodes it and keeps its length when
    the new JSON fits (a new CRC can have more digits), else it grows to the next length with ``24 + N`` a multiple
    of 64. A valid container comes back unchanged.
    """
    (magic, version, flags, n, _crc), header, payload_offset = _parse(blob)
    out = bytearray(blob)
    for seg, start, k, comp, _flags, starts in _tables(out, header, payload_offset):
        crcs = np.fromiter((zlib.crc32(out[s : s + c]) for s, c in zip(starts.tolist(), comp.tolist())),
                           dtype="<u4", count=k)
        out[start + 4 * k : start + 8 * k] = crcs.tobytes()
        seg["table_crc32"] = zlib.crc32(out[start : start + _align(9 * k)])
    text = _encode_header(header)
    if len(text) > n:
        n = _align(_PRELUDE.size + len(text), _HEADER_ALIGN) - _PRELUDE.size
    text += b" " * (n - len(text))
    prelude = _PRELUDE.pack(magic, version, flags, n, zlib.crc32(text))
    return prelude + text + bytes(out[payload_offset:])


def mutate(blob: bytes, rng: np.random.Generator, n_bytes: int, *, where: str = "encoded") -> bytes:
    """Change ``n_bytes`` distinct payload bytes inside chunks, then :func:`recompute_crcs`.

    ``where="encoded"`` picks bytes of encoded chunks (flag 0), falling back to every chunk's bytes when no chunk is
    encoded; ``where="any"`` picks from every chunk. Each picked byte is XORed with a random non-zero value, so
    exactly ``n_bytes`` chunk bytes differ from ``blob``; padding and tables are left alone (except the CRCs).
    """
    if where not in ("encoded", "any"):
        raise ValueError(f"where must be 'encoded' or 'any', got {where!r}")
    if n_bytes < 0:
        raise ValueError(f"n_bytes must be >= 0, got {n_bytes}")
    spans = [c for c in chunks(blob) if c.stop > c.start]
    if where == "encoded" and any(c.flag == 0 for c in spans):
        spans = [c for c in spans if c.flag == 0]
    lengths = np.array([c.stop - c.start for c in spans], dtype=np.int64)
    total = int(lengths.sum())
    if n_bytes > total:
        raise ValueError(f"cannot change {n_bytes} bytes: the chosen chunks hold {total}")
    picks = rng.choice(total, size=n_bytes, replace=False) if n_bytes else np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    which = np.searchsorted(ends, picks, side="right")
    starts = np.array([c.start for c in spans], dtype=np.int64)
    positions = starts[which] + picks - (ends[which] - lengths[which])
    xors = rng.integers(1, 256, size=n_bytes)
    out = bytearray(blob)
    for pos, x in zip(positions.tolist(), xors.tolist()):
        out[pos] ^= x
    return recompute_crcs(bytes(out))
