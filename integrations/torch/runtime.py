"""Where compressed weights are decoded to: per model and device, shared scratch slots and block-batched decodes.

The layers of one transformer block form a :class:`DecodeGroup`; their weights decode together, by one engine
``run`` (one nvCOMP call per codec config, then the filter stages), into a scratch slot when the block starts. A
:class:`Runtime` owns the slots of one model: on a GPU two, each sized to the largest group, so that the next block
decodes on a side stream into one while this block computes from the other, ordered by events; on the CPU one.
Everything here runs ahead of the forward pass's math and never synchronizes: statuses accumulate on the device
until :meth:`Runtime.check`.

Scratch, plans and payloads are torch tensors (the plans' tables come from ``alloc=torch.empty``), so
``torch.cuda.memory_allocated()`` counts them.
"""

from __future__ import annotations

import weakref

import torch

import cupycodec as cc

from .dlpack import current_stream

__all__ = ["DecodeGroup", "Runtime"]

_ALIGN = 256


def _a(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class DecodeGroup:
    """Compressed layers whose weights decode together into one slot (a transformer block's, or one layer's)."""

    def __init__(self, layers: list, name: str):
        self.name = name
        self.layers = list(layers)
        self.offsets, total = [], 0
        for layer in self.layers:
            self.offsets.append(total)
            total += sum(_a(nb) for nb in layer._decoded_nbytes())
        self.nbytes = total
        self._plans: dict = {}

    def views(self, slot: torch.Tensor, i: int) -> list[torch.Tensor]:
        """Layer ``i``'s decoded tensors inside ``slot``: its weight, or its INT8 codes and scales."""
        layer, out, off = self.layers[i], [], self.offsets[i]
        for nbytes, dtype, shape in zip(layer._decoded_nbytes(), *layer._decoded_layout()):
            out.append(slot[off : off + nbytes].view(dtype).view(shape))
            off += _a(nbytes)
        return out

    def decode(self, slot: torch.Tensor) -> None:
        """Enqueue the decode of every layer into ``slot`` on torch's current stream (GPU: one plan run, no wait)."""
        containers = [layer._container(slot.device) for layer in self.layers]
        outs = [tuple(v) if len(v) == 2 else v[0] for v in (self.views(slot, i) for i in range(len(self.layers)))]
        entropy = [layer.mode == "int8+entropy" for layer in self.layers]
        if slot.device.type != "cuda":
            # one call for the group: every chunk of every layer through the CPU thread pool
            lossless = [i for i, e in enumerate(entropy) if not e]
            coded = [i for i, e in enumerate(entropy) if e]
            if lossless:
                cc.decompress_many([containers[i] for i in lossless], out=[outs[i] for i in lossless])
            if coded:
                cc.decompress_many([containers[i] for i in coded], out=[outs[i] for i in coded], dequantize=False)
            return
        key = (slot.data_ptr(), *(layer._payload_ptr() for layer in self.layers))
        plan = self._plans.get(key)
        if plan is None:  # once per slot and payload placement: built before any graph capture, on a warm-up pass
            self._plans = {k: v for k, v in self._plans.items() if k[0] != key[0]}  # forget moved payloads
            dequantize = not any(entropy)
            if any(entropy) and not all(entropy):
                raise ValueError(f"group {self.name}: mixes lossless and int8+entropy layers; compress a model with "
                                 "one mode")
            plan = cc.decode_plan(containers, outs, dequantize=dequantize, stream=current_stream(slot.device),
                                  alloc=lambda n, d=slot.device: torch.empty(n, dtype=torch.uint8, device=d))
            self._plans[key] = plan
        plan.run(current_stream(slot.device))

    def check(self) -> None:
        """Wait for and raise any bad chunk reported by this group's GPU decodes since the last check."""
        for plan in self._plans.values():
            plan.check()


class _DeviceState:
    __slots__ = ("active", "resident", "side", "slots")

    def __init__(self):
        self.slots: list[torch.Tensor] = []
        # per slot: (group, event of its side-stream decode or None); a slot's entry changes whenever it is written
        self.resident: list = [None, None]
        self.active = 0  # the slot of the group in use: never the one a new decode goes to
        self.side = None


class Runtime:
    """Scratch slots and decode groups of one model (or of one standalone layer)."""

    def __init__(self, groups: list[DecodeGroup], *, prefetch: bool = True):
        self.groups = groups
        self.prefetch = prefetch
        self.slot_nbytes = max((g.nbytes for g in groups), default=0)
        self._devices: dict[torch.device, _DeviceState] = {}
        for gi, g in enumerate(groups):
            for li, layer in enumerate(g.layers):
                layer._attach(self, gi, li)

    def __repr__(self):
        return f"<Runtime groups={len(self.groups)} slot_nbytes={self.slot_nbytes} devices={list(self._devices)}>"

    def _state(self, device: torch.device) -> _DeviceState:
        st = self._devices.get(device)
        if st is None:
            st = self._devices[device] = _DeviceState()
        if not st.slots:  # allocated when a group first decodes
            n = 2 if device.type == "cuda" and self.prefetch and len(self.groups) > 1 else 1
            st.slots = [torch.empty(max(self.slot_nbytes, 1), dtype=torch.uint8, device=device) for _ in range(n)]
            st.resident = [None] * n
        return st

    # -- the forward pass ---------------------------------------------------------------------------------------
    def enter(self, gi: int, device: torch.device) -> None:
        """A block starts: make its weights resident, and start decoding the next block's on a side stream."""
        st = self._state(device)
        slot = self._acquire(st, gi, device)
        nxt = gi + 1
        if device.type == "cuda" and len(st.slots) == 2 and nxt < len(self.groups):
            held = st.resident[1 - slot]
            if held is None or held[0] != nxt:
                self._settle(st, 1 - slot, device)
                self._prefetch(st, nxt, 1 - slot, device)

    def views(self, gi: int, li: int, device: torch.device) -> list[torch.Tensor]:
        """A layer's decoded tensors, decoding its group first if no slot holds it (a layer called on its own)."""
        st = self._state(device)
        return self.groups[gi].views(st.slots[self._acquire(st, gi, device)], li)

    def _acquire(self, st: _DeviceState, gi: int, device: torch.device) -> int:
        for s, held in enumerate(st.resident):
            if held is not None and held[0] == gi:
                self._settle(st, s, device)
                st.active = s
                return s
        s = 0 if len(st.slots) == 1 else 1 - st.active  # never the slot the group in use reads from
        self._settle(st, s, device)  # a prefetch still writing there finishes before this decode overwrites it
        self.groups[gi].decode(st.slots[s])
        st.resident[s] = (gi, None)
        st.active = s
        return s

    @staticmethod
    def _settle(st: _DeviceState, s: int, device: torch.device) -> None:
        """Order torch's current stream after slot ``s``'s side-stream decode, if one is pending."""
        held = st.resident[s]
        if held is not None and held[1] is not None:
            torch.cuda.current_stream(device).wait_event(held[1])
            st.resident[s] = (held[0], None)

    def _prefetch(self, st: _DeviceState, gi: int, s: int, device: torch.device) -> None:
        if st.side is None:
            st.side = torch.cuda.Stream(device)
        main = torch.cuda.current_stream(device)
        ready = torch.cuda.Event()
        ready.record(main)  # everything that read slot s before (the previous block) is enqueued before this
        st.side.wait_event(ready)
        with torch.cuda.stream(st.side):
            self.groups[gi].decode(st.slots[s])
        done = torch.cuda.Event()
        done.record(st.side)
        st.resident[s] = (gi, done)

    def nbytes(self) -> int:
        """Device (or host) memory this runtime holds: scratch slots and the decode plans' tables and temp."""
        slots = sum(t.numel() for st in self._devices.values() for t in st.slots)
        return slots + sum(p.nbytes for g in self.groups for p in g._plans.values())

    def reset(self) -> None:
        """Forget which slots hold which block (before capturing a CUDA graph, so the graph decodes every block)."""
        for st in self._devices.values():
            st.resident = [None] * len(st.slots)

    def check(self) -> None:
        """Wait for the GPU and raise :class:`cupycodec.BackendError` if a decode reported a bad chunk."""
        for g in self.groups:
            g.check()


def block_hook(runtime: Runtime, gi: int):
    """A forward pre-hook that decodes group ``gi`` when its block starts (and prefetches the next)."""
    ref = weakref.ref(runtime)

    def hook(module, args):
        rt = ref()
        if rt is None:
            return
        device = _device_of(module)
        if device is not None:
            rt.enter(gi, device)

    return hook


def _device_of(module) -> torch.device | None:
    for t in module.buffers():
        return t.device
    for t in module.parameters():
        return t.device
    return None


