"""Compression settings: codec and filter arguments parsed into objects, the ``auto`` choice, and chunk sizes."""

from __future__ import annotations

import functools
from collections.abc import Mapping

from . import registry
from ._lru import LRU
from .codecs import Codec
from .dtypes import ArraySpec, is_float
from .errors import UnknownCodecError
from .filters import Filter, Int8

__all__ = ["AUTO_ZSTD_LEVEL", "auto", "check_chunk", "gpu_default_chunk", "parse_codec", "parse_filters", "resolved",
           "segment_chunk"]

AUTO_ZSTD_LEVEL = 1  # on exponent planes zstd-1 beats levels 2-12 (benchmarks/RESULTS.md)
ANS_FLOAT_MODES = ("F16", "BF16", "F32", "F8_E4M3")  # nvCOMP's ANS has a float mode for these: no trial needed
TRIAL_BLOCK = 256 * 1024
TRIAL_MIN_NBYTES = 1 << 20
CPU_FLOAT_CHUNK_NBYTES = 512 * 1024  # CPU zstd defaults (cpu_chunk)
CPU_CHUNK_NBYTES = 128 * 1024
_SMALL_MIN_CHUNKS = 16  # on the GPU, small segments get at least this many chunks ...
_SMALL_MIN_CHUNK_NBYTES = 64 * 1024  # ... of no less than this


def parse_codec(codec, level, options) -> Codec | None:
    """A codec instance, or None for ``codec="auto"``."""
    if type(codec) is str and not options and level is None:  # codecs are immutable: one instance per plain id
        if codec == "auto":
            return None
        return _plain_codec(codec, registry._codecs.get(codec))
    if isinstance(codec, Codec):
        if level is not None or options:
            raise TypeError("pass options either on the Codec instance or as keywords, not both")
        return codec
    if isinstance(codec, Mapping):
        if level is not None or options:
            raise TypeError("pass options either in the codec config or as keywords, not both")
        return registry.get_codec(codec)
    if not isinstance(codec, str):
        raise TypeError(f"codec must be a string id, a config mapping or a Codec, got {type(codec).__name__}")
    if codec == "auto":
        raise TypeError("codec='auto' takes no options; name a codec to pass level or options")
    cls = type(_by_id(codec))
    kwargs = dict(options)
    if level is not None:
        if "level" not in cls.options:
            raise TypeError(f"codec {codec!r} has no level; its options: {', '.join(cls.options) or 'none'}")
        kwargs["level"] = level
    return cls(**kwargs)


@functools.lru_cache(maxsize=64)
def _plain_codec(codec_id: str, cls) -> Codec:
    # keyed by the registered class too, so an id re-registered with replace=True gets its new class
    return _by_id(codec_id)


def _by_id(codec_id: str) -> Codec:
    """The registry's codec; an unknown id's error lists ``auto`` too, which compress takes beside them."""
    try:
        return registry.get_codec(codec_id)
    except UnknownCodecError as exc:
        raise UnknownCodecError(codec_id, [*exc.known, "auto"]) from None


def parse_filters(filters, quantize, granularity, axis, group_size) -> list[Filter]:
    out: list[Filter] = []
    if quantize is not None:
        if quantize != "int8":
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        out.append(Int8(granularity=granularity, axis=axis, group_size=group_size))
    if isinstance(filters, (str, Mapping, Filter)):  # one filter, not a sequence of them (a string's letters)
        filters = [filters]
    for f in filters or ():
        if isinstance(f, Filter):
            out.append(f)
        elif isinstance(f, (str, Mapping)):
            out.append(registry.get_filter(f))
        else:
            raise TypeError(f"filters take Filter instances, ids or config mappings, got {type(f).__name__}")
    return out


def auto(spec: ArraySpec, on_gpu: bool, quantized: bool) -> tuple[Codec, list[Filter]]:
    """The best lossless choice for this data on this machine (measured: benchmarks/RESULTS.md)."""
    if on_gpu:
        return gpu_auto(), []  # ANS picks its float data type from the dtype ('<f2' for bf16/fp16)
    if quantized:
        return cpu_auto(), []
    from ._cpu_auto import candidates

    return cpu_auto(), candidates(spec)[0]  # samples of the data may pick another pipeline (_cpu_auto.choose)


@functools.cache
def cpu_auto() -> Codec:
    """The codec auto picks on a CPU, one instance (its resolutions and chunk sizes memoize on it)."""
    from .codecs import Zstd

    return Zstd(level=AUTO_ZSTD_LEVEL)


@functools.cache
def gpu_auto() -> Codec:
    """The codec auto picks on a GPU: one ANS() for every call (codecs are immutable; its resolutions memoize)."""
    from .codecs import ANS

    return ANS()


def gpu_default_chunk(codec: Codec, nbytes: int) -> int:
    """The GPU's default chunk for a segment of ``nbytes``: the codec's default, smaller for small segments.

    nvCOMP gives each chunk to a few thread blocks, so a 1 MiB array in four 256 KiB ANS chunks leaves most of the
    GPU idle: measured on an H200, 64 KiB chunks cut a 1 MiB ANS round trip by about 100 us (compress) and 17 us
    (decode) for about 2% of ratio (benchmarks/RESULTS.md). Segments under 16 default chunks therefore use the
    largest power-of-two chunk that still gives 16 chunks, but never less than 64 KiB (nor more than the default).
    """
    return segment_chunk(codec.default_chunk(), nbytes)


def segment_chunk(default: int, nbytes: int) -> int:
    """:func:`gpu_default_chunk`'s rule for a segment of ``nbytes`` whose chunks would be ``default`` bytes."""
    if nbytes >= _SMALL_MIN_CHUNKS * default:
        return default
    want = max(_SMALL_MIN_CHUNK_NBYTES, 1 << max(0, (max(nbytes, 1) // _SMALL_MIN_CHUNKS).bit_length() - 1))
    return min(default, want)


def cpu_chunk(codec: Codec, array: ArraySpec) -> int:
    """The CPU's default chunk for a segment of an array of ``array``'s dtype (zstd only; other codecs keep theirs).

    Measured on 2 cores with zstd level 1 (benchmarks/RESULTS.md, issue 10): 512 KiB chunks of float byte planes
    compress better than 64-256 KiB ones (MiniLM bf16 1.458x vs 1.434-1.444x; zstd's parameters for inputs over
    256 KiB) and decode faster (a tenth of the calls). Integer planes lose ratio as chunks grow (sorted int32
    3.827x at 128 KiB, 3.798x at 512 KiB), so integers and bytes get 128 KiB. The GPU keeps the codec's defaults
    (:func:`gpu_default_chunk`); containers record their chunk size, so readers are unaffected.
    """
    if codec.codec_id != "zstd":
        return codec.default_chunk()
    floats = is_float(array.dtype) or array.dtype in ("C64", "C128")
    return CPU_FLOAT_CHUNK_NBYTES if floats else CPU_CHUNK_NBYTES


def check_chunk(chunk_nbytes, codec: Codec, nbytes: int | None = None) -> int:
    """The chunk size to use: the caller's (validated) or the default (the GPU's for ``nbytes`` when given)."""
    if chunk_nbytes is None:
        return codec.default_chunk() if nbytes is None else gpu_default_chunk(codec, nbytes)
    if isinstance(chunk_nbytes, bool) or not isinstance(chunk_nbytes, int):
        raise TypeError(f"chunk_nbytes must be an int, got {chunk_nbytes!r}")
    if chunk_nbytes % 16 or not 16 <= chunk_nbytes <= codec.max_chunk_nbytes:
        raise ValueError(f"chunk_nbytes must be a multiple of 16 between 16 and {codec.max_chunk_nbytes} "
                         f"(16 MiB), got {chunk_nbytes}")
    return chunk_nbytes


def resolved(codec: Codec, spec: ArraySpec) -> Codec:
    """codec.resolve(spec), memoized per codec config, dtype, byte order and size modulo 8 (all that resolving
    looks at; rebuilding a codec from its config costs more than the lookup)."""
    return _RESOLVED.get((codec, spec.dtype, spec.byteorder, spec.nbytes % 8), lambda: codec.resolve(spec))


_RESOLVED = LRU(256)  # codecs hash and compare by their config, so equal configs share entries
