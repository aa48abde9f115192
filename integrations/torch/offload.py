"""Host offload: a compressed model's blocks kept in pinned host memory and streamed to the GPU, under a VRAM budget.

:func:`offload_model` places an already compressed model (:func:`~cupycodec.integrations.torch.compress_model`,
:func:`~cupycodec.integrations.torch.load_compressed`): every tensor goes to the GPU except the compressed weights
of the transformer blocks chosen for offloading, which go to pinned host memory. In the forward pass the runtime
(:mod:`.runtime`) copies block ``i + 2``'s compressed bytes to the GPU on a copy stream and decodes block ``i + 1``
on a side stream while block ``i`` computes, all ordered by events: weights cross PCIe compressed, so an offloaded
model streams at up to (host-to-device bandwidth x compression ratio).

With ``max_gpu_memory``, the first blocks stay resident as long as the model's device memory (its other tensors,
resident blocks, decode slots and staging buffers) fits the budget; the rest are offloaded. Activations and the KV
cache are not part of the budget.
"""

from __future__ import annotations

import numbers
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

import cupycodec as cc

from . import runtime
from .linear import CompressedLinear
from .model import find_blocks, install
from .runtime import DecodeGroup

__all__ = ["OffloadReport", "check_options", "dispatch_model", "map_blocks", "map_gpu", "offload_model", "parse_nbytes",
           "place_mapped"]

_ALIGN = 256
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _a(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def parse_nbytes(value) -> int:
    """Bytes (at least one) from a number (an int, a NumPy integer, a whole float such as ``8e9``) or a string such as
    ``"8GiB"``, ``"8 GB"``, ``"512MiB"`` (ValueError otherwise)."""
    nbytes = None
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        nbytes = int(value) if float(value).is_integer() else None
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", value.lower())
        nbytes = int(float(m.group(1)) * _UNITS[m.group(2) or ""]) if m else None
    if nbytes is None or nbytes < 1:  # "0.5" is no byte at all
        raise ValueError(f"max_gpu_memory must be a positive number of bytes or a size such as '8GiB' or '500MB', "
                         f"got {value!r}")
    return nbytes


def check_options(offload, max_gpu_memory) -> str | None:
    """The offload setting that ``offload=`` and ``max_gpu_memory=`` ask for (a budget implies "cpu"), checked
    before anything is done: ValueError for another value or a size that does not parse."""
    if max_gpu_memory is not None:
        parse_nbytes(max_gpu_memory)
        offload = "cpu" if offload is None else offload
    if offload not in ("cpu", None):
        raise ValueError(f"offload must be 'cpu' or None, got {offload!r}")
    return offload


@dataclass
class OffloadReport:
    """Where :func:`offload_model` put a model: ``resident`` and ``offloaded`` block names, and its estimate of the
    device memory the model holds (``device_nbytes``: other tensors, resident blocks, slots and staging) and of the
    host memory of the offloaded blocks (``host_nbytes``, pinned unless ``pinned`` is False)."""

    device: str
    resident: list[str] = field(default_factory=list)
    offloaded: list[str] = field(default_factory=list)
    device_nbytes: int = 0
    host_nbytes: int = 0
    pinned: bool = True

    def __str__(self) -> str:
        return (f"{len(self.offloaded)} of {len(self.resident) + len(self.offloaded)} blocks offloaded to "
                f"{'pinned' if self.pinned else 'pageable'} host memory ({self.host_nbytes / 2**30:.2f} GiB); "
                f"{self.device_nbytes / 2**30:.2f} GiB on {self.device}")


@dataclass
class _Block:
    name: str
    module: torch.nn.Module
    layers: list[CompressedLinear]
    stored: int  # bytes of the layers' stored tensors, as staged (aligned)
    decoded: int  # bytes of the slot the block decodes into (0 for resident INT8: used in place)

    def slot_if(self, offloaded: bool) -> int:
        return self.decoded if (offloaded or any(m.mode != "int8" for m in self.layers)) else 0


def _blocks(model: torch.nn.Module) -> list[_Block]:
    out = []
    for name, block in find_blocks(model):
        layers = [m for m in block.modules() if isinstance(m, CompressedLinear)]
        if layers:
            stored = sum(_a(t.numel() * t.element_size()) for m in layers for t in m._stored())
            decoded = sum(_a(nb) for m in layers for nb in m._decoded_nbytes())
            out.append(_Block(name, block, layers, stored, decoded))
    return out


def _tensors(model: torch.nn.Module):
    """(module, kind, name, tensor) for every parameter and buffer, each tensor once (tied ones at first sight)."""
    seen = set()
    for module in model.modules():
        for kind, table in (("param", module._parameters), ("buffer", module._buffers)):
            for name, t in table.items():
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                yield module, kind, name, t


def _device_nbytes(model, blocks: list[_Block], offloaded) -> int:
    """The model's device bytes when the blocks of index set ``offloaded`` (an int k: blocks k and after) are
    offloaded and the rest stay resident: its tensors there, and what its runtime allocates on a GPU, per thread
    that runs it: two decode slots (the largest group's: a block, or a compressed layer outside any block, such as
    a head), two staging buffers (the largest offloaded block), and two wide buffers where a large batch's INT8
    blocks are dequantized (:data:`runtime.WIDE`). The slots were sized by blocks alone and the wide buffers left
    out: a model with its head compressed, or an INT8 prefill, held up to twice its budget."""
    off = set(range(offloaded, len(blocks))) if isinstance(offloaded, int) else set(offloaded)
    offloaded_ids = {id(t) for i in off for m in blocks[i].layers for t in m._stored()}
    rest = sum(t.numel() * t.element_size() for _, _, _, t in _tensors(model) if id(t) not in offloaded_ids)
    in_blocks = {id(m) for b in blocks for m in b.layers}
    loose = list({id(m): m for m in model.modules() if isinstance(m, CompressedLinear) and id(m) not in in_blocks}
                 .values())
    slot = max([b.slot_if(i in off) for i, b in enumerate(blocks)] +
               [DecodeGroup([m], "").nbytes for m in loose], default=0)
    staging = max((blocks[i].stored for i in off), default=0)
    wide = max([DecodeGroup(b.layers, b.name).wide_nbytes for b in blocks] +
               [DecodeGroup([m], "").wide_nbytes for m in loose], default=0) if runtime.WIDE else 0
    return rest + 2 * slot + 2 * staging + 2 * wide


def plan(model: torch.nn.Module, max_gpu_memory=None) -> tuple[list[_Block], int, int]:
    """``(blocks, k, device_nbytes)``: the first ``k`` blocks stay resident. Without a budget every block is
    offloaded; with one, the most that fit. ValueError names the minimum when no split fits."""
    blocks = _blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no transformer block with compressed layers to offload; "
                         "compress it first (compress_model or load_compressed)")
    if max_gpu_memory is None:
        return blocks, 0, _device_nbytes(model, blocks, 0)
    budget = parse_nbytes(max_gpu_memory)
    # not monotonic in k: resident blocks add their bytes, offloaded ones need staging buffers as large as the
    # largest of them, so the best split is looked for over every k
    sizes = [_device_nbytes(model, blocks, k) for k in range(len(blocks) + 1)]
    fits = [k for k, n in enumerate(sizes) if n <= budget]
    if not fits:
        need = min(sizes)
        raise ValueError(f"max_gpu_memory={max_gpu_memory!r} ({budget / 2**30:.2f} GiB) is below the minimum for this "
                         f"model, {need / 2**30:.2f} GiB ({need} bytes): its other tensors, its resident blocks, two "
                         f"decode slots, two staging buffers of an offloaded block and, for INT8 layers, two buffers "
                         f"a large batch dequantizes a block into, for the best split; give at least that")
    k = max(fits)
    return blocks, k, sizes[k]


def _compute_device(device) -> torch.device:
    if device is None:
        if not torch.cuda.is_available():
            raise cc.BackendUnavailableError("offload='cpu' keeps compressed weights on the host and decodes them on "
                                             "a GPU, and torch sees no CUDA device here; run on a machine with one, "
                                             "or keep the model on the CPU without offload")
        device = "cuda"
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"offload='cpu' decodes on a GPU: device must be a CUDA device, got {device}")
    if not torch.cuda.is_available():
        raise cc.BackendUnavailableError(f"offload onto {device}: torch sees no CUDA device here")
    return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)


_warned_pageable = False


def _to_host(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    global _warned_pageable
    h = t.detach().to("cpu")
    try:
        return h.pin_memory(), True
    except RuntimeError as exc:  # no pinnable memory (container limits, an exhausted lock limit)
        if not _warned_pageable:
            _warned_pageable = True
            warnings.warn(f"offload: pinned host memory is unavailable ({exc}); the offloaded weights stay in pageable "
                          "memory, whose copies to the GPU are slower and synchronous with the host",
                          cc.PerformanceWarning, stacklevel=3)
        return h, False


def offload_model(model: torch.nn.Module, offload: str | None = "cpu", *, max_gpu_memory=None,
                  device=None) -> OffloadReport:
    """Place a compressed model on ``device`` (default: the current CUDA device) with its blocks' compressed
    weights in pinned host memory, streamed to the GPU as the blocks run (see the module docstring).

    Parameters
    ----------
    offload : {"cpu", None}
        ``"cpu"``: offload (all blocks, or what ``max_gpu_memory`` leaves over); None: every block resident.
    max_gpu_memory : int or str, optional
        A budget for the model's device memory, e.g. ``"8GiB"``: the first blocks stay resident while it holds.
    device : optional
        The GPU the model computes on.

    Raises
    ------
    ValueError
        An uncompressed model, a budget below the minimum (which the message gives), a non-CUDA device.
    cupycodec.BackendUnavailableError
        No CUDA device.
    torch.OutOfMemoryError
        The GPU ran out of memory while the tensors were copied; nothing was moved then.

    Every new copy is made before the first module changes, so a failure leaves the model as it was. Moving the
    model afterwards (``model.to(...)``) moves the offloaded weights too; call :func:`offload_model` again after it.
    """
    if offload not in ("cpu", None):
        raise ValueError(f"offload must be 'cpu' or None, got {offload!r}")
    if getattr(model, "_cupycodec_runtime", None) is None:
        raise ValueError(f"{type(model).__name__} is not compressed: compress_model(model, mode) or load_compressed "
                         "first, then offload it")
    dev = _compute_device(device)
    if offload is None:
        blocks = _blocks(model)
        k, device_nbytes = len(blocks), _device_nbytes(model, blocks, len(blocks))
    else:
        blocks, k, device_nbytes = plan(model, max_gpu_memory)
    return _place(model, dev, blocks, k, device_nbytes)


def _place(model: torch.nn.Module, dev: torch.device, blocks: list[_Block], offloaded,
           device_nbytes: int, *, others_stay: bool = False) -> OffloadReport:
    """The offloaded blocks' stored tensors (``offloaded``: index set, or an int k for blocks k and after) to
    (pinned) host memory, every other tensor to ``dev`` (with ``others_stay``, only those of the offloaded blocks:
    the rest stay where a device map put them); regroup and rehook."""
    off = set(range(offloaded, len(blocks))) if isinstance(offloaded, int) else set(offloaded)
    host_ids = {id(t) for i in off for m in blocks[i].layers for t in m._stored()}
    moved_ids = {id(t) for i in off for t in blocks[i].module.parameters()} | \
        {id(t) for i in off for t in blocks[i].module.buffers()}
    new, pinned, host_nbytes = {}, True, 0
    try:
        for _, _, _, t in _tensors(model):
            if id(t) in host_ids:
                new[id(t)], ok = _to_host(t)
                pinned &= ok
                host_nbytes += t.numel() * t.element_size()
            elif others_stay and id(t) not in moved_ids:
                new[id(t)] = t
            else:
                new[id(t)] = t.detach().to(dev)
    except torch.OutOfMemoryError as exc:
        new.clear()
        raise torch.OutOfMemoryError(f"offload: {dev} ran out of memory while the model was copied to it (about "
                                     f"{device_nbytes / 2**30:.2f} GiB needed); nothing was moved. Give a smaller "
                                     f"max_gpu_memory, or free memory on the device. ({exc})") from exc
    # every copy exists: now change the modules (plain attribute work, which cannot fail half-way); `olds` keeps
    # the old tensors alive until the end, so that no id() is reused while it keys `new` and `params`
    olds = list(_tensors(model))
    params: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, t in list(module._parameters.items()):
            if t is not None:  # a tied parameter: one new Parameter for every module that holds it
                p = params.get(id(t))
                if p is None:
                    p = params[id(t)] = torch.nn.Parameter(new[id(t)], requires_grad=t.requires_grad)
                module._parameters[name] = p
        for name, t in list(module._buffers.items()):
            if t is not None:
                module._buffers[name] = new[id(t)]
    del olds
    layers = {id(m) for i in off for m in blocks[i].layers}
    for m in model.modules():
        if isinstance(m, CompressedLinear):
            m._offloaded = id(m) in layers
            m._views = {}
            if m._template is not None:
                m._restamp()  # the same bytes, moved
    quantizer = getattr(model, "hf_quantizer", None)
    if hasattr(quantizer, "offloaded"):  # cupycodec's: generate must not compile an offloaded model's decode step
        quantizer.offloaded = bool(layers)
    install(model, {})  # regroup: offloaded INT8 layers join their block's group; new runtime, slots and hooks
    return OffloadReport(str(dev), [b.name for i, b in enumerate(blocks) if i not in off],
                         [b.name for i, b in enumerate(blocks) if i in off], device_nbytes, host_nbytes, pinned)


# -- placement from an accelerate / transformers device map ------------------------------------------------------


def _as_device(value) -> torch.device | str:
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.device("cuda", value)
    if str(value) in ("cpu", "disk", "meta"):
        return str(value)
    return torch.device(value)


def _entry(name: str, device_map: dict):
    """The device map's entry covering module ``name`` (its own key, else the longest prefix, else "")."""
    keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    return _as_device(device_map[max(keys, key=len)]) if keys else None


def map_blocks(model: torch.nn.Module, device_map: dict) -> tuple[list[_Block], set[int], torch.device | None]:
    """``(blocks, offloaded, gpu)``: the compressed blocks, the indices of those ``device_map`` puts on "cpu", and
    the GPU they run on (the map's first CUDA device, as accelerate's main device). ValueError for a block the map
    splits between devices, or "disk"."""
    blocks = _blocks(model)
    off = set()
    for i, b in enumerate(blocks):
        where = _block_device(b, device_map)
        if where == "disk":
            raise ValueError(f"device_map puts block {b.name!r} on 'disk'; cupycodec keeps offloaded compressed "
                             "blocks in pinned host memory: map it to 'cpu'")
        if where == "cpu":
            off.add(i)
    return blocks, off, map_gpu(device_map)


def _block_device(block: _Block, device_map: dict):
    """Where ``device_map`` puts ``block``: the one device its every tensor maps to (by the block's own key, its
    submodules' keys, or a prefix's), as accelerate reads a map. A map may name the block or only its submodules
    (``infer_auto_device_map`` without ``no_split_module_classes``); ValueError if they go to several devices."""
    names = [f"{block.name}.{n}" for n, _ in block.module.named_parameters(remove_duplicate=False)]
    names += [f"{block.name}.{n}" for n, _ in block.module.named_buffers(remove_duplicate=False)]
    found = {str(_entry(n, device_map)): _entry(n, device_map) for n in names or [block.name]}
    if len(found) > 1 or None in found.values():
        where = sorted(k for k in found if k != "None") + (["no device"] if None in found.values() else [])
        raise ValueError(f"device_map splits block {block.name!r} between {', '.join(where)}; cupycodec places "
                         "whole blocks: map the block to one device")
    return next(iter(found.values()))


def map_gpu(device_map: dict) -> torch.device | None:
    """The first CUDA device of a device map: accelerate's main device, where "cpu" blocks are streamed to."""
    return next((d for d in map(_as_device, device_map.values()) if isinstance(d, torch.device) and d.type == "cuda"),
                None)


def place_mapped(model: torch.nn.Module, device_map: dict) -> OffloadReport | None:
    """After accelerate dispatched ``model`` by ``device_map``: the compressed blocks it mapped to "cpu" become
    offloaded blocks (their compressed tensors in pinned host memory, streamed to the map's first GPU as they run,
    instead of accelerate's synchronous per-layer copies); everything else stays where the map put it. None when
    the map puts no compressed block on the CPU."""
    blocks, off, gpu = map_blocks(model, device_map)
    if not off:
        return None
    if gpu is None:
        raise ValueError("device_map puts compressed blocks on 'cpu' and nothing on a GPU, so there is no GPU to "
                         "stream them to; map some modules to a CUDA device, or load with device_map='cpu' and no "
                         "offloading")
    from accelerate.hooks import remove_hook_from_module

    for i in off:  # accelerate's offload hooks (weights set aside, copied per forward) give way to ours;
        remove_hook_from_module(blocks[i].module, recurse=True)  # detaching puts the weights back on the host
    report = _place(model, gpu, blocks, off, _device_nbytes(model, blocks, off), others_stay=True)
    skip = getattr(model, "_skip_keys_device_placement", None)
    for i in off:  # inputs to the GPU first, before the block's decode hook reads their device
        blocks[i].module.register_forward_pre_hook(_inputs_to(gpu, skip), with_kwargs=True, prepend=True)
    return report


def dispatch_model(model: torch.nn.Module, device_map: dict, **kwargs) -> OffloadReport | None:
    """accelerate's ``dispatch_model`` for a compressed model: accelerate places every module where ``device_map``
    says (its hooks move inputs and outputs between devices), then the compressed blocks the map puts on "cpu" are
    offloaded by cupycodec, as with ``from_pretrained(device_map=...)``: their compressed tensors in pinned host
    memory, streamed to the map's first GPU a block ahead, rather than copied by accelerate before each layer.

    ``kwargs`` go to ``accelerate.dispatch_model``; ``offload_buffers`` defaults to True when blocks go to the host,
    so that their compressed tensors (buffers, which accelerate would otherwise move to the GPU) never visit it.
    Returns the :class:`OffloadReport` (also ``model.cupycodec_offload``), or None when no compressed block is on
    the host. ``accelerate.dispatch_model`` itself also runs a compressed model correctly, but keeps the compressed
    tensors of blocks mapped to "cpu" on the GPU; with ``offload_buffers=True`` (and accelerate's ``cpu_offload``
    and ``disk_offload``) a lossless or int8+entropy block cannot run: accelerate returns a module's buffers only
    around its own forward, after the block's start has decoded its layers (a RuntimeError says so).

    Raises, before anything moves: ValueError for a model that is not compressed and for a map that splits a block or
    puts one on "disk"; :class:`~cupycodec.BackendUnavailableError` for blocks on "cpu" beside a GPU torch cannot
    use. A map without a GPU is accelerate's alone (the model runs on the CPU).

    >>> report = dispatch_model(model, {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu",
    ...                                 "model.norm": 0, "lm_head": 0})  # doctest: +SKIP
    """
    if getattr(model, "_cupycodec_runtime", None) is None:
        raise ValueError(f"{type(model).__name__} is not compressed: compress_model(model, mode) or load_compressed "
                         "first, or use accelerate.dispatch_model for an uncompressed model")
    if not isinstance(device_map, dict):
        raise TypeError(f"device_map must be a dict of module names to devices, got {type(device_map).__name__}; "
                        "accelerate.infer_auto_device_map(model, max_memory=...) makes one")
    _, off, gpu = map_blocks(model, device_map)
    if gpu is None:
        off = set()  # no GPU in the map: blocks on "cpu" simply run there
    if off:
        _compute_device(gpu)  # a CUDA device torch can use, before accelerate moves anything
    from accelerate import dispatch_model as accelerate_dispatch

    kwargs.setdefault("offload_buffers", bool(off))
    accelerate_dispatch(model, device_map, **kwargs)
    report = place_mapped(model, device_map) if off else None
    model.cupycodec_offload = report
    return report


def _inputs_to(device: torch.device, skip_keys):
    from accelerate.utils import send_to_device

    def hook(module, args, kwargs):
        return send_to_device(args, device), send_to_device(kwargs, device, skip_keys=skip_keys)

    return hook

