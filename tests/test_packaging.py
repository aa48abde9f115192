"""The installed package is the source tree: every subpackage is listed in pyproject.toml, and commands run from
the checkout (python -m cupycodec ..., whose working directory shadows the installed package) find the integrations."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_subpackage_is_packaged():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib is Python >= 3.11")
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = set()
    for top, name in (("cupycodec", "cupycodec"), ("integrations", "cupycodec.integrations")):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            if "__init__.py" in files and "__pycache__" not in dirpath:
                rel = os.path.relpath(dirpath, os.path.join(ROOT, top))
                found.add(name if rel == "." else f"{name}.{rel.replace(os.sep, '.')}")
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def test_the_source_checkout_finds_the_integrations():
    """`python -m cupycodec demo` from the checkout imports the source cupycodec/, which has no integrations/."""
    code = "import cupycodec.integrations.numcodecs as m, cupycodec; print(m.__file__); print(cupycodec.__file__)"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    mod, pkg = run.stdout.split()
    assert mod == os.path.join(ROOT, "integrations", "numcodecs.py")
    assert pkg == os.path.join(ROOT, "cupycodec", "__init__.py")


def test_the_package_is_marked_typed():
    # PEP 561: without py.typed in the package (and in its package data), mypy users saw every name as Any
    if sys.version_info < (3, 11):
        pytest.skip("tomllib is Python >= 3.11")
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        data = tomllib.load(f)["tool"]["setuptools"].get("package-data", {})
    assert "py.typed" in data.get("cupycodec", []) and os.path.isfile(os.path.join(ROOT, "cupycodec", "py.typed"))
