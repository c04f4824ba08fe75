"""hf_useg: unsupervised semantic segmentation (IIC, PiCIE, DINO, STEGO, CutMix-DETReg) as Hugging Face
`transformers` models.

Importing the package registers every method of `hf_useg.registry` with `AutoConfig`, `AutoModel`,
`AutoModelForSemanticSegmentation` (what the ``image-segmentation`` pipeline loads) and `AutoImageProcessor`.
The public names below (configs, models, the image processor, ...) are imported on first access (PEP 562).

Example:

```python
>>> import hf_useg
>>> from transformers import pipeline
>>> segmenter = pipeline("image-segmentation", model="path/to/stego-model")   # doctest: +SKIP
```

Why the registration is not lazy: `transformers` (5.x) keeps registered classes as plain values of
``_LazyConfigMapping._extra_content`` / ``_LazyAutoMapping._extra_content`` (no hook resolves a dotted name on
first lookup), and registering a config class needs the class itself, whose import pulls in
``transformers.configuration_utils`` and torch. Registering from an import hook on ``transformers.models.auto``
is not safe either: those modules finish loading while ``transformers.modeling_utils`` (or the pipeline module)
is still half-initialised. So ``import hf_useg`` registers at once; only the ``hf-useg`` console script defers it
until its arguments are parsed (`hf_useg.cli.main`), so that ``hf-useg --help`` and argument errors import
neither torch nor the model code.
"""

from __future__ import annotations

import importlib
import os
import sys

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access)
_LAZY_NAMES = {
    "ClusterProbe": ".clustering",
    "CutMixDetregConfig": ".models.detreg",
    "CutMixDetregForPretraining": ".models.detreg",
    "DinoForSelfSupervisedPretraining": ".models.dino",
    "DinoForUnsupervisedSegmentation": ".models.dino",
    "DinoPretrainingConfig": ".models.dino",
    "DinoSegmentationConfig": ".models.dino",
    "IicConfig": ".models.iic",
    "IicForUnsupervisedSegmentation": ".models.iic",
    "PicieConfig": ".models.picie",
    "PicieForUnsupervisedSegmentation": ".models.picie",
    "StegoConfig": ".models.stego",
    "StegoForUnsupervisedSegmentation": ".models.stego",
    "UnsupervisedSegmentationImageProcessor": ".image_processing",
    "UnsupervisedSegmentationPrediction": ".modeling_utils",
    "UnsupervisedSegmentationPreTrainedModel": ".modeling_utils",
    "UnsupervisedSegmenterOutput": ".modeling_utils",
}

__all__ = sorted(_LAZY_NAMES)


def __getattr__(name: str):
    if name == "_SEGMENTATION_MODELS":  # (config class, model class) of every image-segmentation method
        from .registry import methods

        return tuple(
            (spec.load_config_class(), spec.load_model_class())
            for spec in methods().values()
            if spec.pipeline_task == "image-segmentation"
        )
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


_registered = False


def _register_auto_classes() -> None:
    """Register every method of `hf_useg.registry` with the Auto classes (segmentation models also with
    `AutoModelForSemanticSegmentation` and `AutoImageProcessor`, what the ``image-segmentation`` pipeline loads).
    Idempotent."""
    global _registered
    if _registered:
        return
    from .registry import methods, register_auto_classes

    for spec in methods().values():
        register_auto_classes(spec)
    _registered = True


# The names pip gives the `hf-useg` console script (`hf_useg.cli:main`) on POSIX and Windows.
_CONSOLE_SCRIPT_NAMES = ("hf-useg", "hf-useg.exe", "hf-useg-script.py")


def _is_console_script() -> bool:
    """Whether this process is the ``hf-useg`` console script: its `hf_useg.cli.main` is the only code that runs,
    and it registers the Auto classes itself once the arguments are parsed."""
    argv = getattr(sys, "argv", None) or [""]
    return os.path.basename(argv[0]) in _CONSOLE_SCRIPT_NAMES


if not _is_console_script():
    _register_auto_classes()
