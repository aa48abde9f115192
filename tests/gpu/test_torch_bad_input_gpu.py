"""What a GPU bug hunt found in the INT8 routes and the block runtime (2026-12-04), each pinned on a GPU:
inputs of the wrong width or on the wrong device, misaligned activations, the dequantization scratch growing
under a captured graph, and ``Runtime.check`` on a forward run on another stream."""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.nvcomp, pytest.mark.torch]

K, N = 256, 512


def _layer(mode, k=K, n=N, device="cuda"):
    from cupycodec.integrations.torch import CompressedLinear

    torch.manual_seed(0)
    return CompressedLinear.from_linear(torch.nn.Linear(k, n, device=device, dtype=torch.bfloat16), mode)


@pytest.mark.parametrize("mode", ["int8", "int8+entropy"])
@pytest.mark.parametrize("shape", [(2, 2 * K), (1, K + 40), (3, K - 16), (40, 2 * K)])
def test_an_input_of_another_width_is_refused_and_writes_nothing(mode, shape):
    """M was x.numel() // K: (2, 2K) wrote four rows into a two-row output (past its end), (1, K + 40) ignored 40
    features, (3, K - 16) left a row unwritten. nn.Linear refuses all of them."""
    layer = _layer(mode)
    x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        canary = torch.full((64, N), 7.0, device="cuda", dtype=torch.bfloat16)
        with pytest.raises(RuntimeError, match=f"in_features \\({K}\\)"):
            layer(x)
        torch.cuda.synchronize()
    assert bool((canary == 7).all())


@pytest.mark.parametrize("m", [1, 64])
def test_a_layer_on_the_host_refuses_a_cuda_input(m):
    """The INT8 route was chosen from the input's device and launched with the layer's host addresses: an illegal
    memory access that killed the CUDA context."""
    layer = _layer("int8", device="cpu")
    with torch.no_grad(), pytest.raises(RuntimeError, match="the input is on cuda:0 and this layer's weight on cpu"):
        layer(torch.randn(m, K, device="cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()  # the context is alive
    assert torch.ones(1, device="cuda").item() == 1


@pytest.mark.parametrize("mode", ["int8", "int8+entropy"])
def test_contiguous_misaligned_activations_compute_what_aligned_ones_do(mode):
    """contiguous() of a contiguous view at an odd offset is that view, still misaligned: the GEMV refused it."""
    layer = _layer(mode)
    base = torch.randn(4 * K + 8, device="cuda", dtype=torch.bfloat16)
    for off in (1, 3):
        x = base[off : off + 2 * K].view(2, K)
        assert x.is_contiguous() and x.data_ptr() % 16
        with torch.no_grad():
            assert torch.equal(layer(x), layer(x.clone()))


def test_a_graph_keeps_its_scratch_when_a_larger_layer_grows_it():
    """The scratch a large batch dequantizes into was freed when a larger layer grew it, while a captured graph's
    replays still wrote there: into whatever tensor took the memory next."""
    from cupycodec.integrations.torch import ops

    a = _layer("int8", 512, 512)
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)  # M = 64: dequantize into the scratch, cuBLAS
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(s):
        for _ in range(2):
            want = a(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g):
        y = a(x)
    torch.cuda.synchronize()
    old = ops.scratch(torch.device("cuda", 0)).data_ptr()
    ops.reserve_scratch(ops._RESERVED[0] + (64 << 20))  # a larger layer came: the next forward grows it
    b = _layer("int8", 2048, 2048)
    with torch.no_grad():
        b(torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()
    assert ops.scratch(torch.device("cuda", 0)).data_ptr() != old
    with torch.cuda.stream(s):  # tensors that would take the freed memory
        sentinels = [torch.full((512 * 512,), 7, dtype=torch.int16, device="cuda") for _ in range(64)]
    torch.cuda.synchronize()
    g.replay()
    torch.cuda.synchronize()
    assert all(bool((t == 7).all()) for t in sentinels)
    assert torch.equal(y, want)


def test_runtime_check_waits_for_a_forward_on_another_stream():
    """check() read the decodes' error words on CuPy's current stream, which torch's streams do not wait for: it
    returned while the forward's decodes were still pending, and would have missed a bad chunk among them."""
    from cupycodec.integrations.torch import compress_model

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(256, 512), torch.nn.Linear(512, 256)

        def forward(self, x):
            return x + self.down(torch.nn.functional.silu(self.up(x)))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block() for _ in range(4)])

        def forward(self, x):
            for b in self.layers:
                x = b(x)
            return x

    torch.manual_seed(0)
    model = Model().to("cuda", torch.bfloat16).eval()
    compress_model(model, "lossless", progress=False)
    rt = model._cupycodec_runtime[0]
    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    with torch.no_grad(), torch.cuda.stream(s):
        model(x)
    torch.cuda.synchronize()
    rt.reset()  # the next forward decodes every block
    with torch.no_grad(), torch.cuda.stream(s):
        torch.cuda._sleep(int(5e8))  # GPU time ahead of the decodes
        model(x)
    t0 = time.perf_counter()
    rt.check()
    assert s.query(), f"check() returned after {1e3 * (time.perf_counter() - t0):.1f} ms with the decodes pending"
