"""A stand-in for libnvcomp's batched C API, for the stand-in CuPy beside it: size queries, compression that makes
each chunk 7/8 of its size (``copy=True`` also writes those bytes: the first 7/8 of the chunk, so a packed
container has real bytes to checksum), and decompression that reports every chunk decoded to its raw size without
writing it. Used by benchmarks/host_cost.py and tests/test_encode_layout_emulated.py."""

import ctypes

__all__ = ["FakeLib", "install"]

U64 = ctypes.c_uint64


def _arr(p: int, n: int, t=U64):
    return (t * n).from_address(p) if n else []


class FakeLib:
    def __init__(self, copy: bool = False):
        self.copy = copy

    def __getattr__(self, name):
        if name.endswith("GetTempSize"):
            def f(n, mc, o, out, total, _):
                out._obj.value = 1 << 16
                return 0
        elif name.endswith("GetMaxOutputChunkSize"):
            def f(mc, o, out):
                out._obj.value = mc + 64
                return 0
        elif name.endswith("DecompressAsync"):
            def f(comp, csz, raw, actual, n, temp, tn, outs, o, st, s):
                r, a, s_ = _arr(raw, n), _arr(actual, n), _arr(st, n, ctypes.c_int32)
                for i in range(n):
                    a[i], s_[i] = r[i], 0
                return 0
        elif name.endswith("CompressAsync"):
            def f(ins, isz, mc, n, temp, tn, outs, osz, o, st, s):
                a, b, s_ = _arr(isz, n), _arr(osz, n), _arr(st, n, ctypes.c_int32)
                src, dst = (_arr(ins, n), _arr(outs, n)) if self.copy else (None, None)
                for i in range(n):
                    b[i], s_[i] = a[i] * 7 // 8 // 16 * 16, 0
                    if self.copy:
                        ctypes.memmove(dst[i], src[i], b[i])
                return 0
        else:
            raise AttributeError(name)
        return f


def install(nv, copy: bool = False) -> FakeLib:
    """Make cupycodec's nvCOMP binding module ``nv`` (the engine's ``_nvcomp_lib``, or the pre-engine ``nvcomp``)
    use a :class:`FakeLib`."""
    lib = FakeLib(copy)
    if hasattr(nv, "_loaded"):
        nv._loaded = (lib, (6, 0, 0))
        nv._reason = (None, 0.0)
    else:
        nv._library = lambda: lib
        nv.version_string = lambda: "6.0.0"
        nv.unavailable_reason = lambda: None
    return lib
