"""A bounded, thread-safe least-recently-used cache: the one kind of cache cupycodec keeps between calls."""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable

__all__ = ["LRU", "clear_all"]

_ALL: weakref.WeakSet = weakref.WeakSet()


class LRU:
    """A mapping bounded to ``maxsize`` entries that builds missing values on demand and forgets the least
    recently used. Keys are configurations and geometries, never ``id()`` of live objects (ids are reused)."""

    def __init__(self, maxsize: int):
        self._data: OrderedDict = OrderedDict()
        self._maxsize = maxsize
        self._lock = threading.Lock()
        _ALL.add(self)

    def get(self, key: Hashable, build: Callable[[], object]):
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
                return value
        value = build()  # outside the lock: building may be slow, and two threads building one key is harmless
        with self._lock:
            self._data[key] = value
            while len(self._data) > self._maxsize:
                self._data.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()



def clear_all() -> None:
    """Empty every LRU of the process."""
    for cache in list(_ALL):
        cache.clear()


def _after_fork_in_child() -> None:
    for cache in list(_ALL):
        cache._lock = threading.Lock()  # another thread may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
