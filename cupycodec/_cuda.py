"""CUDA context helpers shared by the engine and the kernels: the current device, a stream handle, launching on them."""

from __future__ import annotations

import contextlib
import ctypes
import threading

__all__ = ["capture_status", "current_device", "event_record", "events", "external_stream", "kernel_handle", "launch",
           "launching_on", "relaxed_capture", "stream_ptr", "stream_wait"]


def current_device() -> int:
    import cupy

    return cupy.cuda.runtime.getDevice()


def stream_ptr(stream: int | None, device: int) -> int:
    """The raw handle to run on: ``stream`` (already an int, see :func:`cupycodec.interop.stream_handle`), or
    CuPy's current stream on ``device``."""
    if stream is not None:
        return stream
    import cupy

    if current_device() == device:
        return cupy.cuda.get_current_stream().ptr
    with cupy.cuda.Device(device):
        return cupy.cuda.get_current_stream().ptr


def events(device: int, n: int) -> list:
    """``n`` CUDA events on ``device`` without timing, for ordering streams by their raw handles (CuPy's events,
    destroyed with their objects)."""
    import cupy

    with cupy.cuda.Device(device):
        return [cupy.cuda.Event(block=False, disable_timing=True) for _ in range(n)]


def event_record(event, sp: int) -> None:
    """Record ``event`` (from :func:`events`) on the raw stream ``sp``: one runtime call, no wrapper objects."""
    _runtime().eventRecord(event.ptr, sp)


def stream_wait(sp: int, event) -> None:
    """Make the raw stream ``sp`` wait for ``event``'s last recording (captured as a dependency in a CUDA graph)."""
    _runtime().streamWaitEvent(sp, event.ptr, 0)


_RUNTIME = None


def _runtime():
    global _RUNTIME
    if _RUNTIME is None:
        import cupy.cuda.runtime

        _RUNTIME = cupy.cuda.runtime
    return _RUNTIME


_DRIVER = None
# CUstreamCaptureStatus and CUstreamCaptureMode values (cuda.h)
CAPTURE_NONE, CAPTURE_ACTIVE, CAPTURE_INVALIDATED = 0, 1, 2
_MODE_RELAXED = 2


def _driver():
    """The CUDA driver library through ctypes (already loaded by CuPy), for the capture calls CuPy does not wrap;
    None where it cannot be loaded."""
    global _DRIVER
    if _DRIVER is None:
        _DRIVER = False
        for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
            try:
                _DRIVER = ctypes.CDLL(name)
                break
            except OSError:
                continue
    return _DRIVER or None


def capture_status(sp: int) -> int:
    """Whether the raw stream ``sp`` is being captured into a CUDA graph: :data:`CAPTURE_NONE`,
    :data:`CAPTURE_ACTIVE`, or :data:`CAPTURE_INVALIDATED` (an earlier call in the capture failed, so every later one
    fails too); -1 where the driver cannot say. Never raises (CuPy's ``streamIsCapturing`` raises on an invalidated
    capture), for error paths that explain a failure."""
    lib = _driver()
    status = ctypes.c_int(-1)
    if lib is None or lib.cuStreamIsCapturing(ctypes.c_void_p(sp), ctypes.byref(status)) != 0:
        return -1
    return status.value


@contextlib.contextmanager
def relaxed_capture():
    """This thread's stream-capture mode relaxed inside the block, then restored. A capture this thread has under
    way in thread-local or global mode (torch's CUDA graphs, CuPy's) makes CUDA refuse "potentially unsafe" calls
    from it, destroying a graph among them, and the refused call invalidates that capture. Finalizers, which GC runs
    wherever it collects, a caller's capture included, wrap such calls in this (the use CUDA documents for
    cudaThreadExchangeStreamCaptureMode)."""
    lib = _driver()
    mode = ctypes.c_int(_MODE_RELAXED)
    swapped = lib is not None and lib.cuThreadExchangeStreamCaptureMode(ctypes.byref(mode)) == 0
    try:
        yield
    finally:
        if swapped:
            lib.cuThreadExchangeStreamCaptureMode(ctypes.byref(mode))


class _Handle:
    """A raw stream handle dressed in the CUDA stream protocol, for ``cupy.cuda.Stream.from_external``."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


def external_stream(sp: int, device: int = -1):
    """A CuPy stream object over the raw handle ``sp`` (usable as a context manager): ``Stream.from_external`` on
    CuPy >= 14, which deprecates ``ExternalStream`` (a DeprecationWarning per call there), else ``ExternalStream``."""
    import cupy

    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is None:
        return cupy.cuda.ExternalStream(sp, device)
    return from_external(_Handle(sp))


@contextlib.contextmanager
def launching_on(device: int, sp: int):
    """Make ``device`` current and ``sp`` CuPy's current stream for kernel launches, entering only what differs
    (each context costs the host microseconds, and a plan's run enters this once for all its launches)."""
    import cupy

    with contextlib.ExitStack() as stack:
        if current_device() != device:
            stack.enter_context(cupy.cuda.Device(device))
        if cupy.cuda.get_current_stream().ptr != sp:
            stack.enter_context(external_stream(sp, device))
        yield



def kernel_handle(kernel, device: int) -> tuple:
    """What :func:`launch` takes for the CuPy kernel ``kernel`` (a ``RawKernel``) on ``device``: the compiled
    function (held, so that its module stays loaded) and its driver handle."""
    import cupy

    with cupy.cuda.Device(device):
        fn = kernel.kernel
        return fn, int(fn.ptr)


_TLS = threading.local()
_MAX_ARGS = 16


def launch(handle: tuple, grid: int, block: int, args: tuple, device: int, sp: int) -> None:
    """Launch the kernel ``handle`` (:func:`kernel_handle`) with a 1-D ``grid`` of ``block`` threads on ``device``
    and the raw stream ``sp``, straight through ``cuLaunchKernel``: for code that launches per call (a layer's
    forward), where CuPy's launch converts every argument to an object and :func:`launching_on` enters contexts,
    tens of host microseconds on a slow host. ``args`` are integers and device pointers only (numpy integer scalars
    included), each passed from an 8-byte little-endian slot from which the driver copies the parameter's width."""
    import cupy

    st = _TLS.__dict__
    params = st.get("params")
    if params is None:  # per thread: the slots are filled, then copied by the driver at launch
        values = (ctypes.c_uint64 * _MAX_ARGS)()
        base = ctypes.addressof(values)
        pointers = (ctypes.c_void_p * _MAX_ARGS)(*(base + 8 * i for i in range(_MAX_ARGS)))
        params = st["params"] = (values, pointers, ctypes.addressof(pointers), set())
    values, _, pointers_at, ready = params
    if len(args) > _MAX_ARGS:
        raise ValueError(f"launch() passes at most {_MAX_ARGS} kernel arguments, got {len(args)}")
    values[: len(args)] = args
    if device not in ready or cupy.cuda.runtime.getDevice() != device:
        with cupy.cuda.Device(device):
            cupy.cuda.runtime.setDevice(device)  # CUDA >= 12: makes the primary context current on this thread
            cupy.cuda.driver.launchKernel(handle[1], grid, 1, 1, block, 1, 1, 0, sp, pointers_at, 0)
        ready.add(device)
        return
    cupy.cuda.driver.launchKernel(handle[1], grid, 1, 1, block, 1, 1, 0, sp, pointers_at, 0)
