"""The registry resolves codec and filter ids to classes; third parties add theirs through entry points.

Built-in codecs and filters register explicitly when :mod:`cupycodec.codecs` and :mod:`cupycodec.filters` are
imported. Entry points in the groups ``cupycodec.codecs`` and ``cupycodec.filters`` are loaded lazily, the first
time an id is not found. Ids are permanent: once a release has written one it never names anything else, and the
registry never imports a dotted path read from a file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import UnknownCodecError

__all__ = [
    "get_codec",
    "get_filter",
    "register_codec",
    "register_filter",
    "registered_codecs",
    "registered_filters",
]

_codecs: dict[str, type] = {}
_filters: dict[str, type] = {}
_entry_points_loaded: set[str] = set()

# Ids that a release once used and that must never be reused (none retired yet).
RESERVED_IDS: frozenset[str] = frozenset()


def _check_id(ident: object) -> str:
    if not isinstance(ident, str) or not ident or not ident.isascii() or ident != ident.lower():
        raise ValueError(f"ids are non-empty lowercase ASCII strings, got {ident!r}")
    if ident in RESERVED_IDS:
        raise ValueError(f"id {ident!r} is retired and reserved; pick another")
    return ident


def register_codec(cls: type, *, replace: bool = False) -> type:
    """Register a :class:`cupycodec.codecs.Codec` subclass under its ``codec_id``.

    Registering a second class under an id that is taken raises ``ValueError`` unless ``replace=True``.
    Returns the class, so it also works as a decorator.
    """
    ident = _check_id(getattr(cls, "codec_id", None))
    if ident in _codecs and _codecs[ident] is not cls and not replace:
        raise ValueError(f"codec id {ident!r} is already registered to {_codecs[ident].__qualname__}")
    _codecs[ident] = cls
    return cls


def register_filter(cls: type, *, replace: bool = False) -> type:
    """Register a :class:`cupycodec.filters.Filter` subclass under its ``filter_id``."""
    ident = _check_id(getattr(cls, "filter_id", None))
    if ident in _filters and _filters[ident] is not cls and not replace:
        raise ValueError(f"filter id {ident!r} is already registered to {_filters[ident].__qualname__}")
    _filters[ident] = cls
    return cls


def _load_entry_points(group: str, table: dict[str, type], register) -> None:
    if group in _entry_points_loaded:
        return
    _entry_points_loaded.add(group)
    from importlib.metadata import entry_points

    for ep in entry_points(group=group):
        if ep.name in table:
            continue
        try:
            register(ep.load())
        except Exception as exc:  # a broken plug-in must not break the built-ins
            import warnings

            warnings.warn(f"could not load {group} entry point {ep.name!r}: {exc}", RuntimeWarning, stacklevel=3)


def _builtins() -> None:
    from . import codecs, filters  # noqa: F401  (importing registers the built-ins)


def _lookup(ident: str, table: dict[str, type], group: str, register, what: str) -> type:
    _builtins()
    cls = table.get(ident)
    if cls is None:
        _load_entry_points(group, table, register)
        cls = table.get(ident)
    if cls is None:
        raise UnknownCodecError(ident, table, what)
    return cls


def get_codec(config: str | Mapping[str, Any]):
    """Return a codec instance for an id (``"zstd"``) or a config (``{"id": "zstd", "level": 9}``).

    The config mapping is not modified. Unknown ids raise :class:`~cupycodec.UnknownCodecError`.
    """
    if isinstance(config, str):
        return _lookup(config, _codecs, "cupycodec.codecs", register_codec, "codec")()
    if not isinstance(config, Mapping) or not isinstance(config.get("id"), str):
        raise TypeError(f"a codec config is a mapping with a string 'id', got {config!r}")
    cls = _lookup(config["id"], _codecs, "cupycodec.codecs", register_codec, "codec")
    return cls.from_config(config)


def get_filter(config: str | Mapping[str, Any]):
    """Return a filter instance for an id (``"byteplane"``) or a config mapping."""
    if isinstance(config, str):
        return _lookup(config, _filters, "cupycodec.filters", register_filter, "filter")()
    if not isinstance(config, Mapping) or not isinstance(config.get("id"), str):
        raise TypeError(f"a filter config is a mapping with a string 'id', got {config!r}")
    cls = _lookup(config["id"], _filters, "cupycodec.filters", register_filter, "filter")
    return cls.from_config(config)


def registered_codecs() -> dict[str, type]:
    """A copy of the id -> class table of codecs (built-ins and loaded plug-ins)."""
    _builtins()
    _load_entry_points("cupycodec.codecs", _codecs, register_codec)
    return dict(_codecs)


def registered_filters() -> dict[str, type]:
    """A copy of the id -> class table of filters."""
    _builtins()
    _load_entry_points("cupycodec.filters", _filters, register_filter)
    return dict(_filters)
