"""The GPU engine: decode plans with filter stages, CUDA-graph capture, buffers and streams from torch, devices.

Every decoded value is pinned to the NumPy reference (quant.reference, the byte-plane reference) bit for bit.
"""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import cupycodec as cc
from cupycodec.quant import reference

pytestmark = [pytest.mark.gpu, pytest.mark.nvcomp]

BLOCK = [(512, 256), (64, 256), (64, 256), (256, 256), (704, 256), (704, 256), (256, 704)]  # a small Llama block


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


def _weights(shape, seed):
    rng = np.random.default_rng(seed)
    return (0.02 * rng.standard_t(5, shape)).astype(np.float32).astype(ml_dtypes.bfloat16)


def _dequantized(w, dtype, granularity="channel", group_size=128):
    q, s = reference.quantize_int8(w, granularity=granularity, axis=0, group_size=group_size)
    return reference.dequantize_int8(q, s, granularity=granularity, axis=0, group_size=group_size, dtype=dtype), q, s


def _bits(a):
    import cupy

    a = cupy.asnumpy(a) if not isinstance(a, np.ndarray) else a
    return np.ascontiguousarray(a).view(np.uint8).tobytes()


def _poison(cp, arrays):
    for a in arrays:
        a.view(cp.uint8)[...] = 0xA5


# -- filters as plan stages ------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["channel", "group", "tensor"])
@pytest.mark.parametrize("out_dtype", ["BF16", "F16", "F32", "F64"])
def test_block_decodes_and_dequantizes_in_one_run(cp, granularity, out_dtype):
    host = [_weights(s, i) for i, s in enumerate(BLOCK)]
    cs = cc.compress_many([cp.asarray(w.view(np.uint16)) for w in host], dtype="bfloat16", quantize="int8",
                          granularity=granularity, group_size=64, codec="ans")
    np_dtype = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64}[out_dtype]
    storage = {"BF16": cp.uint16, "F16": cp.float16, "F32": cp.float32, "F64": cp.float64}[out_dtype]
    outs = [cp.empty(w.shape, storage) for w in host]  # uint16: a bit view of the container's own dtype (bf16)
    plan = cc.decode_plan(cs, outs)
    stream = cp.cuda.Stream(non_blocking=True)
    for _ in range(2):  # a plan is reusable: the second run must write everything again
        _poison(cp, outs)
        plan.run(stream)
        plan.check(stream)
        for w, o in zip(host, outs):
            want, _, _ = _dequantized(w, np_dtype, granularity, 64)
            assert _bits(o) == _bits(want)


def test_codes_and_scales_stage(cp):
    host = [_weights(s, 10 + i) for i, s in enumerate(BLOCK)]
    cs = cc.compress_many([cp.asarray(w.view(np.uint16)) for w in host], dtype="bfloat16", quantize="int8",
                          codec="ans")
    outs = [(cp.empty(w.shape, cp.int8), cp.empty(w.shape[0], cp.float32)) for w in host]
    plan = cc.decode_plan(cs, outs, dequantize=False)
    plan.run()
    plan.check()
    for w, (q, s) in zip(host, outs):
        _, q_ref, s_ref = _dequantized(w, np.float32)
        assert _bits(q) == _bits(q_ref) and _bits(s) == _bits(s_ref)


@pytest.mark.parametrize("codec", ["zstd", "lz4", "ans"])
def test_byteplane_stage_merges_in_the_run(cp, codec):
    xs = [_weights((300, 257), 20), (np.random.default_rng(1).standard_normal(10_001)).astype(np.float32)]
    cs = cc.compress_many([cp.asarray(xs[0].view(np.uint16)), cp.asarray(xs[1])], codec=codec,
                          filters=["byteplane"], dtype=None)
    assert cs[0].segments[0].name == "data.p0"
    outs = [cp.empty(xs[0].shape, cp.uint16), cp.empty(xs[1].shape, cp.float32)]
    plan = cc.decode_plan(cs, outs)
    _poison(cp, outs)
    plan.run()
    plan.check()
    assert _bits(outs[0]) == _bits(xs[0]) and _bits(outs[1]) == _bits(xs[1])


def test_plan_mixes_kinds_and_stored_chunks(cp):
    w = _weights((512, 512), 3)
    noise = cp.random.RandomState(0).randint(0, 256, 300_000, dtype=cp.uint8)  # stored chunks
    items = [cc.compress(cp.asarray(w.view(np.uint16)), dtype="bfloat16", quantize="int8", codec="ans"),
             cc.compress(cp.asarray(w.view(np.uint16)), dtype="bfloat16", codec="ans"),
             cc.compress(noise, codec="lz4", chunk_nbytes=65536), cc.compress(cp.arange(0, dtype=cp.float32))]
    assert items[2].segments[0].table.flags.all()
    outs = [cp.empty(w.shape, cp.float32), cp.empty(w.shape, cp.uint16), cp.empty_like(noise),
            cp.empty(0, cp.float32)]
    plan = cc.decode_plan(items, outs)
    plan.run()
    plan.check()
    assert _bits(outs[0]) == _bits(_dequantized(w, np.float32)[0])
    assert _bits(outs[1]) == _bits(w) and _bits(outs[2]) == _bits(noise)


def test_decompress_into_another_float_dtype(cp):
    w = _weights((256, 128), 4)
    c = cc.compress(cp.asarray(w.view(np.uint16)), dtype="bfloat16", quantize="int8", codec="ans")
    out = cp.empty(w.shape, cp.float32)
    assert cc.decompress(c, out=out) is out
    assert _bits(out) == _bits(_dequantized(w, np.float32)[0])
    host = np.empty(w.shape, np.float16)
    assert cc.decompress(c, out=host) is host and _bits(host) == _bits(_dequantized(w, np.float16)[0])


def test_plan_refuses_what_it_cannot_do(cp):
    w = cp.asarray(_weights((64, 64), 5).view(np.uint16))
    c = cc.compress(w, dtype="bfloat16", codec="ans")
    with pytest.raises(ValueError, match="to_device"):
        cc.decode_plan([c.to_host()], [cp.empty_like(w)])
    with pytest.raises(ValueError, match="shape"):
        cc.decode_plan([c], [cp.empty((64, 65), cp.uint16)])
    with pytest.raises(ValueError, match="16-byte aligned"):
        cc.decode_plan([c], [cp.empty(64 * 64 + 1, cp.uint16)[1:].reshape(64, 64)])
    with pytest.raises(cc.UntrustedError, match="'ans'"):
        cc.decode_plan([cc.CompressedArray.from_bytes(c.to_bytes()).to_device()], [cp.empty_like(w)])
    q = cc.compress(w, dtype="bfloat16", quantize="int8", codec="ans")
    with pytest.raises(ValueError, match="float32, float16, bfloat16 or float64"):
        cc.decode_plan([q], [cp.empty(w.shape, cp.int32)])


# -- CUDA graphs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["ans", "lz4"])
def test_plan_run_captures_in_a_cupy_graph(cp, codec):
    host = [_weights(s, 30 + i) for i, s in enumerate(BLOCK)]
    cs = cc.compress_many([cp.asarray(w.view(np.uint16)) for w in host], dtype="bfloat16", quantize="int8",
                          codec=codec)
    outs = [cp.empty(w.shape, cp.uint16) for w in host]
    plan = cc.decode_plan(cs, outs)
    s = cp.cuda.Stream(non_blocking=True)
    plan.run(s)  # kernels loaded before capture
    s.synchronize()
    s.begin_capture()
    plan.run(s)
    graph = s.end_capture()
    for _ in range(3):
        _poison(cp, outs)
        s.synchronize()
        graph.launch(s)
        plan.check(s)
        for w, o in zip(host, outs):
            assert _bits(o) == _bits(_dequantized(w, ml_dtypes.bfloat16)[0])


def test_replay_is_run_from_a_graph_and_reports_bad_chunks(cp):
    # replay() launches the plan's run captured once: the same bits as run() on any stream, every time; a bad chunk
    # is reported by check() as after run(); inside a caller's capture it records the run itself
    host = [_weights(s, 40 + i) for i, s in enumerate(BLOCK)]
    stored = cp.random.RandomState(1).randint(0, 256, 200_000, dtype=cp.uint8)  # stored chunks: the copy stage
    cs = [*cc.compress_many([cp.asarray(w.view(np.uint16)) for w in host], dtype="bfloat16", quantize="int8",
                            codec="ans"), cc.compress(stored, codec="lz4", chunk_nbytes=65536)]
    outs = [cp.empty(w.shape, cp.float32) for w in host] + [cp.empty_like(stored)]
    plan = cc.decode_plan(cs, outs)
    want = [_bits(_dequantized(w, np.float32)[0]) for w in host] + [_bits(stored)]
    streams = [cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)]
    for k in range(4):
        _poison(cp, outs)
        cp.cuda.Device().synchronize()  # the poison runs on CuPy's default stream, which these streams do not follow
        plan.replay(streams[k % 2])
        plan.check(streams[k % 2])
        assert [_bits(o) for o in outs] == want
    assert plan._graph, "the run was not captured"
    s = streams[0]
    s.begin_capture()
    plan.replay(s)  # the stream is capturing: replay records run's launches into the caller's graph
    graph = s.end_capture()
    _poison(cp, outs)
    cp.cuda.Device().synchronize()
    graph.launch(s)
    plan.check(s)
    assert [_bits(o) for o in outs] == want
    raw_sizes = plan._ptrs[3]  # lie about a chunk's size in the plan's tables: the replayed decode must report it
    row = cp.ndarray((plan._n_enc,), cp.uint64, cp.cuda.MemoryPointer(
        cp.cuda.UnownedMemory(raw_sizes, 8 * plan._n_enc, plan), 0))
    row[1] -= 16
    cp.cuda.Device().synchronize()
    plan.replay(s)
    with pytest.raises(cc.BackendError):
        plan.check(s)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_gpu_only_codec_on_the_host_decodes_into_a_host_bit_view(cp, quantize):
    # a host container of a codec only the GPU decodes, into a host int16 buffer (what the torch runtime does for a
    # model compressed on a GPU, then moved to the CPU): the bits of the result, never its values cast to integers
    w = _weights((256, 512), 60)
    c = cc.compress(cp.asarray(w.view(np.uint16)), dtype="bfloat16", quantize=quantize, codec="ans").to_host()
    assert not c.on_device
    want = w if quantize is None else _dequantized(w, ml_dtypes.bfloat16)[0]
    for dt in (np.int16, np.uint16):
        one, many = np.empty(w.shape, dt), np.empty(w.shape, dt)
        assert cc.decompress(c, out=one) is one
        cc.decompress_many([c], out=[many])
        assert _bits(one) == _bits(many) == _bits(want)


def test_a_run_that_fails_while_captured_leaves_no_graph_and_no_capture(cp, monkeypatch):
    # replay() captures run() once: if run raises inside that capture, the error reaches the caller, the partial
    # graph is destroyed (not leaked), no stream is left capturing, and a later replay captures and decodes
    from cupycodec.engine import decode

    host = [_weights(s, 50 + i) for i, s in enumerate(BLOCK)]
    cs = cc.compress_many([cp.asarray(w.view(np.uint16)) for w in host], dtype="bfloat16", codec="ans")
    outs = [cp.empty(w.shape, cp.uint16) for w in host]
    plan = cc.decode_plan(cs, outs)
    s = cp.cuda.Stream(non_blocking=True)
    plan.run(s)  # kernels loaded before any capture
    s.synchronize()
    destroyed, ended = [], []
    real_destroy, real_end = cp.cuda.runtime.graphDestroy, cp.cuda.runtime.streamEndCapture

    def end(sp):
        ended.append(graph := real_end(sp))
        return graph

    def fail(*args, **kwargs):
        cp.cuda.runtime.memsetAsync(outs[0].data.ptr, 0, 16, args[0])  # captured work: the partial graph is not empty
        raise RuntimeError("a run that fails mid-capture")

    monkeypatch.setattr(cp.cuda.runtime, "graphDestroy", lambda g: (destroyed.append(g), real_destroy(g)))
    monkeypatch.setattr(cp.cuda.runtime, "streamEndCapture", end)
    monkeypatch.setattr(plan, "run", fail)
    with pytest.raises(RuntimeError, match="fails mid-capture"):
        plan.replay(s)
    assert len(ended) == 1 and ended[0] and destroyed == ended, "the partial graph was not destroyed"
    assert plan._graph is None
    monkeypatch.undo()
    assert not decode._capturing(s.ptr)
    _poison(cp, outs)
    cp.cuda.Device().synchronize()
    plan.replay(s)  # captured now, and replayed
    plan.check(s)
    assert plan._graph
    assert [_bits(o) for o in outs] == [_bits(w.view(np.uint16)) for w in host]


@pytest.mark.parametrize("relaxed", [True, False], ids=["as shipped", "without the relaxed mode"])
def test_a_plan_freed_inside_a_callers_capture_leaves_that_capture_valid(cp, monkeypatch, relaxed):
    """GC runs finalizers wherever it collects, a caller's CUDA-graph capture included (`del model`, then a torch
    graph captured: the model's plans go inside it). A plan whose run replay() made a graph destroys that graph as it
    goes, which CUDA refuses in a thread-local or global capture, invalidating it (an H200 suite run, 2026-12-03). The
    destruction runs in relaxed mode, so the capture stays valid and records the other plan's run. Without the relaxed
    mode (the second case) the same steps must invalidate the capture, so that this test can see the fix work, and
    the nvCOMP call that fails after it names the invalidated capture."""
    from cupycodec.engine import decode

    rt = cp.cuda.runtime
    host = [_weights(s, 70 + i) for i, s in enumerate(BLOCK)]
    cs = cc.compress_many([cp.asarray(w.view(np.uint16)) for w in host], dtype="bfloat16", codec="ans")
    outs = [[cp.empty(w.shape, cp.uint16) for w in host] for _ in range(2)]
    s = cp.cuda.Stream(non_blocking=True)
    gone = cc.decode_plan(cs, outs[0])
    gone.replay(s)
    keep = cc.decode_plan(cs, outs[1])
    keep.run(s)  # kernels loaded before the capture
    s.synchronize()
    assert gone._graph, "replay() made no graph: nothing to destroy"
    if not relaxed:
        monkeypatch.setattr(decode, "relaxed_capture", contextlib.nullcontext)
    rt.streamBeginCapture(s.ptr, rt.streamCaptureModeThreadLocal)
    try:
        del gone  # its last reference: the plan and its graph are destroyed here, inside the capture
        gc.collect()
        if not relaxed:
            with pytest.raises(cc.BackendError, match="already invalidated by an earlier CUDA call"):
                keep.run(s)
            return
        keep.run(s)
    finally:
        try:
            graph = rt.streamEndCapture(s.ptr)
        except rt.CUDARuntimeError:
            graph = 0
            assert not relaxed, "the capture was invalidated"
    try:
        exe = rt.graphInstantiate(graph)
        _poison(cp, outs[1])
        cp.cuda.Device().synchronize()
        rt.graphLaunch(exe, s.ptr)
        keep.check(s)
        assert [_bits(o) for o in outs[1]] == [_bits(w.view(np.uint16)) for w in host]
        rt.graphExecDestroy(exe)
    finally:
        rt.graphDestroy(graph)


def test_a_plan_built_inside_a_capture_raises_and_leaves_the_capture_valid(cp):
    """Building a plan uploads its tables and waits for them, which a CUDA-graph capture of its stream refuses (and is
    then invalidated). decode_plan names that before touching the stream: CaptureError, the capture still active,
    and a plan built before it records and replays as usual."""
    from cupycodec._cuda import CAPTURE_ACTIVE, capture_status

    rt = cp.cuda.runtime
    host = [_weights(s, 80 + i) for i, s in enumerate(BLOCK)]
    cs = cc.compress_many([cp.asarray(w.view(np.uint16)) for w in host], dtype="bfloat16", codec="ans")
    outs = [cp.empty(w.shape, cp.uint16) for w in host]
    s = cp.cuda.Stream(non_blocking=True)
    plan = cc.decode_plan(cs, outs, stream=s)
    plan.run(s)
    s.synchronize()
    rt.streamBeginCapture(s.ptr, rt.streamCaptureModeThreadLocal)
    try:
        with pytest.raises(cc.CaptureError, match="build it before the capture"):
            cc.decode_plan(cs, [cp.empty_like(o) for o in outs], stream=s)
        assert capture_status(s.ptr) == CAPTURE_ACTIVE
        plan.run(s)
    finally:
        graph = rt.streamEndCapture(s.ptr)
    try:
        exe = rt.graphInstantiate(graph)
        _poison(cp, outs)
        cp.cuda.Device().synchronize()
        rt.graphLaunch(exe, s.ptr)
        plan.check(s)
        assert [_bits(o) for o in outs] == [_bits(w.view(np.uint16)) for w in host]
        rt.graphExecDestroy(exe)
    finally:
        rt.graphDestroy(graph)


@pytest.mark.torch
def test_plan_run_captures_in_a_torch_graph_with_torch_buffers(cp):
    import torch

    host = [_weights(s, 40 + i) for i, s in enumerate(BLOCK)]
    cs = cc.compress_many([torch.from_numpy(w.view(np.int16)).cuda().view(torch.bfloat16) for w in host],
                          quantize="int8", codec="ans")
    assert all(c.dtype_name == "BF16" for c in cs)
    outs = [torch.empty(w.shape, dtype=torch.bfloat16, device="cuda") for w in host]
    scratch = []
    plan = cc.decode_plan(cs, outs, alloc=lambda n: scratch.append(torch.empty(n, dtype=torch.uint8,
                                                                                device="cuda")) or scratch[-1])
    assert scratch and scratch[0].numel() >= plan.nbytes  # torch's allocator holds the plan's memory
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        plan.run(torch.cuda.current_stream())
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=side):
        plan.run(torch.cuda.current_stream())
    for _ in range(2):
        for o in outs:
            o.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        plan.check()
        for w, o in zip(host, outs):
            got = o.view(torch.int16).cpu().numpy()
            assert got.tobytes() == _bits(_dequantized(w, ml_dtypes.bfloat16)[0])


# -- torch inputs, outputs and streams ------------------------------------------------------------------------


@pytest.mark.torch
def test_torch_tensors_compress_as_they_are(cp):
    import torch

    w = torch.randn(300, 200, device="cuda", dtype=torch.bfloat16)
    p = torch.nn.Parameter(w.clone())  # requires_grad
    for t in (w, p, w[:, ::3], w.t()):
        c = cc.compress(t, codec="ans")
        assert c.dtype_name == "BF16" and c.on_device
        back = cc.decompress(c)
        assert np.array_equal(cp.asnumpy(back).view(np.int16), t.detach().contiguous().view(torch.int16).cpu().numpy())
    f8 = torch.randn(1000, device="cuda").to(torch.float8_e4m3fn)
    c = cc.compress(f8)
    assert c.dtype_name == "F8_E4M3"
    assert cp.asnumpy(cc.decompress(c)).view(np.uint8).tobytes() == f8.view(torch.uint8).cpu().numpy().tobytes()


@pytest.mark.torch
def test_torch_out_and_stream(cp):
    import torch

    w = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    c = cc.compress(w, codec="ans")
    out = torch.empty_like(w)
    s = torch.cuda.Stream()
    assert cc.decompress(c, out=out, stream=s) is out
    s.synchronize()
    assert torch.equal(out, w)
    q = cc.compress(w, quantize="int8", codec="ans")
    out32 = torch.empty(w.shape, device="cuda", dtype=torch.float32)
    cc.decompress(q, out=out32, stream=s)
    s.synchronize()
    ref = _dequantized(w.float().cpu().numpy().astype(ml_dtypes.bfloat16), np.float32)[0]
    assert out32.cpu().numpy().tobytes() == ref.tobytes()


# -- devices ----------------------------------------------------------------------------------------------------


def test_explicit_device_and_bad_ordinals(cp):
    x = np.arange(100_000, dtype=np.float32)
    c = cc.compress(x, codec="zstd")
    y = cc.decompress(c, device="cuda:0")
    assert isinstance(y, cp.ndarray) and y.device.id == 0 and _bits(y) == _bits(x)
    with cp.cuda.Device(0):
        assert _bits(cc.decompress(c, device=0)) == _bits(x)
    n = cp.cuda.runtime.getDeviceCount()
    with pytest.raises(ValueError, match=f"cuda:{n}' does not exist"):
        cc.decompress(c, device=f"cuda:{n}")
    g = cc.compress(cp.asarray(x), codec="ans")
    assert g.device == "cuda:0" and g.to_device("cuda:0") is g
    with pytest.raises(ValueError, match="does not exist"):
        g.to_device(n)


@pytest.mark.skipif(int(os.environ.get("CUPYCODEC_GPUS", "1")) < 2, reason="needs two GPUs (CUPYCODEC_GPUS=2)")
def test_second_device_whatever_is_current(cp):
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.fail("CUPYCODEC_GPUS=2 but fewer than two CUDA devices are visible")
    x = np.arange(1 << 20, dtype=np.float32)
    with cp.cuda.Device(0):
        c = cc.compress(x, codec="ans", backend="nvcomp")
        y = cc.decompress(c, device="cuda:1")
        assert y.device.id == 1 and _bits(y) == _bits(x)
        g = cc.compress(y, codec="ans")  # input on device 1 compresses there, whatever is current
        assert g.device == "cuda:1" and _bits(cc.decompress(g)) == _bits(x)
        assert cc.decompress(g).device.id == 1


# -- processes --------------------------------------------------------------------------------------------------

_CHILD = r"""
import sys, numpy as np, cupycodec as cc
blob = open(sys.argv[1], "rb").read()
y = cc.decompress(cc.CompressedArray.from_bytes(blob, trusted=True), device=sys.argv[2])
import cupy
print(int(np.asarray(cupy.asnumpy(y) if not isinstance(y, np.ndarray) else y).sum()))
"""


def test_spawned_child_decodes_on_the_gpu(cp, tmp_path):
    x = (np.arange(1 << 20) % 1000).astype(np.int32)
    path = tmp_path / "x.cc"
    path.write_bytes(cc.compress(cp.asarray(x), codec="ans").to_bytes())
    cc.decompress(cc.compress(cp.asarray(x)))  # this process holds a CUDA context: spawn, never fork, for CUDA
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), "cuda"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == int(x.sum())
