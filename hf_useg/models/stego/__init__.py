import importlib

from ...registry import MethodSpec
from .configuration_stego import StegoConfig
from .loss_stego import StegoCorrelationLoss, StegoLossOutput, correlation_samples
from .modeling_stego import (
    StegoForUnsupervisedSegmentation,
    StegoPreTrainedModel,
    StegoSegmentationHead,
    StegoSegmenterOutput,
)

# the diagnostics (they import the training recipe) load on first access
_LAZY_NAMES = {
    "StegoDiagnostics": ".diagnostics",
    "format_diagnostics": ".diagnostics",
    "plot_correlation_histograms": ".diagnostics",
    "save_diagnostics": ".diagnostics",
    "stego_correlation_diagnostics": ".diagnostics",
}

__all__ = [
    "StegoConfig",
    "StegoCorrelationLoss",
    "StegoDiagnostics",
    "StegoForUnsupervisedSegmentation",
    "StegoLossOutput",
    "StegoPreTrainedModel",
    "StegoSegmentationHead",
    "StegoSegmenterOutput",
    "correlation_samples",
    "format_diagnostics",
    "plot_correlation_histograms",
    "save_diagnostics",
    "stego_correlation_diagnostics",
]


def __getattr__(name: str):
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


# the method(s) of this folder, read by hf_useg.registry
METHODS = (
    MethodSpec(
        name="stego",
        display_name="STEGO",
        paper="Hamilton et al., ICLR 2022, arXiv:2203.08414",
        description="A segmentation head trained on frozen self-supervised ViT features by distilling their feature "
        "correspondences (no labels); segments are found by clustering the learned code.",
        config_class=f"{__name__}.configuration_stego:StegoConfig",
        model_class=f"{__name__}.modeling_stego:StegoForUnsupervisedSegmentation",
        recipe_class=f"{__name__}.training_stego:StegoRecipe",
    ),
)
