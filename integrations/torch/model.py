"""``compress_model``: replace a model's Linear layers by :class:`CompressedLinear`, in place, and report what it did.

In the style of torchao's ``quantize_``: one call, a ``filter_fn(module, fqn)`` to choose layers, and by default
every ``nn.Linear`` except the output head and weights tied to embeddings (transformers' quantizers skip those for
numerical stability). Transformer blocks are found from the module tree (``_no_split_modules``, else the entries of
``nn.ModuleList``s), with no per-architecture patterns: the layers of a block decode together, in one engine run,
when the block starts (and the next block's on a side stream meanwhile, on a GPU).

Everything is compressed before anything is replaced, so an error leaves the model as it was.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from cupycodec.errors import prefix_message

from .dlpack import usable_device
from .linear import CompressedLinear, check_mode, replaced_why_not
from .runtime import DecodeGroup, Runtime, block_hook

__all__ = ["CompressionReport", "LayerReport", "compress_model", "find_blocks", "install", "set_module"]


@dataclass
class LayerReport:
    """One compressed layer: bytes of its weight before and after, and for the INT8 modes its SQNR in dB."""

    name: str
    shape: tuple[int, int]
    original_nbytes: int
    compressed_nbytes: int
    sqnr_db: float | None = None
    shared_with: str | None = None  # a tied weight compressed once, under this layer's name

    @property
    def ratio(self) -> float:
        return self.original_nbytes / self.compressed_nbytes if self.compressed_nbytes else math.inf


@dataclass
class CompressionReport:
    """What :func:`compress_model` did: each layer, the totals, and what it left alone. ``str()`` is a table,
    :meth:`to_json` the same as JSON."""

    mode: str
    layers: list[LayerReport]
    seconds: float
    skipped: dict[str, str] = field(default_factory=dict)  # Linear layers left alone -> why
    blocks: int = 0
    offload: Any = None  # the OffloadReport, when compress_model offloaded the model

    @property
    def original_nbytes(self) -> int:
        return sum(r.original_nbytes for r in self.layers if r.shared_with is None)

    @property
    def compressed_nbytes(self) -> int:
        return sum(r.compressed_nbytes for r in self.layers if r.shared_with is None)

    @property
    def ratio(self) -> float:
        return self.original_nbytes / self.compressed_nbytes if self.compressed_nbytes else math.inf

    def to_json(self) -> str:
        """The report as strict JSON. JSON has no infinity, so a figure that is not finite is null: the SQNR of a
        weight INT8 holds exactly (e.g. all zeros, as LoRA's B starts)."""
        data = {"mode": self.mode, "seconds": self.seconds, "blocks": self.blocks,
                "original_nbytes": self.original_nbytes, "compressed_nbytes": self.compressed_nbytes,
                "ratio": _finite(self.ratio), "skipped": self.skipped,
                "layers": [asdict(r) | {"sqnr_db": _finite(r.sqnr_db), "ratio": _finite(r.ratio)}
                           for r in self.layers]}
        return json.dumps(data, indent=1, allow_nan=False)

    def __str__(self) -> str:
        lossy = self.mode != "lossless"
        distinct = sum(1 for r in self.layers if r.shared_with is None)  # a shared layer's other names are rows too
        total = f"total ({distinct} layers)"
        w = max([len(r.name) for r in self.layers] + [5, len(total)])
        b = max(11, len(f"{self.original_nbytes:,d}"))  # the widest count of bytes is the total before
        head = f"{'layer':{w}s}  {'shape':>13s}  {'before':>{b}s}  {'after':>{b}s}  {'ratio':>6s}" + \
            ("  SQNR dB" if lossy else "")
        lines = [head, "-" * len(head)]
        for r in self.layers:
            shape = f"{r.shape[0]}x{r.shape[1]}"
            tail = f"  {r.sqnr_db:7.1f}" if lossy and r.sqnr_db is not None else ""
            after = f"(= {r.shared_with})" if r.shared_with else f"{r.compressed_nbytes:,d}"
            lines.append(f"{r.name:{w}s}  {shape:>13s}  {r.original_nbytes:{b},d}  {after:>{b}s}  {r.ratio:6.3f}{tail}")
        lines.append("-" * len(head))
        sq = [r.sqnr_db for r in self.layers if r.sqnr_db is not None]
        tail = f"  min {min(sq):.1f}" if lossy and sq else ""
        lines.append(f"{total:{w}s}  {'':>13s}  {self.original_nbytes:{b},d}  {self.compressed_nbytes:{b},d}  "
                     f"{self.ratio:6.3f}{tail}")
        lines.append(f"mode {self.mode!r}, {self.blocks} blocks, {self.seconds:.1f} s"
                     + (f"; left alone: {', '.join(self.skipped)}" if self.skipped else ""))
        return "\n".join(lines)


def _finite(v: float | None) -> float | None:
    return v if v is None or math.isfinite(v) else None


def find_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The model's repeated blocks, outermost first, in module order: the modules whose class transformers names in
    ``_no_split_modules``, else each entry of an ``nn.ModuleList`` that holds Linear (or compressed) layers."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [(fqn, m) for fqn, m in model.named_modules() if type(m).__name__ in names]
    if not found:
        for fqn, m in model.named_modules():
            if isinstance(m, torch.nn.ModuleList):
                found += [(f"{fqn}.{i}", child) for i, child in enumerate(m)
                          if any(isinstance(c, (torch.nn.Linear, CompressedLinear)) for c in child.modules())]
    out: list[tuple[str, torch.nn.Module]] = []
    kept: dict[str, int] = {}
    for fqn, m in found:  # keep the outermost of nested blocks
        if _enclosing(fqn, kept) is None:
            kept[fqn] = len(out)
            out.append((fqn, m))
    return out


def _enclosing(fqn: str, names: dict[str, int]) -> int | None:
    """The value of the first of ``fqn``'s proper prefixes (``a``, ``a.b``, ... of ``a.b.c``) that ``names`` holds:
    a walk of its parts, not a scan of ``names`` (which made models of thousands of blocks quadratic)."""
    end = fqn.find(".")
    while end != -1:
        hit = names.get(fqn[:end])
        if hit is not None:
            return hit
        end = fqn.find(".", end + 1)
    return None


def _is_linear(m: torch.nn.Module) -> bool:
    return isinstance(m, torch.nn.Linear)


def _fp32_rules(model: torch.nn.Module) -> list[tuple[str, list[str]]]:
    """(prefix, patterns) of each transformers model in ``model`` that keeps modules in float32
    (``_keep_in_fp32_modules``; T5's ``wo``, whose weight its forward reads): ``model`` itself, or one inside a
    wrapper (a module of the user's, ``nn.DataParallel``). Worked out once per call, not once per layer."""
    return [(prefix, list(p)) for prefix, m in model.named_modules()
            if (p := getattr(m, "_keep_in_fp32_modules", None))]


def _kept_in_fp32(rules: list[tuple[str, list[str]]], fqn: str) -> bool:
    """Whether module ``fqn`` is kept in float32 by one of ``rules`` (:func:`_fp32_rules`), its patterns matched
    against the names inside that model, as transformers' quantizer path does."""
    for prefix, patterns in rules:
        if prefix and not fqn.startswith(prefix + "."):
            continue
        from transformers.quantizers.quantizers_utils import should_convert_module

        if not should_convert_module(fqn[len(prefix) + 1 :] if prefix else fqn, patterns):
            return True
    return False


def fused_weights(model: torch.nn.Module) -> dict[str, str]:
    """fqn -> why, for the modules holding weights of three or more dimensions outside torch's own layers: a
    mixture of experts' fused expert weights (transformers 5's ``MixtralExperts.gate_up_proj``/``down_proj``),
    often most of such a model's bytes. Only nn.Linear layers are compressed; the report lists these as left alone
    (it listed only the head, and read 3.8x on a Mixtral whose experts, 82 % of its bytes, stayed as they were)."""
    out = {}
    for fqn, m in model.named_modules():
        if type(m).__module__.startswith("torch."):
            continue
        fused = [(n, p) for n, p in m.named_parameters(recurse=False) if p.dim() >= 3]
        if fused:
            nbytes = sum(p.numel() * p.element_size() for _, p in fused)
            out[fqn] = (f"{', '.join(n for n, _ in fused)}: {nbytes} bytes of {fused[0][1].dim()}-D weights (fused "
                        "experts), not nn.Linear layers, which are all any mode compresses")
    return out


def conv1d_note(model: torch.nn.Module) -> str:
    """A note for "no layer chosen" errors on GPT-2-like models, whose projections are transformers' ``Conv1D``
    (a transposed Linear), which no mode compresses."""
    n = sum(type(m).__name__ == "Conv1D" for m in model.modules())
    return f"; its {n} Conv1D projections (GPT-2's transposed Linear layers) are not supported" if n else ""


def _hf_models(model: torch.nn.Module) -> list:
    """The outermost transformers models in ``model`` (itself, or those a wrapper holds)."""
    if "transformers" not in sys.modules:
        return []
    from transformers import PreTrainedModel

    found: list = []
    for prefix, m in model.named_modules():
        if isinstance(m, PreTrainedModel) and not any(prefix.startswith(p + ".") or not p for p, _ in found):
            found.append((prefix, m))
    return [m for _, m in found]


def _read_by_torch(model: torch.nn.Module) -> dict[int, str]:
    """id(module) -> why, for the Linear layers whose weight is read directly rather than through their forward,
    which are never replaced (a CompressedLinear has no ``weight``: the model's forward would raise
    AttributeError). Torch's own: ``nn.TransformerEncoderLayer``'s ``linear1`` and ``linear2`` (its eval fast path,
    and ``nn.TransformerEncoder``'s nested-tensor path, hand them to a fused kernel) and ``nn.MultiheadAttention``'s
    ``out_proj``. The model's own code's reads are :func:`_read_by_code`'s."""
    why = {id(lin): "read directly by nn.TransformerEncoderLayer's fast path" for m in model.modules()
           if isinstance(m, torch.nn.TransformerEncoderLayer) for lin in (m.linear1, m.linear2)}
    why.update({id(m.out_proj): "read directly by nn.MultiheadAttention" for m in model.modules()
                if isinstance(m, torch.nn.MultiheadAttention) and isinstance(m.out_proj, torch.nn.Linear)})
    return why


def _read_by_code(model: torch.nn.Module) -> dict[int, str]:
    """id(module) -> why, for the Linear layers whose weight the model's own code reads (:func:`_read_by_model_code`):
    never replaced, whatever a filter says, as those torch reads (:func:`_read_by_torch`)."""
    return {id(model.get_submodule(fqn)): f"its weight is read by the model's own code ({reader})"
            for fqn, reader in _read_by_model_code(model).items()}


# methods whose reads of a layer's weight do not run in a forward (construction, initialization, tying)
_NOT_FORWARD = frozenset({"__init__", "_init_weights", "init_weights", "_initialize_weights", "post_init",
                          "reset_parameters", "tie_weights", "_tie_weights", "_tie_or_clone_weights",
                          "_tie_embedding_weights"})


def _read_by_model_code(model: torch.nn.Module) -> dict[str, str]:
    """fqn -> ``Class.method``, for the Linear layers whose ``.weight`` the source of a module class of ``model``
    reads (Mamba's ``self.dt_proj.weight``, Switch Transformers' ``self.wo.weight``, RWKV's
    ``block.attention.output.weight``, MobileBERT's ``self.dense.weight``), outside construction and weight
    initialization. ``self.NAME.weight`` in a class names the layer ``NAME`` of each module of that class; a longer
    chain (``x.a.b.weight``) every layer whose name ends in ``a.b``. Torch's and transformers' base classes are not
    read (their forwards reach layers through ``forward``). A read in a branch that never runs still counts: a layer
    left uncompressed costs bytes, one compressed costs the model."""
    linears = {fqn: m for fqn, m in model.named_modules() if _is_linear(m)}
    if not linears:
        return {}
    found: dict[str, str] = {}
    by_class: dict[type, list[str]] = {}
    for fqn, m in model.named_modules():
        by_class.setdefault(type(m), []).append(fqn)
    for cls, owners in by_class.items():
        for method, chain, on_self in _weight_reads(cls):
            if on_self:
                targets = [f"{o}.{'.'.join(chain)}" if o else ".".join(chain) for o in owners]
            elif len(chain) >= 2:
                targets = [f for f in linears if f == ".".join(chain) or f.endswith("." + ".".join(chain))]
            else:
                continue
            for t in targets:
                if t in linears:
                    found.setdefault(t, f"{cls.__name__}.{method}")
    return found


@functools.cache
def _weight_reads(cls: type) -> tuple[tuple[str, tuple[str, ...], bool], ...]:
    """``(method, chain, on_self)`` for each ``ROOT.A.B.weight`` that ``cls``'s own source reads outside
    :data:`_NOT_FORWARD` (chain ``("A", "B")``; ``on_self`` when ROOT is ``self``). Classes of torch, of
    transformers' base modules and of this package, and classes without source, read nothing here."""
    import ast
    import inspect
    import textwrap

    mod = getattr(cls, "__module__", "") or ""
    if mod.startswith(("torch.", "cupycodec.", "integrations.")) or mod in ("torch", "builtins") or \
            (mod.startswith("transformers.") and not mod.startswith("transformers.models.")):
        return ()
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return ()
    reads = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or fn.name in _NOT_FORWARD or \
                "init" in fn.name:  # Mamba's init_mamba_weights, and other initializers by name
            continue
        for node in ast.walk(fn):
            if not (isinstance(node, ast.Attribute) and node.attr == "weight"):
                continue
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if chain and isinstance(value, ast.Name):
                reads.append((fn.name, tuple(reversed(chain)), value.id == "self"))
    return tuple(reads)


def _left_alone_by_default(model: torch.nn.Module) -> dict[int, str]:
    """id(weight) -> why: the output head, and weights tied to an embedding. A transformers model's head is its
    output embeddings or, as transformers' quantizers find it, the module of its last parameter (a classifier:
    ``score``, ``classifier``; transformers' own rule misses a last module with a bias, whose last parameter is
    ``.bias``, so the module is taken here whichever parameter comes last). Both ways of compressing (this module's
    :func:`compress_model` and loading with a ``CupycodecConfig``) leave alone what this returns."""
    why: dict[int, str] = {}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Linear):
        why[id(head.weight)] = "output head"
    for inner in _hf_models(model):  # a transformers model inside a wrapper has its head too
        inner_head = inner.get_output_embeddings()
        if isinstance(inner_head, torch.nn.Linear):
            why.setdefault(id(inner_head.weight), "output head")
        # every name, tied ones included: compress_model comes after tying and the loader before it, and with the
        # tied names dropped the last was ALBERT's predictions.dense for the first, its decoder for the other
        names = [name for name, _ in inner.named_parameters(remove_duplicate=False)]
        owner = inner.get_submodule(names[-1].rpartition(".")[0]) if names else None
        if isinstance(owner, torch.nn.Linear):
            why.setdefault(id(owner.weight), "output head")
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            why.setdefault(id(m.weight), "tied to an embedding")
    if head is None and hasattr(model, "lm_head") and isinstance(model.lm_head, torch.nn.Linear):
        why.setdefault(id(model.lm_head.weight), "output head")
    return why


def _matches(filter_fn: Callable, module, fqn: str) -> bool:
    """``filter_fn`` on a layer it was not written for (a CompressedLinear): an exception means no."""
    try:
        return bool(filter_fn(module, fqn))
    except Exception:
        return False


def _chosen(filter_fn: Callable, module: torch.nn.Module, names: list[str]) -> bool:
    """``filter_fn`` asked under each name of ``module`` (shared, it is replaced under all of them); its errors are
    raised naming the layer and the filter."""
    for fqn in names:
        try:
            if filter_fn(module, fqn):
                return True
        except Exception as exc:
            prefix_message(exc, f"filter_fn(module, fqn) on layer {fqn!r}")
            raise
    return False


def compress_model(model: torch.nn.Module, mode: str, *, filter_fn: Callable | None = None,
                   granularity: str = "channel", group_size: int = 128, codec: str | None = None, device=None,
                   progress: bool = True, offload: str | None = None, max_gpu_memory=None) -> CompressionReport:
    """Replace ``model``'s Linear layers by :class:`CompressedLinear` in place; return a :class:`CompressionReport`.

    Parameters
    ----------
    model : torch.nn.Module
        Any model; Hugging Face transformers models are found their blocks by ``_no_split_modules``.
    mode : {"lossless", "int8", "int8+entropy"}
    filter_fn : callable, optional
        ``filter_fn(module, fqn) -> bool`` chooses the Linear layers to compress. By default every one except the
        output head, weights tied to an embedding and a transformers model's ``_keep_in_fp32_modules`` (T5's
        ``wo``, whose weight its forward reads). Never offered: Linear layers whose weight is read directly, by
        torch's own modules (``nn.MultiheadAttention``'s ``out_proj``; ``nn.TransformerEncoderLayer``'s ``linear1``
        and ``linear2``) or by the model's own code outside its initialization (Mamba's ``dt_proj``, RWKV's
        rescaled layers: found in the source of the model's module classes), and subclasses of ``nn.Linear`` with
        their own forward or tensors (a replacement computes ``x @ W.T + b``); both are listed in the report's
        ``skipped``. A module reachable under several names is
        compressed once and replaced under each (the report lists the others as shared). Each replacement is a new
        module: hooks registered on the ``nn.Linear`` it replaces do not carry over (register them after
        compressing).
    granularity, group_size
        INT8 scales: per output channel (``"channel"``) or per ``group_size`` inputs (``"group"``).
    codec : str, optional
        The codec of the lossless and int8+entropy payloads (default: ANS on a GPU, byte planes + zstd or zstd on a
        CPU; a payload made with ANS decodes only on a GPU).
    device : optional
        Where to compress (e.g. ``"cuda"`` for a model on the CPU); each layer stays on its own device.
    progress : bool
        Show a tqdm progress bar.
    offload : {"cpu", None}
        ``"cpu"``: then place the model on the GPU (``device``, else the current one) with its blocks' compressed
        weights in pinned host memory, streamed in as the blocks run (:func:`offload_model`; the report's
        ``offload`` says where everything went).
    max_gpu_memory : int or str, optional
        With offloading, a budget for the model's device memory (e.g. ``"8GiB"``): the first blocks stay resident
        while it holds. Implies ``offload="cpu"``.

    Raises
    ------
    ValueError
        An unknown mode, a model without Linear layers, a filter matching none, NaN or Inf weights in an INT8 mode
        (naming the layer and the element). Nothing is replaced then. With offloading, a budget below the model's
        minimum (given in the message): the model is then compressed but not moved.
    TypeError
        A non-float weight (naming the layer).
    """
    check_mode(mode)
    if isinstance(model, torch.nn.Linear):  # its name is "": there is no parent to put a replacement into
        raise TypeError(f"compress_model replaces the Linear layers inside a model, and got a {type(model).__name__} "
                        "itself; for one layer use CompressedLinear.from_linear(layer, mode), or pass a model that "
                        "holds it (e.g. nn.Sequential(layer))")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"compress_model takes a torch.nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be a function filter_fn(module, fqn) -> bool, got {filter_fn!r}")
    if device is not None:
        usable_device(device)  # before any layer is compressed
    from .offload import _compute_device, check_options

    offload = check_options(offload, max_gpu_memory)  # checked before anything changes
    if offload is not None:
        target = _compute_device(device if device is not None and torch.device(device).type == "cuda" else None)
    t0 = time.perf_counter()
    names: dict[int, list[str]] = {}  # a module reachable under several names is replaced under each
    for fqn, m in model.named_modules(remove_duplicate=False):
        if _is_linear(m):
            names.setdefault(id(m), []).append(fqn)
    linears = [(fqn, m) for fqn, m in model.named_modules() if _is_linear(m)]
    done = sum(isinstance(m, CompressedLinear) for m in model.modules())
    if not linears:
        if done:
            raise ValueError(f"{type(model).__name__} is already compressed ({done} CompressedLinear layers); to "
                             "compress it another way, start again from its original weights")
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to compress{conv1d_note(model)}")
    _check_not_inside(model)
    default_skip = _left_alone_by_default(model)
    torch_reads, code_reads = _read_by_torch(model), _read_by_code(model)
    fp32_rules = _fp32_rules(model)
    chosen, skipped = [], {}
    if filter_fn is not None:  # a filter that matches compressed layers: say so, rather than leave them silently
        for fqn, m in model.named_modules():
            if isinstance(m, CompressedLinear) and _matches(filter_fn, m, fqn):
                skipped[fqn] = f"already compressed (mode {m.mode!r}); start from the original weights to change it"
    for fqn, m in linears:
        if id(m) in torch_reads:
            skipped[fqn] = torch_reads[id(m)]
        elif (why := replaced_why_not(m)) is not None:
            skipped[fqn] = why
        elif filter_fn is not None and not _chosen(filter_fn, m, names[id(m)]):
            skipped[fqn] = "filter_fn"
        elif filter_fn is None and id(m.weight) in default_skip:
            skipped[fqn] = default_skip[id(m.weight)]
        elif filter_fn is None and _kept_in_fp32(fp32_rules, fqn):
            skipped[fqn] = "kept in float32 by the model (_keep_in_fp32_modules; its forward reads the weight)"
        elif id(m) in code_reads:  # chosen by a filter too: compressed, the model's forward would raise
            skipped[fqn] = code_reads[id(m)]
        else:
            chosen.append((fqn, m))
    skipped.update(fused_weights(model))
    if not chosen:
        left = ", ".join(f"{f} ({why})" for f, why in list(skipped.items())[:5]) + (", ..." if len(skipped) > 5 else "")
        if done and filter_fn is None:
            raise ValueError(f"{type(model).__name__} is already compressed ({done} CompressedLinear layers; left "
                             f"uncompressed: {left}); to compress it another way, start again from its original "
                             "weights")
        why = "filter_fn matched" if filter_fn is not None else "the default rules chose"
        raise ValueError(f"{why} none of the {len(linears)} Linear layers; left alone: {left}{conv1d_note(model)}")
    if codec not in (None, "auto"):  # before anything changes: an int8 layer stores no payload, so nothing else looks
        from cupycodec import registry

        registry.get_codec(codec)  # UnknownCodecError naming the registered codecs
    for fqn, m in chosen:
        if m.weight.is_meta:
            if hasattr(m, "_hf_hook"):  # accelerate's cpu_offload/disk_offload/dispatch_model keep it elsewhere
                raise ValueError(f"layer {fqn!r}: accelerate offloaded its weight (cpu_offload, disk_offload or "
                                 "dispatch_model left it on the meta device, brought back only inside forward); "
                                 "remove the hooks first (accelerate.hooks.remove_hook_from_module(model, "
                                 "recurse=True)), compress, then offload with cupycodec.integrations.torch."
                                 "offload_model or its dispatch_model")
            raise ValueError(f"layer {fqn!r}: its weight is on the meta device (a model built empty, e.g. under "
                             "accelerate.init_empty_weights()); load its weights first, or compress while loading: "
                             "from_pretrained(..., quantization_config=CupycodecConfig(...))")
        if m.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"layer {fqn!r}: its weight is {m.weight.dtype}; compress_model compresses float32, "
                            "float16 or bfloat16 weights (leave this layer out with filter_fn)")

    embedded = {id(e.weight) for e in model.modules() if isinstance(e, torch.nn.Embedding)}
    kept = [fqn for fqn, m in chosen if id(m.weight) in embedded]
    if kept:  # chosen by filter_fn: the embedding keeps the weight, so its compressed copy is memory added
        warnings.warn(f"{', '.join(kept)}: the weight is tied to an embedding, which keeps it; compressing the layer "
                      "adds its compressed copy to the model's memory instead of saving any (the report counts the "
                      "layer alone). Leave it out with filter_fn to keep the tie", stacklevel=2)
    new: dict[str, CompressedLinear] = {}
    reports, first_of = [], {}
    bar = _progress(chosen, progress, mode)
    for fqn, m in bar:
        shared = first_of.get(id(m.weight))
        try:
            if shared is not None:  # a tied weight: compressed once, its buffers shared
                layer = _sharing(m, new[shared], mode, granularity, group_size)
            else:
                layer = CompressedLinear.from_linear(m, mode, granularity=granularity, group_size=group_size,
                                                     codec=codec, device=device)
        except (ValueError, TypeError, RuntimeError) as exc:
            prefix_message(exc, f"layer {fqn!r} ({m.out_features}x{m.in_features})")
            raise
        if m.bias is not None:  # the bias itself, not a copy: ties, optimizers and hooks holding it still see it
            layer.bias = m.bias
        before = m.weight.numel() * m.weight.element_size()
        rep = LayerReport(fqn, (m.out_features, m.in_features), before, layer.compressed_nbytes, shared_with=shared)
        if mode != "lossless" and shared is None:
            rep.sqnr_db = _sqnr(m.weight, layer)
        reports.append(rep)
        first_of.setdefault(id(m.weight), fqn)
        for alias in names[id(m)]:  # the same module under another name: the same layer
            new[alias] = layer
            if alias != fqn:
                reports.append(LayerReport(alias, rep.shape, before, layer.compressed_nbytes, shared_with=fqn))

    blocks = install(model, new)  # everything compressed: now replace, group by block, hook
    for inner in _hf_models(model):  # a transformers model (or one in a wrapper): what save_pretrained needs
        from . import hf

        hf.attach(inner, mode, granularity, group_size, codec)
    report = CompressionReport(mode, reports, time.perf_counter() - t0, skipped, blocks=blocks)
    if offload is not None:
        from .offload import offload_model

        report.offload = offload_model(model, offload, max_gpu_memory=max_gpu_memory, device=target)
        report.blocks = len(model._cupycodec_runtime[1])
    return report


def _check_not_inside(model: torch.nn.Module) -> None:
    """Refuse a part of a model whose compressed layers another model's runtime decodes (a block of a model
    compressed whole): a runtime of its own would decode them too, each block start hooked twice."""
    own = {id(old[0]) for m in model.modules() if (old := vars(m).get("_cupycodec_runtime")) is not None}
    for fqn, m in model.named_modules():
        rt = m._runtime() if isinstance(m, CompressedLinear) and m._runtime is not None else None
        if rt is not None and id(rt) not in own and rt is not m._standalone:  # a layer's own: it ran on its own
            raise ValueError(f"layer {fqn!r} belongs to the model this {type(model).__name__} is part of (compressed "
                             "with it); call compress_model on that whole model, with filter_fn choosing the layers "
                             "to compress")


def set_module(model: torch.nn.Module, fqn: str, module: torch.nn.Module) -> None:
    """Put ``module`` at dotted name ``fqn`` inside ``model``."""
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def install(model: torch.nn.Module, new: dict[str, CompressedLinear]) -> int:
    """Put compressed layers into ``model`` (``fqn -> layer``), group the decoded layers of the model (these and any
    compressed before) by transformer block under one :class:`Runtime`, and hook the blocks; return the number of
    blocks hooked. Only Python attributes change, so this cannot stop half-way."""
    for fqn, layer in new.items():
        set_module(model, fqn, layer)
    # every compressed layer: containers and offloaded INT8 codes are decoded per use; resident INT8 codes are
    # dequantized per block for a large batch only (Runtime.enter_wide)
    # a layer reachable under several names (a module with two parents, a block repeated) joins one group: the
    # first block that holds it, else a group of its own
    decoded = [(f, m) for f, m in model.named_modules(remove_duplicate=False) if isinstance(m, CompressedLinear)]
    for _, m in decoded:
        if m._stamp is None and m._template is not None:
            m._restamp()  # loaded: the loader put the header and the bytes in place (transformers' after the header)
    groups, hooks = [], []
    blocks = find_blocks(model)
    index = {bfqn: i for i, (bfqn, _) in enumerate(blocks)}
    under = [(f, m, _enclosing(f, index)) for f, m in decoded]
    first: dict[int, int] = {}  # layer -> the first block holding it under one of its names
    for _, m, i in under:
        if i is not None and i < first.get(id(m), len(blocks)):
            first[id(m)] = i
    members: list[dict] = [{} for _ in blocks]  # in the order of their names under the block
    for _, m, i in under:
        if i is not None and first[id(m)] == i:
            members[i].setdefault(id(m), m)
    for (bfqn, block), held in zip(blocks, members):
        if held:
            layers = list(held.values())
            groups.append((block, DecodeGroup(layers, name=bfqn, offloaded=any(m._offloaded for m in layers))))
    placed = set(first)
    for f, m in decoded:
        if id(m) not in placed:
            placed.add(id(m))
            groups.append((None, DecodeGroup([m], name=f, offloaded=m._offloaded)))
    runtime = Runtime([g for _, g in groups])
    for block, group in groups:
        if block is not None and group.nbytes:  # blocks of resident INT8 codes start from their layers (wide only)
            hooks.append(block_hook(block, group.layers[0]))
    for m in model.modules():  # this model's runtime, and those of its submodules compressed before on their own:
        old = vars(m).get("_cupycodec_runtime")  # their layers are the new runtime's now (two hooks a block else)
        if old is not None:
            for h in old[1]:
                h.remove()
            if m is not model:
                del m._cupycodec_runtime
    model._cupycodec_runtime = (runtime, hooks)  # plain attribute: not a submodule, not in the state dict
    return sum(1 for b, _ in groups if b is not None)


def _progress(items, enabled: bool, mode: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=f"compressing ({mode})", unit="layer")


def _sharing(linear: torch.nn.Linear, first: CompressedLinear, mode, granularity, group_size) -> CompressedLinear:
    layer = CompressedLinear(linear.in_features, linear.out_features, linear.bias is not None, mode=mode,
                             granularity=granularity, group_size=group_size, dtype=linear.weight.dtype,
                             device="meta")
    if mode == "int8":
        layer.qweight, layer.scale = first.qweight, first.scale  # the same tensors: stored and held once
    else:
        layer.packed = first.packed
        layer._set_template(first._template)
    return layer.train(linear.training)


def _sqnr(weight: torch.Tensor, layer: CompressedLinear) -> float:
    """10 log10(|w|^2 / |w - dequantized(w)|^2), summed in float64 on the weight's device, a block of about 2**20
    elements at a time: whole-weight float64 temporaries took ~44 bytes an element, and transformers' loader threads
    ran several at once (an INT8 compress-while-loading of a 179 MiB model peaked at 1.1 GiB of host memory)."""
    w = weight.detach()
    q = layer.decompress_weight(torch.float32).to(w.device)
    noise = torch.zeros((), dtype=torch.float64, device=w.device)
    signal = torch.zeros((), dtype=torch.float64, device=w.device)
    rows = max(1, (1 << 20) // max(1, w.shape[-1]))
    for r in range(0, w.shape[0], rows):
        wb = w[r : r + rows].to(torch.float64)
        d = wb - q[r : r + rows]
        noise += torch.sum(d * d)
        signal += torch.sum(wb * wb)
    noise, signal = noise.item(), signal.item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal else -math.inf
