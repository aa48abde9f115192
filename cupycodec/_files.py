"""Files: written atomically with the permissions an ordinary write would give, and read only when regular."""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import stat
from collections.abc import Callable

__all__ = ["atomic_write", "atomic_write_path", "open_regular", "release_pages"]

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


def atomic_write(path, write: Callable, *, overwrite: bool = True) -> None:
    """Write ``path`` through ``write(file)`` atomically: a temporary file in the same directory, flushed and
    synced, then renamed over ``path``. A crash, a full disk or a signal leaves either the old file or none.

    The file gets the permissions a plain ``open(path, "wb")`` gives: an existing file's mode is kept, and a new
    file gets 0o666 less the umask (``tempfile.mkstemp`` would make it 0o600 whatever the umask).
    """

    def through_file(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)

    atomic_write_path(path, through_file, overwrite=overwrite)


def atomic_write_path(path, write: Callable[[str], None], *, overwrite: bool = True) -> None:
    """As :func:`atomic_write`, for writers that take a file name (``write(temporary_path)``), such as
    ``safetensors.torch.save_file``."""
    path = os.fspath(path)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if not overwrite:
            raise FileExistsError(path)
    except FileNotFoundError:
        mode = None
    directory = os.path.dirname(os.path.abspath(path))
    for _ in range(100):
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the kernel applies the umask
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 random collisions
        raise FileExistsError(f"could not create a temporary file next to {path}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def release_pages(mm, start: int, end: int) -> None:
    """Drop the whole pages of bytes ``[start, end)`` of memory map ``mm`` from this process's resident set (they
    stay in the page cache, and are read again from there if touched); a no-op where ``madvise`` is missing."""
    if _MADV_DONTNEED is None or not hasattr(mm, "madvise"):
        return
    lo = -(-start // _PAGE) * _PAGE
    hi = end // _PAGE * _PAGE
    if hi > lo:
        mm.madvise(_MADV_DONTNEED, lo, hi - lo)


def open_regular(path):
    """Open ``path`` for reading if it is a regular file, else raise ValueError naming the alternative.

    Character devices and pipes (``/dev/zero``, a FIFO) report a size of 0 and can be read forever.
    """
    f = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise ValueError(f"{os.fspath(path)!r} is not a regular file; cupycodec reads containers from files (for a "
                         "stream, read its bytes yourself and pass them to CompressedArray.from_bytes)")
    return f
