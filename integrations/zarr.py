"""A Zarr v3 array-to-bytes codec (name ``"cupycodec"``) that stores every chunk as a cupycodec container.

Zarr hands a codec its chunks in batches; this codec decodes each batch with one :func:`cupycodec.decompress_many`
(on a GPU, under ``zarr.config.enable_gpu()``, one decode plan for the whole batch) and encodes each with one
:func:`cupycodec.compress_many`. How many chunks a batch holds is zarr's choice (``docs/ZARR.md``, "Batches"):
``zarr.config.set({"codec_pipeline.batch_size": n})``, or zarr >= 3.3's ``FusedCodecPipeline``, which hands over
every chunk of a read at once. On reads the codec fetches the chunks itself (zarr's partial-decode hook), so it
knows each chunk's key, and errors name it.

Registered with zarr when this module is imported and through the ``zarr.codecs`` entry point, so arrays whose
``zarr.json`` names ``"cupycodec"`` open without importing cupycodec first.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

try:
    import zarr
    from zarr.abc.codec import ArrayBytesCodec, ArrayBytesCodecPartialDecodeMixin
    from zarr.core.buffer.cpu import numpy_buffer_prototype
    from zarr.core.common import concurrent_map, parse_named_configuration
    from zarr.core.config import config as _zarr_config
    from zarr.registry import register_codec
    from zarr.storage import StorePath
except ImportError as exc:  # pragma: no cover - exercised only without zarr
    raise ImportError('cupycodec.integrations.zarr needs zarr >= 3.1: pip install "cupycodec[zarr]"') from exc

import numpy as np

import cupycodec as cc
from cupycodec.dtypes import dtype_name
from cupycodec.errors import CupycodecError, UnsupportedDtypeError, prefix_message

from ._chunks import (
    ChunkConfig,
    check_chunk,
    decode_chunks,
    encode_chunks,
    is_device,
    parse_chunk,
    stored_config,
)

if TYPE_CHECKING:
    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer

__all__ = ["CupycodecCodec"]

if tuple(int(p) for p in zarr.__version__.split(".")[:2] if p.isdigit()) < (3, 1):  # ZDType arrived in 3.1
    raise ImportError(f"cupycodec.integrations.zarr needs zarr >= 3.1, found {zarr.__version__}")

NAME = "cupycodec"
_QUANTIZABLE = ("F16", "F32", "BF16")


@dataclass(frozen=True)
class CupycodecCodec(ArrayBytesCodec, ArrayBytesCodecPartialDecodeMixin):
    """Zarr v3 array-to-bytes codec: each chunk a self-describing, checksummed cupycodec container.

    It takes the place of zarr's ``bytes`` serializer (the container records dtype, byte order and shape), so
    use it as ``serializer=`` with ``compressors=None``. Takes the keywords of
    :class:`cupycodec.integrations.numcodecs.Cupycodec`: ``codec`` (``"auto"``: portable byte planes + zstd for
    floats, zstd otherwise), ``level``, ``chunk_nbytes``, ``filters`` (``["byteplane"]``), ``quantize="int8"``
    with ``granularity``/``axis``/``group_size``, ``dtype`` (the logical dtype of an integer array of bit
    patterns, e.g. ``"bfloat16"`` for a uint16 array: zarr has no bfloat16 data type), ``trusted`` (the writer's
    declaration, believed only under :func:`cupycodec.integrations.trust.configure`), and codec options.

    Examples
    --------
    >>> import numpy as np, zarr
    >>> from cupycodec.integrations.zarr import CupycodecCodec
    >>> z = zarr.create_array(store={}, shape=(256, 256), chunks=(64, 64), dtype="float32",
    ...                       serializer=CupycodecCodec(), compressors=None)
    >>> z[:] = np.linspace(0, 1, 256 * 256, dtype=np.float32).reshape(256, 256)
    >>> float(z[3, 5]) == float(np.float32(np.linspace(0, 1, 256 * 256, dtype=np.float32)[3 * 256 + 5]))
    True
    """

    is_fixed_size = False
    config: ChunkConfig

    def __init__(self, *, codec: str = "auto", level: int | None = None, chunk_nbytes: int | None = None,
                 filters: list | None = None, quantize: str | None = None, granularity: str = "channel",
                 axis: int = 0, group_size: int = 128, dtype: str | None = None, trusted: bool = False, **options):
        object.__setattr__(self, "config", ChunkConfig(
            codec=codec, level=level, chunk_nbytes=chunk_nbytes, filters=filters, quantize=quantize,
            granularity=granularity, axis=axis, group_size=group_size, dtype=dtype, trusted=trusted, **options))

    # -- metadata ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CupycodecCodec:
        _, configuration = parse_named_configuration(data, NAME, require_configuration=False)
        return cls(**stored_config(configuration or {}))

    def to_dict(self) -> dict[str, Any]:
        return {"name": NAME, "configuration": self.config.to_json()}

    def validate(self, *, shape, dtype, chunk_grid) -> None:
        """Refuse, when the array is created, data types that the container cannot hold or the options cannot use."""
        native = dtype.to_native_dtype()
        try:
            name = dtype_name(native)[0]
        except UnsupportedDtypeError as exc:
            raise TypeError(f"the cupycodec codec cannot store zarr data type {dtype}: {exc}") from exc
        logical = self.config.dtype
        if logical is not None:
            import ml_dtypes  # noqa: F401  # "bfloat16" and the float8 names as NumPy dtypes

            want = np.dtype(logical)
            if native.kind not in "ui" or native.itemsize != want.itemsize:
                raise TypeError(f"dtype={logical!r} reinterprets integer chunks of {want.itemsize} bytes (e.g. "
                                f"uint{8 * want.itemsize}); this array's data type is {native}")
            name = dtype_name(want)[0]
        words = native.itemsize // 2 if native.kind == "c" else native.itemsize  # as the core splits complex types
        if _uses_filter(self.config, "byteplane") and words not in (2, 4, 8):
            raise TypeError(f"filters=['byteplane'] splits 2-, 4- or 8-byte words (complex numbers by component); "
                            f"this array's data type is {native}: drop the filter")
        if self.config.quantize is not None and name not in _QUANTIZABLE:
            raise TypeError(f"quantize={self.config.quantize!r} takes float32, float16 or bfloat16 chunks, got "
                            f"{name}; store bfloat16 as uint16 with dtype='bfloat16'")
        ndim = len(shape)
        if self.config.quantize is not None and self.config.granularity == "channel" and ndim and \
                not -ndim <= self.config.axis < ndim:  # else every write would fail
            raise ValueError(f"axis={self.config.axis} is out of range for this {ndim}-D array (axes {-ndim} to "
                             f"{ndim - 1})")
        self._try_options(native, tuple(getattr(chunk_grid, "chunk_shape", shape)))

    def _try_options(self, native: np.dtype, chunk_shape: tuple) -> None:
        """Compress a few zeros of this array's dtype and dimensions with the chunk options (filters, quantization,
        logical dtype; raw chunks, as the codec itself does not change what they accept), so that options every write
        would refuse (an ``int8`` filter on integers, an axis out of range, a channel scale of a 0-d array) are
        refused when the array is made."""
        kw = self.config._core_kwargs("raw", list(self.config.filters or ()), codec_options=False)
        try:
            cc.compress(np.zeros(tuple(min(int(n), 2) for n in chunk_shape), native), **kw)
        except (CupycodecError, ValueError, TypeError) as exc:
            prefix_message(exc, f"every write of this array would fail (the codec's options on a {native} chunk "
                                f"of shape {chunk_shape})")
            raise

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError("compressed chunk sizes depend on the data")

    # -- batched encode and decode (zarr calls these with a batch of chunks) ----------------------------------------
    async def encode(self, chunks_and_specs) -> list[Buffer | None]:
        """Encode a batch of chunks with one :func:`cupycodec.compress_many` (in a worker thread)."""
        batch = list(chunks_and_specs)
        return await asyncio.to_thread(self._encode_batch, batch)

    async def decode(self, chunks_and_specs) -> list[NDBuffer | None]:
        """Decode a batch of chunk bytes with one :func:`cupycodec.decompress_many` (in a worker thread).

        Zarr calls this when it fetched the bytes itself (pipelines with other codecs, read-modify-write of partial
        chunks), so errors name the chunk's position in the batch, not its key.
        """
        batch = list(chunks_and_specs)
        wheres = [f"chunk {i} of a batch of {len(batch)} (zarr did not pass its key)" for i in range(len(batch))]
        return await asyncio.to_thread(self._decode_batch, [b for b, _ in batch], [s for _, s in batch], wheres)

    async def decode_partial(self, batch_info) -> list[NDBuffer | None]:
        """Fetch and decode a batch of chunks (zarr's partial-decode hook): the bytes concurrently, then one
        :func:`cupycodec.decompress_many` for all of them; returns each chunk's selected region."""
        batch = list(batch_info)
        fetched = await concurrent_map([(g, s) for g, _, s in batch], _fetch, _zarr_config.get("async.concurrency"))
        wheres = [_where(g) for g, _, _ in batch]
        decoded = await asyncio.to_thread(self._decode_batch, fetched, [s for _, _, s in batch], wheres)
        return [None if nd is None else nd[sel] for nd, (_, sel, _) in zip(decoded, batch)]

    # No _decode_sync/_encode_sync on purpose: with them, zarr >= 3.3's FusedCodecPipeline would decode chunk by
    # chunk in its thread pool; without them it hands every chunk of a read to decode_partial at once.

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        return (await self.encode([(chunk_array, chunk_spec)]))[0]

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return (await self.decode([(chunk_bytes, chunk_spec)]))[0]

    # -- the work, in a worker thread ---------------------------------------------------------------------------------
    def _encode_batch(self, batch: list) -> list[Buffer | None]:
        idx = [i for i, (nd, _) in enumerate(batch) if nd is not None]
        try:
            blobs = encode_chunks(self.config, [batch[i][0].as_ndarray_like() for i in idx])
        except (CupycodecError, ValueError) as exc:
            fill = batch[idx[0]][1].fill_value if idx else 0
            int8 = self.config.quantize is not None or _uses_filter(self.config, "int8")
            if int8 and not _finite(fill, self.config.dtype):
                # Not refused when the array is made: zarr checks codecs on every open, and an existing array
                # whose chunks were all written whole reads fine.
                prefix_message(exc, f"this array's fill_value {fill!r} is not finite, and zarr pads edge chunks "
                                    "and the unwritten parts of chunks with it, which INT8 cannot quantize: make "
                                    "the array with a finite fill_value (e.g. 0), or with a shape that is a multiple "
                                    "of the chunk shape, writing whole chunks only")
            raise
        out: list[Buffer | None] = [None] * len(batch)
        for i, blob in zip(idx, blobs):
            out[i] = batch[i][1].prototype.buffer.from_bytes(blob)
        return out

    def _decode_batch(self, bufs: list, specs: list, wheres: list[str]) -> list[NDBuffer | None]:
        idx = [i for i, b in enumerate(bufs) if b is not None]
        items, outs, nds, arrs = [], [], [], []
        for i in idx:
            spec, where = specs[i], wheres[i]
            c = parse_chunk(self.config, bufs[i].as_numpy_array(), where)  # host bytes: a copy only from a GPU
            native = spec.dtype.to_native_dtype()
            check_chunk(c, spec.shape, native, self.config.dtype, where)
            nd = spec.prototype.nd_buffer.create(shape=spec.shape, dtype=native, order=spec.order)
            arr = nd.as_ndarray_like()
            # Decode straight into zarr's buffer when the core can write it (a GPU takes integer bit views of
            # bf16; the host wants the logical dtype); otherwise into a fresh array, copied in below.
            direct = arr.flags.c_contiguous and (is_device(arr) or arr.dtype == c.dtype)
            items.append(c)
            outs.append(arr if direct else None)
            nds.append(nd)
            arrs.append(arr)
        device = "cuda" if arrs and is_device(arrs[0]) else "cpu"
        results = decode_chunks(items, outs, [wheres[i] for i in idx], device) if items else []
        out: list[NDBuffer | None] = [None] * len(bufs)
        for i, nd, arr, o, res in zip(idx, nds, arrs, outs, results):
            if o is None:  # assignment converts byte order; a bf16 result goes into its integer array as bits,
                # read in the result's own byte order (a big-endian array's chunks decode big-endian)
                native = arr.dtype.newbyteorder("=")
                if res.dtype.newbyteorder("=") != native:
                    order = res.dtype.byteorder if res.dtype.byteorder in "<>" else "="
                    res = res.view(native.newbyteorder(order))
                arr[...] = res
            out[i] = nd
        return out


def _uses_filter(config, fid: str) -> bool:
    """Whether the chunks' filters name ``fid`` (as an id, or a config dict with that id)."""
    return any(f == fid or (isinstance(f, dict) and f.get("id") == fid) for f in config.filters or ())


def _finite(fill, logical: str | None) -> bool:
    """Whether a fill value is finite as the chunks' values (bit patterns of ``logical`` in integer arrays)."""
    value = np.asarray(fill)
    if logical is not None and value.dtype.kind in "ui":
        import ml_dtypes  # noqa: F401  # "bfloat16" and the float8 names as NumPy dtypes

        value = value.astype(value.dtype.newbyteorder("=")).view(np.dtype(logical))
    return bool(np.isfinite(value.astype(np.float64)).all())


async def _fetch(getter, spec):
    # Chunks of a store are read into host memory whatever zarr's buffer prototype (the container's header is
    # parsed on the host; a GPU decode uploads the payload once). Byte getters of a shard hold their bytes already
    # and accept only zarr's default prototype.
    proto = numpy_buffer_prototype() if isinstance(getter, StorePath) else spec.prototype
    return await getter.get(prototype=proto)


def _where(getter) -> str:
    if isinstance(getter, StorePath):
        return f"chunk {str(getter)!r}"
    coords = getattr(getter, "chunk_coords", None)
    return f"chunk {coords} of a shard" if coords is not None else f"chunk {getter!r}"


register_codec(NAME, CupycodecCodec)
