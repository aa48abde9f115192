"""Contention stress for a GPU failure seen only with many processes on one GPU (benchmarks/RESULTS.md, fifteenth
session): ``--procs`` processes loop the scenario of the GPU test
``test_a_state_dict_loaded_into_a_used_model_is_what_it_computes_with`` (two fresh compressed tiny Llamas, a forward
of each, a state dict loaded from one into the other, forwards again) at 9 and then 40 tokens, for ``--seconds`` per
variant, and count the iterations whose logits are not finite or not equal, and those that raised (an illegal memory
access kills the process's CUDA context: that process stops there).

Variants (``--variants``, comma-separated; each runs its processes alone, one variant after another):

* ``wide``: ``runtime.WIDE = True`` (one dequantization per INT8 block for a large batch), the default.
* ``perlayer``: ``runtime.WIDE = False`` (each layer dequantizes into ops' scratch).
* ``wide-nocudnn``: ``wide`` with cuDNN's attention off (SDPA picks another kernel).
* ``wide-noprefetch``: ``wide`` with one slot per runtime (no side stream: every block on the caller's stream).
* ``wide-keephost``: ``wide`` with every pinned host tensor kept alive (its memory never reused).

Each variant runs for each of ``--modes`` (comma-separated compression modes). The exit status is 1 if any process
died or any check failed. Usage on the GPU machine (or ``device_run.sh stress``):
``python benchmarks/stress_wide.py --procs 8 --seconds 25 --variants wide,perlayer --modes int8,int8+entropy``.

Before the fix in ``dlpack.stream_of`` (sixteenth GPU session), ``wide`` and ``wide-noprefetch`` killed 7 of 8
processes within 25 s (CUDA illegal memory access), while ``perlayer`` and two variants since removed (a launch per
layer without descriptors; the descriptors uploaded by a blocking copy) ran clean: the descriptors' upload, not the
launch or the slots, was at fault (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback


def worker(variant: str, mode: str, layers: int, seconds: float) -> dict:
    import torch
    import transformers

    from cupycodec.integrations.torch import compress_model, runtime

    runtime.WIDE = variant != "perlayer"
    if variant == "wide-nocudnn":
        torch.backends.cuda.enable_cudnn_sdp(False)
    if variant == "wide-keephost":
        kept, pin = [], torch.Tensor.pin_memory

        def keep(self, *a, **k):
            out = pin(self, *a, **k)
            kept.append(out)
            return out

        torch.Tensor.pin_memory = keep

    def tiny(sign):
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=704,
                                       num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4)
        model = transformers.LlamaForCausalLM(cfg).cuda().to(torch.bfloat16).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(sign)
        compress_model(model, mode, progress=False)
        if variant == "wide-noprefetch":
            model._cupycodec_runtime[0].prefetch = False
        return model

    out = {"variant": variant, "iterations": 0, "bad": {}, "errors": [], "pid": os.getpid()}
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            for tokens in (9, 40):
                a, b = tiny(1), tiny(-1)
                ids = torch.randint(0, 512, (1, tokens), device="cuda")
                with torch.no_grad():
                    want = b(ids).logits
                    first = a(ids).logits
                    a.load_state_dict(b.state_dict())
                    again = a(ids).logits
                checks = {"b-first-nonfinite": not torch.isfinite(want).all().item(),
                          "a-first-nonfinite": not torch.isfinite(first).all().item(),
                          "a-equal-b-before-load": torch.equal(first, want),
                          "a-after-load-differs": not torch.equal(again, want)}
                for name, bad in checks.items():
                    if bad:
                        key = f"{name}@{tokens}"
                        out["bad"][key] = out["bad"].get(key, 0) + 1
                out["iterations"] += 1
                del a, b
    except Exception as exc:  # a dead CUDA context: report it, stop this process
        out["errors"].append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
        out["trace"] = traceback.format_exc()[-3000:]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=14)
    ap.add_argument("--seconds", type=float, default=45)
    ap.add_argument("--variants", default="wide,perlayer")
    ap.add_argument("--modes", default="int8")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.modes, args.layers, args.seconds)), flush=True)
        return 0
    results = []
    for mode, variant in [(m, v) for m in args.modes.split(",") for v in args.variants.split(",")]:
        t0 = time.monotonic()
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", variant, "--modes", mode, "--layers",
                                   str(args.layers), "--seconds", str(args.seconds)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(args.procs)]
        rows = []
        for p in procs:
            try:
                text, _ = p.communicate(timeout=args.seconds + 150)
            except subprocess.TimeoutExpired:
                p.kill()
                text, _ = p.communicate()
                text += "\n(killed: hung)"
            line = next((x for x in text.splitlines() if x.startswith("RESULT ")), None)
            rows.append(json.loads(line[7:]) if line else {"variant": variant, "iterations": 0, "bad": {},
                                                            "errors": [f"rc {p.returncode}: {text[-400:]}"]})
        bad = {}
        for r in rows:
            for k, v in r["bad"].items():
                bad[k] = bad.get(k, 0) + v
        summary = {"variant": variant, "mode": mode, "layers": args.layers, "procs": args.procs,
                   "iterations": sum(r["iterations"] for r in rows), "bad": bad,
                   "procs_with_errors": sum(bool(r["errors"]) for r in rows),
                   "errors": sorted({e for r in rows for e in r["errors"]})[:5],
                   "trace": next((r["trace"] for r in rows if r.get("trace")), None),
                   "wall_s": round(time.monotonic() - t0, 1)}
        results.append(summary)
        print(f"{mode:12s} {variant:16s} iterations {summary['iterations']:5d}  bad {bad}  processes with errors "
              f"{summary['procs_with_errors']}/{args.procs}  {summary['errors'][:2]}  ({summary['wall_s']} s)",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if any(r["procs_with_errors"] or r["bad"] for r in results) else 0  # a failure shows in the stage's rc


if __name__ == "__main__":
    sys.exit(main())
