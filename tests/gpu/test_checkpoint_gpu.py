"""Compressed checkpoints on a GPU: ANS payloads saved and reloaded onto the device, compress-while-loading without a
bf16 spike, and a crafted checkpoint (CRCs recomputed) that must never reach nvCOMP when it is not trusted."""

from __future__ import annotations

import base64
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
st = pytest.importorskip("safetensors.torch")

from fuzzing import mutate  # noqa: E402
from helpers import flip_bits  # noqa: E402

import cupycodec as cc  # noqa: E402
import cupycodec.integrations  # noqa: E402  (registers the quantizer with transformers)
from cupycodec.integrations.torch import (  # noqa: E402
    CompressedLinear,
    CupycodecConfig,
    compress_model,
    load_compressed,
    save_compressed,
)
from cupycodec.integrations.torch._shards import ShardFile  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.nvcomp, pytest.mark.torch]

MODES = ["lossless", "int8", "int8+entropy"]
IDS = torch.tensor([[1, 17, 33, 5, 99, 64, 2, 250, 7, 8]])


@pytest.fixture(autouse=True)
def _own_key(tmp_path, monkeypatch):
    monkeypatch.setenv("CUPYCODEC_KEY_FILE", str(tmp_path / "keys" / "signing.key"))


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=3,
                                   num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    d = tmp_path_factory.mktemp("bf16")
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
    return str(d)


def _load(path, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(path, device_map={"": "cuda:0"}, **kw).eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS.cuda()).logits


@pytest.mark.parametrize("mode", MODES)
def test_gpu_checkpoint_round_trip(bf16_dir, tmp_path, mode):
    base = _logits(_load(bf16_dir))
    model = _load(bf16_dir)
    compress_model(model, mode, progress=False)  # ANS payloads on the GPU
    want = _logits(model)
    if mode == "lossless":
        assert torch.equal(want, base)
    save_compressed(model, tmp_path / "c", max_shard_size="1MB")
    again = load_compressed(tmp_path / "c", progress=False)  # onto cuda:0, signed by this user: trusted
    assert next(again.parameters()).device.type == "cuda"
    assert torch.equal(_logits(again), want)
    model.save_pretrained(tmp_path / "hf")
    assert torch.equal(_logits(_load(tmp_path / "hf")), want)
    again._cupycodec_runtime[0].check()


@pytest.mark.parametrize("mode", MODES)
def test_compress_while_loading_holds_no_bf16_model(bf16_dir, mode):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model = _load(bf16_dir, quantization_config=CupycodecConfig(mode=mode))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    resident = torch.cuda.memory_allocated() - start
    linear_bf16 = sum(m.in_features * m.out_features * 2 for m in model.modules() if isinstance(m, CompressedLinear))
    largest = max(m.in_features * m.out_features * 2 for m in model.modules() if isinstance(m, CompressedLinear))
    other = sum(p.numel() * p.element_size() for n, p in model.named_parameters())
    # what stays, plus one bf16 weight in flight and its compression scratch; never the bf16 Linear weights at once
    assert peak < resident + 4 * largest + (64 << 20), (peak, resident, largest)
    assert resident < other + 0.8 * linear_bf16
    ref = _load(bf16_dir)
    compress_model(ref, mode, progress=False)
    assert torch.equal(_logits(model), _logits(ref))


def _craft(out, tensor):
    shard = next(os.path.join(out, n) for n in sorted(os.listdir(out))
                 if n.endswith(".safetensors") and tensor in ShardFile(os.path.join(out, n)).tensors)
    tensors = st.load_file(shard)
    with ShardFile(shard) as f:
        meta = dict(f.metadata)
    table = json.loads(meta["cupycodec"])
    entry = table["tensors"][tensor]
    blob = tensors[tensor].numpy().tobytes()  # a packed layer's tensor is its whole container
    bad = mutate(blob, np.random.default_rng(0), 16)  # ANS chunk bytes changed, every CRC recomputed
    tensors[tensor] = torch.frombuffer(bytearray(bad), dtype=torch.uint8)
    head = cc.container.PRELUDE_NBYTES + cc.container.parse_prelude(memoryview(bad))[0]  # it may have grown
    entry["header"] = base64.b64encode(bad[:head]).decode()
    meta["cupycodec"] = json.dumps(table)
    st.save_file(tensors, shard, metadata=meta)  # one shard here (the default 5 GB): its table is the only one


def test_a_crafted_checkpoint_never_reaches_nvcomp(bf16_dir, tmp_path, monkeypatch):
    model = _load(bf16_dir)
    compress_model(model, "lossless", progress=False)
    save_compressed(model, tmp_path / "c")
    name = "model.layers.1.mlp.down_proj.packed"
    with ShardFile(tmp_path / "c" / "model.safetensors") as f:
        assert json.loads(f.metadata["cupycodec"])["tensors"][name]["header"]
    _craft(tmp_path / "c", name)
    monkeypatch.setenv("CUPYCODEC_KEY_FILE", str(tmp_path / "someone-else.key"))  # from the internet: untrusted
    with pytest.raises(cc.UntrustedError, match="not signed with your key.*trusted=True"):
        load_compressed(tmp_path / "c", progress=False)
    with pytest.raises((cc.UntrustedError, RuntimeError)):
        _load(tmp_path / "c")
    monkeypatch.setenv("CUPYCODEC_KEY_FILE", str(tmp_path / "keys" / "signing.key"))  # the signer: MAC fails
    with pytest.raises(cc.AuthenticationError, match=name):
        load_compressed(tmp_path / "c", progress=False)
    # the CUDA context is intact
    x = torch.randn(64, 64, device="cuda")
    assert torch.allclose(x @ torch.eye(64, device="cuda"), x)


@pytest.mark.parametrize("mode,attr", [("lossless", "packed"), ("int8", "qweight"), ("int8+entropy", "packed")])
def test_a_corrupt_tensor_is_caught_on_the_gpu(bf16_dir, tmp_path, monkeypatch, mode, attr):
    """The CRCs of codes, scales and packed layers bound for the GPU are checked there, once every tensor is placed
    (one launch per device, no host CRC pass): a clean load goes through it, and a flipped byte raises
    ChecksumError naming the file and the tensor, before the model changes and before from_pretrained returns."""
    import cupycodec.engine.verify as verify

    model = _load(bf16_dir)
    compress_model(model, mode, progress=False)
    save_compressed(model, tmp_path / "c")
    calls = []
    real = verify.device_crc32
    monkeypatch.setattr(verify, "device_crc32", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    assert torch.equal(_logits(load_compressed(tmp_path / "c", progress=False)), _logits(model))
    n_layers = sum(isinstance(m, CompressedLinear) for m in model.modules())
    assert len(calls) == 1 and calls[0] >= n_layers, calls  # every layer's chunks (or codes and scales) at once
    shard = tmp_path / "c" / "model.safetensors"
    name = f"model.layers.2.mlp.up_proj.{attr}"
    with ShardFile(shard) as f:
        pos = (f.tensors[name].start + f.tensors[name].end) // 2
    flip_bits(shard, pos, 0x10)
    with torch.device("meta"):
        target = transformers.AutoModelForCausalLM.from_config(model.config, dtype=torch.bfloat16)
    kinds_before = {n: type(m) for n, m in target.named_modules()}
    with pytest.raises(cc.ChecksumError, match=rf"model.safetensors: tensor '{name}': checksum mismatch"):
        load_compressed(tmp_path / "c", target, device="cuda:0", progress=False)
    assert {n: type(m) for n, m in target.named_modules()} == kinds_before  # nothing installed
    with pytest.raises(cc.ChecksumError, match=rf"model.safetensors: tensor '{name}': checksum mismatch"):
        _load(tmp_path / "c")
