from ...registry import MethodSpec
from .configuration_iic import IicConfig
from .loss_iic import IIC_EPS, iic_segmentation_loss
from .modeling_iic import (
    IicForUnsupervisedSegmentation,
    IicHead,
    IicPreTrainedModel,
    IicSegmenterOutput,
    IicVggTrunk,
    iic_trunk_input,
    sobel_channels,
)
from .training_iic import IicViews, color_jitter, evaluate_iic_heads, head_for_step, make_iic_views

__all__ = [
    "IIC_EPS",
    "IicConfig",
    "IicForUnsupervisedSegmentation",
    "IicHead",
    "IicPreTrainedModel",
    "IicSegmenterOutput",
    "IicVggTrunk",
    "IicViews",
    "color_jitter",
    "evaluate_iic_heads",
    "head_for_step",
    "iic_segmentation_loss",
    "iic_trunk_input",
    "make_iic_views",
    "sobel_channels",
]

# the method(s) of this folder, read by hf_useg.registry
METHODS = (
    MethodSpec(
        name="iic",
        display_name="IIC",
        paper="Ji et al., ICCV 2019, arXiv:1807.06653",
        description="Invariant information clustering.",
        config_class=f"{__name__}.configuration_iic:IicConfig",
        model_class=f"{__name__}.modeling_iic:IicForUnsupervisedSegmentation",
        recipe_class=f"{__name__}.training_iic:IicRecipe",
    ),
)
