"""The cupycodec container, format v1, and :class:`CompressedArray`, the immutable value that holds one.

Normative description (mirrored in docs/FORMAT.md; every rule below has a test)::

    offset  size  field
    0       4     magic            b"CPCC"
    4       2     format_version   u16 LE, = 1
    6       2     flags            u16 LE, = 0 in v1 (a reader rejects unknown bits)
    8       8     header_len N     u64 LE, N % 8 == 0, N <= 16 MiB
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
(8) a chunk's CRC is verified before the chunk is decompressed or handed on (at first use, not at parse); (9) each
rule is an explicit check, so any other exception escaping the parser is a reader bug, never disguised as a bad
file. An optional ``auth`` key carries a MAC of the container: keyed BLAKE3 as written now, HMAC-SHA256 as written
before 2026-12-03 (docs/FORMAT.md, "Authentication").
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
import zlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from types import MappingProxyType
from typing import Any

import numpy as np

from . import layout, registry
from ._files import release_pages
from ._lru import LRU
from ._version import __version__
from .dtypes import ArraySpec, extent_nbytes, itemsize, numpy_dtype
from .errors import (
    AuthenticationError,
    ChecksumError,
    CupycodecError,
    FormatError,
    UnknownCodecError,
    UnknownCodecInFileError,
    UnsupportedVersionError,
)
from .layout import CHUNK_ALIGN, FLAG_STORED, MAX_CHUNK_NBYTES, geometry, raw_chunk_sizes, table_nbytes

__all__ = [
    "CHUNK_ALIGN",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_NDIM",
    "ChunkTable",
    "CompressedArray",
    "Header",
    "Segment",
]

MAGIC = b"CPCC"
FORMAT_VERSION = 1
_PRELUDE = struct.Struct("<4sHHQI4s")
PRELUDE_NBYTES = _PRELUDE.size  # 24
MAX_HEADER_NBYTES = 16 * 2**20
HEADER_ALIGN = 8  # readers need N % 8 == 0; writers pad no further (writers before 7e1a923, 12-01, padded to 64)
MAX_NDIM = 64  # dimensions of an array (and of a checkpoint's tensor): a bound before any product of them
_MAX_JSON_DEPTH = 64  # nesting allowed in a header (metadata included): deeper JSON is rejected, not recursed into


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

    def owned(self) -> ChunkTable:
        """This table in arrays of its own: a parsed table views the payload it came from (and keeps it alive), a
        GPU compression's pending CRCs hold the device payload."""
        return ChunkTable(self.comp_nbytes.copy(), self.crc32.copy(), self.flags.copy())

    def __len__(self) -> int:
        return len(self.comp_nbytes)

    def to_bytes(self) -> bytes:
        return self._bytes

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
        return layout.chunk_offsets(self.comp_nbytes).astype(np.int64)

    @cached_property
    def n_encoded(self) -> int:
        """Chunks stored encoded (flag 0); the rest are stored raw."""
        return int(np.count_nonzero(self.flags == 0))

    @cached_property
    def data_nbytes(self) -> int:
        return layout.data_nbytes(self.comp_nbytes)


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
    # Decode rows computed by whoever packed the segment (the GPU engine has them at hand), else derived on use.
    _rows: layout.DecodeRows | None = field(default=None, repr=False)

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

    @property
    def decode_rows(self) -> layout.DecodeRows:
        """Where this segment's encoded and stored chunks lie, relative to the payload and the output."""
        rows = self._rows
        if rows is None:
            rows = layout.decode_rows(self.chunk_offsets, self.table.comp_nbytes, self.table.flags, self.raw_nbytes,
                                      self.chunk_nbytes)
            object.__setattr__(self, "_rows", rows)
        return rows

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
    mac: str | None = None  # the MAC of the rest (hex), present when the writer was given a key
    mac_alg: str | None = None  # its algorithm (MAC_ALGS), with it

    def __post_init__(self):
        for name in ("producer", "metadata"):
            value = getattr(self, name)
            if not isinstance(value, MappingProxyType):  # already frozen when it comes from producer_info
                if name == "metadata":  # the caller's: checked before _thaw and _freeze recurse into it
                    _check_metadata_depth(value)
                object.__setattr__(self, name, _freeze(_thaw(value)) if value else _EMPTY)

    def __reduce__(self):  # mapping proxies do not pickle: their contents go as dicts and are frozen again
        return (type(self), (self.array, self.pipeline, self.segments, _thaw(self.producer), _thaw(self.metadata),
                             self.mac, self.mac_alg))

    @property
    def payload_nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments)

    def detached(self) -> Header:
        """This header with chunk tables of its own, referencing no payload."""
        return replace(self, segments=tuple(replace(s, table=s.table.owned()) for s in self.segments))

    def to_json(self) -> dict[str, Any]:
        obj = {
            "array": self.array.to_json(),
            "pipeline": [f.get_config() for f in self.pipeline],
            "segments": [s.to_json() for s in self.segments],
            "producer": _thaw(self.producer),
            "metadata": _thaw(self.metadata),
        }
        if self.mac is not None:
            obj["auth"] = {"alg": self.mac_alg, "mac": self.mac}
        return obj

    def encode(self) -> bytes:
        """Prelude + padded header bytes (deterministic: sorted keys, no spaces)."""
        if self.metadata:  # what a reader refuses is never written: a file save() writes that load() cannot read
            _check_metadata_depth(self.metadata)
        text = _canonical(self.to_json())
        n = layout.align(len(text), HEADER_ALIGN)
        if n > MAX_HEADER_NBYTES:
            raise ValueError(f"header of {n} bytes exceeds {MAX_HEADER_NBYTES}; use less metadata")
        text += b" " * (n - len(text))
        return _PRELUDE.pack(MAGIC, FORMAT_VERSION, 0, n, zlib.crc32(text), bytes(4)) + text

    def signed(self, key, payload, alg: str | None = None) -> Header:
        """This header with the MAC of (itself without a MAC, payload) under ``key`` (``alg``: one of
        :data:`MAC_ALGS`, default :data:`MAC_ALG`)."""
        alg = alg or MAC_ALG
        unsigned = self if self.mac is None else _replace_mac(self, None)
        return _replace_mac(unsigned, compute_mac(key, unsigned, payload, alg), alg)


def _canonical(obj) -> bytes:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata must be JSON-serializable (no NaN/Inf floats): {exc}") from exc


def _replace_mac(header: Header, mac: str | None, alg: str | None = None) -> Header:
    return Header(header.array, header.pipeline, header.segments, header.producer, header.metadata, mac,
                  alg if mac is not None else None)


# -- authentication ---------------------------------------------------------------------------------------------

MAC_ALG = "BLAKE3"  # what writers use
MAC_ALGS = ("BLAKE3", "HMAC-SHA256")  # what readers check (HMAC-SHA256: containers signed before 2026-12-03)
_MAC_DOMAIN = b"cupycodec container v1\0"
_BLAKE3_KEY_CONTEXT = "cupycodec 2026-12-03 container MAC key v1"  # BLAKE3 derive_key: the secret -> a 32-byte key
_MIN_KEY_NBYTES = 16
_MAC_THREADS_NBYTES = 16 << 20  # BLAKE3 spreads a payload this large over threads (smaller ones: one thread)


def _check_key(key) -> bytes:
    if isinstance(key, str) or not isinstance(key, (bytes, bytearray, memoryview)):
        raise TypeError(f"key must be bytes (e.g. os.urandom(32)), got {type(key).__name__}")
    key = bytes(key)
    if len(key) < _MIN_KEY_NBYTES:
        raise ValueError(f"key must be at least {_MIN_KEY_NBYTES} bytes (a random secret, e.g. os.urandom(32)), "
                         f"got {len(key)}")
    return key


def compute_mac(key, header: Header, payload, alg: str = MAC_ALG, threads: int | None = None) -> str:
    """The MAC (hex) of the canonical JSON of ``header`` (which must carry no MAC) and the payload bytes.

    The MAC covers the header as this reader understands it (re-serialized from the parsed values), so every field
    that decoding uses is authenticated however the writer spaced or ordered its JSON. ``BLAKE3`` is keyed BLAKE3
    under a key derived from ``key`` (BLAKE3's derive_key mode): 2.4x HMAC-SHA256's speed on one core of the
    development machine (4.0 against 1.7 GB/s over a memory-mapped checkpoint) and run on several cores for a large
    payload (docs/FORMAT.md, "Authentication"; benchmarks/RESULTS.md, issue 11): ``threads`` (default the CPU
    pool's size, :func:`cupycodec.backends.cpu.num_threads`) for a payload of :data:`_MAC_THREADS_NBYTES` or more;
    a caller that already checks many containers in parallel passes 1.
    """
    key = _check_key(key)
    text = _canonical(header.to_json())
    if alg == "BLAKE3":
        import blake3

        from .backends.cpu import num_threads

        k = blake3.blake3(key, derive_key_context=_BLAKE3_KEY_CONTEXT).digest()
        big = memoryview(payload).nbytes >= _MAC_THREADS_NBYTES
        m = blake3.blake3(_MAC_DOMAIN, key=k, max_threads=(threads or num_threads()) if big else 1)
    elif alg == "HMAC-SHA256":
        m = hmac.new(key, _MAC_DOMAIN, hashlib.sha256)
    else:
        raise ValueError(f"unknown MAC algorithm {alg!r}; one of {MAC_ALGS}")
    m.update(len(text).to_bytes(8, "little"))
    m.update(text)
    m.update(payload)
    return m.hexdigest()


def check_mac(key, header: Header, payload, threads: int | None = None) -> None:
    """Raise AuthenticationError unless ``header`` carries a MAC that ``key`` produced for this header and payload
    (``threads``: as for :func:`compute_mac`). A bad key is named before the container is looked at."""
    key = _check_key(key)
    if header.mac is None:
        exc = AuthenticationError("the container carries no MAC, so key= cannot authenticate it; it was saved "
                                  "without a key (load it without key=, as untrusted, or with trusted=True if you "
                                  "made it)")
        exc.unsigned = True
        raise exc
    if header.mac_alg not in MAC_ALGS:
        raise AuthenticationError(f"the container is signed with MAC algorithm {header.mac_alg!r}, which this "
                                  f"version of cupycodec does not know (it checks {', '.join(MAC_ALGS)}): upgrade "
                                  "cupycodec to authenticate it, or load it without key= as untrusted")
    want = compute_mac(key, _replace_mac(header, None), payload, header.mac_alg, threads)
    if not hmac.compare_digest(want, header.mac):
        raise AuthenticationError("MAC mismatch: the container was changed after it was signed, or signed with "
                                  "another key")


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


def producer_info(backend: str, nvcomp_version: str | None = None) -> Mapping[str, Any]:
    """The ``producer`` record: this library and version, the backend, and nvCOMP's version when it wrote."""
    key = (backend, __version__, nvcomp_version)
    info = _PRODUCERS.get(key)
    if info is None:
        info = {"library": "cupycodec", "version": __version__, "backend": backend}
        if nvcomp_version is not None:
            info["nvcomp"] = nvcomp_version
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
    one_byte = itemsize(name) == 1  # unknown names raise FormatError
    order = _field(obj, "byteorder", str, where)
    if order not in ("<", ">", "|"):
        raise FormatError(f"{where}: byteorder must be '<', '>' or '|', got {order!r}")
    if (order == "|") != one_byte:  # '|' on a wider type would decode in the host's order, whatever that is
        want = "'|'" if one_byte else "'<' or '>'"
        raise FormatError(f"{where}: byteorder of {name} must be {want} ('|' is for one-byte types), got {order!r}")
    shape = _field(obj, "shape", list, where)
    if len(shape) > MAX_NDIM or \
            not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63 for s in shape):
        raise FormatError(f"{where}: shape must be a list of at most {MAX_NDIM} non-negative ints, got {shape!r}")
    spec = ArraySpec(name, order, tuple(shape))
    extent = extent_nbytes(spec.shape, spec.itemsize)  # an empty array's non-zero dimensions count too (NumPy's rule)
    if extent >= 2**63:
        what = f"{extent} bytes" if spec.size else f"an empty array whose non-zero dimensions span {extent} bytes"
        raise FormatError(f"{where}: shape {shape} describes {what}, more than any machine holds")
    return spec


def parse_prelude(buf: memoryview) -> tuple[int, int]:
    if len(buf) < PRELUDE_NBYTES:
        raise FormatError(f"need at least {PRELUDE_NBYTES} bytes for the prelude, got {len(buf)}")
    magic, version, flags, n, header_crc, reserved = _PRELUDE.unpack_from(buf)
    if magic != MAGIC:
        raise FormatError(f"not a cupycodec container: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version > FORMAT_VERSION or version == 0:
        if version == 0:
            raise FormatError("format version 0 does not exist")
        raise UnsupportedVersionError("container format", version, FORMAT_VERSION)
    if flags != 0:
        raise FormatError(f"unknown flags {flags:#06x} for format version {version}")
    if reserved != bytes(4):  # no CRC covers these four bytes: a flip there must not pass unnoticed
        raise FormatError(f"prelude bytes 20-23 must be zero in format version {version}, got {bytes(reserved)!r}")
    if n % 8 or n > MAX_HEADER_NBYTES:
        raise FormatError(f"header length {n} is not a multiple of 8 or exceeds {MAX_HEADER_NBYTES}")
    if PRELUDE_NBYTES + n > len(buf):
        raise FormatError(f"header length {n} overruns the {len(buf)}-byte buffer (truncated?)")
    return n, header_crc


def parse_header(buf: memoryview) -> tuple[Header, int]:
    """Validate prelude, header and chunk tables; return the header and the payload's offset in ``buf``.

    Chunk CRCs are not checked here (see :func:`verify_chunks`). Every reader rule raises FormatError (or a
    subclass) itself, so an exception of any other type from here is a bug in this parser, not a bad file.
    """
    obj, payload_offset = _header_json(buf)
    return _parse_header(obj, buf[payload_offset:]), payload_offset


def header_json(prefix) -> dict:
    """The header of container bytes ``prefix`` (prelude and header, with or without the payload after them) as
    JSON, its prelude, CRC and JSON syntax checked; the rest of the rules need the payload (see :func:`parse_header`).
    """
    return _header_json(memoryview(prefix).cast("B"))[0]


def _finite_float(text: str) -> float:
    """A JSON number with a fraction or exponent; one that overflows to infinity (``1e999``) is refused, as the
    format allows no NaN or Infinity."""
    value = float(text)
    if value in (math.inf, -math.inf):
        raise ValueError(f"number {text[:40]!r} overflows a float")
    return value


def _header_json(buf: memoryview) -> tuple[dict, int]:
    n, header_crc = parse_prelude(buf)
    text = buf[PRELUDE_NBYTES : PRELUDE_NBYTES + n]
    computed = zlib.crc32(text)
    if computed != header_crc:
        raise ChecksumError("header", header_crc, computed)
    obj = parse_json(bytes(text), "header", object_pairs_hook=_no_duplicates, parse_constant=_reject_constant,
                     parse_float=_finite_float)
    if not isinstance(obj, dict):
        raise FormatError(f"header must be a JSON object, got {type(obj).__name__}")
    return obj, PRELUDE_NBYTES + n


def parse_json(raw, what: str, **hooks):
    """``raw`` (UTF-8 bytes, or text) parsed as JSON nested at most _MAX_JSON_DEPTH levels, else FormatError naming
    ``what``; ``hooks`` go to :func:`json.loads`.

    For JSON read from files nobody vouched for (a container's header, a checkpoint's safetensors headers, tables and
    index): each way it fails (bad UTF-8 or syntax, an integer of more digits than Python converts (4,300), nesting
    past the recursion limit) raises this one error, not whichever the json module raises.
    """
    try:
        text = raw if isinstance(raw, str) else raw.decode("utf-8")
        obj = json.loads(text, **hooks)
    except UnicodeDecodeError as exc:
        raise FormatError(f"{what} is not valid UTF-8: {exc}") from exc
    except ValueError as exc:  # JSONDecodeError, Python's limit on an integer's digits, a hook's refusal
        raise FormatError(f"{what} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise FormatError(f"{what} JSON is nested too deeply") from exc
    if text.count("{") + text.count("[") >= _MAX_JSON_DEPTH and _too_deep(obj, 1):  # fewer brackets: no walk
        raise FormatError(f"{what} JSON is nested deeper than {_MAX_JSON_DEPTH} levels")
    return obj


def _parse_header(obj: dict, payload: memoryview) -> Header:
    payload_nbytes = len(payload)

    array = _spec(_field(obj, "array", dict, "header"), "array")
    pipeline = []
    for i, cfg in enumerate(_field(obj, "pipeline", list, "header")):
        if not isinstance(cfg, dict):
            raise FormatError(f"pipeline[{i}] must be an object")
        pipeline.append(_resolved(registry.get_filter, cfg, f"pipeline[{i}]"))
        _has_version(cfg, f"pipeline[{i}]")  # after the id: an unknown filter is the better message
    try:
        expected = derive_specs(array, pipeline)
    except (ValueError, TypeError) as exc:
        raise FormatError(f"pipeline does not apply to the array: {exc}") from exc
    producer = _field(obj, "producer", dict, "header")
    metadata = _field(obj, "metadata", dict, "header")
    mac, mac_alg = _mac_field(obj)

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
        codec = _codec(codec_cfg, where)
        _has_version(codec_cfg, f"{where} codec")
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
        table_bytes = payload[seg_off : seg_off + tnb]
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
    return Header(array, tuple(pipeline), tuple(segments), _freeze(producer), _freeze(metadata), mac, mac_alg)


def _reject_constant(name: str):
    raise FormatError(f"{name} is not valid JSON")


def _too_deep(obj, depth: int) -> bool:
    """Whether ``obj`` (at ``depth`` in a header) nests deeper than _MAX_JSON_DEPTH: walked iteratively, so that
    nesting past Python's recursion limit is answered too (freezing and thawing recurse)."""
    stack = [(obj, depth)]
    while stack:
        value, depth = stack.pop()
        if depth > _MAX_JSON_DEPTH:
            return True
        if isinstance(value, Mapping):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1) for v in value)
    return False


def _check_metadata_depth(metadata) -> None:
    """Raise ValueError unless ``metadata`` (at a header's second level) nests at most _MAX_JSON_DEPTH levels, as
    a reader requires."""
    if _too_deep(metadata, 2):
        raise ValueError(f"metadata is nested too deeply: a header (metadata at its second level) may nest at "
                         f"most {_MAX_JSON_DEPTH} levels")


def _mac_field(obj: Mapping) -> tuple[str | None, str | None]:
    """(mac, alg) of the header's ``auth``, or (None, None) without one. An algorithm this reader does not know
    parses (a reader without the key ignores ``auth``); :func:`check_mac` refuses it."""
    auth = obj.get("auth")
    if auth is None:
        return None, None
    alg = auth.get("alg") if isinstance(auth, dict) else None
    if not isinstance(alg, str) or not 0 < len(alg) <= 64:
        raise FormatError(f"header 'auth' must be {{'alg': one of {list(MAC_ALGS)}, 'mac': <64 hex digits>}}")
    mac = auth.get("mac")
    hexed = isinstance(mac, str) and 0 < len(mac) <= 256 and all(ch in "0123456789abcdef" for ch in mac)
    if not hexed or (alg in MAC_ALGS and len(mac) != 64):
        raise FormatError("header 'auth.mac' must be 64 lowercase hex digits")
    return mac, alg


def _has_version(cfg: dict, where: str) -> None:
    """Every writer stores a filter's or codec's version: a config read without one is not a writer's (a config
    given by hand may omit it, and means version 1). Its range is checked by ``from_config``."""
    if "version" not in cfg:
        raise FormatError(f"{where}: missing 'version' in {cfg!r}")


def _resolved(get, cfg, where):
    try:
        return get(cfg)
    except UnknownCodecError as exc:  # read from a file: a FormatError too, as every reader check
        if isinstance(exc, FormatError):
            raise
        raise UnknownCodecInFileError(exc.codec_id, exc.known, exc.what) from None
    except CupycodecError:
        raise
    except (TypeError, ValueError) as exc:
        raise FormatError(f"{where}: invalid config {cfg!r}: {exc}") from exc


_CODECS = LRU(256)  # codec configs as read -> codec (immutable); a store's chunks repeat a few configs


def _codec(cfg: dict, where: str):
    """``registry.get_codec(cfg)``, remembered per config: the key keeps each value's type, so ``1`` and ``True`` (or
    ``1.0``) are different configs, and a config with unhashable values is simply not remembered."""
    try:
        key = tuple(sorted((k, type(v), v) for k, v in cfg.items()))
        hash(key)
    except TypeError:
        return _resolved(registry.get_codec, cfg, where)
    return _CODECS.get(key, lambda: _resolved(registry.get_codec, cfg, where))


def _check_table(table: ChunkTable, raw_nbytes: int, chunk: int, data_nbytes: int, codec, where: str) -> None:
    raw = geometry(raw_nbytes, chunk)[0]  # uint64, cached
    comp = table.comp_nbytes  # uint32: compared with raw as uint64, exactly
    flags = table.flags
    if flags.size and int(flags.max()) > FLAG_STORED:
        raise FormatError(f"{where}: unknown chunk flag {int(flags.max())}")
    stored = flags == FLAG_STORED
    # stored chunks hold exactly their raw size; encoded ones are non-empty and smaller (one pass, then the message)
    if np.where(stored, comp != raw, (comp == 0) | (comp >= raw)).any():
        if not np.array_equal(comp[stored], raw[stored]):
            raise FormatError(f"{where}: a stored chunk's size differs from its raw size")
        raise FormatError(f"{where}: an encoded chunk is empty or not smaller than its raw size")
    if codec.codec_id == "raw" and not stored.all():
        raise FormatError(f"{where}: an encoded chunk is empty or not smaller than its raw size")
    if table.data_nbytes != data_nbytes:
        raise FormatError(f"{where}: chunks need {table.data_nbytes} bytes but the segment has {data_nbytes}")


def verify_chunks(header: Header, payload: memoryview, executor=None) -> None:
    """Check every chunk's CRC32 against the table (in parallel when an executor is given)."""
    from .backends.cpu import crc32

    jobs = []
    for seg in header.segments:
        offs, sizes, crcs = seg.chunk_offsets, seg.table.comp_nbytes, seg.table.crc32
        for lo in range(0, seg.n_chunks, 256):
            jobs.append((seg.name, lo, offs[lo : lo + 256], sizes[lo : lo + 256], crcs[lo : lo + 256]))

    def check(job):
        name, lo, offs, sizes, crcs = job
        for j, (o, s, c) in enumerate(zip(offs.tolist(), sizes.tolist(), crcs.tolist())):
            got = crc32(payload[o : o + s])
            if got != c:
                raise ChecksumError(name, c, got, chunk=lo + j)

    results = None
    if executor is not None and len(jobs) >= 2:
        from concurrent.futures import BrokenExecutor

        try:
            results = executor.map(check, jobs)  # submits every job before it returns
        except RuntimeError as exc:  # shut down: an atexit handler's verify, after Python shut its pools down
            if isinstance(exc, BrokenExecutor):
                raise
    if results is None:
        for job in jobs:
            check(job)
    else:
        for _ in results:
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
        # "external": bytes from outside (decompress bounds their output by default); "untrusted": external and not
        # vouched for (trusted=True or a valid MAC), so no unhardened decoder may see them; "plans": decode plans of
        # decompress(self, out=...), kept with the container they belong to
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

    @property
    def device_id(self) -> int | None:
        """The CUDA ordinal of a device payload, else None."""
        return None if isinstance(self._payload, memoryview) else int(self._payload.device.id)

    @property
    def trusted(self) -> bool:
        """False for bytes from outside (:meth:`from_bytes`, :func:`~cupycodec.load`) unless the caller vouched for
        them (``trusted=True``) or a MAC under the caller's key matched; True for what this process compressed.

        Untrusted containers are decoded only by decoders hardened against crafted input (docs/DESIGN.md, "Trust")."""
        return not self._cache.get("untrusted", False)

    @property
    def signed(self) -> bool:
        """Whether the container carries a MAC (written by ``save(..., key=...)`` or ``to_bytes(key=...)``)."""
        return self._header.mac is not None

    # -- conversions ------------------------------------------------------------------------------------------
    def to_bytes(self, *, key=None) -> bytes:
        """The container as ``bytes`` (copies a device payload to the host).

        With ``key`` (a secret of at least 16 bytes) the header carries a MAC of the container, so that
        ``from_bytes(blob, key=key)`` can tell it from bytes a third party made (see :func:`cupycodec.save`).
        """
        payload = self.host_payload()
        return self._signed_prefix(key, payload) + bytes(payload)

    def header_bytes(self, *, key=None) -> bytes:
        """The prelude and header, the bytes :meth:`to_bytes` writes before the payload (signed with ``key`` when
        given, which needs the payload's bytes); :meth:`from_parts` takes them back with the payload."""
        return self._signed_prefix(key, self.host_payload() if key is not None else None)

    def _signed_prefix(self, key, payload) -> bytes:
        if key is None:
            return self._prefix
        return self._header.signed(key, payload).encode()

    def host_payload(self) -> memoryview:
        """The payload in host memory (copied from the device if it lives there), its chunk CRCs verified first
        when the container came from :meth:`from_bytes` with ``verify=True`` and no decode has checked them yet."""
        if self._cache.get("headless"):
            raise ValueError("this container holds a header only (without_payload()); it has no bytes to give")
        self.verify()
        return self._host_payload()

    def _host_payload(self) -> memoryview:
        if isinstance(self._payload, memoryview):
            return self._payload
        for seg in self.segments:  # a GPU compression may still be packing the payload on its own stream: its
            seg.table.crc32  # noqa: B018  CRCs are read after an event recorded behind that work, so wait for them
        return memoryview(self._payload.get()).cast("B")

    @property
    def verified(self) -> bool:
        """False while chunk CRCs that ``from_bytes(verify=True)`` deferred are still unchecked.

        The CPU decoder checks each chunk right before decoding it (and marks the container verified once every
        chunk has passed); everything else that hands chunks on (:meth:`to_bytes`, :meth:`write_to`,
        :meth:`host_payload`, :meth:`to_device`, GPU decoding) calls :meth:`verify` first, which checks bytes on a
        GPU there. Containers made in this process, and those read with ``verify=False`` (the caller vouches for the
        bytes), count as verified.
        """
        return not self._cache.get("unverified", False)

    def verify(self) -> CompressedArray:
        """Check every chunk's CRC32 now, if that is still pending (see :attr:`verified`); returns ``self``.

        Raises
        ------
        ChecksumError
            A chunk's bytes do not match their CRC32; the message names the segment and the chunk.
        """
        if self._cache.get("unverified"):
            if isinstance(self._payload, memoryview):
                from .backends import cpu

                verify_chunks(self._header, self._payload, cpu.executor())
                self._cache.pop("unverified", None)
            else:  # on a GPU: checked there, by one CRC launch over every chunk
                from .engine.verify import verify_on_device

                verify_on_device([self], self.device_id)
        return self

    def _release_pages(self):
        """For a memory-mapped file (:func:`cupycodec.load`): a function that drops the mapped pages of payload
        bytes ``[start, end)`` from this process's resident set once decoded (they stay in the page cache and
        are read again from there if needed), so a decode's peak RSS is the output, not file plus output."""
        mapping = self._cache.get("mmap")
        if mapping is None:
            return None
        mm, base = mapping
        return lambda start, end: release_pages(mm, base + start, base + end)

    def write_to(self, f, *, key=None) -> int:
        """Write the container to a binary file object without building one big bytes object."""
        payload = self.host_payload()
        n = f.write(self._signed_prefix(key, payload))
        n += f.write(payload)
        return n

    @classmethod
    def from_bytes(cls, buf, *, verify: bool = True, trusted: bool = False, key=None) -> CompressedArray:
        """Parse and validate a container from a bytes-like object (not copied; keep it unchanged).

        The prelude, the header (CRC and schema) and the chunk tables (CRCs and consistency) are checked here; any
        defect raises :class:`~cupycodec.FormatError` or a subclass (:class:`~cupycodec.ChecksumError`,
        :class:`~cupycodec.UnsupportedVersionError`, and for unknown ids :class:`~cupycodec.UnknownCodecInFileError`,
        also an :class:`~cupycodec.UnknownCodecError`).
        With ``verify=True`` every chunk's CRC32 is checked before the chunk is used: the CPU decoder checks each
        chunk right before decoding it (so a decode reads the container once, and its peak memory is the
        output's), and anything else that hands chunks on (:meth:`to_bytes`, :meth:`to_device`, GPU decoding)
        checks them all first. A corrupt chunk therefore raises :class:`~cupycodec.ChecksumError` at first use,
        never after reaching a decoder; call :meth:`verify` to check everything at once.

        CRCs catch accidents, not forgeries, so the result is *untrusted* (:attr:`trusted`) unless ``trusted=True``
        (you vouch for the bytes) or ``key`` is the secret the container was signed with (its MAC is checked, and
        :class:`~cupycodec.AuthenticationError` raised when it is missing or wrong). Untrusted containers decode
        only through decoders hardened against crafted input: on the CPU, with zstd, deflate, gzip, lz4, snappy or
        raw chunks; anything else raises :class:`~cupycodec.UntrustedError`.
        """
        try:
            mv = memoryview(buf).cast("B")
        except TypeError as exc:
            raise TypeError(f"from_bytes takes a bytes-like object, got {type(buf).__name__}") from exc
        header, payload_offset = parse_header(mv)
        return cls._parsed(header, mv[payload_offset:], bytes(mv[:payload_offset]), verify=verify, trusted=trusted,
                           key=key)

    @classmethod
    def from_parts(cls, prefix, payload, *, verify: bool = True, trusted: bool = False, key=None) -> CompressedArray:
        """As :meth:`from_bytes`, for a container whose prelude and header (``prefix``, bytes-like) are stored
        apart from its payload (a host bytes-like object, not copied): e.g. headers in a file's metadata and
        payloads elsewhere. ``prefix`` must hold exactly the prelude and header, ``payload`` exactly the payload.
        """
        try:
            head = memoryview(prefix).cast("B")
            body = memoryview(payload).cast("B")
        except TypeError as exc:
            raise TypeError(f"from_parts takes bytes-like prefix and payload: {exc}") from exc
        obj, end = _header_json(head)
        if end != len(head):
            raise FormatError(f"the prefix holds {len(head)} bytes, but its prelude says prelude and header take {end}")
        return cls._parsed(_parse_header(obj, body), body, bytes(head), verify=verify, trusted=trusted, key=key)

    @classmethod
    def _parsed(cls, header: Header, payload: memoryview, prefix: bytes, *, verify, trusted, key) -> CompressedArray:
        if not isinstance(trusted, bool):
            raise TypeError(f"trusted must be a bool, got {trusted!r}")
        if key is not None:
            check_mac(key, header, payload)
        c = cls(header, payload, _prefix=prefix)
        if verify and any(seg.n_chunks for seg in header.segments):
            c._cache["unverified"] = True  # checked chunk by chunk as they are decoded, or by verify()
        c._cache["external"] = True  # bytes from outside: decompress bounds the output by default
        if not trusted and key is None:
            c._cache["untrusted"] = True
        return c

    def to_host(self) -> CompressedArray:
        """This container with its payload in host memory (``self`` if it is already there)."""
        if not self.on_device:
            return self
        return self._like(self.host_payload())

    def to_device(self, device=None) -> CompressedArray:
        """This container with its payload in GPU memory (``device``: CUDA ordinal or ``"cuda:N"``; default the
        current device). Chunk CRCs still pending (:attr:`verified`) are checked there, after the copy."""
        from .interop import parse_device

        ordinal = parse_device("cuda" if device is None else device)[1]  # BackendUnavailableError without a GPU
        c = self._copy_to(ordinal)
        if not c.verified:  # pending CRCs are checked on the device, where they are fast
            c.verify()
            self._cache.pop("unverified", None)  # the same bytes
        return c

    def _copy_to(self, ordinal: int) -> CompressedArray:
        """This container over a copy of its payload on device ``ordinal`` (``self`` if it is there), CRCs
        unchecked: callers verify the copy (:meth:`to_device`; GPU decoding checks a batch in one launch)."""
        import cupy

        if self.on_device and self._payload.device.id == ordinal:
            return self
        with cupy.cuda.Device(ordinal):
            if self.on_device:
                payload = cupy.empty_like(self._payload)
                payload.data.copy_from_device_async(self._payload.data, self._payload.nbytes)
            else:
                payload = cupy.asarray(np.frombuffer(self._host_payload(), dtype=np.uint8))
        return self._like(payload)

    def with_payload(self, payload, *, verified: bool = False) -> CompressedArray:
        """This container's header over another copy of its payload bytes, not copied: a uint8 NumPy or CuPy array,
        or any 1-D uint8 buffer a framework owns (a torch tensor, through DLPack). A framework keeps the bytes in its
        own memory (so its allocator counts them) and decodes them through this view. The view keeps the buffer
        alive and has this container's trust.

        The bytes are new to this container, so their chunk CRCs are checked before they are decoded or handed on
        (:attr:`verified` is False), unless ``verified=True``: the caller vouches that they are bytes already
        checked against these CRCs (a copy it made of a verified payload). Before, the view took this container's
        state, so bytes given to an already verified container were decoded unchecked.

        Raises ValueError when the buffer does not hold exactly this container's payload size.
        """
        from .interop import as_array

        if isinstance(payload, (bytes, bytearray, memoryview)):  # as_array reads bytes as one |S string
            payload = np.frombuffer(payload, dtype=np.uint8)
        a = as_array(payload, what="payload")
        arr = a.array
        if arr.dtype != np.uint8 or arr.ndim != 1 or not arr.flags.c_contiguous:
            raise ValueError(f"the payload must be a C-contiguous 1-D uint8 buffer, got {arr.dtype} of shape "
                             f"{arr.shape}")
        if arr.nbytes != self._header.payload_nbytes:
            raise ValueError(f"the payload holds {arr.nbytes} bytes; this container's has "
                             f"{self._header.payload_nbytes}")
        c = self._like(arr if a.on_device else memoryview(arr).cast("B"))
        c._cache["keep"] = a.keep
        if verified:
            c._cache.pop("unverified", None)
        else:
            c._cache["unverified"] = True
        return c

    def without_payload(self) -> CompressedArray:
        """A copy holding this container's header and trust but no payload (so no memory), to be given one later
        with :meth:`with_payload`; it cannot be decoded or written itself."""
        c = self._like(memoryview(b""), self._header.detached())  # a header that keeps no payload alive
        c._cache["headless"] = True
        return c

    def _like(self, payload, header: Header | None = None) -> CompressedArray:
        c = CompressedArray(header or self._header, payload, _prefix=self._prefix)
        for flag in ("external", "untrusted", "unverified"):
            if self._cache.get(flag):
                c._cache[flag] = True
        return c

    def _plan_cache(self) -> OrderedDict:
        """Decode plans of ``decompress(self, out=...)``, newest last (bounded by the caller)."""
        plans = self._cache.get("plans")
        if plans is None:
            plans = self._cache["plans"] = OrderedDict()
        return plans

    # -- protocol ---------------------------------------------------------------------------------------------
    def __eq__(self, other):
        if not isinstance(other, CompressedArray):
            return NotImplemented
        return self._prefix == other._prefix and bytes(self._host_payload()) == bytes(other._host_payload())

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self):
        if self._cache.get("headless"):  # its header (tables included) and trust, as objects: there are no bytes
            flags = tuple(f for f in ("external", "untrusted", "unverified") if self._cache.get(f))
            return (_unpickle_headless, (self._header, self._prefix, flags))
        return (_unpickle, (self.to_bytes(), self.trusted, bool(self._cache.get("external"))))

    def __deepcopy__(self, memo):
        """A header-only container (:meth:`without_payload`) is immutable and holds no memory: its deep copy is
        itself (so a torch model whose layers keep one can be deep-copied); any other is copied with its payload."""
        if self._cache.get("headless"):
            return self
        fn, args = self.__reduce__()
        return fn(*args)

    def __len__(self) -> int:
        """The length of the array's first axis, as ``len()`` of a NumPy array (a 0-d array has none: TypeError, as
        NumPy raises; it made a container of one value falsy)."""
        if not self.shape:
            raise TypeError("len() of a 0-d CompressedArray (one value): it has no first axis")
        return self.shape[0]

    def __bool__(self) -> bool:  # a container is a value, whatever its shape (len() of a 0-d one raises)
        return True

    def __repr__(self):
        lossy = "" if self.lossless else f", pipeline={[f.get_config()['id'] for f in self.pipeline]}"
        return (f"<CompressedArray shape={self.shape} dtype={self.spec.dtype} codec={self.codec!r}{lossy} "
                f"nbytes={self.nbytes} ratio={self.ratio:.3f} device={self.device}>")


def _unpickle_headless(header: Header, prefix: bytes, flags: tuple) -> CompressedArray:
    c = CompressedArray(header, memoryview(b""), _prefix=prefix)
    c._cache["headless"] = True
    for flag in flags:
        c._cache[flag] = True
    return c


def _unpickle(blob: bytes, trusted: bool = True, external: bool = False) -> CompressedArray:
    # A pickle keeps the container's trust: an untrusted container stays untrusted in a DataLoader worker. (A
    # crafted pickle needs no container to run code, so this is about keeping state, not about pickle safety.)
    c = CompressedArray.from_bytes(blob, verify=True, trusted=trusted)
    if not external:
        del c._cache["external"]
    return c
