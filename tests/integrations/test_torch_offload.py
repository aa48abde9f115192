"""Host offload on the CPU: budgets, the placement plan, errors, and the placement itself with the CPU standing in
for the GPU (the stream and staging path is in tests/gpu/test_offload_gpu.py)."""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import cupycodec as cc  # noqa: E402
from cupycodec.integrations.torch import CompressedLinear, compress_model, offload_model  # noqa: E402
from cupycodec.integrations.torch import offload as off  # noqa: E402

pytestmark = pytest.mark.torch
MODES = ["lossless", "int8", "int8+entropy"]
IDS = torch.tensor([[1, 17, 33, 5, 99, 64, 2]])


def tiny_llama(layers=4):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_sizes_parse():
    assert off.parse_nbytes(1024) == 1024
    assert off.parse_nbytes("8GiB") == 8 << 30 and off.parse_nbytes("8 GB") == 8 * 10**9
    assert off.parse_nbytes("1.5gib") == 3 << 29 and off.parse_nbytes("512MiB") == 512 << 20
    import numpy as np

    assert off.parse_nbytes(np.int64(8 << 30)) == 8 << 30 and off.parse_nbytes(8e9) == 8 * 10**9
    # "0.5" and "0.9b" parsed to 0 bytes; NumPy's bool is no size either
    for bad in ("8 parsecs", "", "-1GB", 0, -5, True, 2.5, None, "0GB", "0.5", "0.9b", np.bool_(True), float("inf")):
        with pytest.raises(ValueError, match="max_gpu_memory must be a positive number of bytes"):
            off.parse_nbytes(bad)


@pytest.mark.parametrize("mode", MODES)
def test_the_budget_keeps_the_first_blocks_that_fit(mode):
    model = tiny_llama()
    compress_model(model, mode, progress=False)
    blocks, k, need = off.plan(model)
    assert [b.name for b in blocks] == [f"model.layers.{i}" for i in range(4)] and k == 0
    everything = off._device_nbytes(model, blocks, 4)
    assert off.plan(model, everything)[1] == 4 and off.plan(model, f"{everything + 10**6}B")[1] == 4
    sizes = [off._device_nbytes(model, blocks, k) for k in range(5)]
    assert need == sizes[0] and sizes[1] < sizes[2] < sizes[3]  # each resident block adds its bytes
    most = max(k for k in range(5) if sizes[k] <= sizes[2])  # the most resident blocks within that budget
    assert off.plan(model, sizes[2])[1:] == (most, sizes[most]) and most >= 2
    least = min(sizes)  # the staging buffers make "all resident" cheaper than "one resident" in a model this small
    with pytest.raises(ValueError, match=rf"below the minimum for this model, .* \({least} bytes\).*give at least"):
        off.plan(model, least - 1)
    assert off.plan(model, least)[2] == least


def test_what_offload_refuses():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"is not compressed: compress_model\(model, mode\) or load_compressed first"):
        offload_model(model)
    compress_model(model, "int8", progress=False)
    with pytest.raises(ValueError, match="offload must be 'cpu' or None"):
        offload_model(model, "disk")
    with pytest.raises(ValueError, match="device must be a CUDA device"):
        offload_model(model, device="cpu")
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8))
    compress_model(plain, "int8", progress=False)
    with pytest.raises(ValueError, match="has no transformer block with compressed layers"):
        off.plan(plain)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_a_gpu_offload_is_refused_before_anything_changes():
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(cc.BackendUnavailableError, match="decodes them on a GPU, and torch sees no CUDA device"):
        compress_model(model, "int8", offload="cpu", progress=False)
    with pytest.raises(ValueError, match="max_gpu_memory must be"):
        compress_model(model, "int8", max_gpu_memory="lots", progress=False)
    assert not any(isinstance(m, CompressedLinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("mode", MODES)
def test_placement_regroups_and_computes_the_same(mode, monkeypatch):
    # the CPU stands in for the GPU: offloaded layers decode (or copy) into the runtime's slot per use, resident
    # INT8 layers compute in place; torch without CUDA cannot pin memory, so pageable memory and one warning
    model = tiny_llama()
    compress_model(model, mode, progress=False)
    want = _logits(model)
    blocks, _, _ = off.plan(model)
    monkeypatch.setattr(off, "_warned_pageable", False)
    pinnable = torch.cuda.is_available()  # on a GPU machine the host memory is pinned, whatever runs the blocks
    with contextlib.nullcontext() if pinnable else \
            pytest.warns(cc.PerformanceWarning, match="pinned host memory is unavailable"):
        report = off._place(model, torch.device("cpu"), blocks, 2, off._device_nbytes(model, blocks, 2))
    assert report.resident == ["model.layers.0", "model.layers.1"] and report.pinned == pinnable
    assert report.offloaded == ["model.layers.2", "model.layers.3"] and report.host_nbytes > 0
    layers = {f: m for f, m in model.named_modules() if isinstance(m, CompressedLinear)}
    assert all(m._offloaded == f.startswith(("model.layers.2.", "model.layers.3.")) for f, m in layers.items())
    runtime = model._cupycodec_runtime[0]
    grouped = {id(m) for g in runtime.groups for m in g.layers}
    assert grouped == {id(m) for m in layers.values()}  # resident INT8 layers too (dequantized per block for a
    # large batch), with nothing to decode: their groups need no slot
    assert [g.offloaded for g in runtime.groups] == [False, False, True, True]
    assert [g.nbytes > 0 for g in runtime.groups] == [mode != "int8"] * 2 + [True, True]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(_logits(model), want)
        assert torch.equal(_logits(model), want)  # and again, from the same slots


@pytest.mark.parametrize("mode", MODES)
def test_a_state_dict_loaded_into_a_used_model_is_what_it_computes_with(mode, monkeypatch):
    # one block, so its slot still holds it when the next forward starts; INT8 layers offloaded (decoded per use)
    def one_block(seed):
        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        compress_model(model, mode, progress=False, codec="raw" if mode != "int8" else None)
        blocks, _, _ = off.plan(model)
        monkeypatch.setattr(off, "_warned_pageable", True)
        off._place(model, torch.device("cpu"), blocks, 0, off._device_nbytes(model, blocks, 0))
        return model

    a, b = one_block(0), one_block(1)
    want = _logits(b)
    assert not torch.equal(_logits(a), want)
    a.load_state_dict(b.state_dict())
    assert torch.equal(_logits(a), want)


def test_a_failed_copy_leaves_the_model_as_it_was(monkeypatch):
    model = tiny_llama()
    compress_model(model, "int8+entropy", progress=False)
    want = _logits(model)
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    runtime = model._cupycodec_runtime
    calls = []

    def failing(t):
        calls.append(t)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return t.detach().clone(), True

    monkeypatch.setattr(off, "_to_host", failing)
    blocks, _, need = off.plan(model)
    with pytest.raises(torch.OutOfMemoryError, match=r"ran out of memory while the model was copied.*nothing was moved"):
        off._place(model, torch.device("cpu"), blocks, 0, need)
    assert len(calls) == 3
    assert all(v is tensors[k] for k, v in model.state_dict(keep_vars=True).items())
    assert model._cupycodec_runtime is runtime
    assert not any(m._offloaded for m in model.modules() if isinstance(m, CompressedLinear))
    assert torch.equal(_logits(model), want)


def test_the_loading_options():
    from cupycodec.integrations.torch import CupycodecConfig, load_compressed

    cfg = CupycodecConfig(mode="int8", max_gpu_memory="8GiB")
    assert cfg.offload == "cpu" and cfg.get_loading_attributes()["max_gpu_memory"] == "8GiB"
    assert "offload" not in cfg.to_dict() and "max_gpu_memory" not in cfg.to_dict()  # never saved
    with pytest.raises(ValueError, match="quantization_config: offload must be 'cpu' or None"):
        CupycodecConfig(offload="disk")
    with pytest.raises(ValueError, match="max_gpu_memory must be a positive number"):
        CupycodecConfig(max_gpu_memory="a lot")
    with pytest.raises(ValueError, match="offload must be 'cpu' or None"):
        load_compressed("/nonexistent", offload="nvme")
    if not torch.cuda.is_available():  # refused before any file is opened
        with pytest.raises(cc.BackendUnavailableError, match="torch sees no CUDA device"):
            load_compressed("/nonexistent", offload="cpu")


def test_device_maps_name_the_blocks_to_offload():
    model = tiny_llama()
    compress_model(model, "int8", progress=False)
    gpu0 = torch.device("cuda", 0)
    blocks, offloaded, gpu = off.map_blocks(model, {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0,
                                                    "model.layers.2": "cpu", "model.layers.3": "cpu",
                                                    "model.norm": "cuda:0", "lm_head": 0})
    assert offloaded == {2, 3} and gpu == gpu0 and len(blocks) == 4
    # prefixes, "", and accelerate's integer devices
    assert off.map_blocks(model, {"": "cpu"})[1:] == ({0, 1, 2, 3}, None)
    assert off.map_blocks(model, {"model": 1, "model.layers.3": "cpu", "lm_head": "cpu"})[1:] == (
        {3}, torch.device("cuda", 1))
    with pytest.raises(ValueError, match=r"device_map splits block 'model.layers.1' between cpu, cuda:0"):
        off.map_blocks(model, {"": 0, "model.layers.1.mlp": "cpu"})
    with pytest.raises(ValueError, match=r"puts block 'model.layers.0' on 'disk'.*map it to 'cpu'"):
        off.map_blocks(model, {"": 0, "model.layers.0": "disk"})
    # a map that names a block's submodules, not the block (infer_auto_device_map without no_split_module_classes):
    # all on one device is that device's block; it was refused as split "between None, cpu"
    parts = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
    by_parts = {"": 0, **{f"model.layers.2.{p}": "cpu" for p in parts}}
    assert off.map_blocks(model, by_parts)[1:] == ({2}, gpu0)
    assert off.map_blocks(model, {"model.embed_tokens": 0, "model.norm": 0, "lm_head": 0,
                                  **{f"model.layers.{i}.{p}": 0 for i in range(4) for p in parts}})[1:] == (set(), gpu0)
    with pytest.raises(ValueError, match=r"splits block 'model.layers.2' between cpu, cuda:0; "):
        off.map_blocks(model, {**by_parts, "model.layers.2.mlp": 0})
    with pytest.raises(ValueError, match=r"splits block 'model.layers.0' between cpu, no device"):
        off.map_blocks(model, {"model.layers.0.self_attn": "cpu"})
    with pytest.raises(ValueError, match="nothing on a GPU, so there is no GPU to stream them to"):
        off.place_mapped(model, {"": "cpu"})
    assert off.place_mapped(model, {"": 0}) is None  # nothing on the host: accelerate's placement stands


def test_which_staging_buffer_a_copy_takes():
    from cupycodec.integrations.torch.runtime import pick_staging

    ev, done = object(), object()  # a copied event, and the event of a decode that read the buffer
    assert pick_staging([None, None], None) == 0
    assert pick_staging([[3, ev, None], None], 3) == 1  # an empty buffer first
    # block i starts: i+1 was just decoded from buffer 1 (enqueued), i's buffer 0 too: i+2 may take either but the
    # one holding i+1, the group a decode is about to read, is never chosen while another is free
    assert pick_staging([[4, ev, done], [5, ev, done]], 5) == 0
    assert pick_staging([[4, ev, done], [5, ev, done]], 4) == 1
    # neither decoded yet (copied ahead, then the order changed): overwrite the one not needed next
    assert pick_staging([[4, ev, None], [5, ev, None]], 5) == 0
    assert pick_staging([[4, ev, None], [5, ev, done]], 4) == 1


def test_dispatch_refuses_before_anything_moves():
    from cupycodec.integrations.torch import dispatch_model

    model = tiny_llama()
    with pytest.raises(ValueError, match="is not compressed"):
        dispatch_model(model, {"": "cpu"})
    compress_model(model, "int8+entropy", progress=False)
    want = _logits(model)
    tensors = dict(model.state_dict(keep_vars=True))
    with pytest.raises(TypeError, match="device_map must be a dict.*infer_auto_device_map"):
        dispatch_model(model, "auto")
    with pytest.raises(ValueError, match=r"device_map splits block 'model.layers.1'"):
        dispatch_model(model, {"": 0, "model.layers.1.mlp": "cpu"})
    with pytest.raises(ValueError, match=r"puts block 'model.layers.0' on 'disk'"):
        dispatch_model(model, {"": 0, "model.layers.0": "disk"})
    if not torch.cuda.is_available():
        with pytest.raises(cc.BackendUnavailableError, match="torch sees no CUDA device"):
            dispatch_model(model, {"": 0, "model.layers.3": "cpu"})
    assert all(v is tensors[k] for k, v in model.state_dict(keep_vars=True).items())
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())  # accelerate never ran
    assert torch.equal(_logits(model), want)
    assert dispatch_model(model, {"": "cpu"}) is None and model.cupycodec_offload is None  # no GPU: accelerate's
    assert torch.equal(_logits(model), want)


def test_compressing_a_model_accelerate_offloaded_names_its_hooks():
    # the error blamed a model built empty (init_empty_weights) and told to load its weights, which were loaded
    import accelerate
    from accelerate.hooks import remove_hook_from_module

    model = tiny_llama(layers=2)
    want = _logits(model)
    accelerate.cpu_offload(model, execution_device="cpu")
    with pytest.raises(ValueError, match=r"accelerate offloaded its weight.*remove_hook_from_module"):
        compress_model(model, "int8", progress=False)
    assert not any(isinstance(m, CompressedLinear) for m in model.modules())
    remove_hook_from_module(model, recurse=True)
    compress_model(model, "lossless", progress=False)
    assert torch.equal(_logits(model), want)


@pytest.mark.parametrize("mode", ["lossless", "int8", "int8+entropy"])
@pytest.mark.parametrize("head", [False, True])
def test_the_budget_counts_everything_the_runtime_allocates_on_a_gpu(mode, head):
    # the slots were sized by the largest block, while the runtime sizes them by its largest group (a compressed
    # head is a group of its own), and the two buffers an INT8 prefill dequantizes a block into were not counted:
    # up to twice the budget on a GPU. The CPU stands in for the GPU (what a GPU's runtime allocates is sized here)
    import transformers

    off._warned_pageable = True
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=4096, tie_word_embeddings=False)).eval().to(torch.bfloat16)
    compress_model(model, mode, progress=False, filter_fn=(lambda m, f: True) if head else None)
    blocks, k, est = off.plan(model, max_gpu_memory=None)
    budget = off._device_nbytes(model, blocks, 2)  # two blocks resident
    blocks, k, est = off.plan(model, budget)
    report = off._place(model, torch.device("cpu"), blocks, k, est)
    rt = model._cupycodec_runtime[0]
    offloaded = {id(t) for b in blocks[k:] for m in b.layers for t in m._stored()}
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    rest = sum(t.numel() * t.element_size() for i, t in tensors.items() if i not in offloaded)
    held = rest + 2 * (rt.slot_nbytes + rt.staging_nbytes + rt.wide_nbytes)  # Runtime on CUDA: two of each
    assert report.device_nbytes == held <= budget
