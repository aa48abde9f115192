"""Chunk coding shared by the numcodecs and Zarr codecs: the configuration, batched calls into the core, and errors
that name the chunk.

Both codecs store one cupycodec container per chunk (``CompressedArray.to_bytes()``), so every chunk is
self-describing and checksummed, and decoding needs nothing from the configuration but the reader's trust policy
(:mod:`cupycodec.integrations.trust`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import cupycodec as cc
from cupycodec.errors import AuthenticationError, CupycodecError, FormatError, UntrustedError

from . import trust

__all__ = ["ChunkConfig", "at", "decode_chunks", "encode_chunks", "is_device", "parse_chunk"]

_TRUST_HINT = ("; for a store or buffer you wrote yourself, set trusted: true in the codec configuration and "
               "call cupycodec.integrations.trust.configure(trusted='metadata'), or sign and verify chunks with "
               "trust.configure(key=...) (docs/ZARR.md, 'Trust')")


def _filter_json(f) -> dict:
    """A filter config as plain JSON (a mapping, or a cupycodec Filter instance)."""
    config = f.get_config() if hasattr(f, "get_config") else f
    if not isinstance(config, Mapping):
        raise TypeError(f"filters take ids, config mappings or Filter instances, got {type(f).__name__}")
    return json.loads(json.dumps(dict(config)))


def _json_scalar(name: str, value):
    if value is not None and not isinstance(value, (bool, int, float, str)):
        raise TypeError(f"codec option {name}={value!r} is not a JSON scalar")
    return value


def _optional_int(name: str, value):
    """``value`` as a Python int (a NumPy integer too, as the core takes one), or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):  # np.bool_ is neither
        raise TypeError(f"{name} must be an int or None, got {value!r}")
    return int(value)


def _python_int(value):
    """A NumPy integer as a Python int (JSON takes only those); anything else as it is, for the core to check."""
    return int(value) if isinstance(value, np.integer) else value


class ChunkConfig:
    """A validated, immutable codec configuration: what the writer asked for, in canonical JSON form.

    Takes the keywords of :func:`cupycodec.compress` that make sense per chunk, plus ``trusted`` (the writer's
    declaration that the chunks may be decoded as trusted; see :mod:`cupycodec.integrations.trust`). Unknown
    keywords are codec options (``data_type="<f2"`` for ``ans``) and are checked by the codec class.

    ``codec="auto"`` is the *portable* lossless choice on any device, which every reader decodes (CPU or GPU,
    trusted or not): on the CPU the core's ``auto`` (byte planes + zstd level 1 or plain zstd level 1, whichever
    compresses samples of the chunk smaller; raw where that is smaller still), on a GPU byte planes + zstd (level 1)
    for floats and zstd otherwise. Unlike :func:`cupycodec.compress`'s ``auto`` it never picks an NVIDIA-only
    format on a GPU: a store outlives the machine that wrote it.
    """

    __slots__ = ("_json", "axis", "chunk_nbytes", "codec", "dtype", "filters", "granularity", "group_size", "level",
                 "options", "quantize", "trusted")

    def __init__(self, codec: str = "auto", level: int | None = None, chunk_nbytes: int | None = None,
                 filters: Sequence | None = None, quantize: str | None = None, granularity: str = "channel",
                 axis: int = 0, group_size: int = 128, dtype: str | None = None, trusted: bool = False, **options):
        if not isinstance(codec, str):
            raise TypeError(f"codec must be a codec id string such as 'zstd' or 'auto', got {codec!r}")
        if not isinstance(trusted, bool):
            raise TypeError(f"trusted must be a bool, got {trusted!r}")
        if dtype is not None:
            if not isinstance(dtype, str):
                raise TypeError(f"dtype must be a dtype name such as 'bfloat16', got {dtype!r}")
            import ml_dtypes  # noqa: F401  # "bfloat16" and the float8 names as NumPy dtypes

            try:
                np.dtype(dtype)
            except TypeError as exc:
                raise TypeError(f"dtype={dtype!r} is not a NumPy (or ml_dtypes) dtype name") from exc
        if filters is not None:
            if isinstance(filters, (str, Mapping)) or not isinstance(filters, Sequence):
                raise TypeError(f"filters must be a list of filter ids or configs, got {filters!r}")
            filters = tuple(f if isinstance(f, str) else _filter_json(f) for f in filters)
        set_ = object.__setattr__
        set_(self, "codec", codec)
        set_(self, "level", _optional_int("level", level))
        set_(self, "chunk_nbytes", _optional_int("chunk_nbytes", chunk_nbytes))
        set_(self, "filters", filters or None)
        set_(self, "quantize", quantize)
        set_(self, "granularity", granularity)
        # NumPy integers (arr.ndim - 1) as Python ints: stored in the array's JSON metadata
        set_(self, "axis", _python_int(axis))
        set_(self, "group_size", _python_int(group_size))
        set_(self, "dtype", dtype)
        set_(self, "trusted", trusted)
        set_(self, "options", {k: _json_scalar(k, v) for k, v in sorted(options.items())})
        # Parsing through the core's Compressor reports unknown codecs/filters and bad options here, when the
        # array is created (or its metadata read), not at the first chunk.
        cc.Compressor(**self._core_kwargs(codec, list(self.filters or ())))
        set_(self, "_json", json.dumps(self.to_json(), sort_keys=True))

    def __setattr__(self, name, value):
        raise AttributeError("ChunkConfig is immutable")

    def __reduce__(self):  # pickles (Dask, multiprocessing) carry the JSON form and validate it again
        return (_from_json, (self.to_json(),))

    def _core_kwargs(self, codec: str, filters: list, codec_options: bool = True) -> dict[str, Any]:
        """Keywords of :func:`cupycodec.compress`; ``codec_options=False`` leaves out the level and the codec's own
        options (for another codec than the configured one)."""
        kw: dict[str, Any] = {"codec": codec, "level": self.level if codec_options else None,
                              "chunk_nbytes": self.chunk_nbytes, "filters": filters or None, "quantize": self.quantize,
                              "granularity": self.granularity, "axis": self.axis, "group_size": self.group_size,
                              "dtype": self.dtype, **(self.options if codec_options else {})}
        return kw

    def to_json(self) -> dict[str, Any]:
        """The configuration as JSON: ``codec`` and ``trusted`` always, every other key only when it is set."""
        out: dict[str, Any] = {"codec": self.codec, "trusted": self.trusted}
        for name in ("level", "chunk_nbytes", "dtype"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.filters:
            out["filters"] = list(self.filters)
        if self.quantize is not None:
            out["quantize"] = self.quantize
            out["granularity"] = self.granularity
            if self.granularity == "channel":
                out["axis"] = self.axis
            elif self.granularity == "group":
                out["group_size"] = self.group_size
        out.update(self.options)
        return out

    def __eq__(self, other):
        return isinstance(other, ChunkConfig) and self._json == other._json

    def __hash__(self):
        return hash(self._json)

    def __repr__(self):
        return f"ChunkConfig({', '.join(f'{k}={v!r}' for k, v in self.to_json().items())})"

    def compress_kwargs(self, on_device: bool, dtype) -> dict[str, Any]:
        """Keywords for :func:`cupycodec.compress_many` on host or device chunks of ``dtype`` (a NumPy dtype)."""
        filters = list(self.filters or ())
        if self.codec != "auto":
            return self._core_kwargs(self.codec, filters)
        if not on_device:  # the core's CPU auto is already portable (and never bigger than raw)
            return self._core_kwargs("auto", filters)
        # The core's GPU auto picks ANS (NVIDIA-only); the portable choice is the CPU's, written on the GPU.
        if not filters and self.quantize is None and _float_like(self.dtype or dtype):
            filters = ["byteplane"]
        kw = self._core_kwargs("zstd", filters)
        if self.level is not None:  # nvCOMP has no levels: only one the user set is passed on (and warned about)
            kw["level"] = self.level
        return kw


def _from_json(config: dict) -> ChunkConfig:
    return ChunkConfig(**config)


def stored_config(config: Mapping) -> dict:
    """A configuration read from an array's metadata, less the keys this cupycodec does not know (a newer writer's
    options), with a warning: a store stays readable after another writer used an option added later (each chunk's
    container says how it was made), where ``ChunkConfig(**config)`` would refuse the key as a typo."""
    import inspect
    import warnings

    # its own keywords, the core's (backend=, which it passes on) and the codec's options
    known = (set(inspect.signature(ChunkConfig).parameters) | set(inspect.signature(cc.Compressor).parameters)) - \
        {"options"}
    codec = config.get("codec", "auto")
    cls = cc.registry.registered_codecs().get(codec) if isinstance(codec, str) else None
    known |= set(cls.options) if cls is not None else set()
    unknown = [repr(k) for k in sorted(config) if k not in known]
    out = {k: v for k, v in config.items() if k in known}
    if isinstance(out.get("filters"), list):  # a filter's options likewise ({"id": "byteplane", ...})
        filters = cc.registry.registered_filters()
        out["filters"] = [_known_filter_options(f, filters, unknown) for f in out["filters"]]
    if unknown:
        warnings.warn(f"cupycodec codec configuration: {', '.join(unknown)} ignored (not an option of this "
                      "cupycodec: a typo, or a newer writer's; chunks still decode, as each says how it was made; "
                      "chunks written now go without it: upgrade cupycodec to keep it)", stacklevel=3)
    return out


def _known_filter_options(f, filters: dict, unknown: list) -> Any:
    """A filter's stored configuration less the options its class does not take (named in ``unknown``)."""
    cls = filters.get(f.get("id")) if isinstance(f, Mapping) and isinstance(f.get("id"), str) else None
    if cls is None:
        return f  # an id or an unknown filter: ChunkConfig names it
    allowed = {"id", "version", *cls.option_names()}
    unknown += [f"{f['id']}.{k}" for k in sorted(f) if k not in allowed]
    return {k: v for k, v in f.items() if k in allowed}


def _float_like(dtype) -> bool:
    from cupycodec.dtypes import dtype_name, is_float

    if isinstance(dtype, str):
        import ml_dtypes  # noqa: F401  # registers "bfloat16" and the float8 names with NumPy
    name = dtype_name(np.dtype(dtype))[0]
    return (is_float(name) and not name.startswith("FLD")) or name in ("C64", "C128")


def is_device(arr) -> bool:
    """Whether ``arr`` lives in GPU memory (CuPy, a CUDA torch tensor, any ``__cuda_array_interface__``)."""
    return hasattr(arr, "__cuda_array_interface__")


# -- errors ------------------------------------------------------------------------------------------------------


def at(exc: CupycodecError, where: str) -> CupycodecError:
    """The same error (same class, same attributes, so ``except cc.ChecksumError`` still works) with a message
    that starts with ``where`` (the chunk's key) and, for untrusted chunks, says how a reader opts in."""
    new = type(exc).__new__(type(exc))
    new.__dict__.update(exc.__dict__)
    text = f"{where}: {exc}"
    if isinstance(exc, UntrustedError):  # the core's fix (from_bytes/load arguments) is not a zarr reader's
        text = (f"{where}: this chunk is untrusted, and codec {exc.codec!r} has no decoder hardened against "
                f"crafted input, so cupycodec will not decode it{_TRUST_HINT}")
    elif isinstance(exc, AuthenticationError) and exc.unsigned:  # the same: the core's fix names load() arguments
        text = (f"{where}: this chunk carries no MAC, so the key set with trust.configure(key=...) cannot "
                "authenticate it (it was written without a key): read it with trust.configure(key=None) (as "
                "untrusted, or trusted='metadata' for a store you wrote), or write it again under the key "
                "(docs/ZARR.md, 'Trust')")
    new.args = (text,)
    new.chunk_key = where
    return new


def parse_chunk(cfg: ChunkConfig, blob, where: str) -> cc.CompressedArray:
    """Validate one stored chunk (every CRC, and the MAC when a key is set) under the reader's trust policy."""
    policy = trust.current()
    try:
        if policy.key is not None:
            return cc.CompressedArray.from_bytes(blob, key=policy.key)
        return cc.CompressedArray.from_bytes(blob, trusted=policy.chunk_trusted(cfg.trusted))
    except CupycodecError as exc:
        raise at(exc, where) from exc


def check_chunk(c: cc.CompressedArray, shape: tuple, dtype: np.dtype, logical: str | None, where: str) -> None:
    """Raise FormatError unless container ``c`` holds what the array's metadata says this chunk holds."""
    want = np.dtype(logical) if logical is not None else dtype
    # Byte order is a storage detail (zarr may hand a big-endian array's chunks over in native order): compare types.
    if tuple(c.shape) != tuple(shape) or c.dtype.newbyteorder("=") != want.newbyteorder("="):
        raise at(FormatError(f"the chunk holds {c.dtype} of shape {tuple(c.shape)}, but the array's metadata says "
                             f"{want} of shape {tuple(shape)}; the chunk belongs to another array or was replaced"),
                 where)


# -- batched calls -------------------------------------------------------------------------------------------------


def encode_chunks(cfg: ChunkConfig, arrays: list) -> list[bytes]:
    """Compress every array of a batch with one :func:`cupycodec.compress_many` per location; container bytes out
    (signed when the trust policy holds a key)."""
    key = trust.current().key
    out: list[bytes | None] = [None] * len(arrays)
    for on_device in (False, True):
        idx = [i for i, a in enumerate(arrays) if is_device(a) == on_device]
        if not idx:
            continue
        kw = cfg.compress_kwargs(on_device, arrays[idx[0]].dtype)
        for i, c in zip(idx, cc.compress_many([arrays[i] for i in idx], **kw)):
            out[i] = c.to_bytes(key=key)
    return out  # type: ignore[return-value]


def decode_chunks(items: list[cc.CompressedArray], outs: list, wheres: list[str], device: str = "auto") -> list:
    """Decode a batch with one :func:`cupycodec.decompress_many` (on a GPU: one decode plan for all of it).

    ``outs`` holds a buffer (or None) per item; ``device`` places the results that have none. A failure is
    attributed to its chunk: decoding the items one by one, in order, finds the first that fails
    alone (routing errors, the common case, fail before any work is done).
    """
    try:
        return cc.decompress_many(items, out=outs, device=device)
    except CupycodecError as exc:
        if len(items) == 1:
            raise at(exc, wheres[0]) from exc
        for item, o, where in zip(items, outs, wheres):
            try:
                cc.decompress(item, out=o, device=device)
            except CupycodecError as one:
                raise at(one, where) from one
        raise at(exc, f"one of {len(items)} chunks ({wheres[0]} ...)") from exc
