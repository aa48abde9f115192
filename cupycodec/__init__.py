"""cupycodec: compress NumPy and CuPy arrays with nvCOMP on the GPU and standard codecs on the CPU.

>>> import numpy as np, cupycodec as cc
>>> c = cc.compress(np.linspace(0, 1, 1000, dtype=np.float32))
>>> y = cc.decompress(c)

Importing cupycodec imports NumPy and nothing heavier: CuPy, nvCOMP, zstandard and cramjam load on first use.
"""

from ._source_tree import map_integrations as _map_integrations
from ._version import __version__
from .api import (
    Compressor,
    Quantized,
    clear_caches,
    compress,
    compress_many,
    decode_plan,
    decompress,
    decompress_many,
    default_max_output_nbytes,
    load,
    save,
)
from .codecs import Codec
from .container import FORMAT_VERSION, CompressedArray
from .engine.decode import DecodePlan
from .errors import (
    AuthenticationError,
    BackendError,
    BackendUnavailableError,
    CaptureError,
    ChecksumError,
    CupycodecError,
    DecompressionBombError,
    FormatError,
    PerformanceWarning,
    UnknownCodecError,
    UnknownCodecInFileError,
    UnsupportedDtypeError,
    UnsupportedDtypeInFileError,
    UnsupportedVersionError,
    UntrustedError,
)
from .filters import Filter
from .info import info
from .registry import get_codec, get_filter, register_codec, register_filter, registered_codecs

__all__ = [
    "FORMAT_VERSION",
    "AuthenticationError",
    "BackendError",
    "BackendUnavailableError",
    "CaptureError",
    "ChecksumError",
    "Codec",
    "CompressedArray",
    "Compressor",
    "CupycodecError",
    "DecodePlan",
    "DecompressionBombError",
    "Filter",
    "FormatError",
    "PerformanceWarning",
    "Quantized",
    "UnknownCodecError",
    "UnknownCodecInFileError",
    "UnsupportedDtypeError",
    "UnsupportedDtypeInFileError",
    "UnsupportedVersionError",
    "UntrustedError",
    "__version__",
    "clear_caches",
    "compress",
    "compress_many",
    "decode_plan",
    "decompress",
    "decompress_many",
    "default_max_output_nbytes",
    "get_codec",
    "get_filter",
    "info",
    "load",
    "register_codec",
    "register_filter",
    "registered_codecs",
    "save",
]

_map_integrations()
