"""CompressedLinear on the CPU: every mode against nn.Linear, state dicts, errors; the INT8 op under torch.compile."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")

from cupycodec.integrations.torch import CompressedLinear, from_compressed, to_compressed  # noqa: E402
from cupycodec.quant import reference  # noqa: E402

pytestmark = pytest.mark.torch

MODES = ["lossless", "int8", "int8+entropy"]


def _linear(k=256, n=96, dtype=torch.bfloat16, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(0.3)
    return lin.to(dtype)


def _reference_int8(lin, granularity="channel", group_size=128):
    """The reference's dequantized weight (NumPy, quant.reference), as a torch tensor of the layer's dtype."""
    w = lin.weight.detach().float().numpy()
    q, s = reference.quantize_int8(w, granularity=granularity, axis=0, group_size=group_size)
    np_dtype = {torch.bfloat16: ml_dtypes.bfloat16, torch.float16: np.float16, torch.float32: np.float32}
    y = reference.dequantize_int8(q, s, granularity=granularity, axis=0, group_size=group_size,
                                  dtype=np_dtype[lin.weight.dtype])
    return torch.from_numpy(y.view(np.int16) if y.dtype == ml_dtypes.bfloat16 else y).view(lin.weight.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_lossless_is_bit_exact(dtype):
    lin = _linear(dtype=dtype)
    cl = CompressedLinear.from_linear(lin, "lossless")
    x = torch.randn(5, 256, dtype=dtype)
    assert torch.equal(cl(x), lin(x))
    assert torch.equal(cl.decompress_weight(), lin.weight.detach())
    assert cl.compressed_nbytes < lin.weight.numel() * lin.weight.element_size() or dtype == torch.float32


@pytest.mark.parametrize("mode", ["int8", "int8+entropy"])
@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_int8_modes_compute_with_the_reference_weight(mode, granularity):
    lin = _linear(k=200)  # a partial last group with group_size=64
    cl = CompressedLinear.from_linear(lin, mode, granularity=granularity, group_size=64)
    want = _reference_int8(lin, granularity, 64)
    assert torch.equal(cl.decompress_weight(), want)  # codes and scales are the reference's, bit for bit
    x = torch.randn(3, 7, 200, dtype=torch.bfloat16)
    assert torch.equal(cl(x), torch.nn.functional.linear(x, want, lin.bias))


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_round_trip_and_config_checks(mode):
    lin = _linear(bias=False)
    cl = CompressedLinear.from_linear(lin, mode, granularity="group", group_size=64)
    sd = cl.state_dict()
    assert set(sd) == ({"qweight", "scale"} if mode == "int8" else {"packed"})  # plain tensors: safetensors-ready
    st.load(st.save(sd))
    again = CompressedLinear(256, 96, bias=False, mode=mode, granularity="group", group_size=64, dtype=torch.bfloat16)
    again.load_state_dict(sd)
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    assert torch.equal(again(x), cl(x))
    if mode == "int8":  # codes and scales: their shapes are all there is to check
        with pytest.raises(RuntimeError, match="size mismatch for scale"):
            CompressedLinear(256, 96, bias=False, mode=mode, dtype=torch.bfloat16).load_state_dict(sd)
        return
    # a container describes itself: a layer configured otherwise refuses it, and keeps what it had
    for wrong in (CompressedLinear(256, 96, bias=False, mode=mode, granularity="group", group_size=64,
                                   dtype=torch.float16),
                  CompressedLinear(256, 80, bias=False, mode=mode, granularity="group", group_size=64,
                                   dtype=torch.bfloat16),
                  CompressedLinear(256, 96, bias=False, mode=mode, granularity="group", group_size=32,
                                   dtype=torch.bfloat16)):
        if mode == "lossless" and wrong.group_size == 32:
            continue  # lossless layers have no INT8 configuration
        before = wrong.packed.clone()
        with pytest.raises(RuntimeError, match="packed: the packed weight holds .* build the layer with"):
            wrong.load_state_dict(sd)
        assert torch.equal(wrong.packed, before)


@pytest.mark.parametrize("codec", ["raw", None])
@pytest.mark.parametrize("mode", ["lossless", "int8+entropy"])
def test_a_loaded_state_dict_replaces_what_was_decoded(mode, codec):
    # a layer that decoded its weight, then loads another (in place when the sizes match: "raw"), computes with
    # the new one: its slot, hot views and plans held the old weight
    a, b = (CompressedLinear.from_linear(_linear(seed=seed), mode, codec=codec) for seed in (0, 1))
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        want, _ = b(x), a(x)
        a.load_state_dict(b.state_dict())
        assert torch.equal(a(x), want)


def test_a_corrupt_packed_weight_is_refused_by_load_state_dict():
    cl = CompressedLinear.from_linear(_linear(), "lossless")
    sd = cl.state_dict()
    sd["packed"] = sd["packed"].clone()
    sd["packed"][-3] ^= 0xFF
    again = CompressedLinear(256, 96, mode="lossless", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="packed: checksum mismatch"):
        again.load_state_dict(sd)
    assert again.packed.numel() == 0  # left as it was


def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match="mode must be one of"):
        CompressedLinear.from_linear(_linear(), "int4")
    with pytest.raises(TypeError, match="nn.Linear"):
        CompressedLinear.from_linear(torch.nn.Conv1d(3, 3, 1), "int8")
    lin = _linear()
    with torch.no_grad():
        lin.weight[3, 5] = math.nan
    with pytest.raises(ValueError, match=r"finite input.*\[3, 5\]"):
        CompressedLinear.from_linear(lin, "int8")
    with pytest.raises(RuntimeError, match="no weight yet"):
        CompressedLinear(8, 8, mode="lossless")(torch.randn(1, 8, dtype=torch.bfloat16))


# inductor's own code path calls a deprecated torch.jit API (torch 2.13): torch's noise, not ours
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_int8_op_under_torch_compile():
    lin = _linear()
    cl = CompressedLinear.from_linear(lin, "int8")
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    compiled = torch.compile(cl, fullgraph=True)  # the op is opaque to Dynamo: no graph break
    assert torch.equal(compiled(x), cl(x))


def test_eager_forward_skips_the_op_dispatch_unless_autograd_needs_it(monkeypatch):
    from cupycodec.integrations.torch import ops

    cl = CompressedLinear.from_linear(_linear(), "int8")
    calls = []
    real = ops.int8_linear
    monkeypatch.setattr(ops, "int8_linear", lambda *a: calls.append(a[0].requires_grad) or real(*a))
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        y = cl(x)
    assert calls == []  # inference: the op's implementation, called directly
    assert torch.equal(cl(x), y) and calls == [False]  # the bias is trainable: autograd records through the op
    cl.bias.requires_grad_(False)
    xg = x.clone().requires_grad_()
    out = cl(xg)
    out.float().sum().backward()
    assert calls == [False, True] and torch.equal(out.detach(), y)
    w = cl.decompress_weight(torch.float32)
    assert torch.allclose(xg.grad.float(), torch.ones(3, 96) @ w, rtol=1e-2, atol=1e-2)
    with torch.no_grad():
        assert torch.equal(cl(x.clone().requires_grad_()), y) and len(calls) == 2  # no grad mode: direct again


def test_cpu_forwards_on_several_threads_each_compute_with_their_own_weights():
    # the CPU forward dequantizes into a per-thread scratch: layers of other shapes and granularities, run at once on
    # four threads, must each still compute with the reference weight, bit for bit
    import threading

    layers = []
    for i, (k, n, gran) in enumerate([(200, 96, "group"), (256, 160, "channel"), (64, 48, "channel"),
                                      (384, 32, "group")]):
        lin = _linear(k=k, n=n, seed=i)
        cl = CompressedLinear.from_linear(lin, "int8", granularity=gran, group_size=64)
        x = torch.randn(5, k, dtype=torch.bfloat16)
        layers.append((cl, x, torch.nn.functional.linear(x, _reference_int8(lin, gran, 64), lin.bias)))
    bad, start = [], threading.Barrier(len(layers))

    def work(cl, x, want):
        start.wait()
        with torch.no_grad():
            for _ in range(40):
                if not torch.equal(cl(x), want):
                    bad.append(cl.out_features)
                    return

    threads = [threading.Thread(target=work, args=layer) for layer in layers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


@pytest.mark.parametrize("first", ["inference_mode", "no_grad", "enable_grad"])
def test_a_cpu_forward_works_in_every_grad_mode_whichever_came_first(first):
    # the CPU forward's per-thread scratch is made on first use: made under torch.inference_mode(), it would be an
    # inference tensor (or a view made there), which refuses the in-place writes of every later forward outside it
    import threading

    lin = _linear(k=72, n=88)
    cl = CompressedLinear.from_linear(lin, "int8")
    x = torch.randn(2, 72, dtype=torch.bfloat16)
    want = torch.nn.functional.linear(x, _reference_int8(lin), lin.bias)
    modes = [first] + [m for m in ("inference_mode", "no_grad", "enable_grad") if m != first] + [first]
    got = []

    def run():  # a fresh thread: its scratch is made here, under the first mode
        try:
            for m in modes:
                with getattr(torch, m)():
                    got.append(torch.equal(cl(x), want))
        except RuntimeError as exc:
            got.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert got == [True] * len(modes)


@pytest.mark.parametrize("mode", ["lossless", "int8", "int8+entropy"])
@pytest.mark.parametrize("cast,dtype", [("half", torch.float16), ("float", torch.float32)])
def test_a_cast_layer_computes_in_the_new_dtype_with_exact_scales(mode, cast, dtype):
    # .half() / .float() cast parameters and float buffers: the INT8 scales must stay float32 (a float16 copy would
    # round them, and the GPU kernel reads float32), and lossless weights, stored as bf16, follow the activations
    cl = CompressedLinear.from_linear(_linear(), mode)
    getattr(cl, cast)()
    assert cl.bias.dtype == dtype and (mode != "int8" or cl.scale.dtype == torch.float32)
    x = torch.randn(3, 256, dtype=torch.bfloat16).to(dtype)
    with torch.no_grad():
        want = torch.nn.functional.linear(x, cl.decompress_weight(dtype), cl.bias)
        assert torch.equal(cl(x), want)
    if mode == "int8":  # the scales are the compressed layer's own, bit for bit
        assert torch.equal(cl.scale, CompressedLinear.from_linear(_linear(), "int8").scale)


def test_tensor_helpers_round_trip_bf16():
    t = torch.randn(64, 33, dtype=torch.bfloat16)
    c = to_compressed(t[:, ::2], codec="zstd")  # a non-contiguous view, as it is
    assert c.dtype_name == "BF16"
    back = from_compressed(c)
    assert back.dtype == torch.bfloat16 and torch.equal(back, t[:, ::2])
    q = to_compressed(torch.nn.Parameter(t), quantize="int8")
    assert from_compressed(q, dtype=torch.float32).dtype == torch.float32


def test_scratch_order_hands_over_between_streams(monkeypatch):
    """The large-batch scratch's ordering (ops._ScratchOrder), with torch.cuda's stream calls replaced by fakes: one
    stream never records or waits; a new stream waits for an event recorded on the last user's stream; a capture
    neither waits nor takes over."""
    from cupycodec.integrations.torch import ops

    log, state = [], {"stream": "A", "capturing": False}

    class Event:
        def record(self, stream):
            log.append(("record", stream))

    class Stream(str):
        def wait_event(self, event):
            log.append(("wait", str(self)))

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(state["stream"]))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["capturing"])
    order = ops._ScratchOrder()

    def use(stream, capturing=False):
        state.update(stream=stream, capturing=capturing)
        order.enter(0, hash(stream))
        order.leave(0, hash(stream))

    use("A")
    use("A")
    assert log == []
    use("B")
    assert log == [("record", "A"), ("wait", "B")]
    use("B")
    use("A")
    assert log[2:] == [("record", "B"), ("wait", "A")]
    del log[:]
    use("G", capturing=True)  # a graph capture on its own stream
    assert log == []
    use("A")  # A is still the last eager user
    assert log == []


class _OnCuda:
    """A weight as gpu_chunk sees it (device, element count and size), without a GPU."""

    def __init__(self, n, k, dtype=torch.bfloat16, device="cuda"):
        self.device, self.shape, self.dtype = torch.device(device), (n, k), dtype

    def numel(self):
        return self.shape[0] * self.shape[1]

    def element_size(self):
        return self.dtype.itemsize


@pytest.mark.parametrize("n,k,mode,want", [
    (2048, 2048, "lossless", 512 << 10),  # TinyLlama's attention: 8 MiB, at least 16 chunks
    (256, 2048, "lossless", 64 << 10),  # its k/v projections: 1 MiB, 16 chunks of the 64 KiB floor
    (5632, 2048, "lossless", 1 << 20),  # its MLP: 22 MiB, 1 MiB chunks
    (4096, 4096, "lossless", None),  # Llama-2-7B's: 32 MiB, the codec's default (256 KiB)
    (11008, 4096, "lossless", None),
    (2048, 2048, "int8+entropy", 256 << 10),  # 4 MiB of codes
    (256, 2048, "int8+entropy", 64 << 10),  # 512 KiB of codes
    (11008, 4096, "int8+entropy", 256 << 10),
])
def test_gpu_payloads_are_chunked_for_a_decode_beside_compute(n, k, mode, want):
    from cupycodec.integrations.torch.linear import gpu_chunk

    assert gpu_chunk(mode, "ans", _OnCuda(n, k)) == want
    assert gpu_chunk(mode, "ans", _OnCuda(n, k, device="cpu")) is None  # the CPU's codecs keep theirs
    assert gpu_chunk(mode, "bitcomp", _OnCuda(n, k)) is None  # a codec the user named keeps its default
