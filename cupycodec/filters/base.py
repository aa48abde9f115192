"""The filter contract: a reversible (or, for quantizers, documented lossy) transform of named arrays."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar

from ..dtypes import ArraySpec
from ..errors import UnsupportedVersionError

__all__ = ["Filter"]


class Filter(abc.ABC):
    """A pipeline stage between the array and the codec.

    A pipeline starts from ``{"data": array}``; each filter maps a dict of named arrays to another, and the codec
    compresses every array of the final dict as one container segment. ``specs`` computes the output specs from the
    input specs without touching data, so a reader can check a header before decoding anything.

    On the CPU arrays are NumPy arrays of the logical dtype (bfloat16 through ml_dtypes); on the GPU they are
    C-contiguous CuPy arrays of the storage dtype (bfloat16 as uint16), always with the spec passed alongside.
    """

    filter_id: ClassVar[str]
    version: ClassVar[int] = 1
    lossless: ClassVar[bool] = True

    @abc.abstractmethod
    def get_config(self) -> dict[str, Any]:
        """JSON-able config including ``id`` and ``version``."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Filter:
        config = dict(config)
        config.pop("id", None)
        version = config.pop("version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"filter {cls.filter_id!r}: version must be an int from 1, got {version!r}")
        if version > cls.version:
            raise UnsupportedVersionError(f"filter {cls.filter_id!r}", version, cls.version)
        unknown = set(config) - set(cls.option_names())
        if unknown:  # as a codec's: __init__'s own "unexpected keyword argument" named no filter
            raise TypeError(f"filter {cls.filter_id!r} got unknown option(s) {', '.join(sorted(unknown))}; valid "
                            f"options: {', '.join(cls.option_names()) or 'none'}")
        return cls(**config)

    @classmethod
    def option_names(cls) -> list[str]:
        """The options its configuration may hold (its constructor's keywords)."""
        import inspect

        return [n for n, p in inspect.signature(cls.__init__).parameters.items()
                if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def resolve(self, inputs: dict[str, ArraySpec]) -> Filter:
        """The concrete filter for these inputs (options left on ``None``/``"auto"`` fixed from the dtypes)."""
        return self

    @abc.abstractmethod
    def specs(self, inputs: dict[str, ArraySpec]) -> dict[str, ArraySpec]:
        """Output specs for input specs; raises ValueError when the filter cannot apply to them."""

    @abc.abstractmethod
    def encode(self, arrays: dict[str, Any], specs: dict[str, ArraySpec], gpu: bool) -> dict[str, Any]:
        """Transform input arrays (described by ``specs``) into output arrays."""

    @abc.abstractmethod
    def decode(self, arrays: dict[str, Any], specs: dict[str, ArraySpec], gpu: bool,
               out: dict[str, Any] | None = None) -> dict[str, Any]:
        """Invert ``encode``; ``specs`` are this filter's *input* specs; ``out`` optionally holds their buffers."""

    def __eq__(self, other):
        return isinstance(other, Filter) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash(repr(sorted(self.get_config().items())))

    def __repr__(self):
        cfg = {k: v for k, v in self.get_config().items() if k not in ("id", "version")}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in cfg.items())})"
