"""Files: written atomically with the permissions an ordinary write would give, and read only when regular."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable

__all__ = ["atomic_write", "open_regular"]


def atomic_write(path, write: Callable, *, overwrite: bool = True) -> None:
    """Write ``path`` through ``write(file)`` atomically: a temporary file in the same directory, flushed and
    synced, then renamed over ``path``. A crash, a full disk or a signal leaves either the old file or none.

    The file gets the permissions a plain ``open(path, "wb")`` gives: an existing file's mode is kept, and a new
    file gets 0o666 less the umask (``tempfile.mkstemp`` would make it 0o600 whatever the umask).
    """
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
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 random collisions
        raise FileExistsError(f"could not create a temporary file next to {path}")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
