"""Compressed checkpoints: :func:`save_compressed` and :func:`load_compressed`, safetensors files and no pickle.

A checkpoint (format version 1) is a directory, written the same way by :func:`save_compressed` and by
transformers' ``save_pretrained`` (:mod:`.hf`):

* ``model.safetensors``, or shards ``model-00001-of-0000N.safetensors`` and ``model.safetensors.index.json``
  (Hugging Face's names), and for a transformers model its ``config.json`` with a ``quantization_config``;
* the tensors, named as in the model's state dict:

  - ``<layer>.packed``: a :class:`CompressedLinear`'s container as the layer holds it (uint8: prelude, header,
    payload; lossless and int8+entropy), so loading hands the bytes over without a copy;
  - ``<layer>.qweight``, ``<layer>.scale``: an int8 layer's codes and scales as they are;
  - every other parameter and persistent buffer (embeddings, norms, biases, an uncompressed output head): a
    lossless container's payload (uint8; byte planes + zstd, never larger than the tensor);

* in every shard's metadata, ``cupycodec``: JSON with the format version, a checkpoint id, the fingerprint of the
  key the containers are signed with (if any), each compressed layer's configuration, and per tensor its role and
  either its container's prelude and header (base64; for a packed layer, a copy of the bytes the tensor starts
  with) or, for codes and scales, its CRC32.

Loading checks everything the metadata says against the model before it reads a payload byte, reads the shards
through a memory map one tensor at a time (its CRCs checked, its pages dropped once used), puts each tensor on the
target device, and changes the model only when every tensor has been read: an error leaves the model as it was.

Checkpoints are untrusted unless the caller vouches for them (``trusted=True``) or they are signed with a key the
caller holds: by default this user's key (:mod:`._signing`), which :func:`save_compressed` signs with, so a
checkpoint saved here loads here as trusted. Untrusted containers decode only through decoders hardened against
crafted input (CPU zstd and the like), never through nvCOMP, so a crafted file cannot crash the CUDA context.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
import re
import secrets
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

import cupycodec as cc
from cupycodec import registry
from cupycodec._files import release_clean_file_pages
from cupycodec.backends.cpu import crc32
from cupycodec.container import _check_key, check_mac, header_json, parse_json, verify_chunks
from cupycodec.errors import AuthenticationError, FormatError, UnsupportedVersionError, UntrustedError

from . import _signing
from ._shards import INDEX, WEIGHTS, ShardFile, read_index, write_shards
from .dlpack import TORCH_DTYPES, dtype_name, host_bits, usable_device
from .linear import MODES, CompressedLinear
from .model import install

__all__ = ["FORMAT_VERSION", "load_compressed", "save_compressed"]

FORMAT_VERSION = 1
META_KEY = "cupycodec"
ROLES = ("packed", "plain", "dense")
# An empty tensor whose name transformers lists among the unexpected keys when it reads a checkpoint without knowing
# cupycodec (its other keys then fail to load, with a size mismatch), so the report says what to do.
SENTINEL = "cupycodec checkpoint: import cupycodec.integrations before from_pretrained, pip install cupycodec"


# -- what a checkpoint holds ----------------------------------------------------------------------------------------


def checkpoint_state(model: torch.nn.Module, *, key: bytes | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of ``model``'s checkpoint (the files' contents before sharding). Tensors stay where
    they are (a device payload is copied to the host when its shard is written); non-layer tensors are compressed
    losslessly on the CPU here."""
    # every name of a layer reachable under several (compress_model replaced it under each): the state dict holds its
    # tensors under each, stored once and aliased, and a loader takes an alias only of a layer's or a dense tensor
    layers = {fqn: m for fqn, m in model.named_modules(remove_duplicate=False) if isinstance(m, CompressedLinear)}
    for fqn, m in layers.items():
        if m.bias is not None and m.bias.dtype != m.weight_dtype:  # a loader builds the bias in the weight's dtype
            raise ValueError(f"layer {fqn!r}: its bias is {m.bias.dtype} and its compressed weight {m.weight_dtype} "
                             "(the model was cast after compressing, e.g. .float()), which a checkpoint cannot "
                             f"describe; cast the model back (model.to({m.weight_dtype})) before saving, or compress "
                             "it in the dtype it should be saved in")
    untrusted = [fqn for fqn, m in layers.items() if m._template is not None and not m._template.trusted]
    if key is not None and untrusted:
        # their payloads came from a checkpoint nobody vouched for: signing them here would make its copy load as
        # trusted (eligible for nvCOMP's decoders, which are not hardened against crafted input)
        warnings.warn(f"{len(untrusted)} compressed layers ({', '.join(untrusted[:3])}"
                      f"{', ...' if len(untrusted) > 3 else ''}) came from an untrusted checkpoint: this checkpoint is "
                      "saved unsigned, so it loads untrusted too. To vouch for them, load the original with "
                      "trusted=True (or its key), then save", stacklevel=3)
        key = None
    table: dict = {"format_version": FORMAT_VERSION, "checkpoint": secrets.token_hex(8),
                   "signed_by": _signing.fingerprint(key) if key is not None else None,
                   "layers": {fqn: m.config() for fqn, m in layers.items()}, "tensors": {}, "aliases": {}}
    tensors: dict[str, torch.Tensor] = {}
    first: dict = {}  # identity of a tensor's bytes -> the first key holding them
    for name, t in model.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name!r} in the state dict is a {type(t).__name__}; checkpoints hold tensors only")
        if t.device.type == "meta":
            raise ValueError(f"{name!r} is on the meta device (offloaded?); move the model to a real device first")
        owner, _, attr = name.rpartition(".")
        if attr == "weight" and owner in layers:
            # a compressed layer computes with its own buffers and holds no weight: one there is transformers'
            # tie_weights() tying a compressed head to the embedding again, which is not saved (as an alias, it named
            # a tensor the loader refuses); the checkpoint's layer is the compressed head, untied when loaded
            continue
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
                 t.dtype)
        if ident in first and t.numel():
            table["aliases"][name] = first[ident]  # a tied weight: stored once
            continue
        first[ident] = name
        layer = layers.get(owner)
        if layer is not None and attr == "packed":  # the layer's buffer as it is: loading hands it over, no copy
            c = layer._container(t.device)
            prefix = c.header_bytes(key=key)
            if prefix == c._prefix:
                tensors[name] = t.detach()
            else:  # signed: the header grows a MAC (the payload is copied once, here)
                blob = torch.empty(len(prefix) + c._header.payload_nbytes, dtype=torch.uint8, device=t.device)
                blob[: len(prefix)] = torch.frombuffer(bytearray(prefix), dtype=torch.uint8)
                blob[len(prefix) :] = t.detach()[len(c._prefix) :]
                tensors[name] = blob
            table["tensors"][name] = {"role": "packed", "header": base64.b64encode(prefix).decode()}
        elif layer is not None and attr in ("qweight", "scale"):
            tensors[name] = t.detach()
            host = _host_bytes(t)
            table["tensors"][name] = {"role": "plain", "crc32": _crc(host)}
            if key is not None:  # no container MAC covers them: their own, bound to their name
                table["tensors"][name]["mac"] = _plain_mac(key, name, host)
        else:
            c = cc.compress(t.detach().to("cpu"), codec="auto")  # CPU codecs: hardened decoders read them anywhere
            tensors[name] = torch.from_numpy(np.frombuffer(c.host_payload(), np.uint8).copy())
            table["tensors"][name] = {"role": "dense",
                                      "header": base64.b64encode(c.header_bytes(key=key)).decode()}
    tensors[SENTINEL] = torch.zeros(0, dtype=torch.uint8)
    if key is not None:  # which tensor is which (names, roles, headers, layers, aliases): signed as a whole, and
        # each container entry bound to its name on its own (so a changed one is named)
        for name, entry in table["tensors"].items():
            if entry["role"] != "plain":
                entry["mac"] = _entry_mac(key, name, entry)
        table["manifest_mac"] = _signing.mac(key, b"manifest", _manifest_text(table))
    return tensors, {META_KEY: json.dumps(table, sort_keys=True, separators=(",", ":"))}


def _manifest_text(table: dict) -> bytes:
    return json.dumps({k: v for k, v in table.items() if k != "manifest_mac"}, sort_keys=True,
                      separators=(",", ":")).encode()


def _entry_mac(key: bytes, name: str, entry: dict) -> str:
    text = json.dumps({k: v for k, v in entry.items() if k != "mac"}, sort_keys=True, separators=(",", ":"))
    return _signing.mac(key, b"entry", name.encode(), text.encode())


def _plain_mac(key: bytes, name: str, host: np.ndarray) -> str:
    return _signing.mac(key, b"plain", name.encode(), host)


def _host_bytes(t: torch.Tensor) -> np.ndarray:
    host = t.detach().to("cpu").contiguous()
    if not host.numel():  # torch refuses a byte view of an empty tensor of another dtype (its stride is 0)
        return np.empty(0, np.uint8)
    return host.reshape(-1).view(torch.uint8).numpy()


def _crc(host: np.ndarray) -> int:
    """The CRC32 of a tensor's bytes (:func:`_host_bytes`)."""
    return crc32(host) if host.size else 0


@dataclass
class _Table:
    """A checkpoint's metadata, checked: what the loader knows before reading a payload byte."""

    version: int
    checkpoint: str
    signed_by: str | None
    layers: dict
    tensors: dict
    aliases: dict
    raw: dict = field(default_factory=dict, repr=False)  # the metadata as read (the signed manifest's text)
    where: str = ""  # the shard it was read from, for errors

    @classmethod
    def parse(cls, text: str, where: str) -> _Table:
        obj = parse_json(text, f"{where}: the {META_KEY!r} metadata")
        version = obj.get("format_version") if isinstance(obj, dict) else None
        if type(version) is not int or version < 1:  # true, 1.0, 0 and -1 were taken (or misnamed)
            raise FormatError(f"{where}: the {META_KEY!r} metadata has no valid format_version (an int from 1), got "
                              f"{version!r}")
        if version > FORMAT_VERSION:
            raise UnsupportedVersionError(f"{where}: checkpoint format", version, FORMAT_VERSION)
        for name, kind in (("checkpoint", str), ("layers", dict), ("tensors", dict), ("aliases", dict)):
            if not isinstance(obj.get(name), kind):
                raise FormatError(f"{where}: the {META_KEY!r} metadata lacks {name!r}")
        if not isinstance(obj.get("signed_by"), (str, type(None))):  # a key's fingerprint, or null
            raise FormatError(f"{where}: the {META_KEY!r} metadata's signed_by must be a key fingerprint or null")
        for name, entry in obj["tensors"].items():
            if not isinstance(entry, dict) or entry.get("role") not in ROLES:
                raise FormatError(f"{where}: tensor {name!r} has no valid role in the metadata")
        for alias, src in obj["aliases"].items():
            # a writer stores a tied tensor once and names it here: a key both stored and aliased skipped the
            # stored tensor's checks, and a list or a missing source failed later with TypeError or KeyError
            if not isinstance(src, str) or src not in obj["tensors"] or alias in obj["tensors"]:
                raise FormatError(f"{where}: alias {alias!r} -> {src!r} must name a stored tensor, and not be "
                                  f"stored itself; the {META_KEY!r} metadata is corrupt or crafted")
        return cls(obj["format_version"], obj["checkpoint"], obj.get("signed_by"), obj["layers"], obj["tensors"],
                   obj["aliases"], obj, where)

    def check_modes(self) -> None:
        """Refuse layers of a mode this cupycodec does not know, once the table's MAC (with a key) has been checked:
        a signed table edited to another mode is an AuthenticationError, not a call to upgrade."""
        for fqn, cfg in self.layers.items():
            mode = cfg.get("mode") if isinstance(cfg, dict) else None
            if mode not in MODES:
                raise FormatError(f"{self.where}: layer {fqn!r} has mode {mode!r}, which this cupycodec does not know "
                                  f"({', '.join(MODES)}): a newer cupycodec's checkpoint (upgrade cupycodec), or a "
                                  "corrupt or crafted one")


def _prefix(entry: dict, where: str) -> bytes:
    try:
        return base64.b64decode(entry["header"], validate=True)
    except (KeyError, TypeError, binascii.Error) as exc:
        raise FormatError(f"{where}: its container header in the metadata is not valid base64") from exc


# -- reading -------------------------------------------------------------------------------------------------------


class Checkpoint:
    """A checkpoint directory's files and metadata, opened and checked (no payload read yet)."""

    def __init__(self, directory):
        self.directory = os.fsdecode(directory)  # a bytes path too, as open() takes
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(f"{self.directory!r} is not a directory (a checkpoint is a directory of "
                                    "safetensors files)")
        self.files = self._files()
        self.shards: dict[str, ShardFile] = {}
        self.where: dict[str, str] = {}  # tensor -> file name
        table = None
        try:
            for name in self.files:
                shard = self.shards[name] = ShardFile(os.path.join(self.directory, name))
                text = shard.metadata.get(META_KEY)
                if text is None:
                    raise FormatError(f"{shard.path} is not a cupycodec checkpoint (its metadata has no "
                                      f"{META_KEY!r}); load it with transformers or safetensors")
                t = _Table.parse(text, shard.path)
                if table is None:
                    table, first_text = t, text
                elif t.checkpoint != table.checkpoint:
                    raise FormatError(f"{shard.path} belongs to another save than {self.files[0]} (checkpoint ids "
                                      f"{t.checkpoint} and {table.checkpoint}): an interrupted save? Save again")
                elif text != first_text:  # every shard carries the same table: one edited alone is not trusted
                    raise FormatError(f"{shard.path}: its {META_KEY!r} metadata differs from {self.files[0]}'s")
                for tensor in shard.tensors:
                    if tensor == SENTINEL:
                        continue
                    if tensor in self.where:
                        raise FormatError(f"tensor {tensor!r} is in both {self.where[tensor]} and {name}")
                    self.where[tensor] = name
            self.table: _Table = table  # type: ignore[assignment]
            stored, listed = set(self.where), set(self.table.tensors)
            if stored != listed:
                raise FormatError(f"{self.directory}: the metadata and the files disagree: tensors in the files "
                                  f"only {sorted(stored - listed)[:5]}, in the metadata only "
                                  f"{sorted(listed - stored)[:5]}")
        except BaseException:  # the shards' maps go with the error (a caller keeping it kept them all)
            self.close()
            raise

    def _files(self) -> list[str]:
        # A save removes the other layout's files (write_shards; save_pretrained through the quantizer), so both
        # here are two saves, one of them stale, and which is which cannot be told: transformers would read
        # model.safetensors whichever it is, and load the older model without a word
        index = os.path.join(self.directory, INDEX)
        if os.path.exists(os.path.join(self.directory, WEIGHTS)):
            if os.path.exists(index):
                raise FormatError(f"{self.directory} holds both {WEIGHTS} and {INDEX}: files of two saves, one of "
                                  "them stale; remove the older, or save again into an empty directory")
            return [WEIGHTS]
        if os.path.exists(index):
            obj = read_index(index)
            wm = obj.get("weight_map") if isinstance(obj, dict) else None
            if wm is None:
                raise FormatError(f"{index}: not a safetensors index (no weight_map)")
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise FormatError(f"{index}: its weight_map must map tensor names to shard file names")
            names = sorted(set(wm.values()))
            if not names:  # no shard: no table either (an AttributeError on None followed)
                raise FormatError(f"{index}: its weight_map names no shard")
            for n in names:
                if os.path.basename(n) != n:
                    raise FormatError(f"{index}: names a shard {n!r} outside the checkpoint directory")
                if n in ("", os.curdir, os.pardir):  # their own basenames, yet the directory or its parent
                    raise FormatError(f"{index}: names a shard {n!r} that is no file name in the checkpoint "
                                      "directory")
                if not os.path.exists(os.path.join(self.directory, n)):
                    raise FileNotFoundError(f"shard {n} is missing from {self.directory} (listed in {INDEX}); "
                                            "copy the whole checkpoint directory")
            return names
        raise FileNotFoundError(f"{self.directory} holds neither {WEIGHTS} nor {INDEX}: not a checkpoint")

    def close(self) -> None:
        for shard in self.shards.values():
            shard.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _trust(table: _Table, trusted: bool, key) -> bytes | None:
    """The key to check MACs with, or None when the checkpoint is trusted as it is or untrusted; then the table's
    layer modes are checked (after its MAC)."""
    mac_key = _mac_key(table, trusted, key)
    table.check_modes()
    return mac_key


def _mac_key(table: _Table, trusted: bool, key) -> bytes | None:
    """The key to check MACs with, or None when the checkpoint is trusted as it is or untrusted.

    A key wins over ``trusted`` (as in :meth:`cupycodec.CompressedArray.from_bytes` and the Zarr codec): a caller
    who vouches for the source to allow nvCOMP and passes the key for integrity gets both, not a load whose tampered
    tensors go unchecked. So does this user's own key, for a checkpoint it signed (``trusted=True`` skipped its
    MACs), except one signed before tables were (no ``manifest_mac``), which ``trusted=True`` is the way to load."""
    if not isinstance(trusted, bool):
        raise TypeError(f"trusted must be a bool, got {trusted!r}")
    if key is not None:
        key = _check_key(key)
        if table.signed_by is None:
            raise AuthenticationError("this checkpoint is not signed, so key= cannot vouch for it (load it without "
                                      "key=, with trusted=True, if you trust where it came from)")
        if _signing.fingerprint(key) != table.signed_by:
            raise AuthenticationError("this checkpoint is signed with another key than the one given")
        _check_manifest(table, bytes(key))
        return bytes(key)
    mine = _signing.local_key(create=False)
    if mine is not None and table.signed_by == _signing.fingerprint(mine) and \
            not (trusted and not isinstance(table.raw.get("manifest_mac"), str)):
        _check_manifest(table, mine)
        return mine
    return None


def _check_manifest(table: _Table, key: bytes) -> None:
    """Raise AuthenticationError unless the table (which tensor is which, layers, aliases) is as the key's holder
    signed it: the containers' MACs cover their bytes, not their names, and INT8 codes and scales have none."""
    want = table.raw.get("manifest_mac")
    if not isinstance(want, str):
        raise AuthenticationError("this checkpoint is signed but its table is not (saved by a cupycodec before "
                                  "2026-12-04, whose signature did not cover which tensor is which, nor INT8 codes): "
                                  "save it again, or load it with trusted=True (and without key=) if you trust where "
                                  "it came from")
    if not hmac.compare_digest(want, _signing.mac(key, b"manifest", _manifest_text(table.raw))):
        for name, entry in table.tensors.items():  # which entry, where one says so
            if entry.get("role") != "plain" and not hmac.compare_digest(str(entry.get("mac")),
                                                                        _entry_mac(key, name, entry)):
                raise AuthenticationError(f"tensor {name!r}: its entry in the checkpoint's table (role, container "
                                          "header) was changed after it was signed, or moved from another tensor")
        raise AuthenticationError("the checkpoint's table (which tensors it holds, its layers or aliases, a plain "
                                  "tensor's CRC) was changed after it was signed")


def _untrusted_codec(prefix: bytes, where: str) -> str | None:
    obj = header_json(prefix)
    segments = obj.get("segments", [])
    if not isinstance(segments, list):  # null or a number was iterated (TypeError), a dict as its keys
        raise FormatError(f"{where}: its container header's segments must be a list")
    for seg in segments:
        cid = seg.get("codec", {}).get("id") if isinstance(seg, dict) and isinstance(seg.get("codec"), dict) \
            else None
        try:
            codec = registry.get_codec(cid) if isinstance(cid, str) else None
        except cc.UnknownCodecError as exc:
            raise FormatError(f"{where}: {exc}") from exc
        if codec is None or not getattr(codec, "untrusted_ok", False):
            return str(cid)
    return None


@dataclass
class _Plan:
    """What goes where: checked against the model before any payload is read."""

    layers: dict  # fqn -> CompressedLinear config
    dense: dict  # key -> (shape, dtype) in the model
    order: list  # (file, key) in file order
    probes: dict  # fqn -> an empty CompressedLinear of that configuration, on the meta device (checks containers)


def _plan(ckpt: Checkpoint, model: torch.nn.Module, device: torch.device, trusted: bool, strict: bool) -> _Plan:
    table = ckpt.table
    state = model.state_dict(keep_vars=True)
    layer_keys, dense, probes = set(), {}, {}
    for fqn, cfg in table.layers.items():
        where = f"{ckpt.directory}: layer {fqn!r}"
        try:
            module = model.get_submodule(fqn)
            probe = probes[fqn] = module if _empty_as(module, cfg) else CompressedLinear.from_config(cfg,
                                                                                                     device="meta")
        except AttributeError:
            raise ValueError(f"{where} is not in this {type(model).__name__} (a checkpoint of another model?)") \
                from None
        except ValueError as exc:  # the file's configuration: its mode was checked when the table was read
            raise FormatError(f"{where}: {exc}") from None
        if not isinstance(module, torch.nn.Linear | CompressedLinear) or \
                (module.in_features, module.out_features) != (probe.in_features, probe.out_features) or \
                (module.bias is not None) != (probe.bias is not None):
            got = f"{type(module).__name__}({getattr(module, 'in_features', '?')}, " \
                  f"{getattr(module, 'out_features', '?')}, bias={getattr(module, 'bias', None) is not None})"
            raise ValueError(f"{where} holds a Linear({probe.in_features}, {probe.out_features}, "
                             f"bias={probe.bias is not None}); the model has {got} there")
        for attr, t in probe.state_dict(keep_vars=True).items():
            name = f"{fqn}.{attr}"
            layer_keys.add(name)
            if name in table.aliases:
                continue  # the same tensor as another layer's (a tied weight): checked there
            if name not in table.tensors:
                raise FormatError(f"{where}: the checkpoint lacks {name!r}")
            _check_stored(ckpt, name, t, attr, trusted, device, probe)
            if attr == "bias":
                dense[name] = (tuple(t.shape), t.dtype)
    for name, entry in table.tensors.items():
        if name in layer_keys:
            continue
        where = f"{os.path.join(ckpt.directory, ckpt.where[name])}: tensor {name!r}"
        if entry["role"] != "dense":
            raise FormatError(f"{where} is a {entry['role']!r} tensor of no compressed layer in the metadata")
        target = state.get(name)
        if target is None:
            raise ValueError(f"{where} is not in this {type(model).__name__}'s state dict (a checkpoint of another "
                             "model?)")
        _check_stored(ckpt, name, target, None, trusted, device, None)
        dense[name] = (tuple(target.shape), target.dtype)
    def expected(name):  # (what it is, shape, dtype, layer config) of the tensor the model holds as ``name``
        if name in layer_keys:
            fqn, _, attr = name.rpartition(".")
            t = probes[fqn].state_dict(keep_vars=True)[attr]
            kind = attr if attr != "bias" else "dense"
            return kind, (None if attr == "packed" else tuple(t.shape)), t.dtype, \
                (probes[fqn].config() if attr == "packed" else None)
        t = state[name]
        return "dense", tuple(t.shape), t.dtype, None

    for alias, src in table.aliases.items():
        if src not in table.tensors or (alias not in state and alias not in layer_keys) or \
                (src not in state and src not in layer_keys):
            raise FormatError(f"{ckpt.directory}: alias {alias!r} -> {src!r} names a tensor that is not there")
        if expected(alias) != expected(src):  # the model would hold the source's tensor there as it is
            raise FormatError(f"{ckpt.directory}: alias {alias!r} -> {src!r}: the model holds another kind, shape "
                              f"or dtype of tensor at each ({expected(alias)[:3]} and {expected(src)[:3]}); the "
                              "metadata is corrupt or crafted")
    if strict:
        covered = layer_keys | set(dense) | set(table.aliases)
        prefixes = tuple(f + "." for f in table.layers)
        missing = [k for k in state if k not in covered and not k.startswith(prefixes)]
        if missing:
            raise ValueError(f"{ckpt.directory} lacks {len(missing)} tensors of this {type(model).__name__}: "
                             f"{missing[:5]}{' ...' if len(missing) > 5 else ''} (pass strict=False to keep the "
                             "model's own)")
    order = sorted((ckpt.where[n], ckpt.shards[ckpt.where[n]].tensors[n].start, n) for n in table.tensors)
    return _Plan(dict(table.layers), dense, [(f, n) for f, _, n in order], probes)


def _empty_as(module: torch.nn.Module, cfg) -> bool:
    """Whether ``module`` is an empty layer of configuration ``cfg`` (as from_pretrained swaps in before loading):
    then it serves as its own probe, instead of another one built from the same configuration (~80 us a layer).
    Types must match too: ``True == 1`` and ``128.0 == 128``, but from_config refuses the latter of each."""
    if not isinstance(module, CompressedLinear) or not isinstance(cfg, dict) or \
            any(t.device.type != "meta" for t in module._stored()):
        return False
    mine = module.config()
    return cfg == mine and all(type(cfg[k]) is type(v) for k, v in mine.items())


def _check_stored(ckpt: Checkpoint, name: str, target: torch.Tensor, attr: str | None, trusted: bool,
                  device: torch.device, layer: CompressedLinear | None) -> None:
    """Check what the file and metadata say of tensor ``name`` against ``target`` (the model's, or a layer's own
    buffer for ``attr``), and that it can be decoded under this trust."""
    file = ckpt.where[name]
    where = f"{os.path.join(ckpt.directory, file)}: tensor {name!r}"
    entry, info = ckpt.table.tensors[name], ckpt.shards[file].tensors[name]
    role = entry["role"]
    want_role = {"packed": "packed", "qweight": "plain", "scale": "plain"}.get(attr or "", "dense")
    if role != want_role:
        raise FormatError(f"{where} is stored as {role!r}, expected {want_role!r}")
    if role == "plain":
        if info.dtype != target.dtype or info.shape != tuple(target.shape):
            raise ValueError(f"{where} is {dtype_name(info.dtype)}{list(info.shape)}; the model expects "
                             f"{dtype_name(target.dtype)}{list(target.shape)}")
        if not isinstance(entry.get("crc32"), int):
            raise FormatError(f"{where}: its CRC32 is missing from the metadata")
        return
    if info.dtype != torch.uint8 or len(info.shape) != 1:
        raise FormatError(f"{where}: a container payload is a 1-D uint8 tensor, the file holds "
                          f"{dtype_name(info.dtype)}{list(info.shape)}")
    prefix = _prefix(entry, where)
    try:
        head = header_json(prefix)
        arr = head["array"]
        shape, dt = tuple(arr["shape"]), arr["dtype"]
        if not isinstance(dt, str):  # a list would fail the dtype lookups below (unhashable)
            raise TypeError(f"dtype {dt!r} is no dtype name")
    except (cc.FormatError, KeyError, TypeError) as exc:
        raise FormatError(f"{where}: its container header is not valid ({exc})") from exc
    if role == "packed":
        target = torch.empty((layer.out_features, layer.in_features), dtype=layer.weight_dtype, device="meta")
    if shape != tuple(target.shape) or dt != dtype_name(target.dtype):
        # a checkpoint holds each tensor in one dtype, read back as it is: a model of another dtype is refused
        own = str(TORCH_DTYPES.get(dt, dt))
        hint = "" if shape != tuple(target.shape) else (
            f": the checkpoint holds {own} tensors; load it in its own dtype (from_pretrained: dtype={own}, or "
            f"dtype=\"auto\" where config.json names it; load_compressed(directory, model): a model in {own})")
        raise ValueError(f"{where} holds {dt}{list(shape)}; the model expects {dtype_name(target.dtype)}"
                         f"{list(target.shape)}{hint}")
    if not trusted:
        bad = _untrusted_codec(prefix, where)
        if bad is not None or (role == "packed" and device.type == "cuda"):
            how = f"its codec {bad!r} has no decoder hardened against crafted input" if bad else \
                "a compressed layer on a GPU decodes through nvCOMP, which is not hardened against crafted input"
            raise UntrustedError(bad or "nvCOMP", message=(
                f"{where}: the checkpoint is untrusted (not signed with your key) and {how}. If you trust its "
                "source, pass trusted=True (from_pretrained: quantization_config=CupycodecConfig(trusted=True)); if "
                "you hold the key it was signed with, pass key=it"))


class Checks:
    """Whole-tensor checks (CRCs, and MACs under a key) on worker threads, while tensors are read and placed:
    ``wait()`` raises the first failure, in submission order, naming its file and tensor. A loader calls it before
    the model changes (compressed layers decode only at forward, so nothing reads a payload unchecked); dense
    tensors, which are decoded while loading, are checked before that, on the caller's thread."""

    def __init__(self, workers: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1),
                                        thread_name_prefix="cupycodec-checks")
        self._jobs: list = []

    def submit(self, where: str, fn, *args) -> None:
        from concurrent.futures import Future

        from cupycodec.backends import cpu

        job = cpu.submit(fn, *args, pool=self._pool)
        if job is None:  # a load in an atexit handler: Python refuses new work to pools by then
            job = Future()  # the check runs here, in the calling thread, its result or error kept for wait()
            try:
                job.set_result(fn(*args))
            except Exception as err:
                job.set_exception(err)
        self._jobs.append((where, job))

    def abandon(self) -> None:
        """Drop the pending checks (after another error); returns once none is running."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._jobs = []

    def wait(self) -> None:
        try:
            for where, job in self._jobs:
                try:
                    job.result()
                except (cc.CupycodecError, ValueError) as exc:
                    raise _named(exc, where) from None
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._jobs = []


class PlacedChecks:
    """The CRCs of codes, scales and packed layers bound for a GPU, checked there once every tensor is placed: one
    launch of the CRC kernel per device over every chunk and tensor (:func:`cupycodec.engine.verify.device_crc32`),
    instead of on the host while loading. On the host those checks read every mapped page once more in tens of
    thousands of small ISA-L calls, and a profiled Llama-2-7B load on the H200's host waited 1.8 s (int8) and 2.3 s
    (lossless) for them at its end (benchmarks/RESULTS.md). The host still checks the MACs (keyed BLAKE3 has no
    GPU kernel here); a tensor that stayed on the host (a device map with "cpu" blocks) is checked there."""

    def __init__(self):
        self._jobs: list = []  # (where, name, container without payload or None, whole-tensor CRC32 or None)

    def add(self, where: str, name: str, *, container=None, crc: int | None = None) -> None:
        self._jobs.append((where, name, container, crc))

    def run(self, lookup) -> None:
        """Check every registered tensor where ``lookup(name)`` says it is now; raises the first mismatch (per
        device, in registration order) as :class:`~cupycodec.ChecksumError` naming the file and the tensor."""
        from cupycodec.engine.verify import device_crc32

        by_device: dict[int, list] = {}
        for where, name, c, crc in self._jobs:
            t = lookup(name)
            nbytes = t.numel() * t.element_size()
            if c is not None and nbytes != len(c._prefix) + c._header.payload_nbytes:
                raise FormatError(f"{where}: {nbytes} bytes were placed, its container has "
                                  f"{len(c._prefix) + c._header.payload_nbytes}")
            if t.device.type == "cuda" and t.is_contiguous():
                by_device.setdefault(t.get_device(), []).append((where, name, c, crc, t, nbytes))
                continue
            try:
                if c is None:
                    got = _crc(_host_bytes(t))
                    if got != crc:
                        raise cc.ChecksumError(name, crc, got)
                else:
                    host = t.detach().contiguous().cpu().view(torch.uint8).reshape(-1).numpy()
                    verify_chunks(c._header, memoryview(host[len(c._prefix) :]))
            except cc.ChecksumError as exc:
                raise _named(exc, where) from None
        for device, jobs in by_device.items():
            ptrs, sizes, want, rows = [], [], [], []  # rows: (first row, job, segment name or None)
            n = 0
            for job in jobs:
                where, name, c, crc, t, nbytes = job
                if c is None:
                    if nbytes:
                        rows.append((n, job, None))
                        ptrs.append([t.data_ptr()])
                        sizes.append([nbytes])
                        want.append([crc])
                        n += 1
                    elif crc != 0:
                        raise _named(cc.ChecksumError(name, crc, 0), where)
                    continue
                base = np.uint64(t.data_ptr() + len(c._prefix))
                for seg in c.segments:
                    if seg.n_chunks:
                        rows.append((n, job, seg.name))
                        ptrs.append(seg.chunk_offsets.astype(np.uint64) + base)
                        sizes.append(seg.table.comp_nbytes)
                        want.append(seg.table.crc32)
                        n += seg.n_chunks
            if not n:
                continue
            want_h = np.concatenate([np.asarray(w, dtype=np.uint32) for w in want])
            got = device_crc32(np.concatenate(ptrs), np.concatenate(sizes), device,
                               torch.cuda.current_stream(device).cuda_stream)
            bad = np.flatnonzero(got != want_h)
            if bad.size:
                row = int(bad[0])
                first, (where, name, *_), seg = [r for r in rows if r[0] <= row][-1]
                exc = cc.ChecksumError(seg or name, int(want_h[row]), int(got[row]),
                                       **({"chunk": row - first} if seg is not None else {}))
                raise _named(exc, where)


def _read(ckpt: Checkpoint, plan: _Plan, device: torch.device, trusted: bool, key, progress: bool,
          checks: Checks, placed: PlacedChecks | None = None) -> dict:
    """Every tensor on ``device`` (its host checks submitted to ``checks``, its GPU checks to ``placed``): name ->
    tensor, and the packed layers' containers under ``("template", fqn)``."""
    out: dict = {}
    items = plan.order
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="loading", unit="tensor")
    for file, name in items:
        shard = ckpt.shards[file]
        view = shard.tensor(name)
        where = f"{shard.path}: tensor {name!r}"
        deferred = []
        got = _materialize_host(name, ckpt.table.tensors[name], view, trusted, key, plan, where,
                                defer=deferred.append, placed=placed)
        for k, v in got.items():
            if isinstance(v, torch.Tensor):  # to the device; off the memory map either way
                shares = v.numel() and v.untyped_storage().data_ptr() == view.untyped_storage().data_ptr()
                v = v.to(device, copy=bool(shares))
            out[k] = v
        if deferred:  # the check reads the mapped bytes; their pages go once it is done
            checks.submit(where, _then_release, deferred[0], shard, name)
        else:
            shard.release(name)
        del view
    return out


def _then_release(check, shard: ShardFile, name: str) -> None:
    try:
        check()
    finally:
        shard.release(name)


def _named(exc: BaseException, where: str) -> BaseException:
    """``exc`` (same type and attributes) with ``where`` in front of its message."""
    exc.args = (f"{where}: {exc}",)
    return exc


def _materialize_host(name: str, entry: dict, host: torch.Tensor, trusted: bool, key, plan: _Plan,
                      where: str, defer=None, placed: PlacedChecks | None = None) -> dict:
    """Check one stored tensor (its bytes as read, on the host) and make what the model holds of it, on the host:
    ``{name: tensor}``, and for a packed layer its container under ``("template", layer)``. Errors name ``where``.

    The CRC and MAC checks of tensors that are not decoded here (codes, scales, packed layers) go to ``defer(fn)``
    when given (to run before the model changes), else run now; with ``placed`` (the tensors go to a GPU), their
    CRCs go there instead. A dense tensor's CRCs are checked here, before it is decoded (on the CPU, by decoders
    hardened against crafted input), and its MAC goes to ``defer``."""
    try:
        if entry["role"] == "plain":
            def check_plain_mac():
                if not hmac.compare_digest(str(entry.get("mac")), _plain_mac(key, name, _host_bytes(host))):
                    raise AuthenticationError("MAC mismatch: the tensor was changed after it was signed")

            if placed is not None:
                placed.add(where, name, crc=entry["crc32"])
                if key is not None:
                    (defer or _now)(check_plain_mac)
                return {name: host}

            def check_plain():
                got = _crc(_host_bytes(host))
                if got != entry["crc32"]:
                    raise cc.ChecksumError(name, entry["crc32"], got)
                if key is not None:  # after the CRC: an accident reads as a checksum error, a forgery as a bad MAC
                    check_plain_mac()

            (defer or _now)(check_plain)
            return {name: host}
        if host.dtype != torch.uint8 or host.dim() != 1:
            raise FormatError(f"a container is stored as a 1-D uint8 tensor, got {host.dtype} {list(host.shape)}")
        prefix = _prefix(entry, where)
        if entry["role"] == "packed":  # the whole container, its prelude and header also in the metadata
            blob = host.numpy()
            if bytes(blob[: len(prefix)]) != prefix:
                raise FormatError("its container's prelude and header differ from the metadata's copy")
            payload = blob[len(prefix) :]
        else:
            payload = host.numpy()
        # parsed now (header, tables); chunk CRCs, then the MAC (an accident reads as a checksum error, a forgery as
        # a bad MAC), below
        c = cc.CompressedArray.from_parts(prefix, payload, verify=False, trusted=trusted)
        # one thread per MAC: the checks of many tensors already run side by side (Checks)
        mac = None if key is None else (lambda: check_mac(key, c._header, payload, threads=1))
        if entry["role"] == "packed":
            fqn = name.rpartition(".")[0]
            plan.probes[fqn]._expect(c)
            template = c.without_payload()
            if placed is not None:  # the CRCs where the bytes land (PlacedChecks.run, before the MACs are awaited)
                placed.add(where, name, container=template)
                if mac is not None:
                    (defer or _now)(mac)
            else:
                def check():
                    verify_chunks(c._header, payload)
                    if mac is not None:
                        mac()

                (defer or _now)(check)
            return {name: host, ("template", fqn): template}
        verify_chunks(c._header, payload)  # decoded below: its CRCs first

        def release():
            # the model holds the decoded tensor: the mapped file's pages of its compressed bytes leave the
            # resident set (unwritten file pages only; a read after this reads them back from the page cache)
            release_clean_file_pages(payload.ctypes.data, payload.nbytes)

        if mac is not None:  # the decoders below are hardened (CPU ones), so the MAC may finish on a worker
            (defer or _now)(lambda: (mac(), release()))
        shape, dtype = plan.dense[name]
        out = torch.empty(shape, dtype=dtype)
        # hardened CPU decoders, whatever the trust (these tensors are small); into a NumPy bit view of ``out``,
        # which spares a first DLPack export from torch its import cost (~0.6 s)
        cc.decompress(c, out=host_bits(out))
        release()
        return {name: out}
    except (cc.CupycodecError, ValueError) as exc:
        raise _named(exc, where) from None


def _now(fn) -> None:
    fn()


def set_tensor(module: torch.nn.Module, attr: str, value: torch.Tensor) -> None:
    """Put ``value`` into ``module`` as its parameter or buffer ``attr`` (a parameter keeps requires_grad)."""
    if attr in module._parameters:
        old = module._parameters[attr]
        if not isinstance(value, torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
        module._parameters[attr] = value
    else:
        module._buffers[attr] = value


def tie_aliases(model: torch.nn.Module, aliases: dict) -> None:
    """Make each alias the very tensor its source is, in ``model`` as loaded (transformers' loader reads the
    stored tensors only); a tied packed layer also gets its source's container header."""
    for alias, src in aliases.items():
        owner, _, attr = alias.rpartition(".")
        src_owner, _, src_attr = src.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        src_module = model.get_submodule(src_owner) if src_owner else model
        set_tensor(module, attr, getattr(src_module, src_attr))
        if attr == "packed" and isinstance(module, CompressedLinear):
            module._set_template(src_module._template)


def _install(model: torch.nn.Module, plan: _Plan, loaded: dict, aliases: dict, device: torch.device) -> None:
    """Put what was read into ``model`` (Python attribute changes only)."""
    def get(name):
        return loaded[aliases.get(name, name)]

    new, by_module = {}, {}
    for fqn, cfg in plan.layers.items():
        old = model.get_submodule(fqn)  # the module it replaces: its flags carry over, as compress_model keeps them
        first = by_module.get(id(old))
        # one module under several names, saved as one (the table aliases this name's tensors to the first's): one
        # layer under each again, as compress_model made it; saved as two layers, two (the model's sharing goes)
        if first is not None and all(aliases.get(f"{fqn}.{a}") == f"{first[0]}.{a}" for a in first[1]._buffers):
            new[fqn] = first[1]
            continue
        layer = CompressedLinear.from_config(cfg, device="meta")
        layer.train(old.training)
        for attr in list(layer._buffers):
            layer._buffers[attr] = get(f"{fqn}.{attr}")
        if layer.bias is not None:
            grad = old.bias is not None and old.bias.requires_grad
            layer.bias = torch.nn.Parameter(get(f"{fqn}.bias"), requires_grad=grad)
        src = aliases.get(f"{fqn}.packed", f"{fqn}.packed").rpartition(".")[0]
        if ("template", src) in loaded:
            layer._set_template(loaded[("template", src)])
        new[fqn] = layer
        by_module.setdefault(id(old), (fqn, layer))
    layer_keys = {f"{fqn}.{a}" for fqn, layer in new.items() for a in layer.state_dict()}
    for name in [*plan.dense, *(a for a in aliases if a not in layer_keys)]:
        if name in layer_keys:
            continue  # a layer's bias: set above
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if name in plan.dense:
            value = loaded[name]
        else:  # an alias: the very tensor its source now is
            src_owner, _, src_attr = aliases[name].rpartition(".")
            src_module = new.get(src_owner) or (model.get_submodule(src_owner) if src_owner else model)
            value = getattr(src_module, src_attr)
        set_tensor(module, attr, value)
    install(model, new)
    from . import hf
    from .model import _hf_models

    for inner in _hf_models(model):  # as compress_model: what save_pretrained and dequantize() need
        layers = [m.config() for m in inner.modules() if isinstance(m, CompressedLinear)]
        if layers:
            cfg = hf._summary_config(layers)
            hf.attach(inner, cfg.mode, cfg.granularity, cfg.group_size, cfg.codec)
    left = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    left += [f"{n} (buffer)" for n, t in model.named_buffers() if t.device.type == "meta"]
    if left:
        raise ValueError(f"after loading, {left[:5]} are still on the meta device; build the model on a real device, "
                         "or load a transformers checkpoint with load_compressed(directory) / from_pretrained")


# -- the API ---------------------------------------------------------------------------------------------------------


def _shard_nbytes(size) -> int:
    """``max_shard_size`` in bytes: a positive int, the same as a string of digits (what a command line gives), or a
    size with a unit (``"5GB"``, ``"500MiB"``)."""
    nbytes = 0
    if isinstance(size, int) and not isinstance(size, bool):
        nbytes = size
    elif isinstance(size, str) and size.strip().isascii() and size.strip().isdigit():
        nbytes = int(size)
    elif m := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)\s*", str(size), re.IGNORECASE):
        unit = m.group(2).upper()
        base = 1024 if "I" in unit else 1000
        nbytes = int(float(m.group(1)) * base ** "KMGT".index(unit[0]) * base)
    if nbytes <= 0:
        raise ValueError(f"max_shard_size must be a byte count or a size like '5GB' or '500MiB' (more than 0), got "
                         f"{size!r}")
    return nbytes


def _check_output_directory(directory: str) -> None:
    """Refuse an output that exists and is not a directory, before anything is loaded or compressed (creating the
    directory would fail only after that work)."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory!r} is a file, not a directory: give a directory (new, or one to write "
                                 "the checkpoint into)")


DEFAULT_SHARD_SIZE = "50GB"  # transformers 5's save_pretrained default: a model of that size or less is one file


def save_compressed(model: torch.nn.Module, directory, *, max_shard_size=DEFAULT_SHARD_SIZE, key=None) -> list[str]:
    """Write ``model`` (compressed by :func:`compress_model`) to ``directory`` as a compressed checkpoint.

    Parameters
    ----------
    model : torch.nn.Module
        Its :class:`CompressedLinear` layers are stored as they are; every other parameter and persistent buffer is
        compressed losslessly. A transformers model also gets its ``config.json`` (with a ``quantization_config``)
        and ``generation_config.json``, so ``from_pretrained`` reads the directory.
    directory : str, bytes or PathLike
        Created if needed. Files of an earlier checkpoint there are replaced; other files are left alone.
    max_shard_size : int or str
        Largest shard, in bytes or as ``"5GB"`` / ``"500MiB"``; a larger tensor gets a shard of its own. The
        default is transformers' (``save_pretrained``): loading maps every shard and keeps each mapped until the
        model is built, so several shards hold their sum in the resident set where one holds its own size.
    key : bytes, False or None
        The secret to sign the containers with: by default this user's key (created on first use, see
        :mod:`cupycodec.integrations.torch._signing`), so the checkpoint loads here as trusted; ``False`` for none.

    Returns the names of the files written. Each file is written atomically.
    """
    if key is None:
        key = _signing.local_key(create=True)
    elif key is False:
        key = None
    else:
        key = _check_key(key)  # bytes of a random secret: a str gave "string argument without an encoding"
    max_nbytes = _shard_nbytes(max_shard_size)
    directory = os.fsdecode(directory)
    _check_output_directory(directory)
    tensors, metadata = checkpoint_state(model, key=key)
    os.makedirs(directory, exist_ok=True)
    table = json.loads(metadata[META_KEY])
    config = getattr(model, "config", None)
    configs = {}
    if config is not None and hasattr(config, "to_json_string"):
        from . import hf

        configs = hf.stage_configs(model, directory, table)
    # The configs are written first, under temporary names, and renamed into place after the weights: a config
    # that cannot be serialized or written (a read-only config.json) fails before any weight is replaced, and a
    # failure while writing the weights (the long step: a full disk) leaves the old config beside the old weights.
    # Renamed last, not first: a new config.json beside the old weights describes shapes they lack, as much as the
    # reverse. What is left between the two steps is renames; only a crash between them mixes the two saves.
    try:
        names = write_shards(directory, tensors, {"format": "pt", **metadata}, max_nbytes,
                             {"cupycodec_checkpoint": table["checkpoint"]})
        for f in configs.values():
            f.commit()
    finally:
        for f in configs.values():
            f.discard()  # after a commit, nothing
    return names + list(configs)


def load_compressed(directory, model: torch.nn.Module | None = None, *, device=None, trusted: bool = False,
                    key=None, strict: bool = True, progress: bool = True, offload: str | None = None,
                    max_gpu_memory=None) -> torch.nn.Module:
    """Load a checkpoint written by :func:`save_compressed` (or ``save_pretrained``) and return the model.

    Parameters
    ----------
    directory : str, bytes or PathLike
    model : torch.nn.Module, optional
        The model to load into, built as it was saved (same shapes and dtype): its Linear layers are replaced by the
        checkpoint's compressed ones, its other tensors by the checkpoint's. Without it, a transformers checkpoint
        (one with a ``config.json``) is loaded through ``from_pretrained``, which builds the model empty and never
        holds uncompressed weights: prefer that for a transformers model. A model built on the meta device
        (``with torch.device("meta"): ...``) loads only if the checkpoint holds every tensor it needs, and
        non-persistent buffers are never in a checkpoint (a transformers LLM's rotary ``inv_freq``, for one): build
        such a model on the CPU.
    device : str or torch.device, optional
        Where the tensors go: default the model's device, else CUDA when available, else the CPU.
    trusted : bool
        Vouch for the checkpoint: its containers may then reach nvCOMP's decoders.
    key : bytes, optional
        The key the checkpoint was signed with (default: this user's, when it signed it); its MACs are checked,
        with ``trusted=True`` too (the key wins over ``trusted``).
    strict : bool
        Require the checkpoint to cover every tensor of the model's state dict (without ``model``: of the model
        its ``config.json`` describes), checked before any tensor is read.
    progress : bool
        Show a tqdm progress bar (without ``model``: transformers' loading bars).
    offload : {"cpu", None}
        ``"cpu"``: load onto the host, then place the model on the GPU (``device``, else the current one) with its
        blocks' compressed weights in pinned host memory (:func:`~cupycodec.integrations.torch.offload_model`; its
        report is ``model.cupycodec_offload``).
    max_gpu_memory : int or str, optional
        With offloading, a budget for the model's device memory (e.g. ``"8GiB"``). Implies ``offload="cpu"``.

    Raises
    ------
    FileNotFoundError
        A missing directory or shard (named); without ``model``, a directory without a ``config.json``.
    cupycodec.FormatError
        A truncated, corrupt (:class:`~cupycodec.ChecksumError`) or newer (:class:`~cupycodec.UnsupportedVersionError`)
        file, naming the file and the tensor.
    ValueError
        A tensor or layer that does not match the model, or a layer mode this version does not know (named).
    cupycodec.UntrustedError, cupycodec.AuthenticationError
        An untrusted checkpoint that would need nvCOMP, or a key that does not match.

    The model changes only once every tensor has been read.
    """
    directory = os.fsdecode(directory)
    from .offload import _compute_device, check_options, offload_model

    offload = check_options(offload, max_gpu_memory)  # checked before any byte is read
    if offload is not None:  # the model is read onto the host, then placed
        target = _compute_device(device)
        loaded = load_compressed(directory, model, device="cpu", trusted=trusted, key=key, strict=strict,
                                 progress=progress)
        untrusted = next((f for f, m in loaded.named_modules() if isinstance(m, CompressedLinear)
                          and m._template is not None and not m._template.trusted), None)
        if untrusted is not None:  # the CPU took it; offloaded layers decode on the GPU, through nvCOMP
            raise UntrustedError("nvCOMP", message=(
                f"{directory}: layer {untrusted!r}: the checkpoint is untrusted (not signed with your key), and an "
                "offloaded model decodes its layers on the GPU through nvCOMP, which is not hardened against crafted "
                "input; it was loaded onto the CPU and not offloaded. If you trust its source, pass trusted=True; if "
                "you hold the key it was signed with, pass key=it"))
        loaded.cupycodec_offload = offload_model(loaded, offload, max_gpu_memory=max_gpu_memory, device=target)
        return loaded
    if model is None:
        from . import hf

        return hf.from_pretrained(directory, device=device, trusted=trusted, key=key, strict=strict,
                                  progress=progress)
    device = _device(device, model)
    t0 = time.perf_counter()
    with Checkpoint(directory) as ckpt:
        try:
            mac_key = _trust(ckpt.table, trusted, key)
        except AuthenticationError as exc:
            raise _named(exc, str(ckpt.directory)) from None
        trust = trusted or mac_key is not None
        plan = _plan(ckpt, model, device, trust, strict)
        checks = Checks()
        placed = PlacedChecks() if device.type == "cuda" else None
        try:
            loaded = _read(ckpt, plan, device, trust, mac_key, progress, checks, placed)
            if placed is not None:  # CRCs first: an accident reads as a checksum error, a forgery as a bad MAC
                placed.run(loaded.__getitem__)
        except BaseException:
            checks.abandon()
            raise
        checks.wait()  # every CRC and MAC, before the model changes (and before the files close)
    _install(model, plan, loaded, ckpt.table.aliases, device)
    model._cupycodec_load_seconds = time.perf_counter() - t0
    return model


def _device(device, model: torch.nn.Module) -> torch.device:
    if device is None:
        real = next((t.device for t in model.state_dict().values() if t.device.type != "meta"), None)
        device = real or ("cuda" if torch.cuda.is_available() else "cpu")
    return usable_device(device)  # before trust rules name nvCOMP's decoders instead of a missing device
