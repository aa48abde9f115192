"""The codec contract: a lossless byte codec with a permanent id, a version and JSON-able options."""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from ..dtypes import ArraySpec
from ..errors import BackendUnavailableError, UnsupportedVersionError

__all__ = ["GPU_ONLY_HINT", "NVCOMP_DATA_TYPES", "Codec", "Option"]

KiB, MiB = 1024, 1024 * 1024

# nvCOMP's nvcompType_t values, keyed by the NumPy array-protocol type strings its Python API uses.
NVCOMP_DATA_TYPES: dict[str, int] = {
    "|i1": 0, "|u1": 1, "<i2": 2, "<u2": 3, "<i4": 4, "<u4": 5, "<i8": 6, "<u8": 7,
    "|f1": 9, "<f2": 10, "<f4": 11, "<f8": 12,
}
_TYPE_SIZE = {t: int(t[2:]) for t in NVCOMP_DATA_TYPES}

GPU_ONLY_HINT = (
    "codecs that decode on any CPU: 'zstd', 'deflate', 'gzip', 'lz4', 'snappy', 'raw' ('gdeflate' and 'bitcomp' too "
    "with nvidia-libnvcomp installed); 'ans' and 'cascaded' need nvCOMP and CuPy on an NVIDIA GPU: "
    "pip install 'cupycodec[cu12]' (or [cu13])"
)


class Option:
    """One codec option: a default and a validator that returns the normalized value or raises ValueError."""

    def __init__(self, default: Any, check: Callable[[Any], Any], doc: str):
        self.default, self.check, self.doc = default, check, doc


def int_range(lo: int, hi: int) -> Callable[[Any], int | None]:
    def check(v):
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"expected an int in [{lo}, {hi}] or None, got {v!r}")
        return int(v)

    return check


def one_of(*allowed: str) -> Callable[[Any], str]:
    def check(v):
        if v not in allowed:
            raise ValueError(f"expected one of {', '.join(map(repr, allowed))}, got {v!r}")
        return v

    return check


class Codec(abc.ABC):
    """A lossless byte codec. Subclasses set ``codec_id``, ``version`` and ``options`` and implement the CPU side.

    One ``codec_id`` names one bitstream format: the CPU implementation (zstandard, zlib, cramjam) and the nvCOMP
    implementation of ``"zstd"`` are one codec with two backends, and each decodes the other's chunks. Every chunk is
    compressed on its own, so chunks decode independently and in parallel on either side.

    Options are keyword arguments validated in ``__init__``; ``get_config()`` returns them as a JSON-able dict that
    ``from_config()`` accepts back (the container stores it per segment).
    """

    codec_id: ClassVar[str]
    version: ClassVar[int] = 1
    options: ClassVar[Mapping[str, Option]] = {}
    #: nvCOMP algorithm name, or None when the codec does not run on the GPU through nvCOMP.
    nvcomp_algorithm: ClassVar[str | None] = None
    #: Whether a CPU implementation exists (encode and decode); see also :meth:`cpu_usable`.
    cpu_supported: ClassVar[bool] = True
    #: Chunk size used when the caller does not pick one (set by measurement: see benchmarks/RESULTS.md).
    default_chunk_nbytes: ClassVar[int] = 64 * KiB
    #: Largest uncompressed chunk nvCOMP accepts for this format (16 MiB caps every format we use).
    max_chunk_nbytes: ClassVar[int] = 16 * MiB
    #: Whether this codec's CPU decoder is hardened against crafted input (fuzzed, bounds-checked libraries), so
    #: untrusted containers may be decoded with it. No GPU decoder is (docs/DESIGN.md, "Trust").
    untrusted_ok: ClassVar[bool] = False

    def __init__(self, **kwargs: Any):
        unknown = set(kwargs) - set(self.options)
        if unknown:
            valid = ", ".join(self.options) or "none"
            raise TypeError(
                f"codec {self.codec_id!r} got unknown option(s) {', '.join(sorted(unknown))}; valid options: {valid}"
            )
        for name, opt in self.options.items():
            value = kwargs.get(name, opt.default)
            try:
                value = opt.check(value)
            except ValueError as exc:
                raise ValueError(f"codec {self.codec_id!r} option {name}: {exc}") from None
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable; build a new codec instead")

    # -- configuration ---------------------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """The JSON-able config stored in the container (options left at ``None`` are omitted)."""
        config: dict[str, Any] = {"id": self.codec_id, "version": self.version}
        for name in self.options:
            value = getattr(self, name)
            if value is not None:
                config[name] = value
        return config

    def config_key(self) -> tuple:
        """``get_config()`` as a hashable tuple, computed once (codecs are immutable); backends key caches on it."""
        key = self.__dict__.get("_config_key")
        if key is None:
            key = tuple(sorted((k, repr(v)) for k, v in self.get_config().items()))
            object.__setattr__(self, "_config_key", key)
        return key

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Codec:
        """Build a codec from ``get_config()`` output; the mapping is not modified."""
        config = dict(config)
        config.pop("id", None)
        version = config.pop("version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"codec {cls.codec_id!r}: version must be an int from 1, got {version!r}")
        if version > cls.version:
            raise UnsupportedVersionError(f"codec {cls.codec_id!r}", version, cls.version)
        return cls(**config)

    def resolve(self, spec: ArraySpec) -> Codec:
        """The concrete codec for a segment: options left on ``"auto"`` are fixed from the segment's dtype.

        Raises ``ValueError`` when an explicit option cannot apply to this segment (e.g. a 4-byte ``data_type`` for a
        segment whose size is not a multiple of 4).
        """
        return self

    @classmethod
    def cpu_usable(cls) -> bool:
        """Whether this codec can run on the CPU here (codecs backed by optional libraries check for them)."""
        return cls.cpu_supported

    def default_chunk(self) -> int:
        """Chunk size to use when the caller picks none (this codec resolved for its segment)."""
        return self.default_chunk_nbytes

    def __eq__(self, other):
        return isinstance(other, Codec) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash(self.config_key())

    def __repr__(self):
        opts = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.options if getattr(self, k) is not None)
        return f"{type(self).__name__}({opts})"

    # -- CPU backend ---------------------------------------------------------------------------------------------
    def encode_chunk(self, src: memoryview) -> bytes:
        """Compress one chunk on the CPU into a standalone stream of this format."""
        raise BackendUnavailableError(f"codec {self.codec_id!r} cannot compress on the CPU; {GPU_ONLY_HINT}")

    def chunk_encoder(self, *, top_plane: bool = False) -> Callable[[memoryview], bytes | None]:
        """:meth:`encode_chunk`, or an equivalent bound to this thread's compression context: the CPU workers
        look it up once per group of chunks rather than once per chunk. ``top_plane``: the chunks are byte plane 0
        of the byteplane filter (a number's most significant byte: a float's sign and exponent), which a codec may
        encode with settings tuned for it; the stream format is the same."""
        return self.encode_chunk

    def decode_chunk_into(self, src: memoryview, dst: memoryview) -> None:
        """Decompress one chunk on the CPU into ``dst``, which it must fill exactly (else raise FormatError)."""
        raise BackendUnavailableError(f"codec {self.codec_id!r} cannot decompress on the CPU; {GPU_ONLY_HINT}")

    def decode_chunk_at(self, src: int, src_nbytes: int, dst: int, dst_nbytes: int) -> bool:
        """Decompress one chunk between raw addresses, exactly filling ``dst``, without taking the GIL per byte.
        True when it did; False (the default: no such decoder) sends the chunk to :meth:`decode_chunk_into`."""
        return False

    # -- nvCOMP backend ----------------------------------------------------------------------------------------
    def nvcomp_params(self) -> dict[str, int | float]:
        """Numeric option values for the nvCOMP low-level opts structs (see backends/nvcomp.py)."""
        return {}


def check_data_type(value: Any) -> str | None:
    if value is None or value == "auto":
        return value
    if value not in NVCOMP_DATA_TYPES:
        raise ValueError(f"expected 'auto' or one of {', '.join(NVCOMP_DATA_TYPES)}, got {value!r}")
    return value


def fit_data_type(codec: Codec, data_type: str, spec: ArraySpec, allowed: tuple[str, ...]) -> str:
    """Check an explicit ``data_type`` against a segment; raise ValueError naming the fix when it cannot apply."""
    if data_type not in allowed:
        raise ValueError(f"codec {codec.codec_id!r} accepts data_type in {', '.join(allowed)}, got {data_type!r}")
    size = _TYPE_SIZE[data_type]
    if spec.nbytes % size:
        raise ValueError(
            f"codec {codec.codec_id!r} data_type={data_type!r} needs a byte count that is a multiple of {size}, "
            f"but the segment holds {spec.nbytes} bytes; use data_type='|u1' or 'auto'"
        )
    return data_type


def natural_data_type(spec: ArraySpec, allowed: tuple[str, ...], floats: bool) -> str:
    """The nvCOMP data type matching a segment's element type, if the codec accepts it, else ``'|u1'``."""
    if spec.byteorder == ">":
        return "|u1"
    by_name = {
        "I8": "|i1", "U8": "|u1", "BOOL": "|u1", "I16": "<i2", "U16": "<u2", "I32": "<i4", "U32": "<u4",
        "I64": "<i8", "U64": "<u8",
    }
    if floats:
        by_name.update({"F16": "<f2", "BF16": "<f2", "F32": "<f4", "F64": "<f8", "F8_E4M3": "|f1"})
    else:  # integer-only codecs see floats as unsigned words of the same width
        by_name.update({"F16": "<u2", "BF16": "<u2", "F32": "<u4", "F64": "<u8", "F8_E4M3": "|u1",
                        "F8_E5M2": "|u1", "C64": "<u4", "C128": "<u8"})
    choice = by_name.get(spec.dtype, "|u1")
    return choice if choice in allowed else "|u1"
