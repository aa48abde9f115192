"""Compression: each array is placed (host or device), filtered, then compressed by the CPU backend or by one GPU
encode plan per device for the whole batch. ``auto`` never returns a container bigger than the ``raw`` one."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import _config, _cpu_auto, backends, interop, layout
from .backends import _nvcomp_lib as nv
from .backends import cpu
from .codecs import Codec, Raw
from .container import ChunkTable, CompressedArray, Header, Segment, build_segments, producer_info
from .dtypes import ArraySpec, dtype_name, itemsize, storage_dtype
from .engine import engine, launching_on, stream_ptr
from .errors import FormatError
from .filters import Byteplane

__all__ = ["Job", "compress_jobs", "prepare"]

_AUTO_TRY_NBYTES = 64 * 1024  # below this, CPU auto compresses every candidate and keeps the smallest container
_AUTO_EXACT_MARGIN = 1024  # payloads within this of raw's are compared with their headers
# ... and for a plain one-segment container, within this: its header differs from raw's only in the codec entry,
# the chunk size, the sizes and the table CRC (at most 16 bytes measured over 3,000 arrays, 32 by counting digits)
_PLAIN_EXACT_MARGIN = 64
_SEGMENT_HEADER_NBYTES = 190  # header JSON of one segment (measured: 185-195 bytes for plane segments)


class Job:
    """One array on its way into a container."""

    __slots__ = ("arrays", "auto", "backend", "chunk", "codec", "device", "keep", "keep_on_device", "metadata",
                 "pipeline", "source", "spec", "specs", "user_filters")

    def with_codec(self, codec: Codec, pipeline=None) -> Job:
        """This job with another codec (and pipeline: the filters then run again on the source)."""
        job = Job()
        for name in Job.__slots__:
            setattr(job, name, getattr(self, name))
        job.codec, job.auto = codec, False
        if pipeline is not None:
            _apply_filters(job, pipeline)
        return job


def prepare(x, *, codec: Codec | None, filters: list, chunk_nbytes, dtype, backend, metadata, stream: int | None):
    """Place ``x`` where it will be compressed and run its filters (a :class:`Job`)."""
    a = interop.as_array(x)
    arr, on_device = a.array, a.on_device
    override = _dtype_override(dtype, a)
    if override is None and a.dtype_name != dtype_name(arr.dtype)[0]:
        override = a.dtype_name  # a bit view of a dtype NumPy/CuPy lack here (bf16 from torch on the GPU, say)
    spec = ArraySpec.of(arr, override)
    pipeline = list(filters)
    quantized = any(not f.lossless for f in pipeline)
    job = Job()
    job.auto, job.user_filters = codec is None, bool(pipeline)
    if codec is None:
        where = backends.select(backend, on_device=on_device, codecs=[])
        codec, extra = _config.auto(spec, where == "nvcomp", quantized)
        if not pipeline:
            pipeline = extra
    else:
        _validate(spec, pipeline, codec, chunk_nbytes)  # option errors before backend errors
        where = backends.select(backend, on_device=on_device, codecs=[codec])
    gpu = where == "nvcomp"
    job.device = None
    if gpu:
        job.device = a.device if on_device else _current_device()
        arr = _to_device(arr, spec, pipeline, on_device, job.device, stream)
    elif on_device:  # device data compressed on the CPU (no nvCOMP here)
        arr = arr.get()
        if spec.dtype != ArraySpec.of(arr).dtype:  # a raw bit view of bf16/f8: give NumPy the logical dtype
            arr = arr.view(spec.numpy_dtype())
        arr = np.ascontiguousarray(arr)
    else:
        arr = np.ascontiguousarray(arr)
        if arr.dtype != spec.numpy_dtype():
            arr = arr.view(spec.numpy_dtype())
    job.source, job.keep = arr, a.keep
    job.spec, job.codec, job.chunk, job.backend = spec, codec, chunk_nbytes, where
    job.keep_on_device = on_device and gpu
    job.metadata = _check_metadata(metadata)
    if job.auto and gpu and not pipeline and spec.dtype not in _config.ANS_FLOAT_MODES:
        job.codec = _gpu_trial(arr, spec, job.device, stream)
    if job.auto and not gpu and not job.user_filters and spec.nbytes > _AUTO_TRY_NBYTES:
        pipeline = _cpu_auto.choose(arr, spec, codec, _config.cpu_chunk(codec, spec))
    _apply_filters(job, pipeline, stream)
    return job


def _to_device(arr, spec: ArraySpec, pipeline, on_device: bool, device: int, stream: int | None):
    """The array as a C-contiguous, 256-byte aligned CuPy array on ``device`` (nvCOMP's alignment)."""
    import cupy

    if on_device and arr.flags.c_contiguous and not (arr.size and arr.data.ptr % 256):
        return arr  # as it is (the usual case): no copy to launch
    with launching_on(device, stream_ptr(stream, device)):
        if not on_device:
            host = np.ascontiguousarray(arr)
            if spec.byteorder == ">" and not pipeline:  # CuPy holds native order only: ship the exact bytes
                arr = cupy.asarray(host.reshape(-1).view(np.uint8))
            else:  # filters work on values, which do not depend on the byte order
                native = host.astype(host.dtype.newbyteorder("="), copy=False)
                arr = cupy.asarray(native.view(storage_dtype(spec.dtype)))
        arr = cupy.ascontiguousarray(arr)
        if arr.size and arr.data.ptr % 256:
            arr = arr.copy()
    return arr


def _apply_filters(job: Job, pipeline, stream: int | None = None) -> None:
    specs: dict[str, ArraySpec] = {"data": job.spec}
    arrays: dict[str, Any] = {"data": job.source}
    resolved = []
    gpu = job.backend == "nvcomp"
    ctx = None
    if gpu and pipeline:
        ctx = launching_on(job.device, stream_ptr(stream, job.device))
        ctx.__enter__()
    try:
        for f in pipeline:
            f = f.resolve(specs)
            out_specs = f.specs(specs)
            if not gpu and len(pipeline) == 1 and isinstance(f, Byteplane):
                arrays = None  # split block by block while compressing (backends.cpu.EncodePlanes)
            else:
                arrays = f.encode(arrays, specs, gpu)
            specs = out_specs
            resolved.append(f)
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    job.arrays, job.specs, job.pipeline = arrays, specs, tuple(resolved)


def _current_device() -> int:
    import cupy

    return cupy.cuda.runtime.getDevice()


def _validate(spec: ArraySpec, pipeline, codec: Codec, chunk_nbytes) -> None:
    specs = {"data": spec}
    for f in pipeline:
        f = f.resolve(specs)
        specs = f.specs(specs)
    for s in specs.values():
        _config.check_chunk(chunk_nbytes, _config.resolved(codec, s))


_BITS = ("I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64")  # what a raw bit view is held in


def _dtype_override(dtype, a: interop.Array) -> str | None:
    """The logical dtype ``dtype=`` names for the input ``a``: a raw bit view (integers) holding another dtype's
    bits, in the input's byte order. Anything else would reinterpret values (float16 read as bfloat16 bits), so it
    is refused unless it names the input's own dtype."""
    if dtype is None:
        return None
    order = None
    if isinstance(dtype, str) and dtype.lower() in ("bfloat16", "bf16"):
        name = "BF16"
    elif isinstance(dtype, str) and dtype.isupper():
        name = dtype
        try:
            itemsize(name)
        except FormatError:  # the reader's error blames a header; here the argument is wrong
            raise ValueError(f"dtype={dtype!r} is not a dtype name: give a NumPy dtype (np.float16, 'bfloat16', "
                             "'float8_e4m3fn') or a container dtype name (BF16, F8_E4M3, F16, ...)") from None
    else:
        import ml_dtypes  # noqa: F401  (so "float8_e4m3fn" style names resolve)

        try:
            np_dtype = np.dtype(dtype)
        except TypeError:  # NumPy's "data type 'bogus' not understood" named no argument
            raise TypeError(f"dtype={dtype!r} is not a dtype: give a NumPy dtype (np.float16, 'bfloat16', "
                            "'float8_e4m3fn') or a container dtype name (BF16, F8_E4M3, F16, ...)") from None
        name, stated = dtype_name(np_dtype)
        order = None if np_dtype.byteorder in ("=", "|") else stated  # only a byte order the caller wrote
    if name == a.dtype_name:
        return name
    if a.dtype_name not in _BITS:
        raise TypeError(f"dtype={dtype!r} names the logical dtype of a raw bit view (e.g. uint16 bits of bfloat16), "
                        f"but the input is {a.dtype_name}, not integers holding bits; compress it as it is (leave "
                        "dtype out), or convert it with astype() first")
    if order is not None and order != dtype_name(a.array.dtype)[1]:
        raise ValueError(f"dtype={dtype!r} gives byte order {order!r}, but a bit view's byte order is the input's "
                         f"({a.array.dtype}); view the bits with that byte order, or name the dtype without one")
    return name


def _check_metadata(metadata) -> dict:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise TypeError("metadata must be a mapping with string keys (stored as JSON)")
    stack = list(metadata.items())
    while stack:  # nested mappings too: JSON turns a key 0 into "0", and the container would read back otherwise
        key, value = stack.pop()
        if isinstance(value, Mapping):
            bad = next((k for k in value if not isinstance(k, str)), None)
            if bad is not None:
                raise TypeError(f"metadata key {bad!r} under {key!r} is not a string; JSON stores keys as strings, "
                                f"so it would read back as a string: use string keys")
            stack.extend(value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((key, v) for v in value)
    return dict(metadata)


def _segment_codecs(job: Job) -> list[tuple[str, ArraySpec, Codec, int]]:
    gpu = job.backend == "nvcomp"
    out = []
    for name, spec in job.specs.items():
        codec = _config.resolved(job.codec, spec)
        if gpu:
            chunk = _config.check_chunk(job.chunk, codec, spec.nbytes)
        elif job.chunk is None:
            chunk = _config.cpu_chunk(codec, job.spec)
        else:
            chunk = _config.check_chunk(job.chunk, codec)
        out.append((name, spec, codec, chunk))
    return out


# -- the CPU -------------------------------------------------------------------------------------------------------


def cpu_work(job: Job):
    """``(works, lay_out)``: the job's CPU work (:class:`~cupycodec.backends.cpu.Work`), and a function that lays its
    container out once that work has run (``(header, chunks)``, which :func:`fill` copies into a payload)."""
    segs = _segment_codecs(job)
    if job.arrays is None:  # byte planes, split block by block
        _, _, codec, chunk = segs[0]
        k, rotate, big = job.pipeline[0].params(job.spec)
        work = cpu.EncodePlanes(cpu.as_bytes_array(job.source), k, rotate, big, codec, chunk)
        return [work], lambda: _lay_out(job, segs, work.tables())
    works = [cpu.EncodeSegment(cpu.as_bytes(job.arrays[name]), codec, chunk) for name, _, codec, chunk in segs]
    return works, lambda: _lay_out(job, segs, [w.table() for w in works])


def compress_cpu(job: Job) -> CompressedArray:
    works, lay_out = cpu_work(job)
    cpu.run(works)
    return fill([lay_out()])[0]


def _lay_out(job: Job, segs, tables):
    pieces, blobs = [], []
    for (name, spec, codec, chunk), (comp, crc, flags, chunks) in zip(segs, tables):
        pieces.append((name, spec, codec, chunk, ChunkTable.build(comp, crc, flags)))
        blobs.append(chunks)
    segments = build_segments(pieces)
    return Header(job.spec, job.pipeline, segments, producer_info("cpu"), job.metadata), blobs


def fill(laid_out, prefixes=None) -> list[CompressedArray]:
    """Containers of ``(header, chunks)`` layouts (and their encoded headers, where known), every chunk of all of
    them copied by the pool in one pass."""
    # Every byte is written once: the tables and the padding between chunks here, the chunks by the workers, in
    # parallel and without the GIL. (np.zeros zeroed payloads below glibc's mmap threshold on this thread, 3 ms of a
    # 44 ms `compress_many` of MiniLM's state dict; a bytearray, zeroed and filled by this thread alone, took 15-37 %
    # of a 2-thread compression: benchmarks/RESULTS.md, issue 10.)
    payloads, works = [], []
    for header, blobs in laid_out:
        payload = np.empty(header.payload_nbytes, np.uint8)
        mv = memoryview(payload)
        items, starts, ends = [], [], []
        for seg, chunks in zip(header.segments, blobs):
            table = seg.table.to_bytes()
            mv[seg.offset : seg.offset + len(table)] = table
            offsets = seg.chunk_offsets.tolist()
            items += zip(offsets, chunks)
            starts += [seg.offset, *offsets]
            ends += [seg.offset + len(table), *(o + len(c) for o, c in zip(offsets, chunks))]
        _zero_gaps(payload, starts, ends)
        works.append(cpu.CopyChunks(payload.ctypes.data, items))
        payloads.append(mv)
    cpu.run(works)
    prefixes = prefixes or [None] * len(payloads)
    return [CompressedArray(h, mv, _prefix=p) for (h, _), mv, p in zip(laid_out, payloads, prefixes)]


def _zero_gaps(payload: np.ndarray, starts: list, ends: list) -> None:
    """Zero the bytes of ``payload`` that no ``[start, end)`` range covers (the padding after each chunk)."""
    order = np.argsort(starts, kind="stable")
    lo, hi = np.asarray(starts, np.int64)[order], np.asarray(ends, np.int64)[order]
    covered = np.maximum.accumulate(hi) if len(hi) else hi
    gap_lo = np.concatenate([[0], covered])
    n = np.maximum(np.concatenate([lo, [payload.size]]) - gap_lo, 0)
    # every uncovered byte's index at once (at most 15 per chunk): no Python loop over the chunks
    ends = np.cumsum(n)
    payload[np.repeat(gap_lo - (ends - n), n) + np.arange(int(ends[-1]))] = 0


# -- the GPU -------------------------------------------------------------------------------------------------------


def compress_gpu(jobs: list[Job], device: int, stream: int | None) -> list[CompressedArray]:
    """Every job on ``device`` through one encode plan (one nvCOMP call per codec config for the whole batch)."""
    eng = engine(device)
    sp = stream_ptr(stream, device)
    items, datas, names = [], [], []
    with launching_on(device, sp):
        for job in jobs:
            segs = _segment_codecs(job)
            for _, _, codec, _ in segs:
                _warn_ignored_level(codec)
            items.append(tuple((codec, spec.nbytes, chunk) for _, spec, codec, chunk in segs))
            names.append(segs)
            datas.extend(_aligned(job.arrays[name]) for name, _, _, _ in segs)
        packed = eng.encode_plan(items).run(datas, sp)
        producer = producer_info("nvcomp", nv.version_string())
        out = []
        for job, segs, p in zip(jobs, names, packed):
            payload = p.payload if job.keep_on_device else memoryview(p.payload.get()).cast("B")
            segments = []
            for (name, spec, codec, chunk), ps in zip(segs, p.segments):
                if not job.keep_on_device:
                    ps.crc.payload = payload  # read the CRCs from the host copy
                table = ChunkTable(ps.comp_nbytes, ps.crc, ps.flags)
                segments.append(Segment(name, spec, codec, chunk, ps.offset, ps.nbytes, table, None, ps.rows))
            out.append(CompressedArray(Header(job.spec, job.pipeline, tuple(segments), producer, job.metadata),
                                       payload))
    return out


def _aligned(data):
    """nvCOMP reads chunks from 256-byte aligned addresses; a filter's fresh output always is."""
    if data.nbytes and data.data.ptr % 256:
        return data.copy()
    return data


def _gpu_trial(arr, spec: ArraySpec, device: int, stream: int | None) -> Codec:
    """codec="auto" on the GPU for data without an ANS float mode (integers, bytes, float64, complex): compress four
    256 KiB samples spread over the array with ANS, Cascaded and Bitcomp in one encode plan and keep the smallest
    (ANS on ties: it decodes fastest). Sorted or repetitive integers go to Cascaded/Bitcomp (10-40x where ANS gets
    1.6x, benchmarks/RESULTS.md); noisy bytes stay with ANS. Costs one extra synchronization."""
    import cupy

    from .codecs import ANS, Bitcomp, Cascaded

    n = int(arr.nbytes)
    if n < _config.TRIAL_MIN_NBYTES:
        return ANS()
    flat = arr.reshape(-1).view("u1")
    sp = stream_ptr(stream, device)
    block = _config.TRIAL_BLOCK
    with launching_on(device, sp):
        starts = [(i * (n - block) // 3) // 16 * 16 for i in range(4)]
        sample = cupy.concatenate([flat[s : s + block] for s in starts])
        sample_spec = ArraySpec(spec.dtype, spec.byteorder, (sample.size // spec.itemsize,))
        choices = (ANS(), Cascaded(), Bitcomp())
        codecs = [_config.resolved(c, sample_spec) for c in choices]
        items = [((c, sample.nbytes, c.default_chunk()),) for c in codecs]
        plan = engine(device).encode_plan(items)
        keep: list = []
        sizes, _, _ = plan.compress([sample] * len(codecs), sp, keep)
    totals = [int(sizes[plan.row_start[i] : plan.row_start[i + 1]].sum()) for i in range(len(codecs))]
    return choices[min(range(len(codecs)), key=lambda i: (totals[i], i))]


_warned_level = False


def _warn_ignored_level(codec) -> None:
    """nvCOMP has no compression levels: say so once per process when a level was set."""
    global _warned_level
    if getattr(codec, "level", None) is not None and not _warned_level:
        _warned_level = True
        warnings.warn(f"codec {codec.codec_id!r}: level={codec.level} applies to the CPU backend only; nvCOMP "
                      "ignores it", UserWarning, stacklevel=5)


# -- dispatch and auto's guarantee ------------------------------------------------------------------------------


def compress_jobs(jobs: list[Job], stream: int | None) -> list[CompressedArray]:
    out: list[CompressedArray | None] = [None] * len(jobs)
    by_device: dict[int, list[int]] = {}
    for i, j in enumerate(jobs):
        if j.backend == "nvcomp":
            by_device.setdefault(j.device, []).append(i)
    for device, idx in by_device.items():
        for i, c in zip(idx, compress_gpu([jobs[i] for i in idx], device, stream)):
            out[i] = c
    cpu_jobs = [i for i, j in enumerate(jobs) if j.backend == "cpu"]
    if cpu_jobs:
        plans = {i: cpu_work(jobs[i]) for i in cpu_jobs if not _small_auto(jobs[i])}
        cpu.run([w for works, _ in plans.values() for w in works])  # every CPU job's chunks through the pool at once
        laid = [_smallest_small(jobs[i]) if i not in plans else (plans[i][1](), None) for i in cpu_jobs]
        for i, c in zip(cpu_jobs, fill([lay for lay, _ in laid], [pfx for _, pfx in laid])):
            out[i] = c
    for i, j in enumerate(jobs):
        if j.auto and not (j.backend == "cpu" and _small_auto(j)):
            out[i] = _smallest(j, out[i], stream)
    return out  # type: ignore[return-value]


def _small_auto(job: Job) -> bool:
    return job.auto and not job.user_filters and job.spec.nbytes <= _AUTO_TRY_NBYTES


def _smallest_small(job: Job):
    """``auto`` on a small array on the CPU: every candidate pipeline is compressed (inline: a few KiB), and the one
    whose payload plus ~:data:`_SEGMENT_HEADER_NBYTES` per segment is smallest is laid out; the plain ``raw``
    layout replaces it if that is smaller, headers included. ``(layout, encoded header or None)``: only the one
    kept is copied into a payload (:func:`fill`); headers and payloads cost more than compressing a few KiB."""
    best, best_nbytes, margin = None, None, _AUTO_EXACT_MARGIN
    variants = [job] + [job.with_codec(job.codec, pipeline=p) for p in _cpu_auto.candidates(job.spec)
                        if tuple(p) != job.pipeline]
    for v in variants:
        works, lay_out = cpu_work(v)
        for w in works:
            w.run(0, w.n)
        nbytes = sum(w.payload_nbytes() for w in works) + _SEGMENT_HEADER_NBYTES * len(v.specs)
        if best_nbytes is None or nbytes < best_nbytes:
            best, best_nbytes = lay_out, nbytes
            margin = _PLAIN_EXACT_MARGIN if len(v.specs) == 1 and not v.pipeline else _AUTO_EXACT_MARGIN
    raw_payload = layout.table_nbytes(layout.n_chunks(job.spec.nbytes, Raw().default_chunk())) \
        + layout.align(job.spec.nbytes)
    chosen = best()
    if best_nbytes + margin < raw_payload + _SEGMENT_HEADER_NBYTES:
        return chosen, None  # clearly smaller than raw whatever the exact headers
    works, lay_out = cpu_work(job.with_codec(Raw(), pipeline=[]))
    for w in works:
        w.run(0, w.n)
    raw = lay_out()
    pfx, raw_pfx = chosen[0].encode(), raw[0].encode()
    if len(pfx) + chosen[0].payload_nbytes <= len(raw_pfx) + raw[0].payload_nbytes:
        return chosen, pfx  # ties keep the chosen codec
    return raw, raw_pfx


def _smallest(job: Job, chosen: CompressedArray, stream) -> CompressedArray:
    """``auto``'s result, or the ``raw`` container of the same array when that is smaller (small arrays on the CPU:
    :func:`_smallest_small`)."""
    plain = not job.user_filters  # the raw candidate keeps a user's (lossy) pipeline, else stores the array as is
    specs = {"data": job.spec} if plain else job.specs
    gpu = job.backend == "nvcomp"
    raw_payload = sum(_raw_payload_nbytes(s.nbytes, gpu) for s in specs.values())
    if chosen.nbytes <= raw_payload:
        return chosen  # smaller than raw's payload alone, headers included: the usual case costs no second compression
        # (a margin on the payloads alone let eight planes' headers, ~1.5 KB over raw's, make auto bigger than raw)
    candidates = [chosen, _one(job.with_codec(Raw(), pipeline=[] if plain else None), stream)]
    return min(candidates, key=lambda c: c.nbytes)  # ties keep the earlier (the chosen codec)


@functools.lru_cache(maxsize=256)
def _raw_payload_nbytes(nbytes: int, gpu: bool) -> int:
    """Payload bytes of ``nbytes`` stored by ``raw`` with its default chunk (the GPU's or the CPU's)."""
    raw = Raw()
    chunk = _config.gpu_default_chunk(raw, nbytes) if gpu else raw.default_chunk()
    return layout.table_nbytes(layout.n_chunks(nbytes, chunk)) + layout.align(nbytes)


def _one(job: Job, stream) -> CompressedArray:
    if job.backend == "nvcomp":
        return compress_gpu([job], job.device, stream)[0]
    return compress_cpu(job)
