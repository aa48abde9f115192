"""Files: written atomically with the permissions an ordinary write would give, and read only when regular."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import mmap
import os
import secrets
import stat
import sys
from collections.abc import Callable

import numpy as np

__all__ = ["StagedFile", "atomic_write", "atomic_write_path", "open_regular", "release_clean_file_pages",
           "release_pages", "stage_write", "temporary_path", "trim_heap"]

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


def atomic_write(path, write: Callable, *, overwrite: bool = True) -> None:
    """Write ``path`` through ``write(file)`` atomically: a temporary file in the same directory, flushed and
    synced, then renamed over ``path``. A crash, a full disk or a signal leaves either the old file or none.

    The file gets the permissions a plain ``open(path, "wb")`` gives: an existing file's mode is kept, and a new
    file gets 0o666 less the umask (``tempfile.mkstemp`` would make it 0o600 whatever the umask). With
    ``overwrite=False`` the finished file is hard-linked into place, which fails with :class:`FileExistsError` if
    another writer made ``path`` meanwhile (a rename would replace its file).
    """

    def through_file(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)

    atomic_write_path(path, through_file, overwrite=overwrite)


def atomic_write_path(path, write: Callable[[str], None], *, overwrite: bool = True) -> None:
    """As :func:`atomic_write`, for writers that take a file name (``write(temporary_path)``), such as
    ``safetensors.torch.save_file``."""
    stage_write(path, write, overwrite=overwrite).commit()


def stage_write(path, write: Callable[[str], None], *, overwrite: bool = True) -> StagedFile:
    """The first half of :func:`atomic_write_path`: everything but the rename. The file is written, synced and
    checked (a read-only target, a missing directory, a full disk fail here), and ``path`` is left as it was
    until :meth:`StagedFile.commit`. For writes of several files that must not be left half done: stage each,
    then commit them together, when nothing but a rename is left to fail."""
    name = os.fsdecode(path)  # a bytes path, as open() and load() take one
    if not name:  # as open(""): resolved, it named the working directory, and the error a hidden file beside it
        raise FileNotFoundError(errno.ENOENT, "No such file or directory (an empty path)", name)
    if name.endswith(os.sep) or (os.altsep and name.endswith(os.altsep)):  # open() refuses these too
        raise IsADirectoryError(errno.EISDIR, "names a directory (it ends in a separator); name a file", name)
    try:
        st = os.stat(name)  # what the name leads to, through symbolic links
    except FileNotFoundError:
        mode = None
    else:
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{name!r} is not a regular file (a directory, device, pipe or socket); cupycodec "
                             "writes files atomically, through a temporary file renamed over the target: name a "
                             "file path")
        if not overwrite:
            raise FileExistsError(name)
        if not os.access(name, os.W_OK):  # a plain write fails here; a rename over it would not
            raise PermissionError(errno.EACCES, "Permission denied (the file is not writable)", name)
        mode = stat.S_IMODE(st.st_mode)
    path = os.path.realpath(name)  # a symbolic link's target is written, as open() would: the link stays
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(errno.ENOENT, "No such directory to write the file into", directory)
    for _ in range(100):
        tmp = temporary_path(path)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the kernel applies the umask
            break
        except FileExistsError:
            continue
        except PermissionError:  # the temporary file's name means nothing to the caller: the directory's does
            raise PermissionError(errno.EACCES, "Permission denied (cannot create a file in this directory)",
                                  directory) from None
    else:  # pragma: no cover - 100 random collisions
        raise FileExistsError(f"could not create a temporary file next to {path}")
    if mode is None:  # a new file: what a plain open() gives (0o666 less the umask), whatever ``write`` does
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # (safetensors writes a file of its own, as 0600)
    staged = StagedFile(tmp, path, name, overwrite)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
    except BaseException:
        staged.discard()
        raise
    return staged


def temporary_path(path: str) -> str:
    """A fresh name for a temporary file beside ``path``: ``.<name>.<12 hex digits>.tmp``, hidden and random,
    with ``<name>`` cut short so that the whole fits the file system's limit on a name (NAME_MAX, 255 bytes on
    most): a target whose name is near that limit is one a plain ``open()`` creates, and writing it through a
    temporary file must not fail where that does. The random part, not the name, keeps temporary files apart."""
    directory, name = os.path.split(path)
    suffix = f".{secrets.token_hex(6)}.tmp"
    room = _name_max(directory) - 1 - len(suffix)  # the leading dot
    while len(os.fsencode(name)) > room:  # whole characters (one byte for an undecodable one)
        name = name[:-1]
    return os.path.join(directory, f".{name}{suffix}")


def _name_max(directory: str) -> int:
    try:
        limit = os.pathconf(directory or ".", "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # a directory still to be made, no pathconf (Windows)
        return 255
    return limit if limit > 0 else 255  # -1: no limit the system will state


class StagedFile:
    """A file written by :func:`stage_write` under a temporary name beside its target: :meth:`commit` gives it the
    target's name, :meth:`discard` removes it. Either is done once; later calls do nothing."""

    def __init__(self, tmp: str, path: str, name: str, overwrite: bool):
        self.tmp, self.path, self.name, self.overwrite = tmp, path, name, overwrite

    def commit(self) -> None:
        if self.tmp is None:
            return
        try:
            if self.overwrite:
                os.replace(self.tmp, self.path)
            else:
                _place_new(self.tmp, self.path, self.name)
        except BaseException:
            self.discard()
            raise
        self.tmp = None

    def discard(self) -> None:
        tmp, self.tmp = self.tmp, None
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# errno values of link() on a file system without hard links (vfat, some network and FUSE file systems)
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}


def _place_new(tmp: str, path: str, name: str) -> None:
    """Give the finished ``tmp`` the name ``path`` only if no file has it. A hard link fails when the name exists,
    where a rename would replace a file that another writer made after the existence check; on a file system
    without hard links, that check (made again here) is all there is."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "File exists (made while this write was under way)", name) from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "File exists (made while this write was under way)", name) from None
        os.replace(tmp, path)
        return
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def release_pages(mm, start: int, end: int) -> None:
    """Drop the whole pages of bytes ``[start, end)`` of memory map ``mm`` from this process's resident set (they
    stay in the page cache, and are read again from there if touched); a no-op where ``madvise`` is missing."""
    if _MADV_DONTNEED is None or not hasattr(mm, "madvise"):
        return
    lo, hi = _whole_pages(start, end)
    if hi > lo:
        mm.madvise(_MADV_DONTNEED, lo, hi - lo)


def _whole_pages(start: int, end: int) -> tuple[int, int]:
    """The bounds of the whole pages inside ``[start, end)`` (``hi <= lo`` when there is none)."""
    return -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE


def release_clean_file_pages(addr: int, nbytes: int) -> int:
    """Drop from this process's resident set the whole pages of the ``nbytes`` at address ``addr`` if they are pages
    of a file mapping that nothing wrote (what a memory-mapped checkpoint holds until written): they stay in the page
    cache, and read back the same bytes if touched again. Returns the bytes dropped; 0, leaving everything as it
    was, unless the range lies in one mapping of a file and, in a private (copy-on-write) mapping, no page of it
    is a private copy (checked in ``/proc/self/pagemap``; a written page would lose the write). Linux only.

    For memory copied out of such a mapping (torch's CPU INT8 GEMV reads aligned codes: a model loaded by
    ``from_pretrained`` holds them at the file's offsets), so that the copy does not double the resident set.
    A write into the range between the check and the drop, by another thread, would be lost: call it on memory
    that nothing writes."""
    if not sys.platform.startswith("linux") or nbytes <= 0:
        return 0
    lo, hi = _whole_pages(addr, addr + nbytes)
    if hi <= lo:
        return 0
    try:
        shared = _file_mapping(lo, hi)
        if shared is None:
            return 0
        if not shared:  # copy-on-write: every page still the file's (bit 61), none swapped out (bit 62)
            fd = os.open("/proc/self/pagemap", os.O_RDONLY)
            try:
                entries = np.frombuffer(os.pread(fd, 8 * ((hi - lo) // _PAGE), 8 * (lo // _PAGE)), np.uint64)
            finally:
                os.close(fd)
            if entries.size != (hi - lo) // _PAGE:
                return 0
            present, swapped, file_page = (entries >> np.uint64(b) & np.uint64(1) for b in (63, 62, 61))
            if swapped.any() or (present & (file_page ^ np.uint64(1))).any():
                return 0
        if _libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED or 4) != 0:
            return 0
    except OSError:
        return 0
    return hi - lo


def _file_mapping(lo: int, hi: int) -> bool | None:
    """Whether ``[lo, hi)`` lies in one mapping of a file: True if shared, False if private, None if not."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            start, end = (int(v, 16) for v in fields[0].split("-"))
            if start <= lo < end:
                path = fields[5].strip() if len(fields) == 6 else ""
                if hi > end or fields[4] == "0" or not path.startswith("/") or path.endswith("(deleted)"):
                    return None
                return fields[1][3] == "s"
    return None


def trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc's ``malloc_trim``; a no-op elsewhere). After a
    compress-while-loading, the per-layer temporaries of transformers' loader threads stay in glibc's arenas as
    free memory the process still holds: an INT8 load of a 179 MiB model kept 750 MiB resident, 281 MiB after this
    (2-core machine, 2026-12-04). One call, at the end of a load."""
    trim = getattr(_libc(), "malloc_trim", None) if sys.platform.startswith("linux") else None
    if trim is not None:
        trim(0)


@functools.cache
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc


def open_regular(path, what: str = "containers", alternative: str = "for a stream, read its bytes yourself and "
                 "pass them to CompressedArray.from_bytes"):
    """Open ``path`` for reading if it is a regular file, else raise ValueError naming the alternative (``what``
    is read from files, and ``alternative`` is the way otherwise).

    Character devices and pipes (``/dev/zero``, a FIFO) report a size of 0 and can be read forever.
    """
    # O_NONBLOCK: opening a FIFO with no writer would otherwise wait for one, forever (it changes nothing for a
    # regular file, whose reads never block)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    if not regular:
        os.close(fd)
        raise ValueError(f"{os.fspath(path)!r} is not a regular file; cupycodec reads {what} from files "
                         f"({alternative})")
    return os.fdopen(fd, "rb")
