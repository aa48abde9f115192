"""CUDA context helpers shared by the engine and the kernels: the current device, a stream handle, launching on them."""

from __future__ import annotations

import contextlib

__all__ = ["current_device", "external_stream", "launch", "launching_on", "stream_ptr"]


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


def launch(kernel, grid: tuple, block: tuple, args: tuple, device: int, sp: int) -> None:
    """Launch the CuPy kernel ``kernel`` on ``device`` and the raw stream ``sp``, for code that launches one kernel
    per call (a layer's forward): the stream goes to the launch itself and the device is entered only when it is not
    current, where :func:`launching_on` builds a stream object and enters contexts (host microseconds per call)."""
    import cupy

    if cupy.cuda.runtime.getDevice() == device:
        kernel(grid, block, args, stream=_Handle(sp))
    else:
        with cupy.cuda.Device(device):
            kernel(grid, block, args, stream=_Handle(sp))
