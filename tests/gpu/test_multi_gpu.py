"""Two GPUs (issue 14): core calls on the device they name whatever is current, touching no other; a compressed model
split over two GPUs by a device map computes what the one-GPU model does; a checkpoint loaded with
``device_map="auto"`` checks its CRCs on each device; an out-of-memory on one device leaves nothing placed.

Run with ``CUPYCODEC_GPUS=2`` on a machine with two GPUs (skipped otherwise; an error if fewer are visible). Written
before a two-GPU machine was lent: these tests have not run yet.
"""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import cupycodec as cc  # noqa: E402
import cupycodec.integrations  # noqa: E402  (registers the quantizer with transformers)
from cupycodec.integrations.torch import CompressedLinear, CupycodecConfig  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.nvcomp, pytest.mark.torch,
              pytest.mark.skipif(int(os.environ.get("CUPYCODEC_GPUS", "1")) < 2,
                                 reason="needs two GPUs (CUPYCODEC_GPUS=2)")]
MODES = ["lossless", "int8", "int8+entropy"]
LAYERS = 8


@pytest.fixture(autouse=True)
def _two_gpus(tmp_path, monkeypatch):
    if torch.cuda.device_count() < 2:
        pytest.fail("CUPYCODEC_GPUS=2 but fewer than two CUDA devices are visible")
    monkeypatch.setenv("CUPYCODEC_KEY_FILE", str(tmp_path / "keys" / "signing.key"))


def _pool_bytes(device: int) -> tuple[int, int, int]:
    """(bytes CuPy's default pool has in use on ``device``, bytes it holds there, in use or free, bytes torch has
    allocated there): an allocation on the device grows one of them, even if it was freed since."""
    import cupy

    with cupy.cuda.Device(device):
        pool = cupy.get_default_memory_pool()
        return pool.used_bytes(), pool.total_bytes(), torch.cuda.memory_allocated(device)


@pytest.mark.parametrize("current,target", [(0, 1), (1, 0)])
def test_core_calls_run_on_the_named_device_and_touch_no_other(current, target):
    import cupy

    x = (np.random.default_rng(current).standard_normal(1 << 20) * 0.02).astype(np.float16)
    with cupy.cuda.Device(target):
        warm = cc.compress(cupy.asarray(x), codec="ans")  # the target's kernels, plans and pools exist before
        cc.decompress(warm, device=f"cuda:{target}")       # the other device is measured
    gc.collect()
    with cupy.cuda.Device(current):
        before = _pool_bytes(current)
        host = cc.compress(x, codec="zstd", backend="cpu")
        y = cc.decompress(host, device=f"cuda:{target}")  # a host container decoded onto the named device
        assert y.device.id == target and np.array_equal(cupy.asnumpy(y).view(np.uint16), x.view(np.uint16))
        g = cc.compress(y, codec="ans")  # device input compresses on its own device
        assert g.device == f"cuda:{target}"
        back = cc.decompress(g)
        assert back.device.id == target and np.array_equal(cupy.asnumpy(back).view(np.uint16), x.view(np.uint16))
        with cupy.cuda.Device(target):
            out = cupy.empty(x.shape, dtype=cupy.float16)
        plan = cc.decode_plan([g], [out])
        plan.run()
        plan.check()
        assert plan.device == target and np.array_equal(cupy.asnumpy(out).view(np.uint16), x.view(np.uint16))
        del y, g, back, out, plan
        gc.collect()
        assert _pool_bytes(current) == before  # nothing was allocated on the current (other) device


def _bf16_dir(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=LAYERS,
                                   num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    d = tmp_path / "bf16"
    transformers.LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).save_pretrained(d)
    return d


def _halves():
    return {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1,
            **{f"model.layers.{i}": 0 if i < LAYERS // 2 else 1 for i in range(LAYERS)}}


def _run(model, ids):
    with torch.no_grad():
        return model(ids).logits.to("cuda:0"), model.generate(ids, max_new_tokens=8, do_sample=False).to("cuda:0")


@pytest.mark.parametrize("mode", MODES)
def test_a_model_split_over_two_gpus_computes_what_one_gpu_does(tmp_path, mode):
    d = _bf16_dir(tmp_path)
    ids = torch.randint(0, 512, (2, 12), device="cuda:0")

    def load(device_map):
        # "auto" with room for a few blocks on cuda:0 only, so that this small model is split as a large one is
        extra = {"max_memory": {0: "4MiB", 1: "4GiB"}} if device_map == "auto" else {}
        return transformers.AutoModelForCausalLM.from_pretrained(
            d, device_map=device_map, quantization_config=CupycodecConfig(mode=mode), **extra).eval()

    one = load({"": 0})
    want = _run(one, ids)
    one.save_pretrained(tmp_path / "compressed")
    del one
    gc.collect()
    for device_map in (_halves(), "auto"):
        split = load(device_map)
        where = {str(v) for v in split.hf_device_map.values()}
        assert where == {"0", "1"}, split.hf_device_map
        for name, m in split.named_modules():
            if isinstance(m, CompressedLinear):
                block = int(name.split(".")[2])
                dev = split.hf_device_map.get(f"model.layers.{block}", 0)
                assert all(t.device == torch.device("cuda", int(dev)) for t in m._stored()), name
        got = _run(split, ids)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        del split
        gc.collect()

    import cupycodec.engine.verify as verify

    calls = []
    real = verify.device_crc32
    verify.device_crc32 = lambda *a, **k: calls.append(a[2]) or real(*a, **k)
    try:
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "compressed", device_map=_halves())
    finally:
        verify.device_crc32 = real
    assert sorted(calls) == [0, 1]  # each device checked the CRCs of what it holds, once
    got = _run(again.eval(), ids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_out_of_memory_on_one_device_leaves_nothing_placed(tmp_path):
    d = _bf16_dir(tmp_path)
    gc.collect()
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    base = (torch.cuda.memory_allocated(0), torch.cuda.memory_allocated(1))
    torch.cuda.set_per_process_memory_fraction(1e-6, device=1)  # no room on cuda:1
    try:
        with pytest.raises(torch.OutOfMemoryError, match="GPU 1"):
            transformers.AutoModelForCausalLM.from_pretrained(
                d, device_map=_halves(), quantization_config=CupycodecConfig(mode="int8"))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device=1)
    gc.collect()
    torch.cuda.empty_cache()
    assert (torch.cuda.memory_allocated(0), torch.cuda.memory_allocated(1)) == base
