"""The reader's trust policy for chunks that the numcodecs and Zarr codecs decode: set at run time, never stored.

A Zarr store (or any buffer handed to a numcodecs codec) is bytes from outside, and so is its metadata: whoever
can write a chunk can also write ``zarr.json``. So a store cannot vouch for itself. The codec configuration has a
``trusted`` flag, but it is only the *writer's declaration*; the *reader* decides, in this process, whether to
believe it. The default believes nothing: chunks decode through cupycodec's hardened CPU decoders (zstd, deflate,
gzip, lz4, snappy, raw), which is what the portable default codec writes, so untrusted stores of standard codecs
just work, on the CPU and (decoded on the CPU, then uploaded) under ``zarr.config.enable_gpu()``.

The policy has two parts:

``trusted``
    ``False`` (default): every chunk is untrusted. ``"metadata"``: believe the ``trusted`` flag of the codec
    configuration (for stores you write yourself, in a place only you can write). ``True``: every chunk this
    process reads is trusted (you vouch for every store it opens). Trusted chunks may reach nvCOMP's GPU decoders
    and the NVIDIA-only formats (``ans``, ``cascaded``, ``bitcomp``, ``gdeflate``).
``key``
    A secret of at least 16 bytes (e.g. ``os.urandom(32)``, kept outside the store). Chunks written while a key is
    set carry a MAC (keyed BLAKE3, see :func:`cupycodec.save`); chunks read while a key is set must carry a valid one,
    and are then trusted: a chunk someone else wrote or changed fails with
    :class:`~cupycodec.AuthenticationError` naming the chunk. The key wins over ``trusted``.

The policy is process-wide (every thread, including zarr's event-loop thread and Dask's worker threads, sees it).
Dask workers in other processes need it set there too, e.g. ``client.run(trust.configure, trusted="metadata")``.

Examples
--------
>>> from cupycodec.integrations import trust
>>> trust.current()
Policy(trusted=False, key=None)
>>> with trust.settings(trusted="metadata"):
...     trust.current().trusted
'metadata'
>>> trust.current().trusted
False
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

from cupycodec.container import _check_key

__all__ = ["Policy", "configure", "current", "settings"]


class Policy(NamedTuple):
    """The trust policy in force: ``trusted`` is ``False``, ``"metadata"`` or ``True``; ``key`` is the signing key
    (shown as ``'<set>'`` in the repr, never printed)."""

    trusted: bool | str = False
    key: bytes | None = None

    def __repr__(self):
        return f"Policy(trusted={self.trusted!r}, key={None if self.key is None else '<set>'!r})"

    def chunk_trusted(self, declared: bool) -> bool:
        """Whether a chunk whose codec configuration declares ``trusted=declared`` is trusted (no key set)."""
        return self.trusted is True or (self.trusted == "metadata" and declared)


_UNSET: Any = object()
_lock = threading.Lock()
_policy = Policy()


def _checked(trusted, key, base: Policy) -> Policy:
    if trusted is not _UNSET and not (trusted is False or trusted is True or trusted == "metadata"):
        raise ValueError(f"trusted must be False, True or 'metadata', got {trusted!r}")
    if key is not _UNSET and key is not None:
        if isinstance(key, str):
            raise TypeError("key must be bytes (e.g. os.urandom(32)), not str; encode it first")
        key = _check_key(key)  # the core's check: bytes-like only (bytes(32) would be 32 zero bytes), >= 16 bytes
    return Policy(base.trusted if trusted is _UNSET else trusted, base.key if key is _UNSET else key)


def current() -> Policy:
    """The policy in force now."""
    return _policy


def configure(*, trusted=_UNSET, key=_UNSET) -> None:
    """Set the process-wide policy (arguments left out keep their value; ``key=None`` removes the key).

    Parameters
    ----------
    trusted : {False, "metadata", True}
        Which chunks are trusted when no key is set (see the module docstring).
    key : bytes or None
        Sign written chunks and require a valid signature on read chunks.

    Raises
    ------
    ValueError
        ``trusted`` is not one of the three values, or ``key`` is shorter than 16 bytes.
    TypeError
        ``key`` is not bytes, bytearray or memoryview (a ``str`` or an ``int`` included).
    """
    global _policy
    with _lock:
        _policy = _checked(trusted, key, _policy)


class settings:
    """Context manager: the policy of :func:`configure` for the duration of a ``with`` block, then the previous one.

    The change is process-wide while the block runs (zarr decodes on its own event-loop thread, which must see it),
    so do not use it from concurrent threads that want different policies.
    """

    def __init__(self, *, trusted=_UNSET, key=_UNSET):
        _checked(trusted, key, Policy())  # bad arguments fail here, not at the ``with``
        self._trusted, self._key = trusted, key
        self._old: list[Policy] = []  # a stack: one instance may be entered again inside its own block

    def __enter__(self) -> Policy:
        global _policy
        with _lock:
            self._old.append(_policy)
            _policy = _checked(self._trusted, self._key, _policy)
            return _policy

    def __exit__(self, *exc) -> None:
        global _policy
        with _lock:
            _policy = self._old.pop()
