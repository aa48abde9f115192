"""CUDA context helpers shared by the engine and the kernels: the current device, a stream handle, launching on them."""

from __future__ import annotations

import contextlib

__all__ = ["current_device", "launching_on", "stream_ptr"]


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


@contextlib.contextmanager
def launching_on(device: int, sp: int):
    """Make ``device`` current and ``sp`` CuPy's current stream for kernel launches, entering only what differs
    (each context costs the host microseconds, and a plan's run enters this once for all its launches)."""
    import cupy

    with contextlib.ExitStack() as stack:
        if current_device() != device:
            stack.enter_context(cupy.cuda.Device(device))
        if cupy.cuda.get_current_stream().ptr != sp:
            stack.enter_context(cupy.cuda.ExternalStream(sp, device))
        yield
