"""Backend selection: where a call runs (``"cpu"`` or ``"nvcomp"``), decided per call, never at import.

Policy: host input uses the CPU unless the codec only exists on the GPU; device input uses nvCOMP when it is
available, else the data is copied to the host with one :class:`~cupycodec.PerformanceWarning` per process; an
explicit backend is never silently replaced. ``CUPYCODEC_BACKEND`` (``auto``/``cpu``/``nvcomp``; empty means unset)
lets an operator choose when the code does not.
"""

from __future__ import annotations

import os
import warnings

from ..errors import BackendUnavailableError, PerformanceWarning

__all__ = ["BACKENDS", "nvcomp_available", "requested_backend", "select"]

BACKENDS = ("auto", "cpu", "nvcomp")
_ENV = "CUPYCODEC_BACKEND"
_warned_host_copy = False


# os.environ.get costs ~1 us when the variable is unset (a KeyError inside); the common "unset" answer is read from
# CPython's environ dict directly, and everything else goes through os.environ as usual.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(_ENV) if hasattr(os.environ, "encodekey") and isinstance(_ENV_DATA, dict) else None


def requested_backend(requested: str | None) -> str:
    if requested is None and _ENV_KEY is not None and _ENV_KEY not in _ENV_DATA:
        return "auto"
    choice = requested if requested is not None else os.environ.get(_ENV) or "auto"  # empty means unset
    if choice not in BACKENDS:
        source = "argument backend=" if requested is not None else f"environment variable {_ENV}="
        raise ValueError(f"{source}{choice!r} is not one of {', '.join(BACKENDS)}")
    return choice


def nvcomp_available() -> bool:
    from . import _nvcomp_lib

    return _nvcomp_lib.available()


def _nvcomp_reason() -> str:
    from . import _nvcomp_lib

    return _nvcomp_lib.unavailable_reason() or ""


def select(requested: str | None, *, on_device: bool, codecs, what: str = "compress") -> str:
    """Pick ``"cpu"`` or ``"nvcomp"`` for codecs (instances) applied to host or device data."""
    choice = requested_backend(requested)
    if choice == "auto" and on_device and nvcomp_available():  # the common device case, decided at once
        return "nvcomp"
    gpu_only = sorted({c.codec_id for c in codecs if not c.cpu_usable()})
    if choice == "cpu":
        if gpu_only:
            from ..codecs.base import GPU_ONLY_HINT

            raise BackendUnavailableError(f"codec {gpu_only[0]!r} has no CPU implementation, so backend='cpu' "
                                          f"cannot {what} it; {GPU_ONLY_HINT}")
        return "cpu"
    if choice == "nvcomp":
        if not nvcomp_available():
            raise BackendUnavailableError(f"backend='nvcomp' cannot run here: {_nvcomp_reason()}")
        return "nvcomp"
    if (on_device or gpu_only) and nvcomp_available():  # host data, CPU codec: never initialize CUDA for it
        return "nvcomp"
    if gpu_only:
        from ..codecs.base import GPU_ONLY_HINT

        raise BackendUnavailableError(f"codec {gpu_only[0]!r} runs only on a GPU with nvCOMP, which is not usable "
                                      f"here ({_nvcomp_reason()}); {GPU_ONLY_HINT}")
    if on_device:
        global _warned_host_copy
        if not _warned_host_copy:
            _warned_host_copy = True
            warnings.warn(f"nvCOMP is not usable ({_nvcomp_reason()}); device data is copied to the host to {what} "
                          "it on the CPU", PerformanceWarning, stacklevel=4)
    return "cpu"
