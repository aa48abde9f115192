"""Built-in filters (pipeline stages before the codec); importing this package registers them."""

from ..registry import register_filter
from .base import Filter
from .byteplane import Byteplane
from .int8 import Int8

__all__ = ["Byteplane", "Filter", "Int8"]

for _cls in (Byteplane, Int8):
    register_filter(_cls)
del _cls
