"""PyTorch integration: compressed ``nn.Linear`` layers and whole-model compression.

>>> from cupycodec.integrations.torch import compress_model          # doctest: +SKIP
>>> report = compress_model(model, "int8")                           # doctest: +SKIP
>>> print(report)                                                    # doctest: +SKIP

Modes: ``"lossless"`` (bit-exact weights, about 67-70 % of bf16), ``"int8"`` (INT8 codes and float32 scales resident,
a fused dequantize-GEMV at small batch on the GPU), ``"int8+entropy"`` (the INT8 codes entropy-coded, decoded per
use). Weights stay plain tensors (uint8 payloads, int8 codes, float32 scales) owned by the modules, so
``state_dict``, safetensors, ``.to()`` and ``torch.cuda.memory_allocated()`` see them as they are.
"""

from __future__ import annotations

import importlib.util

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError('cupycodec.integrations.torch needs PyTorch: pip install "cupycodec[torch]"') from exc

if tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 4):  # pragma: no cover
    raise ImportError(f"cupycodec.integrations.torch needs torch>=2.4 (custom ops), found {torch.__version__}")

from .checkpoint import load_compressed, save_compressed
from .dlpack import from_compressed, to_compressed, torch_dtype
from .linear import MODES, CompressedLinear
from .model import CompressionReport, LayerReport, compress_model, find_blocks
from .offload import OffloadReport, dispatch_model, offload_model


def __getattr__(name):  # these need transformers: imported when asked for, not with this package
    if name in ("CupycodecConfig", "compress_checkpoint"):
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "MODES",
    "CompressedLinear",
    "CompressionReport",
    "CupycodecConfig",
    "LayerReport",
    "OffloadReport",
    "compress_checkpoint",
    "compress_model",
    "dispatch_model",
    "find_blocks",
    "from_compressed",
    "load_compressed",
    "offload_model",
    "save_compressed",
    "to_compressed",
    "torch_dtype",
]
if importlib.util.find_spec("transformers") is None:  # the [torch] extra lacks it: a star import takes the rest
    __all__ = [n for n in __all__ if n not in ("CupycodecConfig", "compress_checkpoint")]
