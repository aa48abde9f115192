"""Where a decode step captured in a CUDA graph spends its GPU time, stream by stream (issue 9's graph target).

For each mode, one decode step of a random-weight model (bench_torch's TinyLlama-1.1B or Llama-2-7B shape, static
KV cache) is captured in a CUDA graph as bench_torch's graph rows capture it, replayed, and traced with
torch.profiler (CUPTI records each kernel a replay runs, with its stream). Per step, from the kernels:

  * the step's GPU span, and per stream the time it was busy (the union of its kernels) and its kernel count;
  * how long both streams were busy at once (the next block's decode overlapping this block's compute), and how
    long the compute stream sat idle inside the step (waiting for a decode, or for launches);
  * the kernels that took the most time, per stream, with their mean duration.

Modes: bf16, lossless, int8+entropy, int8, and ``MODE-noprefetch`` (one slot: every block decoded on the compute
stream when it starts, so its decode kernels run alone), ``MODE-cNk`` (the payloads in N KiB ANS chunks instead of
the codec's default; nvCOMP decodes chunks in parallel thread blocks, so the chunk size may set how long a decode
holds an SM), ``MODE-nowide`` (a large batch's INT8 layers each dequantize into ops' scratch before cuBLAS, instead
of one dequantization of the whole block at its start: ``runtime.WIDE``), ``MODE-prio`` (the side stream that
decodes the next block at priority -1, above the compute's: ``runtime.SIDE_PRIORITY``; a graph replay runs at its
launching stream's priority, so this matters for ``--prefill``'s eager forwards). Comparing a decode kernel's time alone
and beside the compute, and the compute stream's busy time against bf16's, says whether the two contend or wait for
each other.

``--prefill N`` traces eager forwards of an N-token prompt (no cache) instead of a graph replay: where a prefill's
time goes (the INT8 modes dequantize weights before cuBLAS: how long is that next to the GEMMs?).

Usage: python benchmarks/trace_graph.py [--config tinyllama] [--modes bf16,lossless,...] [--replays 8]
       [--prefill N] [--trace-dir DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import gc
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_torch import _build, _rewind, capture_step


def capture(model, prompt):
    """One decode step of ``model`` captured in a CUDA graph after a prefill, as bench_torch's graph rows do it."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + 64)  # replays write at its counter
    g = capture_step(model, prompt, cache)[0]
    return g, cache


def kernels(trace_path: str) -> list[tuple[float, float, int, str]]:
    """(start us, end us, stream, name) of every GPU kernel in a chrome trace, by start."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    out = [(e["ts"], e["ts"] + e["dur"], e["args"].get("stream", -1), e["name"])
           for e in events if e.get("cat") == "kernel" and "dur" in e]
    return sorted(out)


def _union(intervals) -> list[tuple[float, float]]:
    merged = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _intersect(x, y) -> float:
    i = j = 0
    total = 0.0
    while i < len(x) and j < len(y):
        lo, hi = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        total += max(0.0, hi - lo)
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def summarize(ks, replays: int, main_stream: int | None = None) -> dict:
    """Per-step figures over ``replays`` replays' kernels ``ks`` (see the module's docstring)."""
    by_stream = collections.defaultdict(list)
    for k in ks:
        by_stream[k[2]].append(k)
    # the compute stream: the one with the most kernels (the decodes are a few large kernels per block)
    main = main_stream if main_stream is not None else max(by_stream, key=lambda s: len(by_stream[s]))
    busy = {s: _union((a, b) for a, b, _, _ in v) for s, v in by_stream.items()}
    span = max(k[1] for k in ks) - ks[0][0]
    others = _union(iv for s, v in busy.items() if s != main for iv in v)
    main_busy = _length(busy[main])
    row = {
        "step_span_us": span / replays,
        "streams": {str(s): {"kernels": len(v) / replays, "busy_us": _length(busy[s]) / replays,
                             "kernel_sum_us": sum(b - a for a, b, _, _ in v) / replays}
                    for s, v in by_stream.items()},
        "main_stream": main,
        "main_busy_us": main_busy / replays,
        "main_idle_us": (span - main_busy) / replays,  # includes the gaps between replays (host launches)
        "other_busy_us": _length(others) / replays,
        "overlap_us": _intersect(busy[main], others) / replays,
    }
    top = {}
    for s, v in by_stream.items():
        agg = collections.defaultdict(lambda: [0, 0.0])
        for a, b, _, name in v:
            agg[name][0] += 1
            agg[name][1] += b - a
        best = sorted(agg.items(), key=lambda kv: -kv[1][1])[:8]
        top[str(s)] = [{"name": n[:90], "per_step": c / replays, "us_per_step": t / replays, "mean_us": t / c}
                       for n, (c, t) in best]
    row["top"] = top
    return row


@contextlib.contextmanager
def _ans_chunk(nbytes: int | None):
    """ANS payloads compressed in ``nbytes`` chunks (None: the codec's default) while the block is open."""
    from cupycodec.codecs.gpu_only import ANS

    default = ANS.default_chunk
    if nbytes is not None:
        ANS.default_chunk = lambda self: nbytes
    try:
        yield
    finally:
        ANS.default_chunk = default


def _stepper(model, prompt, prefill: bool):
    """``replay(n)``: ``n`` eager forwards of the whole ``prompt`` with no cache (a prefill), or ``n`` replays of one
    decode step captured in a CUDA graph from the cache's position after ``prompt`` (each replay advances
    transformers' counter, so every call rewinds it first)."""
    if prefill:
        def replay(n):
            for _ in range(n):
                model(prompt, use_cache=False)
        return replay
    g, cache = capture(model, prompt)
    length = prompt.shape[1]

    def replay(n):
        _rewind(cache, length)
        for _ in range(n):
            g.replay()
    return replay


def run(config: str, modes: list[str], replays: int, trace_dir: str, prefill: int = 0) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    from cupycodec.integrations.torch import compress_model

    prompt = torch.randint(0, 32000, (1, prefill or 16), device="cuda")
    base = _build(config)
    rows = []
    for mode in modes:
        kind, *flags = mode.split("-")
        row = {"config": config, "mode": mode}
        try:
            model = base if kind == "bf16" else copy.deepcopy(base)
            if kind != "bf16":
                chunk = next((int(f[1:-1]) * 1024 for f in flags if f[:1] == "c" and f[-1:] == "k"), None)
                with _ans_chunk(chunk):
                    row["ratio"] = compress_model(model, kind, progress=False).ratio
            from cupycodec.integrations.torch import runtime

            runtime.WIDE = "nowide" not in flags  # "-nowide": each INT8 layer of a large batch dequantizes alone
            runtime.SIDE_PRIORITY = -1 if "prio" in flags else 0  # "-prio": the side stream at a high priority
            if "noprefetch" in flags:
                rt = model._cupycodec_runtime[0]
                rt.prefetch = False
                rt._devices.clear()  # slots made again: one without prefetch
            with torch.no_grad():
                replay = _stepper(model, prompt, bool(prefill))
                replay(3 if prefill else 5)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    replay(replays)
                    torch.cuda.synchronize()
            path = os.path.join(trace_dir, f"trace-{config}-{mode}{f'-p{prefill}' if prefill else ''}.json")
            prof.export_chrome_trace(path)
            ks = kernels(path)
            if not ks:
                raise RuntimeError("the trace holds no kernels (CUPTI saw no graph kernels?)")
            row.update(summarize(ks, replays))
            # wall time per replay (or eager prefill), outside the profiler
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            n = 10 if prefill else 40
            with torch.no_grad():
                start.record()
                replay(n)
                end.record()
            torch.cuda.synchronize()
            row["replay_ms"] = start.elapsed_time(end) / n
            del replay
        except Exception as exc:  # keep going: one mode's failure must not hide the others
            row["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            if kind != "bf16":
                model = None
            gc.collect()
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "top"}), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tinyllama")
    p.add_argument("--modes", default="bf16,lossless,lossless-noprefetch,int8+entropy,int8+entropy-noprefetch,int8")
    p.add_argument("--replays", type=int, default=8)
    p.add_argument("--prefill", type=int, default=0, help="trace eager forwards of a prompt this long instead")
    p.add_argument("--trace-dir", help="keep the chrome traces here (default: a temporary directory)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        trace_dir = args.trace_dir or tmp
        os.makedirs(trace_dir, exist_ok=True)
        rows = run(args.config, args.modes.split(","), args.replays, trace_dir, args.prefill)
    what = f"eager prefill of {args.prefill} tokens" if args.prefill else "graph replays"
    print(f"\n{torch.cuda.get_device_name()}, {args.config}, {args.replays} {what} traced; us per step")
    print("| mode | ratio | replay ms | span | compute busy | compute idle | other streams busy | overlap |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | error: {r['error'][:80]} |")
            continue
        print(f"| {r['mode']} | {r.get('ratio', 1.0):.3f} | {r['replay_ms']:.3f} | {r['step_span_us']:.0f} | "
              f"{r['main_busy_us']:.0f} | "
              f"{r['main_idle_us']:.0f} | {r['other_busy_us']:.0f} | {r['overlap_us']:.0f} |")
    for r in rows:
        for s, top in r.get("top", {}).items():
            print(f"\n{r['mode']}, stream {s}{' (compute)' if int(s) == r['main_stream'] else ''}:")
            for t in top:
                print(f"  {t['us_per_step']:8.1f} us/step {t['per_step']:6.1f}x {t['mean_us']:7.2f} us  {t['name']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
