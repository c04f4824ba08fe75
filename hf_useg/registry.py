"""The method registry: every method of the package, declared once by its own folder.

Each ``hf_useg/models/<method>/__init__.py`` declares ``METHODS = (MethodSpec(...),)``; this module finds them by
scanning ``hf_useg/models`` (no list to keep in sync). Auto-class registration, the training loop (``--method``), the
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

__all__ = [
    "MethodSpec",
    "get_method",
    "method_for_model_type",
    "method_names",
    "methods",
    "register_auto_classes",
    "register_method",
]


@dataclass(frozen=True)
class MethodSpec:
    """One trainable method.

    Args:
        name: the ``--method`` value of ``training/train.py`` (e.g. ``"stego"``).
        display_name: human name for cards, the CLI and the Space (e.g. ``"STEGO"``).
        paper: the reference, e.g. ``"Hamilton et al., ICLR 2022, arXiv:2203.08414"``.
        description: one sentence for model cards.
        config_class, model_class, recipe_class: ``"module.path:ClassName"``, imported on first use.
        pipeline_task: the ``transformers`` pipeline its models serve (None: not a pipeline model, e.g. backbone
            pretraining). ``"object-detection"`` methods train a ``transformers`` detector (their config and model
            classes are transformers' own, which the Auto classes already know).
    """

    name: str
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

    @property
    def model_type(self) -> str:
        """``config.model_type`` of the method's models (the key of ``config.json``)."""
        return self.load_config_class().model_type

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


def register_auto_classes(spec: MethodSpec) -> None:
    """Register ``spec``'s config and model with `AutoConfig` / `AutoModel` and, for image-segmentation methods,
    with `AutoModelForSemanticSegmentation` and `AutoImageProcessor` (what the pipeline loads). Idempotent."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES

    config_class, model_class = spec.load_config_class(), spec.load_model_class()
    if config_class.__module__.startswith("transformers."):
        return  # a transformers model trained by a recipe here (a fine-tuned detector): transformers maps it itself
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, model_class, exist_ok=True)
    if spec.pipeline_task != "image-segmentation":
        return
    from .image_processing import UnsupervisedSegmentationImageProcessor

    AutoModelForSemanticSegmentation.register(config_class, model_class, exist_ok=True)
    AutoImageProcessor.register(
        config_class, slow_image_processor_class=UnsupervisedSegmentationImageProcessor, exist_ok=True
    )
    # The image-segmentation pipeline checks the model class against this static name table, which `register`
    # does not update; without the entry it logs "... is not supported" (and works anyway).
    MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES.setdefault(config_class.model_type, model_class.__name__)


def register_method(spec: MethodSpec) -> None:
    """Add a method defined outside ``hf_useg/models`` (a plugin package, a test) to the registry and the Auto
    classes, so that ``train(load_training_arguments(None, method=spec.name, ...))`` trains it.

    Example:

    ```python
    >>> register_method(MethodSpec(name="toy", ...))  # doctest: +SKIP
    ```
    """
    registered = methods()
    if spec.name in registered and registered[spec.name] != spec:
        raise ValueError(f"a different method is already registered as {spec.name!r}")
    registered[spec.name] = spec
    register_auto_classes(spec)
