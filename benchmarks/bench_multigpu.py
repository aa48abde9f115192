"""A compressed model over two GPUs (issue 14), beside the bf16 model on the same maps, in one run.

A random-weight Llama-2-7B shape (or ``--config tinyllama``) is saved as a bf16 checkpoint, then compressed per mode
by ``cupycodec compress-model`` (as bench_checkpoint does). Each checkpoint is loaded with ``from_pretrained`` on
three placements: all on cuda:0 (the reference), an explicit half-and-half map (the first half of the blocks and the
embedding on cuda:0, the rest, the norm and the head on cuda:1), and ``device_map="auto"`` (which balances a model
over the visible GPUs). Per row: the load time, greedy HF ``generate`` tokens/s at batch 1 and 8 (``--tokens`` new
tokens after a 16-token prompt), whether the tokens equal the one-GPU load's, the devices the map used, and per
device the memory torch has allocated after the load and its peak. Run it with two GPUs visible (and
NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 set, as the device notes ask).

Written before a two-GPU machine was lent: it has not run yet.

Usage: python benchmarks/bench_multigpu.py [--config llama7b] [--modes bf16,lossless,int8,int8+entropy]
       [--tokens 32] [--work DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from bench_offload import CONFIGS, build, tok_s

MODES = ["bf16", "lossless", "int8", "int8+entropy"]


def halves(layers: int) -> dict:
    return {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1,
            **{f"model.layers.{i}": 0 if i < layers // 2 else 1 for i in range(layers)}}


def _memory(devices: int) -> dict:
    return {f"cuda:{d}": {"allocated_gib": torch.cuda.memory_allocated(d) / 2**30,
                          "peak_gib": torch.cuda.max_memory_allocated(d) / 2**30} for d in range(devices)}


def row(directory: str, mode: str, placement: str, device_map, tokens: int, reference) -> dict:
    import transformers

    import cupycodec.integrations  # noqa: F401  (the quantizer)

    n = torch.cuda.device_count()
    gc.collect()
    for d in range(n):
        torch.cuda.synchronize(d)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(d)
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, device_map=device_map).eval()
    for d in range(n):
        torch.cuda.synchronize(d)
    out = {"mode": mode, "placement": placement, "load_s": time.perf_counter() - t0,
           "devices": sorted({str(v) for v in getattr(model, "hf_device_map", {"": 0}).values()})}
    out["memory"] = _memory(n)
    out["tok_s_b1"], out["tokens_b1"] = tok_s(model, 1, tokens)
    out["tok_s_b8"], out["tokens_b8"] = tok_s(model, 8, tokens)
    if reference is not None:
        out["tokens_equal_one_gpu"] = (out["tokens_b1"], out["tokens_b8"]) == reference
    del model
    gc.collect()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="llama7b", choices=sorted(CONFIGS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--work", help="where the checkpoints go (default: a temporary directory, removed)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if sorted(set(modes) - set(MODES)):
        raise SystemExit(f"unknown modes {sorted(set(modes) - set(MODES))}; choose from {MODES}")
    if torch.cuda.device_count() < 2:
        raise SystemExit(f"two GPUs needed, {torch.cuda.device_count()} visible")
    env = {"gpus": [torch.cuda.get_device_name(d) for d in range(torch.cuda.device_count())],
           "config": args.config, "tokens": args.tokens, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    print(json.dumps(env), flush=True)
    layers = CONFIGS[args.config]["num_hidden_layers"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or tmp
        os.environ.setdefault("CUPYCODEC_KEY_FILE", os.path.join(work, "signing.key"))  # made here: trusted here
        dirs = {"bf16": os.path.join(work, "bf16")}
        if not os.path.exists(dirs["bf16"]):
            build(args.config).save_pretrained(dirs["bf16"])
            gc.collect()
            torch.cuda.empty_cache()
        for mode in modes:
            if mode == "bf16":
                continue
            dirs[mode] = os.path.join(work, mode.replace("+", "-"))
            if not os.path.exists(dirs[mode]):
                subprocess.run([sys.executable, "-m", "cupycodec", "compress-model", dirs["bf16"], dirs[mode],
                                "--mode", mode, "--device", "cuda:0", "--quiet"], check=True,
                               stdout=subprocess.DEVNULL)
        for mode in modes:
            reference = None
            for placement, device_map in (("cuda:0", {"": 0}), ("halves", halves(layers)), ("auto", "auto")):
                r = row(dirs[mode], mode, placement, device_map, args.tokens, reference)
                if placement == "cuda:0":
                    reference = (r["tokens_b1"], r["tokens_b8"])
                rows.append(r)
                print(json.dumps(r), flush=True)
                if args.json:  # after every row, so a run cut by its time limit keeps what it measured
                    with open(args.json, "w") as f:
                        json.dump({"env": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
