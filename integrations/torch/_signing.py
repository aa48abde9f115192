"""This user's signing key: checkpoints saved here carry MACs under it, so loading them here needs no trust flag.

A checkpoint from elsewhere is untrusted (its containers decode only through decoders hardened against crafted
input), unless the caller vouches for it (``trusted=True``) or holds the key it was signed with. The key is 32
random bytes in ``$CUPYCODEC_KEY_FILE``, else ``$XDG_CONFIG_HOME/cupycodec/signing.key`` (``~/.config/...``),
created on first save with mode 0600; a key file others can read is not used.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
import warnings

from cupycodec._files import temporary_path

__all__ = ["fingerprint", "key_path", "local_key", "mac"]

KEY_ENV = "CUPYCODEC_KEY_FILE"
KEY_NBYTES = 32


def key_path() -> str:
    path = os.environ.get(KEY_ENV)
    if path:
        return path
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "cupycodec", "signing.key")


def fingerprint(key: bytes) -> str:
    """A name for ``key`` that reveals nothing about it (SHA-256 with a domain prefix), stored in checkpoints."""
    return hashlib.sha256(b"cupycodec signing key v1\0" + bytes(key)).hexdigest()[:32]


_MAC_CONTEXT = "cupycodec checkpoint 2026-12-04 manifest and plain tensors v1"


def mac(key: bytes, *parts) -> str:
    """Keyed BLAKE3 (hex) over ``parts`` (bytes-like), each length-prefixed: a checkpoint's manifest (its table:
    which tensor is which, the layers, the aliases) and its plain tensors (INT8 codes and scales, which carry no
    container MAC), under a key derived from the signing key for this use alone."""
    import blake3

    k = blake3.blake3(bytes(key), derive_key_context=_MAC_CONTEXT).digest()
    m = blake3.blake3(key=k)
    for part in parts:
        view = memoryview(part).cast("B")
        m.update(len(view).to_bytes(8, "little"))
        m.update(view)
    return m.hexdigest()


def local_key(*, create: bool) -> bytes | None:
    """This user's key, created if missing and ``create``; None (with a warning that says why) when it cannot be
    used."""
    path = key_path()
    try:
        # O_NONBLOCK: a FIFO there would otherwise wait for a writer forever (the check below then refuses it)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        if not create:
            return None
        return _create(path)
    except OSError as exc:
        warnings.warn(f"cannot read the signing key {path}: {exc}; checkpoints are saved unsigned", stacklevel=3)
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
            warnings.warn(f"the signing key {path} is not a regular file readable by its owner alone (chmod 600 "
                          "it); it is not used", stacklevel=3)
            return None
        data = f.read(KEY_NBYTES + 1)
    if len(data) != KEY_NBYTES:
        warnings.warn(f"the signing key {path} does not hold {KEY_NBYTES} bytes; it is not used (delete it to "
                      "make a new one)", stacklevel=3)
        return None
    return data


def _create(path: str) -> bytes | None:
    """Write a new key beside ``path`` and link it into place, so no reader ever sees a partial key."""
    key = secrets.token_bytes(KEY_NBYTES)
    tmp = temporary_path(path)  # cut to fit the file system's limit on a name, as the key's name does
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    except FileExistsError:  # another process made it first
        return local_key(create=False)
    except OSError as exc:
        warnings.warn(f"cannot create the signing key {path} ({exc}); checkpoints are saved unsigned (set "
                      f"{KEY_ENV} to a writable path)", stacklevel=4)
        return None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return key
