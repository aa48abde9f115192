"""Does a high-priority side stream let the next block's decode overlap this block's compute?

The block-decoded modes (lossless, int8+entropy) decode block i + 1 on a side stream while block i computes. In a
512-token prefill the compute is cuBLAS GEMMs that fill every SM, and the decode's kernels wait for SMs to free up
(the fifteenth session's traces: 2.4 of 12.5 ms of a 7B int8+entropy prefill's side-stream work overlapped). This
script measures prefill-512 and eager generate with the side stream at the default priority (0) and at the highest
(``--priority``, default -1) in alternating rounds, bf16 in the same rounds, and graph decode once per priority.

Usage: python benchmarks/side_priority.py [--configs llama7b,tinyllama] [--modes int8+entropy,lossless] [--json PATH]
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

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_torch import _build, _graph_tok_s, gpu_ms


def _set_priority(models, priority):
    from cupycodec.integrations.torch import runtime

    runtime.SIDE_PRIORITY = priority
    for model in models.values():
        rts = getattr(model, "_cupycodec_runtime", None)
        if rts:
            rts[0].release(torch.device("cuda", torch.cuda.current_device()))  # a new side stream at the next use


def run(configs, modes, priority, rounds, tokens):
    from cupycodec.integrations.torch import compress_model

    rows = []
    for config in configs:
        base = _build(config)
        models = {"bf16": base}
        for mode in modes:
            models[mode] = copy.deepcopy(base)
            compress_model(models[mode], mode, progress=False)
        long = torch.randint(0, 32000, (1, 512), device="cuda")
        prompt = torch.randint(0, 32000, (1, 16), device="cuda")
        prefill = {(m, p): [] for m in models for p in (0, priority)}
        eager = {(m, p): [] for m in models for p in (0, priority)}
        with torch.no_grad():
            for r in range(rounds):
                for p in ((0, priority) if r % 2 == 0 else (priority, 0)):
                    _set_priority(models, p)
                    for mode, model in models.items():
                        ms = gpu_ms(lambda m=model, ids=long: m(ids, use_cache=False), reps=5, warmup=2)
                        prefill[mode, p].append(ms)
                        model.generate(prompt, max_new_tokens=2, do_sample=False)
                        torch.cuda.synchronize()
                        t = time.perf_counter()
                        model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
                        torch.cuda.synchronize()
                        eager[mode, p].append(tokens / (time.perf_counter() - t))
            graph = {}
            for p in (0, priority):
                _set_priority(models, p)
                for mode, model in models.items():
                    if mode != "bf16" or p == 0:
                        graph[mode, p] = _graph_tok_s(model, prompt, 64)[0]
        bf16_ms = statistics.median(prefill["bf16", 0][1:] + prefill["bf16", priority][1:])
        for mode in models:
            for p in (0, priority):
                row = {"config": config, "mode": mode, "priority": p,
                       "prefill_ms": statistics.median(prefill[mode, p][1:]), "prefill_rounds": prefill[mode, p],
                       "prefill_vs_bf16": statistics.median(prefill[mode, p][1:]) / bf16_ms,
                       "eager_tok_s": statistics.median(eager[mode, p][1:]), "eager_rounds": eager[mode, p],
                       "graph_tok_s": graph.get((mode, p), graph.get((mode, 0)))}
                rows.append(row)
                print(json.dumps(row), flush=True)
        del models, base
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="llama7b,tinyllama")
    ap.add_argument("--modes", default="int8+entropy,lossless")
    ap.add_argument("--priority", type=int, default=-1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    s = torch.cuda.Stream(priority=args.priority)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "priority_asked": args.priority, "priority_got": s.priority}
    print(json.dumps(meta), flush=True)
    rows = run(args.configs.split(","), args.modes.split(","), args.priority, args.rounds, args.tokens)
    print("\n| config | mode | priority | prefill-512 ms | vs bf16 | eager tok/s | graph tok/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['config']} | {r['mode']} | {r['priority']} | {r['prefill_ms']:.2f} | {r['prefill_vs_bf16']:.2f}x"
              f" | {r['eager_tok_s']:.1f} | {r['graph_tok_s']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
