"""The GPU engine: one per CUDA device, owning the caches its encode and decode plans are built from.

Plans are the primitive (docs/DESIGN.md, "The engine"): an :class:`~cupycodec.engine.encode.EncodePlan` compresses
a fixed list of segments, a :class:`~cupycodec.engine.decode.DecodePlan` decodes fixed containers into fixed
buffers, filters included, and their ``run`` is the only code that calls nvCOMP. The one-shot functions of
:mod:`cupycodec.api` get (or build) a plan from here and run it. Caches are bounded LRUs keyed by codec
configuration and geometry, never by ``id()``; :func:`clear_caches` empties them all, and a forked child starts
with none (CUDA state and thread pools do not survive ``fork``).
"""

from __future__ import annotations

import os
import threading

import numpy as np

from .._cuda import current_device, launching_on, stream_ptr
from .._lru import LRU

__all__ = ["Engine", "clear_caches", "current_device", "engine", "launching_on", "stream_ptr"]

_H2D, _D2H = 1, 2  # cudaMemcpyKind


class Engine:
    """Everything GPU work on one device keeps between calls: encode plans by geometry, pinned staging per thread."""

    def __init__(self, device: int):
        self.device = device
        self.encode_plans = LRU(256)
        self._local = threading.local()

    def __repr__(self):
        return f"Engine(device={self.device}, encode_plans={len(self.encode_plans)})"

    # -- host <-> device staging ----------------------------------------------------------------------------------
    def pinned(self, nbytes: int) -> np.ndarray:
        """This thread's pinned host buffer for this device (uint8, at least ``nbytes``); callers synchronize
        before reusing it. Per device, because pinned memory is page-locked for the context that allocated it."""
        buf = getattr(self._local, "pinned", None)
        if buf is None or buf.nbytes < nbytes:
            import cupy

            with cupy.cuda.Device(self.device):
                mem = cupy.cuda.alloc_pinned_memory(max(1 << 16, 1 << (max(int(nbytes), 1) - 1).bit_length()))
            buf = self._local.pinned = np.frombuffer(mem, np.uint8)
        return buf

    def download(self, src_ptr: int, nbytes: int, stream_ptr: int) -> np.ndarray:
        """Copy device bytes into this thread's pinned buffer and wait for them: one copy, one synchronization. The
        view is valid until this thread's next download."""
        import cupy

        host = self.pinned(nbytes)
        if nbytes:
            cupy.cuda.runtime.memcpyAsync(host.ctypes.data, src_ptr, nbytes, _D2H, stream_ptr)
        cupy.cuda.runtime.streamSynchronize(stream_ptr)
        return host[:nbytes]

    @staticmethod
    def upload(dst_ptr: int, host: np.ndarray, stream_ptr: int) -> None:
        """Enqueue a copy of ``host`` (pageable: the driver stages it before returning, so ``host`` may be dropped
        at once and nothing waits for the device). A pinned staging arena measured no faster (RESULTS.md, run 13)."""
        import cupy

        if host.nbytes:
            cupy.cuda.runtime.memcpyAsync(dst_ptr, host.ctypes.data, host.nbytes, _H2D, stream_ptr)

    # -- plans ------------------------------------------------------------------------------------------------
    def encode_plan(self, items):
        """The :class:`~cupycodec.engine.encode.EncodePlan` for ``items`` (per item, a tuple of (resolved codec,
        nbytes, chunk) per segment), built once per geometry."""
        from .encode import EncodePlan

        key = tuple(tuple((codec.config_key(), nbytes, chunk) for codec, nbytes, chunk in item) for item in items)
        return self.encode_plans.get(key, lambda: EncodePlan(self, items))


_ENGINES: dict[int, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def engine(device: int) -> Engine:
    """The engine of CUDA device ``device`` (an ordinal)."""
    eng = _ENGINES.get(device)
    if eng is None:
        with _ENGINES_LOCK:
            eng = _ENGINES.setdefault(device, Engine(device))
    return eng


def clear_caches() -> None:
    """Forget every cached plan, size query and staging buffer (they are rebuilt on demand)."""
    from .. import _lru
    from ..backends import _nvcomp_lib
    from ..layout import geometry

    for eng in list(_ENGINES.values()):
        eng._local = threading.local()
    _lru.clear_all()
    _nvcomp_lib.clear_caches()
    geometry.cache_clear()


def _after_fork_in_child() -> None:
    # The child inherits the parent's engines, whose device pointers and pinned buffers belong to a CUDA context the
    # child cannot use (backends.cpu resets its thread pool the same way).
    global _ENGINES_LOCK
    _ENGINES.clear()
    _ENGINES_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
