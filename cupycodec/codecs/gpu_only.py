"""nvCOMP's own formats: ``gdeflate``, ``cascaded``, ``bitcomp`` and ``ans``.

ANS and Cascaded run only on the GPU (no CPU implementation exists). GDeflate and Bitcomp also run on the CPU
through nvCOMP's host libraries when the nvidia-libnvcomp wheel is installed (see :mod:`._nvcomp_host`).
"""

from __future__ import annotations

from .base import (
    NVCOMP_DATA_TYPES,
    Codec,
    KiB,
    Option,
    check_data_type,
    fit_data_type,
    int_range,
    natural_data_type,
)

__all__ = ["ANS", "Bitcomp", "Cascaded", "GDeflate"]


class _TypedCodec(Codec):
    """A GPU codec with a ``data_type`` option that ``'auto'`` fixes from each segment's dtype."""

    cpu_supported = False
    _types: tuple[str, ...] = ()
    _floats = False

    def resolve(self, spec):
        config = self.get_config()
        if self.data_type in (None, "auto"):
            config["data_type"] = natural_data_type(spec, self._types, self._floats)
        else:
            fit_data_type(self, self.data_type, spec, self._types)
        return type(self).from_config(config)


class _HostCodec(Codec):
    """A GPU codec whose CPU side needs nvCOMP's host libraries (nvidia-libnvcomp), which may be absent."""

    @classmethod
    def cpu_usable(cls) -> bool:
        from . import _nvcomp_host

        return _nvcomp_host.available()


class GDeflate(_HostCodec):
    """GDeflate: DEFLATE split into 32 interleaved sub-streams for parallel decoding (DirectStorage's format).

    Parameters
    ----------
    algorithm : int, optional
        nvCOMP's GDeflate algorithm for the GPU backend (0-5; nvCOMP's default 1 when None).
    level : int, optional
        Level of nvCOMP's CPU GDeflate compressor (0-12; 12 when None); the CPU compresses chunks of <= 64 KiB.
    """

    codec_id = "gdeflate"
    version = 1
    nvcomp_algorithm = "GDeflate"
    options = {"algorithm": Option(None, int_range(0, 5), "nvCOMP algorithm (0 fastest .. 5 best)"),
               "level": Option(None, int_range(0, 12), "CPU compression level")}

    def nvcomp_params(self):
        return {"algorithm": 1 if self.algorithm is None else self.algorithm}

    def encode_chunk(self, src):
        from . import _nvcomp_host

        return _nvcomp_host.gdeflate_encode(src, 12 if self.level is None else self.level)

    def decode_chunk_into(self, src, dst):
        from . import _nvcomp_host

        _nvcomp_host.gdeflate_decode(src, dst)


class Cascaded(_TypedCodec):
    """Cascaded (RLE, delta, frame-of-reference and bit packing) for integer columns.

    Parameters
    ----------
    data_type : str
        Integer word type (``'auto'``: the segment's integer type, floats as unsigned words of their width).
    compression_level : int, optional
        0-7: higher levels try more encoding stages (nvCOMP's default 3 when None).
    """

    codec_id = "cascaded"
    version = 1
    nvcomp_algorithm = "Cascaded"
    _types = ("|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8")
    options = {
        "data_type": Option("auto", check_data_type, "integer word type"),
        "compression_level": Option(None, int_range(0, 7), "encoding search effort"),
    }

    def nvcomp_params(self):
        return {"data_type": NVCOMP_DATA_TYPES[self.data_type],
                "compression_level": 3 if self.compression_level is None else self.compression_level}


class Bitcomp(_HostCodec, _TypedCodec):
    """Bitcomp (lossless mode) for numeric data.

    Parameters
    ----------
    data_type : str
        Word type (``'auto'``: the segment's integer type; floats as unsigned words of their width).
    algorithm : int, optional
        0 default, 1 sparse data.
    """

    codec_id = "bitcomp"
    version = 1
    nvcomp_algorithm = "Bitcomp"
    _types = ("|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8")
    options = {
        "data_type": Option("auto", check_data_type, "word type"),
        "algorithm": Option(None, int_range(0, 1), "0 default, 1 sparse"),
    }

    cpu_supported = True

    def nvcomp_params(self):
        return {"data_type": NVCOMP_DATA_TYPES[self.data_type], "algorithm": self.algorithm or 0}

    def encode_chunk(self, src):
        from . import _nvcomp_host

        return _nvcomp_host.bitcomp_encode(src, self.data_type, self.algorithm or 0)

    def decode_chunk_into(self, src, dst):
        from . import _nvcomp_host

        _nvcomp_host.bitcomp_decode(src, dst)


class ANS(_TypedCodec):
    """nvCOMP's rANS entropy coder: order-0, fast to decode, the best GPU codec for weights.

    Parameters
    ----------
    data_type : str
        ``'auto'`` picks ``'<f2'`` for float16/bfloat16 (exponent-aware float mode), ``'<f4'`` for float32,
        ``'|i1'`` for int8 and ``'|u1'`` (bytes) otherwise; ``'|f1'`` is FP8 E4M3.
    """

    codec_id = "ans"
    version = 1
    nvcomp_algorithm = "ANS"
    default_chunk_nbytes = 256 * KiB
    _types = ("|u1", "|i1", "<f2", "<f4", "|f1")
    _floats = True
    options = {"data_type": Option("auto", check_data_type, "symbol type")}

    def default_chunk(self) -> int:
        # Measured on an H200 (benchmarks/RESULTS.md): the float modes decode fastest and compress best at 256 KiB;
        # byte mode (INT8 codes) decodes fastest at 64-128 KiB, and 128 KiB keeps most of 256 KiB's ratio.
        return 256 * KiB if self.data_type in ("<f2", "<f4", "|f1") else 128 * KiB

    def nvcomp_params(self):
        return {"data_type": NVCOMP_DATA_TYPES[self.data_type]}
