"""Encode plans: compress a fixed list of segments with nvCOMP and pack them, checksummed, into containers' payloads.

A plan is built once per geometry (per item, the (codec config, size, chunk) of each segment) and cached by the
engine. ``run`` makes one upload, one nvCOMP call per codec config, one download and synchronization (the
compressed sizes decide each payload's size, so compression cannot avoid that one), then one upload and one launch
of the packing kernel (kernels.crc32 in packing mode), which copies every chunk and chunk table into place and
writes each chunk's CRC32 into its table slot. The host reads the CRCs after an event, only when it needs them.
Segments whose worst-case scratch would pass 1 GiB are compressed in bounded rounds, compacted between rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import layout
from .._cuda import external_stream, launch
from ..backends import _nvcomp_lib as nv
from ..errors import BackendError
from ..kernels import chunks, crc32
from . import Engine

__all__ = ["EncodePlan", "PackedItem", "PackedSegment", "PendingCRC"]

ROUND_NBYTES = 1 << 30  # bound on nvCOMP output + temp scratch per round
_U64 = np.uint64


def _a256(n: int) -> int:
    return (n + 255) // 256 * 256


class PendingCRC:
    """The CRC32s of a segment's chunks, written into its table on the device by the packing kernel; calling it
    waits for them (an event recorded after the kernel) and returns them as a host uint32 array."""

    __slots__ = ("event", "n", "offset", "payload")

    def __init__(self, payload, offset: int, n: int, event):
        self.payload, self.offset, self.n, self.event = payload, int(offset), int(n), event

    def __call__(self) -> np.ndarray:
        if isinstance(self.payload, memoryview):  # the payload was brought to the host: read it there
            return np.frombuffer(self.payload, np.uint32, self.n, self.offset).copy()
        import cupy

        out = np.empty(self.n, np.uint32)
        if self.n:
            self.event.synchronize()
            cupy.cuda.runtime.memcpy(out.ctypes.data, self.payload.data.ptr + self.offset, 4 * self.n, 2)
        return out


@dataclass
class PackedSegment:
    comp_nbytes: np.ndarray  # uint32 per chunk, as in the table
    flags: np.ndarray  # uint8 per chunk: 1 = stored
    offset: int  # the segment's offset in its payload
    nbytes: int
    crc: PendingCRC
    rows: layout.DecodeRows


@dataclass
class PackedItem:
    payload: object  # device uint8 array
    segments: list[PackedSegment]


class _Batch:
    """Chunks (rows ``lo:hi`` of the plan) of one codec config compressed by one nvCOMP call."""

    __slots__ = ("codec", "fn", "hi", "lo", "max_chunk", "name", "opts", "out_offset", "stride", "temp",
                 "temp_offset", "zero")

    def __init__(self, codec, lo: int, hi: int, raw: np.ndarray):
        self.codec, self.lo, self.hi = codec, lo, hi
        n, self.max_chunk, total = hi - lo, int(raw[lo:hi].max()), int(raw[lo:hi].sum())
        self.temp, max_out = nv.compress_sizes(codec, n, self.max_chunk, total)
        self.stride = _a256(max_out)
        self.fn, self.name = nv.compress_fn(codec)
        self.opts = nv.codec_opts(codec)[0]
        self.zero = codec.nvcomp_algorithm in nv.LEAVES_GAPS  # zeroed first: the container stays deterministic
        self.out_offset = self.temp_offset = 0

    @property
    def scratch_nbytes(self) -> int:
        return (self.hi - self.lo) * self.stride + _a256(self.temp)


class EncodePlan:
    """How to compress and pack one geometry: see the module docstring. Thread-safe (it holds no per-call state)."""

    def __init__(self, engine, items):
        self.engine = engine
        segs = [seg for item in items for seg in item]
        self.item_sizes = [len(item) for item in items]
        self.codecs = [codec for codec, _, _ in segs]
        self.nbytes = [int(nb) for _, nb, _ in segs]
        self.chunks = [int(ch) for _, _, ch in segs]
        geo = [layout.geometry(nb, ch) for nb, ch in zip(self.nbytes, self.chunks)]
        self.n = [len(g[0]) for g in geo]
        self.seg_of_row = np.repeat(np.arange(len(segs)), self.n)
        self.raw = np.concatenate([g[0] for g in geo]) if segs else np.zeros(0, _U64)
        self.in_offsets = np.concatenate([g[1] for g in geo]) if segs else np.zeros(0, _U64)
        self.row_start = np.concatenate([[0], np.cumsum(self.n)]).astype(np.int64)
        self.m = int(self.row_start[-1])
        self.tables = [layout.table_nbytes(n) for n in self.n]
        # nvCOMP rows, ordered by codec config (one call each): `order` maps them to plan rows
        groups: dict[tuple, list[int]] = {}
        for s, codec in enumerate(self.codecs):
            if self.n[s] and codec.nvcomp_algorithm is not None:
                groups.setdefault(codec.config_key(), []).append(s)
        order, batches = [], []
        for members in groups.values():
            rows = np.concatenate([np.arange(self.row_start[s], self.row_start[s + 1]) for s in members])
            codec = self.codecs[members[0]]
            lo = len(order)
            order.extend(rows.tolist())
            raw = self.raw[rows]
            b = _Batch(codec, 0, len(rows), raw)
            per_row = max(1, b.scratch_nbytes // max(len(rows), 1))
            step = len(rows) if b.scratch_nbytes <= ROUND_NBYTES else max(1, ROUND_NBYTES // per_row)
            for k in range(0, len(rows), step):
                bb = _Batch(codec, k, min(len(rows), k + step), raw)
                bb.lo, bb.hi = lo + bb.lo, lo + bb.hi
                batches.append(bb)
        self.order = np.asarray(order, dtype=np.int64)
        self.rounds = self._rounds(batches)
        # CRC launch shape, sized for raw chunks (they bound the packed ones)
        self.crc_shape = crc32.shape_for(int(self.raw.max()), int(self.raw.sum())) if self.m else (1, 0, 0)
        self.work_words = crc32.work_words(self.m, self.crc_shape[0])
        self.n_blocks = self.m * self.crc_shape[0]
        self._pack_layout()

    def _pack_layout(self) -> None:
        """What every run's packing launch needs that depends on the geometry alone: per row its segment, item and
        CRC slot (relative to its segment), per segment its item, and the launch's argument block (u64 words:
        the kernel's arguments, four rows per chunk, the CRC scratch, table descriptors, then the table images),
        with the argument template relative to the block's address."""
        S, m, A = len(self.n), self.m, crc32.PACKED_ARGS
        self.item_of_seg = np.repeat(np.arange(len(self.item_sizes)), self.item_sizes)
        self.first_seg = np.concatenate([[0], np.cumsum(self.item_sizes)]).astype(np.int64)
        self.item_of_row = self.item_of_seg[self.seg_of_row] if m else np.zeros(0, np.int64)
        self.tables_u64 = np.asarray(self.tables, dtype=_U64).reshape(S)
        self.crc_rel = np.concatenate([layout.crc_slots(n) for n in self.n]) if m else np.zeros(0, _U64)
        self.tab_segs = [k for k in range(S) if self.n[k]]  # segments whose table the kernel copies
        work = -(-self.work_words // 2)
        self.o_rows, o_work = A, A + 4 * m
        self.o_tabs = o_work + work
        self.o_img = self.o_tabs + 4 * len(self.tab_segs)
        self.img_pos = np.concatenate([[0], np.cumsum([self.tables[k] for k in self.tab_segs])]).astype(np.int64)
        self.pack_words = self.o_img + int(self.img_pos[-1]) // 8
        o = self.o_rows
        self.arg_tpl = np.asarray(crc32.packed_args(m, self.crc_shape, ptrs=8 * o, sizes=8 * (o + m),
                                                    out_addrs=8 * (o + 2 * m), work=8 * o_work if work else 0,
                                                    src=8 * (o + 3 * m), tabs=8 * self.o_tabs,
                                                    n_tabs=len(self.tab_segs)), dtype=_U64)
        self.arg_rel = np.zeros(A, _U64)
        self.arg_rel[[0, 1, 2, 8, 9] + ([7] if work else [])] = 1
        tabs = np.zeros((len(self.tab_segs), 4), _U64)  # image address (relative), table address (per run), words, n
        for t, k in enumerate(self.tab_segs):
            tabs[t] = (8 * self.o_img + self.img_pos[t], 0, self.tables[k] // 4, self.n[k])
        self.tab_tpl = tabs

    def _rounds(self, batches: list[_Batch]) -> list[dict]:
        """Group batches into rounds of at most ROUND_NBYTES of scratch and lay each round's buffer out:
        outputs and temps, then nvCOMP's tables (u64 in_ptrs, in_sizes, out_ptrs, comp sizes; i32 statuses)."""
        rounds, cur, used = [], [], 0
        for b in batches:
            if cur and used + b.scratch_nbytes > ROUND_NBYTES:
                rounds.append(cur)
                cur, used = [], 0
            cur.append(b)
            used += b.scratch_nbytes
        if cur:
            rounds.append(cur)
        out = []
        for bs in rounds:
            o = 0
            for b in bs:
                b.out_offset, b.temp_offset = o, o + (b.hi - b.lo) * b.stride
                o += b.scratch_nbytes
            lo, hi = bs[0].lo, bs[-1].hi  # batches of a round are consecutive nvCOMP rows
            rows = self.order[lo:hi]
            outs = np.concatenate([_U64(b.out_offset) + np.arange(b.hi - b.lo, dtype=_U64) * _U64(b.stride)
                                   for b in bs])
            out.append({"batches": bs, "lo": lo, "hi": hi, "rows": rows, "tab": o, "nbytes": o + 36 * (hi - lo),
                        "out_offsets": outs, "all": len(rows) == self.m and bool((rows == np.arange(self.m)).all())})
        return out

    # ------------------------------------------------------------------------------------------------------------
    def compress(self, datas, sp: int, keep: list, tail: int = 0):
        """nvCOMP over every chunk: returns (final size, source address) per plan row, each chunk stored raw unless
        coding shrank it, and the address of ``tail`` extra bytes in this call's scratch (0 when not given there:
        several rounds). ``datas``: one C-contiguous, 256-byte aligned device array per segment. Buffers that the
        returned addresses point into are appended to ``keep``."""
        import cupy

        eng = self.engine
        bases = np.asarray([d.data.ptr if d.nbytes else 0 for d in datas], dtype=_U64)
        in_ptrs = bases[self.seg_of_row] + self.in_offsets
        sizes, src = self.raw.copy(), in_ptrs.copy()
        many = len(self.rounds) > 1
        tail_ptr = 0
        for rd in self.rounds:
            rows, n = rd["rows"], rd["hi"] - rd["lo"]
            extra = 0 if many or not tail else _a256(rd["nbytes"]) - rd["nbytes"] + tail
            buf = cupy.empty(rd["nbytes"] + extra, dtype=np.uint8)
            base = buf.data.ptr
            if extra:
                tail_ptr = base + _a256(rd["nbytes"])
            t = base + rd["tab"]
            out_ptrs = rd["out_offsets"] + _U64(base)
            for b in rd["batches"]:
                if b.zero:
                    cupy.cuda.runtime.memsetAsync(base + b.out_offset, 0, (b.hi - b.lo) * b.stride, sp)
            every = rd["all"]  # this round is every plan row, in plan order (the usual case): no gathers
            raw = self.raw if every else self.raw[rows]
            ins = in_ptrs if every else in_ptrs[rows]
            eng.upload(t, np.concatenate([ins, raw, out_ptrs]), sp)
            for b in rd["batches"]:
                r = b.lo - rd["lo"]
                st = b.fn(t + 8 * r, t + 8 * (n + r), b.max_chunk, b.hi - b.lo,
                          base + b.temp_offset, b.temp, t + 8 * (2 * n + r), t + 8 * (3 * n + r), b.opts,
                          t + 32 * n + 4 * r, sp)
                if st != 0:
                    raise BackendError(f"{b.name} failed", nv.status_name(st))
            res = eng.download(t + 24 * n, 12 * n, sp)
            status = res[8 * n :].view(np.int32)
            if status.any():
                bad = np.flatnonzero(status)
                raise BackendError(f"nvCOMP compression failed for {bad.size} chunk(s)",
                                   nv.status_name(int(status[bad[0]])))
            comp = res[: 8 * n].view(_U64)
            shrank = comp < raw
            if every:
                sizes, src = np.where(shrank, comp, raw), np.where(shrank, out_ptrs, ins)
            else:
                sizes[rows] = np.where(shrank, comp, raw)
                src[rows] = np.where(shrank, out_ptrs, ins)
            if many:  # free this round's scratch for the next: move the chunks that shrank into a tight buffer
                keep.append(self._compact(rows[shrank], comp[shrank], out_ptrs[shrank], src, sp))
            else:
                keep.append(buf)
        return sizes, src, tail_ptr

    @staticmethod
    def _compact(rows, comp, ptrs, src, sp: int):
        import cupy

        padded = layout.padded(comp)
        offs = np.cumsum(padded) - padded
        k = len(rows)
        with external_stream(sp):
            tight = cupy.empty(max(int(padded.sum()), 1), dtype=np.uint8)
            if k:
                new = _U64(tight.data.ptr) + offs
                table = cupy.empty(3 * k, dtype=_U64)
                Engine.upload(table.data.ptr, np.concatenate([ptrs, new, comp.astype(_U64)]), sp)
                chunks.copy_chunks(table[:k], table[k : 2 * k], table[2 * k :], max_nbytes=int(comp.max()), pad=False)
                src[rows] = new
        return tight  # the round's scratch is freed by the caller in stream order, after the copy

    # ------------------------------------------------------------------------------------------------------------
    def run(self, datas, stream_ptr: int) -> list[PackedItem]:
        """Compress and pack: one payload per item, in this plan's item order (see the module docstring)."""
        import cupy

        sp = stream_ptr
        keep: list = list(datas)
        pack_nbytes = 8 * self.pack_words if self.m else 0
        if self.rounds:
            sizes, src, p = self.compress(datas, sp, keep, pack_nbytes)
        else:  # no nvCOMP codec (raw): every chunk is stored as it is, and nothing waits
            sizes, p = self.raw, 0
            src = np.asarray([d.data.ptr if d.nbytes else 0 for d in datas], dtype=_U64)[self.seg_of_row] \
                + self.in_offsets
        m = self.m
        flags = (sizes == self.raw).view(np.uint8)
        # every row's offset in its payload, every segment's size and offset, every item's size, in a few vector ops
        padded = (sizes + _U64(layout.CHUNK_ALIGN - 1)) & ~_U64(layout.CHUNK_ALIGN - 1)
        ends = np.zeros(m + 1, _U64)
        np.cumsum(padded, out=ends[1:])
        seg_nbytes = self.tables_u64 + (ends[self.row_start[1:]] - ends[self.row_start[:-1]])
        seg_ends = np.zeros(len(seg_nbytes) + 1, _U64)
        np.cumsum(seg_nbytes, out=seg_ends[1:])
        item_start = seg_ends[self.first_seg]
        seg_off = seg_ends[:-1] - item_start[self.item_of_seg]
        rel = ends[:-1] - ends[self.row_start[self.seg_of_row]] + (self.tables_u64 + seg_off)[self.seg_of_row]
        payloads = [cupy.empty(int(n), dtype=np.uint8) for n in np.diff(item_start)]
        pbs = np.asarray([pl.data.ptr for pl in payloads], dtype=_U64)
        comp32 = sizes.astype(np.uint32)
        items: list[PackedItem] = []
        for i, payload in enumerate(payloads):
            segs = []
            for k in range(self.first_seg[i], self.first_seg[i + 1]):
                lo, hi = self.row_start[k], self.row_start[k + 1]
                off, n = int(seg_off[k]), int(hi - lo)
                rows = layout.decode_rows(rel[lo:hi], sizes[lo:hi], flags[lo:hi], self.nbytes[k], self.chunks[k])
                segs.append(PackedSegment(comp32[lo:hi], flags[lo:hi], off, int(seg_nbytes[k]),
                                          PendingCRC(payload, off + 4 * n, n, None), rows))
            items.append(PackedItem(payload, segs))
        if m:
            seg_abs = seg_off + pbs[self.item_of_seg]
            event = self._pack(p, src, rel + pbs[self.item_of_row], sizes, self.crc_rel + seg_abs[self.seg_of_row],
                               seg_abs, comp32, flags, sp, keep)
            for item in items:
                for seg in item.segments:
                    seg.crc.event = event
        # `keep` (inputs, scratch) may be freed now: CuPy's pool reuses memory only in this stream's order, after
        # the packing launch.
        return items

    def _pack(self, p: int, src, dst, sizes, slots, seg_abs, comp32, flags, sp: int, keep: list):
        """One upload (kernel arguments, chunk rows, table descriptors and images) to the argument block at ``p``
        (allocated here when 0) and one packing launch; returns the event the CRCs are read after."""
        import cupy

        m, A, o = self.m, crc32.PACKED_ARGS, self.o_rows
        if not p:
            dev = cupy.empty(8 * self.pack_words, dtype=np.uint8)
            keep.append(dev)
            p = dev.data.ptr
        host = np.zeros(self.pack_words, dtype=_U64)
        np.add(self.arg_tpl, self.arg_rel * _U64(p), out=host[:A])
        host[o : o + m] = dst
        host[o + m : o + 2 * m] = sizes
        host[o + 2 * m : o + 3 * m] = slots
        host[o + 3 * m : o + 4 * m] = src
        tabs = self.tab_tpl.copy()
        tabs[:, 0] += _U64(p)
        tabs[:, 1] = seg_abs[self.tab_segs]
        host[self.o_tabs : self.o_img] = tabs.reshape(-1)
        img = host[self.o_img :].view(np.uint8)
        for t, k in enumerate(self.tab_segs):  # per segment: comp sizes, (CRC slots, skipped), flags
            lo, hi, at = self.row_start[k], self.row_start[k + 1], self.img_pos[t]
            n = hi - lo
            img[at : at + 4 * n] = comp32[lo:hi].view(np.uint8)
            img[at + 8 * n : at + 9 * n] = flags[lo:hi]
        self.engine.upload(p, host, sp)
        handle, consts, threads, _table = crc32.packed_launcher(self.engine.device)
        launch(handle, self.n_blocks, threads, (p, consts), self.engine.device, sp)
        event = cupy.cuda.Event(block=False, disable_timing=True)
        cupy.cuda.runtime.eventRecord(event.ptr, sp)
        return event
