from ...registry import MethodSpec
from .configuration_stego import StegoConfig
from .loss_stego import StegoCorrelationLoss, StegoLossOutput
from .modeling_stego import (
    StegoForUnsupervisedSegmentation,
    StegoPreTrainedModel,
    StegoSegmentationHead,
    StegoSegmenterOutput,
)

__all__ = [
    "StegoConfig",
    "StegoCorrelationLoss",
    "StegoForUnsupervisedSegmentation",
    "StegoLossOutput",
    "StegoPreTrainedModel",
    "StegoSegmentationHead",
    "StegoSegmenterOutput",
]

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
