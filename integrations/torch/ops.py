"""The INT8 linear as a torch custom op, so ``torch.compile`` and CUDA graphs see one opaque operation.

On CUDA, small batches (M <= 16 rows of activations, 8 where only the FMA kernel applies) run the fused dequantize-
GEMV (:mod:`cupycodec.kernels.gemv`), which reads each INT8 code once; larger ones dequantize into a per-device
scratch (our kernel, the reference's arithmetic) and call cuBLAS through ``F.linear`` (a compressed model's blocks
take their weights from one dequantization per block instead, unless ``runtime.WIDE`` is off); on CUDA the forward
launches on torch's current stream, never synchronizes, and allocates nothing but its output. On the CPU, small
batches of bf16 activations with channel scales run torch's INT8 weight-only GEMV where it is vectorized
(:func:`_cpu_gemv`: its float32 result is scaled, then rounded into the output), and everything else the same
dequantization in torch ops, into per-thread scratch. A backward formula gives the activations and the bias their
gradients (for adapters trained over frozen compressed weights). Layers call :func:`linear`, which goes through the
op only where tracing or autograd needs it (the op's eager dispatch costs more host time than the kernel runs).
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F

from cupycodec.kernels import gemv
from cupycodec.kernels.int8 import dequantize_raw

from .dlpack import dtype_name, raw_stream

__all__ = ["GEMV_MAX_M", "dequantize", "grad_input", "int8_linear", "linear", "reserve_scratch", "scratch"]

# Up to this many rows of activations the fused GEMV beats dequantize + cuBLAS; measured on an H200 (bench_torch.py,
# benchmarks/RESULTS.md, third session of 2026-12-02, eight Llama shapes): the tensor-core kernel takes the same time
# from M = 1 to 8 and 0.36-0.61x the cuBLAS route's time at M = 16 (call 4); the FMA kernel (fp32 activations, small
# groups) grows with M and is 0.94-1.03x the cuBLAS route at M = 8 on six of eight shapes (second session).
GEMV_MAX_M = 16
GEMV_MAX_M_FMA = 8


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, granularity: str, group_size: int,
               dtype: torch.dtype) -> torch.Tensor:
    """``float32(code) * scale`` rounded once to ``dtype``: :func:`cupycodec.quant.reference.dequantize_int8`'s
    arithmetic in torch ops (one IEEE float32 multiply, round to nearest even), for the CPU."""
    # the float32 codes made from qweight itself (not filled into a fresh tensor): under torch.func.vmap over
    # stacked codes (model ensembles) it is batched as they are, and the in-place multiplies below stay legal
    w = _times_scales(qweight.to(torch.float32), scale, granularity, group_size)
    return w if dtype == torch.float32 else w.to(dtype)


def _scaled(qweight, scale, granularity: str, group_size: int, w32: torch.Tensor) -> torch.Tensor:
    """``w32`` (float32, the codes' shape) filled with ``float32(code) * scale``, in place: a conversion and one
    multiply per code, each a vectorized pass (a multiply of the int8 codes by float32 scales straight into a
    bf16 weight took 4 ns per code on the 2-core machine, in a type-converting loop)."""
    return _times_scales(w32.copy_(qweight), scale, granularity, group_size)


def _times_scales(w32: torch.Tensor, scale, granularity: str, group_size: int) -> torch.Tensor:
    """``w32`` (the codes as float32) times their scales, in place."""
    if granularity == "channel":
        w32.mul_(scale.reshape(-1, 1))
    elif granularity == "group":  # whole groups through a view; a partial last group on its own
        n, k = w32.shape
        full = k // group_size
        if full:
            w32[:, : full * group_size].view(n, full, group_size).mul_(scale[:, :full, None])
        if k % group_size:
            w32[:, full * group_size :].mul_(scale[:, full : full + 1])
    else:
        w32.mul_(scale.reshape(()))
    return w32


_HOST = threading.local()  # per thread: flat scratch per dtype, and views of it per (shape, dtype)


def _host_weight(qweight, scale, granularity: str, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """:func:`dequantize`'s result in this thread's scratch (valid until its next call), so a CPU forward allocates
    nothing but its output: fresh weights of a large layer came as fresh pages from the OS on every call (5632 x
    2048 codes at batch 1: 24.9 ms a call before, 6.9 ms after, on the 2-core machine). Per thread, so concurrent
    forwards never share it; each buffer grows to the largest layer the thread has run."""
    views = _host_views()
    key = (qweight.shape, dtype)
    pair = views.get(key)
    if pair is None:
        # normal tensors, made outside inference mode: a scratch first used under torch.inference_mode() would
        # otherwise refuse in-place writes in every later forward outside it
        with torch.inference_mode(False):
            pair = (_host_view(qweight.shape, torch.float32), None if dtype == torch.float32 else
                    _host_view(qweight.shape, dtype))
        views[key] = pair
    w32 = _scaled(qweight, scale, granularity, group_size, pair[0])
    return w32 if pair[1] is None else pair[1].copy_(w32)


def _host_views() -> dict:
    """This thread's views of its scratch, keyed by (shape, dtype); made with the scratch on its first use."""
    views = getattr(_HOST, "views", None)
    if views is None:
        views = _HOST.views = {}
        _HOST.bufs = {}
    return views


def _host_view(shape, dtype: torch.dtype) -> torch.Tensor:
    """A ``shape`` view of this thread's flat scratch of ``dtype``, grown if needed (which forgets every view: the
    smaller buffer's go with it)."""
    n = shape.numel()
    views = _host_views()
    buf = _HOST.bufs.get(dtype)
    if buf is None or buf.numel() < n:
        buf = _HOST.bufs[dtype] = torch.empty(n, dtype=dtype)
        views.clear()
    return buf[:n].view(shape)


# The CPU's small batches (bf16 activations, channel scales, M <= GEMV_MAX_M) go to torch's INT8 weight-only GEMV,
# which reads each code once as the CUDA kernels do, on the x86 builds where it is vectorized. Against the
# dequantize-into-scratch route, 2 threads of the 2-core machine, batch 1 (benchmarks/RESULTS.md, nineteenth
# session): 5632x2048 7.8 ms -> 0.44 ms (bf16 F.linear 1.2 ms), 576x576 182 -> 26 us (bf16 51 us); at M = 16
# 8.0 -> 3.2 ms and 187 -> 98 us. Without AVX2 its kernel is scalar (M = 8: 11x slower than the scratch route).
_CPU_GEMV_CAPS = ("AVX2", "AVX512")
_ONES: dict[int, torch.Tensor] = {}  # N -> N bf16 ones: the GEMV's scales (ours are float32, applied after it)


@functools.cache
def _cpu_gemv_available() -> bool:
    """Whether this torch has the INT8 GEMV, vectorized for this CPU (read once)."""
    cap = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: "")()
    return cap in _CPU_GEMV_CAPS and hasattr(torch, "_weight_int8pack_mm")


def _cpu_gemv_ok(x: torch.Tensor, qweight: torch.Tensor) -> bool:
    k = qweight.shape[1]
    # its kernel loads 16 activations and 16 codes per step with aligned vector loads: a row of K % 16 != 0, or
    # activations off a 32-byte boundary, crashed the process in torch 2.13, so such rows never reach it, and
    # _cpu_gemv hands it aligned copies of anything else (the route must not depend on where a tensor lies)
    return _cpu_gemv_available() and k and not k % 16 and 0 < x.numel() <= GEMV_MAX_M * k


def _cpu_gemv(x, qweight, scale, bias):
    """``x @ (codes * scale).T + bias`` on the CPU at small M: float32 sums of activation x code (exact products)
    rounded to bf16 by torch's GEMV, then times the float32 scale, plus the bias, rounded once more. Not the
    reference route's bits (which rounds each dequantized weight to bf16 before an F.linear): without a bias within
    1-2 bf16 units in the last place of the exact result, where that route's weight rounding costs more (tests pin
    both). A bias that cancels most of the sum magnifies the sum's bf16 rounding: up to 7 units in the last place of
    the result on 0.7 % of outputs at K = 64 (random bias; the reference route up to 63 there, 2026-12-04).

    None where that sum overflows and the input is finite (activations of about 1e33 at K = 4096): the scaled
    result may still be finite, and the caller takes the reference route, which scales before it sums."""
    n, k = qweight.shape
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous() or x2.data_ptr() % 64:
        x2 = x2.clone(memory_format=torch.contiguous_format)  # a fresh allocation is 64-byte aligned
    if not qweight.is_contiguous() or qweight.data_ptr() % 64:  # e.g. codes loaded at a file's offsets: this
        with torch.inference_mode(False):  # thread's scratch, whose start is aligned (a copy per call: slower)
            staged = _host_view(qweight.shape, torch.int8)
        qweight = staged.copy_(qweight)
    ones = _ONES.get(n)
    if ones is None:
        with torch.inference_mode(False):
            ones = _ONES[n] = torch.ones(n, dtype=torch.bfloat16)
    y = torch._weight_int8pack_mm(x2, qweight, ones)
    if not bool(torch.isfinite(y).all()) and bool(torch.isfinite(x2).all()):  # one pass over M x N outputs
        return None
    y = y.mul(scale.reshape(-1))  # bf16 x float32: float32
    if bias is not None:
        y.add_(bias)
    return y.to(torch.bfloat16).reshape(*x.shape[:-1], n)


# One scratch per device for dequantized weights at large batch: reserved (grown) before use, as large as the
# largest layer any model asked for. A layer larger than any reserved grows it in its forward; the buffer it
# replaces stays allocated if a CUDA graph captured a use of it (the graph's replays still write there), and is
# otherwise freed after the work its last stream enqueued (record_stream).
_SCRATCH: dict[torch.device, torch.Tensor] = {}
_RESERVED = [0]
_CAPTURED: set[int] = set()  # data_ptr of scratch buffers a CUDA graph captured a use of
_KEPT: list[torch.Tensor] = []  # replaced scratch buffers that captured graphs still use


def reserve_scratch(nbytes: int) -> None:
    """Make the dequantization scratch at least ``nbytes`` on every device it is (later) used on."""
    _RESERVED[0] = max(_RESERVED[0], int(nbytes))


def scratch(device: torch.device) -> torch.Tensor:
    buf = _SCRATCH.get(device)
    if buf is None or buf.numel() < _RESERVED[0]:
        if buf is not None:
            _retire_scratch(buf, device)
        buf = _SCRATCH[device] = torch.empty(max(_RESERVED[0], 1), dtype=torch.uint8, device=device)
        for key in [key for key in _WEIGHT_VIEWS if key[0] == device.index]:
            del _WEIGHT_VIEWS[key]
    return buf


def _retire_scratch(buf: torch.Tensor, device: torch.device) -> None:
    if buf.data_ptr() in _CAPTURED:
        _CAPTURED.discard(buf.data_ptr())
        _KEPT.append(buf)  # a graph's replays write here: never handed to another tensor
        return
    order = _ORDER.get(device.index) if device.type == "cuda" else None
    if order is not None and order.stream is not None:
        buf.record_stream(order.stream[0])  # its last user may not have run yet


_WEIGHT_VIEWS: dict = {}  # (device index, n, k, dtype) -> an n x k view of that device's scratch


def _weight_view(index: int, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The scratch as an ``n x k`` weight of ``dtype`` (built once per shape: three tensor ops per forward cost more
    host time than the dequantize kernel runs)."""
    need = n * k * dtype.itemsize
    reserve_scratch(need)  # a no-op when the model reserved it, as compress_model and from_linear do
    buf = scratch(torch.device("cuda", index))  # grown (and the views dropped) if a larger layer came since
    key = (index, n, k, dtype)
    w = _WEIGHT_VIEWS.get(key)
    if w is None:
        w = _WEIGHT_VIEWS[key] = buf[:need].view(dtype).view(n, k)
    if torch.cuda.is_current_stream_capturing():
        _CAPTURED.add(buf.data_ptr())
    return w


def linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
           granularity: str, group_size: int) -> torch.Tensor:
    """The INT8 linear a forward calls: the custom op :func:`int8_linear` where ``torch.compile`` or ``torch.export``
    traces, autograd records, or an input is a tensor subclass; otherwise the op's own implementation, called
    directly. Same function, same result: an eager dispatch of a Python custom op added 7-33 us of host time per call
    on an H200's host (pytorch/pytorch#176592), more than the GEMV it launches takes on the GPU at batch 1."""
    if (type(x) is not torch.Tensor or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))):
        return int8_linear(x, qweight, scale, bias, granularity, group_size)
    return _int8_linear(x, qweight, scale, bias, granularity, group_size)


def _check_input(x, qweight) -> None:
    """What ``nn.Linear`` refuses: an input of another width (the kernels would read and write past the tensors'
    ends: M is derived from x's size), or on another device than the codes (a kernel launched with a host
    address kills the CUDA context). Two integer comparisons."""
    if x.ndim == 0 or x.shape[-1] != qweight.shape[1]:
        raise RuntimeError(f"the input's last dimension must be this layer's in_features ({qweight.shape[1]}); got "
                           f"an input of shape {tuple(x.shape)}")
    if x.get_device() != qweight.get_device():
        raise RuntimeError(f"the input is on {x.device} and this layer's weight on {qweight.device}: move the "
                           "input (or the model) so that both are on one device")


def _int8_linear(x, qweight, scale, bias, granularity, group_size):
    _check_input(x, qweight)
    if x.device.type == "cpu":
        if granularity == "channel" and x.dtype == torch.bfloat16 and _cpu_gemv_ok(x, qweight):
            y = _cpu_gemv(x, qweight, scale, bias)
            if y is not None:
                return y
        return F.linear(x, _host_weight(qweight, scale, granularity, group_size, x.dtype), _bias(bias, x))
    if x.device.type != "cuda":  # meta tensors (shape inference) and other devices: fresh tensors there
        return F.linear(x, dequantize(qweight, scale, granularity, group_size, x.dtype), _bias(bias, x))
    return _int8_linear_cuda(x, qweight, scale, bias, granularity, group_size)


@torch.library.custom_op("cupycodec::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                granularity: str, group_size: int) -> torch.Tensor:
    """``x @ dequantize(qweight, scale).T + bias`` in ``x``'s dtype (functional: the dequantized weight, when the
    fused kernel does not apply, goes to this module's per-device scratch, which nothing else reads)."""
    return _int8_linear(x, qweight, scale, bias, granularity, group_size)


@int8_linear.register_fake
def _(x, qweight, scale, bias, granularity, group_size):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _setup_context(ctx, inputs, output):
    _, qweight, scale, bias, granularity, group_size = inputs
    ctx.save_for_backward(qweight, scale)
    ctx.granularity, ctx.group_size, ctx.has_bias = granularity, group_size, bias is not None


def grad_input(grad: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, granularity: str,
               group_size: int) -> torch.Tensor:
    """``grad @ W`` for an INT8 linear: the activations' gradient (the weight dequantized in ``grad``'s dtype)."""
    return grad @ dequantize(qweight, scale, granularity, group_size, grad.dtype)


def _backward(ctx, grad):
    """Gradients for the activations and the bias (adapters trained on top of frozen compressed weights); the codes
    and scales are not trained."""
    qweight, scale = ctx.saved_tensors
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_input(grad, qweight, scale, ctx.granularity, ctx.group_size), None, None, grad_bias, None, None


int8_linear.register_autograd(_backward, setup_context=_setup_context)


def _bias(bias, x):
    return bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)


def _int8_linear_cuda(x, qweight, scale, bias, granularity, group_size):
    k = qweight.shape[1]
    m = x.numel() // k if k else 0
    name = dtype_name(x.dtype)
    if m <= GEMV_MAX_M and gemv.supported(name, m, k, granularity, group_size) and (
            m <= GEMV_MAX_M_FMA or gemv.mma_supported(name, granularity, group_size, x.get_device())):
        return gemv_linear(x, qweight, scale, bias, granularity, group_size)
    return dequant_linear(x, qweight, scale, bias, granularity, group_size)


def gemv_linear(x, qweight, scale, bias, granularity, group_size, *, kernel=None, warps=None, unroll=None):
    """The small-batch route on CUDA: the fused dequantize-GEMV (``kernel``, ``warps``, ``unroll``: see
    :func:`cupycodec.kernels.gemv.gemv_int8`; benchmarks compare and sweep them)."""
    n, k = qweight.shape
    m = x.numel() // k if k else 0
    device = x.get_device()
    bias = _bias(bias, x)
    if x.is_contiguous() and not x.data_ptr() % 16:  # rows of K (a multiple of 16) stay aligned
        xp, ldx = x.data_ptr(), k
    else:
        x2 = x.reshape(m, k)
        if x2.stride(1) != 1 or x2.data_ptr() % 16 or (x2.stride(0) * x2.element_size()) % 16:
            x2 = x2.clone(memory_format=torch.contiguous_format)  # a fresh allocation is aligned (contiguous() of a
            # contiguous but misaligned view is that view)
        xp, ldx = x2.data_ptr(), x2.stride(0)
    y = x.new_empty((*x.shape[:-1], n))
    gemv.gemv_int8(xp, ldx, qweight.data_ptr(), scale.data_ptr(), bias.data_ptr() if bias is not None else 0,
                   y.data_ptr(), m=m, k=k, n=n, dtype_name=dtype_name(x.dtype), granularity=granularity,
                   group_size=group_size, device=device, stream_ptr=raw_stream(device), kernel=kernel, warps=warps,
                   unroll=unroll)
    return y


class _ScratchOrder:
    """Orders the uses of one device's scratch across CUDA streams without a host sync: when a forward on another
    stream than the last user's comes, the last user's stream records an event (after everything enqueued there,
    its reads of the scratch included) and the new stream waits for it. One stream, the usual case, costs a
    comparison. The lock makes check, enqueue and hand-over one step, so two threads cannot interleave them.

    While a stream is being captured into a CUDA graph no event from outside the capture may be waited on, so a
    capture neither waits nor becomes the last user: replays of a graph that uses the scratch must not overlap
    eager forwards on other streams (as with any buffer a graph shares)."""

    __slots__ = ("event", "lock", "stream")

    def __init__(self):
        self.lock, self.stream, self.event = threading.Lock(), None, None

    def enter(self, device: int, sp: int) -> None:
        if self.stream is None or self.stream[1] == sp or torch.cuda.is_current_stream_capturing():
            return
        if self.event is None:
            self.event = torch.cuda.Event()
        self.event.record(self.stream[0])
        torch.cuda.current_stream(device).wait_event(self.event)

    def leave(self, device: int, sp: int) -> None:
        if (self.stream is None or self.stream[1] != sp) and not torch.cuda.is_current_stream_capturing():
            self.stream = (torch.cuda.current_stream(device), sp)


_ORDER: dict[int, _ScratchOrder] = {}


def dequant_linear(x, qweight, scale, bias, granularity, group_size):
    """The large-batch route on CUDA: dequantize into the device's scratch (our kernel), then cuBLAS; forwards on
    different streams take turns with the scratch (:class:`_ScratchOrder`)."""
    n, k = qweight.shape
    device = x.get_device()
    sp = raw_stream(device)
    order = _ORDER.get(device) or _ORDER.setdefault(device, _ScratchOrder())
    with order.lock:
        order.enter(device, sp)
        w = _weight_view(device, n, k, x.dtype)
        dequantize_raw(qweight.data_ptr(), scale.data_ptr(), w.data_ptr(), (n, k), granularity=granularity,
                       axis=0 if granularity == "channel" else None,
                       group_size=group_size if granularity == "group" else None, dtype_name=dtype_name(x.dtype),
                       device=device, stream_ptr=sp)
        y = F.linear(x, w, _bias(bias, x))
        order.leave(device, sp)
    return y
