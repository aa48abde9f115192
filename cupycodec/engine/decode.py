"""Decode plans: containers decoded, and their filters applied, into fixed buffers by one asynchronous run.

A plan is built once for given containers and output buffers: one device allocation (pointer tables, nvCOMP's
temporary memory, scratch for intermediate segments) and one upload. ``run(stream)`` then enqueues, on that stream
and without synchronizing or allocating: one nvCOMP call per codec config over every encoded chunk of every
container, one status-check launch, one copy launch for stored chunks, and the filter stages (a byte-plane merge per
container; one launch that dequantizes every INT8 container per output dtype). Its Python work does not grow with
the number of chunks, so a run can be captured in a CUDA graph (torch's or CuPy's) and replayed. Bad chunks
accumulate on the device until :meth:`DecodePlan.check` reads them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .._cuda import (
    CAPTURE_ACTIVE,
    CAPTURE_INVALIDATED,
    capture_status,
    current_device,
    launch,
    relaxed_capture,
    stream_ptr,
)
from ..backends import _nvcomp_lib as nv
from ..errors import BackendError, CaptureError
from ..filters import Byteplane, Int8
from ..filters.byteplane import word_size
from ..interop import stream_handle
from ..kernels import byteplane as bp_kernels
from ..kernels import chunks
from ..kernels import int8 as int8_kernels

__all__ = ["KINDS", "DecodePlan", "Target"]

KINDS = ("plain", "byteplane", "dequantize", "codes")
_U64 = np.uint64
_ERR_INIT = np.array([0, 2**64 - 1], dtype=_U64)  # [bad chunk count, min (row << 16 | status)]


def _a256(n: int) -> int:
    return (n + 255) // 256 * 256


class Target(NamedTuple):
    """One container of a plan and where it goes.

    ``kind`` is ``"plain"`` (no filter: ``ptrs = (out,)``), ``"byteplane"`` (planes merged into ``out``),
    ``"dequantize"`` (INT8 codes and scales dequantized into ``out`` as ``dtype``: "F32", "F16", "BF16" or "F64")
    or ``"codes"`` (INT8 codes and scales into ``ptrs = (codes, scales)``). Outputs are device addresses on the
    plan's device, 16-byte aligned, of the sizes the container implies; the caller keeps them alive.
    """

    item: Any
    kind: str
    ptrs: tuple[int, ...]
    dtype: str | None = None


def kind_of(pipeline: tuple, dequantize: bool) -> str:
    """The plan stage a filter pipeline maps to; ValueError for pipelines without one."""
    if not pipeline:
        return "plain"
    if len(pipeline) == 1 and isinstance(pipeline[0], Byteplane):
        return "byteplane"
    if len(pipeline) == 1 and isinstance(pipeline[0], Int8):
        return "dequantize" if dequantize else "codes"
    ids = [f.get_config()["id"] for f in pipeline]
    raise ValueError(f"pipeline {ids} has no GPU decode stage (decode plans support none, ['byteplane'] and "
                     "['int8']); decode it with backend='cpu'")


class DecodePlan:
    """A reusable, allocation-free, asynchronous decode of many containers (filters included) into fixed buffers.

    Build one with :func:`cupycodec.decode_plan`. :meth:`run` enqueues the whole decode on a stream (CuPy's,
    torch's or a raw handle) and returns at once; :meth:`check` waits and raises
    :class:`~cupycodec.BackendError` if nvCOMP reported a bad chunk since the last check. A plan holds raw device
    pointers: the containers and output buffers must stay alive while it is used, and one plan must not run on two
    streams at once (its scratch is shared by its launches). ``nbytes`` is the device memory it holds.
    """

    def __init__(self, engine, targets: list[Target], *, stream_ptr: int, alloc=None, sync: bool = True,
                 checked: bool = True):
        if capture_status(stream_ptr) in (CAPTURE_ACTIVE, CAPTURE_INVALIDATED):
            raise CaptureError("a decode plan cannot be built while its stream is being captured into a CUDA graph "
                               "(building one uploads its tables and waits for them); build it before the capture, "
                               "then capture plan.run() or plan.replay()")
        self.device = engine.device
        self._engine = engine
        self._keep = [t.item._payload for t in targets]
        enc: dict[tuple, list] = {}  # codec config -> [(codec, rows, payload address, destination, where)]
        stored, merges, dequants, scratch = [], [], [], 0
        for i, t in enumerate(targets):
            item = t.item
            pb = item._payload.data.ptr
            dests, scratch = self._destinations(t, scratch, merges, dequants, i)
            for seg, dst in zip(item.segments, dests):
                if seg.raw_nbytes == 0:
                    continue
                rows = seg.decode_rows
                if rows.n_stored:
                    stored.append((rows, pb, dst))
                if rows.n_encoded:
                    if seg.codec.nvcomp_algorithm is None:  # the reader rejects encoded chunks of "raw"
                        raise BackendError(f"segment {seg.name!r}: codec {seg.codec.codec_id!r} has no GPU decoder")
                    enc.setdefault(seg.codec.config_key(), []).append((seg.codec, rows, pb, dst,
                                                                       (i, seg.name, seg.chunk_nbytes)))
        G = sum(r[1].n_encoded for parts in enc.values() for r in parts)
        S = sum(r[0].n_stored for r in stored)
        D = len(dequants)
        h = (G + 1) // 2  # u64 words holding the i32 statuses
        o_copy, o_err = 5 * G + h, 5 * G + h + 3 * S
        o_desc = o_err + 2
        n_words = o_desc + int8_kernels.DEQUANT_DESC_WORDS * D
        sizing, temp_total = [], 0  # per codec config: (rows, temp bytes, temp offset)
        for parts in enc.values():
            n = sum(p[1].n_encoded for p in parts)
            temp = nv.decompress_temp(parts[0][0], n, max(p[1].enc_max for p in parts),
                                      sum(p[1].enc_total for p in parts))
            sizing.append((n, temp, temp_total))
            temp_total += _a256(temp)
        o_temp = _a256(8 * n_words)
        o_scratch = o_temp + temp_total
        self.nbytes = max(o_scratch + scratch, 1)
        self._buf, base = self._allocate(alloc)

        def where(dst):  # ("abs", address) or ("scratch", offset)
            return dst[1] if dst[0] == "abs" else base + o_scratch + dst[1]

        cols: list[list] = [[], [], [], []]
        self._rows = []  # (first row, item index, segment name, output offsets, chunk bytes) for error messages
        self._groups = []  # (nvCOMP function, opts, first row, rows, temp bytes, temp address, name)
        row = 0
        for (n, temp, temp_off), parts in zip(sizing, enc.values()):
            fn, fname, dopts = nv.decoder(parts[0][0])
            self._groups.append((fn, dopts, row, n, temp, base + o_temp + temp_off, fname))
            for _codec, rows, pb, dst, (i, name, chunk) in parts:
                d = where(dst)
                cols[0].append(rows.enc_src + _U64(pb))
                cols[1].append(rows.enc_comp)
                cols[2].append(rows.enc_dst + _U64(d))
                cols[3].append(rows.enc_raw)
                self._rows.append((row, i, name, rows.enc_dst, chunk))
                row += rows.n_encoded
        copy = [[r.st_src + _U64(pb) for r, pb, _ in stored], [r.st_dst + _U64(where(d)) for r, _, d in stored],
                [r.st_size for r, _, _ in stored]]
        descs, dequant_runs = [], []
        first_desc = 0
        for dtype in dict.fromkeys(d[0] for d in dequants):  # one launch per output dtype
            mine = [d for d in dequants if d[0] == dtype]
            blocks = 0
            for _, codes, scales, out, shape, f in mine:
                w, b = int8_kernels.dequantize_desc(where(codes), where(scales), out, shape, **f._kw(),
                                                    first_block=blocks, device=self.device)
                descs.append(w)
                blocks += b
            dequant_runs.append((dtype, base + 8 * (o_desc + first_desc * int8_kernels.DEQUANT_DESC_WORDS),
                                 len(mine), blocks))
            first_desc += len(mine)
        merges = [bp_kernels.merge_launch(where(planes), stride, out, n, k, rotate, self.device)
                  for planes, stride, out, n, k, rotate in merges]
        pieces = [*cols[0], *cols[1], *cols[2], *cols[3], np.zeros(G + h, _U64), *copy[0], *copy[1], *copy[2],
                  _ERR_INIT, *descs]
        host = np.concatenate(pieces) if pieces else np.zeros(0, _U64)
        self._expected = host[3 * G : 4 * G].copy()  # raw chunk sizes, for the host-side check of run_and_wait
        engine.upload(base, host, stream_ptr)
        if sync:  # the plan may run on other streams: its tables must be on the device first
            import cupy

            cupy.cuda.runtime.streamSynchronize(stream_ptr)
        self._ptrs = tuple(base + 8 * k * G for k in range(6))  # comp, sizes, outs, raw, actual, statuses
        self._err = base + 8 * o_err
        self._n_enc = G
        # the kernels every run launches after nvCOMP's: the status check, stored-chunk copies, byte-plane merges
        # and dequantization, as (handle, grid, block, arguments) for cupycodec._cuda.launch
        _, _, _, raw_sizes, actual, status = self._ptrs
        after = []
        if S:
            c0 = base + 8 * o_copy
            name, grid, block, args = chunks.copy_args(c0, c0 + 8 * S, c0 + 16 * S, n=S, pad=False,
                                                       max_nbytes=max(r.st_max for r, _, _ in stored))
            after.append((chunks.handle(self.device, name), grid, block, args))
        after += merges
        for dtype, desc, items, blocks in dequant_runs:
            if blocks:
                name, grid, block, args = int8_kernels.dequantize_many_args(dtype, desc, items, blocks)
                after.append((int8_kernels.handle(self.device, name), grid, block, args))
        self._after = after
        self._check = None  # checked=False: only run_and_wait runs it, which checks on the host
        if G and checked:
            name, grid, block, args = chunks.check_args(status, actual, raw_sizes, self._err, n=G)
            self._check = (chunks.handle(self.device, name), grid, block, args)
        self.n_chunks = G + S
        self._graph = None  # the run captured as a CUDA graph (replay()); False where capturing it failed

    # -- building -------------------------------------------------------------------------------------------------
    @staticmethod
    def _destinations(t: Target, scratch: int, merges: list, dequants: list, i: int):
        """Where each segment of ``t`` decodes to, and the stage that finishes it; returns (dests, scratch end)."""
        segs = t.item.segments
        if t.kind == "plain":
            return [("abs", t.ptrs[0])], scratch
        if t.kind == "codes":
            return [("abs", t.ptrs[0]), ("abs", t.ptrs[1])], scratch
        if t.kind == "byteplane":
            spec = t.item.spec
            k = word_size(spec)
            n = spec.nbytes // k
            stride = bp_kernels.plane_stride(n)
            dests = [("scratch", scratch + j * stride) for j in range(k)]
            if n:
                merges.append((("scratch", scratch), stride, t.ptrs[0], n, k, bool(t.item.pipeline[0].rotate)))
            return dests, scratch + k * stride
        if t.kind == "dequantize":
            codes, scales = ("scratch", scratch), ("scratch", scratch + _a256(segs[0].raw_nbytes))
            if t.item.size:
                dequants.append((t.dtype, codes, scales, t.ptrs[0], t.item.shape, t.item.pipeline[0]))
            return [codes, scales], scratch + _a256(segs[0].raw_nbytes) + _a256(segs[1].raw_nbytes)
        raise ValueError(f"target {i}: unknown kind {t.kind!r}; one of {KINDS}")

    def _allocate(self, alloc):
        """The plan's one allocation: from ``alloc(nbytes)`` (any device buffer of at least ``nbytes`` on the
        plan's device, e.g. a torch tensor, so the framework's allocator accounts for it) or from CuPy."""
        import cupy

        if alloc is None:
            if current_device() == self.device:
                buf = cupy.empty(self.nbytes, dtype=np.uint8)
            else:
                with cupy.cuda.Device(self.device):
                    buf = cupy.empty(self.nbytes, dtype=np.uint8)
            return buf, buf.data.ptr
        from ..interop import as_output

        got = alloc(self.nbytes)
        view = as_output(got, what="the buffer alloc() returned")
        arr = view.array
        if not view.on_device or view.device != self.device or arr.nbytes < self.nbytes:
            where = f"cuda:{view.device}" if view.on_device else "the host"
            raise ValueError(f"alloc({self.nbytes}) must return a device buffer of at least {self.nbytes} bytes on "
                             f"cuda:{self.device}, got {arr.nbytes} bytes on {where}")
        return (got, view), arr.data.ptr

    # -- running --------------------------------------------------------------------------------------------------
    def _stream(self, stream) -> int:
        return stream_ptr(stream_handle(stream), self.device)

    def run(self, stream=None, *, _check: bool = True) -> None:
        """Enqueue the decode on ``stream`` (default: CuPy's current stream on the plan's device); never waits."""
        sp = self._stream(stream)
        if self._groups:
            if current_device() == self.device:  # nvCOMP launches on the current device
                self._run_nvcomp(sp)
            else:
                import cupy

                with cupy.cuda.Device(self.device):
                    self._run_nvcomp(sp)
        if self._check is not None and _check:
            launch(*self._check, self.device, sp)
        for h, grid, block, args in self._after:
            launch(h, grid, block, args, self.device, sp)

    def replay(self, stream=None) -> None:
        """:meth:`run` as one CUDA-graph launch: the run is captured once, on a stream of the plan's own, and each
        call launches that graph on ``stream``, so the host's cost is one launch however many nvCOMP calls and filter
        stages the plan holds (a few microseconds against tens for :meth:`run`). Where ``stream`` is itself being
        captured (a caller's CUDA graph), or the capture failed, this is :meth:`run`. Never waits; bad chunks are
        reported by :meth:`check`, as after :meth:`run`."""
        sp = self._stream(stream)
        graph = self._graph
        if graph is None and not _capturing(sp):
            graph = self._graph = _PlanGraph.capture(self)
        if graph and not _capturing(sp):
            graph.launch(sp)
        else:
            self.run(sp)

    def _run_nvcomp(self, sp: int) -> None:
        comp_ptrs, comp_sizes, out_ptrs, raw_sizes, actual, status = self._ptrs
        for fn, dopts, row, n, temp_n, temp_ptr, name in self._groups:
            st = fn(comp_ptrs + 8 * row, comp_sizes + 8 * row, raw_sizes + 8 * row, actual + 8 * row, n,
                    temp_ptr, temp_n, out_ptrs + 8 * row, dopts, status + 4 * row, sp)
            if st != 0:
                raise _call_error(name, st, sp)

    def run_and_wait(self, stream=None) -> None:
        """:meth:`run`, then wait and raise :class:`~cupycodec.BackendError` if any chunk failed. Statuses and decoded
        sizes come back in one download, checked on the host (no check kernel); a plan without nvCOMP chunks (all
        stored) does not wait at all."""
        sp = self._stream(stream)
        self.run(sp, _check=False)
        G = self._n_enc
        if G:
            res = self._engine.download(self._ptrs[4], 12 * G, sp)
            actual, status = res[: 8 * G].view(_U64), res[8 * G :].view(np.int32)
            if status.any() or actual.tobytes() != self._expected.tobytes():
                bad = np.flatnonzero((status != 0) | (actual != self._expected))
                raise self._error(bad.size, int(bad[0]), int(status[bad[0]]))

    def check(self, stream=None) -> None:
        """Wait for ``stream`` and raise :class:`~cupycodec.BackendError` if any chunk failed since the last check
        (the error state is then cleared)."""
        sp = self._stream(stream)
        err = self._engine.download(self._err, 16, sp).view(_U64)
        if int(err[0]):
            count, key = int(err[0]), int(err[1])
            self._engine.upload(self._err, _ERR_INIT, sp)
            import cupy

            cupy.cuda.runtime.streamSynchronize(sp)
            raise self._error(count, key >> 16, key & 0xFFFF)

    def _error(self, count: int, row: int, status: int) -> BackendError:
        """The error for ``count`` bad chunks, the first at plan row ``row`` (nvCOMP status 0: wrong size)."""
        what = nv.status_name(status) if status else "decoded size differs from the chunk table"
        where = f"plan row {row}"
        for first, i, name, dst, chunk in reversed(self._rows):
            if first <= row:
                where = f"item {i}, segment {name!r}, chunk {int(dst[row - first]) // chunk}"
                break
        return BackendError(f"nvCOMP failed to decode {count} chunk(s); first: {where}", what)

    def __repr__(self):
        return f"<DecodePlan device=cuda:{self.device} chunks={self.n_chunks} nbytes={self.nbytes}>"


def _call_error(name: str, st: int, sp: int) -> BackendError:
    """The error for an nvCOMP call that failed: where the stream's CUDA-graph capture was invalidated before it,
    the call only reports that, and the message says so (the first refused call is the one to find)."""
    if capture_status(sp) == CAPTURE_INVALIDATED:
        return BackendError(f"{name} failed because the CUDA graph being captured on this stream was already "
                            "invalidated by an earlier CUDA call in the capture (one CUDA refuses while capturing, "
                            "e.g. a synchronization, a free or a graph's destruction); that call is the one to fix, "
                            "not the decode", nv.status_name(st))
    return BackendError(f"{name} failed", nv.status_name(st))


def _capturing(sp: int) -> bool:
    """Whether raw stream ``sp`` is being captured into a CUDA graph."""
    import cupy

    return bool(cupy.cuda.runtime.streamIsCapturing(sp))


class _PlanGraph:
    """A plan's :meth:`~DecodePlan.run` captured as a CUDA graph (its instantiated executable), destroyed with it."""

    __slots__ = ("_exec", "_graph")

    def __init__(self, graph: int, exec_: int):
        self._graph, self._exec = graph, exec_

    @staticmethod
    def capture(plan: DecodePlan) -> _PlanGraph | bool:
        """Capture ``plan.run`` on a fresh stream of the plan's device (thread-local capture mode: other threads'
        CUDA calls are not affected); False where CUDA refuses (the caller then keeps calling ``run``)."""
        import cupy

        rt = cupy.cuda.runtime
        with cupy.cuda.Device(plan.device):
            stream = cupy.cuda.Stream(non_blocking=True)
            try:
                rt.streamBeginCapture(stream.ptr, rt.streamCaptureModeThreadLocal)
            except cupy.cuda.runtime.CUDARuntimeError:
                return False
            try:
                plan.run(stream.ptr)
            except BaseException:  # the capture ends, and the graph it made so far goes, with the error
                try:
                    partial = rt.streamEndCapture(stream.ptr)
                    if partial:
                        rt.graphDestroy(partial)
                except cupy.cuda.runtime.CUDARuntimeError:
                    pass
                raise
            try:
                graph = rt.streamEndCapture(stream.ptr)
            except cupy.cuda.runtime.CUDARuntimeError:
                graph = 0
            if not graph:
                return False
            try:
                return _PlanGraph(graph, rt.graphInstantiate(graph))
            except cupy.cuda.runtime.CUDARuntimeError:
                rt.graphDestroy(graph)
                return False

    def launch(self, sp: int) -> None:
        import cupy

        cupy.cuda.runtime.graphLaunch(self._exec, sp)

    def __del__(self):
        # relaxed: GC may run this inside a capture of the caller's (a torch CUDA graph after `del model`), which
        # CUDA would invalidate on a graph's destruction in thread-local or global mode (H200, 2026-12-03)
        try:
            import cupy

            with relaxed_capture():
                cupy.cuda.runtime.graphExecDestroy(self._exec)
                cupy.cuda.runtime.graphDestroy(self._graph)
        except Exception:  # interpreter shutdown, or a context already gone: nothing left to free
            pass
