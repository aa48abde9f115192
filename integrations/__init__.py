"""Framework bridges, installed as ``cupycodec.integrations``: import a bridge by name (``.torch``, ``.numcodecs``,
``.zarr``).

Importing this package also makes transformers' ``from_pretrained`` know cupycodec checkpoints: the quantizer
registers as soon as transformers is imported, before or after this package, and nothing heavy is imported here
(Zarr readers that never touch transformers do not pay for it).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings


def _register_transformers() -> None:
    try:
        from .torch import hf  # registers at the end of its import
    except ImportError as exc:  # torch missing, or a transformers without per-tensor conversions
        warnings.warn(f"cupycodec's transformers quantizer is not registered: {exc}", stacklevel=2)
        return
    register = getattr(hf, "register", None)
    if register is not None:  # else hf itself is importing transformers now, and registers once it is done
        register()


class _AfterTransformers(importlib.abc.MetaPathFinder):
    """Registers the quantizer right after ``transformers`` is first imported (a one-shot import hook)."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register_transformers()

        spec.loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    _register_transformers()
elif not any(isinstance(f, _AfterTransformers) for f in sys.meta_path) and \
        importlib.util.find_spec("transformers") is not None:
    sys.meta_path.insert(0, _AfterTransformers())
