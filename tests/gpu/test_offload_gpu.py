"""Host offload on a GPU: staged copies on a copy stream, decodes on a side stream, the same results as resident."""

from __future__ import annotations

import copy
import gc

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import assert_graph_replays_match_eager  # noqa: E402

from cupycodec.integrations.torch import (  # noqa: E402
    CompressedLinear,
    compress_model,
    load_compressed,
    offload_model,
    save_compressed,
)
from cupycodec.integrations.torch import offload as off  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.torch]
MODES = ["lossless", "int8", "int8+entropy"]


def _tiny_llama(layers=6, device="cuda"):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    # built in bf16 rather than cast to it: a cast also makes the rotary inv_freq buffer bf16, which a loaded
    # checkpoint recomputes in float32, as transformers' own from_pretrained does
    return transformers.LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).to(device).eval()


def _run(model, ids):
    with torch.no_grad():
        return model(ids).logits, model.generate(ids, max_new_tokens=8, do_sample=False)


@pytest.mark.parametrize("mode", MODES)
def test_an_offloaded_model_computes_what_the_resident_one_does(mode):
    model = _tiny_llama()
    compress_model(model, mode, progress=False)
    ids = torch.randint(0, 512, (2, 12), device="cuda")
    want, want_tokens = _run(model, ids)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    report = offload_model(model)
    assert report.offloaded == [f"model.layers.{i}" for i in range(6)] and report.pinned and not report.resident
    assert not model.hf_quantizer.is_compileable  # generate decodes it uncompiled (never run compiled on a GPU)
    for m in model.modules():
        if isinstance(m, CompressedLinear):
            assert all(t.device.type == "cpu" and t.is_pinned() for t in m._stored())
            assert m.bias is None or m.bias.device.type == "cuda"
    got, tokens = _run(model, ids)
    model._cupycodec_runtime[0].check()
    assert torch.equal(got, want) and torch.equal(tokens, want_tokens)
    assert torch.cuda.memory_allocated() < before  # six blocks left the device; two slots and two staging came


def test_a_budget_keeps_the_first_blocks_resident():
    model = _tiny_llama()
    compress_model(model, "int8+entropy", progress=False)
    ids = torch.randint(0, 512, (1, 12), device="cuda")
    want, _ = _run(model, ids)
    blocks, _, _ = off.plan(model)
    sizes = [off._device_nbytes(model, blocks, k) for k in range(7)]
    budget = sizes[3]
    report = offload_model(model, max_gpu_memory=budget)
    k = max(i for i in range(7) if sizes[i] <= budget)
    assert report.resident == [f"model.layers.{i}" for i in range(k)] and report.device_nbytes <= budget
    assert torch.equal(_run(model, ids)[0], want)
    with pytest.raises(ValueError, match="below the minimum for this model"):
        offload_model(model, max_gpu_memory=min(sizes) - 1)
    assert torch.equal(_run(model, ids)[0], want)  # the refused call changed nothing


@pytest.mark.parametrize("mode", MODES)
def test_an_offloaded_forward_captures_in_a_cuda_graph(mode):
    model = _tiny_llama(layers=4)
    compress_model(model, mode, offload="cpu", progress=False)
    assert_graph_replays_match_eager(model, reset=model._cupycodec_runtime[0].reset)


def test_offload_when_compressing_and_when_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("CUPYCODEC_KEY_FILE", str(tmp_path / "keys" / "signing.key"))
    base = _tiny_llama(device="cpu")
    ids = torch.randint(0, 512, (1, 12))
    model = copy.deepcopy(base)
    report = compress_model(model, "int8", device="cuda", offload="cpu", progress=False)
    assert report.offload.offloaded and model.model.embed_tokens.weight.device.type == "cuda"
    want, _ = _run(model, ids.cuda())
    save_compressed(model, tmp_path / "ckpt")  # the offloaded tensors are saved from the host as they are
    loaded = load_compressed(tmp_path / "ckpt", offload="cpu", progress=False)
    assert loaded.cupycodec_offload.offloaded == report.offload.offloaded
    assert torch.equal(_run(loaded, ids.cuda())[0], want)


@pytest.mark.parametrize("mode", MODES)
def test_a_device_map_that_puts_blocks_on_the_cpu(tmp_path, mode):
    from cupycodec.integrations.torch import CupycodecConfig

    # 12 blocks, 10 of them on the host: offloading saves more than its fixed cost (two slots and two staging
    # buffers of a block each; for int8, whose resident layers need no slot, that is four blocks' worth)
    _tiny_llama(layers=12, device="cpu").save_pretrained(tmp_path / "bf16")
    ids = torch.randint(0, 512, (1, 12), device="cuda")

    def load(device_map):
        return transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "bf16", device_map=device_map, quantization_config=CupycodecConfig(mode=mode)).eval()

    gc.collect()  # models hold reference cycles (hooks, runtimes): what earlier tests left must not count here
    torch.cuda.synchronize()
    empty = torch.cuda.memory_allocated()
    full = load({"": 0})
    want, want_tokens = _run(full, ids)
    full_nbytes = torch.cuda.memory_allocated() - empty
    del full
    gc.collect()
    dm = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 0, "lm_head": 0,
          **{f"model.layers.{i}": 0 if i < 2 else "cpu" for i in range(12)}}
    mixed = load(dm)
    assert mixed.cupycodec_offload.offloaded == [f"model.layers.{i}" for i in range(2, 12)]
    for i in range(12):
        for m in mixed.model.layers[i].modules():
            if isinstance(m, CompressedLinear):
                assert all((t.device.type == "cpu") == (i >= 2) for t in m._stored())
    got, tokens = _run(mixed, ids)
    assert torch.equal(got, want) and torch.equal(tokens, want_tokens)  # the same codes, decoded on the same GPU
    assert torch.cuda.memory_allocated() - empty < full_nbytes  # the mixed model holds less of the GPU


def _stored_devices(model):
    """Per block, the device types of its compressed layers' stored tensors."""
    return [{t.device.type for m in layer.modules() if isinstance(m, CompressedLinear) for t in m._stored()}
            for layer in model.model.layers]


@pytest.mark.parametrize("mode", MODES)
def test_accelerate_dispatch_of_a_compressed_model(mode):
    import accelerate

    from cupycodec.integrations.torch import dispatch_model

    def compressed():  # the same weights and codes each time; the model stays on the host, as a user's might
        model = _tiny_llama(layers=12, device="cpu")
        compress_model(model, mode, device="cuda", progress=False)
        return model

    ids = torch.randint(0, 512, (1, 12), device="cuda")
    gc.collect()
    torch.cuda.synchronize()
    empty = torch.cuda.memory_allocated()
    full = compressed().to("cuda")
    want, want_tokens = _run(full, ids)
    full_nbytes = torch.cuda.memory_allocated() - empty
    del full
    gc.collect()
    dm = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 0, "lm_head": 0,
          **{f"model.layers.{i}": 0 if i < 2 else "cpu" for i in range(12)}}

    model = compressed()
    report = dispatch_model(model, dm)
    assert report is model.cupycodec_offload and report.offloaded == [f"model.layers.{i}" for i in range(2, 12)]
    assert _stored_devices(model) == [{"cuda"}] * 2 + [{"cpu"}] * 10
    assert all(t.is_pinned() for layer in model.model.layers[2:] for m in layer.modules()
               if isinstance(m, CompressedLinear) for t in m._stored())
    got, tokens = _run(model, ids)
    assert torch.equal(got, want) and torch.equal(tokens, want_tokens)
    assert torch.cuda.memory_allocated() - empty < full_nbytes  # the offloaded blocks left the GPU
    del model
    gc.collect()

    plain = compressed()  # accelerate on its own: correct, but the "cpu" blocks' compressed buffers go to the GPU
    accelerate.dispatch_model(plain, dm)
    assert _stored_devices(plain) == [{"cuda"}] * 12
    got, tokens = _run(plain, ids)
    assert torch.equal(got, want) and torch.equal(tokens, want_tokens)
