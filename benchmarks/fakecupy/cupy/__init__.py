"""A CPU stand-in for CuPy: 'device' memory is host memory, copies are memmove, kernels do nothing. Only for timing
cupycodec's host-side Python on a machine without a GPU (what the code does between CUDA calls)."""
import math

import numpy as np

from . import cuda  # noqa

__version__ = "14.2.0-fake"


class _Ptr:
    __slots__ = ("ptr",)

    def __init__(self, p):
        self.ptr = p


class _Dev:
    id = 0


_DEV = _Dev()


class ndarray:
    """Wraps a host numpy array (not a numpy subclass, so code can tell it from host data)."""
    __slots__ = ("__weakref__", "_a")

    def __init__(self, a):
        self._a = a

    @property
    def data(self):
        return _Ptr(self._a.__array_interface__["data"][0])

    @property
    def device(self):
        return _DEV

    def get(self, stream=None, out=None):
        return np.array(self._a, copy=True)

    def set(self, arr, stream=None):
        np.copyto(self._a, arr)

    @property
    def __cuda_array_interface__(self):
        return self._a.__array_interface__

    def __array__(self, dtype=None, copy=None):
        return self._a

    def __len__(self):
        return len(self._a)

    def __getitem__(self, k):
        return _wrap(self._a[_unwrap(k)])

    def __setitem__(self, k, v):
        self._a[_unwrap(k)] = _unwrap(v)

    def __getattr__(self, name):
        v = getattr(self._a, name)
        if callable(v):
            def f(*a, **k):
                return _wrap(v(*[_unwrap(x) for x in a], **{kk: _unwrap(vv) for kk, vv in k.items()}))
            return f
        return _wrap(v)

    def __eq__(self, o):
        return _wrap(self._a == _unwrap(o))

    def __repr__(self):
        return f"fakecupy({self._a!r})"


def _wrap(v):
    return ndarray(v) if isinstance(v, np.ndarray) else v


def _unwrap(v):
    return v._a if isinstance(v, ndarray) else v


_ARENA = np.ones(1 << 26, np.uint8)  # touched: resident pages, no faults in timings
_ARENA[:] = 0
_BASE = _ARENA.ctypes.data
_pos = [0]


def _aligned(nbytes):
    """A bump allocator over one arena (wraps around): 'device' memory costs no page faults."""
    n = (nbytes + 255) // 256 * 256
    p = _pos[0]
    if p + n > _ARENA.size:
        p = 0
    _pos[0] = p + n
    off = (-(_BASE + p)) % 256
    return _ARENA[p + off: p + off + nbytes]


def empty(shape, dtype=float, order="C"):
    dt = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    n = math.prod(shape)
    return ndarray(_aligned(n * dt.itemsize).view(dt).reshape(shape))


zeros = empty


def empty_like(a, dtype=None):
    return empty(a.shape, dtype or a.dtype)


def asarray(a, dtype=None):
    if isinstance(a, ndarray) and dtype is None:
        return a
    a = np.asarray(_unwrap(a), dtype)
    out = empty(a.shape, a.dtype)
    np.copyto(out._a, a)
    return out


def ascontiguousarray(a, dtype=None):
    if isinstance(a, ndarray) and a.flags.c_contiguous and dtype is None:
        return a
    return asarray(np.ascontiguousarray(_unwrap(a), dtype))


def concatenate(arrs, axis=0):
    return asarray(np.concatenate([_unwrap(a) for a in arrs], axis))


def is_available():
    return True


class RawModule:
    def __init__(self, code=None, options=(), **kw):
        pass

    def get_function(self, name):
        return _Fn()


class _Fn:
    ptr = 1

    @property
    def kernel(self):
        return self

    def __call__(self, *a, **k):
        return None


class RawKernel(_Fn):
    def __init__(self, *a, **k):
        self.kernel = _Fn()


def get_default_memory_pool():
    class P:
        def free_all_blocks(self):
            pass

        def used_bytes(self):
            return 0
    return P()
