"""The cupycodec container, format v1, and :class:`CompressedArray`, the immutable value that holds one.

Normative description (mirrored in docs/FORMAT.md; every rule below has a test)::

    offset  size  field
    0       4     magic            b"CPCC"
    4       2     format_version   u16 LE, = 1
    6       2     flags            u16 LE, = 0 in v1 (a reader rejects unknown bits)
    8       8     header_len N     u64 LE, N % 8 == 0, N <= 16 MiB; writers pad so that 24 + N is a multiple of 64
    16      4     header_crc32     u32 LE, zlib.crc32 of the N header bytes
    20      4     zero padding
    24      N     header           UTF-8 JSON object, padded with spaces (0x20) to N bytes
    24+N    ...   payload          segments back to back, no holes, no trailing bytes

The header is ``{"array", "pipeline", "segments", "producer", "metadata"}``:

* ``array``: ``{"dtype": "BF16", "byteorder": "<", "shape": [4096, 4096]}`` (safetensors' dtype names).
* ``pipeline``: filter configs in the order they were applied, e.g. ``[{"id": "int8", "version": 1, ...}]``.
* ``segments``: what the pipeline produced, in payload order; each is ``{"name", "dtype", "byteorder", "shape",
  "raw_nbytes", "codec": {"id", "version", ...options}, "chunk_nbytes", "n_chunks", "offset", "nbytes",
  "table_crc32"}``.
* ``producer``: library, version and backend that wrote it (informational); ``metadata``: the caller's JSON.

A segment occupies ``nbytes`` bytes at ``offset`` in the payload: first its chunk table (``n_chunks`` u32 LE
compressed sizes, then ``n_chunks`` u32 LE CRC32s of the compressed chunks, then ``n_chunks`` u8 flags, zero-padded to
a multiple of 16; ``table_crc32`` covers the padded table), then the chunks, each starting at a multiple of 16 from the
segment start and zero-padded to 16. Chunk ``i`` holds raw bytes ``[i*C, min((i+1)*C, raw_nbytes))`` with
``C = chunk_nbytes``; flag 0 means it is one standalone stream of the segment's codec (a zstd frame, a raw DEFLATE
stream, a gzip member, an LZ4 block, a raw Snappy stream, or an nvCOMP chunk), flag 1 means it is stored as is. A
writer stores a chunk whenever coding would not make it smaller, so an encoded chunk is always strictly smaller than
its raw size, which bounds what any chunk can expand to.

Reader rules: (1) at least 24 bytes and the magic; (2) version <= 1 else UnsupportedVersionError; (3) flags == 0,
N % 8 == 0, N <= 16 MiB, 24 + N <= len; (4) the header CRC, UTF-8, JSON, an object, no duplicate keys; (5) every
field has its type and range; segments are back to back from 0 and end exactly at the end of the payload; (6) every
filter and codec id resolves, with a version we support; the segment names, dtypes and shapes are exactly what the
pipeline derives from ``array``; (7) table CRCs match and every table entry is consistent (sizes, flags, total);
(8) chunk CRCs are verified before any chunk is decompressed; (9) anything else that goes wrong while parsing
becomes a FormatError.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import Any

import numpy as np

from . import registry
from ._version import __version__
from .dtypes import ArraySpec, itemsize, numpy_dtype
from .errors import ChecksumError, CupycodecError, FormatError, UnsupportedVersionError

__all__ = [
    "CHUNK_ALIGN",
    "FORMAT_VERSION",
    "MAGIC",
    "ChunkTable",
    "CompressedArray",
    "Header",
    "Segment",
]

MAGIC = b"CPCC"
FORMAT_VERSION = 1
_PRELUDE = struct.Struct("<4sHHQI4x")
PRELUDE_NBYTES = _PRELUDE.size  # 24
MAX_HEADER_NBYTES = 16 * 2**20
PAYLOAD_ALIGN = 64
CHUNK_ALIGN = 16
FLAG_ENCODED, FLAG_STORED = 0, 1
MAX_CHUNK_NBYTES = 16 * 2**20


def align(n: int, a: int = CHUNK_ALIGN) -> int:
    return (n + a - 1) // a * a


def table_nbytes(n_chunks: int) -> int:
    return align(9 * n_chunks)


def raw_chunk_sizes(raw_nbytes: int, chunk_nbytes: int) -> np.ndarray:
    """Uncompressed size of each chunk (int64)."""
    n = -(-raw_nbytes // chunk_nbytes) if raw_nbytes else 0
    sizes = np.full(n, chunk_nbytes, dtype=np.int64)
    if n:
        sizes[-1] = raw_nbytes - (n - 1) * chunk_nbytes
    return sizes


@dataclass(frozen=True, eq=False)
class ChunkTable:
    """Per-chunk compressed sizes, CRC32s and flags of one segment (read-only uint32/uint32/uint8 arrays).

    ``crc_source`` is the CRC array, or a callable returning it: GPU compression computes the checksums on the
    device after packing and the host reads them only when something needs them (:attr:`crc32`).
    """

    comp_nbytes: np.ndarray
    crc_source: Any
    flags: np.ndarray

    def __post_init__(self):
        for a in (self.comp_nbytes, self.crc_source, self.flags):
            if isinstance(a, np.ndarray):
                a.flags.writeable = False

    @classmethod
    def build(cls, comp_nbytes, crc32, flags) -> ChunkTable:
        crc = crc32 if callable(crc32) else np.ascontiguousarray(crc32, dtype="<u4")
        return cls(np.ascontiguousarray(comp_nbytes, dtype="<u4"), crc, np.ascontiguousarray(flags, dtype=np.uint8))

    @property
    def crc32(self) -> np.ndarray:
        """The chunks' CRC32s (reading them waits for a GPU compression's checksum kernel the first time)."""
        src = self.crc_source
        if not isinstance(src, np.ndarray):
            src = np.ascontiguousarray(src(), dtype="<u4")
            src.flags.writeable = False
            object.__setattr__(self, "crc_source", src)
        return src

    def __len__(self) -> int:
        return len(self.comp_nbytes)

    def to_bytes(self) -> bytes:
        return self._bytes

    def bytes_without_crcs(self) -> bytes:
        """The padded table with its CRC slots zeroed (what GPU packing uploads before checksumming the chunks)."""
        n = len(self)
        body = self.comp_nbytes.tobytes() + bytes(4 * n) + self.flags.tobytes()
        return body + bytes(table_nbytes(n) - len(body))

    @cached_property
    def _bytes(self) -> bytes:
        body = self.comp_nbytes.tobytes() + self.crc32.tobytes() + self.flags.tobytes()
        return body + bytes(table_nbytes(len(self)) - len(body))

    @classmethod
    def parse(cls, buf: memoryview, n: int) -> ChunkTable:
        raw = np.frombuffer(buf, dtype=np.uint8, count=9 * n)
        return cls(raw[: 4 * n].view("<u4"), raw[4 * n : 8 * n].view("<u4"), raw[8 * n :])

    @cached_property
    def chunk_offsets(self) -> np.ndarray:
        """Offset of each chunk from the start of the segment's chunk area (int64, multiples of 16)."""
        padded = (self.comp_nbytes.astype(np.int64) + (CHUNK_ALIGN - 1)) // CHUNK_ALIGN * CHUNK_ALIGN
        offsets = np.zeros(len(self), dtype=np.int64)
        if len(self) > 1:
            np.cumsum(padded[:-1], out=offsets[1:])
        return offsets

    @cached_property
    def n_encoded(self) -> int:
        """Chunks stored encoded (flag 0); the rest are stored raw."""
        return int(np.count_nonzero(self.flags == 0))

    @cached_property
    def data_nbytes(self) -> int:
        return int(((self.comp_nbytes.astype(np.int64) + 15) // 16 * 16).sum())


@dataclass(frozen=True, eq=False)
class Segment:
    """One compressed array of the pipeline's output: its spec, codec, chunking and place in the payload."""

    name: str
    spec: ArraySpec
    codec: Any
    chunk_nbytes: int
    offset: int
    nbytes: int
    table: ChunkTable
    _table_crc32: int | None = None  # None: computed from the table bytes on first use

    @property
    def table_crc32(self) -> int:
        """CRC32 of the padded chunk table (as stored in the header)."""
        v = self._table_crc32
        if v is None:
            v = zlib.crc32(self.table.to_bytes())
            object.__setattr__(self, "_table_crc32", v)
        return v

    @property
    def raw_nbytes(self) -> int:
        return self.spec.nbytes

    @property
    def n_chunks(self) -> int:
        return len(self.table)

    @property
    def data_offset(self) -> int:
        """Payload offset of the first chunk."""
        return self.offset + table_nbytes(self.n_chunks)

    @cached_property
    def raw_chunk_nbytes(self) -> np.ndarray:
        return raw_chunk_sizes(self.raw_nbytes, self.chunk_nbytes)

    @cached_property
    def chunk_offsets(self) -> np.ndarray:
        """Absolute payload offset of each chunk (int64)."""
        return self.table.chunk_offsets + self.data_offset

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, **self.spec.to_json(), "raw_nbytes": self.raw_nbytes,
            "codec": self.codec.get_config(), "chunk_nbytes": self.chunk_nbytes, "n_chunks": self.n_chunks,
            "offset": self.offset, "nbytes": self.nbytes, "table_crc32": self.table_crc32,
        }


def segment_nbytes(table: ChunkTable) -> int:
    return table_nbytes(len(table)) + table.data_nbytes


@dataclass(frozen=True, eq=False)
class Header:
    """The parsed, validated header of a container."""

    array: ArraySpec
    pipeline: tuple
    segments: tuple[Segment, ...]
    producer: Mapping[str, Any]
    metadata: Mapping[str, Any]

    def __post_init__(self):
        for name in ("producer", "metadata"):
            value = getattr(self, name)
            if not isinstance(value, MappingProxyType):  # already frozen when it comes from producer_info
                object.__setattr__(self, name, _freeze(_thaw(value)) if value else _EMPTY)

    @property
    def payload_nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments)

    def to_json(self) -> dict[str, Any]:
        return {
            "array": self.array.to_json(),
            "pipeline": [f.get_config() for f in self.pipeline],
            "segments": [s.to_json() for s in self.segments],
            "producer": dict(self.producer),
            "metadata": _thaw(self.metadata),
        }

    def encode(self) -> bytes:
        """Prelude + padded header bytes (deterministic: sorted keys, no spaces)."""
        try:
            text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                              allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadata must be JSON-serializable (no NaN/Inf floats): {exc}") from exc
        n = align(PRELUDE_NBYTES + len(text), PAYLOAD_ALIGN) - PRELUDE_NBYTES
        if n > MAX_HEADER_NBYTES:
            raise ValueError(f"header of {n} bytes exceeds {MAX_HEADER_NBYTES}; use less metadata")
        text += b" " * (n - len(text))
        return _PRELUDE.pack(MAGIC, FORMAT_VERSION, 0, n, zlib.crc32(text)) + text


_EMPTY: Mapping[str, Any] = MappingProxyType({})


def derive_specs(array: ArraySpec, pipeline: Sequence) -> dict[str, ArraySpec]:
    """The segment specs a pipeline produces from an array spec (raises ValueError if it does not apply)."""
    specs = {"data": array}
    for f in pipeline:
        specs = f.specs(specs)
    return specs


def build_segments(pieces: Sequence[tuple[str, ArraySpec, Any, int, ChunkTable]]) -> tuple[Segment, ...]:
    """Lay segments out back to back: ``pieces`` are (name, spec, codec, chunk_nbytes, table)."""
    out, offset = [], 0
    for name, spec, codec, chunk_nbytes, table in pieces:
        nbytes = segment_nbytes(table)
        out.append(Segment(name, spec, codec, chunk_nbytes, offset, nbytes, table))
        offset += nbytes
    return tuple(out)


def producer_info(backend: str) -> Mapping[str, Any]:
    key = (backend, __version__)
    info = _PRODUCERS.get(key)
    if info is None:
        info = {"library": "cupycodec", "version": __version__, "backend": backend}
        if backend == "nvcomp":
            from .backends import nvcomp

            info["nvcomp"] = nvcomp.version_string()
        info = _PRODUCERS[key] = _freeze(info)
    return info


_PRODUCERS: dict[tuple, Mapping[str, Any]] = {}


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


def _no_duplicates(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise FormatError(f"duplicate key {key!r} in header")
        obj[key] = value
    return obj


def _field(obj: Mapping, key: str, kind, where: str):
    if key not in obj:
        raise FormatError(f"{where}: missing {key!r}")
    value = obj[key]
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise FormatError(f"{where}: {key!r} must be a non-negative int, got {value!r}")
    elif not isinstance(value, kind):
        raise FormatError(f"{where}: {key!r} has type {type(value).__name__}")
    return value


def _spec(obj: Mapping, where: str) -> ArraySpec:
    name = _field(obj, "dtype", str, where)
    itemsize(name)  # unknown names raise FormatError
    order = _field(obj, "byteorder", str, where)
    if order not in ("<", ">", "|"):
        raise FormatError(f"{where}: byteorder must be '<', '>' or '|', got {order!r}")
    shape = _field(obj, "shape", list, where)
    if len(shape) > 64 or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63 for s in shape):
        raise FormatError(f"{where}: shape must be a list of at most 64 non-negative ints, got {shape!r}")
    spec = ArraySpec(name, order, tuple(shape))
    if spec.nbytes >= 2**63:
        raise FormatError(f"{where}: shape {shape} describes {spec.nbytes} bytes, more than any machine holds")
    return spec


def parse_prelude(buf: memoryview) -> tuple[int, int]:
    if len(buf) < PRELUDE_NBYTES:
        raise FormatError(f"need at least {PRELUDE_NBYTES} bytes for the prelude, got {len(buf)}")
    magic, version, flags, n, header_crc = _PRELUDE.unpack_from(buf)
    if magic != MAGIC:
        raise FormatError(f"not a cupycodec container: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version > FORMAT_VERSION or version == 0:
        if version == 0:
            raise FormatError("format version 0 does not exist")
        raise UnsupportedVersionError("container format", version, FORMAT_VERSION)
    if flags != 0:
        raise FormatError(f"unknown flags {flags:#06x} for format version {version}")
    if n % 8 or n > MAX_HEADER_NBYTES:
        raise FormatError(f"header length {n} is not a multiple of 8 or exceeds {MAX_HEADER_NBYTES}")
    if PRELUDE_NBYTES + n > len(buf):
        raise FormatError(f"header length {n} overruns the {len(buf)}-byte buffer (truncated?)")
    return n, header_crc


def parse_header(buf: memoryview) -> tuple[Header, int]:
    """Validate prelude, header and chunk tables; return the header and the payload's offset in ``buf``.

    Chunk CRCs are not checked here (see :func:`verify_chunks`).
    """
    try:
        return _parse_header(buf)
    except CupycodecError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, RecursionError,
            UnicodeDecodeError, struct.error) as exc:
        raise FormatError(f"invalid header: {type(exc).__name__}: {exc}") from exc


def _parse_header(buf: memoryview) -> tuple[Header, int]:
    n, header_crc = parse_prelude(buf)
    text = buf[PRELUDE_NBYTES : PRELUDE_NBYTES + n]
    computed = zlib.crc32(text)
    if computed != header_crc:
        raise ChecksumError("header", header_crc, computed)
    try:
        obj = json.loads(bytes(text).decode("utf-8"), object_pairs_hook=_no_duplicates,
                         parse_constant=lambda c: (_ for _ in ()).throw(FormatError(f"{c} is not valid JSON")))
    except json.JSONDecodeError as exc:
        raise FormatError(f"header is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise FormatError(f"header must be a JSON object, got {type(obj).__name__}")
    payload_offset = PRELUDE_NBYTES + n
    payload_nbytes = len(buf) - payload_offset

    array = _spec(_field(obj, "array", dict, "header"), "array")
    pipeline = []
    for i, cfg in enumerate(_field(obj, "pipeline", list, "header")):
        if not isinstance(cfg, dict):
            raise FormatError(f"pipeline[{i}] must be an object")
        pipeline.append(_resolved(registry.get_filter, cfg, f"pipeline[{i}]"))
    try:
        expected = derive_specs(array, pipeline)
    except (ValueError, TypeError) as exc:
        raise FormatError(f"pipeline does not apply to the array: {exc}") from exc
    producer = _field(obj, "producer", dict, "header")
    metadata = _field(obj, "metadata", dict, "header")

    segs_json = _field(obj, "segments", list, "header")
    if [s.get("name") if isinstance(s, dict) else None for s in segs_json] != list(expected):
        raise FormatError(f"segments must be {list(expected)} in that order for this pipeline")
    segments, offset = [], 0
    for sj in segs_json:
        name = sj["name"]
        where = f"segment {name!r}"
        spec = _spec(sj, where)
        if spec != expected[name]:
            raise FormatError(f"{where}: spec {spec} does not match the pipeline's {expected[name]}")
        if _field(sj, "raw_nbytes", int, where) != spec.nbytes:
            raise FormatError(f"{where}: raw_nbytes {sj['raw_nbytes']} != {spec.nbytes} implied by dtype and shape")
        codec_cfg = _field(sj, "codec", dict, where)
        codec = _resolved(registry.get_codec, codec_cfg, where)
        chunk = _field(sj, "chunk_nbytes", int, where)
        if not (CHUNK_ALIGN <= chunk <= min(MAX_CHUNK_NBYTES, codec.max_chunk_nbytes)) or chunk % CHUNK_ALIGN:
            raise FormatError(f"{where}: chunk_nbytes {chunk} must be a multiple of 16 in [16, 16 MiB]")
        k = _field(sj, "n_chunks", int, where)
        if k != -(-spec.nbytes // chunk):
            raise FormatError(f"{where}: n_chunks {k} != ceil({spec.nbytes} / {chunk})")
        seg_off = _field(sj, "offset", int, where)
        nbytes = _field(sj, "nbytes", int, where)
        if seg_off != offset:
            raise FormatError(f"{where}: offset {seg_off} leaves a hole or overlaps (expected {offset})")
        if nbytes % CHUNK_ALIGN or seg_off + nbytes > payload_nbytes:
            raise FormatError(f"{where}: nbytes {nbytes} is not a multiple of 16 or overruns the payload "
                              f"({payload_nbytes} bytes; truncated?)")
        tnb = table_nbytes(k)
        if tnb > nbytes:
            raise FormatError(f"{where}: its chunk table ({tnb} bytes) does not fit in {nbytes} bytes")
        table_bytes = buf[payload_offset + seg_off : payload_offset + seg_off + tnb]
        stored_crc = _field(sj, "table_crc32", int, where)
        computed = zlib.crc32(table_bytes)
        if computed != stored_crc:
            raise ChecksumError(f"{name}.table", stored_crc, computed)
        table = ChunkTable.parse(table_bytes, k)
        _check_table(table, spec.nbytes, chunk, nbytes - tnb, codec, where)
        segments.append(Segment(name, spec, codec, chunk, seg_off, nbytes, table, stored_crc))
        offset += nbytes
    if offset != payload_nbytes:
        raise FormatError(f"segments cover {offset} payload bytes but the buffer holds {payload_nbytes} "
                          f"({'trailing bytes' if offset < payload_nbytes else 'truncated'})")
    header = Header(array, tuple(pipeline), tuple(segments), _freeze(producer), _freeze(metadata))
    return header, payload_offset


def _resolved(get, cfg, where):
    try:
        return get(cfg)
    except CupycodecError:
        raise
    except (TypeError, ValueError) as exc:
        raise FormatError(f"{where}: invalid config {cfg!r}: {exc}") from exc


def _check_table(table: ChunkTable, raw_nbytes: int, chunk: int, data_nbytes: int, codec, where: str) -> None:
    raw = raw_chunk_sizes(raw_nbytes, chunk)
    comp = table.comp_nbytes.astype(np.int64)
    flags = table.flags
    if flags.size and int(flags.max()) > FLAG_STORED:
        raise FormatError(f"{where}: unknown chunk flag {int(flags.max())}")
    stored = flags == FLAG_STORED
    if not np.array_equal(comp[stored], raw[stored]):
        raise FormatError(f"{where}: a stored chunk's size differs from its raw size")
    enc = ~stored
    if enc.any() and (codec.codec_id == "raw" or (comp[enc] <= 0).any() or (comp[enc] >= raw[enc]).any()):
        raise FormatError(f"{where}: an encoded chunk is empty or not smaller than its raw size")
    if table.data_nbytes != data_nbytes:
        raise FormatError(f"{where}: chunks need {table.data_nbytes} bytes but the segment has {data_nbytes}")


def verify_chunks(header: Header, payload: memoryview, executor=None) -> None:
    """Check every chunk's CRC32 against the table (in parallel when an executor is given)."""
    jobs = []
    for seg in header.segments:
        offs, sizes, crcs = seg.chunk_offsets, seg.table.comp_nbytes, seg.table.crc32
        for lo in range(0, seg.n_chunks, 256):
            jobs.append((seg.name, lo, offs[lo : lo + 256], sizes[lo : lo + 256], crcs[lo : lo + 256]))

    def check(job):
        name, lo, offs, sizes, crcs = job
        for j, (o, s, c) in enumerate(zip(offs.tolist(), sizes.tolist(), crcs.tolist())):
            got = zlib.crc32(payload[o : o + s])
            if got != c:
                raise ChecksumError(name, c, got, chunk=lo + j)

    if executor is None or len(jobs) < 2:
        for job in jobs:
            check(job)
    else:
        for _ in executor.map(check, jobs):
            pass


def _freeze(obj):
    if isinstance(obj, dict):
        return MappingProxyType({k: _freeze(v) for k, v in obj.items()})
    if isinstance(obj, list):
        return tuple(_freeze(v) for v in obj)
    return obj


def _thaw(obj):
    if isinstance(obj, Mapping):
        return {k: _thaw(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_thaw(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------------------
# CompressedArray
# --------------------------------------------------------------------------------------------------------------


class CompressedArray:
    """A compressed array: an immutable, self-describing container, on the host or on a GPU.

    Build one with :func:`cupycodec.compress` or :meth:`from_bytes`; turn it back into an array with
    :func:`cupycodec.decompress`. Everything about it (dtype, shape, codec, sizes, ratio) is available without
    decompressing. Two compressed arrays are equal when their bytes are equal.

    Examples
    --------
    >>> import numpy as np, cupycodec as cc
    >>> c = cc.compress(np.zeros((256, 256), np.float32), codec="zstd")
    >>> c.shape, c.dtype, c.codec, c.ratio > 100
    ((256, 256), dtype('float32'), 'zstd', True)
    >>> cc.CompressedArray.from_bytes(c.to_bytes()) == c
    True
    """

    __slots__ = ("__weakref__", "_cache", "_header", "_payload", "_pfx")

    def __init__(self, header: Header, payload, *, _prefix: bytes | None = None):
        if _prefix is None and header.metadata:  # user metadata: prove it encodes (JSON-able, size) right away
            _prefix = header.encode()
        object.__setattr__(self, "_header", header)
        object.__setattr__(self, "_payload", payload)
        object.__setattr__(self, "_pfx", _prefix)  # else encoded on first use: ~20 us a small compress can skip
        object.__setattr__(self, "_cache", {})

    @property
    def _prefix(self) -> bytes:
        """Prelude + header bytes (deterministic, so computing them late changes nothing)."""
        pfx = self._pfx
        if pfx is None:
            pfx = self._header.encode()
            object.__setattr__(self, "_pfx", pfx)
        return pfx

    def __setattr__(self, name, value):
        raise AttributeError("CompressedArray is immutable")

    # -- what it holds ------------------------------------------------------------------------------------------
    @property
    def header(self) -> Mapping[str, Any]:
        """The header as a read-only mapping (the JSON of the container)."""
        h = self._cache.get("header")
        if h is None:
            h = self._cache["header"] = _freeze(self._header.to_json())
        return h

    @property
    def spec(self) -> ArraySpec:
        return self._header.array

    @property
    def shape(self) -> tuple[int, ...]:
        return self._header.array.shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return self._header.array.size

    @property
    def dtype(self) -> np.dtype:
        """The logical NumPy dtype of the decompressed array (bfloat16 through ml_dtypes)."""
        return numpy_dtype(self.spec.dtype, self.spec.byteorder)

    @property
    def dtype_name(self) -> str:
        """The container's dtype name (``"BF16"``, ``"F32"``, ...)."""
        return self.spec.dtype

    @property
    def codec(self) -> str:
        """The id of the codec that compressed the data (``"zstd"``, ``"ans"``, ...)."""
        return self._header.segments[0].codec.codec_id if self._header.segments else "raw"

    @property
    def codecs(self) -> dict[str, dict[str, Any]]:
        """Codec config of every segment."""
        return {s.name: s.codec.get_config() for s in self._header.segments}

    @property
    def pipeline(self) -> tuple:
        """The filters applied before the codec (empty for plain lossless compression)."""
        return self._header.pipeline

    @property
    def lossless(self) -> bool:
        return all(f.lossless for f in self._header.pipeline)

    @property
    def segments(self) -> tuple[Segment, ...]:
        return self._header.segments

    @property
    def metadata(self) -> Mapping[str, Any]:
        return self._header.metadata

    @property
    def producer(self) -> Mapping[str, Any]:
        return self._header.producer

    @property
    def raw_nbytes(self) -> int:
        """Bytes of the decompressed array."""
        return self.spec.nbytes

    @property
    def nbytes(self) -> int:
        """Bytes of the container (prelude, header and payload): what ``to_bytes()`` returns.

        The header holds the chunk tables' CRCs, so for an array just compressed on a GPU the first read waits for
        its checksum kernel (a few microseconds after the compression's work on its stream)."""
        return len(self._prefix) + self._header.payload_nbytes

    @property
    def ratio(self) -> float:
        """``raw_nbytes / nbytes`` (for quantized data, against the original dtype)."""
        return self.raw_nbytes / self.nbytes if self.nbytes else math.inf

    @property
    def device(self) -> str:
        """``"cpu"`` when the payload is in host memory, else ``"cuda:N"``."""
        if isinstance(self._payload, memoryview):
            return "cpu"
        return f"cuda:{self._payload.device.id}"

    @property
    def on_device(self) -> bool:
        return not isinstance(self._payload, memoryview)

    # -- conversions ------------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The container as ``bytes`` (copies a device payload to the host)."""
        return self._prefix + bytes(self.host_payload())

    def host_payload(self) -> memoryview:
        """The payload in host memory (copied from the device if it lives there)."""
        if isinstance(self._payload, memoryview):
            return self._payload
        return memoryview(self._payload.get()).cast("B")

    def write_to(self, f) -> int:
        """Write the container to a binary file object without building one big bytes object."""
        n = f.write(self._prefix)
        n += f.write(self.host_payload())
        return n

    @classmethod
    def from_bytes(cls, buf, *, verify: bool = True) -> CompressedArray:
        """Parse and validate a container from a bytes-like object (not copied; keep it unchanged).

        Everything is checked before any data is touched: prelude, header CRC and schema, chunk tables, and (with
        ``verify=True``) the CRC32 of every chunk. Any defect raises :class:`~cupycodec.FormatError` or a subclass
        (:class:`~cupycodec.ChecksumError`, :class:`~cupycodec.UnsupportedVersionError`); unknown ids raise
        :class:`~cupycodec.UnknownCodecError`.
        """
        try:
            mv = memoryview(buf).cast("B")
        except TypeError as exc:
            raise TypeError(f"from_bytes takes a bytes-like object, got {type(buf).__name__}") from exc
        header, payload_offset = parse_header(mv)
        payload = mv[payload_offset:]
        if verify:
            from .backends import cpu

            verify_chunks(header, payload, cpu.executor())
        c = cls(header, payload, _prefix=bytes(mv[:payload_offset]))
        c._cache["external"] = True  # bytes from outside: decompress bounds the output by default
        return c

    def to_host(self) -> CompressedArray:
        """This container with its payload in host memory (``self`` if it is already there)."""
        if not self.on_device:
            return self
        return self._like(self.host_payload())

    def to_device(self, device: int | None = None) -> CompressedArray:
        """This container with its payload in GPU memory (``device``: CUDA ordinal, default current)."""
        import cupy

        dev = cupy.cuda.Device(device) if device is not None else cupy.cuda.Device()
        if self.on_device and self._payload.device.id == dev.id:
            return self
        with dev:
            if self.on_device:
                payload = self._payload.copy()
            else:
                payload = cupy.asarray(np.frombuffer(self._payload, dtype=np.uint8))
        return self._like(payload)

    def _like(self, payload) -> CompressedArray:
        c = CompressedArray(self._header, payload, _prefix=self._prefix)
        if self._cache.get("external"):
            c._cache["external"] = True
        return c

    # -- protocol ---------------------------------------------------------------------------------------------
    def __eq__(self, other):
        if not isinstance(other, CompressedArray):
            return NotImplemented
        return self._prefix == other._prefix and bytes(self.host_payload()) == bytes(other.host_payload())

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self):
        return (_from_bytes_trusted, (self.to_bytes(),))

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def __repr__(self):
        lossy = "" if self.lossless else f", pipeline={[f.get_config()['id'] for f in self.pipeline]}"
        return (f"<CompressedArray shape={self.shape} dtype={self.spec.dtype} codec={self.codec!r}{lossy} "
                f"nbytes={self.nbytes} ratio={self.ratio:.3f} device={self.device}>")


def _from_bytes_trusted(blob: bytes) -> CompressedArray:
    return CompressedArray.from_bytes(blob, verify=True)
