"""Load a script of the repository that is not part of the package (the Space, a benchmark) as a module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative_path: str, module_name: str) -> ModuleType:
    """A fresh copy of ``ROOT / relative_path`` imported as ``module_name`` (registered in ``sys.modules``: the
    dataclasses of the script look their module up there)."""
    spec = importlib.util.spec_from_file_location(module_name, ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
