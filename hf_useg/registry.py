"""The method registry: every method of the package, declared once by its own folder.

Each ``hf_useg/models/<method>/__init__.py`` declares ``METHODS = (MethodSpec(...),)``; this module finds them by
scanning ``hf_useg/models`` (no list to keep in sync). Auto-class registration, the trainer (``--method``), the
CLI, model cards and the Space read this registry. Class references are dotted strings so that reading the
registry imports no model code.

Example:

```python
>>> from hf_useg.registry import get_method, method_names
>>> "stego" in method_names()
True
>>> spec = get_method("stego")
>>> spec.display_name, spec.model_type
('STEGO', 'stego')
```
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass

__all__ = ["MethodSpec", "get_method", "method_for_model_type", "method_names", "methods"]


@dataclass(frozen=True)
class MethodSpec:
    """One trainable method.

    Args:
        name: the ``--method`` value of ``training/train.py`` (e.g. ``"stego"``).
        model_type: ``config.model_type`` of its models (the key of ``config.json``).
        display_name: human name for cards, the CLI and the Space (e.g. ``"STEGO"``).
        paper: the reference, e.g. ``"Hamilton et al., ICLR 2022, arXiv:2203.08414"``.
        description: one sentence for model cards.
        config_class, model_class, recipe_class: ``"module.path:ClassName"``, imported on first use.
        pipeline_task: the ``transformers`` pipeline its models serve (None: not a pipeline model, e.g. backbone
            pretraining).
    """

    name: str
    model_type: str
    display_name: str
    paper: str
    description: str
    config_class: str
    model_class: str
    recipe_class: str
    pipeline_task: str | None = "image-segmentation"

    @staticmethod
    def _load(reference: str):
        module, _, attribute = reference.partition(":")
        return getattr(importlib.import_module(module), attribute)

    def load_config_class(self) -> type:
        return self._load(self.config_class)

    def load_model_class(self) -> type:
        return self._load(self.model_class)

    def load_recipe_class(self) -> type:
        return self._load(self.recipe_class)


@functools.cache
def methods() -> dict[str, MethodSpec]:
    """Every registered method by name, in the order of the folders under ``hf_useg/models``."""
    from . import models

    found: dict[str, MethodSpec] = {}
    for package in sorted(pkgutil.iter_modules(models.__path__), key=lambda info: info.name):
        if not package.ispkg:
            continue
        module = importlib.import_module(f"{models.__name__}.{package.name}")
        for spec in getattr(module, "METHODS", ()):
            if spec.name in found:
                raise RuntimeError(f"method {spec.name!r} is declared twice ({module.__name__})")
            found[spec.name] = spec
    return found


def method_names() -> list[str]:
    return sorted(methods())


def get_method(name: str) -> MethodSpec:
    """The spec of ``name``; a clear error listing the methods otherwise."""
    registered = methods()
    if name not in registered:
        raise ValueError(f"method must be one of {sorted(registered)}, got {name!r}")
    return registered[name]


def method_for_model_type(model_type: str) -> MethodSpec | None:
    """The method whose models have ``config.model_type == model_type`` (None for foreign models)."""
    return next((spec for spec in methods().values() if spec.model_type == model_type), None)
