"""The examples in the public docstrings run as written (CompressedArray's had drifted: its dtype printed as
dtype('<f4') where the example shows dtype('float32'))."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "cupycodec",
    "cupycodec.api",
    "cupycodec.container",
    "cupycodec.quant.reference",
    "cupycodec.integrations.numcodecs",
    "cupycodec.integrations.trust",
    "cupycodec.integrations.zarr",
    "cupycodec.integrations.torch",
    "cupycodec.integrations.torch.offload",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if name.startswith("cupycodec.integrations.torch"):
        pytest.importorskip("torch")
    if name.endswith("zarr"):
        pytest.importorskip("zarr")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"
