"""The torch integration on a GPU: the fused INT8 GEMV against a float64 reference, every mode against bf16, block
decodes, CUDA-graph capture and replay, and where the memory is counted."""

from __future__ import annotations

import copy
import gc
import time
import weakref

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers import assert_graph_replays_match_eager  # noqa: E402

import cupycodec as cc  # noqa: E402
from cupycodec.quant import reference  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.nvcomp, pytest.mark.torch]

DTYPES = {torch.bfloat16: ml_dtypes.bfloat16, torch.float16: np.float16, torch.float32: np.float32}


def _rel(y, ref):
    y, ref = y.double(), ref.double()
    return (torch.linalg.vector_norm(y - ref) / torch.linalg.vector_norm(ref)).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("granularity,group", [("channel", 128), ("group", 64), ("group", 128)])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13, 16])
def test_fused_gemv_matches_the_float64_reference(dtype, granularity, group, m):
    from cupycodec.integrations.torch import ops

    torch.manual_seed(m)
    n, k = 1000, 1024 + 64  # not a multiple of the warp's 512-code stride: the loop's tail runs
    w = (0.05 * torch.randn(n, k)).numpy()
    q, s = reference.quantize_int8(w, granularity=granularity, axis=0, group_size=group)
    qd, sd = torch.from_numpy(q).cuda(), torch.from_numpy(s).cuda()
    x = torch.randn(m, k, device="cuda").to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype)
    y = ops.int8_linear(x, qd, sd, bias, granularity, group)
    wd = torch.from_numpy(reference.dequantize_int8(q, s, granularity=granularity, axis=0, group_size=group,
                                                    dtype=np.float64)).cuda()
    ref = x.double() @ wd.T + bias.double()
    tol = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-5}[dtype]
    assert y.dtype == dtype and y.shape == (m, n) and _rel(y, ref) < tol
    x3 = torch.randn(2, m, k, device="cuda").to(dtype)[:, :, :]  # leading dims, as a model passes them
    assert ops.int8_linear(x3, qd, sd, None, granularity, group).shape == (2, m, n)


def test_the_dequantize_scratch_takes_turns_across_streams():
    """Large batches dequantize into one scratch per device. Layer a's long GEMM on one stream and layer b's
    dequantize on another, enqueued right after, would otherwise overlap: b's weights would land in the scratch
    while a's GEMM still reads it. Each output must match the same layer run alone."""
    from cupycodec.integrations.torch import CompressedLinear

    torch.manual_seed(0)
    a, b = (CompressedLinear.from_linear(torch.nn.Linear(4096, 4096, bias=False, device="cuda",
                                                         dtype=torch.bfloat16), "int8") for _ in range(2))
    xa = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16)  # a GEMM of ~1 ms
    xb = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref_a, ref_b = a(xa), b(xb)
        torch.cuda.synchronize()
        sa, sb = torch.cuda.Stream(), torch.cuda.Stream()
        for _ in range(3):
            with torch.cuda.stream(sa):
                ya = a(xa)
            with torch.cuda.stream(sb):
                yb = b(xb)
                yb2 = a(xb)  # and back to a's weights on b's stream, while a's stream may still run
            torch.cuda.synchronize()
            assert _rel(ya, ref_a) < 1e-2 and _rel(yb, ref_b) < 1e-2 and _rel(yb2, a(xb)) < 1e-2


@pytest.mark.parametrize("mode", ["lossless", "int8", "int8+entropy"])
@pytest.mark.parametrize("m", [1, 64])  # the fused GEMV, and dequantize + cuBLAS
def test_compressed_linear_on_cuda(mode, m):
    from cupycodec.integrations.torch import CompressedLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 768).cuda().to(torch.bfloat16)
    cl = CompressedLinear.from_linear(lin, mode)
    assert cl.compressed_nbytes < lin.weight.numel() * 2
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = cl(x)
        if mode == "lossless":
            assert torch.equal(y, lin(x))
            return
        w = cl.decompress_weight()
        q, s = reference.quantize_int8(lin.weight.float().cpu().numpy().astype(ml_dtypes.bfloat16))
        ref_w = reference.dequantize_int8(q, s, dtype=ml_dtypes.bfloat16)
        assert w.cpu().view(torch.int16).numpy().tobytes() == ref_w.view(np.int16).tobytes()  # codes: the reference's
        want = torch.nn.functional.linear(x, w, lin.bias)
        if m > 16:
            assert torch.equal(y, want)  # the same dequantized weight through the same cuBLAS call
        else:
            assert _rel(y, torch.nn.functional.linear(x.double(), w.double(), lin.bias.double())) < 8e-3


@pytest.mark.parametrize("n,k,mode,chunk", [(2048, 2048, "lossless", 512 << 10), (5632, 2048, "lossless", 1 << 20),
                                              (4096, 4096, "lossless", 256 << 10), (256, 2048, "int8+entropy", 64 << 10),
                                              (2048, 2048, "int8+entropy", 256 << 10)])
def test_payloads_compressed_on_the_gpu_have_the_integrations_chunks(n, k, mode, chunk):
    # linear.gpu_chunk's sizes reach the containers, and decode as before: lossless exactly, INT8 to its codes
    from cupycodec.integrations.torch import CompressedLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False).cuda().to(torch.bfloat16)
    cl = CompressedLinear.from_linear(lin, mode)
    segments = cl._template._header.segments
    assert segments[0].chunk_nbytes == chunk
    assert all(seg.codec.codec_id == "ans" for seg in segments)
    w = cl.decompress_weight()
    if mode == "lossless":
        assert torch.equal(w, lin.weight)
    else:
        want = CompressedLinear.from_linear(lin, "int8").decompress_weight()
        assert torch.equal(w, want)


def _tiny_llama(layers=4):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=704,
                                   num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4)
    return transformers.LlamaForCausalLM(cfg).cuda().to(torch.bfloat16).eval()


@pytest.mark.parametrize("mode", ["lossless", "int8", "int8+entropy"])
def test_models_on_cuda_and_their_memory(mode):
    import cupy

    from cupycodec.integrations.torch import compress_model

    base = _tiny_llama()
    ids = torch.randint(0, 512, (1, 12), device="cuda")
    with torch.no_grad():
        want = base(ids).logits
        want_tokens = base.generate(ids, max_new_tokens=6, do_sample=False)
    model = copy.deepcopy(base)
    gc.collect()  # an earlier test's model in a reference cycle must not be freed inside the measurement
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    report = compress_model(model, mode, progress=False)
    assert report.blocks == 4
    with torch.no_grad():
        got = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    model._cupycodec_runtime[0].check()
    if mode == "lossless":
        assert torch.equal(got, want) and torch.equal(tokens, want_tokens)
    else:
        cos = torch.nn.functional.cosine_similarity(got.float().flatten(), want.float().flatten(), dim=0)
        assert cos > 0.99
    # payloads, scales, slots and plan tables are torch's: CuPy's pool holds (almost) nothing of ours
    assert cupy.get_default_memory_pool().used_bytes() < (1 << 20)
    # torch counts the compressed model (and its scratch): the replaced weights went, their compressed form came
    assert torch.cuda.memory_allocated() >= before - report.original_nbytes + report.compressed_nbytes


@pytest.mark.parametrize("mode", ["lossless", "int8", "int8+entropy"])
def test_a_forward_captures_in_a_cuda_graph(mode):
    from cupycodec.integrations.torch import compress_model

    model = _tiny_llama(layers=3)
    compress_model(model, mode, progress=False)
    assert_graph_replays_match_eager(model)
    model._cupycodec_runtime[0].check()


@pytest.mark.parametrize("mode", ["lossless", "int8", "int8+entropy"])
def test_a_model_collected_inside_another_models_capture_leaves_it_valid(mode):
    """`del model` leaves a model in a reference cycle to GC, which may collect it anywhere, inside the CUDA-graph
    capture of the next model's forward too (torch's capture no longer collects first). Its decode plans then go
    inside the capture with the graphs replay() made of their runs, whose destruction CUDA refuses in torch's global
    capture mode, invalidating the capture (found in an H200 suite run, 2026-12-03, as a failed reduce-overhead
    compile). The capture must stay valid and replay the eager forward's logits."""
    from cupycodec.integrations.torch import compress_model

    old = _tiny_llama(layers=3)
    compress_model(old, mode, progress=False)
    ids = torch.randint(0, 512, (1, 8), device="cuda")
    with torch.no_grad():
        for _ in range(2):
            old(ids, use_cache=False)  # plans built, and replayed as graphs
    plans = [p for g in old._cupycodec_runtime[0].groups for p in g.plans()]
    assert (mode == "int8") == (not plans) and all(p._graph for p in plans)
    del plans
    model = _tiny_llama(layers=2)
    compress_model(model, mode, progress=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):
            model(ids, use_cache=False)
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
    gc.collect()
    gc.disable()  # the old model goes at the collection inside the capture, not before
    try:
        old.__dict__["_cycle"] = old
        del old
        g = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(g):
            assert gc.collect() > 0
            out = model(ids, use_cache=False).logits
    finally:
        gc.enable()
    out.zero_()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
    model._cupycodec_runtime[0].check()


@pytest.mark.parametrize("mode", ["lossless", "int8", "int8+entropy"])
def test_a_capture_before_any_forward_names_the_warm_up_and_ends_cleanly(mode):
    """A model captured into a CUDA graph before it ever ran: the block decodes (lossless, int8+entropy) and a large
    batch's dequantization (int8, 40 tokens) build their plan or launch descriptors on first use, from host memory,
    which the capture refuses. CaptureError says to run the model once first, raised before any such call, so that
    the capture ends cleanly (no CUDA error, nothing left capturing) and the model then warms up, captures and
    replays its eager logits. A decode step of int8 (8 tokens: the GEMV, nothing to build) captures at once.

    The model runs uncompressed first, at both sizes: torch's own first cuBLAS call in a process creates its handle,
    which a capture refuses as well (CUBLAS_STATUS_NOT_INITIALIZED, H200 2026-12-03, in a worker that ran this test
    first); what is under test is a compressed model that never ran, in a process where torch has."""
    from cupycodec.integrations.torch import compress_model

    model = _tiny_llama(layers=2)
    ids = {n: torch.randint(0, 512, (1, n), device="cuda", generator=torch.Generator("cuda").manual_seed(n))
           for n in (8, 40)}
    with torch.no_grad():
        for n in ids:
            model(ids[n], use_cache=False)
    compress_model(model, mode, progress=False)
    for n in (40, 8) if mode == "int8" else (8,):
        g = torch.cuda.CUDAGraph()
        if mode == "int8" and n == 8:
            with torch.no_grad(), torch.cuda.graph(g):
                out = model(ids[n], use_cache=False).logits
        else:
            with pytest.raises(cc.CaptureError, match="run the model once outside the capture first"), \
                    torch.no_grad(), torch.cuda.graph(g):
                model(ids[n], use_cache=False)
            assert not torch.cuda.is_current_stream_capturing()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.no_grad(), torch.cuda.stream(side):
                model(ids[n], use_cache=False)  # the warm-up
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(g):
                out = model(ids[n], use_cache=False).logits
        with torch.no_grad():
            want = model(ids[n], use_cache=False).logits
        out.zero_()
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)
    model._cupycodec_runtime[0].check()


@pytest.mark.parametrize("mode", ["lossless", "int8+entropy"])
def test_an_odd_number_of_blocks_keeps_each_block_in_one_slot(mode):
    """Block i decodes into slot i % 2 whatever came before, so a model of an odd number of blocks builds one plan per
    block in its first forward and none after, and a CUDA graph captured after a single warm-up forward builds
    nothing inside the capture (when block 0 avoided the slot in use, every block changed slot each forward)."""
    from cupycodec.integrations.torch import compress_model

    model = _tiny_llama(layers=3)
    compress_model(model, mode, progress=False)
    static = torch.randint(0, 512, (1, 8), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        model(static, use_cache=False)  # one warm-up forward
    torch.cuda.current_stream().wait_stream(side)
    rt = model._cupycodec_runtime[0]
    assert [len(g.plans()) for g in rt.groups] == [1, 1, 1]
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g):
        out = model(static, use_cache=False).logits
    for seed in range(3):
        static.copy_(torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(seed)).cuda())
        g.replay()
        with torch.no_grad():
            eager = model(static, use_cache=False).logits
        assert torch.equal(out, eager)
    assert [len(g.plans()) for g in rt.groups] == [1, 1, 1]
    rt.check()


@pytest.mark.parametrize("mode", ["int8", "int8+entropy", "int8 offloaded"])
def test_a_large_batch_dequantizes_each_block_at_its_start(mode, monkeypatch):
    """A prefill (more rows than the fused GEMV takes) of all-INT8 blocks: each block's decode into a slot is followed
    by one launch that dequantizes the whole block into the slot's wide buffer (the next block's on the side stream,
    beside this one's GEMMs), and each layer runs cuBLAS on its part of it. No layer dequantizes on its own, each wide
    weight is the layer's dequantized weight bit for bit, and the logits equal the per-layer route's (runtime.WIDE
    off: each layer dequantizes into ops' scratch; the same arithmetic and the same GEMMs). Once its slot has held a
    block, the block's start builds nothing. Captured in a CUDA graph, a large batch replays as eager forwards compute it."""
    from cupycodec.integrations.torch import compress_model, ops, runtime
    from cupycodec.kernels import int8 as int8_kernels

    model = _tiny_llama(layers=3)
    compress_model(model, mode.split()[0], progress=False, **({"offload": "cpu"} if "offloaded" in mode else {}))
    rt = model._cupycodec_runtime[0]
    n = len(rt.groups)
    ids = torch.randint(0, 512, (1, 40), device="cuda")

    def per_layer_route(*args, **kwargs):
        raise AssertionError("a layer dequantized its own weight, or a block start built its launch again")

    with torch.no_grad():
        monkeypatch.setattr(runtime, "WIDE", False)
        per_layer = model(ids, use_cache=False).logits
        assert not any(st.wide for st in rt._devices.values())
        monkeypatch.setattr(runtime, "WIDE", True)
        with monkeypatch.context() as m:
            m.setattr(ops, "dequant_linear", per_layer_route)
            wide = model(ids, use_cache=False).logits
        assert torch.equal(wide, per_layer)
        model(ids, use_cache=False)  # a forward more: block i is in slot i % 2 every time, so nothing new either
        with monkeypatch.context() as m:
            m.setattr(ops, "dequant_linear", per_layer_route)
            m.setattr(int8_kernels, "dequantize_desc", per_layer_route)
            assert torch.equal(model(ids, use_cache=False).logits, per_layer)
    (st,) = [st for st in rt._devices.values() if st.wide]
    assert len(st.wide) == len(st.slots) == 2
    assert all(w.numel() == rt.wide_nbytes == max(g.wide_nbytes for g in rt.groups) > 0 for w in st.wide)
    (s,) = [s for s, held in enumerate(st.resident) if held is not None and held[0] == 2 * n - 1]  # the last block
    last = rt.groups[-1]
    for layer, w in zip(last.layers, last.wide_views(st.wide[s])):
        assert layer._wide[2] is w and torch.equal(w, layer.decompress_weight().to(w.device))
    assert_graph_replays_match_eager(model, tokens=32, reset=rt.reset)
    rt.check()


def test_a_raw_stream_handle_maps_to_that_torch_stream():
    # torch.cuda.ExternalStream(0) is a new pool stream, not the default stream whose raw handle is 0
    from cupycodec.integrations.torch.dlpack import stream_of

    device = torch.device("cuda", torch.cuda.current_device())
    assert stream_of(0, device) == torch.cuda.default_stream(device)
    side = torch.cuda.Stream(device)
    assert stream_of(side.cuda_stream, device).cuda_stream == side.cuda_stream


@pytest.mark.parametrize("mode", ["int8", "int8+entropy"])
def test_a_large_batch_is_right_while_every_pool_stream_is_busy(mode, monkeypatch):
    """A model's first large batch on torch's default stream, with a 50 ms spin queued on every stream of torch's
    pools: the wide route's descriptors are uploaded on the stream of the launch that reads them (they once went to a
    pool stream, torch.cuda.ExternalStream(0), and the launch read them before they arrived), so the logits equal
    the per-layer route's. A copy of the model runs first, so that compiling the kernel and pinning host memory do not
    outlast the spin."""
    from cupycodec.integrations.torch import compress_model, runtime

    model = _tiny_llama(layers=3)
    compress_model(model, mode, progress=False)
    fresh = copy.deepcopy(model)  # a runtime of its own: its slots, wide buffers and descriptors are made on first use
    ids = torch.randint(0, 512, (1, 40), device="cuda")
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    with torch.no_grad():
        monkeypatch.setattr(runtime, "WIDE", False)
        want = model(ids, use_cache=False).logits
        monkeypatch.setattr(runtime, "WIDE", True)
        assert torch.equal(model(ids, use_cache=False).logits, want)
        torch.cuda.synchronize()
        busy = [torch.cuda.Stream() for _ in range(64)]  # 32 per pool, taken in turn: each one at least once
        for s in busy:
            with torch.cuda.stream(s):
                torch.cuda._sleep(100_000_000)
        assert torch.equal(fresh(ids, use_cache=False).logits, want)
    for m in (model, fresh):
        m._cupycodec_runtime[0].check()


@pytest.mark.parametrize("mode", ["bf16", "lossless", "int8", "int8+entropy", "int8 offloaded"])
def test_an_eager_forward_never_waits_for_the_gpu(mode):
    """The hot path enqueues and returns: with a 0.1 s spin kernel ahead of it on torch's current stream, a prefill
    (12 tokens: the fused GEMV; 40: dequantize + cuBLAS) and a cached one-token step of every mode return while the
    spin still runs. A host sync anywhere in a forward (a blocking copy, a plan that waits, an allocation that
    synchronizes) would make the stream idle by then. Every shape is run once before (plans, slots, kernels, and
    torch's attention plans for the cache's length); ``bf16``, the model uncompressed, is the control."""
    transformers = pytest.importorskip("transformers")
    from cupycodec.integrations.torch import compress_model

    model = _tiny_llama(layers=3)
    if mode != "bf16":
        compress_model(model, mode.split()[0], progress=False, **({"offload": "cpu"} if "offloaded" in mode else {}))
    stream = torch.cuda.current_stream()

    def prefill(ids):
        cache = transformers.DynamicCache(config=model.config)
        return cache, model(ids, past_key_values=cache, use_cache=True).logits

    with torch.no_grad():
        for n in (12, 40):
            ids = torch.randint(0, 512, (1, n), device="cuda")
            for _ in range(2):  # the same shapes as below, run first
                cache, _ = prefill(ids)
                model(ids[:, :1], past_key_values=cache, use_cache=True)
            torch.cuda.synchronize()
            torch.cuda._sleep(200_000_000)  # about 0.1 s at the H200's clock
            _, out = prefill(ids)
            assert not stream.query(), f"{mode}: a prefill of {n} tokens waited for the GPU"
            torch.cuda.synchronize()
            cache, _ = prefill(ids)
            torch.cuda.synchronize()
            torch.cuda._sleep(200_000_000)
            step = model(ids[:, :1], past_key_values=cache, use_cache=True).logits
            assert not stream.query(), f"{mode}: a one-token step after {n} tokens waited for the GPU"
            torch.cuda.synchronize()
            assert torch.isfinite(out.float()).all() and torch.isfinite(step.float()).all()
    if mode != "bf16":
        model._cupycodec_runtime[0].check()


# torch's own warnings on this path, errors under the suite's -W error (seen on an H200, 2026-12-02): cudagraph
# trees capture an empty graph on purpose when their manager starts, and inductor advises TF32 for float32 matmuls
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty:UserWarning")
@pytest.mark.filterwarnings("ignore:TensorFloat32 tensor cores:UserWarning")
@pytest.mark.parametrize("mode", ["bf16", "lossless", "int8", "int8+entropy"])
def test_hf_static_cache_under_reduce_overhead(mode):
    """Hugging Face's compiled decoding on the GPU: generate() with a static cache compiles the decode step itself
    (transformers 5: ``torch.compile(model.__call__, mode="reduce-overhead")``, the prefill uncompiled), so
    inductor's code replays from CUDA graphs of whole forwards (the decoded layers are one op each: the block
    decodes of lossless and int8+entropy are in the graphs). The second generate replays what the first recorded;
    every step's logits stay within bf16's tolerance of ``disable_compile=True`` (inductor reorders the model's own
    float math), inductor made CUDA graphs and skipped none. ``bf16``, the model uncompressed, is the control.

    (The older recipe, ``model.forward = torch.compile(model.forward, mode="reduce-overhead")``, compiles the
    prefill too, where the static cache allocates its tensors: on the H200 with torch 2.11 and transformers 5.17
    it failed for the uncompressed model as well, 2026-12-02, RESULTS.md.)"""
    from torch._dynamo.utils import counters

    from cupycodec.integrations.torch import compress_model

    model = _tiny_llama(layers=3)
    if mode != "bf16":
        compress_model(model, mode, progress=False)
    model.generation_config.eos_token_id = None  # all new tokens, whatever this random model emits
    ids = torch.randint(0, 512, (1, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    gen = dict(max_new_tokens=6, do_sample=False, cache_implementation="static", return_dict_in_generate=True,
               output_logits=True)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        want = model.generate(ids, disable_compile=True, **gen)
        assert getattr(model, "_compiled_call", None) is None
        for _ in range(2):
            got = model.generate(ids, **gen)
            assert len(got.logits) == len(want.logits) == 6
            for a, b in zip(got.logits, want.logits):
                assert torch.allclose(a.float(), b.float(), atol=3e-2, rtol=3e-2)
    assert getattr(model, "_compiled_call", None) is not None  # transformers compiled the decode step
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None and sum(len(nodes) for nodes in manager.roots.values()) > 0  # graphs recorded
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    torch._dynamo.reset()
    if mode != "bf16":
        model._cupycodec_runtime[0].check()


class _Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up, self.down = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("mode", ["lossless", "int8", "int8+entropy"])
def test_block_decodes_and_prefetch_capture_and_replay(mode):
    # no transformers: a plain stack of blocks, so only our decode, prefetch and kernels are under test
    from cupycodec.integrations.torch import compress_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.ModuleList([_Block(256) for _ in range(4)])).cuda().to(torch.bfloat16)

    def run(m, x):
        for blk in m[0]:
            x = blk(x)
        return x

    model = copy.deepcopy(base)
    report = compress_model(model, mode, progress=False)
    assert report.blocks == 4 and report.skipped == {}
    static = torch.randn(2, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        run(model, static)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = run(model, static)
        for seed in range(3):
            static.copy_(torch.randn(2, 256, generator=torch.Generator().manual_seed(seed)).cuda().to(torch.bfloat16))
            g.replay()
            eager = run(model, static)
            assert torch.equal(out, eager)
            if mode == "lossless":
                assert torch.equal(eager, run(base, static))


@pytest.mark.parametrize("tokens", [9, 40])  # 40: a large batch (dequantize + cuBLAS)
@pytest.mark.parametrize("layers", [1, 2])  # after a forward, the first block is still in its slot
@pytest.mark.parametrize("mode", ["lossless", "int8", "int8+entropy", "int8 offloaded"])
def test_a_state_dict_loaded_into_a_used_model_is_what_it_computes_with(mode, layers, tokens):
    from cupycodec.integrations.torch import compress_model

    def compressed(sign):
        model = _tiny_llama(layers=layers)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(sign)
        compress_model(model, mode.split()[0], progress=False, **({"offload": "cpu"} if "offloaded" in mode else {}))
        return model

    a, b = compressed(1), compressed(-1)
    ids = torch.randint(0, 512, (1, tokens), device="cuda")
    with torch.no_grad():
        want = b(ids).logits
        assert not torch.equal(a(ids).logits, want)
        a.load_state_dict(b.state_dict())
        assert torch.equal(a(ids).logits, want)
        assert torch.equal(a(ids).logits, want)
    a._cupycodec_runtime[0].check()


def _delete_while_the_side_stream_spins(cycles):
    """Queue a spin of `cycles` on a compressed model's side stream at a block start, delete the model, allocate two
    tensors of the slots' size; gives (the current stream still busy, the side stream still busy, seconds since the
    spin was queued, the tensors)."""
    from cupycodec.integrations.torch import compress_model

    model = _tiny_llama(layers=3)
    compress_model(model, "lossless", progress=False)
    ids = torch.randint(0, 512, (1, 9), device="cuda")
    with torch.no_grad():
        model(ids)  # slots, plans and the side stream made
    rt = model._cupycodec_runtime[0]
    (st,) = rt._devices.values()
    nbytes = rt.slot_nbytes
    rt.enter(0, ids.device)  # a block start: block 0 into slot 0 (block 1 is in slot 1 already)
    torch.full((8,), 7, dtype=torch.uint8, device="cuda")  # the fill kernel loaded now: see the test's docstring
    torch.cuda.synchronize()
    side = st.side
    with torch.cuda.stream(side):
        torch.cuda._sleep(cycles)
    t0 = time.perf_counter()
    assert side.query() is False
    gone = weakref.ref(rt)
    del model, rt, st
    gc.collect()
    alive = gone()
    assert alive is None, f"the runtime outlived its model; held by {[type(r).__name__ for r in gc.get_referrers(alive)]}"
    fresh = [torch.full((nbytes,), 7, dtype=torch.uint8, device="cuda") for _ in range(2)]
    time.sleep(0.02)  # the fills take microseconds; the spin seconds
    waited = torch.cuda.current_stream().query() is False
    spinning = side.query() is False  # queried after: if the side stream still spins, `waited` was conclusive
    return waited, spinning, time.perf_counter() - t0, fresh


def test_a_model_deleted_while_its_side_stream_is_busy_leaves_new_tensors_alone():
    """A forward that stops inside a block (an exception) can leave the next block's decode pending on the side stream;
    `del model` then gives the slots back to torch's pool of the stream they were allocated on, which hands them to
    its next allocation at once. So that stream is made to wait for the side stream as the runtime goes: here a spin
    on the side stream stands in for a pending decode, and the two tensors of the slots' size allocated after `del`
    (where the slots' memory goes) must still be waiting for it 20 ms later. The check tells only while the spin
    lasts: on a host so loaded that the deletion outlasts it (2.07 s under 14 workers, H200 2026-12-04), it is made
    again with a spin four times as long. (The spin is queued after the block start, which may build a plan, and a
    plan's construction waits for its stream once; and the fill kernel is launched once before the spin: the
    process's first launch of it returned only after the spin, 0.76 s later, whatever the streams' order, most likely
    CUDA's lazy module loading waiting for the device. H200, 2026-12-03.)"""
    for cycles in (4_000_000_000, 16_000_000_000):  # about 2 s, then about 8 s
        waited, spinning, seconds, fresh = _delete_while_the_side_stream_spins(cycles)
        assert waited or not spinning, f"the slots' stream did not wait for the side stream ({seconds:.2f} s after the spin was queued)"
        torch.cuda.synchronize()
        assert all(bool((t == 7).all()) for t in fresh)
        if waited:
            return
    pytest.fail(f"inconclusive: the side stream's spin ended before the check, twice (the last {seconds:.2f} s after it was queued)")


@pytest.mark.parametrize("mode", ["lossless", "int8+entropy"])
def test_a_model_moved_off_the_gpu_gives_back_its_memory_there(mode):
    # .cpu() frees the model's GPU memory, the runtime's slots and plans included (after the GPU is done with them);
    # the model computes on the CPU, and back on the GPU computes what it did before
    from cupycodec.integrations.torch import compress_model

    base = _tiny_llama(layers=3)
    model = copy.deepcopy(base)
    compress_model(model, mode, progress=False)
    ids = torch.randint(0, 512, (1, 9), device="cuda")
    with torch.no_grad():
        want = model(ids).logits
    rt = model._cupycodec_runtime[0]
    rt.check()
    held = rt.nbytes()
    own = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert held > 0
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    model.cpu()
    gc.collect()
    assert rt.nbytes() == 0 and not rt._devices
    assert before - torch.cuda.memory_allocated() >= own + held
    ref = copy.deepcopy(base).cpu()
    with torch.no_grad():
        got = model(ids.cpu()).logits
        if mode == "lossless":
            assert torch.equal(got, ref(ids.cpu()).logits)
        model.cuda()
        assert torch.equal(model(ids).logits, want)
    rt.check()


def test_a_bad_chunk_seen_by_plans_that_went_is_still_reported():
    # a decode's bad chunk is reported by the next check(), even when the plan that saw it was dropped first (a
    # state dict loaded: the plans over the old containers go)
    import cupy

    from cupycodec.integrations.torch import compress_model

    model = _tiny_llama(layers=2)
    compress_model(model, "lossless", progress=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 512, (1, 5), device="cuda")
    rt = model._cupycodec_runtime[0]
    with torch.no_grad():
        model(ids)
        rt.check()
        plan = next(iter(rt.groups[0]._plans.values()))
        assert plan._n_enc > 0
        raw_sizes = plan._ptrs[3]  # lie about a chunk's size in the plan's table: its next decode reports it
        row = cupy.ndarray((plan._n_enc,), cupy.uint64, cupy.cuda.MemoryPointer(
            cupy.cuda.UnownedMemory(raw_sizes, 8 * plan._n_enc, plan), 0))
        row[0] -= 16
        torch.cuda.synchronize()
        rt.reset()  # block 0 decodes again in the next forward
        model(ids)
        model.load_state_dict(state)  # block 0's plans go, with what they saw
        assert not rt.groups[0]._plans
        with pytest.raises(cc.BackendError, match="chunk"):
            rt.check()
        rt.check()  # reported once
        model(ids)
        rt.check()


def test_block_prefetch_keeps_results_exact_whatever_the_order():
    # layers called on their own, out of block order, between block forwards: slots must never be overwritten in use
    from cupycodec.integrations.torch import compress_model

    base = _tiny_llama(layers=5)
    model = copy.deepcopy(base)
    compress_model(model, "lossless", progress=False)
    x = torch.randn(1, 3, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for i in (4, 0, 2, 2, 1, 3):
            a = model.model.layers[i].mlp(x)
            b = base.model.layers[i].mlp(x)
            assert torch.equal(a, b)
        ids = torch.randint(0, 512, (2, 9), device="cuda")
        assert torch.equal(model(ids).logits, base(ids).logits)


@pytest.mark.parametrize("mode", ["lossless", "int8", "int8+entropy"])
@pytest.mark.parametrize("m", [1, 64])  # the fused GEMV, and dequantize + cuBLAS
@pytest.mark.parametrize("cast", [torch.float16, torch.bfloat16])
def test_under_cuda_autocast_a_layer_computes_in_autocasts_dtype(mode, m, cast):
    # nn.Linear under autocast computes in autocast's dtype; the eager INT8 routes ran the GEMV in the input's dtype
    # (float32 out of a float16 autocast region)
    from cupycodec.integrations.torch import CompressedLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 384).cuda()
    cl = CompressedLinear.from_linear(lin, mode)
    x = torch.randn(m, 512, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=cast):
        y = cl(x)
        want = torch.nn.functional.linear(x, cl.decompress_weight(torch.float32), lin.bias)
    assert y.dtype == want.dtype == cast
    assert _rel(y, want) < 1e-2


@pytest.mark.parametrize("mode", ["lossless", "int8+entropy"])
def test_a_weight_tied_across_blocks_and_loaded_into_one_layer_decodes_new_with_prefetch(mode):
    # on a GPU the next block is prefetched on a side stream from plans over the layers' bytes as they were: a
    # layer whose shared bytes another layer's load_state_dict replaced must be read again before that decode
    from cupycodec.integrations.torch import CompressedLinear, compress_model

    model, ref = _tiny_llama(), _tiny_llama()
    for m in (model, ref):
        m.model.layers[3].mlp.down_proj.weight = m.model.layers[0].mlp.down_proj.weight
    compress_model(model, mode, progress=False)
    ids = torch.randint(0, 512, (1, 9), device="cuda")
    with torch.no_grad():
        model(ids)  # plans and a prefetch over the old bytes
        torch.manual_seed(7)
        down = model.model.layers[0].mlp.down_proj
        new = torch.nn.Linear(down.in_features, down.out_features, bias=False, device="cuda", dtype=torch.bfloat16)
        src = CompressedLinear.from_linear(new, mode)
        down.load_state_dict(src.state_dict())
        ref.model.layers[0].mlp.down_proj.weight.copy_(src.decompress_weight())
        fresh = copy.deepcopy(ref)
        compress_model(fresh, mode, progress=False)
        assert torch.equal(model(ids).logits, fresh(ids).logits)
        if mode == "lossless":
            assert torch.equal(model(ids).logits, ref(ids).logits)
