"""Where the host time of a compressed model's forward goes (GPU): per-layer host cost, and a profile of prefill.

Eager forwards on a slow host are bound by Python and launch cost, not by the GPU; this script measures that cost.

1. Host microseconds per call of one layer at batch 1 (5632x2048, TinyLlama's MLP shape), calls enqueued back to back
   with one synchronization at the end: ``nn.Linear`` (bf16), ``CompressedLinear`` int8 (what the forward runs), the
   same through the custom op's dispatch (``ops.int8_linear``), and a lossless layer (its views of the decoded block).
2. Host microseconds per kernel launch: CuPy's ``RawKernel`` call (stream passed to it) against
   :func:`cupycodec._cuda.launch` (``cuLaunchKernel`` through CuPy's driver binding, reused argument slots), and
   one ``with launching_on(...)`` (what a plan's ``run`` enters).
3. Per mode, on a random-weight TinyLlama shape: ``torch.profiler`` over one prefill of 512 tokens (top entries by
   self CPU time, and the wall time without the profiler), and ``cProfile`` over ten one-token forwards (the Python
   functions with the most own time).
4. Per mode, the same shape: eager ``generate`` of 32 tokens (what bench_torch's eager rows time), milliseconds per
   token over rounds that take the modes in turn, then ``cProfile`` of one generate per mode. generate waits for
   the GPU once a token (its stopping check), so GPU work that the host's pace does not hide shows here, as time
   in that wait, and not in the forward-only figures of 3.
5. Per mode, the same shape: one-token steps with a DynamicCache, as generate runs them, in rounds that take the
   modes in turn. "paced": each step waits for the GPU (as generate's stopping check makes it), host = the time until
   the forward returns, wall = until the GPU is done. "free": 16 steps back to back (the next token chosen on the
   GPU) and one wait: host = enqueueing the 16, wall = all done. Where host ~ wall the mode is bound by the host;
   where wall > host, by the GPU (or by a wait inside the forward, which would show as host ~ wall in "paced" with
   a large host figure). Modes take flags: "lossless-run" (decodes not replayed from graphs), "-cold" (no hot
   views), "-inline" (one slot, no prefetch), "-nogc" (the garbage collector off during its rounds).
6. "enter": host microseconds of a block's start alone on the same shape (Runtime.enter over every block in turn:
   its decode, the next block's prefetch, events), with each plan's run replayed from a CUDA graph
   (runtime.GRAPH_DECODES, the default) and run directly; and of one plan's run against its replay.

8. "split": per mode, where a one-token step's host time goes, measured inside the step (not in a loop of its
   own): the time in block starts (``Runtime.enter``), in the Linear layers' forwards (``nn.Linear`` or
   ``CompressedLinear``), and the rest (transformers' own code), by timers wrapped around those methods, with the
   modes' rounds alternating. Whether the compressed modes' extra time is in our code or in the rest. Ablation
   flags (timing only: the weights are then not decoded, the tokens are wrong): "-nodecode", a block's decode
   launches nothing (``DecodePlan.replay`` a no-op); "-emptygraph", it launches a graph of one 4-byte memset
   instead. Before the rounds, one step per mode runs under ``torch.cuda.set_sync_debug_mode("warn")``, and the
   number of synchronizing calls it warns of is printed.

7. "api": per mode, host microseconds per CUDA API call (cudaLaunchKernel, cudaGraphLaunch, ...) and per torch op
   in one-token steps under torch.profiler, the modes' rounds alternating: where a compressed model's eager step
   spends the host time bf16's does not.

Usage: python benchmarks/profile_forward.py [--modes bf16,int8,lossless] [--calls 2000] [--top 15]
       [--sections layer,launch,prefill,generate,step,enter,api,split]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch


def tinyllama():
    """A random-weight TinyLlama-1.1B-shaped model in bf16 on the GPU (seed 0), as every section here profiles."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                   num_attention_heads=32, num_key_value_heads=4)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def host_us(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e6


def per_layer(calls: int) -> None:
    from cupycodec.integrations.torch import CompressedLinear, ops

    lin = torch.nn.Linear(2048, 5632, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    q = CompressedLinear.from_linear(lin, "int8")
    ll = CompressedLinear.from_linear(lin, "lossless")
    with torch.no_grad():
        ll(x)  # decodes its group once; later calls use the resident slot
        rows = {
            "nn.Linear bf16": lambda: lin(x),
            "CompressedLinear int8": lambda: q(x),
            "ops.int8_linear (custom-op dispatch)": lambda: ops.int8_linear(x, q.qweight, q.scale, None, "channel",
                                                                           128),
            "CompressedLinear lossless (resident)": lambda: ll(x),
            "empty launch: torch.empty(1)": lambda: torch.empty(1, device="cuda"),
        }
        for name, fn in rows.items():
            print(f"{name:45s} {host_us(fn, calls):8.1f} us/call", flush=True)
        # what the input checks (width, device) add to an INT8 forward: the layer with and without them, in turn
        check, skip = ops._check_input, lambda x, q: None
        times: dict[str, list[float]] = {"with checks": [], "checks skipped": []}
        for _ in range(7):
            for name, fn in (("with checks", check), ("checks skipped", skip)):
                ops._check_input = fn
                try:
                    times[name].append(host_us(lambda: q(x), calls))
                finally:
                    ops._check_input = check
        for name, ts in times.items():
            print(f"{'CompressedLinear int8, ' + name:45s} {statistics.median(ts):8.2f} us/call (median of 7; "
                  f"{min(ts):.2f}-{max(ts):.2f})", flush=True)


def launches(calls: int) -> None:
    from cupycodec._cuda import _Handle, launch, launching_on
    from cupycodec.kernels import gemv

    dev = torch.cuda.current_device()
    sp = torch.cuda.current_stream().cuda_stream
    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    q = torch.zeros(64, 256, device="cuda", dtype=torch.int8)
    s = torch.ones(64, device="cuda")
    y = torch.empty(1, 64, device="cuda", dtype=torch.bfloat16)
    handle, grid, threads, tail = gemv._config(dev, "BF16", 1, 256, 64, "channel", None, None, None)
    args = (x.data_ptr(), 256, q.data_ptr(), s.data_ptr(), 0, y.data_ptr(), *tail)
    w, u = gemv.mma_shape(64, 256, gemv._sm_count(dev))
    raw = gemv._function(dev, "mma", "BF16", 8, w, False, u)

    def contexts():
        with launching_on(dev, sp):
            pass

    rows = {
        "CuPy RawKernel call, stream=": lambda: raw((grid,), (threads,), args, stream=_Handle(sp)),
        "cupycodec._cuda.launch": lambda: launch(handle, grid, threads, args, dev, sp),
        "with launching_on(device, stream): pass": contexts,
    }
    for name, f in rows.items():
        print(f"{name:45s} {host_us(f, calls):8.1f} us/call", flush=True)


def prefill_profile(modes, top: int) -> None:
    import cProfile
    import io
    import pstats

    from cupycodec.integrations.torch import compress_model

    base = tinyllama()
    ids = torch.randint(0, 32000, (1, 512), device="cuda")
    for mode in modes:
        model = base if mode == "bf16" else copy.deepcopy(base)
        if mode != "bf16":
            compress_model(model, mode, progress=False)
        with torch.no_grad():
            for _ in range(3):
                model(ids, use_cache=False)
            torch.cuda.synchronize()
            t = time.perf_counter()
            model(ids, use_cache=False)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t) * 1e3
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                model(ids, use_cache=False)
                torch.cuda.synchronize()
        print(f"\n=== prefill-512 TinyLlama shape, {mode}: {wall:.1f} ms wall without the profiler", flush=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top), flush=True)
        one = ids[:, :1]
        with torch.no_grad():
            for _ in range(3):
                model(one, use_cache=False)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(10):
                model(one, use_cache=False)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t) * 1e2
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(10):
                model(one, use_cache=False)
            torch.cuda.synchronize()
            pr.disable()
        out = io.StringIO()
        pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(top + 10)
        print(f"\n=== one-token forward, TinyLlama shape, {mode}: {wall:.2f} ms wall per forward; cProfile of ten:")
        print(out.getvalue()[-6000:], flush=True)
        if mode != "bf16":
            del model


def generate_profile(modes, top: int, rounds: int = 4, tokens: int = 32) -> None:
    import cProfile
    import io
    import pstats
    import statistics

    base = tinyllama()
    base.generation_config.eos_token_id = None
    prompt = torch.randint(0, 32000, (1, 16), device="cuda")
    models = compressed_copies(base, modes)
    gen = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    times = {m: [] for m in models}
    with torch.no_grad():
        for _ in range(rounds):
            for mode, model in models.items():
                model.generate(prompt, max_new_tokens=2, do_sample=False)
                torch.cuda.synchronize()
                t = time.perf_counter()
                model.generate(prompt, **gen)
                torch.cuda.synchronize()
                times[mode].append((time.perf_counter() - t) * 1e3 / tokens)
        print("\n=== eager generate, TinyLlama shape, ms per token (rounds; median of all but the first):", flush=True)
        for mode, ts in times.items():
            print(f"{mode:14s} {statistics.median(ts[1:]):7.2f}   {' '.join(f'{v:.2f}' for v in ts)}", flush=True)
        for mode, model in models.items():
            pr = cProfile.Profile()
            pr.enable()
            model.generate(prompt, **gen)
            torch.cuda.synchronize()
            pr.disable()
            out = io.StringIO()
            pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(top)
            print(f"\n=== eager generate of {tokens} tokens, TinyLlama shape, {mode}: cProfile", flush=True)
            print(out.getvalue()[-5000:], flush=True)


def step_profile(modes, rounds: int = 9, steps: int = 16) -> None:
    import gc
    import statistics

    import transformers

    base = tinyllama()
    prompt = torch.randint(0, 32000, (1, 16), device="cuda")
    from cupycodec.integrations.torch import runtime

    # MODE with flags: "-run", its block decodes run directly, not replayed from CUDA graphs (runtime.GRAPH_DECODES);
    # "-cold", its layers ask the runtime for their views on every call (runtime.HOT_VIEWS); "-inline", one slot
    # and no prefetch (see compressed_copies); "-nogc", Python's garbage collector off during its rounds
    models = compressed_copies(base, modes)
    rows = {m: {"paced host": [], "paced wall": [], "free host": [], "free wall": []} for m in models}

    def fresh(model):
        cache = transformers.DynamicCache(config=model.config)
        logits = model(prompt, past_key_values=cache, use_cache=True).logits
        torch.cuda.synchronize()
        return cache, logits[:, -1:].argmax(-1)

    with torch.no_grad():
        for model in models.values():  # warm-up: plans, slots, kernels
            cache, tok = fresh(model)
            for _ in range(4):
                tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
        for _ in range(rounds):
            for mode, model in models.items():
                runtime.GRAPH_DECODES = "-run" not in mode
                runtime.HOT_VIEWS = "-cold" not in mode
                if "-nogc" in mode:
                    gc.collect()
                    gc.disable()
                r = rows[mode]
                cache, tok = fresh(model)
                host, wall = [], []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                    t1 = time.perf_counter()
                    torch.cuda.synchronize()
                    host.append(t1 - t0)
                    wall.append(time.perf_counter() - t0)
                r["paced host"].append(statistics.median(host) * 1e3)
                r["paced wall"].append(statistics.median(wall) * 1e3)
                cache, tok = fresh(model)
                t0 = time.perf_counter()
                for _ in range(steps):
                    tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                t1 = time.perf_counter()
                torch.cuda.synchronize()
                r["free host"].append((t1 - t0) / steps * 1e3)
                r["free wall"].append((time.perf_counter() - t0) / steps * 1e3)
                gc.enable()
        runtime.GRAPH_DECODES = runtime.HOT_VIEWS = True
    print(f"\n=== one-token steps, TinyLlama shape, ms per step (median over {rounds} rounds of {steps} steps; "
          "min in brackets)", flush=True)
    print(f"{'mode':14s} " + " ".join(f"{k:>17s}" for k in next(iter(rows.values()))), flush=True)
    for mode, r in rows.items():
        print(f"{mode:14s} " + " ".join(f"{statistics.median(v):8.2f} [{min(v):6.2f}]" for v in r.values()),
              flush=True)


API_KEYS = ("cudaLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch", "cudaEventRecord", "cudaStreamWaitEvent",
            "aten::linear", "aten::mm", "aten::mul", "aten::to", "aten::empty")


def api_profile(modes, rounds: int = 7, steps: int = 4) -> None:
    """Host time per CUDA API call and per torch op in one-token steps, the modes' rounds alternating (so that the
    host's drift falls on every mode alike): torch.profiler (CPU and CUDA activities) over ``steps`` steps a round;
    per mode and key, the calls per step and the median over rounds of the mean host microseconds per call."""
    import statistics

    import transformers

    base = tinyllama()
    prompt = torch.randint(0, 32000, (1, 16), device="cuda")
    models = compressed_copies(base, modes)
    per = {m: {k: [] for k in API_KEYS} for m in models}
    counts = {m: {} for m in models}
    step_ms = {m: [] for m in models}
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.no_grad():
        for r in range(rounds + 1):  # round 0 warms up (plans, slots, the profiler itself)
            for mode, model in models.items():
                cache = transformers.DynamicCache(config=model.config)
                tok = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                with torch.profiler.profile(activities=activities) as prof:
                    t = time.perf_counter()
                    for _ in range(steps):
                        tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                    torch.cuda.synchronize()
                    took = (time.perf_counter() - t) * 1e3 / steps
                if r == 0:
                    continue
                step_ms[mode].append(took)
                for e in prof.key_averages():
                    if e.key in API_KEYS and e.count:
                        per[mode][e.key].append(e.cpu_time_total / e.count)
                        counts[mode][e.key] = e.count / steps
    print(f"\n=== CUDA API calls and torch ops in one-token steps, TinyLlama shape: host us per call (median over "
          f"{rounds} alternating rounds of {steps} profiled steps), calls per step", flush=True)
    print(f"{'key':22s} " + " ".join(f"{m:>22s}" for m in models), flush=True)
    for key in API_KEYS:
        cells = []
        for mode in models:
            v = per[mode][key]
            cells.append(f"{statistics.median(v):9.2f} x {counts[mode].get(key, 0):7.1f}" if v else f"{'-':>22s}")
        print(f"{key:22s} " + " ".join(f"{c:>22s}" for c in cells), flush=True)
    print(f"{'step ms (profiled)':22s} " + " ".join(f"{statistics.median(step_ms[m]):22.2f}" for m in models),
          flush=True)


def split_profile(modes, rounds: int = 9, steps: int = 16) -> None:
    """Host ms per one-token step spent in block starts, in Linear forwards and elsewhere (see the module doc, 8):
    class-level timers around ``Runtime.enter``, ``nn.Linear.forward`` and ``CompressedLinear.forward``, the same
    wrapper for each (its own cost, about a microsecond a call, falls on every mode per call it wraps)."""
    import statistics
    import warnings

    import cupy
    import transformers

    from cupycodec.engine import decode
    from cupycodec.integrations.torch import CompressedLinear, runtime

    base = tinyllama()
    prompt = torch.randint(0, 32000, (1, 16), device="cuda")
    models = compressed_copies(base, modes)
    replay = decode.DecodePlan.replay
    scratch = torch.zeros(1, dtype=torch.int32, device="cuda")
    rt, s = cupy.cuda.runtime, cupy.cuda.Stream(non_blocking=True)
    rt.streamBeginCapture(s.ptr, rt.streamCaptureModeThreadLocal)
    rt.memsetAsync(scratch.data_ptr(), 0, 4, s.ptr)
    tiny = rt.graphInstantiate(rt.streamEndCapture(s.ptr))  # launched as DecodePlan.replay launches its graph
    variants = {"-nodecode": lambda plan, stream=None: None,
                "-emptygraph": lambda plan, stream=None: rt.graphLaunch(tiny, stream)}

    def variant(mode):
        decode.DecodePlan.replay = next((f for flag, f in variants.items() if flag in mode), replay)

    with torch.no_grad():
        for mode, model in models.items():
            variant(mode)
            cache = transformers.DynamicCache(config=model.config)
            tok = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    model(tok, past_key_values=cache, use_cache=True)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs = [str(w.message).splitlines()[0][:100] for w in seen if "synchroniz" in str(w.message)]
            print(f"{mode}: {len(syncs)} synchronizing call(s) in one step {sorted(set(syncs))[:3]}", flush=True)
    # self time (own time, children's excluded) per bucket, over a stack of the wrapped calls in flight
    block0 = base.model.layers[0]
    buckets = [(runtime.Runtime, "enter", "enter"), (torch.nn.Linear, "forward", "linear"),
               (CompressedLinear, "forward", "linear"), (type(block0.self_attn), "forward", "attention"),
               (type(block0.mlp), "forward", "mlp"), (type(block0.input_layernorm), "forward", "norm"),
               (type(block0), "forward", "block"), (type(block0), "__call__", "block call+hooks"),
               (type(base.model), "forward", "model")]
    keys = list(dict.fromkeys(k for _, _, k in buckets))
    own = dict.fromkeys(keys, 0.0)
    calls = dict.fromkeys(keys, 0)
    stack = []
    originals = [cls.__dict__.get(name) for cls, name, _ in buckets]

    def timed(fn, key):
        def wrapper(*a, **k):
            stack.append(0.0)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                took = time.perf_counter() - t
                own[key] += took - stack.pop()
                calls[key] += 1
                if stack:
                    stack[-1] += took
        return wrapper

    for cls, name, key in buckets:
        setattr(cls, name, timed(getattr(cls, name), key))
    cols = ["step", *keys, "rest"]
    rows = {m: {c: [] for c in cols} for m in models}
    counts = {}
    try:
        with torch.no_grad():
            for r in range(rounds + 1):  # round 0 warms up
                for mode, model in models.items():
                    variant(mode)
                    cache = transformers.DynamicCache(config=model.config)
                    tok = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                    torch.cuda.synchronize()
                    step, got = [], []
                    for _ in range(steps):
                        for k in keys:
                            own[k], calls[k] = 0.0, 0
                        t = time.perf_counter()
                        tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                        step.append(time.perf_counter() - t)
                        torch.cuda.synchronize()  # paced, as generate's stopping check paces it
                        got.append(dict(own))
                    counts[mode] = dict(calls)
                    if r == 0:
                        continue
                    i = sorted(range(steps), key=step.__getitem__)[steps // 2]  # the median step, and its parts
                    row = rows[mode]
                    row["step"].append(step[i] * 1e3)
                    for k in keys:
                        row[k].append(got[i][k] * 1e3)
                    row["rest"].append((step[i] - sum(got[i].values())) * 1e3)
    finally:
        for (cls, name, _), fn in zip(buckets, originals):
            if fn is None:
                delattr(cls, name)
            else:
                setattr(cls, name, fn)
        decode.DecodePlan.replay = replay
    print(f"\n=== one-token steps, TinyLlama shape, where the host time goes: own ms per step in each part (median "
          f"over {rounds} alternating rounds of each round's median step), calls per step; 'rest': outside them all "
          "(LlamaForCausalLM's own forward, the logits' argmax)", flush=True)
    print(f"{'mode':22s} " + " ".join(f"{c[:10]:>10s}" for c in cols), flush=True)
    for mode, r in rows.items():
        print(f"{mode:22s} " + " ".join(f"{statistics.median(r[c]):10.3f}" for c in cols), flush=True)
    print(f"{'calls per step':22s} {'':10s} " + " ".join(f"{counts[next(iter(models))][k]:10d}" for k in keys)
          + "   (first mode; per mode: " + ", ".join(f"{m} {counts[m]['enter']} enters" for m in models) + ")",
          flush=True)


def compressed_copies(base, modes) -> dict:
    """``mode -> model``: ``base`` itself for bf16, else a copy compressed in the mode before any flag ("lossless"
    for "lossless-run"); flag "-inline" gives it one slot and no prefetch (every block decodes on torch's stream when
    it starts)."""
    from cupycodec.integrations.torch import compress_model

    models = {}
    for mode in modes:
        kind = mode.split("-")[0]
        models[mode] = base if kind == "bf16" else copy.deepcopy(base)
        if kind != "bf16":
            compress_model(models[mode], kind, progress=False)
            models[mode]._cupycodec_runtime[0].prefetch = "-inline" not in mode
    return models


def host_only_us(fn, calls: int, reps: int = 9) -> float:
    """Host microseconds per call of ``fn`` up to its return (the GPU's work not waited for: a few calls at a time,
    fewer than fill CUDA's launch queue), median of ``reps`` batches."""
    import statistics

    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(out)


def enter_profile(modes, cycles: int = 4) -> None:
    import cProfile
    import io
    import pstats

    from cupycodec.integrations.torch import compress_model, runtime

    base = tinyllama()
    dev = torch.device("cuda", torch.cuda.current_device())
    sp = torch.cuda.current_stream().cuda_stream
    print("\n=== block starts, TinyLlama shape: host us per Runtime.enter (all 22 blocks in turn), per plan call",
          flush=True)
    for mode in [m for m in modes if m in ("lossless", "int8+entropy")]:
        model = copy.deepcopy(base)
        compress_model(model, mode, progress=False)
        rt = model._cupycodec_runtime[0]
        with torch.no_grad():
            model(torch.randint(0, 32000, (1, 4), device="cuda"))
        torch.cuda.synchronize()
        for graphs in (True, False, True, False):
            runtime.GRAPH_DECODES = graphs

            def cycle(rt=rt):
                for gi in range(len(rt.groups)):
                    rt.enter(gi, dev)

            us = host_only_us(cycle, cycles) / len(rt.groups)
            print(f"{mode:14s} enter, graph decodes {graphs!s:5s} {us:8.1f} us", flush=True)
        runtime.GRAPH_DECODES = True
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(8):  # (a few hundred launches: within CUDA's queue, so no launch waits)
            cycle()
        pr.disable()
        torch.cuda.synchronize()
        out = io.StringIO()
        pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(14)
        print(f"{mode}: cProfile of 8 x {len(rt.groups)} enters (graph decodes)\n{out.getvalue()[-3500:]}",
              flush=True)
        plan = next(iter(rt.groups[3]._plans.values()))
        print(f"{mode:14s} plan.run    {host_only_us(lambda p=plan: p.run(sp), 50):8.1f} us", flush=True)
        print(f"{mode:14s} plan.replay {host_only_us(lambda p=plan: p.replay(sp), 50):8.1f} us", flush=True)
        rt.check()
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--modes", default="bf16,int8,lossless")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--sections", default="layer,launch,prefill")
    args = p.parse_args(argv)
    sections = args.sections.split(",")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    if "layer" in sections:
        per_layer(args.calls)
    if "launch" in sections:
        launches(args.calls)
    if "prefill" in sections:
        prefill_profile(args.modes.split(","), args.top)
    if "generate" in sections:
        generate_profile(args.modes.split(","), args.top)
    if "step" in sections:
        step_profile(args.modes.split(","))
    if "enter" in sections:
        enter_profile(args.modes.split(","))
    if "api" in sections:
        api_profile(args.modes.split(","))
    if "split" in sections:
        split_profile(args.modes.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
