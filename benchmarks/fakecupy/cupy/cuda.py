import ctypes


class _Stream:
    def __init__(self, ptr=0):
        self.ptr = ptr

    def __enter__(self):
        global _CUR
        self._prev, _CUR = _CUR, self
        return self

    def __exit__(self, *a):
        global _CUR
        _CUR = self._prev

    def synchronize(self):
        pass

    @classmethod
    def from_external(cls, obj):
        return cls(obj.__cuda_stream__()[1])


Stream = _Stream
_CUR = _Stream(0)


def ExternalStream(ptr, device=-1):
    return _Stream(ptr)


def get_current_stream(device=None):
    return _CUR


class Device:
    def __init__(self, i=0):
        self.id = i

    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass

    def synchronize(self):
        pass


class Event:
    ptr = 1

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


def alloc_pinned_memory(n):
    return bytearray(n)


class _RT:
    class CUDARuntimeError(RuntimeError):
        pass

    @staticmethod
    def getDevice():
        return 0

    @staticmethod
    def setDevice(i):
        pass

    @staticmethod
    def getDeviceCount():
        return 1

    @staticmethod
    def getDeviceProperties(i):
        return {"name": b"FakeGPU", "totalGlobalMem": 1 << 34, "multiProcessorCount": 132, "major": 9, "minor": 0}

    @staticmethod
    def runtimeGetVersion():
        return 13020

    @staticmethod
    def driverGetVersion():
        return 13000

    @staticmethod
    def memcpyAsync(dst, src, n, kind, stream):
        ctypes.memmove(dst, src, n)

    @staticmethod
    def memcpy(dst, src, n, kind):
        ctypes.memmove(dst, src, n)

    @staticmethod
    def memsetAsync(p, v, n, stream):
        pass  # asynchronous on a GPU: no host cost worth modelling

    @staticmethod
    def streamSynchronize(s):
        pass

    @staticmethod
    def eventRecord(e, s):
        pass


runtime = _RT()


class _Drv:
    @staticmethod
    def launchKernel(*a):
        pass


driver = _Drv()
