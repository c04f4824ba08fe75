"""Light helpers of the model configs (no model code imported here): DINO's ViT shapes, the ImageNet statistics,
the position-embedding interpolation modes, and the keys older configs carried."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = [
    "DINO_LAYER_NORM_EPS",
    "DatasetPresetsMixin",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "check_pos_embed_interpolation",
    "dino_vit_kwargs",
    "drop_legacy_training_fields",
    "preset_values",
]

# the normalisation of every backbone here (and of the protocol, METHODS 0.2), defined once
IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)

# DINO v1 uses LayerNorm eps 1e-6; transformers' ViT default (1e-12) moves the features by up to 6e-5 (METHODS 0.1)
DINO_LAYER_NORM_EPS = 1e-6
_INTERPOLATION_MODES = ("auto", "dino", "transformers")
_DINO_ARCHS = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}


def dino_vit_kwargs(arch: str = "vit_small", patch_size: int = 8, **overrides) -> dict:
    """The `ViTConfig` keyword arguments of a DINO v1 ViT (what configs use as their default ``backbone_config``).

    Example:

    ```python
    >>> dino_vit_kwargs("vit_base", 8)["hidden_size"]
    768
    ```
    """
    if arch not in _DINO_ARCHS:
        raise ValueError(f"unknown DINO architecture {arch!r}; choose one of {sorted(_DINO_ARCHS)}")
    hidden_size, heads = _DINO_ARCHS[arch]
    kwargs = {
        "hidden_size": hidden_size,
        "num_hidden_layers": 12,
        "num_attention_heads": heads,
        "intermediate_size": 4 * hidden_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": DINO_LAYER_NORM_EPS,
        "image_size": 224,
        "patch_size": patch_size,
        "num_channels": 3,
        "qkv_bias": True,
    }
    kwargs.update(overrides)
    return kwargs


def check_pos_embed_interpolation(value: str) -> None:
    """Raise a clear error unless ``value`` is a position-embedding interpolation mode every config accepts."""
    if value not in _INTERPOLATION_MODES:
        raise ValueError(f"pos_embed_interpolation must be one of {_INTERPOLATION_MODES}, got {value!r}")


def drop_legacy_training_fields(kwargs: dict, names: Sequence[str]) -> dict:
    """Remove from a config's ``__post_init__`` kwargs the training settings that configs written before the
    recipes existed carried (``max_steps``, learning rates, ...): such a ``config.json`` still loads, and the
    settings now live in the method's recipe options. Returns what was dropped.

    Example:

    ```python
    >>> kwargs = {"max_steps": 7000, "dim": 90}
    >>> drop_legacy_training_fields(kwargs, ["max_steps"]), kwargs
    ({'max_steps': 7000}, {'dim': 90})
    ```
    """
    return {name: kwargs.pop(name) for name in names if name in kwargs}


def preset_values(presets: Mapping[str, dict[str, Any]], name: str, overrides: dict[str, Any], what: str) -> dict:
    """A copy of ``presets[name]`` updated with ``overrides``; a clear error naming the available presets.

    Example:

    ```python
    >>> preset_values({"potsdam3": {"dim": 70}}, "potsdam3", {"num_classes": 3}, "STEGO")
    {'dim': 70, 'num_classes': 3}
    ```
    """
    if name not in presets:
        raise ValueError(f"unknown {what} preset {name!r}; available: {', '.join(sorted(presets))}")
    values = copy.deepcopy(dict(presets[name]))
    values.update(overrides)
    return values


class DatasetPresetsMixin:
    """``for_dataset(name, **overrides)`` for a config class: the published model of a benchmark, from the class's
    ``dataset_presets`` (the training schedule of the same benchmark is the recipe's preset of that name)."""

    dataset_presets: ClassVar[dict[str, dict[str, Any]]] = {}
    preset_family: ClassVar[str] = ""

    @classmethod
    def for_dataset(cls, name: str, **overrides: Any):
        """The configuration of the released model for benchmark ``name``, with ``overrides`` (e.g. a small
        ``backbone_config`` for tests)."""
        return cls(**preset_values(cls.dataset_presets, name, overrides, cls.preset_family))
