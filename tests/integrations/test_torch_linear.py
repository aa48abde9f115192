"""CompressedLinear on the CPU: every mode against nn.Linear, state dicts, errors; the INT8 op under torch.compile."""

from __future__ import annotations

import math
import sys

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st_

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")

import cupycodec as cc  # noqa: E402
from cupycodec.integrations.torch import CompressedLinear, from_compressed, to_compressed  # noqa: E402
from cupycodec.integrations.torch.dlpack import dtype_name  # noqa: E402
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
    for bad in (0, -1, 2.5, True, "128", None):
        with pytest.raises(ValueError, match=f"group_size must be an int >= 1, got {bad!r}"):
            CompressedLinear(32, 8, mode="int8", granularity="group", group_size=bad)
        with pytest.raises(ValueError, match="group_size must be an int >= 1"):
            CompressedLinear.from_linear(_linear(), "int8", granularity="group", group_size=bad)


@pytest.mark.parametrize("mode", ["lossless", "int8", "int8+entropy"])
@pytest.mark.parametrize("shape", [(2, 128), (1, 104), (3, 48), (40, 128), ()])
def test_an_input_of_another_width_is_refused_in_every_mode(mode, shape):
    """As nn.Linear refuses it: the INT8 kernels derived M from the input's size and read or wrote past the ends
    (on a GPU) where the width differed."""
    layer = CompressedLinear.from_linear(torch.nn.Linear(64, 32, dtype=torch.bfloat16), mode)
    x = torch.randn(shape, dtype=torch.bfloat16)
    with torch.no_grad(), pytest.raises(RuntimeError):
        layer(x)
    with pytest.raises(RuntimeError):
        layer(x.requires_grad_())  # the custom op's route


@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_an_int8_layer_used_before_its_weight_is_loaded_gives_nan(granularity):
    """An empty int8 layer has codes and scales buffers for load_state_dict to fill; until it does (or where a
    strict=False load missed the scales), its outputs are NaN, never plausible numbers (zeros, before)."""
    layer = CompressedLinear(32, 8, bias=False, mode="int8", granularity=granularity, group_size=16)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    assert torch.isnan(layer(x)).all()
    sd = CompressedLinear.from_linear(_linear(32, 8, bias=False), "int8", granularity=granularity,
                                      group_size=16).state_dict()
    missing = layer.load_state_dict({"qweight": sd["qweight"]}, strict=False).missing_keys
    assert missing == ["scale"] and torch.isnan(layer(x)).all()
    layer.load_state_dict(sd)
    assert torch.isfinite(layer(x)).all()


def test_from_linear_keeps_the_training_flag():
    lin = _linear()
    assert CompressedLinear.from_linear(lin.eval(), "int8").training is False
    assert CompressedLinear.from_linear(lin.train(), "lossless").training is True


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
    # the CPU forward dequantizes into a per-thread scratch (and stages misaligned codes in one): layers of other
    # shapes, granularities and routes, run at once on four threads, must each compute what they compute alone
    import threading

    layers = []
    for i, (k, n, gran, m) in enumerate([(200, 96, "group", 5), (256, 160, "channel", 20), (64, 48, "channel", 5),
                                         (384, 32, "group", 5)]):
        lin = _linear(k=k, n=n, seed=i)
        cl = CompressedLinear.from_linear(lin, "int8", granularity=gran, group_size=64)
        if i == 2:  # codes off a 64-byte boundary: staged per call into the thread's scratch for the GEMV
            store = torch.empty(cl.qweight.numel() + 8, dtype=torch.int8)
            cl.qweight = store[8:].view_as(cl.qweight).copy_(cl.qweight)
        x = torch.randn(m, k, dtype=torch.bfloat16)
        with torch.no_grad():
            want = cl(x)
        if m > 16 or gran == "group":  # the dequantize-into-scratch route: the reference weight's bits
            assert torch.equal(want, torch.nn.functional.linear(x, _reference_int8(lin, gran, 64), lin.bias))
        layers.append((cl, x, want))
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


def _gemv_route() -> bool:
    """Whether this CPU's torch takes small batches of bf16 activations to its INT8 GEMV (x86 with AVX2/AVX-512)."""
    from cupycodec.integrations.torch import ops

    return bool(ops._cpu_gemv_ok(torch.empty(1, 16, dtype=torch.bfloat16), torch.empty(1, 16, dtype=torch.int8)))


def _within_two_roundings(y, x, lin_or_codes, scale=None, bias=None):
    """``y`` (bf16) against the exact product of the INT8 layer in float64: within one bf16 rounding of the scaled
    sum and one of the result (the CPU GEMV rounds its float32 sum of activation x code, then the scaled result),
    plus float32 summation slack."""
    if scale is None:
        codes, scale, bias = lin_or_codes.qweight, lin_or_codes.scale, lin_or_codes.bias
    else:
        codes = lin_or_codes
    x64, q64, s64 = x.double().reshape(-1, x.shape[-1]), codes.double(), scale.double()
    scaled = (x64 @ q64.T) * s64
    ref = scaled + (bias.double() if bias is not None else 0)
    slack = (x64.abs() @ q64.abs().T) * s64 * 2.0**-20
    err = (y.double().reshape(ref.shape) - ref).abs()
    return bool((err <= 2.0**-8 * (scaled.abs() + ref.abs()) + slack).all())


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("k,n", [(256, 96), (64 + 16 * 5, 37), (576, 160), (16, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_small_batches_run_the_int8_gemv_within_two_roundings_of_the_exact_product(m, k, n, bias):
    if not _gemv_route():
        pytest.skip("torch's INT8 GEMV is vectorized only on x86 with AVX2/AVX-512 (the scratch route runs here)")
    lin = _linear(k=k, n=n, bias=bias, seed=k + n)
    cl = CompressedLinear.from_linear(lin, "int8")
    x = torch.randn(1, m, k, dtype=torch.bfloat16)
    with torch.no_grad():
        y = cl(x)
    assert y.shape == (1, m, n) and y.dtype == torch.bfloat16
    assert _within_two_roundings(y, x, cl)
    # not the scratch route's bits somewhere (each weight rounded to bf16 first): the test sees the GEMV's result
    ref_route = torch.nn.functional.linear(x, _reference_int8(lin), lin.bias)
    assert not torch.equal(y, ref_route) or m * n < 64


@settings(max_examples=40, deadline=None)
@given(n=st_.integers(1, 70), k16=st_.integers(1, 24), m=st_.integers(1, 16), bias=st_.booleans(),
       exp=st_.integers(-30, 20), qoff=st_.sampled_from([0, 1, 8, 24]), xoff=st_.sampled_from([0, 1, 8, 16]),
       seed=st_.integers(0, 2**16))
def test_cpu_gemv_route_holds_for_any_shape_scale_and_placement(n, k16, m, bias, exp, qoff, xoff, seed):
    # any row count, K a multiple of 16, M up to 16, scales from 2^-30 to 2^20 times a random factor, codes and
    # activations at any offset: within two roundings of the exact product, and the same bits wherever they lie
    if not _gemv_route():
        pytest.skip("torch's INT8 GEMV is vectorized only on x86 with AVX2/AVX-512")
    from cupycodec.integrations.torch import ops

    k = 16 * k16
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s = (torch.rand(n, generator=g) + 0.5) * 2.0**exp
    b = torch.randn(n, generator=g).to(torch.bfloat16) * 2.0**exp if bias else None
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    y = ops._int8_linear(x, q, s, b, "channel", 128)
    assert y.dtype == torch.bfloat16 and _within_two_roundings(y, x, q, s, b)
    qm = torch.empty(n * k + qoff, dtype=torch.int8)[qoff:].view(n, k).copy_(q)
    xm = torch.empty(m * k + xoff, dtype=torch.bfloat16)[xoff:].view(m, k).copy_(x)
    assert torch.equal(ops._int8_linear(xm, qm, s, b, "channel", 128), y)


@pytest.mark.parametrize("bias", [False, True])
def test_cpu_gemv_whose_sum_overflows_gives_the_finite_scaled_result(bias):
    # torch's GEMV rounds its sum of activation x code to bf16 before our scale: activations near 1e37 overflow
    # that sum although the scaled product (1.6e35 here) is finite; such a call takes the reference route
    lin = torch.nn.Linear(16, 2, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.fill_(1e-3)
        if bias:
            lin.bias.fill_(1.0)
    cl = CompressedLinear.from_linear(lin, "int8")
    x = torch.full((1, 16), 1e37, dtype=torch.bfloat16)
    with torch.no_grad():
        y = cl(x)
        ref = torch.nn.functional.linear(x, _reference_int8(lin), lin.bias)
    assert torch.isfinite(y).all() and torch.equal(y, ref)
    x[0, 3] = float("inf")  # an infinite input still gives what the reference route gives
    with torch.no_grad():
        assert torch.equal(cl(x), torch.nn.functional.linear(x, _reference_int8(lin), lin.bias))


def test_cpu_gemv_takes_every_code_exactly():
    # one-hot activations: each output is one code times its scale, rounded once, which is the reference's
    # dequantized weight bit for bit; every code value in every position of a 16-code step
    if not _gemv_route():
        pytest.skip("torch's INT8 GEMV is vectorized only on x86 with AVX2/AVX-512")
    from cupycodec.integrations.torch import ops

    k, n = 256, 255
    q = torch.tensor(((np.arange(n)[:, None] + np.arange(k)[None, :]) % 255 - 127).astype(np.int8))
    s = torch.tensor(np.random.default_rng(0).uniform(1e-4, 1e-1, n).astype(np.float32))
    w = ops.dequantize(q, s, "channel", 128, torch.bfloat16)
    for col in (0, 1, 7, 15, 16, 100, 255):
        x = torch.zeros(1, k, dtype=torch.bfloat16)
        x[0, col] = 1
        assert torch.equal(ops._int8_linear(x, q, s, None, "channel", 128)[0], w[:, col]), col


def test_the_cpu_route_does_not_depend_on_where_tensors_lie():
    # codes loaded at a file's offsets, and activations that are a view at an odd offset, take the same route and
    # give the same bits (torch's GEMV needs aligned rows: they are staged, never handed over misaligned)
    from cupycodec.integrations.torch import ops

    torch.manual_seed(3)
    n, k = 96, 256
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s = torch.rand(n) * 0.01 + 1e-3
    x = torch.randn(3, k, dtype=torch.bfloat16)
    want = ops._int8_linear(x, q, s, None, "channel", 128)
    for qoff, xoff in ((8, 0), (24, 8), (0, 16), (1, 1)):
        qm = torch.empty(n * k + qoff, dtype=torch.int8)[qoff:].view(n, k)
        xm = torch.empty(3 * k + xoff, dtype=torch.bfloat16)[xoff:].view(3, k)
        qm.copy_(q), xm.copy_(x)
        assert torch.equal(ops._int8_linear(xm, qm, s, None, "channel", 128), want), (qoff, xoff)
    assert torch.equal(ops._int8_linear(x, q.T.contiguous().T, s, None, "channel", 128), want)  # strided codes


def test_a_cpu_forward_moves_misaligned_codes_once_and_computes_the_same():
    # codes at a file's offsets (from_pretrained): the first eager CPU forward moves them to aligned storage (what
    # torch's GEMV reads without a copy per call); the values, the outputs and later in-place loads are unchanged
    lin = _linear(k=256, n=96, seed=7)
    cl = CompressedLinear.from_linear(lin, "int8")
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        want = cl(x)
    codes = cl.qweight.clone()
    cl.qweight = torch.empty(codes.numel() + 24, dtype=torch.int8)[24:].view_as(codes).copy_(codes)
    assert cl.qweight.data_ptr() % 64
    with torch.inference_mode():
        assert torch.equal(cl(x), want)
    assert not cl.qweight.data_ptr() % 64 and torch.equal(cl.qweight, codes)
    cl.load_state_dict(cl.state_dict())  # in place, outside inference mode
    with torch.no_grad():
        assert torch.equal(cl(x), want)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pagemap and madvise: Linux")
def test_codes_moved_off_a_mapped_file_leave_its_pages_out_of_the_resident_set(tmp_path):
    # as from_pretrained leaves them: codes in a copy-on-write map of the checkpoint, 24 bytes past a 64-byte
    # boundary. The first forward moves them to aligned memory, and the file's pages they were read from leave the
    # resident set (they were counted twice: SmolLM2's INT8 load peaked at 2.7x its checkpoint); the mapping still
    # reads the same bytes, and the layer computes the same
    from helpers import resident_pages

    lin = _linear(k=4096, n=64, seed=8)
    cl = CompressedLinear.from_linear(lin, "int8")
    x = torch.randn(2, 4096, dtype=torch.bfloat16)
    with torch.no_grad():
        want = cl(x)
    codes = cl.qweight.clone()
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\0" * 24 + codes.numpy().tobytes())
    mapped = np.memmap(path, np.int8, mode="c", offset=0)
    cl.qweight = torch.from_numpy(mapped[24:].reshape(codes.shape))
    old = cl.qweight
    assert old.data_ptr() % 64 and torch.equal(old, codes)
    before = resident_pages(old.data_ptr(), old.numel())
    assert before.size >= 32 and before.all()
    with torch.no_grad():
        assert torch.equal(cl(x), want)
    assert not cl.qweight.data_ptr() % 64 and torch.equal(cl.qweight, codes)
    assert not resident_pages(old.data_ptr(), old.numel()).any()
    assert torch.equal(old, codes)


@pytest.mark.parametrize("case", ["k72", "m17", "fp16", "fp32", "group"])
def test_cpu_rows_the_gemv_does_not_take_compute_with_the_reference_weight(case):
    # rows of K % 16 != 0 (which torch's GEMV would read past), batches over 16, other dtypes and group scales:
    # the dequantize-into-scratch route, bit for bit the reference weight through F.linear
    k = 72 if case == "k72" else 256
    dtype = {"fp16": torch.float16, "fp32": torch.float32}.get(case, torch.bfloat16)
    gran = "group" if case == "group" else "channel"
    lin = _linear(k=k, n=48, dtype=dtype)
    cl = CompressedLinear.from_linear(lin, "int8", granularity=gran, group_size=64)
    x = torch.randn(17 if case == "m17" else 2, k, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(cl(x), torch.nn.functional.linear(x, _reference_int8(lin, gran, 64), lin.bias))


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_the_cpu_route_follows_torchs_cpu_capability(capability, tmp_path):
    # ATEN_CPU_CAPABILITY picks torch's kernels: AVX2 has its own vectorized GEMV (within two roundings), and without
    # one its scalar loop (11x slower at M = 8) is never taken: the scratch route's bits
    import platform
    import subprocess
    import sys

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 capabilities")
    code = f"""
import sys, torch
sys.path[:0] = {sys.path!r}
from test_torch_linear import _linear, _reference_int8, _within_two_roundings, _gemv_route
from cupycodec.integrations.torch import CompressedLinear
assert torch.backends.cpu.get_cpu_capability() == {capability.upper()!r}
lin = _linear(k=256, n=96, seed=5)
cl = CompressedLinear.from_linear(lin, "int8")
x = torch.randn(4, 256, dtype=torch.bfloat16)
with torch.no_grad():
    y = cl(x)
ref = torch.nn.functional.linear(x, _reference_int8(lin), lin.bias)
if {capability!r} == "default":
    assert not _gemv_route() and torch.equal(y, ref)
else:
    assert _gemv_route() and _within_two_roundings(y, x, cl) and not torch.equal(y, ref)
print("ok")
"""
    import os

    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       cwd=os.path.dirname(__file__), timeout=300)
    if capability == "avx2" and "Requested capability" in p.stderr:  # pragma: no cover - a CPU without AVX2
        pytest.skip("this CPU has no AVX2")
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-2000:]


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


def test_tensor_helpers_name_what_they_do_not_take():
    with pytest.raises(cc.UnsupportedDtypeError, match=r"torch.float8_e4m3fnuz is not supported; supported: "
                                                        r"torch.bfloat16"):
        dtype_name(torch.float8_e4m3fnuz)  # building the message raised a TypeError before
    t = torch.randn(4, 6, dtype=torch.bfloat16)
    c = to_compressed(t, codec="zstd")
    assert torch.equal(from_compressed(c.to_bytes()), t)  # its bytes, read as cupycodec.decompress reads them
    with pytest.raises(TypeError, match="from_compressed takes a CompressedArray or its bytes, got list"):
        from_compressed([1, 2])
    with pytest.raises(ValueError, match=r"dtype=torch.float32 for a lossless BF16 container.*\.to\(torch.float32\)"):
        from_compressed(c, dtype=torch.float32)  # said "out has dtype F32", with no out= given
    out = torch.zeros(4, 6, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match=r"out is a leaf tensor that requires grad.*out.detach\(\)"):
        from_compressed(c, out=out)
    assert not out.detach().any()
    assert torch.equal(from_compressed(c, out=out.detach()), t) and torch.equal(out.detach(), t)
    q = to_compressed(t, quantize="int8")
    with pytest.raises(ValueError, match=r"dtype=torch.float16 and out of torch.float32"):
        from_compressed(q, out=torch.empty(4, 6), dtype=torch.float16)  # dtype was ignored


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


def test_from_compressed_refuses_integer_dtypes_and_devices_it_cannot_decode_onto():
    """An INT8 container with dtype=int32 gave float bits as integers; a lossless one into an int32 out the same."""
    from cupycodec.integrations.torch import from_compressed, to_compressed

    x = torch.tensor([[1.0, -2.0, 0.5, 4.0]])
    with pytest.raises(ValueError, match="dequantizes to floats: torch.int32"):
        from_compressed(to_compressed(x, quantize="int8"), dtype=torch.int32)
    with pytest.raises(ValueError, match="dequantizes to floats"):
        from_compressed(to_compressed(x, quantize="int8"), out=torch.empty(1, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="decodes exactly, into its own dtype"):
        from_compressed(to_compressed(x), out=torch.empty(1, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="onto the CPU or a CUDA device, got meta"):
        from_compressed(to_compressed(x), device="meta")
    assert torch.equal(from_compressed(to_compressed(x)), x)


@pytest.mark.parametrize("mode", ["lossless", "int8", "int8+entropy"])
@pytest.mark.parametrize("route", ["eager", "autograd", "compiled"])
def test_under_autocast_a_layer_computes_in_autocasts_dtype_as_nn_linear_does(mode, route):
    # autocast runs F.linear in its dtype; our INT8 ops have no autocast rule, so the layer casts itself: without
    # that a compiled model under CPU bf16 autocast returned float32 (and lossless was no longer nn.Linear's result)
    lin = _linear(k=128, n=48, dtype=torch.float32)
    cl = CompressedLinear.from_linear(lin, mode)
    x = torch.randn(3, 128, requires_grad=route == "autograd")
    # aot_eager: Dynamo and AOTAutograd trace the forward as for inductor (whose CPU codegen under autocast trips a
    # DeprecationWarning inside torch 2.13, an error here)
    run = torch.compile(cl, fullgraph=True, backend="aot_eager") if route == "compiled" else cl
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(route == "autograd"):
        y = run(x)
        want = lin(x) if mode == "lossless" else torch.nn.functional.linear(x, _reference_int8(lin), lin.bias)
    assert y.dtype == want.dtype == torch.bfloat16
    if mode == "lossless" and route != "compiled":
        assert torch.equal(y, want)
    else:  # another summation order (the CPU INT8 GEMV, inductor's kernels)
        assert (y.float() - want.float()).abs().max() <= 0.02 * want.float().abs().max()
    if route == "autograd":
        y.float().sum().backward()
        assert x.grad is not None and x.grad.dtype == torch.float32


@pytest.mark.parametrize("mode", ["lossless", "int8+entropy"])
@pytest.mark.parametrize("warm", [True, False])
def test_a_layer_computes_with_the_bytes_its_packed_buffer_holds_now(mode, warm):
    # decoded weights were cached per layer and slot and dropped only by load_state_dict: functional_call with
    # another layer's tensors gave this layer's weight with the other's bias, a first forward through
    # functional_call left the other weight in the slot for the layer's own later forwards, and copy_() into
    # `packed` was ignored
    a_lin, b_lin = _linear(k=64, n=40, seed=1), _linear(k=64, n=40, seed=2)
    a, b = CompressedLinear.from_linear(a_lin, mode), CompressedLinear.from_linear(b_lin, mode)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        want_a, want_b = a(x), b(x)
        fresh = CompressedLinear.from_linear(a_lin, mode)
        if warm:
            assert torch.equal(fresh(x), want_a)
        got = torch.func.functional_call(fresh, {"packed": b.packed, "bias": b.bias}, (x,))
        assert torch.equal(got, want_b)
        assert torch.equal(fresh(x), want_a)  # its own bytes again
        assert torch.equal(fresh.decompress_weight(), a.decompress_weight())  # its header read again, too
        fresh.packed.resize_(b.packed.numel()).copy_(b.packed) if fresh.packed.numel() != b.packed.numel() \
            else fresh.packed.copy_(b.packed)
        fresh.bias.copy_(b.bias)
        assert torch.equal(fresh(x), want_b)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch 2.11
@pytest.mark.parametrize("mode", ["lossless", "int8+entropy"])
def test_a_compiled_functional_call_computes_with_the_bytes_it_was_given(mode):
    # the compiled graph's op read the layer's own packed buffer, which functional_call had swapped only while
    # Dynamo traced: this layer's weight with the other's bias
    a_lin, b_lin = _linear(k=64, n=40, seed=1), _linear(k=64, n=40, seed=2)
    a, b = CompressedLinear.from_linear(a_lin, mode), CompressedLinear.from_linear(b_lin, mode)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    swap = {"packed": b.packed, "bias": b.bias}
    torch._dynamo.reset()
    with torch.no_grad():
        want_a, want_b = a(x), b(x)
        got = torch.compile(lambda t: torch.func.functional_call(a, swap, (t,)), backend="eager", fullgraph=True)(x)
        assert torch.equal(got, want_b)
        assert torch.equal(a(x), want_a) and torch.equal(a.decompress_weight(), CompressedLinear.from_linear(
            a_lin, mode).decompress_weight())
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["lossless", "int8", "int8+entropy"])
@pytest.mark.parametrize("warm", [True, False])
def test_loading_one_of_two_tied_layers_updates_both(mode, warm):
    # the tied layer kept decoding the shared bytes with the old header: the old weight, other values, or a
    # FormatError
    from cupycodec.integrations.torch import compress_model

    def net(seed):
        torch.manual_seed(seed)
        n = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False), torch.nn.ReLU(),
                                torch.nn.Linear(64, 64, bias=False)).to(torch.bfloat16)
        n[2].weight = n[0].weight
        return n

    m, other = net(0), net(1)
    compress_model(m, mode, progress=False)
    compress_model(other, mode, progress=False)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        if warm:
            m(x)
        m[0].load_state_dict(other[0].state_dict())
        assert torch.equal(m[2](x), other[2](x)) and torch.equal(m(x), other(x))


def test_compress_model_keeps_tied_biases_tied_and_the_bias_parameter_itself():
    from cupycodec.integrations.torch import compress_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 32))
    net[1].weight, net[1].bias = net[0].weight, net[0].bias
    bias = net[0].bias
    opt = torch.optim.SGD([bias], lr=0.1)  # made before compressing: it must still train the model's bias
    compress_model(net, "int8", progress=False)
    assert net[0].bias is bias and net[1].bias is bias
    net(torch.randn(4, 32)).sum().backward()
    opt.step()
    assert net[0].bias is net[1].bias and bias.grad is not None


@pytest.mark.parametrize("mode", MODES)
def test_vmap_over_a_layer_computes_what_a_loop_does(mode):
    lin = _linear(k=64, n=16)
    cl = CompressedLinear.from_linear(lin, mode)
    x = torch.randn(5, 3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        got = torch.func.vmap(cl)(x)
        want = torch.stack([cl(xi) for xi in x])
    assert got.shape == want.shape and (got.float() - want.float()).abs().max() <= 0.02 * want.float().abs().max()


def test_construction_refuses_what_nn_linear_refuses():
    with pytest.raises(TypeError, match="in_features must be an int"):
        CompressedLinear(2.5, 4)
    with pytest.raises(TypeError, match="out_features must be an int"):
        CompressedLinear(2, -1)
    with pytest.raises(cc.UnknownCodecError):
        CompressedLinear.from_linear(torch.nn.Linear(4, 4), "int8", codec="no-such-codec")


def test_a_star_import_without_transformers_takes_the_rest():
    # __all__ listed CupycodecConfig and compress_checkpoint, which need transformers (not in the [torch] extra):
    # `from cupycodec.integrations.torch import *` raised ModuleNotFoundError there
    import subprocess

    code = ("import sys, warnings; sys.modules['transformers'] = None; warnings.simplefilter('ignore')\n"
            "from cupycodec.integrations.torch import *\n"
            "print(sorted(n for n in ('compress_model', 'CupycodecConfig') if n in globals()))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["['compress_model']"]


def test_a_bad_device_is_refused_alike_everywhere():
    from cupycodec.integrations.torch import compress_model

    lin = torch.nn.Linear(16, 8)
    c = to_compressed(lin.weight.detach())
    calls = [lambda d: CompressedLinear.from_linear(lin, "int8", device=d),
             lambda d: compress_model(torch.nn.Sequential(lin), "int8", device=d, progress=False),
             lambda d: CompressedLinear(16, 8, device=d),
             lambda d: from_compressed(c, device=d)]
    for call in calls:  # torch's own RuntimeError ("Expected one of cpu, cuda, ...") or AssertionError before
        with pytest.raises(ValueError, match="'gpu' is not a torch device"):
            call("gpu")
        if not torch.cuda.is_available():
            with pytest.raises(cc.BackendUnavailableError, match="no CUDA device is usable here"):
                call("cuda")
    with pytest.raises(TypeError, match="out must be a torch.Tensor, got ndarray"):
        from_compressed(c, out=np.empty((8, 16), np.float32))
    with pytest.raises(TypeError, match="takes a torch.nn.Module, got int"):
        compress_model(3, "int8", progress=False)
