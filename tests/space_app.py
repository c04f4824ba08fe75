"""Load the Space (`spaces/app.py`, not a package) as a module for the Space tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

APP_FILE = Path(__file__).resolve().parents[1] / "spaces" / "app.py"


def load_space_app(module_name: str = "hf_useg_space_app") -> ModuleType:
    """A fresh copy of the Space's module under ``module_name`` (each test file its own, so their caches and
    settings stay apart)."""
    spec = importlib.util.spec_from_file_location(module_name, APP_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module
