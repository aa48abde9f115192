"""The torch integration on a GPU, beside bf16 and torchao int8 weight-only in the same run.

Sections:
  gemv  one layer at batch 1 (and M = 4, 16): bf16 F.linear, our fused INT8 GEMV, dequantize + F.linear, torchao
        int8wo (if importable), for 4096x4096, 11008x4096, 4096x11008, 14336x4096; GPU time per call from CUDA-graph
        replays over enough copies of the layer to exceed L2 (see graph_us), bytes read, and their rate against the
        device copy bandwidth measured here, and against a plain kernel that only reads the same bytes (the floor).
  e2e   random-weight TinyLlama-1.1B and Llama-2-7B shapes: prefill-512, HF generate (batch 1, 128 tokens, eager),
        and a decode step captured in a CUDA graph (static KV cache) replayed 128 times; tok/s, and the model's
        resident and peak memory as torch counts it (the bf16 reference model, held beside every mode, subtracted),
        per mode (bf16, lossless, int8, int8+entropy, torchao int8wo).
  overlap  graph decode of the block-decoded modes with and without the side-stream prefetch, bf16 beside them.
  compiled  the graph decode with the step under torch.compile (inductor) before the capture, for bf16, the
        --compiled-modes and torchao, on --compiled-configs (default llama7b, int8): issue 9's compiled target.
  block  a decode step's Linear work at batch 1 for one block of each --configs shape: its seven layers in the
        order a Llama block runs them, with stand-ins for the element-wise and attention kernels between them,
        captured over enough blocks' weights to defeat L2; GPU us per block for bf16, INT8, and a kernel that only
        reads the block's INT8 bytes; with --block-fused also both with q/k/v and gate/up each run as one layer.

Usage: python benchmarks/bench_torch.py [--sections gemv,e2e,compiled] [--configs tinyllama,llama7b] [--json PATH]
(--json is rewritten after every section and every compiled row, so a run cut by a time limit keeps its figures)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
import traceback

import torch

SHAPES = [(2048, 2048), (256, 2048), (5632, 2048), (2048, 5632), (4096, 4096), (11008, 4096), (4096, 11008),
          (14336, 4096)]  # TinyLlama's, then Llama-2-7B's and Llama-3-8B's
CONFIGS = {
    "tinyllama": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4),
    "llama7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32),
}


def gpu_ms(fn, reps=50, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]


def copy_gbps():
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = gpu_ms(lambda: b.copy_(a), reps=10)
    return 2 * a.numel() / ms / 1e6


def torchao_int8wo(model):
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return None
    quantize_(model, Int8WeightOnlyConfig())
    return model


_READ_SRC = r"""
extern "C" __global__ void __launch_bounds__(256) read_floor(const uint4* __restrict__ p, long long n16,
                                                             unsigned* __restrict__ out) {
    /* reads n16 16-byte words once, four loads in flight per thread, no L1 allocation: the time any kernel needs
       to read these bytes (the XOR only keeps the loads alive) */
    unsigned acc = 0u;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n16; i += 4 * stride) {
        uint4 v[4];
        #pragma unroll
        for (int u = 0; u < 4; ++u) {
            const long long j = i + u * stride;
            if (j < n16) asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                                      : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w) : "l"(p + j));
            else v[u] = make_uint4(0u, 0u, 0u, 0u);
        }
        #pragma unroll
        for (int u = 0; u < 4; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    if (acc == 0x9e3779b9u) out[0] = acc;
}
"""


def read_floor(buffers: list[torch.Tensor]) -> list:
    """Callables that read each of ``buffers`` once with a plain streaming kernel (no arithmetic): the floor under
    any kernel that must read those bytes, measured the same way as the GEMVs (graph_us)."""
    import cupy

    from cupycodec._cuda import kernel_handle, launch

    dev = torch.cuda.current_device()
    with cupy.cuda.Device(dev):
        fn = cupy.RawKernel(_READ_SRC, "read_floor")
        sms = cupy.cuda.runtime.deviceGetAttribute(cupy.cuda.runtime.cudaDevAttrMultiProcessorCount, dev)
    handle = kernel_handle(fn, dev)
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    calls = []
    for b in buffers:
        n16 = b.numel() * b.element_size() // 16
        grid = min(sms * 8, max(1, -(-n16 // 1024)))
        calls.append(lambda b=b, n16=n16, grid=grid: launch(handle, grid, 256, (b.data_ptr(), n16, sink.data_ptr()),
                                                            dev, torch.cuda.current_stream().cuda_stream))
    return calls


def bench_gemv(rows, bw):
    for n, k in SHAPES:
        rows.extend(_gemv_rows(n, k, bw))
        gc.collect()
        torch.cuda.empty_cache()


def graph_us(fns, replays=20) -> float:
    """GPU microseconds per call of ``fns`` (one call each, in turn), from CUDA-graph replays: a graph of all the calls
    is replayed ``replays`` times and the median replay is divided by the number of calls. The graph takes the host's
    launch cost out (timing one Python call between two events measures that cost, not the kernel), and the calls
    work on different weights whose sum exceeds the L2 cache, so no call reads a weight another left in L2."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:  # warm-up outside the capture: kernels compiled, scratch allocated
            f()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    return gpu_ms(g.replay, reps=replays, warmup=3) * 1e3 / len(fns)


L2_DEFEAT_BYTES = 256 << 20  # weights per timed graph: several times the H200's 60 MB L2


def _gemv_rows(n: int, k: int, bw: float) -> list[dict]:
    from cupycodec.integrations.torch import CompressedLinear, ops

    ops.reserve_scratch(2 * n * k)

    copies = max(2, -(-L2_DEFEAT_BYTES // (2 * n * k)))
    lins = [torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    cls = [CompressedLinear.from_linear(lin, "int8") for lin in lins]
    w = cls[0].decompress_weight()
    aos = [torchao_int8wo(copy.deepcopy(torch.nn.Sequential(lin))) for lin in lins]
    t_floor_int8 = graph_us(read_floor([cl.qweight for cl in cls]))
    t_floor_bf16 = graph_us(read_floor([lin.weight for lin in lins]))
    rows = []
    for m in (1, 4, 8, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        args = [(x, cl.qweight, cl.scale, None, "channel", 128) for cl in cls]
        with torch.no_grad():
            t_bf16 = graph_us([lambda lin=lin, x=x: torch.nn.functional.linear(x, lin.weight) for lin in lins])
            t_ours = graph_us([lambda a=a: ops.linear(*a) for a in args])  # what CompressedLinear runs
            t_kernel = {kern: graph_us([lambda a=a, kern=kern: ops.gemv_linear(*a, kernel=kern) for a in args])
                        for kern in ("fma", "mma")}
            t_dq = graph_us([lambda a=a: ops.dequant_linear(*a) for a in args])
            try:
                t_ao = graph_us([lambda ao=ao, x=x: ao(x) for ao in aos]) if aos[0] is not None else None
            except Exception as exc:  # a tensor subclass that does not capture: say so, keep the other figures
                print(f"torchao int8wo at {n}x{k}, M={m}: no CUDA-graph timing ({type(exc).__name__}: {exc})")
                t_ao = None
            ref = x.double() @ w.double().T
            errs = {kern: (torch.linalg.vector_norm(ops.gemv_linear(*args[0], kernel=kern).double() - ref)
                           / torch.linalg.vector_norm(ref)).item() for kern in ("fma", "mma")}
        read = n * k + n * 4 + m * k * 2  # codes, scales, activations
        row = {"shape": f"{n}x{k}", "m": m, "timing": f"CUDA graph of {copies} layers, per call",
               "bf16_us": t_bf16, "int8_linear_us": t_ours, "gemv_fma_us": t_kernel["fma"],
               "gemv_mma_us": t_kernel["mma"], "dequant_linear_us": t_dq, "torchao_int8wo_us": t_ao,
               "linear_vs_bf16": t_ours / t_bf16, "linear_read_gbps": read / t_ours / 1e3,
               "linear_of_copy": read / t_ours / 1e3 / bw,
               "mma_of_copy": read / t_kernel["mma"] / 1e3 / bw,
               "bf16_read_gbps": (2 * n * k + m * k * 2) / t_bf16 / 1e3,
               "read_floor_int8_us": t_floor_int8, "read_floor_bf16_us": t_floor_bf16,
               "linear_of_floor": t_floor_int8 / t_ours, "bf16_of_floor": t_floor_bf16 / t_bf16,
               "rel_err_vs_fp64": errs}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _block_step(x, linears, run):
    """One Llama block's Linear work at batch 1: ``run(layer, input)`` for q, k, v, o, gate, up, down, between
    stand-ins for the kernels a decode step runs between them (norm, attention, SiLU, residual), so that each GEMV
    follows the kernel it follows in a model."""
    q, k, v, o, gate, up, down = linears
    h = x * 1.0001  # input norm
    a = run(q, h) + (run(k, h).sum(-1, keepdim=True) + run(v, h).sum(-1, keepdim=True)) * 1e-3  # attention
    x = x + run(o, a)
    h = x * 1.0001  # post-attention norm
    t = torch.nn.functional.silu(run(gate, h)) * run(up, h)
    return x + run(down, t)


def _block_step_fused(x, fused, run, split):
    """:func:`_block_step` with q, k and v as one layer and gate and up as one (their weights concatenated by rows):
    what a horizontally fused GEMV would run. Not a library path: a measurement of what fusing would gain."""
    qkv, o, gate_up, down = fused
    h = x * 1.0001
    q, k, v = run(qkv, h).split(split[0], -1)
    a = q + (k.sum(-1, keepdim=True) + v.sum(-1, keepdim=True)) * 1e-3
    x = x + run(o, a)
    h = x * 1.0001
    g, u = run(gate_up, h).split(split[1], -1)
    return x + run(down, torch.nn.functional.silu(g) * u)


def _fuse(lins):
    """(qkv, o, gate_up, down) bf16 Linears from a block's seven, by concatenating the weights of q, k, v and of
    gate, up."""
    def cat(parts):
        w = torch.cat([p.weight for p in parts])
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
        return lin
    q, k, v, o, gate, up, down = lins
    return [cat([q, k, v]), o, cat([gate, up]), down]


def bench_block(rows, configs, fused=False):
    """Per block of GPU time (CUDA-graph replays) for a decode step's Linear work, over enough blocks' weights to
    defeat L2: bf16 F.linear, INT8 (what CompressedLinear runs at batch 1), and the read floor of the block's INT8
    bytes. Same weights, same process, modes interleaved over rounds."""
    from cupycodec.integrations.torch import CompressedLinear, ops

    for config in configs:
        c = CONFIGS[config]
        d, f, kv = c["hidden_size"], c["intermediate_size"], c["hidden_size"] * c["num_key_value_heads"] // c[
            "num_attention_heads"]
        shapes = [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)]  # (out, in): q k v o gate up down
        block_bytes = sum(n * k for n, k in shapes)
        n_blocks = max(2, -(-L2_DEFEAT_BYTES * 4 // block_bytes))  # INT8 bytes >= 4x the defeat size
        torch.manual_seed(0)
        blocks = []
        for _ in range(n_blocks):
            lins = [torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16) for n, k in shapes]
            fl = _fuse(lins) if fused else []
            blocks.append((lins, [CompressedLinear.from_linear(lin, "int8") for lin in lins], fl,
                           [CompressedLinear.from_linear(lin, "int8") for lin in fl]))
        x = torch.randn(1, 1, d, device="cuda", dtype=torch.bfloat16)
        split = ([d, kv, kv], [f, f])

        def step(variant, blocks=blocks, x=x, split=split):
            def run(layer, h):
                if variant.startswith("bf16"):
                    return torch.nn.functional.linear(h, layer.weight)
                return ops.linear(h, layer.qweight, layer.scale, None, "channel", 128)
            idx = ["bf16", "int8", "bf16_fused", "int8_fused"].index(variant)
            if idx >= 2:
                return [lambda b=b: _block_step_fused(x, b[idx], run, split) for b in blocks]
            return [lambda b=b: _block_step(x, b[idx], run) for b in blocks]

        variants = ["bf16", "int8", *(["bf16_fused", "int8_fused"] if fused else [])]
        with torch.no_grad():
            floor = read_floor([cl.qweight for b in blocks for cl in b[1]])
            if fused:  # the fused layers give the same output as the seven (exact per-channel codes, same sums)
                b = blocks[0]
                a = torch.cat([b[1][i](x) for i in range(3)], -1)
                assert torch.equal(b[3][0].qweight, torch.cat([b[1][i].qweight for i in range(3)]))
                assert a.shape[-1] == sum(split[0])
            times = {v: [] for v in [*variants, "read_floor"]}
            for _ in range(3):  # rounds, modes interleaved
                for v in variants:
                    times[v].append(graph_us(step(v)))
                times["read_floor"].append(graph_us(floor) * len(shapes))
        med = {v: statistics.median(t) for v, t in times.items()}
        row = {"config": config, "mode": "Linear work of one block", "blocks": n_blocks,
               "timing": "CUDA graph, us per block (median of 3 rounds)",
               **{f"{v}_us": med[v] for v in med}, "rounds_us": times, "int8_vs_bf16": med["int8"] / med["bf16"],
               "int8_of_floor": med["read_floor"] / med["int8"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        blocks = step = None
        gc.collect()
        torch.cuda.empty_cache()


def _build(config):
    import transformers

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIGS[config]))
    return model.to(torch.bfloat16).eval()


def _rewind(cache, length):
    """transformers >= 5 writes a static cache at its own counter (cumulative_length): set it to ``length``."""
    for layer in getattr(cache, "layers", ()):
        if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
            layer.cumulative_length.fill_(length)


def capture_step(model, prompt, cache, step=None):
    """Prefill ``prompt`` into the static ``cache``, warm the decode step up on a side stream, and capture one decode
    step in a CUDA graph (a compressed model's runtime reset first, so that the graph decodes every block); the
    cache is rewound to the prompt's end. Returns the graph, its logits, and the token and position tensors the
    replays read (call under ``torch.no_grad()``). ``step``: what runs the decode step (default the model)."""
    step = step or model
    runtime = getattr(model, "_cupycodec_runtime", None)
    length = prompt.shape[1]
    _rewind(cache, 0)
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True,
                cache_position=torch.arange(length, device="cuda"))
    tok = out.logits[:, -1:].argmax(-1)
    pos = torch.tensor([length], device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(input_ids=tok, past_key_values=cache, use_cache=True, cache_position=pos)
    torch.cuda.current_stream().wait_stream(side)
    if runtime is not None:
        runtime[0].reset()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        logits = step(input_ids=tok, past_key_values=cache, use_cache=True, cache_position=pos).logits
    torch.cuda.synchronize()
    _rewind(cache, length)  # the warm-up steps advanced it: the replays write where cache_position says
    return g, logits, tok, pos


def _graph_tok_s(model, prompt, n_new, step=None, cache=None):
    """Tokens/s of greedy decoding with one decode step captured in a CUDA graph (static KV cache). ``step``: what
    runs the decode step (default the model itself; a ``torch.compile``d forward for the compiled rows), ``cache``:
    the static cache to use (the one a compiled step was warmed up with: no recompilation for a new object)."""
    from transformers import StaticCache

    if cache is None:
        cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + n_new + 8)
    with torch.no_grad():
        g, logits, tok, pos = capture_step(model, prompt, cache, step)
        t = time.perf_counter()
        tokens = [tok.clone()]  # the prefill's token, as generate's output starts
        for _ in range(n_new):
            g.replay()
            nxt = logits[:, -1:].argmax(-1)
            tokens.append(nxt)
            tok.copy_(nxt)
            pos += 1
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
    return n_new / dt, torch.cat(tokens, 1)


def bench_e2e(rows, configs, modes, n_new=128, rounds=4, eager_tokens=32):
    """Every mode's model is built first and kept; then the host-bound figures (prefill-512 and eager generate) are
    measured in ``rounds`` rounds that take the modes in turn, and the median of all but the first (a warm-up: this
    host's first round ran up to 4x slower) kept, so that no mode is measured in a slower or faster spell of a shared
    host than another. Graph decode (GPU-bound) runs once per mode."""
    from cupycodec.integrations.torch import compress_model

    for config in configs:
        prompt = torch.randint(0, 32000, (1, 16), device="cuda")
        long = torch.randint(0, 32000, (1, 512), device="cuda")
        models, by_mode = {}, {}
        base = None
        for mode in ["bf16", *modes, "torchao"]:
            row = by_mode[mode] = {"config": config, "mode": mode}
            try:
                gc.collect()
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                if mode == "bf16":
                    model = base = _build(config)
                elif mode == "torchao":
                    model = torchao_int8wo(copy.deepcopy(base))
                    if model is None:
                        del by_mode[mode]
                        continue
                else:
                    model = copy.deepcopy(base)
                    t = time.perf_counter()
                    report = compress_model(model, mode, progress=False)
                    torch.cuda.synchronize()
                    row.update(compress_s=time.perf_counter() - t, ratio=report.ratio)
                gc.collect()
                torch.cuda.synchronize()
                row["resident_gib"] = (torch.cuda.memory_allocated() - before) / 2**30
                models[mode] = model
            except Exception as exc:  # keep going: one mode's failure must not hide the others
                row["error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
        prefill = {m: [] for m in models}
        eager = {m: [] for m in models}
        with torch.no_grad():
            for _ in range(rounds):
                for mode, model in models.items():
                    try:
                        prefill[mode].append(gpu_ms(lambda m=model, ids=long: m(ids, use_cache=False), reps=3,
                                                    warmup=1))
                        model.generate(prompt, max_new_tokens=2, do_sample=False)
                        torch.cuda.synchronize()
                        t = time.perf_counter()
                        model.generate(prompt, max_new_tokens=eager_tokens, min_new_tokens=eager_tokens,
                                       do_sample=False)
                        torch.cuda.synchronize()
                        eager[mode].append(eager_tokens / (time.perf_counter() - t))
                    except Exception as exc:
                        by_mode[mode]["error"] = f"{type(exc).__name__}: {exc}"
                        traceback.print_exc()
        for mode, model in models.items():
            row = by_mode[mode]
            if "error" in row:
                continue
            try:
                row["prefill512_ms"] = statistics.median(prefill[mode][1:])
                row["prefill512_ms_rounds"] = prefill[mode]
                row["eager_tok_s"] = statistics.median(eager[mode][1:])
                row["eager_tok_s_rounds"] = eager[mode]
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                at = torch.cuda.memory_allocated()
                with torch.no_grad():
                    out = model.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
                row["graph_tok_s"], graph_tokens = _graph_tok_s(model, prompt, n_new)
                row["peak_gib"] = row["resident_gib"] + (torch.cuda.max_memory_allocated() - at) / 2**30
                row["tokens"] = out[0, prompt.shape[1]:].tolist()[:16]
                row["graph_tokens_equal_eager"] = bool(torch.equal(graph_tokens[0, :16].cpu(),
                                                                   out[0, prompt.shape[1]:][:16].cpu()))
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
        for r in by_mode.values():
            b = by_mode.get("bf16", {})
            for k in ("eager_tok_s", "graph_tok_s"):
                if k in r and k in b:
                    r[k.replace("tok_s", "vs_bf16")] = r[k] / b[k]
            if "prefill512_ms" in r and "prefill512_ms" in b:
                r["prefill_vs_bf16"] = r["prefill512_ms"] / b["prefill512_ms"]
                # the best round of each (noise on a shared host only adds time): the ratio of the modes' own costs
                r["prefill_vs_bf16_best"] = min(r["prefill512_ms_rounds"][1:]) / min(b["prefill512_ms_rounds"][1:])
                r["eager_vs_bf16_best"] = max(r["eager_tok_s_rounds"][1:]) / max(b["eager_tok_s_rounds"][1:])
            if "tokens" in r and "tokens" in b:
                r["tokens_equal_bf16"] = r["tokens"] == b["tokens"]
            rows.append(r)
            print(json.dumps(r), flush=True)
        del models, base, model
        gc.collect()
        torch.cuda.empty_cache()


def bench_compiled(rows, configs, modes, n_new=128, torchao=True, save=lambda: None):
    """Graph decode with the decode step compiled: ``torch.compile(model.forward)`` (inductor, no CUDA graphs of
    its own, so that the same manual capture as the graph rows takes the compiled step), bf16 and torchao set up
    the same way, in the same run. What issue 9's "decode step compiled and captured in a CUDA graph" row asks.
    One model at a time (each compiles on its first steps; the time is reported as compile_s). Each row joins
    ``rows`` and ``save()`` runs as soon as it is measured: compiles take 40-170 s each on the H200's host, and a
    run its time limit cuts keeps the rows before."""
    from cupycodec.integrations.torch import compress_model

    for config in configs:
        prompt = torch.randint(0, 32000, (1, 16), device="cuda")
        bf16 = {}
        # torchao last unless named: its compile is the longest, and a run cut by its limit keeps the rows before
        for mode in ["bf16", *modes, *(() if "torchao" in modes or not torchao else ("torchao",))]:
            row = {"config": config, "mode": mode, "timing": "compiled decode step, CUDA graph"}
            try:
                gc.collect()
                torch.cuda.empty_cache()
                model = _build(config)  # seeded: the same weights for every mode
                if mode == "torchao":
                    if torchao_int8wo(model) is None:
                        continue
                elif mode != "bf16":
                    compress_model(model, mode, progress=False)
                torch._dynamo.reset()
                step = torch.compile(model.forward, dynamic=False)
                t = time.perf_counter()
                with torch.no_grad():  # the first steps compile (prefill runs uncompiled, in _graph_tok_s)
                    from transformers import StaticCache

                    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + n_new + 8)
                    model(input_ids=prompt, past_key_values=cache, use_cache=True,
                          cache_position=torch.arange(prompt.shape[1], device="cuda"))
                    step(input_ids=prompt[:, -1:], past_key_values=cache, use_cache=True,
                         cache_position=torch.tensor([prompt.shape[1]], device="cuda"))
                torch.cuda.synchronize()
                row["compile_s"] = time.perf_counter() - t
                row["graph_tok_s"], tokens = _graph_tok_s(model, prompt, n_new, step=step, cache=cache)
                row["tokens"] = tokens[0, :16].tolist()
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            finally:
                model = step = cache = None
                torch._dynamo.reset()
            if mode == "bf16":
                bf16 = row
            if "graph_tok_s" in row and "graph_tok_s" in bf16:
                row["graph_vs_bf16"] = row["graph_tok_s"] / bf16["graph_tok_s"]
            if "tokens" in row and "tokens" in bf16:
                row["tokens_equal_bf16"] = row["tokens"] == bf16["tokens"]
            rows.append(row)
            save()
            print(json.dumps(row), flush=True)  # as it comes: a run cut by its time limit keeps its rows


def bench_overlap(rows, configs, modes, n_new=128):
    """Does the next block's decode overlap this block's compute in a CUDA graph? Graph decode tok/s of each
    block-decoded mode with the side-stream prefetch (the default) and without it (one slot, every block decoded
    on the compute stream when it starts), bf16 in the same run. Equal figures mean no overlap happens."""
    from cupycodec.integrations.torch import compress_model

    for config in configs:
        prompt = torch.randint(0, 32000, (1, 16), device="cuda")
        base = _build(config)
        bf16, _ = _graph_tok_s(base, prompt, n_new)
        for mode in modes:
            model = copy.deepcopy(base)
            compress_model(model, mode, progress=False)
            rt = model._cupycodec_runtime[0]
            row = {"config": config, "mode": mode, "bf16_graph_tok_s": bf16}
            for prefetch in (True, False, True):
                rt.prefetch = prefetch
                rt._devices.clear()  # slots are made again: two with prefetch, one without
                tok_s, tokens = _graph_tok_s(model, prompt, n_new)
                row.setdefault("prefetch_tok_s" if prefetch else "no_prefetch_tok_s", []).append(tok_s)
                row.setdefault("tokens", tokens[0, :16].tolist())
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model, rt
            gc.collect()
            torch.cuda.empty_cache()
        del base
        gc.collect()
        torch.cuda.empty_cache()


def _table(rows, columns, cells) -> None:
    """A Markdown table of ``rows`` (config and mode first, then ``cells(row)``; a row with an error says so)."""
    if not rows:
        return
    print("\n| " + " | ".join(columns) + " |")
    print("| --- | --- |" + " ---: |" * (len(columns) - 3) + " --- |")
    for r in rows:
        rest = f"error: {r['error'][:60]}" if "error" in r else cells(r)
        print(f"| {r['config']} | {r['mode']} | {rest} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sections", default="gemv,e2e")
    p.add_argument("--configs", default="tinyllama,llama7b")
    p.add_argument("--modes", default="lossless,int8,int8+entropy")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds of the e2e section's eager figures")
    p.add_argument("--compiled-configs", default="llama7b", help="configs of the 'compiled' section")
    p.add_argument("--compiled-modes", default="int8",
                   help="modes of the 'compiled' section in order (bf16 first, torchao last unless named)")
    p.add_argument("--no-torchao", action="store_true", help="leave torchao out of the 'compiled' section")
    p.add_argument("--block-fused", action="store_true",
                   help="the 'block' section also times q/k/v and gate/up each as one layer (a fusion's gain)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    env["copy_gbps_read_plus_write"] = copy_gbps()
    print(json.dumps(env), flush=True)
    results = {"env": env, "gemv": [], "e2e": [], "compiled": [], "overlap": [], "block": []}

    def save():  # after every section (and every compiled row): a run cut by its time limit keeps what it measured
        if args.json:  # whole or not at all: a kill during the write leaves the previous file
            with open(args.json + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(args.json + ".tmp", args.json)

    sections = set(args.sections.split(","))
    if "block" in sections:
        bench_block(results["block"], args.configs.split(","), fused=args.block_fused)
        save()
    if "gemv" in sections:
        bench_gemv(results["gemv"], env["copy_gbps_read_plus_write"])
        save()
    if "e2e" in sections:
        bench_e2e(results["e2e"], args.configs.split(","), args.modes.split(","), args.tokens, rounds=args.rounds)
        save()
    if "overlap" in sections:
        bench_overlap(results["overlap"], args.configs.split(","), [m for m in args.modes.split(",") if m != "int8"],
                      args.tokens)
        save()
    if "compiled" in sections:
        bench_compiled(results["compiled"], args.compiled_configs.split(","), args.compiled_modes.split(","),
                       args.tokens, torchao=not args.no_torchao, save=save)
    save()
    print("\n| shape | M | bf16 us | int8_linear us | vs bf16 | of copy | GEMV fma us | GEMV mma us | mma of copy | "
          "dequant+linear us | torchao us | read floor int8 / bf16 us | int8 / bf16 of floor |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results["gemv"]:
        ao = f"{r['torchao_int8wo_us']:.1f}" if r["torchao_int8wo_us"] else "-"
        print(f"| {r['shape']} | {r['m']} | {r['bf16_us']:.1f} | {r['int8_linear_us']:.1f} | "
              f"{r['linear_vs_bf16']:.2f}x | {r['linear_of_copy']:.0%} | {r['gemv_fma_us']:.1f} | "
              f"{r['gemv_mma_us']:.1f} | {r['mma_of_copy']:.0%} | {r['dequant_linear_us']:.1f} | {ao} | "
              f"{r['read_floor_int8_us']:.1f} / {r['read_floor_bf16_us']:.1f} | {r['linear_of_floor']:.0%} / "
              f"{r['bf16_of_floor']:.0%} |")
    _table(results["e2e"], ["config", "mode", "ratio", "prefill-512 ms", "vs bf16 (median / best)", "eager tok/s",
                            "vs bf16 (median / best)", "graph tok/s", "vs bf16", "model GiB", "peak GiB",
                            "tokens = bf16"],
           lambda r: f"{r.get('ratio', 1.0):.3f} | {r['prefill512_ms']:.1f} | {r.get('prefill_vs_bf16', 1.0):.2f}x / "
                     f"{r.get('prefill_vs_bf16_best', 1.0):.2f}x | {r['eager_tok_s']:.1f} | "
                     f"{r.get('eager_vs_bf16', 1.0):.2f}x / {r.get('eager_vs_bf16_best', 1.0):.2f}x | "
                     f"{r['graph_tok_s']:.1f} | "
                     f"{r.get('graph_vs_bf16', 1.0):.2f}x | {r['resident_gib']:.2f} | {r['peak_gib']:.2f} | "
                     f"{r.get('tokens_equal_bf16', '-')}")
    _table(results["overlap"], ["config", "mode", "bf16 graph tok/s", "prefetch tok/s", "no prefetch tok/s",
                                "prefetch vs bf16", "tokens"],
           lambda r: f"{r['bf16_graph_tok_s']:.1f} | {' / '.join(f'{v:.1f}' for v in r['prefetch_tok_s'])} | "
                     f"{r['no_prefetch_tok_s'][0]:.1f} | {max(r['prefetch_tok_s']) / r['bf16_graph_tok_s']:.3f}x | "
                     f"{r['tokens'][:4]}")
    _table(results["block"], ["config", "what", "blocks", "bf16 us", "INT8 us", "INT8 vs bf16", "INT8 read floor us",
                              "floor / INT8"],
           lambda r: f"{r['blocks']} | {r['bf16_us']:.1f} | {r['int8_us']:.1f} | {r['int8_vs_bf16']:.2f}x | "
                     f"{r['read_floor_us']:.1f} | {r['int8_of_floor']:.0%}")
    _table(results["compiled"], ["config", "mode (compiled step, CUDA graph)", "compile s", "graph tok/s", "vs bf16",
                                 "tokens = bf16"],
           lambda r: f"{r['compile_s']:.1f} | {r['graph_tok_s']:.1f} | {r.get('graph_vs_bf16', 1.0):.2f}x | "
                     f"{r.get('tokens_equal_bf16', '-')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
