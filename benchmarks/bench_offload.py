"""Host offload on a GPU whose memory the bf16 model does not fit, beside accelerate's bf16 CPU offload, same run.

A random-weight Llama-2-7B shape (or ``--config tinyllama``) is built on the host in bf16. The process's share of
the GPU is capped with ``torch.cuda.set_per_process_memory_fraction`` (``--cap-gib``, default 8 GiB: the bf16
weights, 12.6 GiB, do not fit). For each row: greedy HF ``generate`` (eager) at batch 1 and batch 8, ``--tokens``
new tokens after a 16-token prompt, tokens/s, and the bytes of weights streamed per second (bf16 bytes of the
offloaded blocks times tokens/s) against the measured pinned host-to-device bandwidth times the compression ratio
(issue 12's target: >= 85 %), plus peak device memory as torch counts it.

Rows: accelerate's ``cpu_offload`` of the bf16 model (its hooks copy each weight to the GPU before the layer runs);
ours, ``compress_model`` then ``offload_model`` in lossless, int8 and int8+entropy modes, every block offloaded,
or with ``MODE@half`` the second half only (the mixed placement, through the VRAM budget), or with ``MODE@map``
the second half through a device_map given to ``dispatch_model`` (accelerate places the modules, the first half of
the blocks on cuda:0), or with ``MODE@resident`` none (the all-GPU reference whose tokens the others must equal).
Weights GB/s counts the offloaded blocks' bf16 bytes per step.
DFloat11's ``cpu_offload`` is not run: it needs a DFloat11-format checkpoint, which its Python-loop compressor
cannot make for the 7B shape in reasonable time and which cannot be downloaded there (RESULTS.md, fifth session).

Usage: python benchmarks/bench_offload.py [--config llama7b] [--cap-gib 8] [--tokens 32] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time

import torch

CONFIGS = {
    "tinyllama": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4),
    "llama7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32),
}


def pinned_h2d_gbps(nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    for _ in range(2):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src, non_blocking=True)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    del src, dst
    return nbytes / sorted(times)[2] / 1e6


def build(config: str) -> torch.nn.Module:
    """The random-weight bf16 model on the host, built without transformers' per-parameter init (minutes for 7B on
    the CPU): allocated in bf16 with init skipped, then every Linear and Embedding weight drawn from N(0, 0.02)
    (Llama's ``initializer_range``, what its init draws) on the GPU and copied in, and the norms set to one,
    seeded."""
    import transformers
    from transformers.initialization import no_init_weights

    cfg = transformers.LlamaConfig(**CONFIGS[config])
    with no_init_weights():
        model = transformers.LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)  # drawn on the GPU, one tensor at a time: seconds, where
    with torch.no_grad():                                 # the CPU's normal_ took 200 s for the 7B shape
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                w = torch.empty(module.weight.shape, dtype=module.weight.dtype, device="cuda")
                module.weight.copy_(w.normal_(0.0, cfg.initializer_range, generator=gen))
                del w
            elif "RMSNorm" in type(module).__name__:
                module.weight.fill_(1.0)
    torch.cuda.empty_cache()
    return model.eval()


def tok_s(model, batch: int, tokens: int) -> tuple[float, list]:
    prompt = torch.randint(0, 32000, (batch, 16), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=2, do_sample=False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        torch.cuda.synchronize()
    return batch * tokens / (time.perf_counter() - t), out[0, 16:24].tolist()


def _half_budget(model) -> int:
    """The device budget that keeps the first half of the blocks resident (offload's own accounting)."""
    from cupycodec.integrations.torch import offload

    blocks = offload._blocks(model)
    return offload._device_nbytes(model, blocks, len(blocks) // 2)


def _compare_with_resident(rows: list) -> None:
    """Mark each row whose mode also ran with every block resident: an offloaded row must give its tokens."""
    for r in rows:
        same = next((x for x in rows if x["mode"] == r["mode"].partition("@")[0] + "@resident" and "tokens_b1" in x),
                    None)
        if same is not None and "tokens_b1" in r and r is not same:
            r["tokens_equal_resident"] = r["tokens_b1"] == same["tokens_b1"] and r["tokens_b8"] == same["tokens_b8"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="llama7b", choices=sorted(CONFIGS))
    p.add_argument("--cap-gib", type=float, default=8.0)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--modes", default="lossless,int8,int8+entropy",
                   help="comma-separated MODE (every block offloaded), MODE@half (the second half, by budget), "
                        "MODE@map (the second half, by a device_map through dispatch_model), MODE@resident "
                        "(none; the reference for tokens); accelerate-bf16 runs last unless listed")
    p.add_argument("--json")
    args = p.parse_args(argv)
    import accelerate
    import transformers

    from cupycodec.integrations.torch import compress_model, dispatch_model, offload_model

    total = torch.cuda.get_device_properties(0).total_memory
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
           "accelerate": accelerate.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "pinned_h2d_gbps": pinned_h2d_gbps(), "cap_gib": args.cap_gib, "config": args.config}
    print(json.dumps(env), flush=True)
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total))
    t0 = time.perf_counter()
    base = build(args.config)
    env["build_s"] = time.perf_counter() - t0
    block_bf16 = sum(p.numel() * 2 for layer in base.model.layers for p in layer.parameters())
    n_blocks = len(base.model.layers)
    rows = []
    # ours first unless --modes places accelerate-bf16: its synchronous copies are the slow row, which a time
    # limit should cut short, unless the baseline is what the run is for
    modes = args.modes.split(",")
    for mode in modes if "accelerate-bf16" in modes else [*modes, "accelerate-bf16"]:
        row = {"mode": mode}
        try:
            model = copy.deepcopy(base)
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            if mode == "accelerate-bf16":
                accelerate.cpu_offload(model, execution_device=torch.device("cuda:0"))
                ratio = 1.0
            else:  # MODE (every block offloaded), MODE@resident (none), MODE@half / MODE@map (the second half)
                base_mode, _, place = mode.partition("@")
                report = compress_model(model, base_mode, device="cuda", progress=False)
                ratio = report.ratio
                if place == "map":
                    dm = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 0, "lm_head": 0,
                          **{f"model.layers.{i}": 0 if i < n_blocks // 2 else "cpu" for i in range(n_blocks)}}
                    off = dispatch_model(model, dm)
                else:
                    off = offload_model(model, None if place == "resident" else "cpu", device="cuda",
                                        max_gpu_memory=_half_budget(model) if place == "half" else None)
                row.update(offloaded=len(off.offloaded), pinned=off.pinned,
                           device_gib_estimate=off.device_nbytes / 2**30)
            row["ratio"] = ratio
            for batch in (1, 8):
                rate, toks = tok_s(model, batch, args.tokens)
                row[f"tok_s_b{batch}"] = rate
                row[f"tokens_b{batch}"] = toks
            steps = row["tok_s_b1"]  # one decode step streams every offloaded block's weights once
            streamed = block_bf16 * row.get("offloaded", n_blocks) / n_blocks
            row["weight_gbps_b1"] = steps * streamed / 1e9
            row["of_h2d_x_ratio"] = row["weight_gbps_b1"] / (env["pinned_h2d_gbps"] * ratio)
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        except Exception as exc:  # one row's failure must not hide the others
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
        _compare_with_resident(rows)
        print(json.dumps(row), flush=True)
        if args.json:  # after every row, so that a time limit keeps the rows done
            with open(args.json, "w") as f:
                json.dump({"env": env, "rows": rows}, f, indent=1)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    ref = next((r for r in rows if r["mode"] == "accelerate-bf16" and "tok_s_b1" in r), None)
    print("\n| mode | ratio | tok/s b1 | tok/s b8 | vs accelerate b1 | weights GB/s b1 | of H2D x ratio | peak GiB | "
          "tokens = resident |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | error: {r['error'][:80]} |")
            continue
        vs = f"{r['tok_s_b1'] / ref['tok_s_b1']:.2f}x" if ref else "-"
        same = {True: "yes", False: "NO"}.get(r.get("tokens_equal_resident"), "-")
        print(f"| {r['mode']} | {r['ratio']:.3f} | {r['tok_s_b1']:.2f} | {r['tok_s_b8']:.2f} | {vs} | "
              f"{r['weight_gbps_b1']:.1f} | {r['of_h2d_x_ratio']:.0%} | {r['peak_gib']:.2f} | {same} |")
    print(f"\npinned host-to-device: {env['pinned_h2d_gbps']:.1f} GB/s; cap {args.cap_gib} GiB; {env['gpu']}")
    return 0  # the JSON was written after the last row


if __name__ == "__main__":
    sys.exit(main())
