"""Where compressed weights are decoded to: per model and device, shared scratch slots and block-batched decodes.

The layers of one transformer block form a :class:`DecodeGroup`; their weights decode together, by one engine
``run`` (one nvCOMP call per codec config, then the filter stages), into a scratch slot when the block starts. A
:class:`Runtime` owns the slots of one model: on a GPU two, each sized to the largest group, so that the next block
decodes on a side stream into one while this block computes from the other, ordered by events; on the CPU one.
Everything here runs ahead of the forward pass's math and never synchronizes: statuses accumulate on the device
until :meth:`Runtime.check`.

An offloaded group (:mod:`.offload`) keeps its compressed tensors in pinned host memory. On a GPU they are copied
into one of two device staging buffers on a copy stream, and decoded from there: when block ``i`` starts, block
``i + 1`` decodes on the side stream from staging its copy filled earlier, and block ``i + 2``'s bytes start
copying into the other staging buffer, once the decode that last read it is done (events, no host waits).

With :data:`WIDE` on (the default), on a GPU, a large batch (a prefill: more rows of activations
than the fused GEMV serves, :data:`.ops.GEMV_MAX_M`) of a block whose layers are all INT8 (``int8``,
``int8+entropy``, offloaded ``int8``) starts differently (``Runtime.enter(..., wide=True)``, from the block's hook,
or from its first layer where the block has nothing to decode and so no hook): each slot gets a wide buffer (one
block of weights in their dtype), and a block's decode into a slot is followed, on the same stream, by one launch
that dequantizes every layer of the block from its codes (in the slot, or resident) into the slot's wide buffer; each
layer then runs cuBLAS on its part of it. The next block's dequantization so runs on the side stream with its decode,
beside this block's GEMMs, instead of a dequantize launch (and its host work) per layer before each GEMM. A slot
holds a block either way: as codes, or as codes and wide weights (its "wide twin", index ``gi + len(groups)``), and
the slot machinery below (events, prefetch, hot views) is the same for both.

Scratch, plans and payloads are torch tensors (the plans' tables come from ``alloc=torch.empty``), so
``torch.cuda.memory_allocated()`` counts them.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref

import numpy as np
import torch

import cupycodec as cc
from cupycodec import _cuda
from cupycodec.kernels import int8 as int8_kernels

from .dlpack import current_stream, dtype_name, host_bits, stream_of
from .ops import GEMV_MAX_M

__all__ = ["DecodeGroup", "Runtime", "pick_staging"]

_ALIGN = 256
# Eager block decodes replay each plan's run as a CUDA graph (DecodePlan.replay): one launch of host work per block
# instead of nvCOMP's calls and the filter launches. False: plan.run, as before (benchmarks compare the two).
GRAPH_DECODES = True
# A group that becomes active hands each of its layers its views of the slot (``layer._hot``), which the layer's
# forward uses without asking the runtime while they are valid (see Runtime._occupy). False: layers always ask
# (benchmarks compare the two; the forward is the same code either way).
HOT_VIEWS = True
# A large batch of an all-INT8 block dequantizes the whole block in one launch when the block starts (see the module's
# docstring). False: each layer dequantizes its own weight into ops' scratch before cuBLAS (benchmarks compare the two;
# the values are the same). It was off from 8b3a4dd to the sixteenth GPU session: its descriptor upload on torch's
# default stream went to torch.cuda.ExternalStream(0), which is a new pool stream, not the default one, so under load
# the launch read descriptors not yet copied (CUDA illegal memory accesses, wrong logits; dlpack.stream_of).
WIDE = True
# The priority of the side stream that decodes the next block (torch.cuda.Stream's: 0 is the default, lower is
# higher). Benchmarks set it to compare (benchmarks/side_priority.py); a graph captured from the side stream runs at
# the priority of the stream it is launched into, which is how an eager block decode (a replayed plan) gets it.
SIDE_PRIORITY = 0


def _a(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class DecodeGroup:
    """Compressed layers whose weights decode together into one slot (a transformer block's, or one layer's).

    ``offloaded``: the layers' compressed tensors live in host memory and reach the GPU through a staging buffer
    of ``stored_nbytes`` (their stored tensors, each 256-byte aligned)."""

    def __init__(self, layers: list, name: str, *, offloaded: bool = False):
        self.name = name
        self.layers = list(layers)
        self.generation = 0  # counts Runtime.forget: a decode that saw it change read the replaced bytes
        self.offloaded = offloaded
        # INT8 layers whose codes stay resident on the device: nothing to decode, they take no room in a slot (a
        # group holds them for the wide dequantization of a large batch only)
        self._resident = [i for i, layer in enumerate(self.layers) if layer.mode == "int8" and not layer._offloaded]
        self.offsets, total = [], 0
        for i, layer in enumerate(self.layers):
            self.offsets.append(total)
            if i not in self._resident:
                total += sum(_a(nb) for nb in layer._decoded_nbytes())
        self.nbytes = total
        # the wide layout: every layer's weight dequantized, in the one dtype of all of them (None: not all INT8)
        dtypes = {layer.weight_dtype for layer in self.layers}
        self.wide_dtype = dtypes.pop() if len(dtypes) == 1 and all(
            layer.mode != "lossless" for layer in self.layers) else None
        self.wide_offsets, total = [], 0
        for layer in self.layers if self.wide_dtype is not None else ():
            self.wide_offsets.append(total)
            total += _a(layer.out_features * layer.in_features * self.wide_dtype.itemsize)
        self.wide_nbytes = total
        self._wide: dict = {}  # (wide buffer, slot, sources...) addresses -> (launch handle args, descriptor tensor)
        self.stored_offsets, total = [], 0
        for layer in self.layers:
            self.stored_offsets.append(total)
            total += sum(_a(t.numel() * t.element_size()) for t in layer._stored())
        self.stored_nbytes = total
        self._copied = [i for i, layer in enumerate(self.layers) if layer.mode == "int8" and layer._offloaded]
        self._coded = [i for i, layer in enumerate(self.layers) if layer.mode != "int8"]  # containers
        self._entropy = [self.layers[i].mode == "int8+entropy" for i in self._coded]
        self._plans: dict = {}
        self._views: dict = {}  # (device, slot address, layer) -> the layer's views of that slot
        self._staged_plans: dict = {}  # (slot address, staging address) -> plan over the staged payloads
        self._staged_containers: dict = {}  # staging address -> containers over it
        self._late = None  # a bad chunk that a plan which has gone reported (see _retire), raised by check()

    def views(self, slot: torch.Tensor, i: int) -> list[torch.Tensor]:
        """Layer ``i``'s decoded tensors inside ``slot``: its weight, or its INT8 codes and scales (built once per
        slot: a layer's forward asks for them every call, and a slot lives as long as its runtime)."""
        key = (slot.device, slot.data_ptr(), i)
        out = self._views.get(key)
        if out is None:
            layer, out, off = self.layers[i], [], self.offsets[i]
            for nbytes, dtype, shape in zip(layer._decoded_nbytes(), *layer._decoded_layout()):
                out.append(slot[off : off + nbytes].view(dtype).view(shape))
                off += _a(nbytes)
            self._views[key] = out
        return out

    def staged_views(self, staging: torch.Tensor, i: int) -> list[torch.Tensor]:
        """Layer ``i``'s stored tensors (packed bytes, or codes and scales) as views of ``staging``."""
        out, off = [], self.stored_offsets[i]
        for t in self.layers[i]._stored():
            nbytes = t.numel() * t.element_size()
            out.append(staging[off : off + nbytes].view(t.dtype).view(t.shape))
            off += _a(nbytes)
        return out

    def stage(self, staging: torch.Tensor) -> None:
        """Enqueue the copies of every layer's stored tensors into ``staging`` on torch's current stream."""
        for i, layer in enumerate(self.layers):
            for dst, src in zip(self.staged_views(staging, i), layer._stored()):
                dst.copy_(src, non_blocking=True)

    def decode(self, slot: torch.Tensor, staging: torch.Tensor | None = None, sp: int | None = None) -> None:
        """Enqueue the decode of every layer into ``slot`` (GPU: one plan run, no wait) on the raw stream ``sp``
        (default: torch's current stream), from the layers' own tensors, or from ``staging`` where :meth:`stage`
        copied them. Copies (INT8 layers, staging) go on torch's current stream: give ``sp`` only without them."""
        if sp is None:
            sp = current_stream(slot.device)
        if staging is not None:
            self._decode_staged(slot, staging, sp)
            return
        for i in self._copied:
            for dst, src in zip(self.views(slot, i), self.layers[i]._stored()):
                dst.copy_(src, non_blocking=True)
        if self._coded:
            key = (slot.data_ptr(), *[self.layers[i]._payload_ptr() for i in self._coded])
            self._run(lambda: [self.layers[i]._container(slot.device) for i in self._coded], slot, key, self._plans,
                      forget=True, sp=sp)

    def _decode_staged(self, slot: torch.Tensor, staging: torch.Tensor, sp: int | None) -> None:
        for i in self._copied:  # codes and scales as they are: a device copy into the slot
            for dst, src in zip(self.views(slot, i), self.staged_views(staging, i)):
                dst.copy_(src)
        if self._coded:
            self._run(lambda: self._staged(staging), slot, (slot.data_ptr(), staging.data_ptr()), self._staged_plans,
                      forget=False, sp=sp)

    def _staged(self, staging: torch.Tensor) -> list:
        """The containers over ``staging``'s copies, built once per staging buffer (on the first pass, a warm-up
        before any capture, which waits for the copy: a checkpoint's container may still check its CRCs)."""
        containers = self._staged_containers.get(staging.data_ptr())
        if containers is None:
            torch.cuda.current_stream(staging.device).synchronize()
            containers = self._staged_containers[staging.data_ptr()] = [
                self.layers[i]._container_over(self.staged_views(staging, i)[0]) for i in self._coded]
        return containers

    def _run(self, containers, slot: torch.Tensor, key: tuple, plans: dict, forget: bool, sp: int | None) -> None:
        """Decode the container layers into ``slot``: a cached plan's run on a GPU (``containers()`` and the slot
        views are built only with the plan), the CPU pool on the host."""
        entropy = self._entropy
        if not slot.is_cuda:
            # one call for the group: every chunk of every layer through the CPU thread pool, into NumPy views
            items = containers()
            outs = [tuple(host_bits(t) for t in v) if len(v) == 2 else host_bits(v[0])
                    for v in (self.views(slot, i) for i in self._coded)]
            for dequantize in (True, False):  # lossless weights, then int8+entropy codes and scales
                pick = [k for k, e in enumerate(entropy) if e != dequantize]
                if pick:
                    cc.decompress_many([items[k] for k in pick], out=[outs[k] for k in pick], dequantize=dequantize)
            return
        plan = plans.get(key)
        if plan is None:  # once per slot and payload placement: built before any graph capture, on a warm-up pass
            _refuse_in_capture(f"block {self.name!r} is decoded for the first time", "its decode plan")
            if forget:  # payloads that moved: their plans go
                self._retire([plans.pop(k) for k in [k for k in list(plans) if k[0] == key[0]]])  # list(): threads
            if any(entropy) and not all(entropy):
                raise ValueError(f"group {self.name}: mixes lossless and int8+entropy layers; compress a model with "
                                 "one mode")
            outs = [tuple(v) if len(v) == 2 else v[0] for v in (self.views(slot, i) for i in self._coded)]
            plan = cc.decode_plan(containers(), outs, dequantize=not any(entropy), stream=sp,
                                  alloc=lambda n, d=slot.device: torch.empty(n, dtype=torch.uint8, device=d))
            plans[key] = plan
        if GRAPH_DECODES:
            plan.replay(sp)  # one graph launch on the host, whatever the group holds
        else:
            plan.run(sp)

    def wide_views(self, wide: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's dequantized weight inside the wide buffer (made once per buffer)."""
        key = (wide.device, wide.data_ptr(), "wide")
        out = self._views.get(key)
        if out is None:
            out = self._views[key] = [
                wide[off : off + layer.out_features * layer.in_features * self.wide_dtype.itemsize]
                .view(self.wide_dtype).view(layer.out_features, layer.in_features)
                for off, layer in zip(self.wide_offsets, self.layers)]
        return out

    def dequantize_wide(self, wide: torch.Tensor, slot: torch.Tensor | None, sp: int) -> None:
        """Enqueue on the raw stream ``sp`` one launch that dequantizes every layer into ``wide`` from its codes and
        scales (resident ones in place, the others in ``slot``, decoded there before): the arithmetic of
        :func:`~cupycodec.kernels.int8.dequantize_raw`, which a layer on its own runs, so the values are the same.

        The launch and its descriptors (device memory) are made once per wide buffer and slot (a warm-up pass,
        before any graph capture), and dropped when the layers' codes move or change (:meth:`release`,
        :meth:`forget`, :meth:`drop_wide`): a block's dequantization costs a lookup and a launch."""
        key = (wide.data_ptr(), slot.data_ptr() if slot is not None else 0)
        got = self._wide.get(key)
        if got is None:
            _refuse_in_capture(f"block {self.name!r} is dequantized for a large batch for the first time",
                               "its launch descriptors")
            index = wide.device.index
            words, first = [], 0
            outs = self.wide_views(wide)
            for i, (out, layer) in enumerate(zip(outs, self.layers)):
                codes, scales = (layer.qweight, layer.scale) if i in self._resident else self.views(slot, i)
                granularity = layer.granularity
                w, blocks = int8_kernels.dequantize_desc(
                    codes.data_ptr(), scales.data_ptr(), out.data_ptr(), tuple(codes.shape),
                    granularity=granularity, axis=0 if granularity == "channel" else None,
                    group_size=layer.group_size if granularity == "group" else None, first_block=first,
                    device=index)
                words.append(w)
                first += blocks
            # uploaded on ``sp``, which reads it, from pinned memory: no host wait, and ordered before the launch
            host = torch.from_numpy(np.stack(words).view(np.int64)).pin_memory()
            desc = torch.empty(host.shape, dtype=host.dtype, device=wide.device)
            on = stream_of(sp, wide.device)
            with torch.cuda.stream(on):
                desc.copy_(host, non_blocking=True)
            desc.record_stream(on)  # freed (forget, release) only once the work enqueued on ``sp`` is done
            name, grid, block, args = int8_kernels.dequantize_many_args(
                dtype_name(self.wide_dtype), desc.data_ptr(), len(words), first)
            got = self._wide[key] = ((int8_kernels.handle(index, name), grid, block, args, index), desc)
        (handle, grid, block, args, index), _ = got
        if grid:
            _cuda.launch(handle, grid, block, args, index, sp)

    def drop_wide(self) -> None:
        """Forget the wide launches, built over the layers' codes where they were (a layer's tensors were replaced)."""
        self._wide = {}

    def plans(self) -> list:
        return [*self._plans.values(), *self._staged_plans.values()]

    def forget(self) -> None:
        """Drop the plans and staged containers, built over the layers' containers as they were (a layer loaded new
        ones, which may lay their chunks out differently in the same bytes); slot views stay, layouts do not
        change."""
        self._retire(self.plans())
        self._plans, self._staged_plans, self._staged_containers, self._wide = {}, {}, {}, {}

    def release(self, device: torch.device) -> None:
        """Drop the views, plans and staged containers over ``device``'s slots and staging buffers, which their
        runtime gives back (:meth:`Runtime.release`)."""
        self._views = {k: v for k, v in self._views.items() if k[0] != device}
        self.drop_wide()
        if device.type == "cuda":
            for plans in (self._plans, self._staged_plans):
                self._retire([plans.pop(k) for k, p in list(plans.items()) if p.device == device.index])
            self._staged_containers = {}  # (any device's: made again over the staging buffers on first use)

    def drop_buffers(self, device: torch.device, addresses: set[int]) -> list:
        """Forget the views, wide launches, plans and staged containers over buffers of ``device`` that a runtime gave
        back (their addresses: an ended thread's slots, staging and wide buffers; the views held their memory, and
        every thread's new slots added more). Returns the plans, which the caller retires."""
        # new dicts from snapshots (list() of a dict's items is one step under the GIL), not changed ones: other
        # threads' forwards add to these without the runtime's lock
        self._views = {k: v for k, v in list(self._views.items()) if k[0] != device or k[1] not in addresses}
        self._wide = {k: v for k, v in list(self._wide.items()) if addresses.isdisjoint(k)}
        self._staged_containers = {k: v for k, v in list(self._staged_containers.items()) if k not in addresses}
        gone = []
        for name in ("_plans", "_staged_plans"):
            items = list(getattr(self, name).items())
            gone += [p for k, p in items if not addresses.isdisjoint(k[:2])]
            setattr(self, name, {k: p for k, p in items if addresses.isdisjoint(k[:2])})
        return gone

    def _retire(self, plans: list) -> None:
        """Plans about to go: a bad chunk one of them reported since the last check is kept, so that :meth:`check`
        still raises it. Waits for their devices, which only a changed model does (a load, a move, new payloads
        decoded the first time), never a forward over the same weights."""
        for index in sorted({p.device for p in plans}):
            torch.cuda.synchronize(index)  # decodes on any stream (the prefetch's too) have written their statuses
        for plan in plans:
            try:
                plan.check()
            except cc.BackendError as exc:
                self._late = self._late or exc

    def check(self) -> None:
        """Wait for and raise any bad chunk reported by this group's GPU decodes since the last check (including
        plans that have gone since)."""
        late, self._late = self._late, None
        if late is not None:
            raise late
        plans = self.plans()
        for index in sorted({p.device for p in plans}):
            torch.cuda.synchronize(index)  # decodes run on torch's streams, which a plan's own check does not wait for
        for plan in plans:
            plan.check()

    def home(self) -> torch.device | None:
        """The device whose memory holds this group's stored tensors, or None when they are offloaded to the host
        (staged to whichever device runs the block)."""
        if self.offloaded:
            return None
        t = self.layers[0]._stored()[0]
        return t.device if t.is_cuda else None


class _Alive:
    """One per thread, held by a ``threading.local`` (:func:`_alive`): freed when its thread ends, whichever way the
    thread was started (threads of C extensions and ``_thread`` too, which ``threading.enumerate`` does not list)."""

    __slots__ = ("__weakref__",)


_THREAD = threading.local()


def _alive() -> _Alive:
    mark = getattr(_THREAD, "alive", None)
    if mark is None:
        mark = _THREAD.alive = _Alive()
    return mark


class _DeviceState:
    __slots__ = ("active", "copy", "done", "home", "hot", "owner", "ready", "resident", "side", "side_sp", "slots",
                 "staged", "staging", "wide")

    def __init__(self):
        self.owner = weakref.ref(_alive())  # its thread's marker: dead once the thread has ended
        self.slots: list[torch.Tensor] = []
        # torch's stream when the slots were allocated (None on the CPU): the pool their memory goes back to
        self.home = None
        # per slot: (group or its wide twin, event of its side-stream decode or None); a slot's entry changes whenever
        # it is written
        self.resident: list = [None, None]
        self.active = 0  # the slot of the group in use: never the one a new decode goes to
        # (slot, group or twin) -> [(layer, attribute, its views in that slot)], made once (Runtime._activate)
        self.hot: dict = {}
        self.side = None  # the prefetch stream (torch's), and its raw handle
        self.side_sp = 0
        # CuPy events reused by every prefetch, recorded and waited on by raw handle (made once: creating one is a
        # host call too, and torch's Event and Stream wrappers cost microseconds per call on a slow host): `ready`
        # orders a prefetch after the caller's stream, done[s] marks slot s's decode; done[s] is recorded again only
        # after the caller's stream was made to wait for its last recording (_settle)
        self.ready = None
        self.done: list = []
        # offloaded groups: two staging buffers, each [group, copied event, event of the decode that read it (None
        # until one was enqueued)], and the stream their host-to-device copies run on
        self.staging: list[torch.Tensor] = []
        self.staged: list = [None, None]
        self.copy = None
        # per slot, its wide buffer (a large batch's dequantized block), allocated when the first one comes
        self.wide: list[torch.Tensor] = []


class Runtime:
    """Scratch slots and decode groups of one model (or of one standalone layer)."""

    def __init__(self, groups: list[DecodeGroup], *, prefetch: bool = True):
        self.groups = groups
        self.prefetch = prefetch
        self.slot_nbytes = max((g.nbytes for g in groups), default=0)
        self.wide_nbytes = max((g.wide_nbytes for g in groups), default=0)
        self.staging_nbytes = max((g.stored_nbytes for g in groups if g.offloaded), default=0)
        # per (thread, device): which block each slot holds is the state of one forward pass, so threads running
        # the model at once each get their own slots (a thread that ends leaves its state to the next with its id)
        self._devices: dict[tuple[int, torch.device], _DeviceState] = {}
        # orders forget() (a thread loading a state dict) against a forward publishing what it decoded: a decode
        # that overlapped a load read the old bytes, and must not become resident after the load has returned
        self._lock = threading.RLock()
        for gi, g in enumerate(groups):
            for li, layer in enumerate(g.layers):
                layer._attach(self, gi, li)

    def __del__(self, _finalizing=sys.is_finalizing):
        try:
            self._release()
        except Exception:
            if not _finalizing():  # at interpreter exit this module's globals may be gone: nothing to give back
                raise

    def _release(self):
        # hot views hold this runtime's slots: a layer that outlives its model must not keep them alive
        for g in self.groups:
            for layer in g.layers:
                with contextlib.suppress(ReferenceError):  # a standalone runtime's layer, already gone
                    layer.__dict__["_hot"] = layer.__dict__["_wide"] = None
        # Slots, wide buffers, staging and plans go back to torch's pool of the stream they were allocated on (the
        # slots' stream, `home`; the others' too unless the caller changed streams between forwards), which reuses
        # them for its next allocation at once, while a side-stream decode or a staging copy may still be writing
        # them (a forward that raised before its next block started, then `del model`). So that stream waits for
        # ours (an event, no host wait); not while this thread captures a CUDA graph (GC can run this anywhere, and a
        # wait on an outside event would break the capture). Nothing is raised from here (interpreter exit).
        states = [st for st in self._devices.values() if st.home is not None]
        if states and not _capturing():
            for st in states:
                for stream in (st.side, st.copy):
                    if stream is not None:
                        with contextlib.suppress(Exception):
                            st.home.wait_stream(stream)

    def __repr__(self):
        devices = list(dict.fromkeys(d for _, d in self._devices))
        return f"<Runtime groups={len(self.groups)} slot_nbytes={self.slot_nbytes} devices={devices}>"

    def __reduce__(self):
        """``copy.deepcopy`` and pickling of a model: a fresh runtime over the (copied) layers, attached to them
        (layers hold their runtime weakly, and a weak reference is copied as it is); slots and plans, which hold
        device addresses, are made again on first use."""
        return (_rebuild, ([(g.layers, g.name, g.offloaded) for g in self.groups], self.prefetch))

    def _state(self, device: torch.device) -> _DeviceState:
        key = (threading.get_ident(), device)
        st = self._devices.get(key)
        if st is None or st.owner() is not _alive():  # a thread's first forward here (or its id reused)
            self._drop_ended()  # the ended thread's state goes: its owner is dead
            with self._lock:  # made under the lock that _drop_ended decides under: never taken for an ended one's
                st = self._devices.get(key)
                if st is not None and st.owner() is None:  # an ended one's, kept inside a capture: this thread's now
                    st.owner = weakref.ref(_alive())
                else:
                    st = self._devices[key] = _DeviceState()
        if not st.slots:  # allocated when a group first decodes
            n = 2 if device.type == "cuda" and self.prefetch and len(self.groups) > 1 else 1
            st.home = torch.cuda.current_stream(device) if device.type == "cuda" else None
            st.slots = [torch.empty(max(self.slot_nbytes, 1), dtype=torch.uint8, device=device) for _ in range(n)]
            st.resident = [None] * n
            if device.type == "cuda" and self.staging_nbytes:
                st.staging = [torch.empty(self.staging_nbytes, dtype=torch.uint8, device=device) for _ in range(2)]
                st.staged = [None, None]
                st.copy = torch.cuda.Stream(device)
        return st

    def _drop_ended(self) -> None:
        """Give back the states of threads that have ended: their slots, staging and wide buffers (a block's weights
        each), and their layers' hot views into them. Asked when a thread's first forward comes and when a forward
        starts while several threads' states are kept: before, a thread that ended (``Thread(target=generate)``)
        kept its slots until another thread's first forward. The memory goes back to torch after the work its side
        and copy streams enqueued (the home stream waits for them, as in ``__del__``), once the groups forget their
        views and plans over it (the views kept every ended thread's slots: a slot per thread, for good); the plans
        are retired, which waits for the device once (a thread's end, not a forward's work). Not inside a CUDA-graph
        capture, which neither memory nor a wait may enter: the next forward outside one does it."""
        if torch.cuda.is_initialized() and _capturing():
            return
        with self._lock:  # each state's owner marker dies with its thread; states are made under this lock
            for key, st in [(k, st) for k, st in list(self._devices.items()) if st.owner() is None]:
                if self._devices.get(key) is not st:
                    continue
                del self._devices[key]
                for g in self.groups:
                    for layer in g.layers:
                        with contextlib.suppress(ReferenceError):  # a standalone runtime's layer, already gone
                            for attr in ("_hot", "_wide"):
                                held = layer.__dict__.get(attr)
                                if held is not None and held[0] == key[0]:
                                    layer.__dict__[attr] = None
                if st.home is not None:
                    for stream in (st.side, st.copy):
                        if stream is not None:
                            st.home.wait_stream(stream)
                addresses = {b.data_ptr() for b in (*st.slots, *st.staging, *st.wide)}
                for g in self.groups:
                    plans = g.drop_buffers(key[1], addresses)
                    if plans:  # a GPU thread's decodes: waited for once, their bad chunks kept for check()
                        g._retire(plans)

    # -- the forward pass ---------------------------------------------------------------------------------------
    def enter(self, gi: int, device: torch.device, wide: bool = False) -> int:
        """A block starts: make its weights resident, and start decoding the next block's on a side stream; returns
        the slot it is in. ``wide`` (a large batch of INT8 blocks on a GPU): each block's weights dequantized too,
        into the slot's wide buffer, and handed to its layers (``layer._wide``)."""
        if gi == 0 and len(self._devices) > 1:  # a forward starts while other threads' states are kept
            self._drop_ended()
        st = self._state(device)
        sp = current_stream(device)
        n = len(self.groups)
        if wide and not st.wide:
            st.wide = [torch.empty(self.wide_nbytes, dtype=torch.uint8, device=device) for _ in st.slots]
        slot = self._acquire(st, gi + n if wide else gi, device, sp, prefer=gi % len(st.slots))
        nxt = gi + 1
        if sp is not None and len(st.slots) == 2 and nxt < n and self.groups[nxt].home() in (None, device):
            # (a model split over GPUs: the next block on another device decodes there when it starts)
            key = nxt + n if wide and self.groups[nxt].wide_dtype is not None else nxt
            held = st.resident[1 - slot]
            if held is None or held[0] != key:
                self._settle(st, 1 - slot, sp)
                self._prefetch(st, key, 1 - slot, device, sp)
            if st.staging and nxt + 1 < len(self.groups) and self.groups[nxt + 1].offloaded:
                self._stage(st, nxt + 1, device, keep=nxt)  # the copy engine works ahead of the decodes
        return slot

    def views(self, gi: int, li: int, device: torch.device) -> list[torch.Tensor]:
        """A layer's decoded tensors, decoding its group first if no slot holds it (a layer called on its own)."""
        st = self._state(device)
        return self.groups[gi].views(st.slots[self._acquire(st, gi, device, current_stream(device))], li)

    def _acquire(self, st: _DeviceState, gi: int, device: torch.device, sp: int | None,
                 prefer: int | None = None) -> int:
        """The slot holding group ``gi`` (or a wide twin) for work on the raw stream ``sp`` (torch's current; None on
        the CPU), decoding it there first if no slot holds it: into slot ``prefer`` (a block start: its index's
        parity), else never into the slot the group in use reads from (a layer called on its own).

        A block start may take the slot in use: that block's forward is over, and its reads were enqueued on the
        caller's stream before this decode (slots are not ordered across streams: a model driven from two streams at
        once, or switched between forwards, is the caller's to order, as it was before this rule). Block i then
        always decodes into slot i % 2 and prefetches block i + 1 into the other, so a model of an odd number of
        blocks decodes each block into the same slot in every forward, as an even one does: one plan per block, all
        built in the first forward (with "never the slot in use", block 0 followed block n - 1 into the other slot,
        every block changed slot each forward, and a CUDA graph captured after one warm-up forward built plans
        inside the capture)."""
        group = self.groups[gi % len(self.groups)]
        with self._lock:
            for s, held in enumerate(st.resident):
                if held is not None and held[0] == gi:
                    self._settle(st, s, sp)
                    self._activate(st, gi, s, device)
                    return s
        s = prefer if prefer is not None else 0 if len(st.slots) == 1 else 1 - st.active
        self._settle(st, s, sp)  # a prefetch still writing there finishes before this decode overwrites it
        while True:  # again if a state dict was loaded into the group meanwhile (another thread's forget)
            self._occupy(st, s, -1, None)  # what the slot held is gone from here on, whatever this decode does
            generation = group.generation
            self._decode(st, gi, s, device, sp)
            with self._lock:
                if group.generation == generation:
                    st.resident[s] = (gi, None)
                    self._activate(st, gi, s, device)
                    return s

    def _occupy(self, st: _DeviceState, s: int, gi: int, event) -> None:
        """Slot ``s`` now holds group ``gi`` (-1: nothing usable), decoded by the side-stream work ``event`` marks
        (None: ordered already). The group it held before loses its layers' hot views: every change of what a slot
        holds comes through here, so a hot view never outlives the slot content it reads."""
        held = st.resident[s]
        if held is not None and held[0] >= 0 and held[0] != gi:
            for layer in self.groups[held[0] % len(self.groups)].layers:
                layer.__dict__["_hot"] = layer.__dict__["_wide"] = None
        st.resident[s] = (gi, event)

    def _activate(self, st: _DeviceState, gi: int, s: int, device: torch.device) -> None:
        """Group ``gi``, resident and settled in slot ``s``, is the one in use: hand its layers their views (keyed by
        thread and device: another thread's forward has slots of its own)."""
        st.active = s
        wide = gi >= len(self.groups)  # a twin: its layers' weights in the slot's wide buffer (no other route)
        if HOT_VIEWS or wide:
            hot = st.hot.get((s, gi))
            if hot is None:
                group, me = self.groups[gi % len(self.groups)], threading.get_ident()
                if wide:
                    hot = [(layer, "_wide", (me, device, w)) for layer, w in zip(group.layers,
                                                                                  group.wide_views(st.wide[s]))]
                else:
                    hot = [(layer, "_hot", (me, device, group.views(st.slots[s], i)))
                           for i, layer in enumerate(group.layers) if i not in group._resident]
                st.hot[s, gi] = hot
            for layer, attr, views in hot:
                layer.__dict__[attr] = views

    def forget(self, gi: int) -> None:
        """Group ``gi``'s stored weights changed (a state dict was loaded into a layer): no slot or staging buffer
        holds its weights any more, and its plans, built over the old containers, go. Pending events are kept, so
        that later writes to those buffers stay ordered after work already enqueued. A forward decoding the group
        in another thread meanwhile sees the generation change and decodes it again (``_acquire``)."""
        group = self.groups[gi]
        with self._lock:
            group.generation += 1
            for st in list(self._devices.values()):  # list(): other threads add their states
                for s, held in enumerate(st.resident):
                    if held is not None and held[0] in (gi, gi + len(self.groups)):
                        self._occupy(st, s, -1, held[1])
                for held in st.staged:
                    if held is not None and held[0] == gi:
                        held[0] = -1
            for layer in group.layers:
                layer.__dict__["_hot"] = layer.__dict__["_wide"] = None
            group.forget()

    def _decode(self, st: _DeviceState, gi: int, s: int, device: torch.device, sp: int | None, stream=None) -> None:
        """Decode group ``gi`` into slot ``s`` on the raw stream ``sp`` (None on the CPU), through staging if it is
        offloaded; ``stream``: the torch stream of that handle, when not torch's current one. A group of containers
        only runs its plan on the handle, entering no stream context. A wide twin is then dequantized into the
        slot's wide buffer, on the same stream."""
        n = len(self.groups)
        group = self.groups[gi % n]
        for layer in group.layers:  # a layer whose bytes changed (tied, written in place) forgets its old plans here
            if layer._stamp is not None:
                layer._packed_changed()
        if group.nbytes:
            self._decode_codes(st, gi % n, s, device, sp, stream)
        if gi >= n:
            group.dequantize_wide(st.wide[s], st.slots[s] if group.nbytes else None, sp)

    def _decode_codes(self, st: _DeviceState, gi: int, s: int, device: torch.device, sp: int | None,
                      stream) -> None:
        group = self.groups[gi]
        if sp is None:
            group.decode(st.slots[s])
            return
        if not (group.offloaded and st.staging) and not group._copied:
            group.decode(st.slots[s], sp=sp)
            return
        stream = stream if stream is not None else torch.cuda.current_stream(device)
        with torch.cuda.stream(stream):
            if not (group.offloaded and st.staging):
                group.decode(st.slots[s])
                return
            k = self._stage(st, gi, device)
            stream.wait_event(st.staged[k][1])  # its bytes have arrived
            group.decode(st.slots[s], st.staging[k])
            done = torch.cuda.Event()
            done.record(stream)
            st.staged[k][2] = done  # staging k may be overwritten once this decode is done

    def _stage(self, st: _DeviceState, gi: int, device: torch.device, keep: int | None = None) -> int:
        """The staging buffer holding (or now being copied) group ``gi``'s stored bytes; never the one holding group
        ``keep``. The copy goes on the copy stream, after the decode that last read the buffer."""
        for k, held in enumerate(st.staged):
            if held is not None and held[0] == gi:
                return k
        k = pick_staging(st.staged, keep)
        main = torch.cuda.current_stream(device)
        ready = torch.cuda.Event()
        ready.record(main)  # the copy stream joins the caller's stream (and a graph capture on it)
        st.copy.wait_event(ready)
        held = st.staged[k]
        if held is not None and held[2] is not None:
            st.copy.wait_event(held[2])
        with torch.cuda.stream(st.copy):
            self.groups[gi].stage(st.staging[k])
        copied = torch.cuda.Event()
        copied.record(st.copy)
        st.staged[k] = [gi, copied, None]
        return k

    @staticmethod
    def _settle(st: _DeviceState, s: int, sp: int | None) -> None:
        """Order the raw stream ``sp`` (torch's current) after slot ``s``'s side-stream decode, if one is pending."""
        held = st.resident[s]
        if held is not None and held[1] is not None:
            _cuda.stream_wait(sp, held[1])
            st.resident[s] = (held[0], None)

    def _prefetch(self, st: _DeviceState, gi: int, s: int, device: torch.device, sp: int) -> None:
        """Decode group ``gi`` into slot ``s`` on the side stream, after the work enqueued so far on ``sp``."""
        if st.side is None:
            st.side = torch.cuda.Stream(device, priority=SIDE_PRIORITY)
            st.side_sp = st.side.cuda_stream
            index = device.index if device.index is not None else torch.cuda.current_device()
            st.ready, *st.done = _cuda.events(index, 1 + len(st.slots))
        _cuda.event_record(st.ready, sp)  # everything that read slot s before is enqueued before the decode
        _cuda.stream_wait(st.side_sp, st.ready)
        self._occupy(st, s, -1, None)
        group = self.groups[gi % len(self.groups)]
        generation = group.generation
        self._decode(st, gi, s, device, st.side_sp, st.side)
        done = st.done[s]  # slot s was settled before this prefetch: no wait on done's last recording is pending
        _cuda.event_record(done, st.side_sp)
        with self._lock:  # a state dict loaded meanwhile: the slot holds nothing usable (its event still orders)
            st.resident[s] = (gi if group.generation == generation else -1, done)

    def nbytes(self) -> int:
        """Device (or host) memory this runtime holds: scratch slots and the decode plans' tables and temp."""
        slots = sum(t.numel() for st in self._devices.values()
                    for t in (*st.slots, *st.staging, *st.wide))
        return slots + sum(p.nbytes for g in self.groups for p in g.plans())

    def release(self, device: torch.device) -> None:
        """Give back what this runtime holds on ``device``: its slots, staging buffers and events, and the plans and
        views over them, once the device has done the work enqueued there (a prefetch may still be writing a slot).
        For a model that moved off the device (``.cpu()``, ``.to()``; see ``CompressedLinear._apply``); a forward
        there later allocates them again."""
        keys = [k for k in self._devices if k[1] == device]
        if not keys:
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        for key in keys:
            st = self._devices.pop(key)
            for s in range(len(st.resident)):
                self._occupy(st, s, -1, None)  # the groups in its slots lose their hot views
        for g in self.groups:
            g.release(device)

    def reset(self) -> None:
        """Forget which slots hold which block (before capturing a CUDA graph, so the graph decodes every block).
        Waits for the device where blocks are staged: the events that ordered reuse of their buffers are dropped."""
        for (_, device), st in self._devices.items():
            if st.staging:
                torch.cuda.synchronize(device)
            for s in range(len(st.slots)):
                self._occupy(st, s, -1, None)
            st.resident = [None] * len(st.slots)
            st.staged = [None] * len(st.staging)

    def check(self) -> None:
        """Wait for the GPU and raise :class:`cupycodec.BackendError` if a decode reported a bad chunk."""
        for g in self.groups:
            g.check()


def _refuse_in_capture(what: str, built: str) -> None:
    """Raise :class:`~cupycodec.CaptureError` if this thread is capturing a CUDA graph on torch's current stream:
    ``built`` (made once, on first use) uploads from host memory, which a capture would refuse or, from pinned
    memory, record as a copy to repeat from a buffer freed after it. Checked before any such call, so that the
    capture stays valid and ends cleanly with this error."""
    if _capturing():
        raise cc.CaptureError(f"{what} inside a CUDA-graph capture, where {built} cannot be made (that uploads from "
                              "host memory); run the model once outside the capture first, with the same batch size "
                              "(torch's recipe: warm-up iterations on a side stream), then capture")


def _capturing() -> bool:
    try:
        return torch.cuda.is_current_stream_capturing()
    except Exception:  # CUDA gone (interpreter exit)
        return True


def _rebuild(groups: list, prefetch: bool) -> Runtime:
    return Runtime([DecodeGroup(layers, name, offloaded=offloaded) for layers, name, offloaded in groups],
                   prefetch=prefetch)


def pick_staging(staged: list, keep: int | None) -> int:
    """The staging buffer a new group's bytes go to (``staged``: per buffer None or [group, copied event, event of
    the decode that read it or None]): an empty one, else one whose decode is enqueued (its copy then waits for that
    decode), else one whose bytes nothing has read yet; never the one holding group ``keep``, which a decode about
    to be enqueued needs."""
    for k, held in enumerate(staged):
        if held is None:
            return k
    for k, held in enumerate(staged):
        if held[2] is not None and held[0] != keep:
            return k
    return next(k for k, held in enumerate(staged) if held[0] != keep)


def block_hook(block: torch.nn.Module, layer) -> torch.utils.hooks.RemovableHandle:
    """Make ``block`` decode its group (the one ``layer`` belongs to) when it starts, and prefetch the next: a forward
    pre-hook on the device of the block's input (an offloaded block's compressed tensors are on the host). The hook
    is one module-level function that finds the runtime through the block's own layer, so that ``copy.deepcopy`` of
    a model gives hooks that drive the copy's runtime; the layer is kept in the block's ``__dict__``, not as a
    submodule, so the module tree and the state dict are unchanged."""
    object.__setattr__(block, "_cupycodec_layer", layer)
    return block.register_forward_pre_hook(_enter_block, with_kwargs=True)


def _enter_block(module, args, kwargs):
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        # traced: the layers' op (linear.decoded_linear) starts the block when its first layer runs, inside the
        # graph, so the hook adds no graph break; under torch.func's transforms the layers decode with them off
        # (CompressedLinear._differentiable): slots made here would be tensors without storage
        return
    layer = module.__dict__.get("_cupycodec_layer")
    rt = layer._runtime() if layer is not None and layer._runtime is not None else None
    if rt is None:
        return
    gi = layer._slot_index[0]
    group = rt.groups[gi]
    x = _input_of(args, kwargs)
    if x is not None:
        # where the block runs: its weights' device (accelerate's device-map hook moves the input there only inside
        # forward, after this pre-hook), or for host-offloaded weights the input's
        device = group.home() or x.device
        if (WIDE and device.type == "cuda" and group.wide_dtype == x.dtype and x.ndim
                and x.numel() > GEMV_MAX_M * x.shape[-1]):
            rt.enter(gi, device, wide=True)  # a large batch (prefill)
        elif group.nbytes:
            rt.enter(gi, device)
        return
    device = _device_of(module)
    if device is not None and group.nbytes:
        rt.enter(gi, device)


def _input_of(args, kwargs) -> torch.Tensor | None:
    """The block's activations: its first floating-point tensor argument."""
    for a in (*args, *(kwargs or {}).values()):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a
    return None


def _device_of(module) -> torch.device | None:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return None


