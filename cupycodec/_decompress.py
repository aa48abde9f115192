"""Decompression: where each container decodes (CPU or GPU, by trust, codec and target), then the decode itself.

On the GPU every container bound for one device goes through one :class:`~cupycodec.engine.decode.DecodePlan`
(filters included), run and checked once. On the CPU, chunks decode in parallel threads and filters run in NumPy.
Untrusted containers (bytes from outside that nobody vouched for) never reach a decoder that is not hardened
against crafted input: their encoded chunks decode on the CPU, whatever the target, or not at all.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from . import interop
from .backends import _nvcomp_lib as nv
from .backends import cpu
from .codecs.base import GPU_ONLY_HINT
from .container import CompressedArray
from .dtypes import ArraySpec, dtype_name, gpu_dtype, storage_dtype
from .engine import engine, launching_on, stream_ptr
from .engine.decode import DecodePlan, Target, kind_of
from .engine.verify import verify_on_device
from .errors import BackendUnavailableError, UntrustedError
from .filters import Byteplane, Int8
from .filters.int8 import check_scales

__all__ = ["DecodeJob", "Quantized", "decode_jobs", "route", "untrusted_codec"]

DEQUANT_DTYPES = ("F32", "F16", "BF16", "F64")


class Quantized(NamedTuple):
    """INT8 codes and float32 scales, returned by ``decompress(..., dequantize=False)``."""

    codes: Any
    scales: Any
    granularity: str
    axis: int | None
    group_size: int | None
    dtype: str  # the original dtype's name ("BF16", "F16", "F32")


class DecodeJob:
    """One container on its way out: where it goes and into what."""

    __slots__ = ("dequantize", "gpu", "item", "out_obj", "result", "target", "views")

    def __init__(self, item: CompressedArray, out_obj, dequantize: bool):
        if item._cache.get("headless"):
            raise ValueError("this container holds a header only (without_payload()); give it its payload with "
                             "with_payload() before decoding it")
        self.item, self.out_obj, self.result = item, out_obj, None
        self.dequantize = dequantize or _int8(item) is None
        self.views = None  # interop views of out_obj: (out,), or (codes, scales) for dequantize=False
        if out_obj is not None:
            if not self.dequantize:
                if not (isinstance(out_obj, tuple) and len(out_obj) == 2):
                    raise TypeError("with dequantize=False, out must be a (codes, scales) pair")
                self.views = (interop.as_output(out_obj[0], what="out codes"),
                              interop.as_output(out_obj[1], what="out scales"))
            else:
                self.views = (interop.as_output(out_obj),)

    def check_out(self, prefix: str = "out") -> None:
        """Raise (before any work) unless the caller's buffers have the shapes and dtypes this decode writes."""
        if self.views is None:
            return
        c = self.item
        if not self.dequantize:
            specs = {s.name: s.spec for s in c.segments}
            _check_out(self.views[0], specs["data"].shape, "I8", f"{prefix} codes")
            scales = self.views[1]
            _check_out(scales, specs["scale"].shape, "F32", f"{prefix} scales")
            order = specs["scale"].byteorder  # the segment's bytes go in as they are: a host buffer must match them
            if not scales.on_device and dtype_name(scales.array.dtype)[1] != order:
                raise ValueError(f"{prefix} scales has dtype {scales.array.dtype.str}, in another byte order than the "
                                 f"container's scales ({order!r}); pass a float32 buffer of byte order {order!r}")
            return
        view = self.views[0]
        if _int8(c) is not None:
            if view.dtype_name not in DEQUANT_DTYPES and tuple(view.array.shape) == tuple(c.shape):
                try:  # a same-width integer buffer on the GPU is a bit view of the original dtype
                    _check_out(view, c.shape, c.spec.dtype, prefix)
                except ValueError:
                    raise ValueError(f"{prefix} receives dequantized values: it must be float32, float16, bfloat16 "
                                     f"or float64, got {view.dtype_name}") from None
                _check_bit_order(view, c, prefix)  # values go in any float byte order; bits in the container's
            _check_out(view, c.shape, _out_dtype(self), prefix)
            return
        _check_out(view, c.shape, c.spec.dtype, prefix)
        if view.on_device:
            return
        if view.dtype_name == c.spec.dtype:
            if view.array.dtype != c.spec.numpy_dtype():
                raise ValueError(f"{prefix} has dtype {view.array.dtype}, expected {c.spec.numpy_dtype()} (the "
                                 "container's byte order)")
        else:
            _check_bit_order(view, c, prefix)

    @property
    def out_nbytes(self) -> int:
        """The bytes a decode must hold that ``max_output_nbytes`` bounds: the output, or the decoded segments where
        they are larger (INT8 scales of small groups: four bytes per group, a fp16 output two per element)."""
        c = self.item
        segments = sum(s.raw_nbytes for s in c.segments)
        return max(c.raw_nbytes, segments) if self.dequantize else segments


def _check_bit_order(view: interop.Array, c: CompressedArray, prefix: str) -> None:
    """A host bit view (a same-width integer buffer) holds the container's bytes, so its byte order must be the
    container's: in another order its integers would not be the values' bits."""
    if not view.on_device and dtype_name(view.array.dtype)[1] != c.spec.byteorder:
        raise ValueError(f"{prefix} is a {view.array.dtype.str} bit view of {c.spec.dtype}; the container's "
                         f"byte order is {c.spec.byteorder!r}")


def _int8(c: CompressedArray) -> Int8 | None:
    for f in c.pipeline:
        if isinstance(f, Int8):
            return f
    return None


def target_of(device, job: DecodeJob) -> tuple[str, int | None]:
    """('cpu', None) or ('cuda', ordinal): the output buffer decides, then ``device``, then the data's place."""
    if job.views is not None:
        first = job.views[0]
        return ("cuda", first.device) if first.on_device else ("cpu", None)
    kind, ordinal = interop.parse_device(device)
    if kind == "auto":
        c = job.item
        return ("cuda", c.device_id) if c.on_device else ("cpu", None)
    return kind, ordinal


def untrusted_codec(c: CompressedArray) -> str | None:
    """The first codec of an untrusted container whose encoded chunks no hardened decoder reads, else None."""
    if c.trusted:
        return None
    for seg in c.segments:
        if seg.table.n_encoded and not seg.codec.untrusted_ok:
            return seg.codec.codec_id
    return None


def _needs_gpu(c: CompressedArray) -> str | None:
    for seg in c.segments:
        if seg.table.n_encoded and not seg.codec.cpu_usable():
            return seg.codec.codec_id
    return None


def route(c: CompressedArray, target, choice: str) -> bool:
    """Whether ``c`` decodes on the GPU (else the CPU), for a target and a requested backend."""
    encoded = any(s.table.n_encoded for s in c.segments)
    if not c.trusted and encoded:
        bad = untrusted_codec(c)
        if bad is not None:
            raise UntrustedError(bad)
        if choice == "nvcomp":
            raise UntrustedError(c.segments[0].codec.codec_id, "decode it on the GPU (backend='nvcomp')")
        return False  # hardened CPU decoders; the result then moves to the target
    if choice == "cpu":
        codec = _needs_gpu(c)
        if codec:
            raise BackendUnavailableError(f"codec {codec!r} has no CPU decoder, so backend='cpu' cannot decode this "
                                          f"container; {GPU_ONLY_HINT}")
        if target[0] == "cuda":
            raise ValueError("backend='cpu' cannot write to a GPU; pass device='cpu' or a NumPy out")
        return False
    if choice == "nvcomp" or target[0] == "cuda":
        if encoded:
            nv.require()
        else:
            interop.require_cuda()
        return True
    if c.on_device and nv.available():
        return True
    codec = _needs_gpu(c)
    if codec:
        if nv.available():
            return True
        raise BackendUnavailableError(f"codec {codec!r} decodes only on a GPU with nvCOMP, which is not usable here "
                                      f"({nv.unavailable_reason()}); {GPU_ONLY_HINT}")
    return False


def decode_jobs(jobs: list[DecodeJob], stream: int | None) -> None:
    by_device: dict[int, list[DecodeJob]] = {}
    for j in jobs:
        if j.gpu:
            by_device.setdefault(j.target[1] if j.target[0] == "cuda" else _gpu_for(j.item), []).append(j)
    for device, mine in by_device.items():
        _decode_gpu(mine, device, stream)
    host = [j for j in jobs if not j.gpu]
    if host:
        _decode_cpu(host, stream)


def _gpu_for(c: CompressedArray) -> int:
    """The device that decodes a container bound for the host: its own, else the current one."""
    if c.on_device:
        return c.device_id
    import cupy

    return cupy.cuda.runtime.getDevice()


# -- output buffers --------------------------------------------------------------------------------------------


def _out_dtype(job: DecodeJob) -> str:
    """The dtype a dequantized result is written in: the out buffer's float dtype if it has one, else the
    original's (a same-width integer out is a bit view of the original)."""
    orig = job.item.spec.dtype
    if job.views is not None and job.dequantize:
        name = job.views[0].dtype_name
        if name in DEQUANT_DTYPES:
            return name
    return orig


def _check_out(view: interop.Array, shape, dtype_name: str, what: str = "out") -> None:
    """Shape and dtype of a caller's buffer (contiguity and writability: interop.as_output). A same-width integer
    buffer is accepted as a bit view, on the GPU (CuPy without ml_dtypes holds bfloat16 as uint16) as on the host
    (a caller that never imports ml_dtypes, such as the torch checkpoint loader: importing it costs ~0.6 s)."""
    arr = view.array
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{what} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
    if view.dtype_name == dtype_name:
        return
    from .dtypes import itemsize

    bit_view = view.array.dtype.kind in "ui" and arr.dtype.itemsize == itemsize(dtype_name)
    if not bit_view:
        raise ValueError(f"{what} has dtype {view.dtype_name}, expected {dtype_name}")


# -- the CPU ----------------------------------------------------------------------------------------------------


def _cpu_work(job: DecodeJob, stream):
    """``(works, finish)``: the job's CPU work and what completes it once run (filters, delivery)."""
    c = job.item
    host_target = job.target[0] == "cpu"
    views = job.views if host_target else None  # checked by DecodeJob.check_out before any work
    payload = c._host_payload()
    verify = not c.verified  # from_bytes(verify=True): each chunk's CRC is checked right before it is decoded
    release = c._release_pages()
    f = c.pipeline[0] if len(c.pipeline) == 1 else None
    if isinstance(f, Byteplane) and len({s.chunk_nbytes for s in c.segments}) == 1:
        # planes merge block by block straight into the result (all planes chunked alike, as every writer does)
        target = views[0].array if views is not None else np.empty(c.spec.shape, dtype=c.spec.numpy_dtype())
        k, rotate, big = f.params(c.spec)
        works = [cpu.DecodePlanes(payload, c.segments, cpu.as_bytes_array(target), k, rotate, big, verify, release)]
        return works, lambda: _finish_cpu(job, target, stream)
    bufs: dict[str, np.ndarray] = {}
    if views is not None and not c.pipeline:  # decode straight into the caller's buffer
        bufs["data"] = views[0].array
    elif views is not None and not job.dequantize:
        bufs["data"], bufs["scale"] = views[0].array, views[1].array
    for seg in c.segments:
        if seg.name not in bufs:
            bufs[seg.name] = np.empty(seg.spec.shape, dtype=seg.spec.numpy_dtype())
    works = [cpu.DecodeSegment(payload, seg, cpu.as_bytes_view(bufs[seg.name]), verify, release)
             for seg in c.segments]
    return works, lambda: _finish_cpu(job, _filters_cpu(job, bufs), stream)


def _finish_cpu(job: DecodeJob, result, stream) -> None:
    job.item._cache.pop("unverified", None)  # every chunk passed its CRC check on the way
    job.result = _deliver(job, result, stream)


def _decode_cpu(jobs: list[DecodeJob], stream) -> None:
    """Every job's chunks through the CPU pool in one pass, then each job's filters and delivery."""
    plans = [_cpu_work(job, stream) for job in jobs]
    cpu.run([w for works, _ in plans for w in works])
    for _, finish in plans:
        finish()


def check_disjoint(jobs: list[DecodeJob]) -> None:
    """Raise ValueError, before any work, if two output buffers share memory, or an output overlaps a container's
    own bytes. Items decode at the same time (chunks of several items in the pool, or in one plan): two items into
    one buffer left a mix of both, and a decode into its own container read bytes it had already overwritten (a
    false checksum error, or wrong data without ``verify``). One sort by address, whatever the number of items."""
    spans = []  # (memory, start, end, what, is an output): outputs are C-contiguous (interop.as_output)
    for i, job in enumerate(jobs):
        for k, view in enumerate(job.views or ()):
            arr = view.array
            if arr.nbytes:
                start = arr.data.ptr if view.on_device else arr.__array_interface__["data"][0]
                what = "the out buffer" if len(job.views) == 1 else f"the out {('codes', 'scales')[k]}"
                what += f" of item {i}" if len(jobs) > 1 else ""
                spans.append((view.device if view.on_device else -1, start, start + arr.nbytes, what, True))
        payload = job.item._payload
        if job.views and isinstance(payload, memoryview) and payload.nbytes:
            start = np.frombuffer(payload, np.uint8).__array_interface__["data"][0]
            what = f"the container bytes of item {i}" if len(jobs) > 1 else "the container's bytes"
            spans.append((-1, start, start + payload.nbytes, what, False))
    if len(spans) < 2:
        return
    spans.sort(key=lambda sp: sp[:3])
    memory, reach = None, {}  # per kind (output or container): the span seen so far that reaches furthest
    for span in spans:
        if span[0] != memory:
            memory, reach = span[0], {}
        for kind, other in reach.items():  # containers may share bytes (one container twice); nothing else may
            if (kind or span[4]) and span[1] < other[2]:
                first, second = sorted((other[3], span[3]))
                why = " (decompress_many decodes its items at the same time)" if len(jobs) > 1 else ""
                raise ValueError(f"{first} and {second} share memory; give every output memory of its own, apart "
                                 f"from the containers being decoded{why}")
        if span[4] not in reach or span[2] > reach[span[4]][2]:
            reach[span[4]] = span


def _filters_cpu(job: DecodeJob, arrays: dict[str, Any]):
    c = job.item
    chain = [{"data": c.spec}]
    for f in c.pipeline:
        chain.append(f.specs(chain[-1]))
    for k in range(len(c.pipeline) - 1, -1, -1):
        f = c.pipeline[k]
        if isinstance(f, Int8):
            if not job.dequantize:
                check_scales(arrays["scale"])
                return Quantized(arrays["data"], arrays["scale"], f.granularity, f.axis, f.group_size,
                                 chain[k]["data"].dtype)
            spec = chain[k]["data"]
            dtype = _out_dtype(job)
            if dtype != spec.dtype:  # an out buffer of another float dtype receives the values in its own
                spec = ArraySpec(dtype, "<", spec.shape)
            arrays = f.decode(arrays, {"data": spec}, False)
            continue
        arrays = f.decode(arrays, chain[k], False)
    return arrays["data"]


def _into(out: np.ndarray, result: np.ndarray) -> None:
    """Write a host result into the caller's host buffer. A same-width integer buffer for a float result (bfloat16
    into int16, say) is a bit view of it, as everywhere else: it gets the bits, not the values cast to integers."""
    if out.dtype.kind in "iu" and result.dtype.kind not in "iu" and out.dtype.itemsize == result.dtype.itemsize:
        result = result.astype(result.dtype.newbyteorder(out.dtype.byteorder), copy=False).view(out.dtype)
    out[...] = result


def _deliver(job: DecodeJob, result, stream):
    """A host result moved to its target (into the caller's buffer when there is one)."""
    c = job.item
    if job.target[0] == "cpu":
        if isinstance(result, Quantized):
            if job.views is not None:
                result = result._replace(codes=job.out_obj[0], scales=job.out_obj[1])
            return result
        if job.views is not None:
            out = job.views[0].array
            if result is not out:
                _into(out, result)
            return job.out_obj
        return result.reshape(c.shape)
    import cupy

    device = job.target[1]
    with launching_on(device, stream_ptr(stream, device)):
        if isinstance(result, Quantized):
            codes, scales = cupy.asarray(result.codes), cupy.asarray(result.scales)
            if job.views is not None:
                job.views[0].array[...] = codes
                job.views[1].array[...] = scales
                return result._replace(codes=job.out_obj[0], scales=job.out_obj[1])
            return result._replace(codes=codes, scales=scales)
        logical = dtype_name(result.dtype)[0]
        host = np.ascontiguousarray(result)
        host = host.astype(host.dtype.newbyteorder("="), copy=False)
        dev = cupy.asarray(host.view(storage_dtype(logical)))
        if job.views is not None:
            job.views[0].array[...] = dev.view(job.views[0].array.dtype)
            return job.out_obj
        return dev.view(gpu_dtype(logical))


# -- the GPU ----------------------------------------------------------------------------------------------------


def _decode_gpu(jobs: list[DecodeJob], device: int, stream) -> None:
    sp = stream_ptr(stream, device)
    with launching_on(device, sp):
        targets, posts = [], []
        items = [job.item._copy_to(device) for job in jobs]
        pending = [c for c in items if not c.verified]
        if pending:  # every pending CRC of the batch in one launch on the device
            verify_on_device(pending, device, sp)
            for job in jobs:
                job.item._cache.pop("unverified", None)
        for job, c in zip(jobs, items):
            kind = kind_of(c.pipeline, job.dequantize)
            views = job.views if job.views is not None and job.target[0] == "cuda" else (None, None)
            if kind == "codes":
                specs = {s.name: s.spec for s in c.segments}
                bufs = [_device_buffer(views[0], specs["data"].shape, np.dtype(np.int8), False),
                        _device_buffer(views[1], specs["scale"].shape, np.dtype(np.float32), False)]
                dtype = None
            else:
                dtype = _out_dtype(job) if kind == "dequantize" else c.spec.dtype
                swap = kind == "plain" and c.spec.byteorder == ">" and c.spec.itemsize > 1
                bufs = [_device_buffer(views[0], c.shape, storage_dtype(dtype), swap)]
            targets.append(Target(c, kind, tuple(b[0].data.ptr for b in bufs), dtype))
            posts.append(bufs)
        plan = _cached_plan(jobs, targets, device, sp)
        if plan is None:
            plan = DecodePlan(engine(device), targets, stream_ptr=sp, sync=False, checked=False)
            _remember_plan(jobs, targets, device, sp, plan)
        plan.run_and_wait(sp)
        for job, t, bufs in zip(jobs, targets, posts):
            job.result = _finish_gpu(job, t, bufs)


def _device_buffer(view, shape, dtype, fresh: bool):
    """(array the plan decodes into, the caller's device array to copy into afterwards, or None). The caller's
    buffer itself when the plan can write it (16-byte aligned, and no byte swap to come), else a fresh one."""
    import cupy

    if view is None:
        return cupy.empty(shape, dtype), None
    arr = view.array
    if fresh or (arr.size and arr.data.ptr % 16):
        return cupy.empty(shape, dtype), arr
    return (arr.view(dtype) if arr.dtype != dtype else arr), None


def _finish_gpu(job: DecodeJob, t, bufs):
    """Byte order restored, results moved to the caller's buffers or to the host, views in the logical dtype."""
    c = job.item
    if t.kind == "plain" and c.spec.byteorder == ">":  # CuPy holds native order only: swap on the device
        bufs = [(_byteswap(arr, c.spec.itemsize), caller) for arr, caller in bufs]
    for arr, caller in bufs:
        if caller is not None:
            caller[...] = arr.view(caller.dtype)
    results = [arr if caller is None else caller for arr, caller in bufs]
    if t.kind == "codes":
        f = _int8(c)
        codes, scales = results
        if job.target[0] == "cpu":
            codes, scales = codes.get(), scales.get()
            if job.views is not None:
                job.views[0].array[...] = codes
                job.views[1].array[...] = scales
        res = Quantized(codes, scales, f.granularity, f.axis, f.group_size, c.spec.dtype)
        return res._replace(codes=job.out_obj[0], scales=job.out_obj[1]) if job.views is not None else res
    (arr,) = results
    if job.target[0] == "cuda":
        if job.views is not None:
            return job.out_obj
        return arr.view(gpu_dtype(t.dtype)) if arr.dtype != gpu_dtype(t.dtype) else arr
    host = arr.get().view(ArraySpec(t.dtype, "<", ()).numpy_dtype().newbyteorder("="))
    if c.spec.byteorder == ">" and t.dtype == c.spec.dtype:  # the host result keeps the container's byte order
        host = host.astype(c.spec.numpy_dtype())
    if job.views is not None:
        _into(job.views[0].array, host)
        return job.out_obj
    return host


def _byteswap(arr, k: int):
    if k == 1:
        return arr
    import cupy

    flat = arr.reshape(-1).view("u1").reshape(-1, k)[:, ::-1]
    return cupy.ascontiguousarray(flat).reshape(-1).view(arr.dtype).reshape(arr.shape)


# -- plans kept with their container (decompress(c, out=...) called again allocates nothing) ----------------------

_PLANS_PER_ITEM = 4


def _plan_key(jobs, targets, device, sp):
    if len(jobs) != 1 or jobs[0].views is None or targets[0].item is not jobs[0].item:
        return None  # fresh outputs, several items, or a payload copied to this device: nothing to reuse
    t = targets[0]
    return (device, sp, t.kind, t.ptrs, t.dtype)


def _cached_plan(jobs, targets, device, sp):
    key = _plan_key(jobs, targets, device, sp)
    return None if key is None else jobs[0].item._plan_cache().get(key)


def _remember_plan(jobs, targets, device, sp, plan) -> None:
    key = _plan_key(jobs, targets, device, sp)
    if key is not None:
        cache = jobs[0].item._plan_cache()
        cache[key] = plan
        while len(cache) > _PLANS_PER_ITEM:
            cache.popitem(last=False)
