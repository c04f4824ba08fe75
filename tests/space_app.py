"""Load the Space (`spaces/app.py`, not a package) as a module for the Space tests."""

from __future__ import annotations

from types import ModuleType

from script_modules import load_script


def load_space_app(module_name: str = "hf_useg_space_app") -> ModuleType:
    """A fresh copy of the Space's module under ``module_name`` (each test file its own, so their caches and
    settings stay apart)."""
    return load_script("spaces/app.py", module_name)
