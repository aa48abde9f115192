"""The exception hierarchy: every error cupycodec raises on purpose derives from :class:`CupycodecError`.

Each class also derives from a builtin (``ValueError``, ``RuntimeError``, ``TypeError``) so that callers can catch
either ours or the builtin, and each keeps the facts it reports as attributes.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "AuthenticationError",
    "BackendError",
    "BackendUnavailableError",
    "CaptureError",
    "ChecksumError",
    "CupycodecError",
    "DecompressionBombError",
    "FormatError",
    "PerformanceWarning",
    "UnknownCodecError",
    "UnknownCodecInFileError",
    "UnsupportedDtypeError",
    "UnsupportedDtypeInFileError",
    "UnsupportedVersionError",
    "UntrustedError",
]


def prefix_message(exc: BaseException, prefix: str) -> None:
    """Put ``prefix: `` before ``exc``'s message (which of many items, layers, ... it is about), for re-raising it
    as it is: its type and attributes kept (a library error's constructor takes other arguments than a message, so
    it is not built again)."""
    exc.args = (f"{prefix}: {exc}",)


def _rebuild(cls: type, args: tuple, state: dict) -> BaseException:
    exc = cls.__new__(cls, *args)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class CupycodecError(Exception):
    """Base class for every error cupycodec raises on purpose."""

    def __reduce__(self):
        # Rebuilt from its message and attributes, not through __init__, whose arguments differ per class: so an
        # error crosses a process boundary (multiprocessing, Dask's process schedulers) as it was raised.
        return _rebuild, (type(self), self.args, dict(self.__dict__))


class UnknownCodecError(CupycodecError, ValueError):
    """A codec or filter id that no registered class implements."""

    def __init__(self, codec_id: str, known: Iterable[str], what: str = "codec"):
        self.codec_id, self.known, self.what = codec_id, sorted(known), what
        super().__init__(f"unknown {what} {codec_id!r}; registered: {', '.join(self.known)}")


class UnsupportedDtypeError(CupycodecError, TypeError):
    """An array dtype that cupycodec cannot store (object, structured, strings, datetimes, ...)."""

    def __init__(self, dtype: object, supported: Iterable[str], hint: str = ""):
        self.dtype, self.supported = dtype, list(supported)
        text = f"dtype {dtype!s} is not supported; supported: {', '.join(self.supported)}"
        super().__init__(text + (f"; {hint}" if hint else ""))


class FormatError(CupycodecError, ValueError):
    """The bytes are not a valid cupycodec container (truncated, corrupt, or not ours)."""


class UnsupportedVersionError(FormatError):
    """The container, a codec or a filter was written by a newer cupycodec."""

    def __init__(self, what: str, found: int, supported: int):
        self.what, self.found, self.supported = what, found, supported
        super().__init__(
            f"{what} version {found} is newer than this cupycodec supports (<= {supported}); "
            "upgrade cupycodec to read it"
        )


class UnknownCodecInFileError(FormatError, UnknownCodecError):
    """A container names a codec or filter id that no class registered here implements. Both a
    :class:`FormatError`, so that code guarding untrusted files with ``except FormatError`` catches it as every other
    reader check, and an :class:`UnknownCodecError` (a bad ``codec=`` argument raises the latter only)."""


class UnsupportedDtypeInFileError(FormatError, UnsupportedDtypeError):
    """A container holds a dtype this platform cannot represent (another platform's long double). Both a
    :class:`FormatError` and an :class:`UnsupportedDtypeError` (so also a ``ValueError`` and a ``TypeError``)."""


class ChecksumError(FormatError):
    """A stored CRC32 does not match the bytes it covers."""

    def __init__(self, segment: str, stored: int, computed: int, chunk: int | None = None):
        self.segment, self.stored, self.computed, self.chunk = segment, stored, computed, chunk
        where = f"segment {segment!r}" + (f", chunk {chunk}" if chunk is not None else "")
        super().__init__(f"checksum mismatch in {where}: stored {stored:#010x}, computed {computed:#010x}")


class AuthenticationError(FormatError):
    """A container's MAC is missing or does not match under the key the caller gave (``load(..., key=...)``).
    ``unsigned`` is True when the container carries no MAC at all (written without a key)."""

    unsigned = False


class UntrustedError(CupycodecError, ValueError):
    """Decoding this container from outside would need a decoder that is not hardened against crafted input.

    nvCOMP's GPU decoders (and nvCOMP's CPU GDeflate and Bitcomp) can crash the process, kill its CUDA context or
    write out of bounds on crafted chunks, and a CRC32 stops accidents, not attackers. ``codec`` names the codec.
    """

    def __init__(self, codec: str, action: str = "decode it", *, message: str | None = None):
        self.codec = codec
        super().__init__(message or (
            f"this container came from outside (from_bytes/load) and is untrusted, and codec {codec!r} has no "
            f"decoder hardened against crafted input, so cupycodec will not {action}. If you made the file, "
            "pass trusted=True to from_bytes()/load(), or save it with cc.save(path, c, key=secret) and load it "
            "with cc.load(path, key=secret); untrusted files decode only with zstd, deflate, gzip, lz4, snappy or "
            "raw chunks (on the CPU)"
        ))


class DecompressionBombError(CupycodecError, ValueError):
    """The container promises more output than ``max_output_nbytes`` allows."""

    def __init__(self, nbytes: int, limit: int):
        self.nbytes, self.limit = nbytes, limit
        super().__init__(
            f"decompressed size {nbytes} bytes exceeds max_output_nbytes={limit}; "
            "pass a larger max_output_nbytes (or None) if you trust this data"
        )


class BackendUnavailableError(CupycodecError, RuntimeError):
    """A backend or codec was requested that cannot run here. The message names what would work."""


class BackendError(CupycodecError, RuntimeError):
    """nvCOMP, CUDA or a CPU codec library reported a failure; ``status`` holds the backend's status name."""

    def __init__(self, message: str, status: str | None = None):
        self.status = status
        super().__init__(message if status is None else f"{message} (status {status})")


class CaptureError(CupycodecError, RuntimeError):
    """A call that cannot be part of a CUDA graph was made while its stream was being captured into one (building a
    decode plan uploads its tables and waits for them). The message says what to run before the capture."""


class PerformanceWarning(UserWarning):
    """cupycodec took a slower path than the caller probably expects (e.g. device data compressed on the CPU)."""
