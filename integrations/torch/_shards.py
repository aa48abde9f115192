"""Safetensors files for checkpoints: a checked reader over a memory map, and sharded atomic writes.

The reader checks every offset against the file before anything is read, so a truncated or crafted file raises
:class:`cupycodec.FormatError` naming the file and the tensor; it hands out tensors as NumPy views of the mapped
file (no copy) and drops their pages from the resident set once used, so reading a shard costs little more memory
than the tensor in hand. Writing goes through ``safetensors.torch.save_file`` into a temporary file renamed into
place, shard by shard (Hugging Face's names: ``model.safetensors``, or ``model-00001-of-00003.safetensors`` and
``model.safetensors.index.json``).
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import re
import struct
from typing import NamedTuple

import numpy as np
import torch

from cupycodec._files import atomic_write, atomic_write_path, open_regular, release_pages
from cupycodec.container import MAX_NDIM, parse_json
from cupycodec.errors import FormatError

from .dlpack import TORCH_DTYPES

__all__ = ["INDEX", "WEIGHTS", "ShardFile", "open_file", "read_index", "split", "write_shards"]

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_MAX_HEADER = 100 * 2**20  # safetensors' own limit
# an index takes ~100 bytes a tensor: room for 600,000 tensors, where the largest models hold ~100,000
_MAX_INDEX = 64 * 2**20

DTYPES = TORCH_DTYPES  # safetensors' dtype names are the container's


class TensorInfo(NamedTuple):
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offsets in the file
    end: int


class ShardFile:
    """One safetensors file, its header checked, its tensors readable as views of a private memory map."""

    def __init__(self, path: str):
        self.path = path
        with open_file(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: {size} bytes is too short for a safetensors file (truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise FormatError(f"{path}: its header claims {n} bytes, the file holds {size} (truncated, or not "
                                  "a safetensors file)")
            header = parse_json(f.read(n), f"{path}: the safetensors header")
            if not isinstance(header, dict):
                raise FormatError(f"{path}: the safetensors header is not a JSON object")
            meta = header.pop("__metadata__", None) or {}
            if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
                raise FormatError(f"{path}: its __metadata__ must map names to strings")
            self.metadata: dict[str, str] = meta
            base, data_nbytes = 8 + n, size - 8 - n
            self.tensors: dict[str, TensorInfo] = {}
            for name, info in header.items():
                self.tensors[name] = _tensor_info(path, name, info, base, data_nbytes)
            end = max((t.end for t in self.tensors.values()), default=base) - base
            if end != data_nbytes:  # safetensors refuses it ("not fully covered"): one loader took it, another not
                raise FormatError(f"{path}: {data_nbytes - end} bytes after its last tensor (appended to, or not "
                                  "a safetensors file)")
            # mapped once the header holds: a file refused above leaves no map behind (a caller keeping the error
            # kept the whole file mapped)
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None

    def view(self, name: str) -> np.ndarray:
        """The tensor's bytes (uint8, a view of the mapped file: valid while this file is open)."""
        t = self.tensors[name]
        if t.end == t.start:
            return np.empty(0, np.uint8)
        return np.frombuffer(self._mm, np.uint8, t.end - t.start, t.start)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor as stored (a view of the mapped file)."""
        t = self.tensors[name]
        if t.end == t.start:  # torch refuses a Float view of empty bytes (their stride is 0)
            return torch.empty(t.shape, dtype=t.dtype)
        return torch.from_numpy(self.view(name)).view(t.dtype).reshape(t.shape)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process's resident set (they stay in the page cache)."""
        if self._mm is not None:
            t = self.tensors[name]
            release_pages(self._mm, t.start, t.end)

    def close(self) -> None:
        if self._mm is not None:
            with contextlib.suppress(BufferError):  # views still alive (a traceback holds them): unmapped when freed
                self._mm.close()
            self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_file(path):
    """``path`` (a shard or the index) opened for reading, or FormatError if it is not a regular file: a FIFO would
    wait for a writer forever, and a link to ``/dev/zero`` would be read until memory ran out."""
    try:
        return open_regular(path, "checkpoints", "a checkpoint is a directory of regular files, as save_compressed "
                            "writes it: copy its files, not pipes or links to devices")
    except ValueError as exc:
        raise FormatError(str(exc)) from None


def read_index(path: str):
    """The JSON of the index file ``path``, read through :func:`open_file`; FormatError if it is larger than any
    index (64 MiB) or not JSON."""
    with open_file(path) as f:
        raw = f.read(_MAX_INDEX + 1)
    if len(raw) > _MAX_INDEX:
        raise FormatError(f"{path}: more than {_MAX_INDEX // 2**20} MiB, larger than the index of any model (a crafted "
                          "or corrupt file)")
    return parse_json(raw, path)


def _tensor_info(path: str, name: str, info, base: int, data_nbytes: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict) or not isinstance(info.get("shape"), list) or \
            not isinstance(info.get("data_offsets"), list) or len(info["data_offsets"]) != 2:
        raise FormatError(f"{where}: its entry must hold dtype, shape and data_offsets")
    dtype = DTYPES.get(info["dtype"]) if isinstance(info.get("dtype"), str) else None  # a list: unhashable
    if dtype is None:
        raise FormatError(f"{where}: dtype {info.get('dtype')!r} is not one checkpoints use ({', '.join(DTYPES)})")
    shape, (a, b) = info["shape"], info["data_offsets"]
    # bounded before the product below: over 100,000 huge dimensions it took minutes, and its number could not
    # even be formatted into the message
    if len(shape) > MAX_NDIM:
        raise FormatError(f"{where}: its shape has {len(shape)} dimensions, more than the {MAX_NDIM} a tensor may "
                          "have (a crafted or corrupt file)")
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in (*shape, a, b)):
        raise FormatError(f"{where}: shape and offsets must be non-negative integers (less than 2**63)")
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if b - a != nbytes:
        raise FormatError(f"{where}: offsets {a}-{b} hold {b - a} bytes, its shape {shape} needs {nbytes}")
    if b > data_nbytes:
        raise FormatError(f"{where}: its bytes {a}-{b} run past the file's {data_nbytes} data bytes (truncated?)")
    return TensorInfo(dtype, tuple(shape), base + a, base + b)


def split(sizes: dict[str, int], max_nbytes: int) -> list[list[str]]:
    """Names in order, cut into shards of at most ``max_nbytes`` (a larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    total = 0
    for name, n in sizes.items():
        if shards[-1] and total + n > max_nbytes:
            shards.append([])
            total = 0
        shards[-1].append(name)
        total += n
    return shards


def write_shards(directory: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str], max_nbytes: int,
                 index_metadata: dict) -> list[str]:
    """Write ``tensors`` as shards with ``metadata`` in each, then the index, then remove the shards and index of
    an earlier save that this one does not overwrite; return the file names. Each file is written atomically; a
    reader tells shards of different saves apart by the checkpoint id in their metadata."""
    import safetensors.torch

    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    groups = split(sizes, max_nbytes)
    names = [WEIGHTS] if len(groups) == 1 else \
        [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, keys in zip(names, groups):
        shard = {k: tensors[k].detach().to("cpu").contiguous() for k in keys}  # one shard in host memory at a time
        atomic_write_path(os.path.join(directory, name),
                          lambda tmp, shard=shard: safetensors.torch.save_file(shard, tmp, metadata=metadata))
        del shard
    index_path = os.path.join(directory, INDEX)
    if len(names) > 1:
        index = {"metadata": {"total_size": sum(sizes.values()), **index_metadata},
                 "weight_map": {k: name for name, keys in zip(names, groups) for k in keys}}
        text = json.dumps(index, indent=2, sort_keys=True).encode() + b"\n"
        atomic_write(index_path, lambda f: f.write(text))
    else:
        with contextlib.suppress(FileNotFoundError):  # another save into the directory may remove it first
            os.unlink(index_path)
    for old in os.listdir(directory):
        if (old == WEIGHTS or _SHARD_NAME.match(old)) and old not in names:
            with contextlib.suppress(FileNotFoundError):  # (a save that had written every file failed here)
                os.unlink(os.path.join(directory, old))
    return names
