"""A numcodecs codec (``codec_id="cupycodec"``) whose encoded buffers are cupycodec containers.

Registered with numcodecs when this module is imported and, for an installed cupycodec, through the
``numcodecs.codecs`` entry point, so ``numcodecs.get_codec({"id": "cupycodec", ...})`` works in a fresh interpreter
(and Zarr format 2 arrays name it as their compressor). For Zarr format 3 use :mod:`cupycodec.integrations.zarr`,
which batches chunks and names the chunk in its errors.
"""

from __future__ import annotations

try:
    import numcodecs
    from numcodecs.abc import Codec as _NumcodecsCodec
    from numcodecs.compat import ensure_contiguous_ndarray, ensure_ndarray_like, ndarray_copy
except ImportError as exc:  # pragma: no cover - exercised only without numcodecs
    raise ImportError('cupycodec.integrations.numcodecs needs numcodecs: pip install "cupycodec[zarr]"') from exc

import numpy as np

from ._chunks import (
    ChunkConfig,
    _from_json,
    decode_chunks,
    encode_chunks,
    is_device,
    parse_chunk,
    stored_config,
)

__all__ = ["Cupycodec"]

_WHERE = "numcodecs buffer"  # numcodecs hands a codec bytes, never the key they came from


class Cupycodec(_NumcodecsCodec):
    """Compress buffers into self-describing, checksummed cupycodec containers (NumPy on the CPU, CuPy on the GPU).

    Every encoded buffer records its dtype, shape and codec, so decoding needs no configuration; the configuration
    says how to *encode*, plus the writer's ``trusted`` declaration.

    Parameters
    ----------
    codec : str
        ``"auto"`` (portable: byte planes + zstd for floats, zstd otherwise, on any device; every reader decodes
        it) or a codec id (``"zstd"``, ``"lz4"``, ``"deflate"``, ..., or the NVIDIA-only ``"ans"``,
        ``"cascaded"``, ``"bitcomp"``, ``"gdeflate"``, which only trusted readers with nvCOMP decode).
    level : int, optional
        Compression level for codecs that have one.
    chunk_nbytes : int, optional
        Bytes per independently coded chunk *inside* a container (multiple of 16, at most 16 MiB).
    filters : list, optional
        Stages before the codec, e.g. ``["byteplane"]`` (lossless exponent-aware byte planes for floats).
    quantize : {None, "int8"}
        Lossy INT8 quantization with ``granularity`` (``"channel"`` along ``axis``, ``"group"`` of
        ``group_size`` along the last axis, or ``"tensor"``); decoding returns the dequantized floats.
    dtype : str, optional
        The logical dtype of integer bit views, e.g. ``"bfloat16"`` for uint16 buffers holding bf16 bits.
    trusted : bool
        The writer's declaration that these buffers may be decoded as trusted (by nvCOMP's GPU decoders and the
        NVIDIA-only formats). Readers believe it only under ``trust.configure(trusted="metadata")``; see
        :mod:`cupycodec.integrations.trust`.
    **options
        Codec options, e.g. ``data_type="<f2"`` for ``ans``.

    Examples
    --------
    >>> import numpy as np, numcodecs
    >>> from cupycodec.integrations.numcodecs import Cupycodec
    >>> codec = Cupycodec(codec="zstd", level=3)
    >>> x = np.linspace(0, 1, 1000, dtype=np.float32)
    >>> np.array_equal(codec.decode(codec.encode(x)), x)
    True
    >>> numcodecs.get_codec(codec.get_config()) == codec
    True
    """

    codec_id = "cupycodec"

    def __init__(self, codec: str = "auto", level: int | None = None, chunk_nbytes: int | None = None,
                 filters: list | None = None, quantize: str | None = None, granularity: str = "channel",
                 axis: int = 0, group_size: int = 128, dtype: str | None = None, trusted: bool = False, **options):
        self._config = ChunkConfig(codec=codec, level=level, chunk_nbytes=chunk_nbytes, filters=filters,
                                   quantize=quantize, granularity=granularity, axis=axis, group_size=group_size,
                                   dtype=dtype, trusted=trusted, **options)

    def get_config(self) -> dict:
        """``{"id": "cupycodec", "codec": ..., "trusted": ..., ...}``: JSON, only the options that are set."""
        return {"id": self.codec_id, **self._config.to_json()}

    @classmethod
    def from_config(cls, config) -> Cupycodec:
        config = dict(config)  # never mutate the caller's dict
        config.pop("id", None)
        return cls(**stored_config(config))

    def __reduce__(self):  # pickles (Dask, multiprocessing) carry the configuration, nothing else
        return (_from_config, (self.get_config(),))

    def __repr__(self):
        return f"Cupycodec({', '.join(f'{k}={v!r}' for k, v in self._config.to_json().items())})"

    def encode(self, buf):
        """Compress ``buf`` (any buffer-protocol object, or a device array) into container bytes.

        The container records the array's dtype and shape; a Fortran-ordered array is stored as its bytes in memory
        order (1-D), so that decoding gives back the same bytes, as numcodecs codecs do.
        """
        if is_device(buf):
            import cupy

            arr = cupy.asarray(buf)
        else:
            arr = ensure_ndarray_like(buf)
        cfg = self._config
        if arr.flags.f_contiguous and not arr.flags.c_contiguous:
            if cfg.quantize is None:
                arr = arr.T.reshape(-1)  # a C-contiguous view of the same memory
            else:  # quantized along the array's own axes: its transpose holds the same bytes, axes reversed
                if cfg.granularity == "group":
                    raise ValueError("int8 group quantization runs along an array's last axis, which a "
                                     "Fortran-ordered chunk (zarr format 2, order='F') holds first in memory: "
                                     "store the array in C order, or quantize per channel")
                arr = arr.T
                if cfg.granularity == "channel" and arr.ndim:
                    # flattened to 1-D, as before, "per channel" became a scale per element (16,328 bytes for a
                    # 64 x 64 float32 chunk, against 4,952 in C order)
                    cfg = _from_json({**cfg.to_json(), "axis": arr.ndim - 1 - cfg.axis % arr.ndim})
        return encode_chunks(cfg, [arr])[0]

    def decode(self, buf, out=None):
        """Decode container bytes into an array (into ``out`` when given, which is returned).

        ``buf`` may also be a device array of the bytes; then the result is a device array too. ``out`` may be any
        writable buffer of the decoded size (its own dtype and shape are kept: the bytes are copied in).
        """
        if is_device(buf):
            import cupy

            blob = cupy.asnumpy(cupy.asarray(buf)).reshape(-1).view(np.uint8)
        else:
            blob = ensure_contiguous_ndarray(buf).view(np.uint8)
        c = parse_chunk(self._config, blob, _WHERE)
        on_device = is_device(out) if out is not None else is_device(buf)
        device = "cuda" if on_device else "auto"
        if out is None:
            return decode_chunks([c], [None], [_WHERE], device)[0]
        if on_device:
            import cupy

            dst = cupy.asarray(out)
        else:
            dst = ensure_ndarray_like(out)
        if dst.dtype == object:
            raise TypeError("cannot decode into an object array; pass a numeric buffer or out=None")
        if dst.shape == c.shape and dst.dtype == c.dtype and dst.flags.c_contiguous:
            decode_chunks([c], [dst], [_WHERE])
            return out
        res = decode_chunks([c], [None], [_WHERE], device)[0]
        if res.nbytes != dst.nbytes:
            raise ValueError(f"out holds {dst.nbytes} bytes, the decoded buffer {res.nbytes} ({res.dtype}, "
                             f"shape {res.shape}); pass a buffer of the decoded size or out=None")
        if not on_device:
            ndarray_copy(res, dst)
        elif dst.flags.c_contiguous or dst.flags.f_contiguous:
            flat = dst.reshape(-1) if dst.flags.c_contiguous else dst.T.reshape(-1)  # memory order, a view
            flat.view(np.uint8)[...] = res.reshape(-1).view(np.uint8)
        else:
            raise ValueError("out must be contiguous")
        return out


def _from_config(config):
    return Cupycodec.from_config(config)


numcodecs.registry.register_codec(Cupycodec)
