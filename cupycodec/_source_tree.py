"""In a source checkout, make ``cupycodec.integrations`` the top-level ``integrations/`` directory, as installing does.

pyproject.toml installs ``integrations/`` as ``cupycodec.integrations`` (a package-dir mapping). Run from the
checkout (``python -m cupycodec demo``, ``python -c ...``), the working directory comes first on ``sys.path``, so
``cupycodec`` is the source directory, which has no ``integrations`` inside it: without this, the README's demo
command fails there even with the package installed. Installed or editable copies are left alone.
"""

from __future__ import annotations

import os
import sys

__all__ = ["map_integrations"]

_NAME = "cupycodec.integrations"


def map_integrations() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    src = os.path.join(os.path.dirname(here), "integrations")
    if os.path.isdir(os.path.join(here, "integrations")) or not os.path.isfile(os.path.join(src, "__init__.py")):
        return  # an installed package (integrations inside it), or no checkout around it
    if any(type(f).__name__ == "_SourceIntegrations" for f in sys.meta_path):
        return
    import importlib.abc
    import importlib.util

    class _SourceIntegrations(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != _NAME:
                return None  # its subpackages resolve through its __path__
            return importlib.util.spec_from_file_location(_NAME, os.path.join(src, "__init__.py"),
                                                          submodule_search_locations=[src])

    sys.meta_path.append(_SourceIntegrations())  # last: any real cupycodec.integrations is found first
