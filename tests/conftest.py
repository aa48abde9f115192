"""Markers, automatic GPU skips, the ``xp`` fixture and hypothesis profiles shared by every test."""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("default", max_examples=50, deadline=None)
settings.register_profile("ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("gpu", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ModuleNotFoundError, ValueError):  # parent package missing ("nvidia" for "nvidia.nvcomp")
        return False


def _have_gpu() -> bool:
    try:
        import cupy

        return bool(cupy.is_available())
    except Exception:  # ImportError, or a broken CUDA install
        return False


def _have_nvcomp() -> bool:
    if not _have_gpu():
        return False
    from cupycodec.backends import _nvcomp_lib

    return _nvcomp_lib.available()  # says why not in unavailable_reason(); a bug in it must not look like "no GPU"


def pytest_collection_modifyitems(config, items):
    gpu = _have_gpu()
    if os.environ.get("CUPYCODEC_REQUIRE_GPU") == "1":
        if not gpu:
            raise pytest.UsageError("CUPYCODEC_REQUIRE_GPU=1 but no usable CUDA device: refusing to skip GPU tests")
        if not _have_nvcomp():
            raise pytest.UsageError("CUPYCODEC_REQUIRE_GPU=1 but nvCOMP cannot be loaded: refusing to skip")
    why_not = {
        "gpu": None if gpu else "no usable CUDA device (cupy.is_available() is False)",
        "nvcomp": None if _have_nvcomp() else "needs nvidia-libnvcomp and a CUDA device",
        "torch": None if _importable("torch") else "PyTorch is not installed",
    }
    for item in items:
        for marker, reason in why_not.items():
            if reason and marker in item.keywords:
                item.stash[_SKIP] = reason
                break


_SKIP = pytest.StashKey[str]()


def pytest_runtest_setup(item):
    # Skipped here, from one line of this file, so that `pytest -ra` sums up every GPU skip in one summary line
    # ("SKIPPED [n] tests/conftest.py:NN: no usable CUDA device") instead of one line per test location.
    reason = item.stash.get(_SKIP, None)
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """Run one test body on NumPy and, where a GPU exists, on CuPy."""
    return importlib.import_module(request.param)
