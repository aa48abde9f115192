"""Built-in codecs; importing this package registers them (ids are permanent, see registry)."""

from ..registry import register_codec
from .base import Codec
from .deflate import Deflate, Gzip
from .gpu_only import ANS, Bitcomp, Cascaded, GDeflate
from .lz4 import LZ4, Snappy
from .raw import Raw
from .zstd import Zstd

__all__ = ["ANS", "LZ4", "Bitcomp", "Cascaded", "Codec", "Deflate", "GDeflate", "Gzip", "Raw", "Snappy", "Zstd"]

for _cls in (Raw, Zstd, Deflate, Gzip, LZ4, Snappy, GDeflate, Cascaded, Bitcomp, ANS):
    register_codec(_cls)
del _cls
